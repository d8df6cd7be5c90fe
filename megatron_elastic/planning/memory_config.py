"""What the memory planner is told: the numerics profile, the student's layer shapes, and the
run's sizes, parallel layout and batch geometry (:class:`MemoryPlanConfig`, validated once).
The plan itself is :func:`megatron_elastic.planning.memory.plan_memory`."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_elastic.config import ModelConfig, ParallelConfig, check_parallel_fit

__all__ = ["GIB", "PROFILES", "LayerShape", "MemoryPlanConfig", "Profile"]

GIB = 1024**3


@dataclass(frozen=True)
class Profile:
    """The numerics and kernels a plan assumes."""

    name: str
    """``cpu-fp32`` or ``gpu-bf16``."""
    param_bytes: int
    """Bytes per weight of the student and the teacher."""
    act_bytes: int
    """Bytes per element of activations between layers (the model dtype)."""
    optimizer_bytes: int
    """Optimizer state per trainable parameter: Adam moments (8), plus fp32 master weights (4)
    when the weights are in bf16."""


PROFILES = {
    "cpu-fp32": Profile("cpu-fp32", 4, 4, 8),
    "gpu-bf16": Profile("gpu-bf16", 2, 2, 12),
}


@dataclass(frozen=True)
class LayerShape:
    """One layer of the student as it runs (the largest budget's sub-network)."""

    kind: str
    """``mamba``, ``attention``, ``mlp`` or ``moe``."""
    width: int
    """Query heads, Mamba heads, FFN neurons or kept routed experts (whole model, not per
    rank)."""
    head_dim: int = 0
    """Mamba channels per head (0 for other kinds)."""
    active: bool = True
    """Skipped layers store nothing."""
    expert_ffn: int = 0
    """Neurons of every kept routed expert (``moe`` layers; 0 for other kinds)."""
    shared_ffn: int = 0
    """Neurons of the shared expert (``moe`` layers; 0: none, or another kind)."""


@dataclass(frozen=True)
class MemoryPlanConfig:
    """Everything the planner needs: sizes, parallel layout, batch geometry, numerics."""

    model: ModelConfig
    """The parent (the teacher, and the student's full size)."""
    parallel: ParallelConfig
    """TP, PP (and layout), SP, CP, EP (``expert_model_parallel_size``, carved out of DP x CP as
    in megatron)."""
    seq_length: int
    """Tokens per sample."""
    micro_batch_size: int
    """Samples per micro-batch."""
    num_micro_batches: int
    """Micro-batches per step and data-parallel rank (bounds 1F1B's in-flight count)."""
    data_parallel_size: int = 1
    """Replicas; the distributed optimizer shards optimizer state over them."""
    recompute: bool = False
    """Per-layer activation recomputation (``train.recompute_granularity: full``)."""
    recompute_num_layers: int | None = None
    """With ``recompute``: only the first this many layers of each stage are recomputed (the
    ``block`` method); ``None``: every layer (``uniform``)."""
    distributed_optimizer: bool = False
    """Optimizer state sharded over data-parallel ranks."""
    teacher: bool = True
    """A frozen parent copy distils the student (``distill.teacher: parent``)."""
    profile: str = "cpu-fp32"
    """A key of :data:`PROFILES`."""
    student_hidden: int | None = None
    """Embedding width of the largest budget (``None``: the parent's)."""
    student_layers: tuple[LayerShape, ...] | None = None
    """Per-layer shape of the largest budget (``None``: the parent's)."""
    router_params: int = 0
    """Parameters of the routers (fp32, Adam: 16 bytes each, on every rank)."""
    loss_chunks: int = 8
    """Token chunks of the KD loss (``distill.num_loss_chunks``)."""
    ce_trained: bool = False
    """The student's cross entropy is trained too (``distill.ce_weight > 0``)."""
    stages: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        for name in (
            "seq_length",
            "micro_batch_size",
            "num_micro_batches",
            "data_parallel_size",
            "loss_chunks",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MemoryPlanConfig.{name} must be a positive integer, got {value}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile={self.profile!r}; choose one of {sorted(PROFILES)}")
        n = self.recompute_num_layers
        if n is not None and (not self.recompute or not isinstance(n, int) or n < 1):
            raise ValueError(
                f"MemoryPlanConfig.recompute_num_layers={n!r} needs recompute=True and n >= 1"
            )
        check_parallel_fit(self.model, self.parallel)
        self.parallel.check_sequence_length(self.seq_length)
        if self.student_layers is not None and len(self.student_layers) != self.model.num_layers:
            raise ValueError(
                f"student_layers lists {len(self.student_layers)} layers, the model has "
                f"{self.model.num_layers}"
            )
        self._check_expert_parallel()
        object.__setattr__(self, "stages", self.parallel.stage_layer_counts(self.model.num_layers))

    def _check_expert_parallel(self) -> None:
        """EP must divide DP x CP (megatron carves EP out of them). ``check_parallel_fit`` has
        already refused an EP that does not divide the routed experts, or one without them."""
        ep, p = self.parallel.expert_model_parallel_size, self.parallel
        dp_cp = self.data_parallel_size * p.context_parallel_size
        if dp_cp % ep:
            raise ValueError(
                f"ParallelConfig.expert_model_parallel_size={ep} does not divide data-parallel x "
                f"context-parallel ranks = {self.data_parallel_size} x {p.context_parallel_size} "
                "(megatron carves EP out of them); use a divisor, or more ranks"
            )

    @property
    def expert_data_parallel_size(self) -> int:
        """Ranks the routed experts' optimizer state is sharded over (megatron's
        expert-data-parallel group): DP x CP / EP."""
        p = self.parallel
        return self.data_parallel_size * p.context_parallel_size // p.expert_model_parallel_size

    def layers(self) -> tuple[LayerShape, ...]:
        """The student's layers (the parent's unless ``student_layers`` is given)."""
        return self.parent_layers() if self.student_layers is None else self.student_layers

    def parent_layers(self) -> tuple[LayerShape, ...]:
        """The parent's layers (the frozen teacher's)."""
        m = self.model
        expert = m.moe_ffn_hidden_size or 0
        shared = m.moe_shared_expert_intermediate_size or 0
        return tuple(
            LayerShape(kind, width, head_dim)
            if kind != "moe"
            else LayerShape(kind, width, expert_ffn=expert, shared_ffn=shared)
            for kind, (width, head_dim) in zip(m.layer_kinds(), m.layer_sizes(), strict=True)
        )
