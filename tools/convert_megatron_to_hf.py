#!/usr/bin/env python
"""Convert a megatron-elastic checkpoint (parent, exported budget, or an elastic checkpoint's full
model), or a Megatron-LM / Megatron-Bridge hybrid checkpoint (the directory holding
``latest_checkpointed_iteration.txt``), into a stock Hugging Face NemotronH directory.

Writes config.json (``hybrid_override_pattern``, ``head_dim``; the source ``config.json`` keys
when the checkpoint was converted from HF), generation_config.json, model.safetensors and, with a
tokenizer (``--tokenizer``, default: the checkpoint manifest's ``metadata["tokenizer"]``), its
files. Load with ``AutoModelForCausalLM.from_pretrained(OUTPUT)``.

    python tools/convert_megatron_to_hf.py --checkpoint runs/parent --output runs/hf/parent
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="megatron-elastic or Megatron-LM checkpoint"
    )
    parser.add_argument("--output", required=True, help="HF directory to write")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json / .model or an HF tokenizer directory; default: the checkpoint's",
    )
    args = parser.parse_args(argv)

    from megatron_elastic.checkpoint import load_checkpoint, manifest_model, read_manifest
    from megatron_elastic.export.hf import hf_config_from_model
    from megatron_elastic.export.megatron_lm import (
        is_megatron_lm_checkpoint,
        load_megatron_lm_weights,
        read_megatron_lm,
    )

    megatron_lm = None
    if is_megatron_lm_checkpoint(args.checkpoint):
        megatron_lm = read_megatron_lm(args.checkpoint)
        cfg, base = megatron_lm.model_config, None
        recorded = megatron_lm.tokenizer
    else:
        manifest = read_manifest(args.checkpoint)
        cfg = manifest_model(manifest)
        base = manifest["metadata"].get("hf_config")
        recorded = manifest["metadata"].get("tokenizer")
    hf_config_from_model(cfg, base=base)  # refuses what stock NemotronH cannot represent
    tokenizer = args.tokenizer or recorded
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ValueError(f"tokenizer {tokenizer!r} does not exist; pass --tokenizer PATH")
    if tokenizer is not None:  # a damaged or mismatched one is refused before writing
        from megatron_elastic.data.tokenizers import load_tokenizer

        load_tokenizer(tokenizer, model_vocab_size=cfg.vocab_size)

    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.export.hf import save_hf_directory
    from megatron_elastic.model import build_hybrid_model
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    pgs = init_process_groups(ParallelConfig())
    model = build_hybrid_model(cfg, pgs)
    if megatron_lm is not None:
        load_megatron_lm_weights(megatron_lm, model)
    else:
        load_checkpoint(args.checkpoint, model, cfg)
    config = save_hf_directory(args.output, cfg, model.state_dict(), tokenizer, base_config=base)
    params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint}: {params:,} params -> {args.output} (stock NemotronH)")
    if not config["use_cache"]:
        print("note: no attention layer: use_cache is false (stock NemotronH's cache needs one)")
    if tokenizer is None:
        print("note: no tokenizer (pass --tokenizer PATH): weights only")
    destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
