"""Statistics of ``bench_family.py``'s report: tokens (and FLOPs) to match a loss level on a curve
of finished schedules, training FLOPs from the trainer's draw counts (the project's FLOP model,
``megatron_elastic/planning/flops.py``), and paired per-sequence differences with a bootstrap
confidence interval over the held-out sequences."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
from family_steps import STAGE1_BATCH, STAGE2_BATCH, TINY

MICRO = {"stage1": 4, "stage2": 2}
"""Micro-batch sizes of examples/tiny/stage{1,2}.yaml (the Minitron runs use stage 1's)."""
BOOTSTRAP = 2000
CONFIDENCE = 0.95


@functools.cache
def _model_elastic(ranking: tuple[int, ...]):
    import dataclasses

    from megatron_elastic.elastic.config import load_elastic_recipe

    model, elastic = load_elastic_recipe(TINY / "elastic.yaml")
    depths = tuple(range(6, model.num_layers + 1))
    return model, dataclasses.replace(elastic, layer_ranking=ranking, depth_choices=depths)


def parse_architecture(name: str) -> dict[str, int]:
    """``ElasticRouter.architecture_name``'s text (``hidden=192 depth=10 ...``) as choices."""
    return {k: int(v) for k, v in (part.split("=") for part in name.split())}


def _flops(sizes: dict[str, int], stage: str, ranking, draws: dict[Any, int]) -> float:
    """Model FLOPs (student 3x forward + the frozen teacher's forward, per micro-batch) of
    ``draws``: ``{choices-or-None: micro-batches}``."""
    from megatron_elastic.elastic.architectures import spec_from_choices
    from megatron_elastic.planning.flops import StepFlops

    model, elastic = _model_elastic(tuple(ranking))
    seq = sizes["seq_stage1" if stage == "stage1" else "seq_stage2"]
    counter = StepFlops(
        model, seq_length=seq, micro_batch_size=MICRO[stage], teacher=True, recompute=False
    )
    mix = {}
    for choices, count in draws.items():
        spec = None if choices is None else spec_from_choices(model, elastic, dict(choices))
        mix[spec] = mix.get(spec, 0) + count
    return counter.step(mix)[0]


def elastic_flops(save: Path, sizes: dict[str, int], stage: str, ranking) -> dict[str, Any]:
    """An elastic stage's micro-batches per budget and model FLOPs, from its ``metrics.jsonl``
    (``bench_family`` logs every step: each record carries that step's draws). A step logged
    twice (a stage resumed after its last checkpoint replays the same steps) counts once."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in (save / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if any(key.startswith("micro_batches/") for key in record):
            by_step[record["step"]] = record
    budgets: dict[str, int] = {}
    archs: dict[Any, int] = {}
    for record in by_step.values():
        for key, value in record.items():
            if key.startswith("micro_batches/"):
                budget = key.split("/", 1)[1]
                budgets[budget] = budgets.get(budget, 0) + int(value)
        for per_arch in record.get("architectures", {}).values():
            for name, count in per_arch.items():
                choices = tuple(sorted(parse_architecture(name).items()))
                archs[choices] = archs.get(choices, 0) + count
    return {
        "micro_batches": budgets,
        "flops": _flops(sizes, stage, ranking, archs),
        "micro_batch_size": MICRO[stage],
        "batch": STAGE1_BATCH if stage == "stage1" else STAGE2_BATCH,
    }


def minitron_flops_per_token(choices: dict[str, Any], sizes, ranking) -> float:
    """Model FLOPs per training token of a Minitron run at ``choices`` (stage 1's context), the
    frozen teacher's forward included."""
    key = tuple(sorted((k, v) for k, v in choices.items()))
    per_micro = _flops(sizes, "stage1", ranking, {key: 1})
    return per_micro / (MICRO["stage1"] * sizes["seq_stage1"])


def tokens_to_match(points: list[dict[str, Any]], target: float) -> tuple[float | None, str]:
    """Tokens at which a curve (points sorted by tokens) first reaches ``target`` (linear
    between points): (tokens, "") or (the first point's tokens, "<=") or (None, ">")."""
    prev = None
    for p in points:
        if p["loss_short"] <= target:
            if prev is None:
                return p["tokens"], "<="
            f = (prev["loss_short"] - target) / (prev["loss_short"] - p["loss_short"])
            return prev["tokens"] + f * (p["tokens"] - prev["tokens"]), ""
        prev = p
    return None, ">"


def paired_difference(
    a: dict[str, Any], b: dict[str, Any], *, seed: int = 0
) -> dict[str, float | list[float]]:
    """Validation loss of ``a`` minus ``b`` on the same held-out sequences (token-weighted means),
    with a percentile bootstrap interval over the sequences (``BOOTSTRAP`` resamples)."""
    sa, sb = np.asarray(a["seq_loss_sum"]), np.asarray(b["seq_loss_sum"])
    n = np.asarray(a["seq_tokens"])
    if not np.array_equal(n, np.asarray(b["seq_tokens"])):
        raise ValueError("paired difference of measurements on different sequences")
    point = float((sa.sum() - sb.sum()) / n.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), size=(BOOTSTRAP, len(n)))
    diffs = (sa[idx].sum(1) - sb[idx].sum(1)) / n[idx].sum(1)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return {"diff": point, "ci": [float(low), float(high)]}
