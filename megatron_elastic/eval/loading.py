"""A checkpoint opened for evaluation: an elastic one (parent weights + trained router: every
budget served by one copy of the weights), an exported one (a plain model of one budget), or an
exported Hugging Face directory (see :mod:`.hf_model`).

    ckpt = open_checkpoint("runs/elastic", pgs)
    for name in ckpt.budgets():
        ckpt.set_budget(name)   # switches the sub-network; no weight is copied or reloaded
        ... ckpt.model(tokens, position_ids, None) ...

The baseline of the method: ``open_checkpoint("runs/ranked", pgs, architectures_from=
"runs/elastic")`` serves the ranked parent's weights (no elastic training) at the sub-network the
elastic checkpoint's trained router picks for each budget: the same architectures, parameter
counts and forward code as the elastic model, only the weights differ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn

from megatron_elastic.checkpoint import (
    load_checkpoint,
    load_extra,
    manifest_model,
    read_manifest,
)
from megatron_elastic.config import ModelConfig, ParallelConfig
from megatron_elastic.data.tokenizers import Tokenizer, load_tokenizer
from megatron_elastic.elastic.budget import subnet_param_count
from megatron_elastic.elastic.model import build_elastic_model
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.eval.hf_model import (
    HFEvalCheckpoint,
    is_hf_directory,
    open_hf_checkpoint,
    read_hf_directory,
)
from megatron_elastic.model import build_hybrid_model, count_parameters
from megatron_elastic.router import ElasticRouter, router_from_state

__all__ = [
    "BASELINE_KINDS",
    "KINDS",
    "EvalCheckpoint",
    "budget_params",
    "checkpoint_budgets",
    "open_checkpoint",
    "load_eval_tokenizer",
    "recorded_tokenizer",
]

KINDS = ("elastic", "exported")
"""Checkpoint kinds :func:`open_checkpoint` reads."""
BASELINE_KINDS = ("ranked", "parent")
"""Kinds whose weights ``architectures_from`` evaluates at an elastic checkpoint's sub-networks."""


class EvalCheckpoint:
    """A loaded checkpoint in eval mode whose budget can be switched.

    ``model`` is the elastic parent (``kind == "elastic"``) or the plain exported model; call it
    like any megatron language model. :meth:`set_budget` on an elastic checkpoint only changes
    which slices of the same parameters the next forward uses.
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        model: nn.Module,
        model_config: ModelConfig,
        router: ElasticRouter | None,
    ) -> None:
        self.path, self.manifest, self.model = path, manifest, model
        self.model_config, self.router = model_config, router
        self.kind: str = manifest["kind"]
        self.budget: str | float | None = None
        """The budget the model runs now (None before :meth:`set_budget`: the parent)."""
        self._specs: dict[str | float, SubnetSpec] = {}

    @property
    def metadata(self) -> dict[str, Any]:
        return self.manifest.get("metadata", {})

    def budgets(self) -> list[str]:
        """Trained budget names (recipe order) or, exported, the one budget it holds."""
        if self.router is not None:
            return list(self.router.elastic_config.budgets)
        return [str(self.metadata.get("budget", "exported"))]

    def _check(self, budget: str | float) -> None:
        if isinstance(budget, str) and budget not in self.budgets():
            where = "trained budgets" if self.router is not None else "this exported model holds"
            raise ValueError(f"unknown budget {budget!r}; {where}: {sorted(self.budgets())}")
        if self.router is None and not isinstance(budget, str):
            raise ValueError(
                f"an exported checkpoint runs only its own budget {self.budgets()}, not a "
                f"fraction ({budget}); open the elastic checkpoint to interpolate"
            )

    def spec(self, budget: str | float) -> SubnetSpec | None:
        """The sub-network the trained router picks for ``budget`` (its deterministic decision);
        None for an exported checkpoint. A float is a fraction between trained budgets
        (interpolation)."""
        self._check(budget)
        if self.router is None:
            return None
        if budget not in self._specs:
            self._specs[budget] = self.router.decide(budget, 0, None, deterministic=True).spec
        return self._specs[budget]

    def set_budget(self, budget: str | float) -> None:
        """Run ``budget`` from the next forward on (elastic: slices of the loaded weights)."""
        spec = self.spec(budget)
        if self.router is not None:
            self.model.set_subnet(spec, mode="slice")
        self.budget = budget

    def params(self, budget: str | float) -> int:
        """Parameters of the model that ``budget`` runs (the exported model's own count)."""
        spec = self.spec(budget)
        if spec is None:
            return int(self.metadata.get("params", count_parameters(self.model_config)))
        return subnet_param_count(self.model_config, spec)

    def tokenizer_path(self) -> str | None:
        """See :func:`recorded_tokenizer`."""
        return recorded_tokenizer(self.manifest)


def recorded_tokenizer(manifest: dict[str, Any]) -> str | None:
    """The tokenizer file recorded at training time: ``metadata["tokenizer"]``, or for an export
    its source checkpoint's (while that checkpoint is still there); None if neither names one."""
    metadata = manifest.get("metadata", {})
    if metadata.get("tokenizer"):
        return str(metadata["tokenizer"])
    source = metadata.get("source_checkpoint")
    if source and Path(source).is_dir():
        try:
            found = read_manifest(source).get("metadata", {}).get("tokenizer")
        except ValueError:
            return None
        return str(found) if found else None
    return None


def _read_evaluable(path: str | Path) -> dict[str, Any]:
    manifest = read_manifest(path)
    if manifest["kind"] not in KINDS:
        raise ValueError(
            f"checkpoint {str(path)!r} is of kind {manifest['kind']!r}; evaluation reads an "
            f"elastic checkpoint (with its router) or an exported budget: {KINDS}"
        )
    return manifest


def _architectures_router(
    path: str | Path, architectures_from: str | Path
) -> tuple[dict[str, Any], ModelConfig, ElasticRouter]:
    """The manifest and model config of ``path`` (a ranked or parent checkpoint) and the trained
    router of ``architectures_from`` (an elastic checkpoint of the same parent), checked before
    any weight is read."""
    if is_hf_directory(path) or is_hf_directory(architectures_from):
        raise ValueError(
            "--architectures-from reads megatron-elastic checkpoints: a ranked (or parent) "
            "checkpoint's weights at an elastic checkpoint's architectures, not HF directories"
        )
    manifest = read_manifest(path)
    if manifest["kind"] not in BASELINE_KINDS:
        raise ValueError(
            f"checkpoint {str(path)!r} is of kind {manifest['kind']!r}; --architectures-from "
            f"evaluates the weights of one of kinds {BASELINE_KINDS} (e.g. the ranked parent)"
        )
    source = read_manifest(architectures_from)
    if source["kind"] != "elastic":
        raise ValueError(
            f"--architectures-from {str(architectures_from)!r} is of kind {source['kind']!r}; "
            "pass an elastic checkpoint (its trained router picks the architectures)"
        )
    model_config, parent = manifest_model(manifest), manifest_model(source)
    if model_config != parent:
        diffs = [
            f"{name}: {value!r} vs {getattr(parent, name)!r}"
            for name, value in dataclasses.asdict(model_config).items()
            if value != getattr(parent, name)
        ]
        raise ValueError(
            f"checkpoint {str(path)!r} and --architectures-from {str(architectures_from)!r} have "
            f"different parents ({'; '.join(diffs)}); pass the ranked checkpoint the elastic "
            "one was trained from"
        )
    return manifest, model_config, router_from_state(model_config, load_extra(architectures_from))


def open_checkpoint(
    path: str | Path,
    pgs: ProcessGroupCollection,
    parallel: ParallelConfig | None = None,
    *,
    architectures_from: str | Path | None = None,
) -> EvalCheckpoint | HFEvalCheckpoint:
    """Load an ``elastic`` or ``exported`` checkpoint for evaluation, split as ``parallel``
    (default: unsplit; must match ``pgs``), or an HF directory (unsplit only). ``ValueError``
    for another kind, before any weight is read.

    ``architectures_from`` (an elastic checkpoint): ``path`` is a ranked or parent checkpoint of
    the same parent, loaded into the elastic model and run at the sub-networks that checkpoint's
    router picks (the baseline: pruning without elastic training)."""
    path = Path(path)
    if architectures_from is not None:
        manifest, model_config, router = _architectures_router(path, architectures_from)
        model = build_elastic_model(model_config, router.elastic_config, pgs, parallel)
        load_checkpoint(path, model, model_config, kinds=BASELINE_KINDS)
        model.eval()
        return EvalCheckpoint(path, manifest, model, model_config, router)
    if is_hf_directory(path):
        if parallel is not None and parallel != ParallelConfig():
            raise ValueError(f"a Hugging Face directory ({str(path)!r}) is evaluated unsplit")
        return open_hf_checkpoint(path)
    manifest = _read_evaluable(path)
    model_config = manifest_model(manifest)
    router = None
    if manifest["kind"] == "elastic":
        router = router_from_state(model_config, load_extra(path))
        model = build_elastic_model(model_config, router.elastic_config, pgs, parallel)
    else:
        model = build_hybrid_model(model_config, pgs, parallel)
    load_checkpoint(path, model, model_config, kinds=KINDS)
    model.eval()
    return EvalCheckpoint(path, manifest, model, model_config, router)


def checkpoint_budgets(
    path: str | Path, *, architectures_from: str | Path | None = None
) -> tuple[str, list[str]]:
    """(kind, budget names) of a checkpoint, read from its manifest and router without loading
    weights: tools check the budgets they are asked for before the slow part. An HF directory
    gives its kind (``hf``, ``hf-remote-code``) and its export manifest's budget. With
    ``architectures_from`` (see :func:`open_checkpoint`): ``path``'s kind and the elastic
    checkpoint's budgets."""
    if architectures_from is not None:
        manifest, _, router = _architectures_router(path, architectures_from)
        return manifest["kind"], list(router.elastic_config.budgets)
    if is_hf_directory(path):
        directory = read_hf_directory(path)
        return directory.kind, [directory.budget]
    manifest = _read_evaluable(path)
    kind = manifest["kind"]
    if kind == "exported":
        return kind, [str(manifest.get("metadata", {}).get("budget", "exported"))]
    router = router_from_state(manifest_model(manifest), load_extra(path))
    return kind, list(router.elastic_config.budgets)


def budget_params(path: str | Path, budgets: list[str | float]) -> dict[str | float, int]:
    """Parameters each budget of an elastic checkpoint runs, from its manifest and router alone
    (no weights loaded): tools compare budgets (a speculative draft must be smaller than its
    verifier) before the slow part."""
    manifest = _read_evaluable(path)
    model_config = manifest_model(manifest)
    router = router_from_state(model_config, load_extra(path))
    return {
        b: subnet_param_count(model_config, router.decide(b, 0, None, deterministic=True).spec)
        for b in budgets
    }


def load_eval_tokenizer(
    override: str | Path | None, manifest: dict[str, Any], model_config: ModelConfig
) -> Tokenizer:
    """``override`` (a ``--tokenizer`` flag) or the checkpoint's recorded tokenizer, checked to
    fit the model's vocabulary."""
    path = override or recorded_tokenizer(manifest)
    if not path:
        raise ValueError(
            "the checkpoint names no tokenizer (metadata 'tokenizer'); pass --tokenizer"
        )
    return load_tokenizer(path, model_vocab_size=model_config.vocab_size)
