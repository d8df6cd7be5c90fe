"""Per-GPU memory of one training step, by category and pipeline stage, from a recipe's sizes.

One formula serves ``tools/plan_memory.py``, the tests and ``benchmarks/bench_memory.py`` (which
checks it against measured peaks). Every activation term names the tensor autograd keeps for
backward in *our* code path, per token of one micro-batch on one rank:

* ``cpu-fp32``: what the CPU trainer runs (fp32; the elastic student's slice-mode layers with
  router scalars and depth gates, megatron's linears, SDPA for attention, the pure-torch chunked
  SSD scan of ``model/ssd_scan.py``); each term was read off the autograd graph and is checked
  against measured peaks by the benchmark.
* ``gpu-bf16``: the same student in bf16 on CUDA (our fp32-accumulating RMSNorm, SDPA flash
  attention, mamba-ssm's fused ``mamba_split_conv1d_scan_combined`` + gated ``rmsnorm_fn``), the
  teacher on Transformer-Engine specs (fused attention), megatron's mixed-precision optimizer
  (fp32 master weights, Adam moments). Read from the same code and mamba-ssm 2.3.2's
  ``save_for_backward`` calls; the GPU run of the benchmark measures it when a GPU is lent.

Model of a step (megatron's 1F1B): stage ``i`` of ``PP`` keeps ``min(PP - i, M)`` micro-batches'
activations in flight. The peak of a stage is its static memory (weights, fp32 gradient buffer,
optimizer state, frozen teacher, router) plus the largest of: the in-flight activations plus the
backward working set (at layer j: the gradients of its output, input and weight; with recompute
its forward rebuilt first; minus what the layers after j have freed);
the in-flight activations but one plus the teacher's forward working set; on the last stage, one
micro-batch's activations plus the logits and KD temporaries. :func:`plan_memory` takes these
steps per stage; what it is told (:class:`MemoryPlanConfig`, the profiles) is in
``planning/memory_config.py``. Weights are counted by ``model/param_count.py`` and the fused
weights' rows read from ``model/layouts.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_elastic.model.layouts import AttentionLayout, MambaLayout
from megatron_elastic.model.param_count import layer_parameter_counts
from megatron_elastic.planning.memory_config import (
    GIB,
    PROFILES,
    LayerShape,
    MemoryPlanConfig,
    Profile,
)
from megatron_elastic.planning.moe import (
    dispatch_buffer_tokens,
    moe_activation_terms,
    moe_largest_weight,
    moe_layer_weights,
)

__all__ = [
    "GIB",
    "PROFILES",
    "LayerShape",
    "MemoryPlan",
    "MemoryPlanConfig",
    "Profile",
    "StagePlan",
    "kd_loss_bytes",
    "layer_activation_terms",
    "plan_memory",
]


# --------------------------------------------------------------------------- activations
def _tokens(cfg: MemoryPlanConfig) -> tuple[float, float]:
    """Tokens per rank of one micro-batch: (head-sharded tensors, hidden-width tensors). CP splits
    the sequence; SP further splits hidden-width tensors (norms, residual, linear inputs) over TP
    (megatron's linears save the local shard and all-gather again in backward)."""
    p = cfg.parallel
    tokens = cfg.micro_batch_size * cfg.seq_length / p.context_parallel_size
    hidden_tokens = tokens / (p.tensor_parallel_size if p.sequence_parallel_active else 1)
    return tokens, hidden_tokens


def layer_activation_terms(
    cfg: MemoryPlanConfig, layer: LayerShape, hidden: int
) -> dict[str, float]:
    """Bytes autograd keeps for one micro-batch through ``layer`` on one rank, by tensor."""
    m, p, prof = cfg.model, cfg.parallel, PROFILES[cfg.profile]
    tp, cp = p.tensor_parallel_size, p.context_parallel_size
    t, th = _tokens(cfg)
    h = hidden
    if not layer.active:
        return {}
    if prof.name == "cpu-fp32":
        # Pre-norm (ours, fp32): its input (pow), rsqrt, normalised x (weight mul), its output
        # (the first linear's input); the depth gate x + g*(f(x) - x) keeps f(x) - x.
        terms = {"norm + gate (4h+1)": 4 * th * (4 * h + 1)}
    else:
        # Our RMSNorm on bf16: fp32 upcast of the input, fp32 rsqrt, fp32 normalised x, bf16
        # output; the gate's bf16 f(x) - x.
        terms = {"norm + gate (12h+4 B)": th * (12 * h + 4)}
    a = prof.act_bytes
    if layer.kind == "moe":  # routed copies, shared expert, router (planning/moe.py)
        terms.update(moe_activation_terms(cfg, layer, h, t, th))
        return terms
    if layer.kind == "mlp":
        f = layer.width / tp
        # relu result (relu + pow), pow result (router-weight mul), weighted result (fc2 input)
        terms["ffn: relu, pow, weighted (3f)"] = 3 * t * f * a
        return terms
    if layer.kind == "attention":
        nq, d = layer.width / tp, m.head_dim
        kv_tokens = t * cp  # K/V all-gathered over the CP ranks (causal_attention)
        # Causal SDPA (model/attention.py; no (s x s) tensor) keeps q, its output and an fp32
        # logsumexp per query row and head; the weighted ctx is linear_proj's input; k and v are
        # expanded to every query head (repeat_interleave; under CP put in global chunk order).
        rows = t
        if cp > 1 and prof.name == "cpu-fp32":
            # CPU: each of the two query chunks is left-padded to its visible keys (chunks 0..c,
            # platform.lower_right_causal_attention): (r+1 + 2CP-r) half-chunks = (CP + 1/2) t
            # rows of padded q, output and logsumexp; the unpadded q copy is freed.
            rows = (cp + 0.5) * t
            q = nq * d
        else:  # one query group per rank: q is a view of the fused qkv output, kept whole
            one_group = m.num_query_groups == tp
            q = AttentionLayout.head_rows(nq, m.num_query_groups / tp) * d if one_group else nq * d
        terms["attn: q (or all qkv), out"] = (rows * q + rows * nq * d) * a
        terms["attn: weighted ctx"] = t * nq * d * a
        terms["attn: k, v per query head (2 nq d)"] = 2 * kv_tokens * nq * d * a
        terms["attn: logsumexp (nq fp32)"] = 4 * rows * nq
        return terms
    # One rank's share of the packed in_proj [z, x, B, C, dt] and of the conv's [x, B, C].
    shard = MambaLayout(
        layer.width / tp, layer.head_dim, m.mamba_num_groups / tp, m.mamba_state_dim
    )
    nh, hd, g, n = shard.num_heads, shard.head_dim, shard.num_groups, shard.state_dim
    L, k = m.mamba_chunk_size, m.mamba_conv_kernel
    inner, d_in = shard.inner, shard.in_proj_size
    if prof.name == "cpu-fp32":
        seq = cfg.seq_length
        chunks = -(-seq // L)
        b = cfg.micro_batch_size
        # zxbcdt (silu(z) keeps the whole in_proj output), conv output (padded by k-1) and its
        # silu result (both [x, B, C]); x*dt and its two bmm copies; scan output y, silu(z),
        # gated y*silu(z), its normalised form, the normed output, the router-weighted out_proj
        # input (6 inner); per-head dt/decay vectors (5 nh incl. dt in zxbcdt's share).
        terms["mamba: in_proj output [z,x,B,C,dt]"] = 4 * t * d_in
        terms["mamba: conv out + silu [x,B,C] x2"] = 4 * t * shard.conv_size * (2 + (k - 1) / seq)
        terms["mamba: x*dt + 2 bmm copies (3 inner)"] = 4 * t * 3 * inner
        terms["mamba: y, gate, norm, out (6 inner)"] = 4 * t * (6 * inner + g)
        terms["mamba: dt, decays (4 nh)"] = 4 * t * 4 * nh
        # Per-head B and C expansions (5 copies), chunk states, the L x L decay/score blocks.
        terms["mamba: B/C per head (5 nh n)"] = 4 * t * 5 * nh * n
        terms["mamba: chunk states"] = 4 * t * nh * n * hd / L * (1 + (chunks + 1) / chunks)
        terms["mamba: L x L decay, scores (3 nh L)"] = 4 * t * 3 * nh * L
        terms["mamba: masks, chunk decay"] = 2 * L * L + 4 * b * nh * (chunks + 1) ** 2
        return terms
    # mamba-ssm fused conv+scan keeps zxbcdt and the scan output; rmsnorm_fn keeps its input
    # and fp32 rstd per group; the normed output (router-weight mul) and the out_proj input.
    terms["mamba: in_proj output [z,x,B,C,dt]"] = a * t * d_in
    terms["mamba: scan out, norm in, normed, out (4 inner)"] = a * t * 4 * inner
    terms["mamba: rstd (g fp32)"] = 4 * t * g
    return terms


def _layer_bytes(cfg: MemoryPlanConfig, layer: LayerShape, hidden: int) -> float:
    return sum(layer_activation_terms(cfg, layer, hidden).values())


def _stored_bytes(cfg: MemoryPlanConfig, layer: LayerShape, hidden: int, rebuilt: bool) -> float:
    """What one micro-batch keeps through ``layer`` until its backward (``rebuilt``: the layer
    is recomputed)."""
    if not layer.active:
        return 0.0
    if not rebuilt:
        return _layer_bytes(cfg, layer, hidden)
    # Non-reentrant checkpoint keeps the layer's input; the depth gate outside it keeps
    # f(x) - x: 2 hidden-width tensors.
    _, th = _tokens(cfg)
    return 2 * th * hidden * PROFILES[cfg.profile].act_bytes


def kd_loss_bytes(cfg: MemoryPlanConfig) -> float:
    """The last stage's student and teacher logits (b, s, V/TP) in the model dtype and the
    chunked KD loss's peak on top (``distill/losses.py``, measured): its forward keeps three fp32
    (chunk, V/TP) temporaries; its backward the gradient of the logits (model dtype) and two
    (three with a trained CE); it saves for backward only the logits and (tokens, 6) fp32."""
    t, _ = _tokens(cfg)
    logits = t * cfg.model.vocab_size / cfg.parallel.tensor_parallel_size  # per model
    a, n = PROFILES[cfg.profile].act_bytes, cfg.loss_chunks
    backward = a + (12 if cfg.ce_trained else 8) / n
    return logits * (2 * a + max(12 / n, backward)) + 24 * t  # + the normaliser table


# --------------------------------------------------------------------------- parameters
def _stage_weights(cfg: MemoryPlanConfig, stage: _Stage) -> tuple[float, float]:
    """Weights of one rank of a stage (the parent's sizes: slice mode keeps the full weights):
    (the weights sharded over DP by the distributed optimizer, the routed experts sharded over
    expert-DP). Every layer's pre-norm is replicated over TP, the rest of it
    (:mod:`~.model.param_count`) is split; an ``E`` layer's router is replicated and its routed
    experts split over EP (:func:`~.planning.moe.moe_layer_weights`); the first stage holds the
    input embedding, the last the output layer and the final norm
    (:func:`~.model.param_count.embedding_params`), each a ``V / TP``-row shard."""
    m, tp = cfg.model, cfg.parallel.tensor_parallel_size
    h = m.hidden_size
    counts, kinds = layer_parameter_counts(m), m.layer_kinds()
    dense, routed = 0.0, 0.0
    for j in stage.layers:
        if kinds[j] == "moe":
            layer_dense, layer_routed = moe_layer_weights(cfg)
            dense, routed = dense + layer_dense, routed + layer_routed
        else:
            dense += h + (counts[j] - h) / tp
    table = m.vocab_size / tp * h
    dense += (table if stage.first else 0) + (table + h if stage.last else 0)
    return dense, routed


def _largest_weight(cfg: MemoryPlanConfig, first: bool, last: bool) -> float:
    """Elements of the largest weight matrix shard on a stage (its gradient is a transient):
    an FFN matrix, the fused ``linear_qkv``, the packed Mamba ``in_proj``
    (:mod:`~.model.layouts`), an expert's or the router's matrix, or a vocabulary table."""
    m, tp = cfg.model, cfg.parallel.tensor_parallel_size
    h, sizes = m.hidden_size, [0.0]
    for kind, (width, head_dim) in zip(m.layer_kinds(), m.layer_sizes(), strict=True):
        if kind == "moe":
            sizes.append(moe_largest_weight(cfg))
            continue
        if kind == "mlp":
            rows = width
        elif kind == "attention":
            rows = AttentionLayout.head_rows(width, m.num_query_groups) * m.head_dim
        else:
            rows = MambaLayout(width, head_dim, m.mamba_num_groups, m.mamba_state_dim).in_proj_size
        sizes.append(h * rows / tp)
    if first or last:
        sizes.append(m.vocab_size / tp * h)
    return max(sizes)


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class StagePlan:
    """Bytes on the busiest rank of one pipeline stage."""

    stage: int
    layers: dict[str, int]
    """Active student layers of each kind on this stage."""
    in_flight: int
    """Micro-batches whose activations this stage holds at once under 1F1B."""
    static: dict[str, float]
    """Weights, gradients, optimizer state, teacher, router."""
    activations: dict[str, float]
    """Stored activations of all in-flight micro-batches, by layer kind (and embedding, final
    norm, pipeline buffers)."""
    transients: dict[str, float]
    """The working sets the peak adds on top (the largest one counts)."""
    peak: float
    """Static + the largest of the step's phases (see the module docstring)."""


@dataclass(frozen=True)
class MemoryPlan:
    config: MemoryPlanConfig
    stages: tuple[StagePlan, ...]

    @property
    def peak(self) -> float:
        return max(s.peak for s in self.stages)


@dataclass(frozen=True)
class _Stage:
    """Where one stage sits: its layers, its neighbours, its in-flight micro-batches."""

    index: int
    layers: range
    """Indices of its layers in the stack."""
    first: bool
    last: bool
    in_flight: int
    rebuilt: dict[int, bool]
    """Per layer: recomputed in backward (``block``: only the first ``recompute_num_layers``)."""


def _stages(cfg: MemoryPlanConfig) -> list[_Stage]:
    """The pipeline stages, and how many micro-batches 1F1B keeps in flight on each."""
    pp, stages, start = cfg.parallel.pipeline_parallel_size, [], 0
    for i, count in enumerate(cfg.stages):
        mine = range(start, start + count)
        start += count
        n = len(mine) if cfg.recompute_num_layers is None else cfg.recompute_num_layers
        rebuilt = {j: cfg.recompute and j - mine.start < n for j in mine}
        in_flight = min(pp - i, cfg.num_micro_batches)
        stages.append(_Stage(i, mine, i == 0, i == pp - 1, in_flight, rebuilt))
    return stages


def _static_bytes(cfg: MemoryPlanConfig, stage: _Stage) -> dict[str, float]:
    """Memory held for the whole step: weights, the fp32 gradient buffer, optimizer state
    (sharded over DP by the distributed optimizer), the frozen teacher, the router, megatron's
    SP gather buffer."""
    m, p, prof = cfg.model, cfg.parallel, PROFILES[cfg.profile]
    dense, routed = _stage_weights(cfg, stage)
    params = dense + routed
    dp_shard = cfg.data_parallel_size if cfg.distributed_optimizer else 1
    edp_shard = cfg.expert_data_parallel_size if cfg.distributed_optimizer else 1
    static = {
        "student weights": params * prof.param_bytes,
        "gradients (fp32 buffer)": params * 4,
        "optimizer state": (dense / dp_shard + routed / edp_shard) * prof.optimizer_bytes,
        "teacher weights": params * prof.param_bytes if cfg.teacher else 0.0,
        "router (fp32 + grads + Adam)": 16 * cfg.router_params,
    }
    # megatron keeps one persistent "mpu" buffer per dtype (parallel_state's
    # GlobalMemoryBuffer), as large as its largest request: under SP, megatron's linears
    # all-gather their inputs (s, b, h) into it. (No attention asks for it: every core
    # attention is our causal SDPA, model/attention.py.) megatron's all-gather MoE dispatcher
    # gathers the tokens of the TP x EP ranks into it too.
    buffer = 0.0
    if p.sequence_parallel_active:
        buffer = cfg.micro_batch_size * cfg.seq_length / p.context_parallel_size
    dispatch = dispatch_buffer_tokens(cfg)
    if buffer or dispatch:
        label = " / ".join(["SP"] * bool(buffer) + ["MoE dispatch"] * bool(dispatch))
        static[f"megatron global buffer ({label} gather)"] = (
            max(buffer, dispatch) * m.hidden_size * prof.act_bytes
        )
    return static


def _stored_activations(
    cfg: MemoryPlanConfig, stage: _Stage
) -> tuple[dict[str, float], dict[str, int]]:
    """What the in-flight micro-batches keep for their backward, by layer kind plus the
    embedding / final norm / pipeline buffers; and the active layers of each kind."""
    m, prof = cfg.model, PROFILES[cfg.profile]
    hidden = cfg.student_hidden or m.hidden_size
    layers = cfg.layers()
    t, th = _tokens(cfg)
    a = prof.act_bytes
    kinds = m.layer_kinds()  # the kinds the model has (mamba, attention, mlp, moe)
    per_kind = {k: 0.0 for k in ("mamba", "attention", "mlp", "moe") if k in kinds}
    counts = {"mamba": 0, "attention": 0, "mlp": 0, "moe": 0}
    for j in stage.layers:
        layer = layers[j]
        per_kind[layer.kind] += _stored_bytes(cfg, layer, hidden, stage.rebuilt[j])
        counts[layer.kind] += int(layer.active)
    acts = {f"{k} layers": v * stage.in_flight for k, v in per_kind.items()}
    extra = 0.0
    if stage.first:  # the embedding output (router-weight mul) and the int64 token ids
        extra += th * m.hidden_size * a + 8 * t  # a view of the full-width output
    if stage.last:  # final norm (4h+1 on CPU, see layer terms) without the gate
        extra += th * (3 * hidden * 4 + 4) if prof.name == "cpu-fp32" else th * (10 * hidden + 4)
    if not stage.first:  # the received (s, 2b, h) pair tensor: the teacher half on top
        extra += th * m.hidden_size * a * (2 if cfg.teacher else 1) / 2
    if not stage.last:  # the sent (s, 2b, h) output, kept until its backward
        extra += th * m.hidden_size * a * (2 if cfg.teacher else 1)
    acts["embedding / final norm / pipeline buffers"] = extra * stage.in_flight
    return acts, counts


def _backward_working_set(cfg: MemoryPlanConfig, stage: _Stage) -> float:
    """The net peak one micro-batch's backward adds to the stored activations.

    Backward runs the stage's layers last to first. At layer j the layers after j have freed
    their saved tensors; j's own are freed node by node as its backward consumes them, so on top
    of them live the gradients of its output and input (hidden width) and of its weight (the cut
    view's gradient and the full-size buffer it lands in); with recompute, j's forward is first
    rebuilt in full."""
    m, prof = cfg.model, PROFILES[cfg.profile]
    hidden = cfg.student_hidden or m.hidden_size
    layers = cfg.layers()
    t, th = _tokens(cfg)
    weight_grad = 2 * _largest_weight(cfg, stage.first, stage.last) * prof.param_bytes
    grads = (th + t) * hidden * prof.act_bytes  # under SP the input's gradient is all-gathered
    backward, freed = 0.0, 0.0
    for j in reversed(stage.layers):
        forward = _layer_bytes(cfg, layers[j], hidden) if stage.rebuilt[j] else 0.0
        backward = max(backward, forward + grads - freed)
        freed += _stored_bytes(cfg, layers[j], hidden, stage.rebuilt[j])
    return backward + weight_grad


def _teacher_working_set(cfg: MemoryPlanConfig, stage: _Stage) -> float:
    """The frozen teacher's forward: the largest one layer of the parent keeps while it runs
    (nothing is saved for backward)."""
    full, h = cfg.parent_layers(), cfg.model.hidden_size
    return max((_layer_bytes(cfg, full[j], h) for j in stage.layers), default=0)


def _plan_stage(cfg: MemoryPlanConfig, stage: _Stage) -> StagePlan:
    """One stage's plan: static memory plus the largest of the step's phases (module
    docstring): stored activations + backward, all but one micro-batch + the teacher's forward,
    and on the last stage stored activations + logits and KD temporaries."""
    static = _static_bytes(cfg, stage)
    acts, counts = _stored_activations(cfg, stage)
    stored = sum(acts.values())
    one_mb = stored / stage.in_flight
    transients = {"backward working set (net)": _backward_working_set(cfg, stage)}
    teacher_ws = 0.0
    if cfg.teacher:
        teacher_ws = transients["teacher forward working set"] = _teacher_working_set(cfg, stage)
    peak_phase = stored + transients["backward working set (net)"]
    peak_phase = max(peak_phase, stored - one_mb + teacher_ws)
    if stage.last:
        kd = transients["logits + KD temporaries"] = kd_loss_bytes(cfg)
        peak_phase = max(peak_phase, stored + kd)
    return StagePlan(
        stage=stage.index,
        layers=counts,
        in_flight=stage.in_flight,
        static=static,
        activations=acts,
        transients=transients,
        peak=sum(static.values()) + peak_phase,
    )


def plan_memory(cfg: MemoryPlanConfig) -> MemoryPlan:
    """Per-stage memory of one training step on the busiest rank of each stage."""
    return MemoryPlan(cfg, tuple(_plan_stage(cfg, stage) for stage in _stages(cfg)))
