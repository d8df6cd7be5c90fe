"""Configuration of the architecture routers (one small MLP per elastic axis)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BUDGET_TARGETS",
    "FULL_BUDGET_MODES",
    "LATENCY_PHASES",
    "SAMPLING_MODES",
    "RouterConfig",
]

BUDGET_TARGETS = ("params", "active_params", "memory", "latency")
LATENCY_PHASES = ("decode", "prefill")
SAMPLING_MODES = ("hard", "soft")
FULL_BUDGET_MODES = ("router", "parent")

_SEED_MIX = 1_000_003  # a prime: (step, micro-batch) pairs map to distinct seeds
_SEED_MOD = 2**63


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"RouterConfig.{name} must be > 0, got {value!r}")


def _count(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"RouterConfig.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class RouterConfig:
    """How the routers are built, sampled, annealed and optimised (Nemotron Elastic §router)."""

    anneal_steps: int
    """Router steps over which temperature and logit scale move from start to end values (they
    stay at the end values afterwards)."""
    hidden_size: int = 256
    """Width of each router MLP's hidden layer."""
    temperature_start: float = 1.0
    """Gumbel-softmax temperature at step 0."""
    temperature_end: float = 0.05
    """Gumbel-softmax temperature from ``anneal_steps`` on (annealed geometrically)."""
    logit_scale_start: float = 1.0
    """Factor on the logits at step 0."""
    logit_scale_end: float = 10.0
    """Factor on the logits from ``anneal_steps`` on (grows linearly); a large scale makes the
    Gumbel noise negligible, so late samples agree with the deterministic argmax."""
    budget_target: str = "params"
    """What a budget fraction constrains: ``params`` (parameter count), ``active_params`` (what
    one token touches: an MoE layer counts its top-k routed experts; equal to ``params`` without
    MoE layers), ``memory`` (bf16 weights
    + KV cache + Mamba state at ``memory_seq_length``) or ``latency`` (seconds per token from the
    measured table ``latency_table``: a budget of 0.5 runs at twice the parent's tokens/s)."""
    latency_table: str = ""
    """Per-layer latency table (JSON by ``tools/profile_latency.py``) for ``budget_target:
    latency``, measured on the device the budgets are for."""
    latency_phase: str = "decode"
    """Which timings of ``latency_table`` the latency target uses: ``decode`` (one token with the
    table's context cached) or ``prefill`` (per prompt token)."""
    budget_loss_weight: float = 1.0
    """lambda: total loss = task loss + lambda * budget loss."""
    memory_seq_length: int = 8192
    """Tokens per sequence (batch of one) for the KV-cache part of the ``memory`` target."""
    lr: float = 1e-2
    """Peak AdamW learning rate of the router parameters (the paper's 1e-2; trained on the budget
    loss alone, 1e-3 lands on the target more reliably: 1e-2 saturates logits within ~50 steps)."""
    warmup_steps: int = 60
    """Steps of linear learning-rate warmup (0: none)."""
    sampling: str = "hard"
    """``hard``: one-hot sample, straight-through gradients (runs the chosen sub-network);
    ``soft``: probability-weighted mix of nested candidates."""
    soft_min_weight: float = 1e-3
    """Soft mode runs each axis up to the largest candidate whose extra units still weigh at least
    this much; lighter units are dropped (saves compute, changes the mix negligibly)."""
    target_tolerance: float = 0.03
    """At inference (deterministic decisions: evaluation, export, serving) the router runs its
    argmax architecture when that costs within this fraction of the budget's target; otherwise
    the most probable architecture within it (``router/calibrate.py``: a greedy search from the
    argmax, one choice at a time). The budget loss alone leaves the argmax a few percent off,
    with no bound. 0: always the plain argmax (the paper's)."""
    seed: int = 0
    """Base of the per-(step, micro-batch) sampling seeds; the same on every rank."""
    fixed: bool = False
    """No learned routing: every budget runs one fixed architecture, the elastic config's
    ``budget_choices`` for it, else the homogeneous candidate combination closest to its target
    cost (``elastic/architectures.py``); a fraction between trained budgets runs the closest
    combination too. The router's parameters are frozen and its budget loss is zero. For
    Minitron-style distillation of one pruned size and fixed-architecture baselines."""
    full_budget: str = "router"
    """What a training micro-batch of the full budget (fraction 1) runs. ``router`` (the
    paper's): a Gumbel sample of the router like every budget, so early on it trains random
    sub-networks while inference deploys the parent. ``parent``: exactly the parent, with no
    router weights on the forward (megatron's own forward, as at inference); the task loss then
    reaches the router only from the other budgets, and the budget loss of that micro-batch is
    the router's expected cost under its noiseless probabilities ``softmax(scale * logits /
    tau)`` (no Gumbel draw), which keeps teaching the full budget's logits towards the parent
    (fractions interpolated next to it read them)."""

    def __post_init__(self) -> None:
        _count("anneal_steps", self.anneal_steps, 1)
        _count("hidden_size", self.hidden_size, 1)
        _count("memory_seq_length", self.memory_seq_length, 1)
        _count("warmup_steps", self.warmup_steps, 0)
        _count("seed", self.seed, 0)
        for name in ("temperature_start", "temperature_end", "logit_scale_start"):
            _positive(name, getattr(self, name))
        _positive("logit_scale_end", self.logit_scale_end)
        _positive("lr", self.lr)
        if self.temperature_end > self.temperature_start:
            raise ValueError(
                f"RouterConfig.temperature_end={self.temperature_end} exceeds temperature_start="
                f"{self.temperature_start}; the temperature anneals downwards, swap them"
            )
        if self.budget_target not in BUDGET_TARGETS:
            raise ValueError(
                f"RouterConfig.budget_target={self.budget_target!r}; choose one of {BUDGET_TARGETS}"
            )
        if self.budget_target == "latency" and not self.latency_table:
            raise ValueError(
                "RouterConfig.budget_target='latency' needs latency_table: a JSON file written by "
                "tools/profile_latency.py --config RECIPE --output lut.json"
            )
        if self.latency_phase not in LATENCY_PHASES:
            raise ValueError(
                f"RouterConfig.latency_phase={self.latency_phase!r}; choose one of {LATENCY_PHASES}"
            )
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(
                f"RouterConfig.sampling={self.sampling!r}; choose one of {SAMPLING_MODES}"
            )
        if not self.budget_loss_weight >= 0:
            raise ValueError(
                f"RouterConfig.budget_loss_weight must be >= 0, got {self.budget_loss_weight}"
            )
        if not 0 <= self.target_tolerance < 1:
            raise ValueError(
                f"RouterConfig.target_tolerance must be in [0, 1), got {self.target_tolerance}"
            )
        if not isinstance(self.fixed, bool):
            raise ValueError(f"RouterConfig.fixed must be true or false, got {self.fixed!r}")
        if self.full_budget not in FULL_BUDGET_MODES:
            raise ValueError(
                f"RouterConfig.full_budget={self.full_budget!r}; choose one of "
                f"{FULL_BUDGET_MODES} (router is the paper's)"
            )
        if not 0 <= self.soft_min_weight < 1:
            raise ValueError(
                f"RouterConfig.soft_min_weight must be in [0, 1), got {self.soft_min_weight}"
            )

    def generator(
        self, step: int, micro_batch: int = 0, device: str | torch.device = "cpu"
    ) -> torch.Generator:
        """A fresh generator for one decision, seeded from (seed, step, micro-batch) alone, so
        every rank draws the same architecture without sharing any RNG state."""
        seed = ((self.seed * _SEED_MIX + step) * _SEED_MIX + micro_batch) % _SEED_MOD
        return torch.Generator(device=device).manual_seed(seed)
