"""The memory planner's mixture-of-experts (``E``) layers: weights split by expert parallelism,
and what autograd keeps for backward in the elastic student's MoE layer.

Weights of one ``E`` layer on one rank (megatron's layout): the pre-norm and the router's gate
(``experts x hidden``) are replicated over TP; the shared expert is split over TP; the routed
experts are split over EP (``num_moe_experts / EP`` local experts, megatron's
``expert_model_parallel_size``), each over the expert-tensor-parallel ranks (megatron's default
``expert_tensor_parallel_size`` = TP). EP ranks are carved out of DP x CP, so the routed experts'
distributed-optimizer state is sharded over the expert-data-parallel group, ``DP x CP / EP``
ranks, while every other weight's is sharded over DP (as the dense plan does). The router's
``expert_bias`` and token counts are buffers of ``experts`` floats each and are left out.

Activations, per micro-batch and rank, of the student's slice-mode layer
(``elastic/moe.py::ElasticMoELayer.forward``, which the trainer runs on CPU and GPU: the router on
the kept experts' gate rows in fp32, its probabilities and routing map widened to one column per
parent expert, then megatron's all-gather token dispatcher (``MoEAllGatherTokenDispatcher``:
gather over TP x EP, ``permute`` the rank's routed token copies into one tensor, run each local
kept expert on its rows: fc1, squared ReLU, the router-weight product, fc2, the routing-probability
product; ``unpermute`` by ``scatter_add``, reduce-scatter back), read off the autograd graph
(``tests/unit/test_plan_memory.py`` checks them against what autograd saves on a tiny MoE layer
for four routers, in fp32 and bf16):

* per routed token copy on this rank (top-k of them per token; every token goes to exactly ``k``
  experts, so there are ``k x tokens`` copies whatever the routing): the permuted tokens
  (``permute``'s ``index_select`` output, fc1's input), squared ReLU's relu output, its square,
  the router-weighted result (fc2's input), fc2's output (the probability product's input): 2
  hidden + 3 expert widths in the model dtype; the permuted probability (fp32, the
  ``masked_select`` result the product keeps) and the int64 token index (``permute``'s sorted
  indices, which ``unpermute``'s ``scatter_add`` keeps; the product itself, its source, is not
  kept);
* per gathered token and local expert (``dispatch_postprocess``'s ``masked_select`` keeps its
  input and mask): the local experts' probabilities transposed (fp32) and routing map (bool),
  ``tokens x TP x EP`` gathered tokens x ``experts / EP`` local experts;
* slice mode widens the kept experts' probabilities to the parent's experts (``index_copy``,
  which keeps its source: the router's dense fp32 ``tokens x kept`` probabilities, and the int64
  index of the kept experts);
* per token: the shared expert's three ``shared_ffn``-wide tensors (as an MLP layer's), and the
  router's fp32 tensors (``router_terms``: scores, top-k probabilities and indices, the z-loss's
  logits, the load-balancing loss's scores);
* the pre-norm and the depth gate, as every layer (``planning/memory.py``).

Under expert parallelism every rank receives on average ``k x tokens`` copies (the balanced
routing the load-balancing loss and the expert bias aim at; imbalance raises it), and megatron's
all-gather dispatcher gathers the ``tokens x TP x EP`` hidden states into its global buffer
(a static term, :func:`dispatch_buffer_tokens`: ``permute`` copies out of it, so autograd keeps
none of it). ``benchmarks/bench_memory.py``'s ``moe-ep2-*`` configuration measures EP 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_elastic.planning.memory_config import LayerShape, MemoryPlanConfig

__all__ = [
    "dispatch_buffer_tokens",
    "moe_activation_terms",
    "moe_layer_weights",
    "moe_largest_weight",
    "router_terms",
]


def moe_layer_weights(cfg: MemoryPlanConfig) -> tuple[float, float]:
    """Elements of one parent ``E`` layer on one rank: (replicated or TP-split weights, the
    rank's routed experts). Slice mode keeps the parent's weights whatever the budget."""
    m, p = cfg.model, cfg.parallel
    tp, ep = p.tensor_parallel_size, p.expert_model_parallel_size
    h, f = m.hidden_size, m.moe_ffn_hidden_size or 0
    shared = m.moe_shared_expert_intermediate_size or 0
    experts = m.num_moe_experts or 0
    dense = h + experts * h + 2 * h * shared / tp
    routed = experts / ep * 2 * h * f / tp
    return dense, routed


def moe_largest_weight(cfg: MemoryPlanConfig) -> float:
    """Elements of the largest weight shard of an ``E`` layer: one expert's fc1 (or fc2), the
    shared expert's, or the router's gate."""
    m, tp = cfg.model, cfg.parallel.tensor_parallel_size
    h = m.hidden_size
    shared = m.moe_shared_expert_intermediate_size or 0
    return max(h * (m.moe_ffn_hidden_size or 0) / tp, h * shared / tp, h * (m.num_moe_experts or 0))


def dispatch_buffer_tokens(cfg: MemoryPlanConfig) -> float:
    """Tokens of megatron's all-gather dispatcher buffer (one micro-batch's tokens on this rank,
    a sequence-parallel share under TP, gathered over the TP x EP ranks); 0 without a gather."""
    p = cfg.parallel
    gather = p.tensor_parallel_size * p.expert_model_parallel_size
    if gather == 1 or "moe" not in cfg.model.layer_kinds():
        return 0.0
    tokens = cfg.micro_batch_size * cfg.seq_length / p.context_parallel_size
    return tokens / (p.tensor_parallel_size if p.sequence_parallel_active else 1) * gather


def router_terms(cfg: MemoryPlanConfig, experts: int, tokens: float) -> dict[str, float]:
    """Bytes the router keeps for backward over ``tokens`` tokens and ``experts`` kept experts
    (megatron's ``topk_routing_with_score_function``, ``z_loss_func`` and the switch
    load-balancing loss, fp32 as ``moe_router_dtype: fp32`` runs them; unfused)."""
    m = cfg.model
    k, score = m.moe_router_topk, m.moe_router_score_function
    terms: dict[str, float] = {}
    if score == "sigmoid":
        # sigmoid scores (E) (gathered at the top-k, or top-k'd); top-k indices (int64); with
        # k > 1 the renormalisation's top-k scores and their sum
        per_token = 4 * experts + 8 * k + (4 * (k + 1) if k > 1 else 0)
    elif m.moe_router_pre_softmax:  # softmax over all experts, then top-k of the probabilities
        per_token = 4 * experts + 8 * k
    else:  # top-k of the logits (int64 indices), softmax over the k (its result)
        per_token = 12 * k
    biased = score == "sigmoid" and m.moe_router_enable_expert_bias
    if m.moe_router_group_topk and not biased:  # masked_fill's (tokens, E) bool mask
        per_token += experts
    terms["moe: router scores, top-k"] = tokens * per_token
    # (each loss also keeps its 0-dim fp32 value for megatron's MoEAuxLossAutoScaler)
    if m.moe_z_loss_coeff is not None:  # logsumexp keeps the logits and its result
        terms["moe: z-loss logits"] = tokens * 4 * (experts + 1) + 4
    if m.moe_aux_loss_coeff > 0 and m.moe_router_load_balancing_type != "none":
        # the aux loss's own scores over every kept expert (sigmoid: renormalised, + the sum);
        # the int64 token counts per expert (once per micro-batch)
        per = 4 * experts + (4 if score == "sigmoid" else 0)
        terms["moe: load-balancing scores"] = tokens * per + 8 * experts + 4
    return terms


def moe_activation_terms(
    cfg: MemoryPlanConfig, layer: LayerShape, hidden: int, tokens: float, hidden_tokens: float
) -> dict[str, float]:
    """The ``E`` layer's own terms (the norm and gate are the caller's), in bytes: ``tokens``
    per rank (head-sharded tensors), ``hidden_tokens`` of them under SP (the router's input),
    ``hidden`` the student's embedding width."""
    from megatron_elastic.planning.memory_config import PROFILES

    m, p = cfg.model, cfg.parallel
    tp, ep = p.tensor_parallel_size, p.expert_model_parallel_size
    a = PROFILES[cfg.profile].act_bytes
    f, kept = layer.expert_ffn / tp, layer.width
    copies = m.moe_router_topk * tokens  # balanced over EP ranks: k x tokens on average
    gathered = hidden_tokens * tp * ep  # the dispatcher's all-gather over TP x EP
    terms = {
        # permuted tokens (fc1 input), fc2 output (2h); relu, square, router-weighted (3f)
        "moe: routed copies (k x (2h + 3f))": copies * a * (2 * hidden + 3 * f),
        "moe: routed probs + token index (k x 12 B)": copies * 12,
        # fp32 local probabilities (transposed) and their bool routing map, masked_select's
        "moe: dispatcher probs + map (5 B x experts/EP)": gathered * m.num_moe_experts / ep * 5,
        # slice mode's index_copy to one column per parent expert: fp32 kept probs, int64 index
        "moe: kept probs widened (4 B x kept)": hidden_tokens * kept * 4 + 8 * kept,
    }
    if layer.shared_ffn:
        terms["moe: shared expert (3 fs)"] = 3 * tokens * layer.shared_ffn / tp * a
    terms.update(router_terms(cfg, kept, hidden_tokens))
    return terms
