"""Test scaffolding: the inputs a training stage reads (tokenizer, indexed dataset, a parent)."""

from __future__ import annotations

from pathlib import Path

from megatron_elastic.config import load_model_config


def write_training_workspace(
    root: Path, model_yaml: Path, pgs, *, records: int, seed: int, model_seed: int | None = None
) -> tuple[Path, Path]:
    """What a training stage reads, under ``root``: a 512-token BPE tokenizer and an indexed
    dataset of ``records`` generated reasoning texts, and a saved random parent of
    ``model_yaml`` (``model_seed``: torch's seed before building it). Returns (root, prefix)."""
    import torch

    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.data import (
        generate_records,
        render_text,
        train_bpe_tokenizer,
        write_indexed_dataset,
    )
    from megatron_elastic.model import build_hybrid_model

    texts = [render_text(r) for r in generate_records(records, seed=seed)]
    tokenizer = train_bpe_tokenizer(texts, 512, root / "tokenizer.json")
    prefix = write_indexed_dataset(
        root / "data", ([*tokenizer.encode(t), tokenizer.eod] for t in texts), 512
    )
    cfg = load_model_config(model_yaml)
    if model_seed is not None:
        torch.manual_seed(model_seed)
    save_checkpoint(root / "parent", build_hybrid_model(cfg, pgs), cfg, kind="ranked")
    return root, prefix
