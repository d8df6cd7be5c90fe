"""Report of ``bench_family.py``: its measurements (``family_measure.py``) as markdown tables,
plots, ``report.json`` and a one-line headline. The cost section compares tokens: for each
smaller size, the tokens a Minitron-style or a scratch run needs to reach the elastic child's
validation loss (linear between its checkpoints).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from family_measure import BUDGETS, SMALLER, UNTRAINED, measure


def tokens_to_match(points: list[dict[str, float]], target: float) -> tuple[float | None, str]:
    """Tokens at which the curve's validation loss first reaches ``target`` (linear between
    checkpoints): (tokens, "") or (the first checkpoint's tokens, "<=") or (None, ">")."""
    prev = None
    for p in points:
        if p["loss_short"] <= target:
            if prev is None:
                return p["tokens"], "<="
            f = (prev["loss_short"] - target) / (prev["loss_short"] - p["loss_short"])
            return prev["tokens"] + f * (p["tokens"] - prev["tokens"]), ""
        prev = p
    return None, ">"


def at_tokens(points: list[dict[str, float]], tokens: float) -> dict[str, float]:
    """The checkpoint closest to ``tokens``."""
    return min(points, key=lambda p: abs(p["tokens"] - tokens))


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _spread(values: list[float], digits: int = 4) -> str:
    """Mean, and the half-range of the seeds when there are several."""
    if len(values) == 1:
        return _fmt(values[0], digits)
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def _tok(x: float | None, how: str = "") -> str:
    return f"{how} {x / 1e3:,.0f}k".strip() if x is not None else how


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def cost_section(res: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    seeds, tokens = res["seeds"], res["tokens"]
    elastic_t = tokens["elastic"]
    share = elastic_t / len(SMALLER)
    summary: dict[str, Any] = {"minitron_ratio": {}, "scratch_ratio": None}
    rows = []
    family_match: dict[int, list[tuple[float | None, str]]] = {s: [] for s in seeds}
    scratch_match = []
    for budget in SMALLER:
        child = [res[f"elastic_s{s}/stage2"][budget]["loss_short"] for s in seeds]
        equal, match_txt = [], []
        for s in seeds:
            pts = res["minitron"][f"s{s}/{budget}"]
            equal.append(at_tokens(pts, share)["loss_short"])
            t, how = tokens_to_match(pts, child[seeds.index(s)])
            family_match[s].append((t if t is not None else pts[-1]["tokens"], how))
            match_txt.append(_tok(t if t is not None else pts[-1]["tokens"], how))
        spts = res["scratch"][budget]
        t, how = tokens_to_match(spts, statistics.fmean(child))
        scratch_match.append((t if t is not None else spts[-1]["tokens"], how))
        rows.append(
            [
                budget,
                f"{res['elastic_s0/stage2'][budget]['params']:,}",
                _spread(child),
                _spread(equal),
                " / ".join(match_txt),
                _fmt(spts[-1]["loss_short"]),
                _tok(*scratch_match[-1]),
            ]
        )
    lines = [
        "### Cost: one elastic run against compressing or pretraining each size",
        "",
        f"Elastic: one run of {_tok(elastic_t)} tokens (stage 1 {_tok(tokens['stage1'])} + "
        f"stage 2 {_tok(tokens['stage2'])}) trains every budget. Minitron-style: each smaller "
        f"size pruned from the same ranked parent and distilled alone from the same teacher; "
        f"'equal tokens' is its checkpoint nearest {_tok(share)} tokens (the elastic run's "
        f"tokens split over {len(SMALLER)} sizes). Scratch: the size's architecture pretrained "
        f"with the parent's recipe ({_tok(tokens['pretrain'])} tokens). Validation loss on "
        "held-out problems at stage 1's context; ± is half the range over seeds "
        f"{', '.join(map(str, seeds))} (scratch: seed 0's architecture, one seed).",
        "",
        *_table(
            [
                "budget",
                "params",
                "elastic child",
                "Minitron, equal tokens",
                "Minitron tokens to match (per seed)",
                "scratch, final",
                "scratch tokens to match",
            ],
            rows,
        ),
        "",
    ]
    for s in seeds:
        total = sum(t for t, _ in family_match[s])
        summary["minitron_ratio"][s] = (total / elastic_t, _bound(family_match[s]))
    total = sum(t for t, _ in scratch_match)
    summary["scratch_ratio"] = (total / elastic_t, _bound(scratch_match))
    ratios = ", ".join(
        f"seed {s}: {b} {r:.2f}x".replace("  ", " ")
        for s, (r, b) in summary["minitron_ratio"].items()
    )
    r, b = summary["scratch_ratio"]
    lines += [
        f"Tokens the family needs to match every elastic child, over the elastic run's: "
        f"Minitron-style {ratios} (paper: 7x vs Minitron-SSM); from scratch {b} {r:.2f}x "
        f"(paper: 360x vs pretraining; here the parent's own pretraining is only "
        f"{tokens['pretrain'] / elastic_t:.1f}x the elastic run). '>': a size never matched "
        "within its run (its whole run counted); '<=': it matched at its first checkpoint.",
        "",
    ]
    return lines, summary


def _bound(matches: list[tuple[float, str]]) -> str:
    """How a sum of tokens-to-match bounds the true sum: '>' if any size never matched, '<='
    if some matched at their first checkpoint, '' if exact."""
    marks = {how for _, how in matches}
    return ">" if ">" in marks else "<=" if "<=" in marks else ""


def arm_table(res, arms: list[tuple[str, str]], budgets=BUDGETS, *, recall=False) -> list[str]:
    header = ["budget", *[f"{label}" for _, label in arms]]
    rows = []
    for budget in budgets:
        cells = [budget]
        for key, _ in arms:
            r = res[key][budget]
            cell = f"{_fmt(r['loss_short'])} / {_fmt(r['loss_long'])}"
            if recall:
                cell += f" / {_fmt(r['recall'], 3)}"
            cells.append(cell)
        rows.append(cells)
    return _table(header, rows)


def report(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    seeds = res["seeds"]
    lines, summary = cost_section(res)
    lines += [
        "### Curriculum: stage 1 only vs stage 1 + stage 2",
        "",
        "Cells: validation loss at stage 1's context / at twice stage 2's (long), per seed.",
        "",
        *arm_table(
            res,
            [
                (f"elastic_s{s}/{st}", f"seed {s} {'stage 1 only' if st == 'stage1' else '1 + 2'}")
                for s in seeds
                for st in ("stage1", "stage2")
            ],
        ),
        "",
        "### Sampling in stage 2: weighted 0.5/0.3/0.2 vs uniform (seed 0)",
        "",
        *arm_table(res, [("elastic_s0/stage2", "weighted"), ("uniform", "uniform")]),
        "",
        "### Router: learned homogeneous vs fixed homogeneous vs learned heterogeneous (seed 0)",
        "",
        "Fixed: full depth, widths closest to the budget's parameters (no router). Cells: short "
        "/ long loss. Params and kept layers below.",
        "",
        *arm_table(
            res,
            [
                ("elastic_s0/stage2", "router (homogeneous)"),
                ("fixed", "fixed homogeneous"),
                ("heterogeneous", "router (heterogeneous)"),
                ("baseline", "no elastic training"),
            ],
        ),
        "",
        *_table(
            ["budget", "router params", "fixed params", "heterogeneous params"],
            [
                [b]
                + [
                    f"{res[k][b]['params']:,} `{res[k][b]['pattern']}`"
                    for k in ("elastic_s0/stage2", "fixed", "heterogeneous")
                ]
                for b in BUDGETS
            ],
        ),
        "",
        "### Untrained budgets (seed 0's elastic checkpoint, no training at these fractions)",
        "",
    ]
    rows = []
    s0 = res["elastic_s0/stage2"]
    for f in UNTRAINED:
        lower = max((b for b in BUDGETS if _frac(b) < f), key=_frac)
        upper = min((b for b in BUDGETS if _frac(b) > f), key=_frac)
        for label, r in (
            ("router interpolation", res["untrained/router"][str(f)]),
            ("fixed width-only, same cost", res["untrained/fixed"][str(f)]),
            (f"nearest trained below ({lower})", s0[lower]),
            (f"nearest trained above ({upper})", s0[upper]),
        ):
            rows.append(
                [str(f), label, f"{r['params']:,}", _fmt(r["loss_short"]), _fmt(r["loss_long"])]
            )
    lines += [
        *_table(["fraction", "architecture", "params", "short loss", "long loss"], rows),
        "",
        "### Depth: which layers each budget drops, and long-context recall",
        "",
        "Depth choices 6-10 of the 10 layers (the tiny recipe's 8-10 let the two rankings drop "
        "the same layers), trained with the default `min_attention_layers: 1` and with 0, each "
        "with its own ranking and seed 0. Layer ranking, most important first: "
        + "; ".join(f"{k}: {v}" for k, v in res.get("rankings", {}).items())
        + ". Pattern: `M` Mamba, `*` attention, `-` MLP, `.` dropped. Recall: how much lower "
        "the loss (nats/token) on a span at the end of a long sequence is when the sequence "
        "began with the same span than when it began with another; higher copies more from far "
        "back, 0 copies nothing.",
        "",
    ]
    rows = []
    for key, label in (
        ("depth_floor", "min_attention_layers 1"),
        ("depth_no_floor", "min_attention_layers 0"),
    ):
        for b in BUDGETS:
            r = res[key][b]
            rows.append(
                [
                    label,
                    b,
                    f"`{r['pattern']}`",
                    str(r["pattern"].count("*")),
                    f"{r['params']:,}",
                    _fmt(r["loss_short"]),
                    _fmt(r["loss_long"]),
                    _fmt(r["recall"], 3),
                ]
            )
    lines += _table(
        [
            "constraint",
            "budget",
            "layers",
            "attention",
            "params",
            "short loss",
            "long loss",
            "recall",
        ],
        rows,
    )
    return "\n".join(lines) + "\n", summary


def _frac(budget: str) -> float:
    return 1.0 if budget == "full" else float(budget.rstrip("%")) / 100


def plots(res: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, len(SMALLER), figsize=(11, 4), squeeze=False)
    for ax, budget in zip(axes[0], SMALLER, strict=True):
        for s in res["seeds"]:
            pts = res["minitron"][f"s{s}/{budget}"]
            ax.plot(
                [p["tokens"] / 1e3 for p in pts],
                [p["loss_short"] for p in pts],
                "o-",
                label=f"Minitron-style, seed {s}",
            )
            child = res[f"elastic_s{s}/stage2"][budget]["loss_short"]
            ax.axhline(child, ls="--", color=f"C{s}", label=f"elastic child, seed {s}")
        pts = res["scratch"][budget]
        ax.plot(
            [p["tokens"] / 1e3 for p in pts],
            [p["loss_short"] for p in pts],
            "s-",
            color="C3",
            label="from scratch",
        )
        ax.axvline(res["tokens"]["elastic"] / 1e3, color="gray", ls=":", label="elastic run")
        ax.set_title(f"{budget} budget")
        ax.set_xlabel("tokens (thousands)")
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.0))
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "family_cost.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    arms = [
        ("elastic_s0/stage1", "stage 1 only"),
        ("elastic_s0/stage2", "elastic (1 + 2)"),
        ("uniform", "uniform stage 2"),
        ("fixed", "fixed homogeneous"),
        ("heterogeneous", "heterogeneous"),
        ("depth_floor", "depth 6-10"),
        ("depth_no_floor", "depth 6-10, no attention floor"),
        ("baseline", "no elastic training"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(arms)
    for ax, metric, title in (
        (axes[0], "loss_short", "validation loss, stage 1 context"),
        (axes[1], "loss_long", "validation loss, long context"),
    ):
        for i, (key, label) in enumerate(arms):
            values = [res[key][b][metric] for b in BUDGETS]
            ax.bar([j + i * width for j in range(len(BUDGETS))], values, width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(BUDGETS))], list(BUDGETS))
        ax.set_title(title)
        top = max(res[k][b][metric] for k, _ in arms[:-1] for b in BUDGETS)
        ax.set_ylim(0, top * 1.25)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "family_arms.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def headline(summary: dict[str, Any]) -> str:
    """The cost result in one line (the benchmark's last line)."""
    minitron = ", ".join(
        f"{b} {r:.2f}x (seed {s})".strip() for s, (r, b) in summary["minitron_ratio"].items()
    )
    r, b = summary["scratch_ratio"]
    return (
        f"tokens to reach equal validation loss, family over elastic: Minitron-style {minitron}; "
        f"from scratch {b} {r:.2f}x (paper: 7x vs Minitron-SSM, 360x vs pretraining)"
    )


def measure_and_report(
    runs: dict[str, Any], out: Path, valid: Path, tokenizer: Path
) -> tuple[str, str]:
    """Measure, write ``report.md``/``report.json``/plots; returns the report and its headline."""
    res = measure(runs, valid, tokenizer)
    text, summary = report(res)
    figures = plots(res, out)
    (out / "report.json").write_text(
        json.dumps({"runs": runs, "results": res, "summary": summary}, indent=1, default=str)
    )
    (out / "report.md").write_text(text + "\n" + "\n".join(f"![]({p.name})" for p in figures))
    return text, headline(summary)
