"""Hugging Face NemotronH <-> megatron conversion: both round trips are bit-exact, the HF model
computes the megatron model's logits (also with mixture-of-experts layers), the fused-QKV layout
is megatron's, and what cannot be represented (tied embeddings, routers NemotronH does not compute)
is refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_elastic.checkpoint import read_manifest
from megatron_elastic.config import ModelConfig, load_model_config
from megatron_elastic.export.hf import (
    from_hf_state_dict,
    hf_pattern,
    load_hf_directory,
    model_config_from_hf,
    save_hf_directory,
    use_torch_nemotron_h_kernels,
)
from megatron_elastic.export.hf_mapping import FusedQKV, LayerLayout
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.training.lm_step import position_ids_like

ROOT = Path(__file__).parents[2]
TO_MEGATRON = ROOT / "tools" / "convert_hf_to_megatron.py"
TO_HF = ROOT / "tools" / "convert_megatron_to_hf.py"

SMALL = ModelConfig(
    hybrid_pattern="M-*M-*M",
    hidden_size=64,
    ffn_hidden_size=96,
    num_attention_heads=6,
    num_query_groups=2,
    head_dim=16,
    mamba_num_heads=4,
    mamba_head_dim=16,
    mamba_num_groups=2,
    mamba_state_dim=8,
    mamba_conv_kernel=4,
    mamba_chunk_size=16,
    vocab_size=256,
    max_sequence_length=256,
)


def _run(tool: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(tool), *args], capture_output=True, text=True, timeout=600
    )


def _perturb(named_parameters) -> None:
    """Move norms, D, dt_bias and conv biases off their init values so every tensor matters."""
    with torch.no_grad():
        for name, p in named_parameters:
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("dt_bias", "conv1d_bias", "conv1d.bias")):
                p.add_(torch.randn_like(p) * 0.5)


def test_fused_qkv_layout_is_megatrons() -> None:
    groups, hpg, d = 2, 3, 2
    # Row r of megatron's linear_qkv belongs to group r // ((hpg + 2) * d).
    fused = torch.arange(groups * (hpg + 2) * d, dtype=torch.float32)[:, None].repeat(1, 4)
    mapping, layout = FusedQKV("qkv", "q", "k", "v"), LayerLayout(groups, d)
    q, k, v = mapping.to_hf([fused], layout)
    assert q[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]  # heads group-major
    assert k[:, 0].tolist() == [6, 7, 16, 17] and v[:, 0].tolist() == [8, 9, 18, 19]
    assert torch.equal(mapping.to_megatron([q, k, v], layout)[0], fused)


def test_invariant_megatron_to_hf_to_megatron_is_exact_and_hf_matches(pgs, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = build_hybrid_model(SMALL, pgs)
    _perturb(model.named_parameters())
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    save_hf_directory(tmp_path / "hf", SMALL, state)
    config, hf_state = load_hf_directory(tmp_path / "hf")
    assert model_config_from_hf(config) == SMALL
    back = from_hf_state_dict(hf_state, SMALL)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)

    use_torch_nemotron_h_kernels()  # CPU: not mamba-ssm's Triton kernels
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, SMALL.vocab_size, (2, 41))
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens, position_ids_like(tokens), None)).abs().max()
    print(f"megatron -> HF: max |logits diff| = {diff.item():.3g}")
    # transformers' NemotronH (torch kernels) vs megatron: measured worst 3.6e-7 over 10 token
    # draws (fp32 CPU); ~2.8x that (DESIGN allows 1e-4)
    assert diff.item() <= 1e-6


def _random_hf_model(directory: Path) -> None:
    from megatron_elastic.data.tokenizers import train_bpe_tokenizer

    use_torch_nemotron_h_kernels()  # before transformers' NemotronH module is first imported
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(4)
    config = NemotronHConfig(
        vocab_size=320,
        hidden_size=48,
        layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=80,
        mamba_num_heads=4,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=8,
        conv_kernel=4,
        chunk_size=16,
        eos_token_id=0,
        bos_token_id=None,
        pad_token_id=0,
    )
    model = NemotronHForCausalLM(config)
    _perturb(model.named_parameters())
    model.to(torch.bfloat16).save_pretrained(directory)  # as released checkpoints are
    texts = [f"hybrid mamba attention model {i}" for i in range(100)]
    train_bpe_tokenizer(texts, 300, directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})
    )


def test_invariant_hf_to_megatron_to_hf_round_trip_is_bit_exact(tmp_path) -> None:
    src, ckpt, dst = tmp_path / "src", tmp_path / "ckpt", tmp_path / "dst"
    _random_hf_model(src)
    done = _run(TO_MEGATRON, "--hf", str(src), "--output", str(ckpt))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(ckpt)
    assert manifest["kind"] == "parent"
    assert load_model_config(ckpt / "model.yaml").hybrid_pattern == "M-*M"
    assert (Path(manifest["metadata"]["tokenizer"]) / "tokenizer.json").is_file()
    done = _run(TO_HF, "--checkpoint", str(ckpt), "--output", str(dst))
    assert done.returncode == 0, done.stderr[-3000:]

    before, after = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    assert before.keys() == after.keys()
    assert before["lm_head.weight"].dtype == torch.bfloat16
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    src_config = json.loads((src / "config.json").read_text())
    dst_config = json.loads((dst / "config.json").read_text())
    assert {k: dst_config.get(k) for k in src_config} == src_config
    assert dst_config["hybrid_override_pattern"] == "M-*M" and dst_config["head_dim"] == 12
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()


MOE = ROOT / "tests" / "fixtures" / "hybrid_moe_small.yaml"


def _perturb_moe(model) -> None:
    """:func:`_perturb`, and decisive routing, an expert bias that changes the choice, and an
    MoE output of the residual's order: every MoE tensor matters."""
    with torch.no_grad():
        _perturb(model.named_parameters())
        for name, p in model.named_parameters():
            if "router.weight" in name:
                p.normal_(0, 0.5)
            elif "experts" in name:
                p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.normal_(0, 0.3)


def test_invariant_moe_parent_exports_to_stock_hf_and_round_trips_bit_exact(pgs, tmp_path) -> None:
    """A hybrid MoE parent (sigmoid router with a nonzero expert bias, scaled and renormalised
    top-2, a shared expert) as stock NemotronH ``moe`` layers: transformers computes its logits and
    greedy tokens; HF -> megatron gives back every tensor and the routing config."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from megatron_elastic.eval import greedy_generate

    cfg = load_model_config(MOE)
    torch.manual_seed(6)
    model = build_hybrid_model(cfg, pgs).eval()
    _perturb_moe(model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    config = save_hf_directory(tmp_path / "hf", cfg, state)
    assert config["hybrid_override_pattern"] == "ME*E" and config["n_routed_experts"] == 8
    assert (config["num_experts_per_tok"], config["routed_scaling_factor"]) == (2, 2.5)
    hf_config, hf_state = load_hf_directory(tmp_path / "hf")
    assert hf_state["backbone.layers.1.mixer.gate.weight"].dtype == torch.float32
    back_cfg = model_config_from_hf(hf_config)
    # the training-only balancing losses are not in an HF config
    assert back_cfg == dataclasses.replace(cfg, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    back = from_hf_state_dict(hf_state, back_cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)

    use_torch_nemotron_h_kernels()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens, position_ids_like(tokens), None)
        diff = (hf(tokens).logits - ours).abs().max() / ours.abs().max()
        theirs = hf.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),
            do_sample=False,
            max_new_tokens=8,
            min_new_tokens=8,
        )
    print(f"megatron MoE -> HF: max |logits diff| / max |logits| = {diff.item():.3g}")
    # measured 3.5e-7 (fp32 CPU, two implementations of the same routing); ~3x that
    assert diff.item() <= 1e-6
    greedy = greedy_generate(model, tokens.tolist(), max_new_tokens=8)
    assert greedy.tokens == theirs[:, tokens.size(1) :].tolist()


def test_invariant_moe_budget_exports_to_stock_hf_and_matches_the_elastic_model(
    pgs, tmp_path
) -> None:
    """A budget of an elastic MoE parent with fewer, narrower experts, a narrower shared expert
    and a narrower hidden size exports as a stock NemotronH directory with that many experts,
    whose logits are the elastic model's at the budget; per-layer MoE sizes are refused."""
    from transformers import AutoModelForCausalLM

    from megatron_elastic.elastic import ElasticConfig, SubnetSpec, build_elastic_model
    from megatron_elastic.export.hf import export_subnet_to_hf

    cfg = load_model_config(MOE)
    sizes = {"moe_experts": [4, 8], "moe_expert_ffn": [8, 16], "moe_shared_ffn": [12, 24]}
    elastic = ElasticConfig(budgets={"full": 1.0}, hidden_choices=(24, 32), choices=sizes)
    torch.manual_seed(8)
    model = build_elastic_model(cfg, elastic, pgs).eval()
    _perturb_moe(model)
    spec = SubnetSpec.homogeneous(
        cfg, hidden=24, moe_experts=4, moe_expert_ffn=8, moe_shared_ffn=12
    )
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    model.set_subnet(spec, mode="slice")
    try:
        with torch.no_grad():
            ours = model(tokens, position_ids_like(tokens), None)
    finally:
        model.set_subnet(None)
    export_subnet_to_hf(model, spec, tmp_path / "hf")
    use_torch_nemotron_h_kernels()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_cfg = hf.config
    assert (hf_cfg.n_routed_experts, hf_cfg.moe_intermediate_size) == (4, 8)
    assert (hf_cfg.moe_shared_expert_intermediate_size, hf_cfg.hidden_size) == (12, 24)
    with torch.no_grad():
        diff = (hf(tokens).logits - ours).abs().max() / ours.abs().max()
    print(f"elastic MoE budget -> HF: max |logits diff| / max |logits| = {diff.item():.3g}")
    assert diff.item() <= 1e-6  # measured 0 (bitwise) on this draw; the parent's bound
    per_layer = SubnetSpec.heterogeneous(cfg, moe_experts=[0, 4, 0, 8])
    with pytest.raises(ValueError, match="differ per layer"):
        export_subnet_to_hf(model, per_layer, tmp_path / "per_layer")
    assert not (tmp_path / "per_layer").exists()


def test_moe_routers_nemotron_h_cannot_compute_are_refused() -> None:
    import dataclasses

    from megatron_elastic.export.nemotron_h_config import hf_config_from_model

    cfg = load_model_config(MOE)
    for change, why in [
        (
            {"moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False},
            "its router is sigmoid",
        ),
        ({"moe_shared_expert_intermediate_size": None}, "every MoE layer has one"),
        (
            {"num_moe_experts": 8, "moe_router_num_groups": 2, "moe_router_group_topk": 2},
            "top-2 experts",
        ),
    ]:
        with pytest.raises(ValueError, match=why):
            hf_config_from_model(dataclasses.replace(cfg, **change))
    moe = {
        "model_type": "nemotron_h",
        "hybrid_override_pattern": "ME",
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 8,
        "moe_shared_expert_intermediate_size": 8,
    }
    assert model_config_from_hf(moe).num_moe_experts == 8
    for change, why in [
        ({"norm_topk_prob": False}, "renormalises the top-k weights exactly when k > 1"),
        ({"n_group": 4, "topk_group": 2}, "agree only when that is 2"),
        ({"moe_latent_size": 4}, "latent"),
    ]:
        with pytest.raises(ValueError, match=why):
            model_config_from_hf({**moe, **change})


def test_unrepresentable_configs_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"layer 1 has the unknown NemotronH block type 'mamba3'"):
        hf_pattern({"layers_block_type": ["linear_attention", "mamba3"]})
    for key, value, why in [
        ("tie_word_embeddings", True, "separate tensors"),
        ("mlp_hidden_act", "silu", "squared-ReLU"),
        ("num_nextn_predict_layers", 1, "MTP"),
        ("attention_bias", True, "no bias"),
    ]:
        with pytest.raises(ValueError, match=rf"{key}=.*{why}"):
            model_config_from_hf(
                {"model_type": "nemotron_h", "hybrid_override_pattern": "M-*", key: value}
            )
    with pytest.raises(ValueError, match=r"model_type is 'llama'"):
        model_config_from_hf({"model_type": "llama"})
    bad = {"model_type": "nemotron_h", "hybrid_override_pattern": "M-*", "mlp_bias": True}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(bad))
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")  # never read: the config fails first
    done = _run(TO_MEGATRON, "--hf", str(tmp_path / "bad"), "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and "mlp_bias=True is not supported" in done.stderr
    assert not (tmp_path / "out").exists()
