#!/usr/bin/env python
"""Convert a Hugging Face NemotronH directory into a megatron-elastic parent checkpoint (or, with
``--format megatron-lm``, a Megatron-LM / Megatron-Bridge checkpoint).

Writes a checkpoint of kind ``parent`` (megatron dist checkpoint + manifest) and its
``model.yaml``, ready for importance estimation and elastic training. The manifest keeps the
source ``config.json`` (so tools/convert_megatron_to_hf.py writes the same keys back) and, when
the HF directory has tokenizer files, the path of their copy under ``OUTPUT/tokenizer``.
Mixture-of-experts layers, tied embeddings, biases and MTP layers are refused with the reason.

``--format megatron-lm`` writes what ``tools/convert_megatron_lm.py export`` writes (the layout
Megatron-LM's ``pretrain_hybrid.py`` and Megatron-Bridge load), with the HF tokenizer.

    python tools/convert_hf_to_megatron.py --hf /models/nemotron-nano-12b-v2 --output runs/parent
    python tools/convert_hf_to_megatron.py --hf /models/nemotron-h --output runs/mlm \\
        --format megatron-lm
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import yaml

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hf", required=True, help="HF model directory (config.json + safetensors)"
    )
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--format",
        choices=("megatron", "megatron-lm"),
        default="megatron",
        help="megatron-elastic's parent checkpoint (default) or Megatron-LM / Megatron-Bridge",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace a non-empty --output (megatron-lm)"
    )
    args = parser.parse_args(argv)

    from megatron_elastic.export.hf import (
        copy_tokenizer_files,
        from_hf_state_dict,
        load_hf_directory,
        model_config_from_hf,
        read_hf_config,
    )

    cfg = model_config_from_hf(read_hf_config(args.hf))  # refuse before reading weights
    hf_config, hf_state = load_hf_directory(args.hf)
    state = from_hf_state_dict(hf_state, cfg)

    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.model import build_hybrid_model
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    pgs = init_process_groups(ParallelConfig())
    model = build_hybrid_model(cfg, pgs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    out = Path(args.output)
    tokenizer_dir = out.resolve() / "tokenizer"
    has_tokenizer = any(
        (Path(args.hf) / n).is_file() for n in ("tokenizer.json", "tokenizer.model")
    )
    if args.format == "megatron-lm":
        from megatron_elastic.export.megatron_lm import save_megatron_lm

        info = save_megatron_lm(
            out,
            model,
            cfg,
            tokenizer_path=args.hf if has_tokenizer else None,
            metadata={"source_hf": str(Path(args.hf).resolve())},
            force=args.force,
        )
        print(
            f"converted {args.hf}: {info['params']:,} params, pattern {cfg.hybrid_pattern} -> "
            f"{out} (Megatron-LM / Megatron-Bridge)"
        )
        destroy_process_groups()
        return 0
    metadata = {
        "source_hf": str(Path(args.hf).resolve()),
        "hf_config": hf_config,
        **({"tokenizer": str(tokenizer_dir)} if has_tokenizer else {}),
    }
    save_checkpoint(out, model, cfg, kind="parent", metadata=metadata)
    (out / "model.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if has_tokenizer:  # after the save, which replaces the directory
        copy_tokenizer_files(args.hf, tokenizer_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.hf}: {params:,} params, pattern {cfg.hybrid_pattern} -> {out}")
    if float(hf_config.get("time_step_min") or 0.0) > 0.0:
        print(
            f"note: transformers' NemotronH clamps the Mamba dt at time_step_min="
            f"{hf_config['time_step_min']}; megatron's mixer does not clamp it, so outputs differ "
            "slightly wherever softplus(dt) falls below that value"
        )
    if not has_tokenizer:
        print("note: no tokenizer.json / tokenizer.model in the HF directory: weights only")
    destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
