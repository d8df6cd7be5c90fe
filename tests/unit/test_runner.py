"""The trainer's runners (the model alone, the distillation pair) through megatron's schedule, and
the step's named loss sums through its one reduction."""

from __future__ import annotations

import pytest
import torch

from megatron_elastic.distill.pair import DistillationPair
from megatron_elastic.elastic import SubnetSpec, build_elastic_model
from megatron_elastic.elastic.config import ElasticConfig
from megatron_elastic.training import forward_backward
from megatron_elastic.training.metrics import LossSums, reduce_step_stats
from megatron_elastic.training.runner import DistillRunner, ModelRunner, Runner

ELASTIC = ElasticConfig(budgets={"full": 1.0, "half": 0.5}, ffn_nesting_blocks=2)


def _batches(vocab: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    out = []
    for i in range(n):
        tokens = torch.randint(0, vocab, (2, 16))
        mask = torch.ones(2, 16)
        mask[:, : 3 + i] = 0  # a different token count per micro-batch
        out.append({"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": mask})
    return out


def _run(runner: Runner, batches, pgs, drawn: list[str], specs: dict) -> torch.Tensor:
    runner.begin_step()

    def hook(i: int) -> None:
        runner.set_subnet(specs[drawn[i]], None)

    return forward_backward(
        runner.module,
        batches,
        pgs,
        num_micro_batches=len(batches),
        seq_length=16,
        micro_batch_size=2,
        micro_batch_hook=hook,
        model_forward=runner.forward,
        p2p_batch_factor=runner.p2p_batch_factor,
    )


def test_both_runners_satisfy_the_protocol_and_report_token_sums(small_config, pgs) -> None:
    torch.manual_seed(0)
    model = build_elastic_model(small_config, ELASTIC, pgs)
    half = SubnetSpec.homogeneous(small_config, hidden=48, attention_heads=2, mamba_heads=2, ffn=64)
    specs, drawn = {"full": None, "half": half}, ["half", "full"]
    batches = _batches(small_config.vocab_size)
    tokens = [b["loss_mask"].sum().item() for b in batches]

    alone = ModelRunner(model, model, "all")
    assert isinstance(alone, Runner) and alone.teacher is None and alone.budgets == ["all"]
    loss = _run(alone, batches, pgs, drawn, specs)
    (sums,) = alone.losses(drawn, loss, batches, counted=True)["all"]
    assert sums.tokens.item() == sum(tokens) and sums.micro_batches.item() == 2
    assert sums.kd.item() == pytest.approx(loss.item() * sum(tokens), rel=1e-6)
    assert torch.equal(sums.kd, sums.ce)  # cross entropy is the training loss
    assert alone.losses(drawn, loss, batches, counted=False) == {}  # another CP rank counts it
    assert alone.losses(drawn, None, batches, counted=True) == {}  # not the last stage

    pair = DistillationPair(model, None, temperature=1.0, ce_weight=0.0, tp_group=pgs.tp)
    distil = DistillRunner(pair, ["half", "full"])
    assert isinstance(distil, Runner) and distil.budgets == ["full", "half"]
    assert distil.p2p_batch_factor == 2 and distil.teacher is None
    _run(distil, batches, pgs, drawn, specs)
    per_budget = distil.losses(drawn, None, batches, counted=True)
    assert sorted(per_budget) == ["full", "half"]
    for name, n in zip(drawn, tokens, strict=True):
        (sums,) = per_budget[name]
        assert sums.tokens.item() == n and sums.micro_batches.item() == 1.0
        assert sums.ce.item() > 0
    # The full budget distils from itself (the self teacher): zero KD; the half one does not.
    assert per_budget["full"][0].kd.abs().item() < 1e-4 < per_budget["half"][0].kd.item()
    counted_elsewhere = distil.losses(drawn, None, batches, counted=False)
    assert [s.micro_batches.item() for v in counted_elsewhere.values() for s in v] == [0.0, 0.0]
    distil.begin_step()  # the next step starts from no records
    assert distil.losses(drawn, None, batches, counted=True) == {}


def test_step_reduction_keeps_each_named_sum_in_its_place() -> None:
    def sums(kd, ce, tokens, count) -> LossSums:
        return LossSums(*(torch.tensor(float(v)) for v in (kd, ce, tokens, count)))

    per_budget = {"a": [sums(6, 9, 3, 1), sums(2, 3, 1, 1)], "b": [sums(1, 1, 1, 0)]}
    reduced = reduce_step_stats(
        ["a", "b", "c"], per_budget, {"nonfinite": 0.0, "preempt": 1.0}, True, "cpu", [5.0, 0.0]
    )
    a = reduced.losses["a"]
    assert (a.loss, a.ce, a.tokens, a.micro_batches) == (2.0, 3.0, 4.0, 2.0)
    assert sorted(reduced.losses) == ["a"]  # drawn for no micro-batch here: left out
    assert reduced.flags == {"nonfinite": 0.0, "preempt": 1.0}
    assert reduced.per_rank == [[5.0, 0.0]]
    quiet = reduce_step_stats(["a"], per_budget, {"nonfinite": 1.0}, False, "cpu")
    assert quiet.losses == {} and quiet.flags == {"nonfinite": 1.0}  # a rank that reports none
