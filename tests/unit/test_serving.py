"""Serving every budget from one checkpoint (DESIGN invariant 10): cached decoding equals full
recomputation (logits <= 3e-6, greedy tokens identical) at every budget, homogeneous and
heterogeneous, without attention, and across budget switches; self-speculative decoding equals
the verifier's greedy output; a rolled-back state equals the state of the accepted prefix; the
generate CLI's speculative mode and its bad-input errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_elastic.data.reasoning import generate_records, render_text
from megatron_elastic.data.tokenizers import train_bpe_tokenizer
from megatron_elastic.elastic import SubnetSpec
from megatron_elastic.eval import greedy_generate, open_checkpoint
from megatron_elastic.serving import (
    InferenceState,
    SamplingConfig,
    ServingSession,
    build_serving_net,
    cached_generate,
    forward,
)
from megatron_elastic.serving.schedule import BudgetSchedule, scheduled_generate
from megatron_elastic.serving.speculative import speculative_generate
from megatron_elastic.training.lm_step import position_ids_like

ROOT = Path(__file__).parents[2]
NEW = 12
# Cached decoding splits the sequence differently (chunked scan vs the one-step recurrence, one
# query row vs all): fp32 summation order only. Measured worst 1.12e-6 over every spec below
# (logit scale 1.4-1.7), 6.9e-7 after a rollback; DESIGN allows 1e-4, this is ~2.7x.
LOGITS_TOL = 3e-6


@pytest.fixture(scope="module")
def loaded(perturbed_checkpoint, pgs):
    return open_checkpoint(perturbed_checkpoint[0], pgs)


def _no_attention(cfg) -> SubnetSpec:
    """Depth 8 of 10 dropping both attention layers (3 and 8), narrower everywhere else."""
    ranking = [0, 1, 2, 4, 5, 6, 7, 9, 3, 8]
    return SubnetSpec.homogeneous(
        cfg, hidden=192, mamba_heads=6, mamba_head_dim=24, ffn=512, depth=8, layer_ranking=ranking
    )


def _specs(loaded, heterogeneous) -> dict[str, SubnetSpec | None]:
    cfg = loaded.model_config
    specs: dict[str, SubnetSpec | None] = {"parent": None}
    specs.update({name: loaded.spec(name) for name in loaded.budgets()})
    specs["heterogeneous"] = heterogeneous(cfg)
    specs["no_attention"] = _no_attention(cfg)
    return specs


def _prompts(lengths=(5, 17, 1), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 4096, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["parent", "full", "75%", "50%", "heterogeneous", "no_attention"])
def test_invariant_cached_equals_full_recompute(loaded, tiny_heterogeneous_spec, name) -> None:
    spec = _specs(loaded, tiny_heterogeneous_spec)[name]
    model, cfg = loaded.model, loaded.model_config
    net = build_serving_net(model, cfg, spec)
    if name == "no_attention":
        assert {layer.kind for layer in net.layers} == {"mamba", "mlp"}
    model.set_subnet(spec, mode="slice")
    try:
        # logits: a long prefill (chunked scan over several chunks), single steps, a short
        # chunk (the recurrence) and another long chunk that follows a carried-in state
        tokens = torch.randint(
            0, cfg.vocab_size, (2, 230), generator=torch.Generator().manual_seed(1)
        )
        with torch.no_grad():
            ref = model(tokens, position_ids_like(tokens), None)
        state = InferenceState(net, 2, 240)
        pieces = [forward(net, tokens[:, :130], state)]
        pieces += [forward(net, tokens[:, t : t + 1], state) for t in range(130, 136)]
        pieces += [forward(net, tokens[:, 136:141], state), forward(net, tokens[:, 141:], state)]
        assert state.lengths == [230, 230]
        assert (torch.cat(pieces, 1) - ref).abs().max().item() <= LOGITS_TOL
        # tokens: batched prompts of different lengths, with an end-of-sequence id
        prompts = _prompts()
        expected = greedy_generate(model, prompts, max_new_tokens=NEW)
        assert cached_generate(net, prompts, max_new_tokens=NEW) == expected
        eos = expected.tokens[0][3]
        expected = greedy_generate(model, prompts, max_new_tokens=NEW, eos_id=eos)
        got = cached_generate(net, prompts, max_new_tokens=NEW, eos_id=eos, stop_check_interval=1)
        assert got == expected and got.stopped[0]
    finally:
        model.set_subnet(None)


def test_invariant_cached_equals_recompute_across_budget_switches(loaded) -> None:
    session, prompts = ServingSession(loaded), _prompts((9, 4))
    for budget in ["50%", "full", "50%", "75%", "full"]:
        got = cached_generate(session.net(budget), prompts, max_new_tokens=NEW)
        loaded.set_budget(budget)
        assert got == greedy_generate(loaded.model, prompts, max_new_tokens=NEW), budget
        assert len(session._nets) <= session.keep
    loaded.model.set_subnet(None)
    # the full budget decodes from views of the loaded parameters: no copy
    full = session.net("full")
    assert full.embedding.data_ptr() == loaded.model.embedding.word_embeddings.weight.data_ptr()


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(loaded) -> None:
    net, prompts = build_serving_net(loaded.model, loaded.model_config), _prompts((6, 3))
    hot = SamplingConfig(temperature=1.5, seed=7)
    a = cached_generate(net, prompts, max_new_tokens=NEW, sampling=hot)
    assert a == cached_generate(net, prompts, max_new_tokens=NEW, sampling=hot)
    other = cached_generate(net, prompts, max_new_tokens=NEW, sampling=SamplingConfig(1.5, seed=8))
    assert other != a
    greedy = cached_generate(net, prompts, max_new_tokens=NEW)
    narrow = SamplingConfig(temperature=1.0, top_p=1e-6, seed=3)
    assert cached_generate(net, prompts, max_new_tokens=NEW, sampling=narrow) == greedy
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


@pytest.mark.parametrize("k", [1, 3, 50])
def test_invariant_speculative_equals_verifier_greedy(loaded, k) -> None:
    session, prompts = ServingSession(loaded, keep=4), _prompts((1, 20))
    verifier = session.net("full")
    expected = cached_generate(verifier, prompts, max_new_tokens=NEW)
    drafts = [
        session.net("50%"),
        session.net("75%"),
        build_serving_net(loaded.model, loaded.model_config, _no_attention(loaded.model_config)),
    ]
    for draft in drafts:
        got, stats = speculative_generate(
            verifier, draft, prompts, draft_tokens=k, max_new_tokens=NEW
        )
        assert got == expected
        assert stats.generated == NEW * len(prompts) and stats.accepted <= stats.proposed
        assert stats.proposed <= k * stats.passes
    # the verifier drafting for itself: every proposal accepted, k + 1 tokens per pass
    got, stats = speculative_generate(
        verifier, verifier, prompts, draft_tokens=k, max_new_tokens=NEW
    )
    assert got == expected and stats.acceptance_rate == 1.0
    assert stats.passes == sum(-(-NEW // (min(k, NEW - 1) + 1)) for _ in prompts)


def test_invariant_speculative_with_a_draft_rejected_at_every_step(loaded) -> None:
    session, prompts = ServingSession(loaded), _prompts((4, 11))
    vocab = loaded.model_config.vocab_size - 1  # the verifier never picks the last id ...
    verifier, draft = session.net("full"), session.net("50%")
    expected = cached_generate(verifier, prompts, max_new_tokens=NEW, vocab_size=vocab)

    def contrary(logits: torch.Tensor) -> torch.Tensor:  # ... which the draft always proposes
        return torch.full(logits.shape[:1], vocab, dtype=torch.long)

    got, stats = speculative_generate(
        verifier,
        draft,
        prompts,
        draft_tokens=3,
        max_new_tokens=NEW,
        vocab_size=vocab,
        propose=contrary,
    )
    assert got == expected
    assert stats.accepted == 0 and stats.passes == NEW * len(prompts) and stats.proposed > 0


@pytest.mark.parametrize("budget", ["full", "50%"])
def test_invariant_rollback_equals_the_state_of_the_accepted_prefix(loaded, budget) -> None:
    net = ServingSession(loaded).net(budget)
    tokens = torch.randint(0, 4096, (1, 40), generator=torch.Generator().manual_seed(5))
    rolled, direct = InferenceState(net, 1, 64), InferenceState(net, 1, 64)
    forward(net, tokens[:, :30], rolled)
    rolled.mark()
    forward(net, tokens[:, 30:33], rolled)  # several forwards since the mark, then rejected
    forward(net, tokens[:, 33:34], rolled)
    forward(net, tokens[:, 34:38], rolled)
    rolled.rollback(32)  # keep 2 of the 8 tokens fed since the mark
    forward(net, tokens[:, :32], direct)
    assert rolled.lengths == direct.lengths == [32]
    for index, cache in direct.layers.items():
        other = rolled.layers[index]
        if hasattr(cache, "ssm"):
            assert torch.allclose(other.conv, cache.conv, atol=1e-6)
            assert torch.allclose(other.ssm, cache.ssm, atol=1e-5)
        else:
            assert torch.allclose(other.key[:, :32], cache.key[:, :32], atol=1e-5)
            assert torch.allclose(other.value[:, :32], cache.value[:, :32], atol=1e-5)
    # and the next tokens see the same past
    after = forward(net, tokens[:, 32:40], rolled)
    assert (after - forward(net, tokens[:, 32:40], direct)).abs().max().item() <= LOGITS_TOL
    with pytest.raises(ValueError, match="roll back"):
        rolled.mark()
        rolled.rollback(39)


@pytest.mark.parametrize("budget", ["full", "50%"])
def test_invariant_verification_chunk_rolls_back_to_the_accepted_tokens(loaded, budget) -> None:
    """A speculative verification feeds k + 1 tokens as one chunk (attention over the cache and
    the chunk; the Mamba chunk returns the state after every token); rolling back to any accepted
    prefix gives the state a cached forward over only those tokens computes."""
    net = ServingSession(loaded).net(budget)
    k = 4
    tokens = torch.randint(0, 4096, (1, 30 + k + 1), generator=torch.Generator().manual_seed(9))
    prompt, chunk = tokens[:, :30], tokens[:, 30:]
    worst = 0.0
    for m in range(k + 2):  # m of the k + 1 chunk tokens accepted (0: all rejected)
        rolled, direct = InferenceState(net, 1, 40), InferenceState(net, 1, 40)
        forward(net, prompt, rolled)
        forward(net, prompt, direct)
        rolled.mark()
        forward(net, chunk, rolled)  # one pass over the k + 1 tokens
        rolled.rollback(30 + m)
        if m:
            forward(net, chunk[:, :m], direct)  # the accepted tokens alone
        assert rolled.lengths == direct.lengths == [30 + m]
        for index, cache in direct.layers.items():
            other = rolled.layers[index]
            if hasattr(cache, "ssm"):
                pairs = [(other.conv, cache.conv), (other.ssm, cache.ssm)]
            else:
                pairs = [(other.key[:, : 30 + m], cache.key[:, : 30 + m])]
                pairs.append((other.value[:, : 30 + m], cache.value[:, : 30 + m]))
            for a, b in pairs:
                assert a.shape == b.shape
                worst = max(worst, (a - b).abs().max().item())
        nxt = tokens[:, 30:31] if m == 0 else chunk[:, m - 1 : m]  # any next token will do
        step = forward(net, nxt, rolled) - forward(net, nxt, direct)
        assert step.abs().max().item() <= LOGITS_TOL
    # the chunk's matmuls run at other row counts than the prefix's (BLAS kernels per shape):
    # measured worst 9.5e-7 (full) and 7.5e-7 (50%)
    assert worst <= 1e-5


def _by_hand(session, schedule, prompt, decode, new):
    """The thinking generated alone at the think budget, cut after the first token that
    completes the marker; then the answer generated alone at the answer budget."""
    think = cached_generate(session.net(schedule.think), [prompt], max_new_tokens=new).tokens[0]
    cut = next(
        (j + 1 for j in range(len(think)) if schedule.marker in decode(think[: j + 1])), None
    )
    if cut is None or cut == new:
        return think, len(think)
    answer = cached_generate(
        session.net(schedule.answer), [prompt + think[:cut]], max_new_tokens=new - cut
    )
    return think[:cut] + answer.tokens[0], cut


def test_invariant_budget_schedule_equals_thinking_and_answer_by_hand(loaded) -> None:
    session, prompts = ServingSession(loaded), _prompts((6, 13))

    def decode(ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)

    # a marker the 50% budget writes after a few tokens of the first prompt's thinking
    thought = cached_generate(session.net("50%"), prompts[:1], max_new_tokens=NEW).tokens[0]
    changed = 0
    for marker, think, answer in [
        (f"<{thought[4]}>", "50%", "full"),
        (f"<{thought[2]}>", "50%", "75%"),
        ("<never>", "full", "50%"),  # no marker: all thinking
    ]:
        schedule = BudgetSchedule(think, answer, marker=marker)
        got = scheduled_generate(session, schedule, prompts, decode=decode, max_new_tokens=NEW)
        for i, prompt in enumerate(prompts):
            expected, cut = _by_hand(session, schedule, prompt, decode, NEW)
            assert got.generation.tokens[i] == expected and got.thinking[i] == cut
            assert len(expected) == NEW and not got.generation.stopped[i]
            alone = cached_generate(session.net(think), [prompt], max_new_tokens=NEW).tokens[0]
            changed += expected != alone
    assert changed  # the answer budget did change some completion: the comparison has teeth
    assert got.thinking == [NEW, NEW]


def test_budget_schedule_parse_errors(loaded) -> None:
    trained = loaded.budgets()
    schedule = BudgetSchedule.parse(" think=50% , answer=full", trained)
    assert (schedule.think, schedule.answer, schedule.marker) == ("50%", "full", "####")
    assert BudgetSchedule.parse("answer=75%,think=0.6", trained).think == 0.6
    cases = [
        ("think=50%", "no 'answer' phase"),
        ("think=50%,answer=full,think=75%", "phase 'think' is given twice"),
        ("think=50%,reply=full", "unknown phase 'reply'"),
        ("think=50%,answer", "is not phase=budget"),
        ("think=50%,answer=", "is not phase=budget"),
        ("think=40B,answer=full", "unknown budget '40B'"),
    ]
    for text, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            BudgetSchedule.parse(text, trained)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="pass --interpolate"):
        BudgetSchedule.parse("think=0.6,answer=full", trained, interpolate=False)


# -- the CLI ---------------------------------------------------------------------------------


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serving_tok") / "tokenizer.json"
    train_bpe_tokenizer([render_text(r) for r in generate_records(30, seed=3)], 300, path)
    return path


def test_invariant_generate_cli_speculative_equals_plain(
    perturbed_checkpoint, tokenizer_path, run_cli
):
    # a fresh process: the tool creates and destroys its own process groups
    args = ["--checkpoint", str(perturbed_checkpoint[0]), "--tokenizer", str(tokenizer_path)]
    args += ["--prompt", "Question: What is 2 + 3?\\nAnswer:", "--max-new-tokens", "10"]
    plain, spec, scheduled = run_cli(
        [
            ("tools/generate.py", [*args, "--budget", "full"]),
            (
                "tools/generate.py",
                [*args, "--budget", "full", "--draft", "50%", "--draft-tokens", "3"],
            ),
            ("tools/generate.py", [*args, "--budget-schedule", "think=50%,answer=full"]),
        ]
    )
    assert plain["rc"] == spec["rc"] == scheduled["rc"] == 0, (plain["stderr"], spec["stderr"])
    assert "=== budget schedule think=50%, answer=full: 10 tokens" in scheduled["stdout"]
    assert "draft 50%, k=3: acceptance" in spec["stdout"]
    assert plain["stdout"].split("===")[2] == spec["stdout"].split("===")[2]  # same text


def test_generate_cli_bad_input(perturbed_checkpoint, tokenizer_path, capsys) -> None:
    generate = _tool("generate")
    args = ["--checkpoint", str(perturbed_checkpoint[0]), "--tokenizer", str(tokenizer_path)]
    args += ["--prompt", "Question:"]
    cases = [
        (["--budget", "50%", "--draft", "full"], "is not smaller than the verifier 50%"),
        (["--budget", "full", "--draft", "full"], "choose a smaller --draft"),
        (["--budget", "0.6"], "pass --interpolate"),
        (["--budget", "full", "--draft", "0.6"], "unknown budget '0.6'"),
        (
            ["--budget", "full", "--draft", "50%", "--draft-tokens", "0"],
            "--draft-tokens must be >= 1",
        ),
        (["--budget", "full", "--max-new-tokens", "10", "--prompt", "7 " * 1100], "longer than"),
        (["--budget", "full", "--temperature", "-1"], "temperature must be >= 0"),
        (["--budget-schedule", "think=50%"], "no 'answer' phase"),
        (["--budget", "full", "--budget-schedule", "think=50%,answer=full"], "drop --budget"),
        (
            ["--budget-schedule", "think=50%,answer=full", "--draft", "50%"],
            "--budget-schedule decodes greedily",
        ),
    ]
    for extra, message in cases:
        assert generate.main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (extra, err)
