#!/usr/bin/env python
"""Generation throughput from one elastic checkpoint, one process: cached vs full-recompute
decoding per budget at two context lengths, and self-speculative decoding per (draft, k).

* cached vs uncached: batch 1, a prompt of ``context - new`` tokens, then ``new`` tokens
  generated greedily. ``cached`` prints the whole call's tokens/s (prefill included) and the
  decode steps' alone (one token per step with the prompt in the cache);``uncached`` is
  :func:`megatron_elastic.eval.greedy_generate` (the whole sequence recomputed every token).
  Both arms produce the same tokens (checked).
* verification cost: the verifier's cached forward over a chunk of ``s`` = 1..k+1 tokens after a
  reasoning prompt (with the rollback marks speculative decoding sets), in units of a one-token
  decode step (s = 1); next to it the same ratio for the weights' matmuls alone (every layer's
  linear maps and the output layer at ``s`` rows), the part of a step that grows with ``s`` on a
  CPU whatever the rest costs. Medians of ``--verify-repeats`` rounds, the sizes interleaved.
* speculative: the verifier (default the largest budget) continues reasoning prompts of the
  checkpoint's tokenizer; plain cached greedy decoding of the verifier vs self-speculative decoding
  with a smaller trained budget as draft proposing k tokens. Outputs are checked identical.
  Acceptance rate = accepted / proposed drafts; mean accepted length = tokens per verification
  pass; speedup = plain time / speculative time. Every (draft, k) of the grid is timed in
  ``--grid-repeats`` interleaved (plain, speculative) pairs, alternating which goes first, and
  reported as the median of the per-pair speedups with their min-max. Then the pair with the best
  median and plain decoding are timed in ``--spec-repeats`` fresh interleaved pairs: the chosen
  pair is measured on fresh runs, not on the runs that chose it.
* ``--wide20m``: instead of a checkpoint, the 20M-parameter parent of ``bench_train_step.py``
  (random weights, its router fitted to the budget loss alone so each budget has its own
  architecture; prompts tokenized by ``--tokenizer``): the regime where a step reads more weight
  bytes than the CPU caches hold. Its acceptance rates are those of random weights.

The cached/uncached timings are the best of ``--repeats`` runs (the uncached arm: one run); the
machine may be shared, and other work only adds time (``--threads 1`` avoids OpenMP threads
waiting for a descheduled sibling). The last printed line is ``speculative speedup: X`` for the
chosen (draft, k): the median over the interleaved pairs of plain time / speculative time.

    python benchmarks/bench_generate.py --checkpoint runs/quickstart/stage2/step_0000040
    python benchmarks/bench_generate.py --wide20m --tokenizer runs/quickstart/data/tokenizer.json \\
        --only-speculative
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_elastic.config import ParallelConfig
from megatron_elastic.data.reasoning import generate_records, render_prompt
from megatron_elastic.data.tokenizers import load_tokenizer
from megatron_elastic.eval import greedy_generate, open_checkpoint
from megatron_elastic.eval.loading import load_eval_tokenizer
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.serving import InferenceState, ServingSession, cached_generate, forward
from megatron_elastic.serving.net import ServingNet
from megatron_elastic.serving.speculative import speculative_generate

sys.path.insert(0, str(Path(__file__).resolve().parent))


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


def wide20m(pgs):
    """The 20M parent of ``bench_train_step.py`` as an elastic checkpoint: random weights, the
    router fitted to the budget loss alone."""
    from bench_elastic_step import parent_config
    from bench_train_step import elastic_config

    from megatron_elastic.elastic import build_elastic_model
    from megatron_elastic.eval.loading import EvalCheckpoint
    from megatron_elastic.router import ElasticRouter, RouterConfig, fit_to_budgets

    torch.manual_seed(0)
    cfg, elastic = parent_config(), elastic_config()
    model = build_elastic_model(cfg, elastic, pgs).eval()
    router = ElasticRouter(cfg, elastic, RouterConfig(anneal_steps=400, lr=1e-3))
    with torch.enable_grad():
        fit_to_budgets(router, 400)
    return EvalCheckpoint(Path("wide20m"), {"kind": "elastic"}, model, cfg, router)


def cached_vs_uncached(args, ckpt, session, budgets, vocab, g) -> None:
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


def summary(xs: list[float], fmt: str) -> str:
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def matmuls(net: ServingNet, s: int) -> Callable[[], object]:
    """Every linear map of one forward over ``s`` tokens, alone (the output layer included)."""
    names = ("in_proj", "out_proj", "qkv", "proj", "fc1", "fc2")
    weights = [w for layer in net.layers for k, w in layer.weights.items() if k in names]
    weights.append(net.output)
    xs = {w.size(1): torch.randn(1, s, w.size(1)) for w in weights}
    return lambda: [xs[w.size(1)] @ w.T for w in weights]


def verification_cost(net: ServingNet, prompt: list[int], sizes: list[int], repeats: int) -> None:
    """Time of the verifier's cached forward over ``s`` tokens (marked and rolled back, as in a
    speculative round) in units of a one-token step, and the same for its matmuls alone."""
    state = InferenceState(net, 1, len(prompt) + max(sizes))
    forward(net, torch.tensor([prompt]), state, last_only=True)
    chunks = {s: torch.randint(1, net.vocab_size, (1, s)) for s in sizes}
    full: dict[int, list[float]] = {s: [] for s in sizes}
    mm: dict[int, list[float]] = {s: [] for s in sizes}
    mm_fn = {s: matmuls(net, s) for s in sizes}
    for r in range(repeats + 2):  # two warm-up rounds
        for s in sizes:
            state.mark()
            t, logits = timed(lambda s=s: forward(net, chunks[s], state))
            logits.argmax(-1).tolist()  # the host sync a verification has
            state.rollback(len(prompt))
            t_mm, _ = timed(mm_fn[s])
            if r >= 2:
                full[s].append(t)
                mm[s].append(t_mm)
    print(
        f"\nverification cost: the verifier's cached forward over s tokens after a "
        f"{len(prompt)}-token prompt, {repeats} rounds (sizes interleaved): median (and fastest), "
        "each against the one-token step's"
    )
    print("\n| s = k + 1 | forward ms | in decode steps | matmuls alone ms | matmuls in steps |")
    print("|---:|---:|---:|---:|---:|")
    for s in sizes:
        cells = []
        for times in (full, mm):
            mid, low = statistics.median(times[s]), min(times[s])
            mid_1, low_1 = statistics.median(times[1]), min(times[1])
            cells.append(f"{mid * 1e3:.2f} ({low * 1e3:.2f})")
            cells.append(f"{mid / mid_1:.2f} ({low / low_1:.2f})")
        print(f"| {s} | {' | '.join(cells)} |")


def speculative(args, ckpt, session, budgets, tokenizer) -> None:
    vocab = tokenizer.vocab_size
    verifier = args.verifier or budgets[0]
    drafts = [b for b in budgets if ckpt.params(b) < ckpt.params(verifier)]
    records = generate_records(args.num_prompts, seed=2026)
    prompts = [tokenizer.encode(render_prompt(r)) for r in records]
    new = args.spec_new_tokens
    v_net = session.net(verifier)
    ks = [int(x) for x in args.draft_tokens.split(",")]
    verification_cost(v_net, prompts[0], sorted({1, *(k + 1 for k in ks)}), args.verify_repeats)
    if args.only_verification:
        return

    def plain_run():  # one prompt at a time, as speculative decoding runs them
        return [cached_generate(v_net, [p], max_new_tokens=new, vocab_size=vocab) for p in prompts]

    def spec_run(draft: str, k: int):
        return speculative_generate(
            v_net, session.net(draft), prompts, draft_tokens=k, max_new_tokens=new, vocab_size=vocab
        )

    def pairs(draft: str, k: int, repeats: int) -> tuple[list[float], list[float], object]:
        plain_s, spec_s, stats = [], [], None
        for i in range(repeats):  # order alternating
            if i % 2 == 0:
                t_plain, _ = timed(plain_run)
                t_spec, (out, stats) = timed(lambda: spec_run(draft, k))
            else:
                t_spec, (out, stats) = timed(lambda: spec_run(draft, k))
                t_plain, _ = timed(plain_run)
            assert out.tokens == expected, (draft, k)
            plain_s.append(t_plain)
            spec_s.append(t_spec)
        return plain_s, spec_s, stats

    _, plain = timed(plain_run)  # warm-up, and the reference tokens
    expected = [o.tokens[0] for o in plain]
    print(
        f"\nspeculative: verifier {verifier}, {len(prompts)} prompts one at a time, {new} new "
        f"tokens each (no end-of-sequence stop); every (draft, k) in {args.grid_repeats} "
        "interleaved (plain, speculative) pairs; speedup = median of the per-pair plain / "
        "speculative times (min-max)"
    )
    print("\n| draft | k | acceptance | tokens/verification | speculative s | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    grid = []
    for draft in drafts:
        for k in ks:
            plain_s, spec_s, stats = pairs(draft, k, args.grid_repeats)
            ratios = [a / b for a, b in zip(plain_s, spec_s, strict=True)]
            grid.append((statistics.median(ratios), draft, k))
            print(
                f"| {draft} | {k} | {stats.acceptance_rate:.2f} | "
                f"{stats.mean_accepted_length:.2f} | {summary(spec_s, '.3f')} | "
                f"{summary(ratios, '.2f')}x |"
            )
    _, draft, k = max(grid)  # the best median; measured again on fresh runs
    plain_s, spec_s, _ = pairs(draft, k, args.spec_repeats)
    ratios = [a / b for a, b in zip(plain_s, spec_s, strict=True)]
    tokens = len(prompts) * new
    print(
        f"\nchosen pair: draft {draft}, k={k}, verifier {verifier}; {args.spec_repeats} "
        f"fresh interleaved (plain, speculative) pairs, medians (min-max):"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="elastic checkpoint (trained)")
    parser.add_argument("--wide20m", action="store_true", help="the 20M parent, random weights")
    parser.add_argument("--tokenizer", help="default: the checkpoint's")
    parser.add_argument("--contexts", default="256,1024")
    parser.add_argument("--new-tokens", type=int, default=64, help="cached arm")
    parser.add_argument("--uncached-new-tokens", type=int, default=16)
    parser.add_argument("--spec-new-tokens", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--draft-tokens", default="1,2,3,4,6")
    parser.add_argument("--verifier", help="default: the largest trained budget")
    parser.add_argument("--repeats", type=int, default=2, help="cached arm: best of")
    parser.add_argument("--verify-repeats", type=int, default=30, help="verification cost rounds")
    parser.add_argument(
        "--grid-repeats", type=int, default=5, help="interleaved pairs per (draft, k)"
    )
    parser.add_argument(
        "--spec-repeats",
        type=int,
        default=7,
        help="fresh interleaved (plain, speculative) pairs timed for the chosen (draft, k)",
    )
    parser.add_argument(
        "--only-speculative", action="store_true", help="skip the cached vs uncached tables"
    )
    parser.add_argument(
        "--only-verification", action="store_true", help="stop after the verification cost"
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.spec_repeats < 3 or args.grid_repeats < 3:
        parser.error("--spec-repeats and --grid-repeats must be >= 3 (speedups are medians)")
    if bool(args.checkpoint) == args.wide20m:
        parser.error("give --checkpoint or --wide20m (with --tokenizer)")
    if args.wide20m and not args.tokenizer:
        parser.error("--wide20m needs --tokenizer (a tokenizer of 4,096 ids)")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.set_grad_enabled(False)
    pgs = init_process_groups(ParallelConfig())
    if args.wide20m:
        ckpt = wide20m(pgs)
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        ckpt = open_checkpoint(args.checkpoint, pgs)
        tokenizer = load_eval_tokenizer(args.tokenizer, ckpt.manifest, ckpt.model_config)
    session = ServingSession(ckpt, keep=8)
    budgets = sorted(ckpt.budgets(), key=ckpt.params, reverse=True)
    print(
        f"threads {torch.get_num_threads()}; budgets {budgets} "
        f"({', '.join(f'{ckpt.params(b):,}' for b in budgets)} params); cached arm best of "
        f"{args.repeats}"
    )
    if not args.only_speculative:
        g = torch.Generator().manual_seed(0)
        cached_vs_uncached(args, ckpt, session, budgets, tokenizer.vocab_size, g)
    speculative(args, ckpt, session, budgets, tokenizer)
    destroy_process_groups()


if __name__ == "__main__":
    main()
