"""Rank a parent checkpoint's components and write the ranked (permuted) parent: what
``tools/estimate_importance.py`` runs.

Forward passes only: embedding channels, FFN neurons, Mamba heads and head channels, attention
heads (within their groups) and layers (iterative normalised MSE of the logits). The weights are
permuted so every nested sub-network is a prefix of the most important components; the model's
function does not change. Writes the ranked checkpoint and a readable ``importance.json`` in it.
Runs under torchrun for tensor/data parallelism (pipeline parallel size 1).

``backend="modelopt"`` ranks with NVIDIA ModelOpt's Minitron importance (``mcore_minitron``)
instead, then permutes the same way. It needs a CUDA GPU with Transformer Engine and runs in one
process with TP=1 (ModelOpt's limits); see docs/benchmarks.md for how the two backends agree.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

__all__ = ["BACKENDS", "check_modelopt_backend", "rank_parent"]

BACKENDS = ("native", "modelopt")
"""native: this package's scores (runs everywhere); modelopt: ModelOpt's Minitron importance."""

_say = functools.partial(print, flush=True)


def check_modelopt_backend(tensor_parallel_size: int) -> None:
    """ValueError (before any heavy work) where ``backend="modelopt"`` cannot run."""
    if tensor_parallel_size != 1 or int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError(
            "--backend modelopt runs in one process with --tensor-parallel-size 1 (ModelOpt's "
            "Minitron pruning supports TP=1 only); drop torchrun/--tensor-parallel-size, or use "
            "--backend native for tensor/data parallelism"
        )
    from megatron_elastic.importance.modelopt_backend import modelopt_available

    reason = modelopt_available()
    if reason is not None:
        raise ValueError(reason)


def rank_parent(
    checkpoint: str,
    data: str,
    output: str,
    *,
    elastic_config: str | None = None,
    model_config: str | None = None,
    ffn_nesting_blocks: int | None = None,
    num_samples: int = 64,
    seq_length: int = 512,
    batch_size: int = 4,
    no_layer_ranking: bool = False,
    backend: str = "native",
    tensor_parallel_size: int = 1,
    seed: int = 1234,
    log: Callable[[str], None] = _say,
) -> Path:
    """Rank the parent ``checkpoint`` on ``num_samples`` calibration sequences of the indexed
    dataset ``data`` and save the ranked parent to ``output``. The model and its FFN nesting
    blocks come from the elastic recipe ``elastic_config``, or from the model YAML
    ``model_config`` and ``ffn_nesting_blocks``. Returns ``output``."""
    from megatron_elastic.checkpoint import load_checkpoint, read_manifest, save_checkpoint
    from megatron_elastic.config import ParallelConfig, load_model_config
    from megatron_elastic.data import calibration_batches, check_prefix
    from megatron_elastic.elastic import ElasticConfig, build_elastic_model, load_elastic_recipe
    from megatron_elastic.importance.estimate import estimate_importance, rank_model
    from megatron_elastic.importance.scores import keep_attention_first
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    if elastic_config:
        model_cfg, elastic = load_elastic_recipe(elastic_config)
    else:
        model_cfg = load_model_config(model_config)
        elastic = ElasticConfig(budgets={"parent": 1.0}, ffn_nesting_blocks=ffn_nesting_blocks or 1)
    if backend == "modelopt":
        check_modelopt_backend(tensor_parallel_size)
    check_prefix(data)
    read_manifest(checkpoint)
    parallel = ParallelConfig(tensor_parallel_size=tensor_parallel_size)
    elastic.validate_for(model_cfg, parallel)

    pgs = init_process_groups(parallel, seed=seed)
    model = build_elastic_model(model_cfg, elastic, pgs, parallel)
    source = load_checkpoint(checkpoint, model, model_cfg, kinds=("parent",))
    batches = calibration_batches(
        data,
        num_samples=num_samples,
        seq_length=seq_length,
        batch_size=batch_size,
        seed=seed + pgs.dp.rank(),
    )
    start = time.time()
    if backend == "modelopt":
        from megatron_elastic.importance.modelopt_backend import run_minitron_importance

        ranking = run_minitron_importance(model_cfg, model, batches, pgs)
        if no_layer_ranking:
            ranking.layers = None
        elif ranking.layers is not None:  # ModelOpt's one-shot order knows no layer kinds
            ranking.layers = keep_attention_first(
                ranking.layers, model_cfg.layer_kinds(), elastic.min_attention_layers
            )
    else:
        ranking = estimate_importance(model, batches, pgs, rank_layers=not no_layer_ranking)
    rank_model(model, ranking, pgs)
    out = Path(output)
    meta = {
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "source_kind": source["kind"],
        "data": str(data),
        "num_samples": num_samples,
        "seq_length": seq_length,
        "backend": backend,
        "ffn_nesting_blocks": elastic.ffn_nesting_blocks,
        "moe_expert_nesting_blocks": elastic.moe_expert_nesting_blocks,
        "layer_ranking": ranking.layers,
        "min_attention_layers": elastic.min_attention_layers,
    }
    save_checkpoint(out, model, model_cfg, kind="ranked", metadata=meta)
    if pgs.tp.rank() == 0 and pgs.dp.rank() == 0:
        (out / "importance.json").write_text(json.dumps({**meta, **ranking.to_json()}, indent=1))
        log(
            f"ranked parent written to {out} in {time.time() - start:.1f}s "
            f"(layer ranking: {ranking.layers})"
        )
    if dist.is_initialized():
        dist.barrier()
    destroy_process_groups()
    return out
