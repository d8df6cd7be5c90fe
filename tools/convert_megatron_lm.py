#!/usr/bin/env python
"""Convert between Megatron-LM / Megatron-Bridge checkpoints and megatron-elastic checkpoints.

``import`` reads a Megatron-LM or Megatron-Bridge hybrid (NemotronH) checkpoint, saved at any
TP/PP layout with the Transformer-Engine spec's names, into a megatron-elastic checkpoint: a
``parent`` ready for importance estimation, or an ``elastic`` one when the checkpoint carries
megatron-elastic's router (written by ``export`` from an elastic checkpoint).

``export`` writes a megatron-elastic checkpoint (parent, exported budget, or an elastic
checkpoint's whole parent with its router) in the layout Megatron-LM's ``pretrain_hybrid.py``
(``--load DIR --finetune --use-checkpoint-args``) and Megatron-Bridge load: tracker file,
``iter_0000000/`` torch_dist checkpoint with ``args``, ``run_config.yaml``, tokenizer.

    python tools/convert_megatron_lm.py import --load /ckpt/nemotron-h-8b --output runs/parent
    python tools/convert_megatron_lm.py export --checkpoint runs/elastic --output runs/mlm
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from megatron_elastic import cli


def _import(args) -> None:
    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.export.hf import copy_tokenizer_files
    from megatron_elastic.export.megatron_lm import load_megatron_lm_weights, read_megatron_lm
    from megatron_elastic.model import build_hybrid_model
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{str(out)!r} exists and is not empty; pass --force to replace it")
    ckpt = read_megatron_lm(args.load)
    cfg = ckpt.model_config
    pgs = init_process_groups(ParallelConfig())
    model = build_hybrid_model(cfg, pgs)
    load_megatron_lm_weights(ckpt, model)
    router = ckpt.elastic.get("router")
    tokenizer_dir = out.resolve() / "tokenizer"
    metadata = {
        "source_megatron_lm": str(ckpt.root.resolve()),
        "iteration": ckpt.iteration,
        **({"tokenizer": str(tokenizer_dir)} if ckpt.tokenizer else {}),
    }
    kind = "elastic" if router is not None else "parent"
    save_checkpoint(out, model, cfg, kind=kind, metadata=metadata, extra=router)
    (out / "model.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if ckpt.tokenizer:  # after the save, which replaces the directory
        copy_tokenizer_files(ckpt.tokenizer, tokenizer_dir)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"imported {ckpt.weights}: {params:,} params, pattern {cfg.hybrid_pattern} -> {out} "
        f"({kind}{' with its router' if router is not None else ''})"
    )
    destroy_process_groups()


def _export(args) -> None:
    from megatron_elastic.checkpoint import (
        load_checkpoint,
        load_extra,
        manifest_model,
        read_manifest,
    )
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.data.tokenizers import load_tokenizer
    from megatron_elastic.export.megatron_lm import megatron_lm_args, save_megatron_lm
    from megatron_elastic.model import build_hybrid_model
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    manifest = read_manifest(args.checkpoint)
    cfg = manifest_model(manifest)
    megatron_lm_args(cfg)  # refuses what Megatron-LM cannot build, before any work
    tokenizer = args.tokenizer or manifest["metadata"].get("tokenizer")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ValueError(f"tokenizer {tokenizer!r} does not exist; pass --tokenizer PATH")
    if tokenizer is not None:
        load_tokenizer(tokenizer, model_vocab_size=cfg.vocab_size)
    elastic = {}
    if manifest["kind"] == "elastic":
        elastic["router"] = load_extra(args.checkpoint)
    pgs = init_process_groups(ParallelConfig())
    model = build_hybrid_model(cfg, pgs)
    load_checkpoint(args.checkpoint, model, cfg)
    metadata = {"source_checkpoint": str(Path(args.checkpoint).resolve())}
    info = save_megatron_lm(
        args.output,
        model,
        cfg,
        tokenizer_path=tokenizer,
        elastic=elastic,
        metadata=metadata,
        force=args.force,
    )
    router = " and its router" if elastic else ""
    print(
        f"exported {args.checkpoint} ({manifest['kind']}{router}): {info['params']:,} params, "
        f"pattern {cfg.hybrid_pattern} -> {args.output} (Megatron-LM / Megatron-Bridge)"
    )
    if tokenizer is None:
        print("note: no tokenizer (pass --tokenizer PATH): weights only")
    destroy_process_groups()


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    # --verbose (every tool's) goes before the command
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=argparse.ArgumentParser
    )
    imp = commands.add_parser("import", help="Megatron-LM / Bridge -> megatron-elastic")
    imp.add_argument("--load", required=True, help="Megatron-LM checkpoint directory (--load)")
    imp.add_argument("--output", required=True, help="megatron-elastic checkpoint to write")
    imp.add_argument("--force", action="store_true", help="replace a non-empty --output")
    exp = commands.add_parser("export", help="megatron-elastic -> Megatron-LM / Bridge")
    exp.add_argument("--checkpoint", required=True, help="megatron-elastic checkpoint")
    exp.add_argument("--output", required=True, help="Megatron-LM checkpoint directory to write")
    exp.add_argument(
        "--tokenizer", help="tokenizer.json / .model or a directory; default: the checkpoint's"
    )
    exp.add_argument("--force", action="store_true", help="replace a non-empty --output")
    args = parser.parse_args(argv)
    (_import if args.command == "import" else _export)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
