"""Report of ``bench_family.py``, the arms beside the cost question: the curriculum, the
sampling fixes of issue 27 (``fixes``, ``sandwich``) and, with ``--ablations``, uniform stage-2
sampling, the fixed and heterogeneous routers, untrained budgets and depth (tables and
``family_arms.png``)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from family_measure import BUDGETS, UNTRAINED


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


def _frac(budget: str) -> float:
    return 1.0 if budget == "full" else float(budget.rstrip("%")) / 100


def arm_sections(res: dict[str, Any]) -> list[str]:
    """The curriculum table, the training options, then the ablations when they ran."""
    seeds = res["seeds"]
    lines = [
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
        *fixes_section(res),
    ]
    if "uniform" not in res:
        return lines
    lines += [
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
    return lines


def fixes_section(res: dict[str, Any]) -> list[str]:
    """Issue 27's training options against the paper's sampling, seed by seed: each budget's
    loss difference on the same held-out sequences, with its bootstrap interval."""
    from family_stats import paired_difference

    lines = [
        "### Training options: the paper's sampling vs issue 27's fixes and sandwich",
        "",
        "`fixes`: `router.full_budget: parent` + `train.budget_sampling_mode: stratified`; "
        "`sandwich`: `train.budget_sampling_mode: sandwich`; `paper`: `router` + `independent`. "
        "Same seeds, data order and router seed as the paper's arm. Cells: validation loss "
        "(stage 1 context) of the option minus the paper's, [95% bootstrap interval over the "
        "held-out sequences]; negative: the option is better.",
        "",
    ]
    rows = []
    for arm in ("fixes", "sandwich"):
        for seed in res["fix_seeds"]:
            cells = [arm, str(seed)]
            for b in BUDGETS:
                option = res[f"{arm}_s{seed}/stage2"][b]
                paper = res[f"elastic_s{seed}/stage2"][b]
                d = paired_difference(option, paper, seed=seed)
                cells.append(f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]")
            rows.append(cells)
    return lines + _table(["option", "seed", *BUDGETS], rows) + [""]


def arms_plot(res: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [
        ("elastic_s0/stage1", "stage 1 only"),
        ("elastic_s0/stage2", "elastic (1 + 2)"),
        ("fixes_s0/stage2", "fixes (parent, stratified)"),
        ("sandwich_s0/stage2", "sandwich"),
        ("uniform", "uniform stage 2"),
        ("fixed", "fixed homogeneous"),
        ("heterogeneous", "heterogeneous"),
        ("depth_floor", "depth 6-10"),
        ("depth_no_floor", "depth 6-10, no attention floor"),
    ]
    arms = [a for a in arms if a[0] in res] + [("baseline", "no elastic training")]
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
    fig.savefig(out / "family_arms.png", dpi=110)
    plt.close(fig)
    return out / "family_arms.png"
