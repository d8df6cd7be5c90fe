"""The Minitron-style arms of ``bench_family.py``: each smaller size pruned from the ranked parent
and distilled alone from the same frozen teacher (``router.fixed``), every run a finished
learning-rate schedule.

* **given** (the architecture handed over): the elastic run's router choice, distilled from the
  ranked parent in separate runs at several token horizons (``HORIZONS`` x the elastic run's
  tokens), each its own cosine schedule ending at its horizon, so every curve point is a
  finished schedule like the elastic child it is compared with.
* **search**: 3-4 candidate architectures at the size's parameter cost (:func:`candidates`),
  each distilled for a short fixed budget (``search_steps``); the lowest validation loss wins
  and is continued (from its short run's checkpoint) at the same horizons. The selection reads
  the trainer's own held-out split (``valid/<budget>`` in the short run's ``metrics.jsonl``),
  not the report's validation problems, so choosing does not bias the reported loss. Every
  candidate's tokens are charged to the arm.

Why separate runs and not WSD branches: a decay branch from a stable checkpoint needs the
trainer to resume a checkpoint's optimizer state under a new schedule horizon (it keeps the
saved one), and at these horizons (1/8 to 1 of the elastic run) the separate runs cost 1.9x the
longest where a WSD run with 20% decay branches would cost ~1.2x: about an eighth of the study's
time, for no trainer change.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from family_steps import STAGE1_BATCH, Steps, elastic_yaml

DEPTH_MIN = 6
"""The shallowest depth the depth-pruned candidate (and the depth ablation) may use (the tiny
parent has 10 layers, 2 of them attention)."""
CANDIDATES = ("router", "width", "depth", "mixed")
"""The search arm's candidates, in order (a later one equal to an earlier is not trained):
``router`` the elastic run's choice; ``width`` full depth, widths closest to the cost
(Minitron's recommended axis); ``depth`` ``DEPTH_MIN`` layers, widths filling the rest;
``mixed`` the homogeneous combination of every axis (depth 6-10) closest to the cost: the
cost-optimal point of the router's own search space, found without training, so the search
also tries depth and width cut together. (Keeping the embedding width, the obvious fourth,
cannot reach 50% here: the embedding and output layers are 43% of the tiny parent.)"""


def candidates(model, elastic, fraction: float, router_spec) -> dict[str, dict[str, Any]]:
    """Each candidate's choices (``axis -> size``) at ``fraction`` of the parent's parameters,
    in :data:`CANDIDATES` order; ``elastic`` must carry the layer ranking. A duplicate maps to
    ``{"same_as": name}``."""
    from megatron_elastic.elastic.architectures import choices_of, closest_homogeneous_spec

    deep = dataclasses.replace(elastic, depth_choices=tuple(range(DEPTH_MIN, model.num_layers + 1)))
    specs = {
        "router": router_spec,
        "width": closest_homogeneous_spec(model, deep, fraction, depth=model.num_layers),
        "depth": closest_homogeneous_spec(model, deep, fraction, depth=DEPTH_MIN),
        "mixed": closest_homogeneous_spec(model, deep, fraction),
    }
    out: dict[str, dict[str, Any]] = {}
    for name in CANDIDATES:
        choices = choices_of(model, deep, specs[name])
        earlier = [k for k, v in out.items() if v.get("choices") == choices]
        out[name] = {"same_as": earlier[0]} if earlier else {"choices": choices}
    return out


def minitron_steps(steps: Steps, tokens: float) -> int:
    """Steps of stage 1's batch at stage 1's context that hold ``tokens``."""
    return max(1, round(tokens / (STAGE1_BATCH * steps.plan.size["seq_stage1"])))


def distil(
    steps: Steps,
    name: str,
    title: str,
    budget: str,
    choices: dict[str, Any],
    *,
    init: Path,
    teacher: Path,
    n: int,
    seed: int,
) -> Path:
    """One Minitron-style run: ``budget`` at the architecture ``choices``, from ``init``,
    distilled from ``teacher`` for ``n`` steps (one cosine schedule, saved at its end)."""
    p = steps.plan
    depths = {"depth_choices": list(range(DEPTH_MIN, 11))}
    recipe = elastic_yaml(p, name.replace("/", "_"), budget_choices={budget: choices}, **depths)
    return steps.train(
        f"{title} ({n} steps)",
        name.replace("/", "_"),
        "stage1.yaml",
        f"elastic={recipe}",
        "router.fixed=true",
        f"budget_sampling={{'{budget}': 1.0}}",
        f"distill.teacher_checkpoint={teacher}",
        f"checkpoint.init={init}",
        f"checkpoint.save={p.out / name}",
        f"checkpoint.save_interval={n}",
        f"train.steps={n}",
        f"train.seq_length={p.size['seq_stage1']}",
        f"train.seed={1234 + seed}",
        f"optim.warmup_steps={min(10, n // 3)}",
        f"router.anneal_steps={n}",
    )


def selection_loss(save: Path, budget: str) -> float:
    """The trainer's last validation loss of ``budget`` in a run (its held-out split)."""
    value = None
    for line in (save / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        value = record.get(f"valid/{budget}", value)
    if value is None:
        raise ValueError(f"{save}/metrics.jsonl has no valid/{budget}: did the run validate?")
    return float(value)


def pick_winner(trained: dict[str, dict[str, Any]]) -> str:
    """The trained candidate with the lowest selection loss (the first of equals)."""
    return min(trained, key=lambda k: trained[k]["select_loss"])


def horizons(steps: Steps, elastic_tokens: int, fractions: tuple[float, ...]) -> list[int]:
    """The step counts of horizon runs at ``fractions`` of the elastic run's tokens, distinct
    and increasing."""
    return sorted({minitron_steps(steps, f * elastic_tokens) for f in fractions})


def given_arm(steps, seed, budget, choices, ranked, elastic_tokens) -> dict[str, str]:
    """The router's architecture distilled from the ranked parent at every horizon."""
    out = {}
    for n in horizons(steps, elastic_tokens, steps.plan.horizons):
        name = f"minitron/given_s{seed}_{budget.rstrip('%')}/h{n}"
        title = f"minitron given, seed {seed}, {budget}: router architecture, horizon {n}"
        out[str(n)] = str(
            distil(steps, name, title, budget, choices, init=ranked, teacher=ranked, n=n, seed=seed)
        )
    return out


def search_arm(steps, seed, budget, cands, ranked, elastic_tokens) -> dict[str, Any]:
    """Every distinct candidate distilled for ``search_steps``; the lowest selection loss
    continued from its short run at every horizon. Returns the arm's record for ``runs.json``."""
    n_short = steps.plan.size["search_steps"]
    tag = f"s{seed}_{budget.rstrip('%')}"
    record: dict[str, Any] = {"candidates": {}, "continued": {}}
    for name, cand in cands.items():
        if "same_as" in cand:
            record["candidates"][name] = dict(cand)
            continue
        title = f"minitron search, seed {seed}, {budget}: candidate {name}"
        save = distil(
            steps,
            f"minitron/search_{tag}/{name}",
            title,
            budget,
            cand["choices"],
            init=ranked,
            teacher=ranked,
            n=n_short,
            seed=seed,
        )
        record["candidates"][name] = {
            "choices": cand["choices"],
            "save": str(save),
            "steps": n_short,
            "select_loss": selection_loss(save, budget),
        }
    trained = {k: v for k, v in record["candidates"].items() if "save" in v}
    record["winner"] = winner = pick_winner(trained)
    win = trained[winner]
    start = Path(win["save"])
    for n in horizons(steps, elastic_tokens, steps.plan.continued):
        name = f"minitron/search_{tag}/continued_h{n}"
        title = f"minitron search, seed {seed}, {budget}: {winner} continued, horizon {n}"
        record["continued"][str(n)] = str(
            distil(
                steps,
                name,
                title,
                budget,
                win["choices"],
                init=start,
                teacher=ranked,
                n=n,
                seed=seed,
            )
        )
    return record
