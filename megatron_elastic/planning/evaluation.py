"""Per-GPU memory of an evaluation step: a forward of the full budget without autograd.

The trainer evaluates inside the training job (``Trainer.evaluate``: megatron's schedule with
``forward_only``), so the static memory is the training step's (weights, gradient buffer,
optimizer state, frozen teacher, router, from :func:`~.memory.plan_memory`). Without autograd
nothing is stored between layers: on top of the static memory live one layer's forward working
set and, on the last stage, the logits and megatron's vocab-parallel cross entropy.

The layer working set is counted as what that layer keeps for backward in training
(:func:`~.memory.layer_activation_terms` of the parent's full-size layer), an upper bound: under
``no_grad`` a layer frees its intermediates as it goes. Measured on CPU (fp32, one rank and one
thread, seq 1024 and 2048, ``tests/unit/test_plan_evaluation.py``): an attention layer 0.82-0.92
of its term, an MLP layer 0.67, a Mamba layer 0.51; the logits and cross entropy 1.00. The GPU
run of ``benchmarks/bench_gpu_step.py`` (case ``eval/full``) reports its measured peak against
this plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_elastic.planning.memory import (
    PROFILES,
    LayerShape,
    MemoryPlanConfig,
    _tokens,
    layer_activation_terms,
    plan_memory,
)

__all__ = ["EvaluationPlan", "evaluation_working_set", "plan_evaluation"]


@dataclass(frozen=True)
class EvaluationPlan:
    """Bytes on the busiest rank of the busiest pipeline stage of an evaluation step."""

    stage: int
    """The pipeline stage with the largest peak."""
    static: float
    """The training step's static memory on that stage (what stays resident while evaluating)."""
    working_set: dict[str, float]
    """What one forward adds on top, by tensor; the largest entry counts."""

    @property
    def peak(self) -> float:
        return self.static + max(self.working_set.values(), default=0.0)


def evaluation_working_set(cfg: MemoryPlanConfig, stage: int) -> dict[str, float]:
    """The forward working sets of ``stage`` (bytes): the largest full-size layer with its input
    and output, and on the last stage the logits with the cross entropy's temporaries."""
    m, p, prof = cfg.model, cfg.parallel, PROFILES[cfg.profile]
    a, tp = prof.act_bytes, p.tensor_parallel_size
    tokens, hidden_tokens = _tokens(cfg)
    start = sum(cfg.stages[:stage])
    mine = range(start, start + cfg.stages[stage])
    full = [LayerShape(k, w, d) for k, (w, d) in zip(m.layer_kinds(), m.layer_sizes(), strict=True)]
    sets = {}
    for j in mine:
        layer = full[j]
        terms = sum(layer_activation_terms(cfg, layer, m.hidden_size).values())
        key = f"{layer.kind} layer (forward) + its input and output"
        sets[key] = max(sets.get(key, 0.0), terms + 2 * hidden_tokens * m.hidden_size * a)
    if stage == p.pipeline_parallel_size - 1:
        # The (s, b, V/TP) logits in the model dtype; megatron's vocab-parallel cross entropy
        # upcasts them to fp32 (a copy unless they already are) and works in place on that copy.
        # The final norm's input and output stay alive beside them.
        logits = tokens * m.vocab_size / tp
        final = 2 * hidden_tokens * m.hidden_size * a
        sets["logits + cross entropy"] = logits * (a + (4 if a != 4 else 0)) + final
    return sets


def plan_evaluation(cfg: MemoryPlanConfig) -> EvaluationPlan:
    """The evaluation step's peak on the stage where it is largest (see the module docstring)."""
    train = plan_memory(cfg)
    plans = [
        EvaluationPlan(i, sum(s.static.values()), evaluation_working_set(cfg, i))
        for i, s in enumerate(train.stages)
    ]
    return max(plans, key=lambda plan: plan.peak)
