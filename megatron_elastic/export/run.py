"""Export trained budgets of an elastic checkpoint as standalone models (zero-shot: no training):
what ``tools/export_budget.py`` runs.

The trained router picks each budget's architecture (argmax, no noise, calibrated to within
``router.target_tolerance`` of the target) and the weights are physically sliced, then written
by the format's :class:`~megatron_elastic.export.registry.Exporter`. Everything that would stop
an export (an unknown or untrained budget, the format's limits, an output directory that is not
empty, a damaged tokenizer) is refused for every budget before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_elastic.export.registry import Budget, ExportOptions, get_exporter

__all__ = ["export_budgets"]


def _tokenizer(
    override: str | None, manifest: dict[str, Any], log: Callable[[str], None]
) -> Path | None:
    """``override``, else the checkpoint's recorded tokenizer when it still exists; read once
    here, so that a damaged one is refused before any export is written."""
    from megatron_elastic.data.tokenizers import load_tokenizer

    path = None
    if override is not None:
        if not Path(override).exists():
            raise ValueError(f"--tokenizer {override!r} does not exist")
        path = Path(override)
    recorded = manifest.get("metadata", {}).get("tokenizer")
    if path is None and recorded and Path(recorded).exists():
        path = Path(recorded)
    if path is not None:
        load_tokenizer(path, model_vocab_size=manifest["model"]["vocab_size"])
        return path
    if recorded:
        log(f"note: the checkpoint's tokenizer {recorded!r} no longer exists")
    log("note: no tokenizer (pass --tokenizer PATH): exporting weights only")
    return None


def _check_empty(targets: list[Path]) -> None:
    for target in targets:
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ValueError(
                f"{str(target)!r} exists and is not empty; pass --force to replace it "
                "(nothing was written)"
            )


def export_budgets(
    checkpoint: str | Path,
    output: str | Path,
    *,
    budget: str | None = None,
    format: str = "megatron",
    tokenizer: str | None = None,
    force: bool = False,
    interpolate: bool = False,
    gguf_type: str = ExportOptions.gguf_type,
    log: Callable[[str], None] = print,
) -> dict[Budget, Path]:
    """Export ``budget`` (a trained name, or with ``interpolate`` a fraction between trained
    budgets) of the elastic ``checkpoint`` to ``output`` in ``format``; ``budget=None`` exports
    every trained budget, each to ``output/<name>``. ``tokenizer`` (default: the checkpoint's
    recorded one) travels with the formats that carry one. Returns what each budget wrote."""
    from megatron_elastic.budgets import parse_budgets
    from megatron_elastic.checkpoint import (
        load_checkpoint,
        load_extra,
        manifest_model,
        read_manifest,
    )
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.elastic import build_elastic_model
    from megatron_elastic.export.standalone import standalone_config
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups
    from megatron_elastic.router import router_from_state

    exporter = get_exporter(format)
    manifest = read_manifest(checkpoint)
    model_cfg = manifest_model(manifest)
    router = router_from_state(model_cfg, load_extra(checkpoint))
    trained = router.elastic_config.budgets
    if budget is None:
        budgets: list[Budget] = list(trained)
    else:
        budgets = parse_budgets(
            budget, list(trained), interpolate=interpolate, verb="export", single=True
        )
    specs = {b: router.decide(b, 0, None, deterministic=True).spec for b in budgets}
    for spec in specs.values():  # every format slices a homogeneous parent
        standalone_config(model_cfg, spec)
    out = Path(output)
    targets = {b: out / str(b) if budget is None else out for b in budgets}
    options = ExportOptions(
        source_checkpoint=str(Path(checkpoint).resolve()),
        force=force,
        gguf_type=gguf_type,
        log=log,
    )
    exporter.check(model_cfg, specs, options)
    if not force:
        _check_empty(list(targets.values()))
    if exporter.carries_tokenizer:
        options = dataclasses.replace(options, tokenizer=_tokenizer(tokenizer, manifest, log))

    pgs = init_process_groups(ParallelConfig())
    elastic = build_elastic_model(model_cfg, router.elastic_config, pgs)
    load_checkpoint(checkpoint, elastic, model_cfg, kinds=("elastic",))
    written = {}
    for b, spec in specs.items():
        interpolated = isinstance(b, float) and b not in trained.values()
        budget_options = dataclasses.replace(options, budget=b, interpolated=interpolated)
        written[b] = exporter.export(elastic, spec, targets[b], budget_options)
    destroy_process_groups()
    return written
