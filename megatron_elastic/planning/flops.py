"""FLOPs of a training step of the hybrid stack, per sub-network, for tokens/s and MFU.

Convention (Megatron-LM's ``num_floating_point_operations``): a GEMM of an (m, k) by a (k, n)
matrix is ``2 m k n`` FLOPs; a step is ``3 x`` the forward (backward = data gradient + weight
gradient, each as large as the forward GEMM); causal attention counts half of the score and
value products (``QK^T`` and ``AV``: ``2 x 2 s^2 d`` per head and sample, halved); norms,
activations, softmax, router weights, depth gates and losses are not counted (elementwise, a few
FLOPs per element against a GEMM's ``2 h``).

Per layer and per token of one micro-batch (``h`` the sub-network's embedding width):

* Mamba-2 mixer (``nh`` heads of ``p`` channels, ``g`` groups, state ``n``, conv kernel ``k``,
  chunk ``L``): ``in_proj`` ``2 h (2 nh p + 2 g n + nh)``, ``out_proj`` ``2 nh p h``, the depthwise
  causal conv over ``nh p + 2 g n`` channels ``2 k (nh p + 2 g n)``, and the chunked SSD scan as
  mamba-ssm's kernels compute it (chunk ``Q = min(L, s)``): within-chunk scores ``C B^T`` per
  group ``2 g Q n``, outputs ``2 nh p Q``, chunk states ``2 nh p n`` and their contribution to
  the outputs ``2 nh p n`` (the state passing between chunks is ``O(nh p n)`` per chunk, not
  counted); ``benchmarks/bench_gpu_step.py`` counts its MFU with this module. Megatron-LM
  counts the scan as ``7 d_in n`` (with ``d_in = 2 h``) and no conv. (The CPU scan,
  ``model/ssd_scan.py``, does more: scores per head, the sequence padded to whole chunks, and
  states passed by a ``(c+1) x (c+1)`` product; ``tests/unit/test_step_metrics.py`` counts it.)
* Attention (``nq`` query heads of ``d``, ``G`` key/value groups): QKV ``2 h (nq + 2 G) d``,
  output ``2 nq d h``, scores and values ``2 s nq d`` (``4 s nq d`` halved by the causal mask).
  For a pure-attention stack this is Megatron-LM's formula term for term
  (``2 h (q + k + v) + 2 q s / 2 * 2 + 2 q h`` per token with ``q = nq d``, ``k = v = G d``).
* MLP (squared ReLU, not gated): ``2 x 2 h f``. Megatron-LM: the same (``swiglu`` off).
* Logits: ``2 h V`` (the untied output layer; the embedding is a lookup).

A training step of ``M`` micro-batches runs, per micro-batch: the student's forward and backward
(``3 x`` its forward; ``4 x`` with activation recomputation, which runs its forward twice) and,
under distillation, the frozen teacher's forward (``1 x`` the parent's forward). *Model FLOPs*
(for MFU) count the student ``3 x`` (recomputation is not useful work); *hardware FLOPs* (HFU)
add the recomputed forward of the student's layers (not of its output layer, which is not
recomputed).
"""

from __future__ import annotations

from collections.abc import Mapping

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.subnet import LayerChoice, SubnetSpec

__all__ = [
    "PEAK_TFLOPS",
    "StepFlops",
    "forward_flops",
    "layer_forward_flops",
    "peak_flops",
    "step_flops",
]

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peak TFLOP/s by device-name substring (NVIDIA's data sheets, SXM; the
H100 PCIe's 756 is not told apart: set ``logging.peak_tflops`` there)."""


def peak_flops(device_name: str | None, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device: ``override_tflops`` if given, else :data:`PEAK_TFLOPS` by the
    first key found in ``device_name`` (``torch.cuda.get_device_name``); ``None`` when unknown
    (CPU without an override): MFU is then not reported."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if not device_name:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # GH200 before H200
        if key in device_name:
            return PEAK_TFLOPS[key] * 1e12
    return None


def layer_forward_flops(
    model: ModelConfig, layer: LayerChoice, hidden: int, *, seq_length: int, batch: int
) -> dict[str, float]:
    """Forward FLOPs of one layer of a sub-network on ``batch`` samples of ``seq_length``
    tokens, by term: ``gemm`` (weight matrices), ``attention`` (causal-halved scores and values),
    ``conv`` and ``scan`` (Mamba). An inactive layer is skipped: nothing."""
    if not layer.active:
        return {}
    t, h = batch * seq_length, hidden
    if layer.kind == "mlp":
        return {"gemm": 2 * t * 2 * h * layer.width}
    if layer.kind == "attention":
        q, kv = layer.width * model.head_dim, model.num_query_groups * model.head_dim
        return {
            "gemm": 2 * t * (h * (q + 2 * kv) + q * h),
            "attention": 2 * t * seq_length * q,  # 2 products x 2 s q, halved (causal)
        }
    nh, p, g, n = layer.width, layer.head_dim, model.mamba_num_groups, model.mamba_state_dim
    inner, gn, q = nh * p, g * n, min(model.mamba_chunk_size, seq_length)
    return {
        "gemm": 2 * t * (h * (2 * inner + 2 * gn + nh) + inner * h),
        "conv": 2 * t * model.mamba_conv_kernel * (inner + 2 * gn),
        "scan": t * (2 * g * q * n + inner * (2 * q + 4 * n)),
    }


def forward_flops(
    model: ModelConfig, spec: SubnetSpec | None, *, seq_length: int, batch: int
) -> dict[str, float]:
    """Forward FLOPs of ``spec`` (``None``: the parent) on ``batch`` samples, by term (see
    :func:`layer_forward_flops`; the logits are a ``gemm``)."""
    spec = spec or SubnetSpec.full(model)
    terms = {"gemm": 2.0 * batch * seq_length * spec.hidden * model.vocab_size}
    for layer in spec.layers:
        for key, value in layer_forward_flops(
            model, layer, spec.hidden, seq_length=seq_length, batch=batch
        ).items():
            terms[key] = terms.get(key, 0.0) + value
    return terms


class StepFlops:
    """FLOPs of training steps of one recipe: per-budget forward FLOPs of one micro-batch, cached
    per architecture (the router's choice changes as it trains)."""

    def __init__(
        self,
        model: ModelConfig,
        *,
        seq_length: int,
        micro_batch_size: int,
        teacher: bool,
        recompute: bool,
        full_width: bool = False,
    ) -> None:
        """``teacher``: a frozen full-size teacher runs a forward per micro-batch;
        ``full_width``: the student computes at full size whatever its budget (elastic ``mask``
        mode, which zeroes channels instead of cutting them)."""
        self.model, self.seq, self.mbs = model, seq_length, micro_batch_size
        self.teacher, self.recompute, self.full_width = teacher, recompute, full_width
        self._cache: dict[SubnetSpec | None, tuple[float, float]] = {}

    def _terms(self, spec: SubnetSpec | None) -> tuple[float, float]:
        key = None if self.full_width else spec
        if key not in self._cache:
            terms = forward_flops(self.model, key, seq_length=self.seq, batch=self.mbs)
            hidden = (key or SubnetSpec.full(self.model)).hidden
            logits = 2.0 * self.mbs * self.seq * hidden * self.model.vocab_size
            self._cache[key] = (sum(terms.values()), logits)
        return self._cache[key]

    def forward(self, spec: SubnetSpec | None) -> float:
        """Forward FLOPs of one micro-batch through ``spec``."""
        return self._terms(spec)[0]

    def step(self, micro_batches: Mapping[SubnetSpec | None, float]) -> tuple[float, float]:
        """(model FLOPs, hardware FLOPs) of the micro-batches run through each architecture
        (``{spec: count}``, all data-parallel replicas together)."""
        model = hardware = 0.0
        teacher = self.forward(None) if self.teacher else 0.0
        for spec, count in micro_batches.items():
            student, logits = self._terms(spec)
            model += count * (3 * student + teacher)
            recomputed = student - logits if self.recompute else 0.0
            hardware += count * (3 * student + teacher + recomputed)
        return model, hardware


def step_flops(
    model: ModelConfig,
    micro_batches: Mapping[SubnetSpec | None, float],
    *,
    seq_length: int,
    micro_batch_size: int,
    teacher: bool,
    recompute: bool = False,
) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step (see :class:`StepFlops`)."""
    flops = StepFlops(
        model,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        teacher=teacher,
        recompute=recompute,
    )
    return flops.step(micro_batches)
