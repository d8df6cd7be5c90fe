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

Routed experts run through megatron's token dispatcher (``allgather``: the one of megatron 0.19
that runs on gloo; ``alltoall`` builds a CUDA stream on construction), in both modes: the routing
map and probabilities are widened to one column per parent expert (dropped experts' columns
empty), so under expert parallelism (``pgs.ep``) tokens travel to the rank holding their expert
and back exactly as in the parent. Kept experts nest per ``ElasticConfig.moe_expert_nesting_blocks``
(a multiple of EP), so every EP rank keeps the same number of them.

Under tensor parallelism (sequence parallel, as megatron requires for MoE; expert TP = TP) every
routed expert's neurons are split over the TP ranks (megatron's expert linears: no collective of
their own, the dispatcher gathers the TP x EP group's tokens and reduce-scatters the partial
outputs) and the shared expert is column/row-parallel like a dense MLP. Both widths nest per
``ElasticConfig.ffn_nesting_blocks`` (whole blocks per rank), so each rank keeps a prefix of each
of its blocks, and each rank takes its share of the router's per-neuron weights: per kept expert
its neurons' chunk, then its chunk of the shared neurons.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce
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
from megatron_elastic.elastic.subnet import Index, take

__all__ = ["ElasticMoELayer"]

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def _count(idx: Index) -> int:
    return idx.stop - idx.start if isinstance(idx, slice) else idx.numel()


def _local_linear(x: torch.Tensor, weight: torch.Tensor, linear) -> torch.Tensor:
    """``x @ weight.T`` on this rank alone, as megatron's expert linears compute (no TP
    collective: the token dispatcher gathers their input and reduce-scatters their output)."""
    return linear_with_grad_accumulation_and_async_allreduce(
        x,
        weight,
        None,
        gradient_accumulation_fusion=False,
        allreduce_dgrad=False,
        sequence_parallel=False,
        tp_group=linear.tp_group,
    )


class ElasticMoELayer(MoELayer):
    """Mixture of experts over the kept routed experts, their kept neurons and the shared
    expert's kept neurons (see the module docstring)."""

    active: ActiveWidth | None = None

    def sliced(self, st: ActiveWidth) -> dict[str, torch.Tensor]:
        """This module's parameters (and ``router.expert_bias``) cut to ``st``, named as in a
        model built with the kept sizes: kept expert ``i`` becomes ``local_experts.{i}``. Under
        expert parallelism a rank holds (and returns) only its own kept experts, still numbered
        among all kept ones, so the ranks' dicts together are the one-process dict."""
        idx: MoEIndices = st.indices
        h, kept = st.hidden, idx.experts
        rows = self._kept_columns(kept, self.router.weight.device)
        if kept == tuple(range(len(kept))):
            rows = slice(0, len(kept))
        out = {"router.weight": self.router.weight[rows][:, :h]}
        if self.router.expert_bias is not None:
            out["router.expert_bias"] = self.router.expert_bias[rows]
        for local, pos in self._local_kept(kept).items():
            expert = self.experts.local_experts[local]
            prefix = f"experts.local_experts.{pos}."
            fc1, fc2 = expert.linear_fc1.weight, expert.linear_fc2.weight
            out[prefix + "linear_fc1.weight"] = take(fc1, 0, idx.expert_ffn)[:, :h]
            out[prefix + "linear_fc2.weight"] = take(fc2, 1, idx.expert_ffn)[:h]
        if self.shared_experts is not None:
            fc1, fc2 = self.shared_experts.linear_fc1, self.shared_experts.linear_fc2
            out["shared_experts.linear_fc1.weight"] = take(fc1.weight, 0, idx.shared_ffn)[:, :h]
            out["shared_experts.linear_fc2.weight"] = take(fc2.weight, 1, idx.shared_ffn)[:h]
        return out

    def _local_kept(self, kept: tuple[int, ...]) -> dict[int, int]:
        """This rank's kept experts: local index -> position among all kept experts."""
        first, count = self.local_expert_indices[0], self.num_local_experts
        return {e - first: pos for pos, e in enumerate(kept) if first <= e < first + count}

    def _kept_columns(self, kept: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The kept experts as an index tensor, built once per expert set (no copy per step)."""
        cache = self.__dict__.setdefault("_columns", {})
        key = (kept, str(device))
        if key not in cache:
            cache[key] = torch.tensor(kept, dtype=torch.long, device=device)
        return cache[key]

    @staticmethod
    def _bias_counts(routing_map: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Tokens per parent expert for megatron's expert-bias update (bias += rate x sign(mean
        - count) at the step's end): the kept experts' own counts, and for each dropped expert
        the kept experts' mean, so a sub-network's tokens are balanced as a pruned model's
        would be (the mean is the kept experts') and do not read as under-use of the experts it
        dropped (a count of 0 would raise their bias every step they were dropped)."""
        counts = routing_map.sum(0).to(torch.float32)
        if len(columns) < counts.numel():
            dropped = torch.ones_like(counts, dtype=torch.bool).index_fill(0, columns, False)
            counts = counts.masked_fill(dropped, 0.0) + dropped * counts.sum() / len(columns)
        return counts

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
        bias, columns = router.expert_bias, self._kept_columns(idx.experts, x.device)
        w = self.sliced(st) if sliced else None
        if sliced:
            logits = router_gating_linear(x, w["router.weight"], None, dtype)
            bias = w.get("router.expert_bias")
        else:
            logits = router_gating_linear(x, router.weight, None, dtype)
            dropped = torch.ones(logits.size(-1), dtype=torch.bool, device=logits.device)
            dropped = dropped.index_fill(0, columns, False)
            logits = logits.masked_fill(dropped, float("-inf"))
            bias = None if bias is None else bias.masked_fill(dropped, float("-inf"))
        probs, routing_map = self._route(logits, bias, len(idx.experts))
        if sliced:  # the dispatcher's layout: one column per parent expert, dropped ones empty
            full = (len(x), self.config.num_moe_experts)
            probs = probs.new_zeros(full).index_copy(1, columns, probs)
            routing_map = routing_map.new_zeros(full).index_copy(1, columns, routing_map)
        if router.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                router.local_tokens_per_expert += self._bias_counts(routing_map, columns)
        out = self._routed(x, probs, routing_map, st, w)
        if self.shared_experts is not None:
            out = out + self._shared(x, st, w, self._unit_weights(st.weight, idx)[1])
        out = out.view(*shape[:-1], out.size(-1))
        if not sliced:
            out = out * hidden_mask(out.size(-1), st.hidden, out)
        return out, None

    def _routed(self, x, probs, routing_map, st: ActiveWidth, w) -> torch.Tensor:
        """The routed experts through megatron's token dispatcher: tokens travel to the EP rank
        holding their experts (all-gathered over the TP x EP group), each of this rank's kept
        experts runs on its tokens (a dropped expert has none), and the weighted outputs travel
        back (reduce-scattered). The dispatcher reads the token counts on the host once per
        layer (megatron's own synchronisation: dropless routing sizes its buffers by them)."""
        idx: MoEIndices = st.indices
        dispatcher = self.token_dispatcher
        tokens, probs = dispatcher.dispatch_preprocess(x, routing_map, probs)
        tokens, probs = dispatcher.token_dispatch(tokens, probs)
        tokens, per_expert, probs = dispatcher.dispatch_postprocess(tokens, probs)
        counts = per_expert.tolist()  # a host tensor already (no further synchronisation)
        routed_w, _ = self._unit_weights(st.weight, idx)
        kept, outs = self._local_kept(idx.experts), []
        for local, (xs, ps) in enumerate(
            zip(tokens.split(counts), probs.split(counts), strict=True)
        ):
            if local not in kept:
                continue  # dropped: routed no tokens
            pos = kept[local]
            y = self._expert(xs, local, pos, st, w, routed_w[pos])
            outs.append((y * ps[:, None]).to(x.dtype))
        # No kept expert here (a layout nesting does not produce): an empty output that still
        # depends on the gathered tokens and probabilities, so backward runs their collectives
        # on every rank (else the other ranks' reduce-scatter waits for this one).
        y = torch.cat(outs) if outs else (tokens[:0] * probs[:0, None]).to(x.dtype)
        y = dispatcher.combine_preprocess(y)
        y = dispatcher.token_combine(y)
        return dispatcher.combine_postprocess(y)

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
        """(per kept expert: this rank's share of its neurons' router weights, this rank's
        share of the shared-expert neurons' weights). ``weight`` is the layer's logical vector
        (every kept expert's kept neurons, expert-major, then the shared expert's; each width
        block-major), the same on every rank: a TP rank holds a contiguous run of every
        expert's and of the shared expert's blocks, hence the same chunk of each."""
        if weight is None or weight.dim() == 0:
            return [weight] * len(idx.experts), weight
        tp, experts = idx.tp_size, len(idx.experts)
        ffn = _count(idx.expert_ffn) * tp
        routed, shared = weight[: experts * ffn].view(experts, ffn), weight[experts * ffn :]
        if tp > 1:
            expert_tp = self.experts.local_experts[0].linear_fc1.tp_group
            routed = routed.chunk(tp, dim=1)[expert_tp.rank()]
            if shared.numel():
                shared = shared.chunk(tp)[self.shared_experts.linear_fc1.tp_group.rank()]
        return list(routed), shared

    def _expert(self, x, local: int, pos: int, st: ActiveWidth, w, weight) -> torch.Tensor:
        """This rank's routed expert ``local`` (kept position ``pos``) on the tokens ``x``
        routed to it."""
        expert, act = self.experts.local_experts[local], self.config.activation_func
        fc1, fc2 = expert.linear_fc1, expert.linear_fc2
        if w is not None:
            prefix = f"experts.local_experts.{pos}."
            inter = apply_unit_weight(
                act(_local_linear(x, w[prefix + "linear_fc1.weight"], fc1)), weight
            )
            return _local_linear(inter, w[prefix + "linear_fc2.weight"], fc2)
        inter = act(_local_linear(x, fc1.weight, fc1))
        inter = inter * unit_mask(inter.size(-1), st.indices.expert_ffn, inter, weight)
        return _local_linear(inter, fc2.weight, fc2)

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
