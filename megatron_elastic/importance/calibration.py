"""Forward-only activation statistics for importance estimation.

Hooks exist only inside :func:`collect_activation_stats` (a registry that owns its handles and
removes them in ``finally``); statistics accumulate in float32 on this rank, are gathered across
tensor-parallel shards (into the unsplit order) and summed across data-parallel replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from torch import nn

from megatron_elastic.model.layouts import MambaLayout
from megatron_elastic.model.norm import RMSNorm
from megatron_elastic.training.lm_step import position_ids_like

__all__ = ["ActivationStats", "collect_activation_stats"]


@dataclass
class ActivationStats:
    """Sums over calibration tokens, in the unsplit (TP=1) order, keyed by global layer index."""

    hidden: torch.Tensor | None = None
    """(hidden,) sum of |RMSNorm output| over every norm of the model (embedding channels)."""
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per layer, the statistic its kind's axes are ranked from (``Axis.rank``):

    - MLP: (ffn,) sum of |fc1 pre-activation| per neuron;
    - Mamba: (heads, head_dim) sum of squares of the x projection ``LN(X) W_x^T``;
    - attention: (heads,) sum of squares of each head's attention output;
    - MoE: ``[reap (E), routed (E), neurons (E x F), shared (S)]``: per expert the sum over the
      tokens routed to it of gate weight x its output's norm, and their count; per expert and
      shared-expert neuron the sum of |fc1 pre-activation|
      (:func:`~megatron_elastic.elastic.moe_axes.split_moe_stat`)."""
    tokens: int = 0


def _accumulate(store: dict, key, value: torch.Tensor) -> None:
    value = value.detach().float()
    store[key] = store[key] + value if key in store else value


class _HookRegistry:
    """Registers one statistic hook per supported module type; owns and removes the handles."""

    def __init__(self, model: nn.Module, stats: dict) -> None:
        self.handles: list = []
        self.stats = stats
        self.model = model

    def __enter__(self) -> _HookRegistry:
        handlers: dict[type, Callable] = {
            RMSNorm: self._norm,
            MLP: self._mlp,
            MambaMixer: self._mamba,
            SelfAttention: self._attention,
        }
        for layer in self.model.decoder.layers:
            j = layer.layer_number - 1
            moe = [m for m in layer.modules() if isinstance(m, MoELayer)]
            experts = {id(m) for e in moe for m in e.modules()}
            for module in layer.modules():
                if isinstance(module, MoELayer):
                    self._moe(module, j)
                if id(module) in experts and isinstance(module, MLP):
                    continue  # an expert: the MoE statistic covers it
                for cls, handler in handlers.items():
                    if isinstance(module, cls):
                        handler(module, j)
        final = getattr(self.model.decoder, "final_norm", None)
        if isinstance(final, RMSNorm):
            self._norm(final, -1)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _norm(self, module: nn.Module, j: int) -> None:
        def hook(_m, _inp, out):
            _accumulate(self.stats["hidden"], 0, out.abs().sum(dim=(0, 1)))

        self.handles.append(module.register_forward_hook(hook))

    def _mlp(self, module: MLP, j: int) -> None:
        def hook(_m, _inp, out):
            _accumulate(self.stats["layers"], j, out[0].abs().sum(dim=(0, 1)))

        self.handles.append(module.linear_fc1.register_forward_hook(hook))

    def _mamba(self, module: MambaMixer, j: int) -> None:
        heads, p = module.nheads_local_tp, module.headdim
        layout = MambaLayout(heads, p, module.ngroups_local_tp, module.d_state)

        def hook(_m, _inp, out):
            x = layout.in_proj.segment(out[0], "x").float()
            _accumulate(self.stats["layers"], j, x.pow(2).sum(dim=(0, 1)).view(heads, p))

        self.handles.append(module.in_proj.register_forward_hook(hook))

    def _moe(self, module: MoELayer, j: int) -> None:
        if module.tp_group.size() > 1 or module.num_local_experts != module.config.num_moe_experts:
            raise ValueError(
                "importance estimation of 'E' (mixture-of-experts) layers runs at "
                "tensor_parallel_size=1 without expert parallelism (issue 26 step 5)"
            )
        routed = {}

        def router_hook(_m, _inp, out):
            routed["probs"], routed["map"] = out

        def layer_hook(_m, args, kwargs, _out):
            hidden = args[0] if args else kwargs["hidden_states"]
            x = hidden.reshape(-1, hidden.size(-1))
            stat = _moe_statistic(module, x, routed.pop("probs"), routed.pop("map"))
            _accumulate(self.stats["layers"], j, stat)

        self.handles.append(module.router.register_forward_hook(router_hook))
        self.handles.append(module.register_forward_hook(layer_hook, with_kwargs=True))

    def _attention(self, module: SelfAttention, j: int) -> None:
        heads = module.num_attention_heads_per_partition

        def hook(_m, inp):
            ctx = inp[0].float()  # (s, b, heads * d): input of the output projection
            per_head = ctx.pow(2).view(*ctx.shape[:2], heads, -1).sum(dim=(0, 1, 3))
            _accumulate(self.stats["layers"], j, per_head)

        self.handles.append(module.linear_proj.register_forward_pre_hook(hook))


def _moe_statistic(module: MoELayer, x: torch.Tensor, probs, routing_map) -> torch.Tensor:
    """One ``E`` layer's statistic for the tokens ``x`` (its experts rerun on their tokens)."""
    act = module.config.activation_func
    reap, routed, neurons = [], [], []
    for e, expert in enumerate(module.experts.local_experts):
        tokens = routing_map[:, e].nonzero().squeeze(-1)
        pre = expert.linear_fc1(x[tokens])[0].float()
        out = expert.linear_fc2(act(pre).to(x.dtype))[0].float()
        reap.append((probs[tokens, e].float() * out.norm(dim=-1)).sum())
        routed.append(torch.tensor(float(len(tokens)), device=x.device))
        neurons.append(pre.abs().sum(0))
    parts = [torch.stack(reap), torch.stack(routed), *neurons]
    if module.shared_experts is not None:
        parts.append(module.shared_experts.linear_fc1(x)[0].float().abs().sum(0))
    return torch.cat([p.reshape(-1) for p in parts])


def _gather_tp(t: torch.Tensor, pgs: ProcessGroupCollection) -> torch.Tensor:
    """Concatenate TP shards along dim 0 (ranks hold contiguous heads / neurons)."""
    if pgs.tp.size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(pgs.tp.size())]
    dist.all_gather(parts, t.contiguous(), group=pgs.tp)
    return torch.cat(parts, dim=0)


def _sum_dp(t: torch.Tensor, pgs: ProcessGroupCollection) -> torch.Tensor:
    if pgs.dp.size() > 1:
        dist.all_reduce(t, group=pgs.dp)
    return t


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], pgs: ProcessGroupCollection
) -> ActivationStats:
    """Run ``model`` (the parent, pipeline-parallel size 1) over calibration ``batches`` (each with
    ``tokens`` (b, s)) and return the statistics every importance score is computed from."""
    if pgs.pp.size() != 1:
        raise ValueError(
            "importance estimation runs with pipeline_parallel_size=1 (tensor and data "
            "parallelism are supported); re-launch with PP=1"
        )
    raw: dict = {"hidden": {}, "layers": {}}
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        with _HookRegistry(model, raw):
            for batch in batches:
                ids = batch["tokens"]
                model(ids, position_ids_like(ids), None)
                tokens += ids.numel()
    finally:
        model.train(was_training)
    if not raw["hidden"]:
        raise ValueError("no calibration batches were given")
    count = _sum_dp(torch.tensor([float(tokens)]), pgs)
    return ActivationStats(
        hidden=_sum_dp(raw["hidden"][0], pgs),
        layers={j: _sum_dp(_gather_tp(v, pgs), pgs) for j, v in sorted(raw["layers"].items())},
        tokens=int(count.item()),
    )
