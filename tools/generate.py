#!/usr/bin/env python
"""Generation from an elastic checkpoint at one or more budgets, in one process: the weights are
loaded once and each budget only switches which slices of them run.

    python tools/generate.py --checkpoint runs/elastic --budget 50% \\
        --prompt "Question: What is 3 + 4?\\nAnswer:" --max-new-tokens 64
    python tools/generate.py --checkpoint runs/elastic --budget all --prompt "..." --prompt "..."
    python tools/generate.py --checkpoint runs/elastic --budget full --draft 50% \\
        --draft-tokens 4 --prompt "..."

Decoding is cached (key/value cache of the attention layers, conv and SSM state of the Mamba
layers, sized to the budget's sub-network): each new token costs one step. ``--draft B``
decodes self-speculatively: the smaller budget B of the same weights drafts ``--draft-tokens``
tokens, the verifier budget checks them in one pass (greedy; the output is the verifier's own
greedy output) and the acceptance rate is printed. ``--temperature``/``--top-p``/``--seed``
sample instead of greedy. ``--recompute`` recomputes the whole sequence at every token (the
reference; also the only mode for a Hugging Face directory).

``--budget`` may be repeated, comma-separated, ``all``, or with ``--interpolate`` a fraction
between trained budgets (router interpolation: untrained). An exported checkpoint runs its own
budget. ``\\n`` in a prompt is a newline. Generation stops at the tokenizer's end-of-document
token. Bad input (unknown budget, a draft not smaller than the verifier, a prompt longer than
the model's context, ...) stops with one line and exit code 2.
"""

from __future__ import annotations

import sys
import time

from megatron_elastic import cli


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="elastic (or exported) checkpoint")
    parser.add_argument(
        "--budget",
        action="append",
        help="trained budget name, 'all', or a fraction (--interpolate); repeatable (default: all)",
    )
    parser.add_argument(
        "--interpolate",
        action="store_true",
        help="allow an untrained fraction between two trained budgets (router interpolation)",
    )
    parser.add_argument("--prompt", action="append", required=True, help="repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--tokenizer", help="tokenizer file (default: the checkpoint's)")
    parser.add_argument("--draft", help="smaller budget drafting for self-speculative decoding")
    parser.add_argument(
        "--draft-tokens", type=int, default=4, help="tokens the draft proposes per verification"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--recompute", action="store_true", help="no cache: recompute the sequence every token"
    )
    return parser


def _check_args(args, kind: str, budgets: list, trained: list[str]) -> None:
    """Everything that can be refused before weights are read."""
    from megatron_elastic.eval.loading import budget_params, parse_budgets
    from megatron_elastic.serving import SamplingConfig

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    SamplingConfig(args.temperature, args.top_p, args.seed)  # ValueError on bad values
    for budget in budgets:
        if isinstance(budget, float) and not args.interpolate:
            raise ValueError(
                f"{budget} is not a trained budget ({sorted(trained)}); pass --interpolate to "
                "run it through router interpolation (untrained)"
            )
    if args.recompute and (args.draft or args.temperature > 0):
        raise ValueError("--recompute is greedy and uncached; drop --draft / --temperature")
    if kind not in ("elastic", "exported") and (args.draft or args.temperature > 0):
        raise ValueError(
            f"a {kind} directory generates greedily by recomputation only; --draft and "
            "--temperature need a megatron checkpoint (elastic or exported)"
        )
    if args.draft is None:
        return
    if args.draft_tokens <= 0:
        raise ValueError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    if args.temperature > 0:
        raise ValueError("speculative decoding here is greedy; drop --temperature or --draft")
    if kind != "elastic":
        raise ValueError("--draft needs an elastic checkpoint (the draft is a budget of it)")
    (draft,) = parse_budgets(args.draft, trained, allow_fractions=args.interpolate)
    params = budget_params(args.checkpoint, [draft, *budgets])
    for budget in budgets:
        if params[draft] >= params[budget]:
            raise ValueError(
                f"the draft budget {draft} ({params[draft]:,} params) is not smaller than the "
                f"verifier {budget} ({params[budget]:,} params); choose a smaller --draft"
            )


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from megatron_elastic.checkpoint import manifest_model, read_manifest
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.eval import greedy_generate, open_checkpoint
    from megatron_elastic.eval.loading import (
        checkpoint_budgets,
        load_eval_tokenizer,
        parse_budgets,
    )
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups
    from megatron_elastic.serving import (
        SamplingConfig,
        ServingSession,
        cached_generate,
        check_lengths,
    )
    from megatron_elastic.serving.speculative import speculative_generate

    prompts = [p.replace("\\n", "\n") for p in args.prompt]  # shells pass newlines awkwardly
    kind, trained = checkpoint_budgets(args.checkpoint)
    budgets = parse_budgets(args.budget or "all", trained, allow_fractions=kind == "elastic")
    _check_args(args, kind, budgets, trained)
    manifest = read_manifest(args.checkpoint)
    model_cfg = manifest_model(manifest)
    tokenizer = load_eval_tokenizer(args.tokenizer, manifest, model_cfg)
    ids = [tokenizer.encode(p) for p in prompts]
    if any(not i for i in ids):
        raise ValueError("a prompt is empty; give each --prompt some text")
    check_lengths(ids, args.max_new_tokens, model_cfg.max_sequence_length)
    sampling = SamplingConfig(args.temperature, args.top_p, args.seed)
    draft = parse_budgets(args.draft, trained)[0] if args.draft else None

    pgs = init_process_groups(ParallelConfig())
    ckpt = open_checkpoint(args.checkpoint, pgs)
    cached = kind in ("elastic", "exported") and not args.recompute
    session = ServingSession(ckpt) if cached else None
    for budget in budgets:
        start, note = time.perf_counter(), ""
        if not cached:
            ckpt.set_budget(budget)
            out = greedy_generate(
                ckpt.model,
                ids,
                max_new_tokens=args.max_new_tokens,
                eos_id=tokenizer.eod,
                max_sequence_length=model_cfg.max_sequence_length,
                vocab_size=tokenizer.vocab_size,
            )
        elif draft is None:
            out = cached_generate(
                session.net(budget),
                ids,
                max_new_tokens=args.max_new_tokens,
                eos_id=tokenizer.eod,
                vocab_size=tokenizer.vocab_size,
                sampling=sampling,
            )
        else:
            out, stats = speculative_generate(
                session.net(budget),
                session.net(draft),
                ids,
                draft_tokens=args.draft_tokens,
                max_new_tokens=args.max_new_tokens,
                eos_id=tokenizer.eod,
                vocab_size=tokenizer.vocab_size,
            )
            note = (
                f"; draft {draft}, k={args.draft_tokens}: acceptance {stats.acceptance_rate:.2f}, "
                f"{stats.mean_accepted_length:.2f} tokens per verification"
            )
        seconds = time.perf_counter() - start
        produced = sum(len(t) for t in out.tokens)
        interpolated = "" if isinstance(budget, str) else " (router interpolation: untrained)"
        print(
            f"=== budget {budget}: {ckpt.params(budget):,} params{interpolated}; "
            f"{produced} tokens in {seconds:.2f} s{note} ==="
        )
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
