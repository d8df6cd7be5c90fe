#!/usr/bin/env python
"""Generation throughput from one elastic checkpoint, one process: cached vs full-recompute
decoding per budget at two context lengths, and self-speculative decoding per (draft, k).

* cached vs uncached: batch 1, a prompt of ``context - new`` tokens, then ``new`` tokens
  generated greedily. ``cached`` prints the whole call's tokens/s (prefill included) and the
  decode steps' alone (one token per step with the prompt in the cache);``uncached`` is
  :func:`megatron_elastic.eval.greedy_generate` (the whole sequence recomputed every token).
  Both arms produce the same tokens (checked).
* speculative: the verifier (default the largest budget) continues reasoning prompts of the
  checkpoint's tokenizer; plain cached greedy decoding of the verifier vs self-speculative decoding
  with a smaller trained budget as draft proposing k tokens. Outputs are checked identical.
  Acceptance rate = accepted / proposed drafts; mean accepted length = tokens per verification
  pass; speedup = plain time / speculative time. A first pass runs every (draft, k) of the grid
  once, each after one plain run, and picks the fastest pair (its speedup column divides the
  median of the pass's plain runs by the pair's time, so that one slow plain run cannot pick a
  pair); then the chosen pair and plain decoding are timed in ``--spec-repeats`` interleaved
  (plain, speculative) pairs, alternating which goes first, and reported as medians with their
  min-max: the chosen pair is measured on fresh runs, not on the runs that chose it.

The cached/uncached timings are the best of ``--repeats`` runs (the uncached arm: one run); the
machine may be shared, and other work only adds time (``--threads 1`` avoids OpenMP threads
waiting for a descheduled sibling). The last printed line is ``speculative speedup: X`` for the
chosen (draft, k): the median over the interleaved pairs of plain time / speculative time.

    python benchmarks/bench_generate.py --checkpoint runs/quickstart/stage2/step_0000040
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from megatron_elastic.config import ParallelConfig
from megatron_elastic.data.reasoning import generate_records, render_prompt
from megatron_elastic.eval import greedy_generate, open_checkpoint
from megatron_elastic.eval.loading import load_eval_tokenizer
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.serving import InferenceState, ServingSession, cached_generate, forward
from megatron_elastic.serving.speculative import speculative_generate


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def decode_rate(net, prompt: list[int], new: int, repeats: int, batch: int = 1) -> float:
    """Tokens/s of the decode steps alone (prompt already cached), ``batch`` rows."""
    ids = torch.tensor([prompt] * batch)
    best = float("inf")
    for _ in range(repeats):
        state = InferenceState(net, batch, len(prompt) + new)
        logits = forward(net, ids, state, last_only=True)[:, -1]
        start = time.perf_counter()
        for _ in range(new):
            nxt = logits.argmax(-1)
            logits = forward(net, nxt[:, None], state, last_only=True)[:, -1]
        best = min(best, time.perf_counter() - start)
    return batch * new / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="elastic checkpoint (trained)")
    parser.add_argument("--tokenizer", help="default: the checkpoint's")
    parser.add_argument("--contexts", default="256,1024")
    parser.add_argument("--new-tokens", type=int, default=64, help="cached arm")
    parser.add_argument("--uncached-new-tokens", type=int, default=16)
    parser.add_argument("--spec-new-tokens", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--draft-tokens", default="1,2,3,4,6")
    parser.add_argument("--verifier", help="default: the largest trained budget")
    parser.add_argument("--repeats", type=int, default=2, help="cached arm: best of")
    parser.add_argument(
        "--spec-repeats",
        type=int,
        default=7,
        help="interleaved (plain, speculative) pairs timed for the chosen (draft, k)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.spec_repeats < 3:
        parser.error("--spec-repeats must be >= 3 (the speedup is a median)")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.set_grad_enabled(False)
    pgs = init_process_groups(ParallelConfig())
    ckpt = open_checkpoint(args.checkpoint, pgs)
    tokenizer = load_eval_tokenizer(args.tokenizer, ckpt.manifest, ckpt.model_config)
    session = ServingSession(ckpt, keep=8)
    budgets = sorted(ckpt.budgets(), key=ckpt.params, reverse=True)
    print(
        f"threads {torch.get_num_threads()}; budgets {budgets}; cached arm best of "
        f"{args.repeats}; speculative: median of {args.spec_repeats} interleaved pairs"
    )

    g = torch.Generator().manual_seed(0)
    vocab = tokenizer.vocab_size
    print("\n| budget | context | cached tok/s | cached decode tok/s | uncached tok/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for context in (int(c) for c in args.contexts.split(",")):
        for budget in budgets:
            net = session.net(budget)
            new, new_u = args.new_tokens, args.uncached_new_tokens
            prompt = torch.randint(1, vocab, (context - new,), generator=g).tolist()
            t_c, out_c = best_time(
                lambda net=net, prompt=prompt, new=new: cached_generate(
                    net, [prompt], max_new_tokens=new, vocab_size=vocab
                ),
                args.repeats,
            )
            decode = decode_rate(net, prompt, new, args.repeats)
            ckpt.set_budget(budget)
            prompt_u = prompt + out_c.tokens[0][: new - new_u]  # same context at the end
            t_u, out_u = best_time(
                lambda prompt_u=prompt_u, new_u=new_u: greedy_generate(
                    ckpt.model, [prompt_u], max_new_tokens=new_u, vocab_size=vocab
                ),
                1,
            )
            assert out_u.tokens[0] == out_c.tokens[0][new - new_u :], budget
            rate_c, rate_u = new / t_c, new_u / t_u
            print(
                f"| {budget} | {context} | {rate_c:.1f} | {decode:.1f} | {rate_u:.1f} | "
                f"{rate_c / rate_u:.1f}x |"
            )
    ckpt.model.set_subnet(None)
    longest = max(int(c) for c in args.contexts.split(","))
    prompt = torch.randint(1, vocab, (longest - args.new_tokens,), generator=g).tolist()
    for batch in (1, 4):
        rate = decode_rate(session.net(budgets[0]), prompt, args.new_tokens, args.repeats, batch)
        print(f"cached decode at {longest} tokens of context, batch {batch}: {rate:.1f} tok/s")

    verifier = args.verifier or budgets[0]
    drafts = [b for b in budgets if ckpt.params(b) < ckpt.params(verifier)]
    records = generate_records(args.num_prompts, seed=2026)
    prompts = [tokenizer.encode(render_prompt(r)) for r in records]
    new = args.spec_new_tokens
    v_net = session.net(verifier)

    def plain_run():  # one prompt at a time, as speculative decoding runs them
        return [cached_generate(v_net, [p], max_new_tokens=new, vocab_size=vocab) for p in prompts]

    def spec_run(draft: str, k: int):
        return speculative_generate(
            v_net, session.net(draft), prompts, draft_tokens=k, max_new_tokens=new, vocab_size=vocab
        )

    def timed(fn: Callable[[], object]) -> tuple[float, object]:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    _, plain = timed(plain_run)  # warm-up, and the reference tokens
    expected = [o.tokens[0] for o in plain]
    print(
        f"\nspeculative: verifier {verifier}, {len(prompts)} prompts one at a time, {new} new "
        f"tokens each (no end-of-sequence stop). First pass (selection only): every (draft, k) "
        f"run once, each after one plain cached greedy run of the verifier; the fastest is chosen"
    )
    grid, first_plain = [], []
    for draft in drafts:
        for k in (int(x) for x in args.draft_tokens.split(",")):
            first_plain.append(timed(plain_run)[0])
            t_spec, (out, stats) = timed(lambda draft=draft, k=k: spec_run(draft, k))
            assert out.tokens == expected, (draft, k)
            grid.append((t_spec, draft, k, stats))
    # Against the median of the pass's plain runs: one slow plain run cannot pick a pair.
    plain_ref = statistics.median(first_plain)
    print(
        f"plain cached greedy in this pass: median {plain_ref:.3f} s over {len(first_plain)} runs"
    )
    print("\n| draft | k | acceptance | tokens/verification | time s | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    for t_spec, draft, k, stats in grid:
        print(
            f"| {draft} | {k} | {stats.acceptance_rate:.2f} | {stats.mean_accepted_length:.2f} | "
            f"{t_spec:.3f} | {plain_ref / t_spec:.2f}x |"
        )
    _, draft, k, _ = min(grid, key=lambda row: row[0])  # the fastest speculative run
    plain_s, spec_s, ratios = [], [], []
    for i in range(args.spec_repeats):  # fresh runs of the chosen pair, order alternating
        if i % 2 == 0:
            t_plain, _ = timed(plain_run)
            t_spec, (out, _) = timed(lambda: spec_run(draft, k))
        else:
            t_spec, (out, _) = timed(lambda: spec_run(draft, k))
            t_plain, _ = timed(plain_run)
        assert out.tokens == expected, (draft, k)
        plain_s.append(t_plain)
        spec_s.append(t_spec)
        ratios.append(t_plain / t_spec)
    destroy_process_groups()

    def summary(xs: list[float], fmt: str) -> str:
        return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    tokens = len(prompts) * new
    print(
        f"\nchosen pair: draft {draft}, k={k}, verifier {verifier}; {args.spec_repeats} "
        f"interleaved (plain, speculative) pairs, medians (min-max):"
    )
    print(
        f"plain cached greedy: {summary(plain_s, '.3f')} s, "
        f"{summary([tokens / t for t in plain_s], '.1f')} tok/s"
    )
    print(
        f"speculative: {summary(spec_s, '.3f')} s, "
        f"{summary([tokens / t for t in spec_s], '.1f')} tok/s"
    )
    print(
        f"speculative speedup: {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} pairs; "
        f"draft {draft}, k={k}, verifier {verifier})"
    )


if __name__ == "__main__":
    main()
