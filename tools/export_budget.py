#!/usr/bin/env python
"""Export trained budgets of an elastic checkpoint as standalone models (zero-shot: no training).

The trained router picks each budget's architecture (argmax, no noise, calibrated to within
router.target_tolerance of the target) and the weights are physically sliced. Formats (the
README's format table says what loads each and how it is tested):

- ``megatron`` (default): megatron-elastic's checkpoint + ``model.yaml``, loading into a plain
  megatron-core HybridModel of the exported dims (a heterogeneous budget lists its per-layer
  widths in ``layer_widths`` / ``layer_mamba_head_dims``).
- ``megatron-lm``: the layout Megatron-LM's ``pretrain_hybrid.py --load DIR --finetune
  --use-checkpoint-args`` and Megatron-Bridge load (TE-spec names, ``args``, ``run_config.yaml``,
  tokenizer). Homogeneous budgets only: Megatron-LM builds one size per layer kind.
- ``hf``: a Hugging Face directory: stock NemotronH (``AutoModelForCausalLM.from_pretrained``)
  for a homogeneous budget, the bundled remote-code model (``trust_remote_code=True``) for a
  heterogeneous one.
- ``gguf``: ``model.gguf`` for llama.cpp (``--gguf-type f32|f16|q8_0``); per-layer FFN widths and
  attention heads are allowed, a heterogeneous Mamba budget is refused (llama.cpp has one Mamba
  shape).

The tokenizer (``--tokenizer``, default: the checkpoint's) travels with the hf, megatron-lm and
gguf formats. An output directory that exists and is not empty is refused unless ``--force``.

    python tools/export_budget.py --checkpoint runs/elastic --budget 6B --output runs/export/6B
    python tools/export_budget.py --checkpoint runs/elastic --all --output runs/export --format hf
    python tools/export_budget.py --checkpoint runs/elastic --budget 6B --output runs/mlm/6B \\
        --format megatron-lm
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

from megatron_elastic import cli

FORMATS = ("megatron", "megatron-lm", "hf", "gguf")


def _budget_value(text: str) -> str | float:
    try:
        return float(text)
    except ValueError:
        return text


def _tokenizer(args: argparse.Namespace, manifest: dict) -> Path | None:
    """--tokenizer, else the checkpoint's recorded tokenizer when it still exists; read once
    here, so that a damaged one is refused before any export is written."""
    from megatron_elastic.data.tokenizers import load_tokenizer

    path = None
    if args.tokenizer is not None:
        if not Path(args.tokenizer).exists():
            raise ValueError(f"--tokenizer {args.tokenizer!r} does not exist")
        path = Path(args.tokenizer)
    recorded = manifest.get("metadata", {}).get("tokenizer")
    if path is None and recorded and Path(recorded).exists():
        path = Path(recorded)
    if path is not None:
        load_tokenizer(path, model_vocab_size=manifest["model"]["vocab_size"])
        return path
    if recorded:
        print(f"note: the checkpoint's tokenizer {recorded!r} no longer exists")
    print("note: no tokenizer (pass --tokenizer PATH): exporting weights only")
    return None


def _export_hf(
    elastic: Any,
    spec: Any,
    target: Path,
    tokenizer: Path | None,
    checkpoint: str,
    budget: str | float,
    interpolated: bool,
) -> None:
    from megatron_elastic.export.hf import export_subnet_to_hf

    meta = {
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "budget": budget,
        "interpolated": interpolated,
    }
    info = export_subnet_to_hf(elastic, spec, target, tokenizer_path=tokenizer, metadata=meta)
    how = (
        "stock NemotronH"
        if info["format"] == "hf"
        else "remote-code model: load with trust_remote_code=True"
    )
    note = " (router interpolation: untrained budget)" if interpolated else ""
    print(
        f"exported budget {budget}: {info['params']:,} params, pattern {info['dims']['pattern']}, "
        f"hidden {info['dims']['hidden']} -> {target} ({how}){note}"
    )
    if not info["has_attention"]:
        print(
            f"note: budget {budget} keeps no attention layer: use_cache is false in config.json "
            "and generation_config.json (stock NemotronH's cache needs an attention layer)"
        )


def _check_exportable(
    args: argparse.Namespace,
    parent: Any,
    specs: dict,
    configs: dict,
    targets: dict[Any, Path],
) -> None:
    """Everything that would stop an export, checked for every budget before anything is
    written: the format's limits and output directories that are not empty."""
    if args.format == "megatron-lm":
        from megatron_elastic.export.megatron_lm import megatron_lm_args

        for budget, cfg in configs.items():
            try:
                megatron_lm_args(cfg)
            except ValueError as exc:
                raise ValueError(f"budget {budget}: {exc}") from None
    if args.format == "gguf":
        from megatron_elastic.export.gguf import GGUF_TYPES, check_gguf_exportable

        if args.gguf_type not in GGUF_TYPES:
            raise ValueError(
                f"--gguf-type {args.gguf_type!r} is not one llama.cpp loads for this model; "
                f"choose one of {', '.join(GGUF_TYPES)}"
            )
        for budget, spec in specs.items():
            try:
                check_gguf_exportable(parent, spec)
            except ValueError as exc:
                raise ValueError(f"budget {budget}: {exc}") from None
    elif args.gguf_type != "f32":
        raise ValueError("--gguf-type applies to --format gguf only")
    if not args.force:
        for target in targets.values():
            if target.exists() and (not target.is_dir() or any(target.iterdir())):
                raise ValueError(
                    f"{str(target)!r} exists and is not empty; pass --force to replace it "
                    "(nothing was written)"
                )


def _export_gguf(
    args: argparse.Namespace,
    elastic: Any,
    spec: Any,
    target: Path,
    tokenizer: Path | None,
    budget: str | float,
    interpolated: bool,
) -> None:
    from megatron_elastic.export.gguf import export_subnet_to_gguf

    meta = {
        "source_checkpoint": str(Path(args.checkpoint).resolve()),
        "budget": budget,
        "interpolated": interpolated,
    }
    info = export_subnet_to_gguf(
        elastic, spec, target, tokenizer_path=tokenizer, dtype=args.gguf_type, metadata=meta
    )
    note = " (router interpolation: untrained budget)" if interpolated else ""
    print(
        f"exported budget {budget}: {info['params']:,} params, pattern "
        f"{info['dims']['pattern']}, {info['dtype']} -> {target / info['file']} "
        f"(GGUF for llama.cpp){note}"
    )
    if info["placeholder_attention_layer"]:
        print(
            f"note: budget {budget} keeps no attention layer: the file has one zero placeholder "
            "attention block (llama.cpp aborts without one; it adds exactly 0)"
        )
    if not info["tokenizer"]["in_gguf"]:
        print(f"note: token ids only: {info['tokenizer']['note']}")


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="elastic checkpoint (with its router)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--budget", help="a trained budget name, or a fraction (see --interpolate)")
    which.add_argument("--all", action="store_true", help="export every trained budget")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--format", choices=FORMATS, default="megatron")
    parser.add_argument(
        "--gguf-type",
        default="f32",
        help="tensor type of --format gguf: f32, f16 or q8_0 (norms and other small tensors stay "
        "f32, as llama.cpp's own converter writes them)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace output directories that are not empty"
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json / .model (or a directory) shipped with --format hf, megatron-lm and "
        "gguf; default: the "
        "checkpoint manifest's metadata['tokenizer']",
    )
    parser.add_argument(
        "--interpolate",
        action="store_true",
        help="allow an untrained fraction between two trained budgets (router interpolation; "
        "quality is not trained for it)",
    )
    args = parser.parse_args(argv)

    from megatron_elastic.checkpoint import (
        load_checkpoint,
        load_extra,
        manifest_model,
        read_manifest,
        save_checkpoint,
    )
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.elastic import build_elastic_model
    from megatron_elastic.elastic.budget import subnet_param_count
    from megatron_elastic.export.standalone import standalone_config, standalone_state_dict
    from megatron_elastic.model import build_hybrid_model
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups
    from megatron_elastic.router import router_from_state

    manifest = read_manifest(args.checkpoint)
    model_cfg = manifest_model(manifest)
    router = router_from_state(model_cfg, load_extra(args.checkpoint))
    trained = router.elastic_config.budgets
    if args.all:
        budgets: list[str | float] = list(trained)
    else:
        budget = _budget_value(args.budget)
        if isinstance(budget, str) and budget not in trained:
            raise ValueError(f"unknown budget {budget!r}; trained budgets: {sorted(trained)}")
        if isinstance(budget, float) and not args.interpolate:
            raise ValueError(
                f"{budget} is not a trained budget ({sorted(trained)}); pass --interpolate "
                "to export it through router interpolation (untrained)"
            )
        budgets = [budget]
    specs = {b: router.decide(b, 0, None, deterministic=True).spec for b in budgets}
    configs = {b: standalone_config(model_cfg, s) for b, s in specs.items()}
    out = Path(args.output)
    targets = {b: out / str(b) if args.all else out for b in budgets}
    _check_exportable(args, model_cfg, specs, configs, targets)
    tokenizer = _tokenizer(args, manifest) if args.format != "megatron" else None

    pgs = init_process_groups(ParallelConfig())
    elastic = build_elastic_model(model_cfg, router.elastic_config, pgs)
    load_checkpoint(args.checkpoint, elastic, model_cfg, kinds=("elastic",))
    for budget, spec in specs.items():
        target = targets[budget]
        interpolated = isinstance(budget, float) and budget not in trained.values()
        if args.format == "hf":
            _export_hf(elastic, spec, target, tokenizer, args.checkpoint, budget, interpolated)
            continue
        if args.format == "gguf":
            _export_gguf(args, elastic, spec, target, tokenizer, budget, interpolated)
            continue
        cfg = configs[budget]
        plain = build_hybrid_model(cfg, pgs)
        missing, unexpected = plain.load_state_dict(standalone_state_dict(elastic, spec), False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
        meta = {
            "source_checkpoint": str(Path(args.checkpoint).resolve()),
            "budget": budget,
            "interpolated": interpolated,
            "params": subnet_param_count(model_cfg, spec),
            "dims": dataclasses.asdict(cfg),
        }
        note = " (router interpolation: untrained budget)" if interpolated else ""
        if args.format == "megatron-lm":
            from megatron_elastic.export.megatron_lm import save_megatron_lm

            save_megatron_lm(
                target, plain, cfg, tokenizer_path=tokenizer, metadata=meta, force=args.force
            )
            print(
                f"exported budget {budget}: {meta['params']:,} params, pattern "
                f"{cfg.hybrid_pattern}, hidden {cfg.hidden_size} -> {target} "
                f"(Megatron-LM / Megatron-Bridge){note}"
            )
            continue
        save_checkpoint(target, plain, cfg, kind="exported", metadata=meta)
        (target / "model.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        if cfg.is_heterogeneous:
            note = f", per-layer widths {list(cfg.layer_widths or ())}{note}"
        print(
            f"exported budget {budget}: {meta['params']:,} params, pattern "
            f"{cfg.hybrid_pattern}, hidden {cfg.hidden_size} -> {target}{note}"
        )
    destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
