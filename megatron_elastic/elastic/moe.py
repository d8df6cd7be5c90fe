"""Elastic version of megatron-core's ``MoELayer`` (an ``E`` layer's mixture of experts).

Same parameters and names as its parent class. ``module.active`` (an
:class:`~megatron_elastic.elastic.layers.ActiveWidth` whose indices are a
:class:`~megatron_elastic.elastic.moe_axes.MoEIndices`) is set by the model before a forward pass
(``None``: megatron's own forward, unchanged).

``slice`` mode computes what a model pruned to the kept experts computes: the router's gate is cut
to the kept experts' rows (and ``expert_bias`` to their entries), so top-k, renormalisation,
scaling, the z-loss and the load-balancing loss run over the kept experts only (megatron's own
routing functions on the cut logits); each kept expert runs its kept fc1 rows / fc2 columns on the
tokens routed to it; the shared expert its kept neurons. ``mask`` mode runs every weight: dropped
experts' logits (and bias) are ``-inf`` (so they are never chosen and take no share of a softmax),
dropped neurons are zeroed. Optional router weights multiply the kept neurons' activations: a
scalar, or one weight per routed-expert neuron (expert-major) then per shared-expert neuron.
Tensor-parallel size 1 (``ElasticConfig.validate_for`` refuses more).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    get_tokens_per_expert_and_token_count,
    router_gating_linear,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
)

from megatron_elastic.elastic.layers import (
    ActiveWidth,
    apply_unit_weight,
    column_parallel,
    hidden_mask,
    row_parallel,
    unit_mask,
)
from megatron_elastic.elastic.moe_axes import MoEIndices

__all__ = ["ElasticMoELayer"]

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def _count(idx: slice) -> int:
    return idx.stop - idx.start


class ElasticMoELayer(MoELayer):
    """Mixture of experts over the kept routed experts, their kept neurons and the shared
    expert's kept neurons (see the module docstring)."""

    active: ActiveWidth | None = None

    def sliced(self, st: ActiveWidth) -> dict[str, torch.Tensor]:
        """This module's parameters (and ``router.expert_bias``) cut to ``st``, named as in a
        model built with the kept sizes: kept expert ``i`` becomes ``local_experts.{i}``."""
        idx: MoEIndices = st.indices
        h, kept = st.hidden, list(idx.experts)
        rows = torch.tensor(kept, dtype=torch.long, device=self.router.weight.device)
        if kept == list(range(len(kept))):
            rows = slice(0, len(kept))
        out = {"router.weight": self.router.weight[rows][:, :h]}
        if self.router.expert_bias is not None:
            out["router.expert_bias"] = self.router.expert_bias[rows]
        for i, e in enumerate(kept):
            expert = self.experts.local_experts[e]
            prefix = f"experts.local_experts.{i}."
            out[prefix + "linear_fc1.weight"] = expert.linear_fc1.weight[idx.expert_ffn, :h]
            out[prefix + "linear_fc2.weight"] = expert.linear_fc2.weight[:h, idx.expert_ffn]
        if self.shared_experts is not None:
            shared = self.shared_experts
            out["shared_experts.linear_fc1.weight"] = shared.linear_fc1.weight[idx.shared_ffn, :h]
            out["shared_experts.linear_fc2.weight"] = shared.linear_fc2.weight[:h, idx.shared_ffn]
        return out

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        st = self.active
        if st is None:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)
        if intermediate_tensors is not None or padding_mask is not None:
            raise NotImplementedError("elastic MoE sub-networks run without partial CUDA graphs")
        idx: MoEIndices = st.indices
        shape, x = hidden_states.shape, hidden_states.reshape(-1, hidden_states.size(-1))
        router, sliced = self.router, st.mode == "slice"
        router._maintain_float32_expert_bias()
        dtype = _ROUTER_DTYPES.get(self.config.moe_router_dtype, x.dtype)
        bias = router.expert_bias
        if sliced:
            w = self.sliced(st)
            logits = router_gating_linear(x, w["router.weight"], None, dtype)
            bias = w.get("router.expert_bias")
        else:
            logits = router_gating_linear(x, router.weight, None, dtype)
            dropped = torch.ones(logits.size(-1), dtype=torch.bool, device=logits.device)
            dropped[list(idx.experts)] = False
            logits = logits.masked_fill(dropped, float("-inf"))
            bias = None if bias is None else bias.masked_fill(dropped, float("-inf"))
        probs, routing_map = self._route(logits, bias, len(idx.experts))
        if router.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():  # megatron's bias-update counts, for the kept experts
                counts = routing_map.sum(0).to(router.local_tokens_per_expert.dtype)
                if sliced:
                    router.local_tokens_per_expert[list(idx.experts)] += counts
                else:
                    router.local_tokens_per_expert += counts
        routed_w, shared_w = self._unit_weights(st.weight, idx)
        out = x.new_zeros(len(x), st.hidden if sliced else x.size(-1))
        for pos, e in enumerate(idx.experts):
            col = pos if sliced else e  # its column of the routing map
            tokens = routing_map[:, col].nonzero().squeeze(-1)
            y = self._expert(x[tokens], e, pos, st, w if sliced else None, routed_w[pos])
            out = out.index_add(0, tokens, (y * probs[tokens, col, None]).to(out.dtype))
        if self.shared_experts is not None:
            out = out + self._shared(x, st, w if sliced else None, shared_w)
        out = out.view(*shape[:-1], out.size(-1))
        if not sliced:
            out = out * hidden_mask(out.size(-1), st.hidden, out)
        return out, None

    def _route(self, logits: torch.Tensor, bias, num_experts: int):
        """megatron's top-k routing on (kept or masked) logits, with its z-loss and switch
        load-balancing loss over ``num_experts`` kept experts."""
        router, cfg = self.router, self.config
        logits = router.apply_z_loss(logits)
        probs, routing_map = topk_routing_with_score_function(
            logits,
            router.topk,
            use_pre_softmax=cfg.moe_router_pre_softmax,
            num_groups=cfg.moe_router_num_groups,
            group_topk=cfg.moe_router_group_topk,
            scaling_factor=cfg.moe_router_topk_scaling_factor,
            score_function=router.score_function,
            expert_bias=bias,
            fused=cfg.moe_router_fusion,
        )
        coeff = router.get_aux_loss_coeff("aux_loss")
        if self.training and torch.is_grad_enabled() and coeff > 0:
            aux_map, scores = compute_routing_scores_for_aux_loss(
                logits, router.topk, router.score_function, fused=cfg.moe_router_fusion
            )
            per_expert, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
                aux_map, reduce_group=router.tp_cp_group, topk=router.topk
            )
            aux = switch_load_balancing_loss_func(
                probs=scores,
                tokens_per_expert=per_expert,
                total_num_tokens=total_tokens,
                topk=router.topk,
                num_experts=num_experts,
                moe_aux_loss_coeff=coeff,
                fused=cfg.moe_router_fusion,
            )
            probs = router.attach_and_log_load_balancing_loss(
                probs,
                coeff,
                aux,
                "load_balancing_loss",
                router.tp_cp_group,
                valid_token_count=local_tokens,
            )
        return probs, routing_map

    def _unit_weights(self, weight: torch.Tensor | None, idx: MoEIndices):
        """(per kept expert: its neurons' router weights, shared-expert neurons' weights)."""
        if weight is None or weight.dim() == 0:
            return [weight] * len(idx.experts), weight
        ffn = _count(idx.expert_ffn)
        routed = weight[: len(idx.experts) * ffn].view(len(idx.experts), ffn)
        return list(routed), weight[len(idx.experts) * ffn :]

    def _expert(self, x, e: int, pos: int, st: ActiveWidth, w, weight) -> torch.Tensor:
        """Routed expert ``e`` (kept position ``pos``) on the tokens ``x`` routed to it (dropped
        experts get none, so mask mode skips them too)."""
        expert, act = self.experts.local_experts[e], self.config.activation_func
        fc1, fc2 = expert.linear_fc1, expert.linear_fc2
        if w is not None:
            prefix = f"experts.local_experts.{pos}."
            inter = apply_unit_weight(
                act(column_parallel(x, w[prefix + "linear_fc1.weight"], fc1)), weight
            )
            return row_parallel(inter, w[prefix + "linear_fc2.weight"], fc2)
        inter = act(column_parallel(x, fc1.weight, fc1))
        inter = inter * unit_mask(inter.size(-1), st.indices.expert_ffn, inter, weight)
        return row_parallel(inter, fc2.weight, fc2)

    def _shared(self, x, st: ActiveWidth, w, shared_w) -> torch.Tensor:
        shared, act = self.shared_experts, self.config.activation_func
        fc1, fc2 = shared.linear_fc1, shared.linear_fc2
        if w is not None:
            inter = act(column_parallel(x, w["shared_experts.linear_fc1.weight"], fc1))
            inter = apply_unit_weight(inter, shared_w)
            return row_parallel(inter, w["shared_experts.linear_fc2.weight"], fc2)
        inter = act(column_parallel(x, fc1.weight, fc1))
        inter = inter * unit_mask(inter.size(-1), st.indices.shared_ffn, inter, shared_w)
        return row_parallel(inter, fc2.weight, fc2)
