"""The ModelOpt (Minitron) importance backend: the pure conversion of ModelOpt's per-hparam results
into our ranking, the rank correlation used to compare backends, the CLI's errors where ModelOpt
cannot run, and (GPU only) the real ModelOpt run against the native backend."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_elastic.elastic import ElasticConfig, build_elastic_model
from megatron_elastic.importance.estimate import estimate_importance, rank_model
from megatron_elastic.importance.modelopt_backend import (
    minitron_scores_from_model,
    modelopt_available,
    ranking_from_modelopt,
    run_minitron_importance,
    te_state_dict,
)
from megatron_elastic.importance.rank_correlation import (
    kendall_tau,
    ranking_agreement,
    spearman_rho,
)
from megatron_elastic.importance.scores import Ranking
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.training.lm_step import position_ids_like

ROOT = Path(__file__).parents[2]
TOOL = ROOT / "tools" / "estimate_importance.py"

# small_config (tests/fixtures/hybrid_small.yaml): pattern "M-*M-*", hidden 64, FFN 128,
# 4 attention heads in 2 query groups, 4 Mamba heads x 16 in 2 groups.
MLP, ATTENTION, MAMBA = [1, 4], [2, 5], [0, 3]


def _hidden_importance() -> torch.Tensor:
    imp = torch.tensor([float((i * 37) % 64) for i in range(64)])
    imp[9] = imp[5]  # a tie: index order decides
    return imp


def _known_scores() -> dict:
    """ModelOpt-shaped results for small_config, and the ranking they must give."""
    ffn = {j: torch.randperm(128, generator=torch.Generator().manual_seed(j)).float() for j in MLP}
    return {
        "hidden_size": _hidden_importance(),
        "ffn_hidden_size": ffn,
        # group 0 ranks heads [1, 0]; group 1 ranks its heads 3, 2 -> local [1, 0]
        "num_attention_heads": {2: torch.tensor([1, 0, 3, 2]), 5: torch.tensor([0, 1, 2, 3])},
        "mamba_num_heads": {0: torch.tensor([1, 0, 2, 3]), 3: torch.tensor([0, 1, 3, 2])},
        "mamba_head_dim": {0: torch.arange(16).flip(0), 3: torch.arange(16)},
        "num_layers": {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.1, 5: 0.3, 6: 0.7},
    }


def test_ranking_from_modelopt_known_answer(small_config) -> None:
    scores = _known_scores()
    ranking = ranking_from_modelopt(small_config, scores)
    hidden = _hidden_importance().tolist()
    assert ranking.hidden == sorted(range(64), key=lambda i: (-hidden[i], i))
    assert ranking.hidden.index(5) < ranking.hidden.index(9)
    for j in MLP:
        imp = scores["ffn_hidden_size"][j].tolist()
        assert ranking.orders["ffn"][j] == sorted(range(128), key=lambda i: -imp[i])
    assert ranking.orders["attention_heads"] == {2: [[1, 0], [1, 0]], 5: [[0, 1], [0, 1]]}
    assert ranking.orders["mamba_heads"] == {0: [[1, 0], [0, 1]], 3: [[0, 1], [1, 0]]}
    assert ranking.orders["mamba_head_dim"] == {0: list(range(15, -1, -1)), 3: list(range(16))}
    # cosine scores best first; the 0.1 tie keeps layer 2 before layer 4 (1-based numbers)
    assert ranking.layers == [2, 5, 0, 4, 1, 3]
    assert ranking.scores["backend"] == "modelopt"
    assert ranking.scores["layer_cosine"]["2"] == pytest.approx(0.9)
    json.dumps(ranking.to_json())  # serialisable like the native ranking


@pytest.mark.parametrize(
    "key,layer,value,match",
    [
        ("num_attention_heads", 2, torch.tensor([2, 0, 1, 3]), "across groups"),
        ("mamba_num_heads", 3, torch.tensor([0, 3, 1, 2]), "across groups"),
        ("mamba_head_dim", 0, torch.rand(16), "not an order"),
        ("num_attention_heads", 5, torch.tensor([0, 0, 1, 2]), "not an order"),
        ("ffn_hidden_size", 1, torch.rand(64), "64 entries, expected 128"),
    ],
)
def test_ranking_from_modelopt_rejects_bad_orders(small_config, key, layer, value, match) -> None:
    scores = _known_scores()
    scores[key][layer] = value
    with pytest.raises(ValueError, match=match):
        ranking_from_modelopt(small_config, scores)


def test_ranking_from_modelopt_needs_every_layer(small_config) -> None:
    scores = _known_scores()
    del scores["ffn_hidden_size"][4]
    with pytest.raises(ValueError, match=r"ffn_hidden_size: scores for layers \[1\]"):
        ranking_from_modelopt(small_config, scores)
    scores = _known_scores()
    scores["num_layers"] = {k - 1: v for k, v in scores["num_layers"].items()}  # 0-based: wrong
    with pytest.raises(ValueError, match="layer numbers"):
        ranking_from_modelopt(small_config, scores)
    scores = _known_scores()
    del scores["num_layers"]
    assert ranking_from_modelopt(small_config, scores).layers is None


def test_invariant_modelopt_ranking_permutes_the_model_exactly(pgs, small_config) -> None:
    """A ranking converted from ModelOpt drives our permutation; the function is unchanged
    (norms and Mamba's D off their init value of 1, so a weight left unpermuted shows). Measured
    3.3e-7 (logit scale 0.64); bound 1e-6."""
    torch.manual_seed(11)
    model = build_elastic_model(small_config, ElasticConfig(budgets={"full": 1.0}), pgs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", ".D")):
                p.uniform_(0.5, 1.5)
    tokens = torch.randint(0, small_config.vocab_size, (2, 24))
    with torch.no_grad():
        before = model(tokens, position_ids_like(tokens), None)
        rank_model(model, ranking_from_modelopt(small_config, _known_scores()), pgs)
        after = model(tokens, position_ids_like(tokens), None)
    assert (before - after).abs().max().item() <= 1e-6


class _FakeHparam:
    def __init__(self, value: torch.Tensor, configurable: bool = True) -> None:
        self.importance, self.is_configurable, self.max = value, configurable, len(value)


class _FakeDynamicModule:
    def __init__(self, **hparams: _FakeHparam) -> None:
        self._hparams = hparams

    def get_hparam(self, name: str) -> _FakeHparam:
        return self._hparams[name]


def _fake_converted_model(cfg, known: dict, *, frozen_ffn: bool = False):
    """Stands in for a model after ModelOpt's conversion and forward loop: per layer kind the
    dynamic module with its hparams; attention heads frozen (one choice)."""
    layers = []
    for j, kind in enumerate(cfg.layer_kinds()):
        layer = SimpleNamespace(layer_number=j + 1)
        if kind == "mlp":
            ffn = _FakeHparam(known["ffn_hidden_size"][j], configurable=not frozen_ffn)
            layer.mlp = _FakeDynamicModule(ffn_hidden_size=ffn)
        elif kind == "attention":
            frozen = _FakeHparam(torch.full((4,), float("nan")), configurable=False)
            layer.self_attention = _FakeDynamicModule(num_attention_heads=frozen)
        else:
            layer.mixer = _FakeDynamicModule(
                mamba_num_heads=_FakeHparam(known["mamba_num_heads"][j]),
                mamba_head_dim=_FakeHparam(known["mamba_head_dim"][j]),
            )
        layers.append(layer)
    model = _FakeDynamicModule(hidden_size=_FakeHparam(known["hidden_size"]))
    model.decoder = SimpleNamespace(layers=layers)
    return model


def _axis(ranking: Ranking, key: str):
    """The ranking's orders under their ranking-file key (``mamba_channels``: head channels)."""
    if key in ("hidden", "layers"):
        return getattr(ranking, key)
    return ranking.orders["mamba_head_dim" if key == "mamba_channels" else key]


def test_scores_are_read_per_layer_kind(small_config) -> None:
    """minitron_scores_from_model reads each layer's hparams by kind and layer number; a head
    hparam with one choice (not configurable) gives the identity order."""
    known = _known_scores()
    model = _fake_converted_model(small_config, known)
    scores = minitron_scores_from_model(model, small_config, known["num_layers"])
    ranking = ranking_from_modelopt(small_config, scores)
    expected = ranking_from_modelopt(small_config, known)
    assert ranking.orders["attention_heads"] == {2: [[0, 1], [0, 1]], 5: [[0, 1], [0, 1]]}
    for axis in ("hidden", "ffn", "mamba_heads", "mamba_channels", "layers"):
        assert _axis(ranking, axis) == _axis(expected, axis), axis


def test_a_fixed_width_hparam_is_an_error(small_config) -> None:
    known = _known_scores()
    model = _fake_converted_model(small_config, known, frozen_ffn=True)
    with pytest.raises(RuntimeError, match="left ffn_hidden_size fixed at 128"):
        minitron_scores_from_model(model, small_config, known["num_layers"])


def test_te_state_dict_uses_the_checkpoint_names(pgs, small_config) -> None:
    """The local spec's norms are renamed exactly as its sharded_state_dict names them for
    Transformer Engine; every other name is kept; extra state is dropped."""
    model = build_hybrid_model(small_config, pgs)
    mapped = te_state_dict(model.state_dict())
    assert not any(k.endswith("_extra_state") for k in mapped)
    renamed = {}
    for name, entry in model.sharded_state_dict().items():
        if isinstance(entry, ShardedTensor):
            renamed[name] = entry.key
    for name, key in renamed.items():
        assert te_state_dict({name: torch.zeros(1)}) == {key: torch.zeros(1)}, name
    assert "decoder.layers.0.mixer.norm.weight" in mapped  # the Mamba gated norm is not a pre-norm
    assert "decoder.layers.0.mixer.in_proj.layer_norm_weight" in mapped


def test_a_checkpoint_source_gives_the_saved_weights(pgs, small_config, tmp_path) -> None:
    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.importance.modelopt_backend import _source_state

    torch.manual_seed(4)
    model = build_hybrid_model(small_config, pgs)
    save_checkpoint(tmp_path / "parent", model, small_config, kind="parent")
    state = _source_state(small_config, tmp_path / "parent", pgs)
    expected = model.state_dict()
    for name, tensor in te_state_dict(expected).items():
        assert torch.equal(te_state_dict(state)[name], tensor), name


# Rank correlation ---------------------------------------------------------------------------


def test_rank_correlation_extremes_and_known_values() -> None:
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0)).tolist()
    assert spearman_rho(order, order) == pytest.approx(1.0)
    assert kendall_tau(order, order) == pytest.approx(1.0)
    assert spearman_rho(order, order[::-1]) == pytest.approx(-1.0)
    assert kendall_tau(order, order[::-1]) == pytest.approx(-1.0)
    # one adjacent swap of four: sum d^2 = 2 -> rho = 1 - 12/60; 5 of 6 pairs concordant
    assert spearman_rho([0, 1, 2, 3], [1, 0, 2, 3]) == pytest.approx(0.8)
    assert kendall_tau([0, 1, 2, 3], [1, 0, 2, 3]) == pytest.approx(4 / 6)
    assert spearman_rho([10, 30, 20], [10, 20, 30]) == pytest.approx(0.5)  # any labels
    assert math.isnan(spearman_rho([3], [3])) and math.isnan(kendall_tau([], []))
    with pytest.raises(ValueError, match="same components"):
        spearman_rho([0, 1, 2], [0, 1, 3])
    with pytest.raises(ValueError, match="more than once"):
        kendall_tau([0, 0, 1], [0, 1, 0])


def test_kendall_blocks_do_not_change_the_count() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randperm(700, generator=g), torch.randperm(700, generator=g)
    assert kendall_tau(a, b, max_block=1) == pytest.approx(kendall_tau(a, b, max_block=1 << 24))


def _reversed(r: Ranking) -> Ranking:
    flip = lambda d: {j: v[::-1] for j, v in d.items()}
    grouped = lambda d: {j: [g[::-1] for g in v] for j, v in d.items()}
    return Ranking(
        hidden=r.hidden[::-1],
        orders={
            "ffn": flip(r.orders["ffn"]),
            "mamba_head_dim": flip(r.orders["mamba_head_dim"]),
            "mamba_heads": grouped(r.orders["mamba_heads"]),
            "attention_heads": grouped(r.orders["attention_heads"]),
        },
        layers=r.layers[::-1],
        scores={},
    )


def test_ranking_agreement_per_axis(small_config) -> None:
    ranking = ranking_from_modelopt(small_config, _known_scores())
    same = ranking_agreement(ranking, ranking)
    assert set(same) == {
        "hidden",
        "ffn",
        "mamba_channels",
        "mamba_heads",
        "attention_heads",
        "layers",
    }
    assert all(
        a.spearman == pytest.approx(1) and a.kendall == pytest.approx(1) for a in same.values()
    )
    assert same["ffn"].num_orders == 2 and same["attention_heads"].num_orders == 4
    opposite = ranking_agreement(ranking, _reversed(ranking))
    assert all(a.spearman == pytest.approx(-1) for a in opposite.values())
    assert all(a.min_spearman == pytest.approx(-1) for a in opposite.values())
    no_layers = _reversed(ranking)
    no_layers.layers = None
    assert "layers" not in ranking_agreement(ranking, no_layers)


# The CLI where ModelOpt cannot run ------------------------------------------------------------


def _tool_main():
    spec = importlib.util.spec_from_file_location("estimate_importance_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _cli_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--model-config",
        str(ROOT / "examples" / "tiny" / "model.yaml"),
        "--checkpoint",
        str(tmp_path / "parent"),
        "--data",
        str(tmp_path / "data"),
        "--output",
        str(tmp_path / "out"),
        "--backend",
        "modelopt",
        *extra,
    ]


@pytest.mark.skipif(modelopt_available() is None, reason="ModelOpt can run here")
def test_cli_modelopt_without_gpu_says_why(tmp_path, capsys) -> None:
    assert _tool_main()(_cli_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "GPU" in err and "transformer_engine" in err and "--backend native" in err
    assert not (tmp_path / "out").exists()


def test_cli_modelopt_is_tp1_only(tmp_path, capsys) -> None:
    assert _tool_main()(_cli_args(tmp_path, "--tensor-parallel-size", "2")) == 2
    assert "TP=1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_modelopt_unavailable_without_cuda() -> None:
    assert "no CUDA device" in modelopt_available()


# GPU: the real ModelOpt run -------------------------------------------------------------------


def _plant_importance(model, cfg, seed: int = 0) -> dict:
    """Plant a known importance order on every width axis both backends rank, each factor spread
    over 10x, and return the planted orders (most important first):
    - hidden: every pre-norm's channel i (and the final norm's);
    - FFN neurons: fc1 row i of each MLP layer;
    - Mamba channels and heads: the ``x`` rows of ``in_proj`` ([z, x, B, C, dt], x head-major),
      row (h, c) scaled by head factor h times channel factor c (the statistic both backends
      read is that segment of in_proj's output).
    Attention heads get no planted order: both backends read the same statistic (the
    ``linear_proj`` input per head), which a per-head weight scale cannot set independently of
    the shared K/V of its query group. Layers get none either: scaling each layer's output
    projection by 1e-2..1e2 did not fix the native (iterative logit NMSE) order on this
    random-weight parent (Spearman 0.4 against the planted order: early layers rank high
    whatever their scale), and ModelOpt scores depth by another metric (one-shot
    1 - cos(input, output)), so the two layer orders are compared nowhere."""
    g = torch.Generator().manual_seed(seed)

    def spread(n: int, decades: float = 1.0) -> torch.Tensor:
        return torch.logspace(-decades / 2, decades / 2, n)[torch.randperm(n, generator=g)]

    def order(f: torch.Tensor) -> list[int]:
        return sorted(range(len(f)), key=lambda i: -float(f[i]))

    kinds = cfg.layer_kinds()
    hidden = spread(cfg.hidden_size)
    inner = cfg.mamba_num_heads * cfg.mamba_head_dim
    planted: dict = {"hidden": order(hidden), "ffn": {}}
    planted.update(mamba_channels={}, mamba_heads={})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "decoder.final_norm.weight" or (
                name.startswith("decoder.layers.")
                and name.endswith("norm.weight")
                and ".mixer." not in name
            ):
                p.mul_(hidden.to(p.device))
        for j, (layer, kind) in enumerate(zip(model.decoder.layers, kinds, strict=True)):
            if kind == "mlp":
                fc1 = layer.mlp.linear_fc1.weight
                neurons = spread(cfg.ffn_hidden_size)
                fc1.mul_(neurons.to(fc1)[:, None])
                planted["ffn"][j] = order(neurons)
            elif kind == "mamba":
                heads, channels = spread(cfg.mamba_num_heads), spread(cfg.mamba_head_dim)
                x_rows = layer.mixer.in_proj.weight[inner : 2 * inner]
                x_rows.mul_((heads[:, None] * channels[None, :]).flatten()[:, None].to(x_rows))
                per_group = cfg.mamba_num_heads // cfg.mamba_num_groups
                planted["mamba_heads"][j] = [
                    order(heads[k * per_group : (k + 1) * per_group])
                    for k in range(cfg.mamba_num_groups)
                ]
                planted["mamba_channels"][j] = order(channels)
    return planted


PLANTED_AXES = ("hidden", "ffn", "mamba_channels", "mamba_heads")


def _orders(got, want, axis: str) -> list[tuple[list[int], list[int]]]:
    """(ranked, planted) pairs of one axis: one order, or one per layer (per group for heads)."""
    if axis == "hidden":
        return [(got, want)]
    pairs = []
    for j, planted in want.items():
        pairs += zip(got[j], planted, strict=True) if axis == "mamba_heads" else [(got[j], planted)]
    return pairs


def test_native_backend_finds_the_planted_importance_on_every_axis(pgs, tiny_config) -> None:
    """The planted signal of the GPU comparison below is real: the native backend (CPU) recovers
    each planted order (Spearman > 0.9 on every order of every planted axis)."""
    torch.manual_seed(0)
    model = build_elastic_model(tiny_config, ElasticConfig(budgets={"full": 1.0}), pgs)
    planted = _plant_importance(model, tiny_config)
    g = torch.Generator().manual_seed(1)
    batches = [
        {"tokens": torch.randint(0, tiny_config.vocab_size, (2, 64), generator=g)} for _ in range(2)
    ]
    native = estimate_importance(model, batches, pgs, rank_layers=False)
    for axis in PLANTED_AXES:
        for got, want in _orders(_axis(native, axis), planted[axis], axis):
            assert spearman_rho(got, want) > 0.9, (axis, got, want)


@pytest.fixture(scope="module")
def both_backends(pgs, tiny_config):
    torch.manual_seed(0)
    model = build_elastic_model(tiny_config, ElasticConfig(budgets={"full": 1.0}), pgs)
    _plant_importance(model, tiny_config)
    g = torch.Generator().manual_seed(1)
    batches = [
        {"tokens": torch.randint(0, tiny_config.vocab_size, (2, 128), generator=g).cuda()}
        for _ in range(4)
    ]
    native = estimate_importance(model, batches, pgs, rank_layers=False)
    modelopt = run_minitron_importance(tiny_config, model, batches, pgs)
    return native, modelopt


def _is_permutation(order, n: int) -> bool:
    return sorted(order) == list(range(n))


@pytest.mark.gpu
def test_modelopt_backend_ranks_every_axis(both_backends, tiny_config) -> None:
    _, ranking = both_backends
    cfg = tiny_config
    kinds = cfg.layer_kinds()
    assert _is_permutation(ranking.hidden, cfg.hidden_size)
    orders = ranking.orders
    assert sorted(orders["ffn"]) == [j for j, k in enumerate(kinds) if k == "mlp"]
    assert all(_is_permutation(o, cfg.ffn_hidden_size) for o in orders["ffn"].values())
    assert sorted(orders["mamba_head_dim"]) == [j for j, k in enumerate(kinds) if k == "mamba"]
    assert all(_is_permutation(o, cfg.mamba_head_dim) for o in orders["mamba_head_dim"].values())
    per_group = cfg.mamba_num_heads // cfg.mamba_num_groups
    for groups in orders["mamba_heads"].values():
        assert len(groups) == cfg.mamba_num_groups
        assert all(_is_permutation(g, per_group) for g in groups)
    per_query_group = cfg.num_attention_heads // cfg.num_query_groups
    assert sorted(orders["attention_heads"]) == [j for j, k in enumerate(kinds) if k == "attention"]
    for groups in orders["attention_heads"].values():
        assert len(groups) == cfg.num_query_groups
        assert all(_is_permutation(g, per_query_group) for g in groups)
    assert _is_permutation(ranking.layers, cfg.num_layers)


@pytest.mark.gpu
def test_modelopt_agrees_with_native_on_every_axis(both_backends) -> None:
    """Every width axis both backends rank (the planted ones, and attention heads, where both
    read the same statistic) agrees, on every order of the axis (min over layers and groups);
    layers: see _plant_importance."""
    native, modelopt = both_backends
    agreement = ranking_agreement(native, modelopt)
    assert set(agreement) == {*PLANTED_AXES, "attention_heads"}, agreement
    for axis, a in agreement.items():
        assert a.min_spearman > 0.5, (axis, agreement)


@pytest.mark.gpu
def test_cli_modelopt_backend_on_gpu(pgs, tiny_config, tmp_path) -> None:
    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.data import write_indexed_dataset

    torch.manual_seed(3)
    parent = build_elastic_model(tiny_config, ElasticConfig(budgets={"full": 1.0}), pgs)
    save_checkpoint(tmp_path / "parent", parent, tiny_config, kind="parent")
    g = torch.Generator().manual_seed(0)
    docs = [
        torch.randint(0, tiny_config.vocab_size, (300,), generator=g).tolist() for _ in range(8)
    ]
    write_indexed_dataset(tmp_path / "data", docs, tiny_config.vocab_size)
    done = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            *_cli_args(tmp_path, "--num-samples", "8", "--seq-length", "64"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "out" / "importance.json").read_text())
    assert info["backend"] == "modelopt"
    assert _is_permutation(info["hidden"], tiny_config.hidden_size)
    assert _is_permutation(info["layer_ranking"], tiny_config.num_layers)
