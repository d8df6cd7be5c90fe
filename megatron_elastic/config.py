"""Typed configuration of megatron-elastic components.

Each component owns one small dataclass, validated once in ``__post_init__``. User mistakes raise
``ValueError`` naming the field and the fix. YAML recipes load strictly: an unknown key is an error
that suggests the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_elastic.config_moe import check_moe

__all__ = [
    "LAYER_SYMBOLS",
    "ModelConfig",
    "ParallelConfig",
    "check_mamba_context_parallel",
    "check_parallel_fit",
    "config_from_dict",
    "load_model_config",
    "load_yaml",
]

# NemotronH layer kinds as megatron-core's hybrid pattern spells them.
LAYER_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def _require_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}"
            )


def _require_divisible(owner: str, num: str, num_v: int, den: str, den_v: int) -> None:
    if num_v % den_v != 0:
        raise ValueError(
            f"{owner}.{num}={num_v} is not divisible by {den}={den_v}; "
            f"choose {num} as a multiple of {den_v} (e.g. {max(den_v, num_v // den_v * den_v)})"
        )


@dataclass(frozen=True)
class ModelConfig:
    """A NemotronH-family hybrid Mamba-2 + attention + MLP language model.

    Fixed by the family: RMSNorm, squared-ReLU (non-gated) MLP and experts, no positional
    embedding, no biases in linear layers, untied input embedding and output layer, an fp32 MoE
    router. The ``moe_*`` fields are megatron-core's ``TransformerConfig`` names, passed through
    unchanged (validated in :mod:`megatron_elastic.config_moe`).
    """

    hybrid_pattern: str
    """One symbol per layer: ``M`` Mamba-2 mixer, ``*`` self-attention, ``-`` MLP, ``E``
    mixture-of-experts (megatron's ``MoELayer``: top-k router, routed experts, shared expert)."""
    hidden_size: int
    """Width of the residual stream (the embedding axis)."""
    ffn_hidden_size: int
    """Neurons of each MLP layer."""
    num_attention_heads: int
    """Query heads of each attention layer."""
    num_query_groups: int
    """Key/value heads (GQA groups); ``num_attention_heads`` must be a multiple of it."""
    head_dim: int
    """Channels per attention head (``kv_channels`` in megatron-core)."""
    mamba_num_heads: int
    """Heads of each Mamba-2 mixer."""
    mamba_head_dim: int
    """Channels per Mamba head; the mixer's inner width is ``mamba_num_heads * mamba_head_dim``."""
    mamba_num_groups: int
    """B/C groups of each mixer; ``mamba_num_heads`` must be a multiple of it."""
    mamba_state_dim: int
    """SSM state size per group (``d_state``)."""
    vocab_size: int
    """Rows of the embedding and of the output layer."""
    mamba_conv_kernel: int = 4
    """Width of the causal depthwise convolution in each mixer."""
    mamba_chunk_size: int = 128
    """Tokens per chunk of the chunked SSD scan (kernel and CPU path alike)."""
    max_sequence_length: int = 4096
    """Longest sequence the model is built for (no positional table depends on it)."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every RMSNorm."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation of linear weights."""
    layer_widths: tuple[int, ...] | None = None
    """Per-layer widths of a heterogeneous model, one entry per layer: query heads of a ``*``
    layer, heads of an ``M`` layer, neurons of a ``-`` layer. ``None``: every layer uses the
    global size of its kind (``num_attention_heads``, ``mamba_num_heads``, ``ffn_hidden_size``),
    which are otherwise only the sizes of the megatron config the stack starts from."""
    layer_mamba_head_dims: tuple[int, ...] | None = None
    """Per-layer Mamba head dims, one entry per layer (``0`` for non-Mamba layers). ``None``:
    every Mamba layer uses ``mamba_head_dim``."""
    num_moe_experts: int | None = None
    """Routed experts of each ``E`` layer (transformers' ``n_routed_experts``)."""
    moe_ffn_hidden_size: int | None = None
    """Neurons of each routed expert (``moe_intermediate_size``)."""
    moe_router_topk: int = 2
    """Experts each token is routed to (``num_experts_per_tok``)."""
    moe_shared_expert_intermediate_size: int | None = None
    """Neurons of the shared expert every token runs; ``None``: no shared expert."""
    moe_router_score_function: str = "sigmoid"
    """``sigmoid`` (Nemotron 3: top-k of sigmoid scores, renormalised over the k) or
    ``softmax``."""
    moe_router_pre_softmax: bool = False
    """Softmax router only: softmax over all experts, then top-k (not renormalised); ``False``:
    softmax over the top-k logits."""
    moe_router_topk_scaling_factor: float | None = None
    """Multiplies the top-k weights (``routed_scaling_factor``); ``None``: 1."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing (sigmoid only): a per-expert bias added to the scores for the
    choice only, updated from the token counts (``e_score_correction_bias``)."""
    moe_router_bias_update_rate: float = 1e-3
    """Step of the expert-bias update."""
    moe_router_num_groups: int | None = None
    """Group-limited routing: experts split into this many groups (``n_group``)."""
    moe_router_group_topk: int | None = None
    """Group-limited routing: groups each token may use (``topk_group``)."""
    moe_router_load_balancing_type: str = "aux_loss"
    """``aux_loss``, ``seq_aux_loss``, ``global_aux_loss`` or ``none``."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss (0: off)."""
    moe_z_loss_coeff: float | None = None
    """Weight of the router z-loss (ST-MoE); ``None``: off."""

    def __post_init__(self) -> None:
        if not self.hybrid_pattern:
            raise ValueError("ModelConfig.hybrid_pattern is empty; give one symbol per layer")
        bad = sorted(set(self.hybrid_pattern) - set(LAYER_SYMBOLS))
        if bad:
            raise ValueError(
                f"ModelConfig.hybrid_pattern has unsupported symbols {bad}; use only "
                f"{', '.join(f'{s!r} ({k})' for s, k in LAYER_SYMBOLS.items())}. Pipeline stage "
                "boundaries are set by ParallelConfig.pipeline_layout, not by '|' in the pattern."
            )
        _require_positive(
            self,
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "head_dim",
            "mamba_num_heads",
            "mamba_head_dim",
            "mamba_num_groups",
            "mamba_state_dim",
            "vocab_size",
            "mamba_conv_kernel",
            "mamba_chunk_size",
            "max_sequence_length",
        )
        _require_divisible(
            "ModelConfig",
            "num_attention_heads",
            self.num_attention_heads,
            "num_query_groups",
            self.num_query_groups,
        )
        _require_divisible(
            "ModelConfig",
            "mamba_num_heads",
            self.mamba_num_heads,
            "mamba_num_groups",
            self.mamba_num_groups,
        )
        if not self.layernorm_epsilon > 0:
            raise ValueError(
                f"ModelConfig.layernorm_epsilon must be > 0, got {self.layernorm_epsilon}"
            )
        if not self.init_method_std > 0:
            raise ValueError(f"ModelConfig.init_method_std must be > 0, got {self.init_method_std}")
        check_moe(self)
        if "E" in self.hybrid_pattern and self.is_heterogeneous:
            raise ValueError(
                "ModelConfig.layer_widths / layer_mamba_head_dims with 'E' (mixture-of-experts) "
                "layers: per-layer MoE sizes are not supported yet (issue 26 step 2); remove them"
            )
        self._check_layer_lists()

    def _check_layer_lists(self) -> None:
        groups = {
            "attention": ("num_query_groups", self.num_query_groups),
            "mamba": ("mamba_num_groups", self.mamba_num_groups),
            "mlp": ("1", 1),
        }
        for name in ("layer_widths", "layer_mamba_head_dims"):
            values = getattr(self, name)
            if values is None:
                continue
            values = tuple(values)
            object.__setattr__(self, name, values)
            if len(values) != self.num_layers or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in values
            ):
                raise ValueError(
                    f"ModelConfig.{name}={list(values)} must list {self.num_layers} integers, "
                    f"one per layer of hybrid_pattern {self.hybrid_pattern!r}"
                )
            for i, (v, kind) in enumerate(zip(values, self.layer_kinds(), strict=True)):
                if name == "layer_mamba_head_dims":
                    if not (v > 0 if kind == "mamba" else v == 0):
                        want = "a positive head dim" if kind == "mamba" else "0"
                        raise ValueError(
                            f"ModelConfig.{name}[{i}]={v}: layer {i} is {kind}, give {want}"
                        )
                    continue
                group_name, group = groups[kind]
                if v <= 0 or v % group:
                    raise ValueError(
                        f"ModelConfig.{name}[{i}]={v}: the width of {kind} layer {i} must be a "
                        f"positive multiple of {group_name}={group}"
                    )

    @property
    def num_layers(self) -> int:
        return len(self.hybrid_pattern)

    @property
    def mamba_inner_size(self) -> int:
        """``d_inner`` of each mixer: heads times head dim."""
        return self.mamba_num_heads * self.mamba_head_dim

    def layer_kinds(self) -> list[str]:
        """The kind (``mamba``, ``attention``, ``mlp``, ``moe``) of every layer in order."""
        return [LAYER_SYMBOLS[s] for s in self.hybrid_pattern]

    @property
    def is_heterogeneous(self) -> bool:
        """Whether layers carry their own widths (``layer_widths`` / ``layer_mamba_head_dims``)."""
        return self.layer_widths is not None or self.layer_mamba_head_dims is not None

    def layer_sizes(self) -> list[tuple[int, int]]:
        """``(width, Mamba head dim)`` of every layer in order: width is query heads, Mamba heads
        or FFN neurons by kind (routed experts for ``moe``); the head dim is 0 for non-Mamba
        layers."""
        width = {
            "attention": self.num_attention_heads,
            "mamba": self.mamba_num_heads,
            "mlp": self.ffn_hidden_size,
            "moe": self.num_moe_experts or 0,
        }
        sizes = []
        for i, kind in enumerate(self.layer_kinds()):
            w = width[kind] if self.layer_widths is None else self.layer_widths[i]
            if kind != "mamba":
                d = 0
            elif self.layer_mamba_head_dims is None:
                d = self.mamba_head_dim
            else:
                d = self.layer_mamba_head_dims[i]
            sizes.append((w, d))
        return sizes


@dataclass(frozen=True)
class ParallelConfig:
    """How one model replica is split across processes."""

    tensor_parallel_size: int = 1
    """Ranks sharing every layer's weights (heads, neurons and vocab split across them)."""
    pipeline_parallel_size: int = 1
    """Stages the layer stack is cut into."""
    pipeline_layout: tuple[int, ...] | None = None
    """Layers per pipeline stage (sums to the layer count); ``None`` splits evenly."""
    sequence_parallel: bool = False
    """megatron's sequence parallelism: between layers the sequence is split across the TP ranks
    (norms and residuals on the local shard; column-parallel inputs all-gathered, row-parallel
    outputs reduce-scattered). A no-op at ``tensor_parallel_size=1``, as in megatron."""
    context_parallel_size: int = 1
    """Ranks the sequence is split across for the whole forward pass (megatron's load-balanced
    chunking: rank ``r`` of ``CP`` holds chunks ``r`` and ``2*CP-1-r`` of ``2*CP``)."""
    expert_model_parallel_size: int = 1
    """Ranks the routed experts of every MoE layer are split across (megatron's EP: each holds
    ``num_moe_experts / EP`` experts and tokens travel to them through the token dispatcher).
    EP ranks are carved out of the data- and context-parallel ranks, as in megatron, so it does
    not enlarge :attr:`model_parallel_size`; a parent without MoE layers needs 1."""
    distributed_timeout_minutes: int = 10
    """Timeout of every process group (megatron's ``--distributed-timeout-minutes``, default 10):
    a collective that waits longer, e.g. on a rank that hung or died, ends the process with an
    error (on NCCL the watchdog aborts it), so a hang becomes a failure the SLURM scripts requeue.
    Raise it if the first step's compilation or a checkpoint save outlasts it."""

    def __post_init__(self) -> None:
        _require_positive(
            self,
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
            "distributed_timeout_minutes",
        )
        if not isinstance(self.sequence_parallel, bool):
            raise ValueError(
                f"ParallelConfig.sequence_parallel must be true or false, got "
                f"{self.sequence_parallel!r}"
            )
        if self.pipeline_layout is not None:
            layout = tuple(self.pipeline_layout)
            object.__setattr__(self, "pipeline_layout", layout)
            if len(layout) != self.pipeline_parallel_size or any(n <= 0 for n in layout):
                raise ValueError(
                    f"ParallelConfig.pipeline_layout={list(layout)} must list "
                    f"{self.pipeline_parallel_size} positive layer counts, one per pipeline stage"
                )

    @property
    def model_parallel_size(self) -> int:
        """Ranks of one model replica: TP x PP x CP (the world is a multiple of it; the rest is
        data parallelism)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size

    @property
    def sequence_parallel_active(self) -> bool:
        """Whether the sequence is really split across TP ranks (SP asked for and TP > 1)."""
        return self.sequence_parallel and self.tensor_parallel_size > 1

    @property
    def sequence_multiple(self) -> int:
        """Training sequence lengths must be multiples of this: ``2 x CP`` load-balanced chunks
        (when CP > 1), each split across the TP ranks under sequence parallelism."""
        cp = self.context_parallel_size
        return (2 * cp if cp > 1 else 1) * (
            self.tensor_parallel_size if self.sequence_parallel_active else 1
        )

    def check_sequence_length(self, seq_length: int, field: str = "train.seq_length") -> None:
        """Raise ``ValueError`` if ``seq_length`` cannot be split as this config asks."""
        m = self.sequence_multiple
        if seq_length % m:
            parts = []
            if self.context_parallel_size > 1:
                parts.append(f"2 x context_parallel_size={self.context_parallel_size}")
            if self.sequence_parallel_active:
                tp = self.tensor_parallel_size
                parts.append(f"tensor_parallel_size={tp} (sequence_parallel)")
            lower, upper = seq_length // m * m, (seq_length // m + 1) * m
            raise ValueError(
                f"{field}={seq_length} is not divisible by {' x '.join(parts)} = {m}; use a "
                f"multiple of {m} (e.g. {lower or upper} or {upper})"
            )

    def stage_layer_counts(self, num_layers: int) -> tuple[int, ...]:
        """Layers on each pipeline stage."""
        pp = self.pipeline_parallel_size
        if self.pipeline_layout is not None:
            if sum(self.pipeline_layout) != num_layers:
                raise ValueError(
                    f"ParallelConfig.pipeline_layout={list(self.pipeline_layout)} sums to "
                    f"{sum(self.pipeline_layout)} but the model has {num_layers} layers"
                )
            return self.pipeline_layout
        if num_layers % pp != 0:
            raise ValueError(
                f"{num_layers} layers do not split evenly over pipeline_parallel_size={pp}; "
                f"set ParallelConfig.pipeline_layout, e.g. {_uneven_layout(num_layers, pp)}"
            )
        return (num_layers // pp,) * pp

    def pipelined_pattern(self, pattern: str) -> str:
        """``pattern`` with megatron-core's ``|`` stage separators inserted."""
        counts = self.stage_layer_counts(len(pattern))
        parts, start = [], 0
        for n in counts:
            parts.append(pattern[start : start + n])
            start += n
        return "|".join(parts)


def _uneven_layout(num_layers: int, stages: int) -> list[int]:
    base, extra = divmod(num_layers, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def check_parallel_fit(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise ``ValueError`` if ``model`` cannot be split as ``parallel`` asks."""
    tp = parallel.tensor_parallel_size
    for name in (
        "num_attention_heads",
        "num_query_groups",
        "mamba_num_heads",
        "mamba_num_groups",
        "ffn_hidden_size",
        "vocab_size",
        "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size",
    ):
        value = getattr(model, name)
        if value is not None and value % tp != 0:
            ok = [t for t in range(1, value + 1) if value % t == 0 and t <= 64]
            raise ValueError(
                f"ModelConfig.{name}={value} is not divisible by tensor_parallel_size={tp}; "
                f"tensor_parallel_size must divide it (possible sizes: {ok[-6:]})"
            )
    ep, experts = parallel.expert_model_parallel_size, model.num_moe_experts
    if ep > 1 and (not experts or experts % ep):
        why = (
            f"ModelConfig.num_moe_experts={experts} is not divisible by it (every EP rank holds "
            "as many routed experts)"
            if experts
            else f"the parent {model.hybrid_pattern!r} has no 'E' (mixture-of-experts) layers"
        )
        raise ValueError(
            f"ParallelConfig.expert_model_parallel_size={ep}: {why}; use an EP dividing the "
            f"routed experts, or 1"
        )
    cp = parallel.context_parallel_size
    if cp > 1:
        check_mamba_context_parallel(
            "ModelConfig.mamba_num_heads", model.mamba_num_heads, model.mamba_num_groups, tp, cp
        )
    parallel.stage_layer_counts(model.num_layers)


def check_mamba_context_parallel(field: str, heads: int, groups: int, tp: int, cp: int) -> None:
    """megatron's ``MambaContextParallel`` rules for a mixer of ``heads`` heads in ``groups``
    groups: this TP rank's heads must split evenly over the CP ranks (each takes a contiguous
    run of heads), and its groups must too, or the CP ranks must divide into them (then B and C
    of a group are replicated on several CP ranks)."""
    heads_local, groups_local = heads // tp, groups // tp
    if heads_local % cp:
        ok = [h for h in range(groups, heads + 1, groups) if (h // tp) % cp == 0]
        raise ValueError(
            f"{field}={heads}: {heads_local} heads per tensor-parallel rank (TP={tp}) do not "
            f"split over context_parallel_size={cp}; context parallelism needs heads per TP rank "
            f"divisible by CP (possible head counts: {ok[:8] or 'none'})"
        )
    if groups_local % cp and cp % groups_local:
        raise ValueError(
            f"ModelConfig.mamba_num_groups={groups}: {groups_local} groups per TP rank (TP={tp}) "
            f"and context_parallel_size={cp} must divide one another"
        )


def config_from_dict[T](cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{where or cls.__name__}: unknown key(s) {', '.join(hints)}; "
            f"known keys: {', '.join(sorted(known))}"
        )
    missing = [
        name
        for name, f in known.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ValueError(f"{where or cls.__name__}: missing required key(s) {', '.join(missing)}")
    return cls(**data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text ({exc.reason})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def load_model_config(path: str | Path) -> ModelConfig:
    """Load a model recipe (``examples/*/model.yaml``)."""
    return config_from_dict(ModelConfig, load_yaml(path), where=str(path))
