"""Megatron-LM / Megatron-Bridge checkpoints (``tools/export_budget.py --format megatron-lm``,
``tools/convert_megatron_lm.py``), verified against megatron-core itself: its TE hybrid spec
(``te_reference``: TE modules stood in for, everything else megatron's) must find exactly its
keys, shapes and sharding in the files, load them strictly, and compute the elastic model's
function; the ``args`` load the way Megatron-LM loads them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from moe_fixture import MOE_YAML, ROUTERS, moe_elastic_model, randomise_moe
from te_reference import build_te_reference_model, sharding_signature

from megatron_elastic.checkpoint import load_checkpoint, read_manifest
from megatron_elastic.config import load_model_config
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.export.megatron_lm import (
    BRIDGE_PROVIDER,
    BRIDGE_PROVIDER_FIELDS,
    _model_config_from_args,
    bridge_run_config,
    load_megatron_lm_weights,
    megatron_lm_args,
    read_megatron_lm,
    save_megatron_lm,
    te_sharded_state_dict,
)
from megatron_elastic.export.registry import ExportOptions, get_exporter
from megatron_elastic.export.standalone import standalone_config
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.training.lm_step import position_ids_like

ROOT = Path(__file__).parents[2]
EXPORT = "tools/export_budget.py"
CONVERT = "tools/convert_megatron_lm.py"


@pytest.fixture(scope="module")
def exported(perturbed_checkpoint, tmp_path_factory, run_cli, pgs):
    """Every trained budget of the tiny elastic checkpoint exported as Megatron-LM, and the
    whole elastic parent (with its router) converted; in the same CLI process (one start), the
    tiny MoE parent's Megatron-LM checkpoint (``moe/source``) through the converters:
    (root, results)."""
    from megatron_elastic.data.tokenizers import train_bpe_tokenizer

    path, _, _ = perturbed_checkpoint
    root = tmp_path_factory.mktemp("mlm")
    texts = [f"Question: what is {a} + {b}? Answer: {a + b}" for a in range(40) for b in range(9)]
    train_bpe_tokenizer(texts, 300, root / "tokenizer.json")
    tokenizer = ["--tokenizer", str(root / "tokenizer.json")]
    moe_cfg = load_model_config(MOE_YAML)
    moe_model = build_hybrid_model(moe_cfg, pgs)
    randomise_moe(moe_model)
    moe = {name: str(root / "moe" / name) for name in ("source", "parent", "again", "hf", "hf_mlm")}
    save_megatron_lm(moe["source"], moe_model, moe_cfg)
    results = run_cli(
        [
            (EXPORT, ["--checkpoint", str(path), "--all", "--format", "megatron-lm",
                      "--output", str(root / "budgets"), *tokenizer]),
            (CONVERT, ["export", "--checkpoint", str(path), "--output", str(root / "whole")]),
            (CONVERT, ["import", "--load", moe["source"], "--output", moe["parent"]]),
            (CONVERT, ["export", "--checkpoint", moe["parent"], "--output", moe["again"]]),
            ("tools/convert_megatron_to_hf.py",
             ["--checkpoint", moe["source"], "--output", moe["hf"]]),
            ("tools/convert_hf_to_megatron.py",
             ["--hf", moe["hf"], "--output", moe["hf_mlm"], "--format", "megatron-lm"]),
        ]
    )  # fmt: skip
    for done in results:
        assert done["rc"] == 0, done["stderr"][-3000:] + str(done["traceback"])
    return root, results


def _assert_same_weights(a, b, pgs) -> None:
    """Two Megatron-LM checkpoints hold the same weights, bit for bit."""
    states = []
    for ckpt in (a, b):
        model = build_hybrid_model(ckpt.model_config, pgs)
        load_megatron_lm_weights(ckpt, model)
        states.append(model.state_dict())
    for name, tensor in states[0].items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, states[1][name]), name


def _logits(model, tokens, spec=None):
    """Logits of a plain model, or of the elastic ``model`` at sub-network ``spec``."""
    if spec is not None:
        model.set_subnet(spec, mode="slice")
    try:
        with torch.no_grad():
            return model(tokens, position_ids_like(tokens), None)
    finally:
        if spec is not None:
            model.set_subnet(None)


def test_invariant_every_budget_loads_strictly_into_megatrons_te_model_and_matches(
    exported, perturbed_checkpoint, pgs
) -> None:
    root, _ = exported
    _, model, router = perturbed_checkpoint
    tokens = torch.randint(0, model.model_config.vocab_size, (2, 24))
    for budget in router.elastic_config.budgets:
        ckpt_dir = root / "budgets" / budget
        # Megatron-LM reads the common state with weights_only=True and its safe globals only.
        common = dist_checkpointing.load_common_state_dict(str(ckpt_dir / "iter_0000000"))
        assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
        assert (ckpt_dir / "latest_checkpointed_iteration.txt").read_text() == "0"
        # The reference is built from what --use-checkpoint-args reads: the args alone.
        cfg = _model_config_from_args(common["args"], "args")
        spec = router.decide(budget, 0, None, deterministic=True).spec
        expected = standalone_config(model.model_config, spec)
        assert cfg == dataclasses.replace(expected, mamba_chunk_size=cfg.mamba_chunk_size)
        reference = build_te_reference_model(cfg, pgs)
        request = reference.sharded_state_dict()
        # Files == megatron's TE spec: every tensor's key and global shape, nothing else.
        metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir / "iter_0000000"))
        ref_tensors = {
            k: v[0][3] for k, v in sharding_signature(request).items() if v[0][0] == "tensor"
        }
        assert {k: tuple(t.global_shape) for k, t in metadata.items()} == ref_tensors
        state = dist_checkpointing.load(
            request, str(ckpt_dir / "iter_0000000"), strict=StrictHandling.RAISE_ALL
        )
        reference.load_state_dict({k: state[k] for k in reference.state_dict()}, strict=True)
        want = _logits(model, tokens, spec)
        got = _logits(reference, tokens)
        # megatron's TE spec (TE modules stood in for) vs the elastic slice: fp32 summation order
        # only; measured worst 7.2e-7 over 10 token draws (bitwise at the full budget), logit
        # scale ~1.4; ~2.8x that
        assert (want - got).abs().max().item() <= 2e-6, budget


@pytest.mark.parametrize("recipe", ["examples/tiny/model.yaml", "tests/fixtures/hybrid_small.yaml"])
def test_sharding_metadata_equals_megatrons_te_spec(recipe, pgs) -> None:
    cfg = load_model_config(ROOT / recipe)
    ours = te_sharded_state_dict(build_hybrid_model(cfg, pgs), cfg)
    reference = build_te_reference_model(cfg, pgs).sharded_state_dict()
    assert sharding_signature(ours) == sharding_signature(reference)


def test_args_carry_what_megatron_lm_reads(exported) -> None:
    from transformers import AutoTokenizer

    root, _ = exported
    budget = next(p for p in (root / "budgets").iterdir())
    common = dist_checkpointing.load_common_state_dict(str(budget / "iter_0000000"))
    args = common["args"]
    # Megatron-LM's HuggingFaceTokenizer: AutoTokenizer.from_pretrained(args.tokenizer_model)
    assert args.tokenizer_type == "HuggingFaceTokenizer"
    hf_tok = AutoTokenizer.from_pretrained(args.tokenizer_model)
    assert hf_tok.decode(hf_tok.encode("what is 3 + 4?")) == "what is 3 + 4?"
    cfg = read_megatron_lm(budget).model_config
    assert args.hybrid_layer_pattern == cfg.hybrid_pattern and args.num_layers == cfg.num_layers
    assert (args.squared_relu, args.swiglu, args.position_embedding_type) == (True, False, "none")
    assert args.untie_embeddings_and_output_weights and args.normalization == "RMSNorm"
    assert args.padded_vocab_size % args.make_vocab_size_divisible_by == 0
    # check_checkpoint_args and load_args_from_checkpoint read these without defaults
    for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
        assert getattr(args, name) is not None


def _check_run_config(path: Path, cfg) -> None:
    """``run_config.yaml`` at ``path``: its model section instantiates megatron's
    ``TransformerConfig`` (Bridge's provider fields aside) equal to ours for ``cfg`` in every
    field it sets."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_elastic.config import ParallelConfig
    from megatron_elastic.model.builder import moe_fields, transformer_config

    run_config = yaml.safe_load(path.read_text())
    model = dict(run_config["model"])
    assert model.pop("_target_") == BRIDGE_PROVIDER
    assert set(moe_fields(cfg)) <= set(model)  # every MoE field we build with
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(model) - fields == set(BRIDGE_PROVIDER_FIELDS)
    resolved = {k: v for k, v in model.items() if k in fields}
    assert resolved.pop("activation_func")["_target_"] == "megatron.core.activations.squared_relu"
    resolved["params_dtype"] = getattr(torch, resolved["params_dtype"]["_target_"][6:])
    built = TransformerConfig(**resolved)
    ours = transformer_config(cfg, ParallelConfig())
    assert built.is_hybrid_model  # Megatron-LM / Bridge set it; it only scales initialisation
    # grouped GEMM: what the TE spec builds; ours sets it exactly where TE is (a GPU)
    assert "E" not in cfg.hybrid_pattern or built.moe_grouped_gemm
    for name in set(resolved) - {"is_hybrid_model", "moe_grouped_gemm"}:
        assert getattr(built, name) == getattr(ours, name), name


def test_bridge_run_config_builds_megatrons_transformer_config(exported) -> None:
    root, _ = exported
    budget = next(p for p in (root / "budgets").iterdir())
    cfg = read_megatron_lm(budget).model_config
    _check_run_config(budget / "iter_0000000" / "run_config.yaml", cfg)


def test_invariant_round_trip_megatron_lm_parent_megatron_lm_is_bit_exact(
    exported, run_cli, pgs
) -> None:
    root, _ = exported
    first = next(p for p in (root / "budgets").iterdir())
    parent, again = root / "parent", root / "again"
    for done in run_cli(
        [
            (CONVERT, ["import", "--load", str(first), "--output", str(parent)]),
            (CONVERT, ["export", "--checkpoint", str(parent), "--output", str(again)]),
        ]
    ):
        assert done["rc"] == 0, done["stderr"][-3000:] + str(done["traceback"])
    assert read_manifest(parent)["kind"] == "parent"
    a, b = read_megatron_lm(first), read_megatron_lm(again)
    assert a.model_config == b.model_config
    _assert_same_weights(a, b, pgs)
    args = [dist_checkpointing.load_common_state_dict(str(c.weights))["args"] for c in (a, b)]
    paths = [Path(vars(a).pop("tokenizer_model")) for a in args]  # each its own copy
    assert paths == [a.weights / "tokenizer", b.weights / "tokenizer"]
    assert vars(args[0]) == vars(args[1])


def test_invariant_whole_elastic_parent_round_trips_with_its_router(
    exported, perturbed_checkpoint, run_cli, pgs
):
    from megatron_elastic.router import router_from_state

    root, _ = exported
    _, model, router = perturbed_checkpoint
    whole = read_megatron_lm(root / "whole")
    assert whole.model_config == model.model_config
    restored = router_from_state(whole.model_config, whole.elastic["router"])
    for budget in router.elastic_config.budgets:
        assert (
            restored.decide(budget, 0, None, deterministic=True).spec
            == router.decide(budget, 0, None, deterministic=True).spec
        )
    reference = build_te_reference_model(whole.model_config, pgs)
    dist_checkpointing.load(
        reference.sharded_state_dict(), str(whole.weights), strict=StrictHandling.RAISE_ALL
    )
    (done,) = run_cli(
        [(CONVERT, ["import", "--load", str(root / "whole"), "--output", str(root / "back")])]
    )
    assert done["rc"] == 0 and "with its router" in done["stdout"], done["stderr"][-2000:]
    assert read_manifest(root / "back")["kind"] == "elastic"
    plain = build_hybrid_model(model.model_config, pgs)
    load_checkpoint(root / "back", plain, model.model_config)
    for name, tensor in plain.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, model.state_dict()[name]), name


def test_heterogeneous_budget_is_refused_before_writing(
    tiny_config, tiny_heterogeneous_spec, pgs, tmp_path
) -> None:
    cfg = standalone_config(tiny_config, tiny_heterogeneous_spec(tiny_config))
    assert cfg.is_heterogeneous
    with pytest.raises(ValueError, match="heterogeneous budget"):
        megatron_lm_args(cfg)
    with pytest.raises(ValueError, match="per-layer widths"):
        bridge_run_config(cfg)
    model = build_hybrid_model(cfg, pgs)
    with pytest.raises(ValueError, match="--format megatron"):
        save_megatron_lm(tmp_path / "out", model, cfg)
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line_and_writes_nothing(exported, perturbed_checkpoint, run_cli):
    root, _ = exported
    path, _, _ = perturbed_checkpoint
    occupied = root / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    damaged = root / "damaged"
    import shutil

    shutil.copytree(root / "whole", damaged)
    shard = next((damaged / "iter_0000000").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ckpt = ["--checkpoint", str(path), "--budget", "full"]
    results = run_cli(
        [
            (EXPORT, [*ckpt, "--format", "nemo", "--output", str(root / "x")]),
            (EXPORT, [*ckpt, "--format", "megatron-lm", "--output", str(occupied)]),
            (EXPORT, [*ckpt, "--format", "hf", "--output", str(occupied)]),
            (CONVERT, ["import", "--load", str(damaged), "--output", str(root / "y")]),
            (CONVERT, ["import", "--load", str(path), "--output", str(root / "z")]),
        ]
    )
    fmt, occupied_mlm, occupied_hf, corrupt, not_mlm = results
    assert fmt["rc"] == 2 and "invalid choice: 'nemo'" in fmt["stderr"]
    for done in (occupied_mlm, occupied_hf):
        assert done["rc"] == 2 and "--force" in done["stderr"] and done["traceback"] is None
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    assert corrupt["rc"] == 2 and shard.name in corrupt["stderr"] and "sha256" in corrupt["stderr"]
    assert not_mlm["rc"] == 2 and "latest_checkpointed_iteration.txt" in not_mlm["stderr"]
    for done in results[1:]:  # argparse prints its usage before the error line
        assert done["stderr"].strip().count("\n") == 0 and done["stderr"].startswith("error: ")
    assert not (root / "x").exists() and not (root / "y").exists()
    manifest = json.loads((root / "whole" / "export_manifest.json").read_text())
    assert manifest["format"] == "megatron-lm" and manifest["has_router"] is True


@pytest.mark.gpu
def test_invariant_real_te_spec_loads_export_on_gpu_and_matches(
    exported, perturbed_checkpoint, pgs
):
    """On a GPU with Transformer Engine: megatron-core's real TE hybrid model (what
    ``build_hybrid_model`` builds there) loads every exported budget strictly and computes the
    elastic model's logits (fp32 parameters: <= 1e-3 of the logit scale)."""
    from megatron_elastic.model.builder import use_te

    if not use_te():
        pytest.skip("needs transformer_engine (the TE spec)")
    root, _ = exported
    _, model, router = perturbed_checkpoint
    tokens = torch.randint(0, model.model_config.vocab_size, (2, 24), device="cuda")
    for budget in router.elastic_config.budgets:
        ckpt = read_megatron_lm(root / "budgets" / budget)
        te_model = build_hybrid_model(ckpt.model_config, pgs)
        request = te_model.sharded_state_dict()
        state = dist_checkpointing.load(request, str(ckpt.weights), strict=StrictHandling.RAISE_ALL)
        te_model.load_state_dict(state, strict=False)
        spec = router.decide(budget, 0, None, deterministic=True).spec
        want = _logits(model, tokens, spec)
        got = _logits(te_model, tokens)
        scale = want.abs().max().item()
        print(f"budget {budget}: max |TE - elastic| = {(got - want).abs().max().item():.3e}")
        assert (got - want).abs().max().item() <= 1e-3 * scale, budget


def test_invariant_hf_converters_round_trip_megatron_lm_bit_exact(exported, run_cli, pgs) -> None:
    """Megatron-LM -> HF (convert_megatron_to_hf) -> Megatron-LM (convert_hf_to_megatron
    --format megatron-lm): the same weights bit for bit, the tokenizer carried along."""
    root, _ = exported
    source = root / "budgets" / "full"
    hf, back = root / "hf_full", root / "mlm_from_hf"
    for done in run_cli(
        [
            ("tools/convert_megatron_to_hf.py", ["--checkpoint", str(source), "--output", str(hf)]),
            ("tools/convert_hf_to_megatron.py",
             ["--hf", str(hf), "--output", str(back), "--format", "megatron-lm"]),
        ]
    ):  # fmt: skip
        assert done["rc"] == 0, done["stderr"][-3000:] + str(done["traceback"])
    assert (hf / "tokenizer.json").is_file() and (hf / "config.json").is_file()
    a, b = read_megatron_lm(source), read_megatron_lm(back)
    assert a.model_config == b.model_config and b.tokenizer is not None
    _assert_same_weights(a, b, pgs)


def test_invariant_bf16_checkpoint_imports_exactly(tiny_config, pgs, tmp_path) -> None:
    """Megatron-LM trains and saves bf16 parameters: they import into our fp32 parent exactly,
    and the args record the dtype."""
    model = build_hybrid_model(tiny_config, pgs, params_dtype=torch.bfloat16)
    save_megatron_lm(tmp_path / "bf16", model, tiny_config)
    ckpt = read_megatron_lm(tmp_path / "bf16")
    args = dist_checkpointing.load_common_state_dict(str(ckpt.weights))["args"]
    assert args.bf16 and args.params_dtype == torch.bfloat16
    parent = build_hybrid_model(ckpt.model_config, pgs)
    load_megatron_lm_weights(ckpt, parent)
    loaded = parent.state_dict()
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert loaded[name].dtype == torch.float32 and torch.equal(tensor.float(), loaded[name])


# ---- mixture of experts ---------------------------------------------------------------------


def _moe_budgets(cfg) -> dict[str, SubnetSpec]:
    """Every homogeneous MoE budget of the tiny MoE parent: the parent's and half of each MoE
    axis (kept experts, expert width, shared width), all combinations, and one that also
    narrows the hidden size, the Mamba and attention heads."""
    shared = cfg.moe_shared_expert_intermediate_size or 0
    budgets = {
        f"e{e}_f{f}_s{s}": SubnetSpec.homogeneous(
            cfg, moe_experts=e, moe_expert_ffn=f, moe_shared_ffn=s or None
        )
        for e in (cfg.num_moe_experts, cfg.num_moe_experts // 2)
        for f in (cfg.moe_ffn_hidden_size, cfg.moe_ffn_hidden_size // 2)
        for s in sorted({shared, shared // 2}, reverse=True)
    }
    budgets["narrow"] = SubnetSpec.homogeneous(
        cfg, hidden=24, mamba_heads=2, attention_heads=2, moe_experts=4, moe_expert_ffn=8
    )
    return budgets


@pytest.mark.parametrize("router", list(ROUTERS))
def test_invariant_every_moe_budget_loads_strictly_into_megatrons_te_model_and_matches(
    router, pgs, tmp_path
) -> None:
    """Every homogeneous budget of the tiny MoE parent (Nemotron 3's router; softmax top-3
    without a shared expert; group-limited), exported as Megatron-LM: megatron-core's TE hybrid
    spec (``TEGroupedMLP`` experts, TE shared expert and ``TENorm`` stood in for), built from
    the saved ``args`` alone, finds exactly its keys and shapes in the files, loads them with
    ``StrictHandling.RAISE_ALL`` and computes the elastic model's logits."""
    cfg = dataclasses.replace(load_model_config(MOE_YAML), **ROUTERS[router])
    model = moe_elastic_model(cfg, pgs)
    exporter = get_exporter("megatron-lm")
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    budgets = _moe_budgets(cfg)
    exporter.check(cfg, budgets, ExportOptions())
    for name, spec in budgets.items():
        out = exporter.export(model, spec, tmp_path / name, ExportOptions(log=lambda _: None))
        weights = str(out / "iter_0000000")
        args = dist_checkpointing.load_common_state_dict(weights)["args"]
        got_cfg = _model_config_from_args(args, "args")
        assert got_cfg == dataclasses.replace(
            standalone_config(cfg, spec), mamba_chunk_size=got_cfg.mamba_chunk_size
        ), name
        assert args.num_experts == got_cfg.num_moe_experts and args.moe_grouped_gemm
        reference = build_te_reference_model(got_cfg, pgs)
        assert type(reference.decoder.layers[1].mlp.experts).__name__ == "TEGroupedMLP"
        request = reference.sharded_state_dict()
        metadata = dist_checkpointing.load_tensors_metadata(weights)
        ref_tensors = {
            k: v[0][3] for k, v in sharding_signature(request).items() if v[0][0] == "tensor"
        }
        assert {k: tuple(t.global_shape) for k, t in metadata.items()} == ref_tensors, name
        state = dist_checkpointing.load(request, weights, strict=StrictHandling.RAISE_ALL)
        reference.load_state_dict({k: state[k] for k in reference.state_dict()}, strict=True)
        want = _logits(model, tokens, spec)
        got = _logits(reference.eval(), tokens)
        # the dense test's bound: fp32 summation order only (grouped vs sequential experts);
        # measured worst 8.3e-7 over these 23 budgets x 10 token draws, logit scale ~1.2
        assert (want - got).abs().max().item() <= 2e-6, (router, name)


def test_moe_sharding_metadata_equals_megatrons_te_spec(pgs) -> None:
    """Our local MoE layer's checkpoint entries (``SequentialMLP`` experts, RMSNorm pre-norm)
    are the TE spec's (``TEGroupedMLP``, ``TENorm``), shard by shard, with and without a shared
    expert."""
    for change in ({}, ROUTERS["softmax_top3_no_shared"]):
        cfg = dataclasses.replace(load_model_config(MOE_YAML), **change)
        ours = te_sharded_state_dict(build_hybrid_model(cfg, pgs), cfg)
        reference = build_te_reference_model(cfg, pgs).sharded_state_dict()
        assert sharding_signature(ours) == sharding_signature(reference)


def test_moe_args_and_run_config_round_trip(pgs, tmp_path) -> None:
    """A group-limited MoE parent as Megatron-LM: the args carry every MoE argument under
    Megatron-LM's names and give back the config; the weights import bit for bit;
    ``run_config.yaml`` builds megatron's ``TransformerConfig`` with our MoE fields."""
    cfg = dataclasses.replace(load_model_config(MOE_YAML), **ROUTERS["sigmoid_group_limited"])
    model = build_hybrid_model(cfg, pgs)
    randomise_moe(model)
    save_megatron_lm(tmp_path / "moe", model, cfg)
    ckpt = read_megatron_lm(tmp_path / "moe")
    args = dist_checkpointing.load_common_state_dict(str(ckpt.weights))["args"]
    from_args = _model_config_from_args(args, "args")  # Megatron-LM has no Mamba chunk size
    assert ckpt.model_config == cfg
    assert from_args == dataclasses.replace(cfg, mamba_chunk_size=from_args.mamba_chunk_size)
    expected = {
        "num_experts": 8,
        "moe_router_topk": 2,
        "moe_ffn_hidden_size": 16,
        "moe_shared_expert_intermediate_size": 24,
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_topk_scaling_factor": 2.5,
        "moe_router_num_groups": 2,
        "moe_router_group_topk": 1,
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": 1e-4,
        "moe_z_loss_coeff": 1e-3,
        "moe_router_dtype": "fp32",
        "moe_grouped_gemm": True,
    }
    assert {k: getattr(args, k) for k in expected} == expected
    plain = build_hybrid_model(ckpt.model_config, pgs)
    load_megatron_lm_weights(ckpt, plain)
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, plain.state_dict()[name]), name
    _check_run_config(ckpt.weights / "run_config.yaml", cfg)


def test_moe_what_megatron_lm_cannot_hold_is_refused_in_one_line(pgs, tmp_path) -> None:
    """A budget whose MoE sizes differ per layer (Megatron-LM builds one MoE shape), before
    anything is written; and on import, a Megatron-LM MoE our layer does not build."""
    cfg = load_model_config(MOE_YAML)
    spec = SubnetSpec.heterogeneous(cfg, moe_experts=[0, 4, 0, 8])
    exporter = get_exporter("megatron-lm")
    with pytest.raises(ValueError, match=r"budget mixed: .*homogeneous MoE budget") as err:
        exporter.check(cfg, {"mixed": spec}, ExportOptions())
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="homogeneous MoE budget"):
        exporter.export(moe_elastic_model(cfg, pgs), spec, tmp_path / "out", ExportOptions())
    assert not (tmp_path / "out").exists()
    args = megatron_lm_args(cfg)
    args.moe_shared_expert_gate = True
    with pytest.raises(ValueError, match=r"moe_shared_expert_gate=True: .* gated shared expert"):
        _model_config_from_args(args, "args")


def test_invariant_moe_megatron_lm_round_trips_through_the_converters_bit_exact(
    exported, pgs
) -> None:
    """An MoE Megatron-LM checkpoint through the tools (``exported`` ran them): -> parent ->
    Megatron-LM (``convert_megatron_lm.py``), and -> Hugging Face -> Megatron-LM
    (``convert_megatron_to_hf``, ``convert_hf_to_megatron --format megatron-lm``): the same
    weights and config."""
    root, _ = exported
    a = read_megatron_lm(root / "moe" / "source")
    assert "E" in a.model_config.hybrid_pattern
    for name in ("again", "hf_mlm"):
        b = read_megatron_lm(root / "moe" / name)
        expected = a.model_config
        if name == "hf_mlm":  # an HF config has no training-only balancing losses
            losses = ("moe_aux_loss_coeff", "moe_z_loss_coeff")
            expected = dataclasses.replace(
                expected, **{k: getattr(b.model_config, k) for k in losses}
            )
        assert b.model_config == expected, name
        _assert_same_weights(a, b, pgs)
