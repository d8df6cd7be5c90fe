"""Our vocab-parallel KD loss equals ModelOpt's LogitsDistillationLoss, and its TP-split version
equals the unsplit one (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_elastic.distill import kd_kl_loss


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_matches_modelopt_logits_distillation_loss(temperature) -> None:
    from modelopt.torch.distill.losses import LogitsDistillationLoss

    g = torch.Generator().manual_seed(0)
    student = (torch.randn(3, 7, 50, generator=g) * 3).requires_grad_()
    teacher = torch.randn(3, 7, 50, generator=g) * 3
    ours = kd_kl_loss(student, teacher, temperature)
    ours.sum().backward()
    ours_grad = student.grad.clone()
    student.grad = None
    ref = LogitsDistillationLoss(temperature=temperature, reduction="none")(student, teacher)
    ref.sum().backward()
    assert ours.shape == ref.shape == (3, 7)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-5)
    assert torch.allclose(ours_grad, student.grad, atol=1e-6, rtol=1e-5)
    assert torch.all(kd_kl_loss(teacher, teacher, temperature).abs() < 1e-5)  # KL(p||p) = 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="temperature"):
        kd_kl_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="differ"):
        kd_kl_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def _tp_worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 5, 40, generator=g) * 2
    teacher = torch.randn(4, 5, 40, generator=g) * 2
    shard = student.chunk(2, dim=-1)[rank].clone().requires_grad_()
    loss = kd_kl_loss(shard, teacher.chunk(2, dim=-1)[rank], 1.7, dist.group.WORLD)
    (loss * torch.arange(20.0).view(4, 5)).sum().backward()
    torch.save({"loss": loss.detach(), "grad": shard.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_invariant_vocab_parallel_kd_loss_equals_unsplit(tmp_path) -> None:
    init = f"file://{tmp_path}/store"
    mp.spawn(_tp_worker, args=(init, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(4, 5, 40, generator=g) * 2).requires_grad_()
    teacher = torch.randn(4, 5, 40, generator=g) * 2
    loss = kd_kl_loss(student, teacher, 1.7)
    (loss * torch.arange(20.0).view(4, 5)).sum().backward()
    for part in parts:
        assert torch.allclose(part["loss"], loss.detach(), atol=1e-6)
    grad = torch.cat([p["grad"] for p in parts], dim=-1)
    assert torch.allclose(grad, student.grad, atol=1e-6)
