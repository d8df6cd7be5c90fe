#!/usr/bin/env python
"""Print a model recipe's dimensions and layer table with exact parameter counts.

Pure arithmetic: no weights are allocated, so the 12B recipe inspects in seconds on a laptop.
The last line is ``params: <integer>``.

    python tools/inspect_model.py --config examples/nemotron_nano_12b/model.yaml
"""

from __future__ import annotations

import sys

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="model recipe YAML (examples/*/model.yaml)")
    args = parser.parse_args(argv)

    from megatron_elastic.config import load_model_config
    from megatron_elastic.model.param_count import (
        count_parameters,
        embedding_params,
        layer_parameter_counts,
    )

    cfg = load_model_config(args.config)

    kinds = cfg.layer_kinds()
    print(f"model: {args.config}")
    print(f"  pattern          {cfg.hybrid_pattern}")
    print(
        f"  layers           {cfg.num_layers} ({kinds.count('mamba')} mamba, "
        f"{kinds.count('attention')} attention, {kinds.count('mlp')} mlp)"
    )
    print(f"  hidden           {cfg.hidden_size}")
    print(f"  ffn              {cfg.ffn_hidden_size} (squared ReLU)")
    print(
        f"  attention        {cfg.num_attention_heads} heads x {cfg.head_dim}, "
        f"{cfg.num_query_groups} query groups"
    )
    print(
        f"  mamba            {cfg.mamba_num_heads} heads x {cfg.mamba_head_dim}, "
        f"{cfg.mamba_num_groups} groups, state {cfg.mamba_state_dim}, "
        f"conv {cfg.mamba_conv_kernel}"
    )
    print(f"  vocab            {cfg.vocab_size} (untied output layer)")
    print()
    print(f"{'layer':>5}  {'kind':<10} {'params':>15}")
    for i, (kind, n) in enumerate(zip(kinds, layer_parameter_counts(cfg), strict=True)):
        print(f"{i:>5}  {kind:<10} {n:>15,}")
    print(f"{'':>5}  {'embed+out':<10} {embedding_params(cfg.hidden_size, cfg.vocab_size):>15,}")
    total = count_parameters(cfg)
    print(f"total: {total / 1e9:.3f}B")
    print(f"params: {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
