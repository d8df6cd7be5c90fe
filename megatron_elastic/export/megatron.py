"""The ``megatron`` export format: a budget as megatron-elastic's own checkpoint (kind
``exported``) plus ``model.yaml``, loading into a plain megatron-core ``HybridModel`` of the
exported dims. A heterogeneous budget lists its per-layer widths in ``layer_widths`` /
``layer_mamba_head_dims`` (built by the heterogeneous stack, same parameter names)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from megatron.core.models.hybrid.hybrid_model import HybridModel

from megatron_elastic.config import ModelConfig
from megatron_elastic.elastic.model import ElasticHybridModel
from megatron_elastic.elastic.subnet import SubnetSpec

__all__ = ["MODEL_YAML", "export_subnet_to_megatron", "standalone_model"]

MODEL_YAML = "model.yaml"
"""The exported model's :class:`ModelConfig`, next to the checkpoint."""


@torch.no_grad()
def standalone_model(
    model: ElasticHybridModel, spec: SubnetSpec
) -> tuple[ModelConfig, HybridModel]:
    """The sub-network ``spec`` of the (unsplit) elastic ``model`` as a plain megatron-core model
    of its own dims, holding the sliced weights."""
    from megatron_elastic.export.standalone import standalone_config, standalone_state_dict
    from megatron_elastic.model import build_hybrid_model

    cfg = standalone_config(model.model_config, spec)
    plain = build_hybrid_model(cfg, model.pg_collection)
    missing, unexpected = plain.load_state_dict(standalone_state_dict(model, spec), False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    return cfg, plain


def export_subnet_to_megatron(
    model: ElasticHybridModel,
    spec: SubnetSpec,
    directory: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the sub-network ``spec`` of the (unsplit) elastic ``model`` to ``directory``: an
    ``exported`` checkpoint whose metadata is ``metadata`` plus the parameter count and dims, and
    ``model.yaml``. Returns that metadata."""
    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.elastic.budget import subnet_param_count

    cfg, plain = standalone_model(model, spec)
    meta = {
        **(metadata or {}),
        "params": subnet_param_count(model.model_config, spec),
        "dims": dataclasses.asdict(cfg),
    }
    target = Path(directory)
    save_checkpoint(target, plain, cfg, kind="exported", metadata=meta)
    (target / MODEL_YAML).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return meta
