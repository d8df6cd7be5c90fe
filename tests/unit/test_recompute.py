"""Activation recomputation changes memory, not numbers: the same loss and gradients bit for bit,
also when later micro-batches have switched the elastic model to other sub-networks before
backward (1F1B); partial (block) recomputation too."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from megatron_elastic.elastic import SubnetSpec, build_elastic_model
from megatron_elastic.elastic.config import ElasticConfig
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.model.builder import Recompute
from megatron_elastic.training.lm_step import position_ids_like

ELASTIC = ElasticConfig(budgets={"full": 1.0, "half": 0.5}, ffn_nesting_blocks=2)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss(model, tokens):
    return model(tokens, position_ids_like(tokens), None, labels=tokens).mean()


def test_invariant_plain_parent_recompute_gives_the_same_gradients(small_config, pgs) -> None:
    torch.manual_seed(0)
    plain = build_hybrid_model(small_config, pgs)
    again = build_hybrid_model(small_config, pgs, recompute=True)
    again.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, small_config.vocab_size, (2, 32))
    a, b = _loss(plain, tokens), _loss(again, tokens)
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    ga, gb = _grads(plain), _grads(again)
    assert ga.keys() == gb.keys() and ga
    for name in ga:  # the recomputation repeats the same ops on the same inputs: bitwise
        assert torch.equal(ga[name], gb[name]), name


def test_invariant_elastic_recompute_uses_each_micro_batch_own_subnet(small_config, pgs) -> None:
    torch.manual_seed(0)
    ref = build_elastic_model(small_config, ELASTIC, pgs)
    rec = build_elastic_model(small_config, ELASTIC, pgs, recompute=True)
    rec.load_state_dict(ref.state_dict())
    small = SubnetSpec.homogeneous(
        small_config, hidden=48, attention_heads=2, mamba_heads=2, ffn=64
    )
    tokens = torch.randint(0, small_config.vocab_size, (2, 32))
    # Reference: forward + backward of the small sub-network.
    ref.set_subnet(small)
    _loss(ref, tokens).backward()
    # Recompute: forward the small sub-network, then another micro-batch switches the model to
    # the full network before the first one's backward (as the 1F1B schedule does).
    rec.set_subnet(small)
    loss = _loss(rec, tokens)
    rec.set_subnet(None)
    loss.backward()
    ga, gb = _grads(ref), _grads(rec)
    assert ga.keys() == gb.keys() and ga
    for name in ga:  # the recomputation repeats the same ops on the same inputs: bitwise
        assert torch.equal(ga[name], gb[name]), name


def _forward_counts(model) -> list[int]:
    """Per layer of the stack, how many times its forward ran (recomputation runs it again)."""
    counts = [0] * len(model.decoder.layers)

    def count(i: int) -> None:
        counts[i] += 1

    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: count(i))
    return counts


def test_invariant_partial_block_recompute_gives_the_same_gradients(small_config, pgs) -> None:
    """megatron's block method: only the first N layers are recomputed; the same loss and
    gradients bit for bit as without recomputation, for the parent and an elastic sub-network."""
    torch.manual_seed(0)
    block = Recompute("full", "block", 2)
    tokens = torch.randint(0, small_config.vocab_size, (2, 32))
    for build in (build_hybrid_model, partial(build_elastic_model, elastic=ELASTIC)):
        plain = build(model=small_config, pgs=pgs)
        part = build(model=small_config, pgs=pgs, recompute=block)
        part.load_state_dict(plain.state_dict())
        if hasattr(part, "set_subnet"):
            spec = SubnetSpec.homogeneous(small_config, hidden=48, ffn=64, attention_heads=2)
            plain.set_subnet(spec)
            part.set_subnet(spec)
        counts = _forward_counts(part)
        a, b = _loss(plain, tokens), _loss(part, tokens)
        a.backward()
        b.backward()
        assert counts == [2, 2] + [1] * (len(counts) - 2)  # the first 2 layers ran again
        assert torch.equal(a, b)
        ga, gb = _grads(plain), _grads(part)
        assert ga.keys() == gb.keys() and ga
        for name in ga:
            assert torch.equal(ga[name], gb[name]), name


def test_recompute_settings_are_validated() -> None:
    assert Recompute.of(True) == Recompute("full", "uniform", 1)
    assert Recompute("full").layers(5) == 5 and Recompute("full", "block", 2).layers(5) == 2
    assert Recompute("selective").layers(5) == 0 and Recompute().layers(5) == 0
    with pytest.raises(ValueError, match="recompute_granularity"):
        Recompute("some")
    with pytest.raises(ValueError, match="recompute_num_layers=2 with recompute_method=uniform"):
        Recompute("full", "uniform", 2)
    with pytest.raises(ValueError, match="apply to recompute_granularity=full only"):
        Recompute("selective", num_layers=1)
    with pytest.raises(ValueError, match="recompute_method"):
        Recompute("full", "every")


def test_selective_recompute_is_refused_where_megatron_cannot_run_it(small_config, pgs) -> None:
    """megatron's selective recomputation checkpoints the core attention with its CUDA-RNG
    checkpoint (tensor_parallel.checkpoint): on CPU it would fail in the first backward. The
    elastic attention runs its sub-network's core attention itself: selective would not reach
    it (silently full memory), so it is refused on any device."""
    with pytest.raises(ValueError, match="selective runs megatron's CUDA-RNG checkpoint"):
        build_hybrid_model(small_config, pgs, recompute=Recompute("selective"))
    with pytest.raises(ValueError, match="selective: the elastic attention"):
        build_elastic_model(small_config, ELASTIC, pgs, recompute=Recompute("selective"))
