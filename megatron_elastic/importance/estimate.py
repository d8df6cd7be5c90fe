"""The importance pass end to end on a (elastic) parent: statistics, rankings, layer order, and
the ranked weights loaded back into the model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_elastic.elastic.model import ElasticHybridModel
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.importance.calibration import collect_activation_stats
from megatron_elastic.importance.permute import apply_ranking
from megatron_elastic.importance.scores import Ranking, iterative_layer_ranking, rank_from_stats
from megatron_elastic.model.sharding import gather_full_tensors, load_full_state_dict
from megatron_elastic.training.lm_step import position_ids_like

__all__ = ["estimate_importance", "rank_model", "logits_error_fn"]

Batch = dict[str, torch.Tensor]


def logits_error_fn(
    model: ElasticHybridModel, batches: Sequence[Batch], pgs: ProcessGroupCollection
):
    """``removed -> sum (M_full - M_removed)^2 / sum M_full^2`` over ``batches`` (reduced over TP
    shards of the vocabulary and over data-parallel replicas)."""
    cfg = model.model_config

    @torch.no_grad()
    def logits(removed: Sequence[int] | None) -> list[torch.Tensor]:
        if removed:
            full = SubnetSpec.full(cfg)
            spec = SubnetSpec(
                full.hidden,
                tuple(
                    c if i not in removed else replace(c, active=False)
                    for i, c in enumerate(full.layers)
                ),
            )
            model.set_subnet(spec, mode="slice")
        else:
            model.set_subnet(None)
        try:
            return [
                model(b["tokens"], position_ids_like(b["tokens"]), None).float() for b in batches
            ]
        finally:
            model.set_subnet(None)

    reference = logits(None)

    def error(removed: Sequence[int]) -> float:
        num = torch.zeros(2, device=reference[0].device)  # NCCL reduces device tensors
        for ref, out in zip(reference, logits(removed), strict=True):
            num += torch.stack([(ref - out).pow(2).sum(), ref.pow(2).sum()])
        for group in (pgs.tp, pgs.dp):
            if group.size() > 1:
                dist.all_reduce(num, group=group)
        return (num[0] / num[1]).item()

    return error


def estimate_importance(
    model: ElasticHybridModel,
    batches: Sequence[Batch],
    pgs: ProcessGroupCollection,
    *,
    rank_layers: bool = True,
) -> Ranking:
    """Rank every axis of ``model`` (running the parent) on calibration ``batches``."""
    model.set_subnet(None)
    stats = collect_activation_stats(model, batches, pgs)
    elastic = model.elastic_config
    top = min(elastic.mamba_head_dim_choices) if elastic.mamba_head_dim_choices else None
    ranking = rank_from_stats(
        model.model_config,
        stats,
        mamba_top_channels=top,
        moe_expert_nesting_blocks=elastic.moe_expert_nesting_blocks,
    )
    if rank_layers:
        order, errors = iterative_layer_ranking(
            model.model_config.num_layers,
            logits_error_fn(model, batches, pgs),
            kinds=model.model_config.layer_kinds(),
            min_attention_layers=elastic.min_attention_layers,
        )
        ranking.layers = order
        dropped = order[::-1][: len(errors)]
        ranking.scores["layer_removal_error"] = {
            str(j): e for j, e in zip(dropped, errors, strict=True)
        }
    return ranking


@torch.no_grad()
def rank_model(model: ElasticHybridModel, ranking: Ranking, pgs: ProcessGroupCollection) -> None:
    """Permute ``model``'s weights in place (every rank its shard) into ``ranking``'s order."""
    local = {n: p.detach() for n, p in model.named_parameters()}
    full = gather_full_tensors(model, local, pgs)
    # E layers' routers hold a buffer that moves with the experts (not split over TP)
    biases = {
        f"decoder.layers.{layer.layer_number - 1}.mlp.router.expert_bias": router.expert_bias
        for layer in model.decoder.layers
        if (router := getattr(getattr(layer, "mlp", None), "router", None)) is not None
        and router.expert_bias is not None
    }
    full.update({key: bias.detach() for key, bias in biases.items()})
    ranked = apply_ranking(
        full,
        model.model_config,
        ranking,
        ffn_nesting_blocks=model.elastic_config.ffn_nesting_blocks,
    )
    load_full_state_dict(model, ranked, pgs)
    for key, bias in biases.items():
        bias.copy_(ranked[key])
