"""Generation from a checkpoint at one or more budgets, in one process: what
``tools/generate.py`` runs. The weights are loaded once and each budget only switches which
slices of them run.

Decoding is cached (key/value cache of the attention layers, conv and SSM state of the Mamba
layers, sized to the budget's sub-network): each new token costs one step. A ``draft`` budget
decodes self-speculatively: the smaller budget of the same weights drafts ``draft_tokens``
tokens, the verifier budget checks them in one pass (greedy; the output is the verifier's own
greedy output) and the acceptance rate is reported. ``temperature`` / ``top_p`` / ``seed``
sample instead of greedy. ``budget_schedule`` (``think=50%,answer=full``) generates the worked
solution at one budget and, after the answer marker, the final answer at another
(:mod:`megatron_elastic.serving.schedule`). ``recompute`` recomputes the whole sequence at every
token (the reference; also the only mode for a Hugging Face directory). Generation stops at the
tokenizer's end-of-document token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

__all__ = ["check_generation", "generate_from_checkpoint"]


def check_generation(
    checkpoint: str,
    kind: str,
    budgets: list[str | float],
    trained: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    recompute: bool,
    draft: str | None,
    draft_tokens: int,
    interpolate: bool,
    budget_schedule: str | None = None,
) -> str | float | None:
    """Everything that can be refused before weights are read; returns the draft budget."""
    from megatron_elastic.budgets import parse_budgets
    from megatron_elastic.eval.loading import budget_params
    from megatron_elastic.serving import SamplingConfig

    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    SamplingConfig(temperature, top_p, seed)  # ValueError on bad values
    if recompute and (draft or temperature > 0):
        raise ValueError("--recompute is greedy and uncached; drop --draft / --temperature")
    if kind not in ("elastic", "exported") and (draft or temperature > 0):
        raise ValueError(
            f"a {kind} directory generates greedily by recomputation only; --draft and "
            "--temperature need a megatron checkpoint (elastic or exported)"
        )
    if budget_schedule is not None:
        if draft or temperature > 0 or recompute or kind != "elastic":
            raise ValueError(
                "--budget-schedule decodes greedily with the cache of an elastic checkpoint; "
                "drop --draft / --temperature / --recompute"
            )
        from megatron_elastic.serving.schedule import BudgetSchedule

        BudgetSchedule.parse(budget_schedule, trained, interpolate=interpolate)  # ValueError
    if draft is None:
        return None
    if draft_tokens <= 0:
        raise ValueError(f"--draft-tokens must be >= 1, got {draft_tokens}")
    if temperature > 0:
        raise ValueError("speculative decoding here is greedy; drop --temperature or --draft")
    if kind != "elastic":
        raise ValueError("--draft needs an elastic checkpoint (the draft is a budget of it)")
    (chosen,) = parse_budgets(draft, trained, allow_fractions=interpolate, single=True)
    params = budget_params(checkpoint, [chosen, *budgets])
    for budget in budgets:
        if params[chosen] >= params[budget]:
            raise ValueError(
                f"the draft budget {chosen} ({params[chosen]:,} params) is not smaller than the "
                f"verifier {budget} ({params[budget]:,} params); choose a smaller --draft"
            )
    return chosen


def generate_from_checkpoint(
    checkpoint: str,
    *,
    prompt: Sequence[str],
    budget: Sequence[str] | None = None,
    interpolate: bool = False,
    max_new_tokens: int = 64,
    tokenizer: str | None = None,
    draft: str | None = None,
    draft_tokens: int = 4,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    recompute: bool = False,
    budget_schedule: str | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Generate from every prompt of ``prompt`` (``\\n`` in one is a newline) at each of
    ``budget`` (names, ``all``, comma lists, or with ``interpolate`` fractions between trained
    budgets; default all; an exported checkpoint runs its own budget), logging each budget's
    header line and each completion. Bad input: ``ValueError`` before any weight is read."""
    from megatron_elastic.budgets import parse_budgets
    from megatron_elastic.checkpoint import manifest_model, read_manifest
    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.eval import greedy_generate, open_checkpoint
    from megatron_elastic.eval.loading import checkpoint_budgets, load_eval_tokenizer
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups
    from megatron_elastic.serving import (
        SamplingConfig,
        ServingSession,
        cached_generate,
        check_lengths,
    )
    from megatron_elastic.serving.speculative import speculative_generate

    prompts = [p.replace("\\n", "\n") for p in prompt]  # shells pass newlines awkwardly
    kind, trained = checkpoint_budgets(checkpoint)
    if budget_schedule is not None and budget:
        raise ValueError("--budget-schedule names the budgets; drop --budget")
    budgets = parse_budgets(
        budget or "all", trained, allow_fractions=kind == "elastic", interpolate=interpolate
    )
    draft_budget = check_generation(
        checkpoint,
        kind,
        budgets,
        trained,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        recompute=recompute,
        draft=draft,
        draft_tokens=draft_tokens,
        interpolate=interpolate,
        budget_schedule=budget_schedule,
    )
    manifest = read_manifest(checkpoint)
    model_cfg = manifest_model(manifest)
    tok = load_eval_tokenizer(tokenizer, manifest, model_cfg)
    ids = [tok.encode(p) for p in prompts]
    if any(not i for i in ids):
        raise ValueError("a prompt is empty; give each --prompt some text")
    check_lengths(ids, max_new_tokens, model_cfg.max_sequence_length)
    sampling = SamplingConfig(temperature, top_p, seed)

    pgs = init_process_groups(ParallelConfig())
    ckpt = open_checkpoint(checkpoint, pgs)
    cached = kind in ("elastic", "exported") and not recompute
    session = ServingSession(ckpt) if cached else None
    common = {"max_new_tokens": max_new_tokens, "eos_id": tok.eod, "vocab_size": tok.vocab_size}
    if budget_schedule is not None:
        budgets = []
        _scheduled(session, budget_schedule, trained, interpolate, tok, prompts, ids, common, log)
    for b in budgets:
        start, note = time.perf_counter(), ""
        if not cached:
            ckpt.set_budget(b)
            out = greedy_generate(
                ckpt.model, ids, max_sequence_length=model_cfg.max_sequence_length, **common
            )
        elif draft_budget is None:
            out = cached_generate(session.net(b), ids, sampling=sampling, **common)
        else:
            out, stats = speculative_generate(
                session.net(b), session.net(draft_budget), ids, draft_tokens=draft_tokens, **common
            )
            note = (
                f"; draft {draft_budget}, k={draft_tokens}: acceptance "
                f"{stats.acceptance_rate:.2f}, {stats.mean_accepted_length:.2f} tokens per "
                "verification"
            )
        seconds = time.perf_counter() - start
        produced = sum(len(t) for t in out.tokens)
        interpolated = "" if isinstance(b, str) else " (router interpolation: untrained)"
        log(
            f"=== budget {b}: {ckpt.params(b):,} params{interpolated}; "
            f"{produced} tokens in {seconds:.2f} s{note} ==="
        )
        for i, (text, tokens, stopped) in enumerate(
            zip(prompts, out.tokens, out.stopped, strict=True)
        ):
            end = "[end of document]" if stopped else f"[{len(tokens)} tokens, limit]"
            log(f"--- prompt {i}: {text!r}")
            log(f"{tok.decode(tokens)}\n{end}")
    destroy_process_groups()


def _scheduled(session, text, trained, interpolate, tok, prompts, ids, common, log) -> None:
    from megatron_elastic.serving.schedule import BudgetSchedule, scheduled_generate

    schedule = BudgetSchedule.parse(text, trained, interpolate=interpolate)
    start = time.perf_counter()
    result = scheduled_generate(session, schedule, ids, decode=tok.decode, **common)
    seconds = time.perf_counter() - start
    out = result.generation
    produced, thought = sum(len(t) for t in out.tokens), sum(result.thinking)
    log(
        f"=== budget schedule think={schedule.think}, answer={schedule.answer}: {produced} "
        f"tokens in {seconds:.2f} s ({thought} thinking at {schedule.think}, "
        f"{produced - thought} answering at {schedule.answer}) ==="
    )
    for i, (text_i, tokens, stopped) in enumerate(
        zip(prompts, out.tokens, out.stopped, strict=True)
    ):
        end = "[end of document]" if stopped else f"[{len(tokens)} tokens, limit]"
        log(f"--- prompt {i}: {text_i!r}")
        log(f"{tok.decode(tokens)}\n{end}")
