#!/usr/bin/env python
"""Greedy generation from an elastic checkpoint at one or more budgets, in one process: the
weights are loaded once and each budget only switches which slices of them run.

    python tools/generate.py --checkpoint runs/elastic --budget 50% \\
        --prompt "Question: What is 3 + 4?\\nAnswer:" --max-new-tokens 64
    python tools/generate.py --checkpoint runs/elastic --budget all --prompt "..." --prompt "..."

``--budget`` may be repeated, comma-separated, ``all``, or a fraction between trained budgets
(router interpolation: untrained). An exported checkpoint runs its own budget. ``\\n`` in a
prompt is a newline. Generation stops at the tokenizer's end-of-document token. Unknown budgets
or a missing tokenizer stop with exit code 2.
"""

from __future__ import annotations

import sys

from megatron_elastic import cli


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="elastic (or exported) checkpoint")
    parser.add_argument(
        "--budget",
        action="append",
        help="trained budget name, 'all', or a fraction; repeatable (default: all)",
    )
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--tokenizer", help="tokenizer file (default: the checkpoint's)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error("--max-new-tokens must be >= 0")

    from megatron_elastic.checkpoint import manifest_model, read_manifest
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.eval import greedy_generate, open_checkpoint
    from megatron_elastic.eval.loading import (
        checkpoint_budgets,
        load_eval_tokenizer,
        parse_budgets,
    )
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    prompts = [p.replace("\\n", "\n") for p in args.prompt]  # shells pass newlines awkwardly
    kind, trained = checkpoint_budgets(args.checkpoint)
    budgets = parse_budgets(args.budget or "all", trained, allow_fractions=kind == "elastic")
    manifest = read_manifest(args.checkpoint)
    model_cfg = manifest_model(manifest)
    tokenizer = load_eval_tokenizer(args.tokenizer, manifest, model_cfg)
    ids = [tokenizer.encode(p) for p in prompts]
    if any(not i for i in ids):
        raise ValueError("a prompt is empty; give each --prompt some text")

    pgs = init_process_groups(ParallelConfig())
    ckpt = open_checkpoint(args.checkpoint, pgs)
    for budget in budgets:
        ckpt.set_budget(budget)
        out = greedy_generate(
            ckpt.model,
            ids,
            max_new_tokens=args.max_new_tokens,
            eos_id=tokenizer.eod,
            max_sequence_length=model_cfg.max_sequence_length,
            vocab_size=tokenizer.vocab_size,
        )
        interpolated = "" if isinstance(budget, str) else " (router interpolation: untrained)"
        print(f"=== budget {budget}: {ckpt.params(budget):,} params{interpolated} ===")
        for i, (prompt, tokens, stopped) in enumerate(
            zip(prompts, out.tokens, out.stopped, strict=True)
        ):
            end = "[end of document]" if stopped else f"[{len(tokens)} tokens, limit]"
            print(f"--- prompt {i}: {prompt!r}")
            print(f"{tokenizer.decode(tokens)}\n{end}")
    destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
