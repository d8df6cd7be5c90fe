"""Measurements of ``bench_family.py``: every checkpoint it trained, evaluated in one process on
the same held-out batches (the report is ``family_report.py``).

Per (checkpoint, budget): parameters, the layers it keeps, validation loss at stage 1's context
(``short``) and at twice stage 2's (``long``), and a long-context recall probe: the loss on a span
of held-out text at the end of a long sequence, when the sequence began with that same span
against when it began with another (nats per token: how much the model copies from far back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_elastic.checkpoint import load_checkpoint, manifest_model, read_manifest
from megatron_elastic.config import LAYER_SYMBOLS, ParallelConfig
from megatron_elastic.data.tokenizers import load_tokenizer
from megatron_elastic.elastic.architectures import closest_homogeneous_spec
from megatron_elastic.elastic.budget import subnet_param_count
from megatron_elastic.eval.loading import open_checkpoint
from megatron_elastic.eval.loss import validation_batches, validation_loss
from megatron_elastic.model import build_hybrid_model, count_parameters
from megatron_elastic.parallel import init_process_groups
from megatron_elastic.training.lm_step import position_ids_like

UNTRAINED = (0.6, 0.85)
SMALLER = ("75%", "50%")
BUDGETS = ("full", "75%", "50%")
_SYMBOL = {kind: symbol for symbol, kind in LAYER_SYMBOLS.items()}


class Evaluator:
    """The held-out batches (built once) and the measurements on them."""

    def __init__(self, valid: Path, tokenizer: Path, sizes: dict[str, int]) -> None:
        tok = load_tokenizer(str(tokenizer))
        self.short = validation_batches(
            valid, tok, seq_length=sizes["seq_stage1"], micro_batch_size=8, max_samples=128
        )
        self.long = validation_batches(valid, tok, seq_length=sizes["seq_long"], micro_batch_size=4)
        tokens = torch.cat([b["tokens"] for b in self.long])[:16]
        self.span = s = max(8, sizes["seq_long"] // 32)
        # Probe: each sequence's first span copied over its last tokens. Control: the same, but
        # the first span is another sequence's, so the end span has not been seen before.
        self.probe = tokens.clone()
        self.probe[:, -s:] = tokens[:, :s]
        self.control = self.probe.clone()
        self.control[:, :s] = torch.roll(tokens[:, :s], 1, dims=0)

    @torch.no_grad()
    def recall(self, model) -> float:
        """Loss on the end span (after its first token) when it has not been seen, minus when
        it is a repeat of the sequence's first tokens: what the model copies from far back."""
        s = self.span

        def end_loss(tokens: torch.Tensor) -> torch.Tensor:
            labels = torch.roll(tokens, -1, dims=1)
            per_token = model(tokens, position_ids_like(tokens), None, labels=labels).double()
            return per_token[:, -s:-1].mean()  # predicts the end span's tokens 2..s

        return float(end_loss(self.control) - end_loss(self.probe))

    def measure(self, model, *, curve_only: bool = False) -> dict[str, float]:
        out = {"loss_short": validation_loss(model, self.short).loss}
        if not curve_only:
            out["loss_long"] = validation_loss(model, self.long).loss
            out["recall"] = self.recall(model)
        return out


def _pattern(model_config, spec) -> str:
    """The parent's layer pattern with each layer the budget drops shown as ``.``."""
    kinds = model_config.layer_kinds()
    if spec is None:
        return "".join(_SYMBOL[k] for k in kinds)
    return "".join(_SYMBOL[k] if c.active else "." for k, c in zip(kinds, spec.layers, strict=True))


def elastic_rows(ev: Evaluator, pgs, path: str, budgets, **kw) -> dict[str, dict[str, Any]]:
    """Every budget of an elastic checkpoint (or, with ``architectures_from``, a ranked one at an
    elastic checkpoint's architectures)."""
    ckpt = open_checkpoint(path, pgs, **kw)
    rows = {}
    for budget in budgets:
        ckpt.set_budget(budget)
        spec = ckpt.spec(budget)
        rows[str(budget)] = {
            "params": ckpt.params(budget),
            "pattern": _pattern(ckpt.model_config, spec),
            **ev.measure(ckpt.model),
        }
    return rows


def fixed_rows(ev: Evaluator, pgs, path: str, fractions) -> dict[str, dict[str, Any]]:
    """The elastic checkpoint's weights at a fixed full-depth width-only architecture of each
    fraction's parameter cost (what one would serve without a router)."""
    ckpt = open_checkpoint(path, pgs)
    rows = {}
    for fraction in fractions:
        spec = closest_homogeneous_spec(
            ckpt.model_config,
            ckpt.router.elastic_config,
            fraction,
            depth=ckpt.model_config.num_layers,
        )
        ckpt.model.set_subnet(spec, mode="slice")
        rows[str(fraction)] = {
            "params": subnet_param_count(ckpt.model_config, spec),
            "pattern": _pattern(ckpt.model_config, spec),
            **ev.measure(ckpt.model),
        }
    return rows


def _checkpoints(save: str) -> list[Path]:
    return sorted(p for p in Path(save).iterdir() if p.name.startswith("step_"))


def curve(ev: Evaluator, pgs, save: str, budget: str | None) -> list[dict[str, float]]:
    """Validation loss at every checkpoint of a run: a Minitron (elastic, fixed router) run at
    ``budget``, or a plain pretraining run (``budget`` None)."""
    points = []
    for path in _checkpoints(save):
        manifest = read_manifest(path)
        tokens = manifest["metadata"]["progress"]["tokens"]
        if budget is None:
            cfg = manifest_model(manifest)
            model = build_hybrid_model(cfg, pgs)
            load_checkpoint(path, model, cfg, kinds=("parent",))
            model.eval()
            params = count_parameters(cfg)
        else:
            ckpt = open_checkpoint(path, pgs)
            ckpt.set_budget(budget)
            model, params = ckpt.model, ckpt.params(budget)
        points.append({"tokens": tokens, "params": params, **ev.measure(model, curve_only=True)})
    return points


def measure(runs: dict[str, Any], valid: Path, tokenizer: Path) -> dict[str, Any]:
    """Every arm's rows and every curve run's points (``report.json``'s ``results``) of the runs
    ``bench_family.py`` trained (its ``runs.json``)."""
    pgs = init_process_groups(ParallelConfig())
    ev = Evaluator(valid, tokenizer, runs["sizes"])
    res: dict[str, Any] = {
        "tokens": runs["tokens"],
        "seeds": runs["seeds"],
        "rankings": runs["rankings"],
    }
    for seed in runs["seeds"]:
        for st in ("stage1", "stage2"):
            path = runs[f"elastic_s{seed}"][st]
            res[f"elastic_s{seed}/{st}"] = elastic_rows(ev, pgs, path, BUDGETS)
    for arm in ("uniform", "fixed", "heterogeneous", "depth_floor", "depth_no_floor"):
        res[arm] = elastic_rows(ev, pgs, runs[arm], BUDGETS)
    s0 = runs["elastic_s0"]["stage2"]
    res["baseline"] = elastic_rows(ev, pgs, runs["ranked"], BUDGETS, architectures_from=s0)
    res["untrained/router"] = elastic_rows(ev, pgs, s0, UNTRAINED)
    res["untrained/fixed"] = fixed_rows(ev, pgs, s0, UNTRAINED)
    res["minitron"] = {
        key: curve(ev, pgs, save, key.split("/")[1]) for key, save in runs["minitron"].items()
    }
    res["scratch"] = {b: curve(ev, pgs, save, None) for b, save in runs["scratch"].items()}
    return res
