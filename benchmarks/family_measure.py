"""Measurements of ``bench_family.py``: every checkpoint it trained, evaluated in one process on
the same held-out batches (the report is ``family_report.py``).

Per (checkpoint, budget): parameters, the layers it keeps, validation loss at stage 1's context
(``short``, with every held-out sequence's loss sum and token count, for the bootstrap of
``family_stats.py``) and at twice stage 2's (``long``), and a long-context recall probe: the loss
on a span of held-out text at the end of a long sequence, when the sequence began with that same
span against when it began with another (nats per token: how much the model copies from far back).
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
        self.cross_check: dict[str, float] | None = None

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

    @torch.no_grad()
    def per_sequence(self, model) -> tuple[list[float], list[int]]:
        """Each short held-out sequence's summed next-token loss (loss-masked) and token count:
        their ratio of sums is ``validation_loss``'s mean."""
        sums, counts = [], []
        for batch in self.short:
            tokens, mask = batch["tokens"], batch["loss_mask"].double()
            per_token = model(tokens, position_ids_like(tokens), None, labels=batch["labels"])
            sums += (per_token.double() * mask).sum(dim=1).tolist()
            counts += [int(c) for c in mask.sum(dim=1).tolist()]
        return sums, counts

    def measure(self, model, *, curve_only: bool = False) -> dict[str, Any]:
        sums, counts = self.per_sequence(model)
        if self.cross_check is None:  # the first model: the per-sequence sums against the
            # project's validation_loss, once (report.json's ``cross_check``)
            self.cross_check = {
                "per_sequence": sum(sums) / sum(counts),
                "validation_loss": validation_loss(model, self.short).loss,
            }
        out: dict[str, Any] = {
            "loss_short": sum(sums) / sum(counts),
            "seq_loss_sum": sums,
            "seq_tokens": counts,
        }
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


def point(ev: Evaluator, pgs, path: Path, budget: str | None) -> dict[str, Any]:
    """One checkpoint's tokens and validation loss: an elastic (fixed router) checkpoint at
    ``budget``, or a plain pretraining one (``budget`` None)."""
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
    return {"tokens": tokens, "params": params, **ev.measure(model, curve_only=True)}


def curve(ev: Evaluator, pgs, save: str, budget: str | None) -> list[dict[str, Any]]:
    """Validation loss at every checkpoint of one run (mid-schedule points: the scratch arm)."""
    return [point(ev, pgs, path, budget) for path in _checkpoints(save)]


def _final(ev: Evaluator, pgs, save: str, budget: str) -> dict[str, Any]:
    return point(ev, pgs, _checkpoints(save)[-1], budget)


def minitron_rows(ev: Evaluator, pgs, record: dict[str, Any], budget: str) -> dict[str, Any]:
    """A size's Minitron arms: each trained search candidate's short run, and the final
    checkpoint of every horizon run (given architecture, and the search winner continued)."""
    out: dict[str, Any] = {"winner": record["winner"], "candidates": {}}
    for name, cand in record["candidates"].items():
        if "save" not in cand:
            out["candidates"][name] = dict(cand)
            continue
        row = _final(ev, pgs, cand["save"], budget)
        out["candidates"][name] = {**cand, **row}
    for arm in ("given", "continued"):
        out[arm] = {n: _final(ev, pgs, save, budget) for n, save in record[arm].items()}
    return out


def measure(runs: dict[str, Any], valid: Path, tokenizer: Path) -> dict[str, Any]:
    """Every arm's rows and every Minitron run's points (``report.json``'s ``results``) of the
    runs ``bench_family.py`` trained (its ``runs.json``)."""
    from family_stats import elastic_flops, minitron_flops_per_token

    pgs = init_process_groups(ParallelConfig())
    ev = Evaluator(valid, tokenizer, runs["sizes"])
    res: dict[str, Any] = {
        k: runs[k] for k in ("tokens", "seeds", "fix_seeds", "rankings", "horizons")
    }
    res["flops"] = {}
    ranking = runs["rankings"]["min_attention_layers 1"]
    for key, stages in runs["elastic"].items():
        for st, path in stages.items():
            res[f"{key}/{st}"] = elastic_rows(ev, pgs, path, BUDGETS)
            save = Path(path).parent
            res["flops"][f"{key}/{st}"] = elastic_flops(save, runs["sizes"], st, ranking)
    ablations = ("uniform", "fixed", "heterogeneous", "depth_floor", "depth_no_floor")
    for arm in (a for a in ablations if a in runs):
        res[arm] = elastic_rows(ev, pgs, runs[arm], BUDGETS)
    s0 = runs["elastic"]["elastic_s0"]["stage2"]
    res["baseline"] = elastic_rows(ev, pgs, runs["ranked"], BUDGETS, architectures_from=s0)
    res["untrained/router"] = elastic_rows(ev, pgs, s0, UNTRAINED)
    res["untrained/fixed"] = fixed_rows(ev, pgs, s0, UNTRAINED)
    res["minitron"] = {}
    for key, record in runs["minitron"].items():
        budget = key.split("/")[1]
        rows = minitron_rows(ev, pgs, record, budget)
        for cand in rows["candidates"].values():
            if "choices" in cand:
                cand["flops_per_token"] = minitron_flops_per_token(
                    cand["choices"], runs["sizes"], ranking
                )
        res["minitron"][key] = rows
    if "scratch" in runs:
        res["scratch"] = {b: curve(ev, pgs, save, None) for b, save in runs["scratch"].items()}
    res["cross_check"] = ev.cross_check
    return res
