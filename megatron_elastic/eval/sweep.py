"""Sweep the budgets of one elastic checkpoint: what ``tools/sweep_budgets.py`` runs.

Every trained budget and a grid of interpolated fractions between the smallest and the largest
(untrained: the router interpolates its choices) are measured from one loaded checkpoint:

- parameters, total and active (what one token touches; equal without MoE layers);
- validation loss and task accuracy, by the code of ``tools/evaluate.py``
  (:func:`megatron_elastic.eval.run.evaluate_budget`);
- decode speed on this machine: cached decoding of one prompt at batch 1, timed over
  ``repeats`` rounds after one warm-up; the decode time is a run of ``new_tokens`` tokens minus
  a run of one token on the same prompt (so the prefill cancels), reported as the median with the
  lowest and highest rounds;
- memory, measured on the tensors the budget's serving network and decode state hold:
  ``weights_bytes`` (what decoding reads; the full budget's are the loaded parameters),
  ``copied_bytes`` (the part that is a copy rather than a view of the loaded parameters: what
  serving this budget beside the others adds), ``state_bytes`` (key/value caches and Mamba states
  for one sequence of ``prompt_tokens + new_tokens``), and the process's resident set size
  afterwards.

Writes ``sweep.json``, ``sweep.md`` (the table) and ``pareto.png``: accuracy (the validation loss
when no problems are asked for) against decode tokens/s and against active parameters, the Pareto
front joined by a line.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_elastic.eval.run import EvalInputsConfig

__all__ = ["SpeedConfig", "budget_grid", "decode_speed", "pareto_front", "serving_memory"]

_say = functools.partial(print, flush=True)


@dataclass(frozen=True)
class SpeedConfig:
    """How decode speed is timed."""

    prompt_tokens: int = 32
    """Length of the timed prompt (token ids of the first problem, repeated as needed)."""
    new_tokens: int = 64
    """Tokens decoded per timed round."""
    repeats: int = 5
    """Timed rounds (after one warm-up round)."""

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"--prompt-tokens must be >= 1, got {self.prompt_tokens}")
        if self.new_tokens < 2:
            raise ValueError(f"--new-tokens must be >= 2, got {self.new_tokens}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")


def budget_grid(fractions: Sequence[float], points: int) -> list[float]:
    """``points`` fractions evenly spaced strictly between the smallest and the largest of
    ``fractions`` (the trained budgets'), rounded to 3 decimals, none equal to a trained one."""
    if points < 0:
        raise ValueError(f"--interpolate must be >= 0 grid points, got {points}")
    lo, hi = min(fractions), max(fractions)
    grid = [round(lo + (hi - lo) * (i + 1) / (points + 1), 3) for i in range(points)]
    trained = {round(f, 3) for f in fractions}
    return [f for f in dict.fromkeys(grid) if f not in trained and lo < f < hi]


def decode_speed(net, prompt: Sequence[int], speed: SpeedConfig) -> dict[str, float]:
    """Decode tokens/s of ``net`` (a :class:`~megatron_elastic.serving.ServingNet`) on ``prompt``
    at batch 1: median, lowest and highest of ``speed.repeats`` rounds (see the module doc)."""
    from megatron_elastic.serving import cached_generate

    def seconds(n: int) -> float:
        start = time.perf_counter()
        cached_generate(net, [list(prompt)], max_new_tokens=n)
        return time.perf_counter() - start

    seconds(speed.new_tokens)  # warm-up
    rates = []
    for _ in range(speed.repeats):
        one = seconds(1)
        many = seconds(speed.new_tokens)
        rates.append((speed.new_tokens - 1) / max(many - one, 1e-9))
    return {
        "decode_tok_s": statistics.median(rates),
        "decode_tok_s_min": min(rates),
        "decode_tok_s_max": max(rates),
    }


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def serving_memory(net, parent: torch.nn.Module, capacity: int) -> dict[str, int]:
    """Bytes of the tensors ``net`` decodes with and of its decode state for one sequence of
    ``capacity`` tokens (see the module doc); ``parent`` holds the loaded parameters."""
    from megatron_elastic.serving.state import AttentionCache, InferenceState

    loaded = {p.untyped_storage().data_ptr() for p in parent.parameters()}
    tensors = [net.embedding, net.final_norm, net.output]
    tensors += [t for layer in net.layers for t in layer.weights.values()]
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    weights = copied = 0
    for t in tensors:  # the embedding and output layer may be one tied tensor
        key = (t.data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        weights += _bytes(t)
        if t.untyped_storage().data_ptr() not in loaded:
            copied += _bytes(t)
    state = InferenceState(net, 1, capacity)
    state_bytes = 0
    for cache in state.layers.values():
        parts = (
            (cache.key, cache.value)
            if isinstance(cache, AttentionCache)
            else (cache.conv, cache.ssm)
        )
        state_bytes += sum(_bytes(p) for p in parts)
    return {"weights_bytes": weights, "copied_bytes": copied, "state_bytes": state_bytes}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which of ``points`` (x, y), both to maximise, no other point beats in both."""
    return [
        not any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        for i, (x, y) in enumerate(points)
    ]


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _speed_prompt(inputs, vocab_size: int, length: int) -> list[int]:
    if inputs.problems and inputs.tokenizer is not None:
        from megatron_elastic.data.reasoning import render_prompt

        ids = list(inputs.tokenizer.encode(render_prompt(inputs.problems[0])))
    else:  # no problems asked for: a fixed token sequence (speed does not depend on the ids)
        ids = list(range(1, min(vocab_size, 97)))
    return (ids * (length // max(len(ids), 1) + 1))[:length]


def sweep_budgets(
    checkpoint: str,
    *,
    interpolate: int = 4,
    inputs: EvalInputsConfig | None = None,
    speed: SpeedConfig | None = None,
    output: str = "runs/sweep",
    progress: bool = True,
    log: Callable[[str], None] = _say,
) -> list[dict[str, Any]]:
    """Measure every trained budget of the elastic ``checkpoint`` and ``interpolate`` grid
    fractions between them (see the module doc); writes the table, JSON and plot under
    ``output`` and returns the rows. ``ValueError`` before any weight is read for a checkpoint
    that is not elastic, a missing tokenizer or dataset, or bad speed settings."""
    from tqdm import tqdm

    from megatron_elastic.checkpoint import manifest_model, read_manifest
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.elastic.budget import subnet_active_param_count
    from megatron_elastic.eval import open_checkpoint
    from megatron_elastic.eval.loading import checkpoint_budgets
    from megatron_elastic.eval.run import evaluate_budget, prepare_inputs
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups
    from megatron_elastic.serving import ServingSession

    inputs, speed = inputs or EvalInputsConfig(), speed or SpeedConfig()
    if not inputs.data and inputs.num_problems <= 0:
        raise ValueError("give --data (validation loss) or --num-problems > 0 (accuracy) to rank")
    kind, trained = checkpoint_budgets(checkpoint)
    if kind != "elastic":
        raise ValueError(
            f"{checkpoint!r} is an {kind} checkpoint; sweep_budgets.py measures the budgets of an "
            "elastic checkpoint (evaluate an exported one with tools/evaluate.py)"
        )
    model_cfg = manifest_model(read_manifest(checkpoint))
    capacity = speed.prompt_tokens + speed.new_tokens
    if capacity > model_cfg.max_sequence_length:
        raise ValueError(
            f"--prompt-tokens + --new-tokens = {capacity} exceeds the model's "
            f"max_sequence_length {model_cfg.max_sequence_length}"
        )
    # before any process group exists: bad input fails here and leaves nothing behind
    prepared = prepare_inputs(checkpoint, inputs)
    pgs = init_process_groups(ParallelConfig())
    try:
        ckpt = open_checkpoint(checkpoint, pgs)
        fractions = ckpt.router.elastic_config.budgets
        grid = budget_grid(list(fractions.values()), interpolate)
        budgets = sorted([*trained, *grid], key=lambda b: -(fractions[b] if b in trained else b))
        prompt = _speed_prompt(prepared, model_cfg.vocab_size, speed.prompt_tokens)
        session = ServingSession(ckpt, keep=1)
        rows = []
        for budget in tqdm(budgets, desc="budgets", unit="budget", disable=not progress):
            row = evaluate_budget(ckpt, budget, prepared)
            row["trained"] = isinstance(budget, str)
            row["fraction"] = fractions[budget] if isinstance(budget, str) else budget
            row["active_params"] = subnet_active_param_count(model_cfg, ckpt.spec(budget))
            net = session.net(budget)
            row.update(decode_speed(net, prompt, speed))
            row.update(serving_memory(net, ckpt.model, capacity))
            row["rss_bytes"] = _rss_bytes()
            rows.append(row)
    finally:
        destroy_process_groups()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    table = format_sweep(rows)
    (out / "sweep.md").write_text(table + "\n")
    settings = {"checkpoint": str(Path(checkpoint).resolve()), "speed": speed.__dict__}
    (out / "sweep.json").write_text(json.dumps({**settings, "results": rows}, indent=2) + "\n")
    plot_sweep(rows, out / "pareto.png")
    log(table)
    log(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'} and {out / 'pareto.png'}")
    return rows


def _quality(row: dict[str, Any]) -> tuple[str, float]:
    if row.get("accuracy") is not None:
        return "accuracy", row["accuracy"]
    return "validation loss", row["val_loss"]


def format_sweep(rows: list[dict[str, Any]]) -> str:
    """The sweep as a Markdown table, one row per budget (interpolated ones marked ``*``)."""
    head = (
        "| budget | params | active | val loss | accuracy | decode tok/s (min-max) "
        "| weights MB | copied MB | state MB | RSS MB |"
    )
    lines = [head, "|" + "---|" * 10]
    mb = 1 / 2**20

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        name = str(r["budget"]) + ("" if r["trained"] else "*")
        lines.append(
            f"| {name} | {r['params']:,} | {r['active_params']:,} | {fmt(r['val_loss'], '.4f')} "
            f"| {fmt(r['accuracy'], '.3f')} | {r['decode_tok_s']:.1f} "
            f"({r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f}) "
            f"| {r['weights_bytes'] * mb:.2f} | {r['copied_bytes'] * mb:.2f} "
            f"| {r['state_bytes'] * mb:.3f} | {r['rss_bytes'] * mb:.0f} |"
        )
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels: quality against decode tokens/s and against active parameters; trained
    budgets filled, interpolated hollow, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, _ = _quality(rows[0])
    sign = 1.0 if label == "accuracy" else -1.0  # a lower loss is better
    quality = [sign * _quality(r)[1] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (
        ("decode tokens/s (batch 1, this machine)", [r["decode_tok_s"] for r in rows], 1.0),
        ("active parameters", [r["active_params"] for r in rows], -1.0),
    )
    for ax, (xlabel, xs, xsign) in zip(axes, panels, strict=True):
        front = pareto_front([(xsign * x, q) for x, q in zip(xs, quality, strict=True)])
        for r, x, q in zip(rows, xs, quality, strict=True):
            ax.scatter(
                x,
                sign * q,
                marker="o",
                facecolors="C0" if r["trained"] else "none",
                edgecolors="C0",
            )
            ax.annotate(
                str(r["budget"]),
                (x, sign * q),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        pts = sorted((x, sign * q) for x, q, f in zip(xs, quality, front, strict=True) if f)
        xy = ([p[0] for p in pts], [p[1] for p in pts])
        ax.plot(*xy, color="C1", marker="x", label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("budgets of one elastic checkpoint (hollow: interpolated, untrained)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
