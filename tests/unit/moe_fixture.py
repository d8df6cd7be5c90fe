"""The tiny hybrid MoE parent (``tests/fixtures/hybrid_moe_small.yaml``, pattern ``ME*E``) the
MoE serving and export tests share: its routers and a draw of weights where every MoE tensor
matters."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic import ElasticConfig, build_elastic_model

__all__ = ["MOE_YAML", "ROUTERS", "moe_elastic_model", "randomise_moe"]

MOE_YAML = Path(__file__).parents[2] / "tests" / "fixtures" / "hybrid_moe_small.yaml"

ROUTERS = {
    "sigmoid_bias_shared": {},  # Nemotron 3's
    "softmax_top3_no_shared": {
        "moe_router_score_function": "softmax",
        "moe_router_enable_expert_bias": False,
        "moe_router_topk_scaling_factor": None,
        "moe_shared_expert_intermediate_size": None,
        "moe_router_topk": 3,
    },
    # one of two groups of 4 experts, a group scored by its top 2 (topk // group_topk)
    "sigmoid_group_limited": {"moe_router_num_groups": 2, "moe_router_group_topk": 1},
}
"""Router kinds: ``dataclasses.replace(config, **ROUTERS[name])``."""


def randomise_moe(model: torch.nn.Module) -> None:
    """Decisive routing, a bias that changes the choice, MoE outputs of the residual's order,
    norms and D away from 1 (every weight drawn here, whatever ran before)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "experts" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "layernorm" in name or name.endswith("norm.weight") or name.endswith(".D"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 - 3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)


def moe_elastic_model(cfg: ModelConfig, pgs, elastic: ElasticConfig | None = None):
    """An elastic model of ``cfg`` with :func:`randomise_moe`'s weights, in eval mode."""
    model = build_elastic_model(cfg, elastic or ElasticConfig(budgets={"full": 1.0}), pgs)
    randomise_moe(model)
    return model.eval()
