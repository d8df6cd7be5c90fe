"""The decode state of one budget: key/value caches of its attention layers and conv + SSM
states of its Mamba layers, sized to the sub-network that runs (its key/value groups, its active
Mamba channels and heads); skipped layers have none.

Why not ``megatron.core.inference``: its contexts size caches from the full model config, its
Mamba decode step runs the *full* mixer's parameters one token at a time (the torch fallback
asserts ``seq_len == 1``; the multi-token path needs the Triton/causal-conv1d kernels, CUDA only),
it keeps no per-token Mamba states for rolling back a rejected speculative suffix, and the
elastic layers run the active slices of the weights, not megatron's modules. So the serving path
keeps its own state here and one functional forward (:mod:`.forward`) over the same tensors.

Rollback: after :meth:`InferenceState.mark`, every forward keeps the conv window it ran on and the
SSM state after each of its tokens (which its chunk computation returns anyway, see
:func:`.forward.chunk_states`), so :meth:`InferenceState.rollback` can return the state to any
length between the mark and now by slicing them, exactly as if only that prefix had been fed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_elastic.serving.net import ServingLayer, ServingNet

__all__ = ["AttentionCache", "MambaCache", "InferenceState"]


@dataclass
class AttentionCache:
    """Keys and values of every cached position: (b, capacity, groups, head_dim) each."""

    key: torch.Tensor
    value: torch.Tensor


@dataclass
class MambaCache:
    """The last ``kernel - 1`` conv inputs (b, C, kernel-1) and the SSM state (b, h, p, n), fp32."""

    conv: torch.Tensor
    ssm: torch.Tensor
    marked: tuple[torch.Tensor, torch.Tensor] | None = None
    """The (conv, ssm) state at the mark."""
    log: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Since the mark, per forward: the conv window it ran on (b, C, K-1+s: the conv state before
    it, then its s inputs) and the SSM state after each of its tokens (b, s, h, p, n). The state
    after any token is a slice of these: nothing is recomputed or copied to roll back."""

    def state_after(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv, ssm) after the first ``tokens`` tokens fed since the mark."""
        assert self.marked is not None
        if tokens == 0:
            return self.marked
        kernel_1 = self.conv.size(-1)
        for window, states in self.log:
            s = states.size(1)
            if tokens <= s:
                return window[..., tokens : tokens + kernel_1], states[:, tokens - 1]
            tokens -= s
        raise AssertionError("more tokens than were fed since the mark")


class InferenceState:
    """Caches of one :class:`ServingNet` for ``batch`` rows of up to ``capacity`` tokens.

    ``lengths[i]`` tokens of row ``i`` are cached (known on the host: they grow by the tokens
    fed, so sizing the next step needs no device sync).
    """

    def __init__(self, net: ServingNet, batch: int, capacity: int) -> None:
        if capacity > net.max_sequence_length:
            raise ValueError(
                f"{capacity} tokens exceed the model's max_sequence_length "
                f"{net.max_sequence_length}; shorten the prompt or lower max_new_tokens"
            )
        self.capacity = capacity
        self.lengths = [0] * batch
        self.layers: dict[int, AttentionCache | MambaCache] = {}
        self._mark: list[int] | None = None
        for layer in net.layers:
            cache = _allocate(layer, net, batch, capacity)
            if cache is not None:
                self.layers[layer.index] = cache

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @classmethod
    def stack(cls, states: list[InferenceState]) -> InferenceState:
        """One batched state from single-row ones of equal capacity (rows may differ in length)."""
        out = cls.__new__(cls)
        out.capacity = states[0].capacity
        out.lengths = [n for s in states for n in s.lengths]
        out._mark = None
        out.layers = {}
        for index, first in states[0].layers.items():
            parts = [s.layers[index] for s in states]
            if isinstance(first, AttentionCache):
                out.layers[index] = AttentionCache(
                    torch.cat([p.key for p in parts]), torch.cat([p.value for p in parts])
                )
            else:
                out.layers[index] = MambaCache(
                    torch.cat([p.conv for p in parts]), torch.cat([p.ssm for p in parts])
                )
        return out

    # -- rollback -------------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        return self._mark is not None

    def mark(self) -> None:
        """Start recording: later forwards can be undone back to the lengths of now."""
        self._mark = list(self.lengths)
        for cache in self.layers.values():
            if isinstance(cache, MambaCache):
                cache.marked, cache.log = (cache.conv, cache.ssm), []

    def rollback(self, length: int) -> None:
        """Keep the first ``length`` tokens of every row (same number of tokens fed since the mark
        in every row); the state becomes the one computed on that prefix alone. Ends recording."""
        if self._mark is None:
            raise RuntimeError("rollback needs a mark() before the forwards it undoes")
        fed = [n - m for n, m in zip(self.lengths, self._mark, strict=True)]
        keep = length - self._mark[0]
        if len(set(fed)) != 1:
            raise RuntimeError("rows were fed different numbers of tokens since the mark")
        if not 0 <= keep <= fed[0]:
            raise ValueError(f"can roll back to {self._mark[0]}..{self.lengths[0]}, not {length}")
        for cache in self.layers.values():
            if isinstance(cache, MambaCache):
                cache.conv, cache.ssm = cache.state_after(keep)
        # attention: positions past the new length are overwritten by the next tokens fed
        self.lengths = [m + keep for m in self._mark]
        self.commit()

    def commit(self) -> None:
        """Stop recording (drops the logs)."""
        self._mark = None
        for cache in self.layers.values():
            if isinstance(cache, MambaCache):
                cache.marked, cache.log = None, []


def _allocate(
    layer: ServingLayer, net: ServingNet, batch: int, capacity: int
) -> AttentionCache | MambaCache | None:
    kwargs = {"dtype": net.dtype, "device": net.device}
    if layer.kind == "attention":
        shape = (batch, capacity, layer.num_groups, layer.head_dim)
        return AttentionCache(torch.zeros(shape, **kwargs), torch.zeros(shape, **kwargs))
    if layer.kind == "mamba":
        channels = layer.weights["conv_weight"].size(0)
        conv = torch.zeros(batch, channels, net.conv_kernel - 1, **kwargs)
        ssm = torch.zeros(
            batch,
            layer.num_heads,
            layer.head_dim,
            layer.state_dim,
            dtype=torch.float32,
            device=net.device,
        )
        return MambaCache(conv, ssm)
    return None
