"""Report of ``bench_family.py``: its measurements (``family_measure.py``) as markdown tables,
plots, ``report.json`` and a one-line headline. The cost sections compare one elastic run with
Minitron-style compression of each smaller size, given the architecture and with a search:
tokens (and model FLOPs, the frozen teacher's forward counted for both) each needs to reach
the elastic children's validation loss at two levels (the end of stage 1 and of stage 2, both
finished schedules), read on curves whose points are finished schedules too; and per-seed
paired loss differences at equal tokens with bootstrap intervals (``family_stats.py``). The
other arms' tables are ``family_report_arms.py``'s.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from family_measure import SMALLER, measure
from family_report_arms import _fmt, _table, arm_sections, arms_plot
from family_stats import paired_difference, tokens_to_match

LEVELS = ("stage1", "stage2")
"""The elastic run's points the Minitron arms must match: its children after stage 1 (its
tokens so far) and after stage 2 (the whole run)."""


def _tok(x: float | None, how: str = "") -> str:
    return f"{how} {x / 1e3:,.0f}k".strip() if x is not None else how


def _mean_sd(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def curves(row: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """A size's two Minitron curves, points sorted by tokens charged to the arm: ``given`` (each
    horizon run's final loss at its tokens) and ``search`` (the winner's short run at every
    candidate's tokens together, then each continuation at those plus its own)."""
    search_tokens = sum(c["tokens"] for c in row["candidates"].values() if "tokens" in c)
    winner = row["candidates"][row["winner"]]
    given = sorted(row["given"].values(), key=lambda p: p["tokens"])
    search = [{**winner, "tokens": search_tokens}] + [
        {**p, "tokens": search_tokens + p["tokens"]}
        for p in sorted(row["continued"].values(), key=lambda p: p["tokens"])
    ]
    return {"given": given, "search": search}


def _flops_at(row: dict[str, Any], arm: str, tokens: float) -> float:
    """Model FLOPs of an arm's ``tokens``: the search arm's candidates at their own cost, the
    rest at the winner's (given: the router's architecture)."""
    cands = row["candidates"]
    if arm == "given":
        router = cands["router"]
        return tokens * cands.get(router.get("same_as"), router)["flops_per_token"]
    trained = {k: c for k, c in cands.items() if "tokens" in c}
    spent = sum(c["tokens"] * c["flops_per_token"] for c in trained.values())
    search_tokens = sum(c["tokens"] for c in trained.values())
    return spent + (tokens - search_tokens) * trained[row["winner"]]["flops_per_token"]


def ratios(res: dict[str, Any], seed: int, level: str) -> dict[str, Any]:
    """Family over elastic at one level for one seed: tokens and FLOPs of each arm, summed over
    the smaller sizes, over the elastic run's up to that level; ``bound``: '>' when a size never
    matched (its whole curve counted), '<=' when one matched at its first point."""
    stages = LEVELS[: LEVELS.index(level) + 1]
    tokens = sum(res["tokens"][st] for st in stages)
    flops = sum(res["flops"][f"elastic_s{seed}/{st}"]["flops"] for st in stages)
    out: dict[str, Any] = {"elastic_tokens": tokens, "elastic_flops": flops}
    for arm in ("given", "search"):
        total_t = total_f = 0.0
        marks = set()
        sizes = {}
        for budget in SMALLER:
            row = res["minitron"][f"s{seed}/{budget}"]
            points = curves(row)[arm]
            target = res[f"elastic_s{seed}/{level}"][budget]["loss_short"]
            t, how = tokens_to_match(points, target)
            t = points[-1]["tokens"] if t is None else t
            marks.add(how)
            total_t += t
            total_f += _flops_at(row, arm, t)
            sizes[budget] = {"tokens": t, "how": how, "first": points[0]["tokens"]}
        bound = ">" if ">" in marks else "<=" if "<=" in marks else ""
        out[arm] = {
            "tokens": total_t / tokens,
            "flops": total_f / flops,
            "bound": bound,
            "sizes": sizes,
        }
    return out


def cost_section(res: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    seeds, tokens = res["seeds"], res["tokens"]
    summary: dict[str, Any] = {"levels": {}}
    lines = [
        "### Cost: one elastic run against Minitron-style compression of each smaller size",
        "",
        f"Elastic: one run of {_tok(tokens['elastic'])} tokens (stage 1 "
        f"{_tok(tokens['stage1'])} + stage 2 {_tok(tokens['stage2'])}) trains every budget. "
        "Minitron-style: each smaller size pruned from the same ranked parent and distilled "
        "alone from the same teacher, in separate runs at "
        + ", ".join(f"{h:g}" for h in res["horizons"])
        + " x the elastic run's tokens, each a finished cosine schedule. *Given*: the seed's "
        "router architecture. *Search*: every candidate distilled for "
        f"{_tok(tokens['search_candidate'])} tokens, the best (trainer's held-out split) "
        "continued; all candidates' tokens charged. Ratios: the family's tokens (model FLOPs, "
        "student 3x forward + teacher forward per micro-batch, `planning/flops.py`) to reach "
        "each child's validation loss, summed over the sizes, over the elastic run's up to "
        "that point. '>': a size never matched (its longest run counted); '<=': matched at its "
        "first point. Mean ± sd over seeds.",
        "",
    ]
    rows = []
    for level in LEVELS:
        per = [ratios(res, s, level) for s in seeds]
        summary["levels"][level] = {str(s): r for s, r in zip(seeds, per, strict=True)}
        for arm in ("given", "search"):
            bound = {r[arm]["bound"] for r in per}
            mark = ">" if ">" in bound else "<=" if "<=" in bound else ""
            rows.append(
                [
                    "end of stage 1" if level == "stage1" else "end of stage 2",
                    "architecture given" if arm == "given" else "with search",
                    f"{mark} {_mean_sd([r[arm]['tokens'] for r in per])}".strip(),
                    f"{mark} {_mean_sd([r[arm]['flops'] for r in per])}".strip(),
                    " / ".join(f"{r[arm]['bound']}{r[arm]['tokens']:.2f}" for r in per),
                ]
            )
    lines += _table(
        ["elastic level", "Minitron", "tokens ratio", "FLOPs ratio", "tokens ratio per seed"],
        rows,
    )
    summary["paired"] = paired_differences(res)
    lines += ["", *search_table(res), "", *paired_table(res, summary["paired"])]
    return lines, summary


def search_table(res: dict[str, Any]) -> list[str]:
    """Each seed's and size's candidates: architecture, short-run losses, the winner."""
    rows = []
    for key, row in res["minitron"].items():
        for name, c in row["candidates"].items():
            if "same_as" in c:
                rows.append([key, name, f"= {c['same_as']}", "", "", "", ""])
                continue
            arch = " ".join(f"{a}={v}" for a, v in c["choices"].items() if v)
            rows.append(
                [
                    key,
                    name + (" **(winner)**" if name == row["winner"] else ""),
                    f"`{arch}`",
                    f"{c['params']:,}",
                    _fmt(c["select_loss"]),
                    _fmt(c["loss_short"]),
                    _tok(c["tokens"]),
                ]
            )
    head = ["seed/size", "candidate", "architecture", "params", "selection loss", "valid loss"]
    return [
        "#### Minitron search: the candidates (selection loss: the trainer's held-out split; "
        "valid loss: the report's problems)",
        "",
        *_table([*head, "tokens"], rows),
    ]


def equal_tokens(row: dict[str, Any], tokens: float) -> dict[str, Any]:
    """The given-architecture horizon run whose tokens are nearest ``tokens``."""
    return min(row["given"].values(), key=lambda p: abs(p["tokens"] - tokens))


def paired_differences(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per seed and size: the elastic child's loss minus Minitron's (architecture given) at
    equal tokens (the elastic run's tokens split over the sizes), on the same sequences."""
    share = res["tokens"]["elastic"] / len(SMALLER)
    out = {}
    for seed in res["seeds"]:
        for budget in SMALLER:
            child = res[f"elastic_s{seed}/stage2"][budget]
            other = equal_tokens(res["minitron"][f"s{seed}/{budget}"], share)
            out[f"s{seed}/{budget}"] = {
                "elastic": child["loss_short"],
                "minitron": other["loss_short"],
                "minitron_tokens": other["tokens"],
                **paired_difference(child, other, seed=seed),
            }
    return out


def paired_table(res: dict[str, Any], paired: dict[str, dict[str, Any]]) -> list[str]:
    rows = [
        [
            *key.split("/"),
            _fmt(d["elastic"]),
            f"{_fmt(d['minitron'])} ({_tok(d['minitron_tokens'])})",
            f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]",
        ]
        for key, d in paired.items()
    ]
    share = res["tokens"]["elastic"] / len(SMALLER)
    return [
        f"#### Equal tokens: elastic child minus Minitron given the architecture ({_tok(share)} "
        "tokens each size), per seed; [95% bootstrap interval over the held-out sequences]; "
        "negative: the elastic child is better",
        "",
        *_table(["seed", "budget", "elastic child", "Minitron", "difference"], rows),
    ]


def cost_plot(res: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SMALLER), figsize=(11, 4), squeeze=False)
    for ax, budget in zip(axes[0], SMALLER, strict=True):
        for s in res["seeds"]:
            c = curves(res["minitron"][f"s{s}/{budget}"])
            for arm, style in (("given", "o-"), ("search", "^--")):
                ax.plot(
                    [p["tokens"] / 1e3 for p in c[arm]],
                    [p["loss_short"] for p in c[arm]],
                    style,
                    color=f"C{s}",
                    label=f"Minitron {arm}, seed {s}",
                )
            child = res[f"elastic_s{s}/stage2"][budget]["loss_short"]
            ax.axhline(child, ls=":", color=f"C{s}", label=f"elastic child, seed {s}")
        for p in res.get("scratch", {}).get(budget, [])[-1:]:
            ax.axhline(p["loss_short"], color="C7", ls="-.", label="from scratch, final")
        ax.axvline(res["tokens"]["elastic"] / 1e3, color="gray", ls=":", label="elastic run")
        ax.set_title(f"{budget} budget")
        ax.set_xlabel("tokens charged (thousands)")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "family_cost.png", dpi=110)
    plt.close(fig)
    return out / "family_cost.png"


def headline(summary: dict[str, Any]) -> str:
    """The cost result in one line (the benchmark's last line)."""
    parts = []
    for arm, label in (("given", "architecture given"), ("search", "with search")):
        per = summary["levels"]["stage2"].values()
        tokens = [r[arm]["tokens"] for r in per]
        flops = [r[arm]["flops"] for r in per]
        bound = ">" if any(r[arm]["bound"] == ">" for r in per) else ""
        parts.append(
            f"{label} {bound}{statistics.fmean(tokens):.2f}x tokens "
            f"({statistics.fmean(flops):.2f}x FLOPs)"
        )
    return (
        "tokens to reach equal validation loss, family over elastic (mean of "
        f"seeds {', '.join(summary['levels']['stage2'])}): Minitron-style "
        + "; ".join(parts)
        + " (paper: 7x vs Minitron-SSM)"
    )


def report(res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    lines, summary = cost_section(res)
    lines += ["", *arm_sections(res)]
    return "\n".join(lines) + "\n", summary


def measure_and_report(
    runs: dict[str, Any], out: Path, valid: Path, tokenizer: Path
) -> tuple[str, str]:
    """Measure, write ``report.md``/``report.json``/plots; returns the report and its headline."""
    res = measure(runs, valid, tokenizer)
    text, summary = report(res)
    figures = [cost_plot(res, out), arms_plot(res, out)]
    (out / "report.json").write_text(
        json.dumps({"runs": runs, "results": res, "summary": summary}, indent=1, default=str)
    )
    (out / "report.md").write_text(text + "\n" + "\n".join(f"![]({p.name})" for p in figures))
    assert all(math.isfinite(r["given"]["tokens"]) for r in summary["levels"]["stage2"].values())
    return text, headline(summary)
