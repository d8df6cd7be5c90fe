"""Our vocab-parallel KD loss equals ModelOpt's LogitsDistillationLoss, its TP-split version
equals the unsplit one, its chunked version the unchunked one, and the cross entropy it returns
megatron's ``vocab_parallel_cross_entropy`` (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_elastic.distill import kd_and_ce_loss, kd_kl_loss


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


def _run(student, teacher, labels, temperature, group, num_chunks, kd_weight=1.0):
    """KD and CE per token and the student's gradient of a weighted sum of both."""
    student = student.clone().requires_grad_()
    kd, ce = kd_and_ce_loss(student, teacher, labels, temperature, group, num_chunks)
    weights = torch.arange(float(kd.numel())).view(kd.shape)
    loss = (ce * weights.flip(0)).sum()
    (loss + (kd * weights).sum() * kd_weight if kd_weight else loss).backward()
    return {"kd": kd.detach(), "ce": ce.detach(), "grad": student.grad}


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(4, 5, 40, generator=g) * 2).to(dtype)
    teacher = (torch.randn(4, 5, 40, generator=g) * 2).to(dtype)
    return student, teacher, torch.randint(0, 40, (4, 5), generator=g)


def _tp_worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    student, teacher, labels = _inputs()
    shard, t_shard = student.chunk(2, dim=-1)[rank], teacher.chunk(2, dim=-1)[rank]
    runs = {n: _run(shard, t_shard, labels, 1.7, dist.group.WORLD, n) for n in (1, 3, 20)}
    torch.save(runs, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp2_runs(tmp_path_factory) -> list[dict]:
    """Each rank's runs at TP 2 (gloo): unchunked, 3 chunks (7 + 7 + 6 tokens), one token per
    chunk."""
    tmp = tmp_path_factory.mktemp("tp2")
    mp.spawn(_tp_worker, args=(f"file://{tmp}/store", str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the tensors' scale (largest magnitude)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _diff(a: dict, b: dict, name: str) -> float:
    return (a[name].float() - b[name].float()).abs().max().item()


@pytest.mark.distributed
def test_invariant_vocab_parallel_kd_loss_equals_unsplit(tp2_runs) -> None:
    whole = _run(*_inputs(), 1.7, None, 1)
    for name in ("kd", "ce"):
        for part in tp2_runs:
            assert _close(part[1][name], whole[name]) <= 1e-6, name
    grad = torch.cat([part[1]["grad"] for part in tp2_runs], dim=-1)
    assert _close(grad, whole["grad"]) <= 1e-6


@pytest.mark.distributed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_invariant_chunked_kd_loss_equals_unchunked(tp2_runs, temperature, dtype) -> None:
    """Chunks over tokens change no bit of the KD loss, the CE or the gradient: at TP 1 (uneven
    chunks, one token per chunk; fp32 and bf16 logits) and at TP 2."""
    student, teacher, labels = _inputs(dtype)
    whole = _run(student, teacher, labels, temperature, None, 1)
    for n in (3, 20):
        chunked = _run(student, teacher, labels, temperature, None, n)
        for name in ("kd", "ce", "grad"):
            assert torch.equal(chunked[name], whole[name]), (n, name, _diff(chunked, whole, name))
    for part in tp2_runs:
        for n in (3, 20):
            for name in ("kd", "ce", "grad"):
                assert torch.equal(part[n][name], part[1][name]), (
                    n,
                    name,
                    _diff(part[n], part[1], name),
                )


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_cross_entropy_is_megatrons_bit_for_bit(pgs, temperature) -> None:
    """The CE the KD pass returns (and its gradient) is megatron's ``vocab_parallel_cross_entropy``
    (what the trainer logged before), bit for bit, at any temperature and chunking."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    student, teacher, labels = _inputs()
    ours = _run(student, teacher, labels, temperature, pgs.tp, 3, kd_weight=0)
    x = student.clone().requires_grad_()  # megatron's layout: (s, b, V), labels (s, b)
    ce = vocab_parallel_cross_entropy(
        x.transpose(0, 1).contiguous(), labels.t().contiguous(), 0.0, pgs.tp
    ).t()
    (ce * torch.arange(20.0).view(4, 5).flip(0)).sum().backward()
    assert torch.equal(ours["ce"], ce.detach())
    assert torch.equal(ours["grad"], x.grad)
