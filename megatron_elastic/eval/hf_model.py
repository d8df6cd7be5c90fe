"""An exported Hugging Face directory opened for evaluation with the elastic model's metrics.

``tools/export_budget.py --format hf`` writes a stock NemotronH directory (or, for a heterogeneous
budget, one with remote code and ``auto_map``) plus ``export_manifest.json``. Here such a
directory (or any causal-LM directory with a ``config.json``) is loaded with transformers and
wrapped so that it is called like a megatron language model: the same
:func:`~megatron_elastic.eval.loss.validation_loss` and
:func:`~megatron_elastic.eval.generate.greedy_generate` run on it unchanged, so the loss and the
decoded tokens are those of the elastic model's evaluation, not of a second implementation.

    ckpt = open_hf_checkpoint("runs/export/50%")
    ckpt.set_budget(ckpt.budgets()[0])
    validation_loss(ckpt.model, batches)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron_elastic.checkpoint import MANIFEST
from megatron_elastic.data.tokenizers import Tokenizer, load_tokenizer
from megatron_elastic.export.hf import (
    EXPORT_MANIFEST,
    hf_weight_files,
    read_hf_config,
    use_torch_nemotron_h_kernels,
)
from megatron_elastic.files import read_json
from megatron_elastic.platform import default_device

__all__ = [
    "HF_KINDS",
    "HFCausalLM",
    "HFDirectory",
    "HFEvalCheckpoint",
    "is_hf_directory",
    "load_hf_eval_tokenizer",
    "open_hf_checkpoint",
    "read_hf_directory",
]

HF_KINDS = ("hf", "hf-remote-code")
"""Kinds of an HF directory: stock architecture, or remote code (``auto_map`` in config.json)."""

_CONFIG = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def is_hf_directory(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model directory (a ``config.json``, with or without
    ``export_manifest.json``) rather than a megatron checkpoint (``manifest.json``)."""
    path = Path(path)
    return (path / _CONFIG).is_file() and not (path / MANIFEST).is_file()


@dataclass(frozen=True)
class HFDirectory:
    """An HF model directory read without its weights: enough to check budgets, sequence length
    and tokenizer before the slow load."""

    path: Path
    """The directory."""
    config: dict[str, Any]
    """Its ``config.json``."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """Its ``export_manifest.json`` (empty for a directory not written by our export)."""

    @property
    def remote_code(self) -> bool:
        """The model class is shipped in the directory (``auto_map``): needs trust_remote_code."""
        return "auto_map" in self.config

    @property
    def kind(self) -> str:
        return HF_KINDS[1] if self.remote_code else HF_KINDS[0]

    @property
    def budget(self) -> str:
        """The exported budget's name (export manifest), else the directory's name."""
        return str(self.manifest.get("budget", self.path.resolve().name))

    @property
    def max_sequence_length(self) -> int | None:
        value = self.config.get("max_position_embeddings")
        return None if value is None else int(value)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])


def read_hf_directory(path: str | Path) -> HFDirectory:
    """``config.json`` and ``export_manifest.json`` (if any) of an HF directory; ``ValueError``
    for a directory without ``config.json`` or with a config without ``vocab_size``."""
    path = Path(path)
    config = read_hf_config(path)
    if "vocab_size" not in config:
        raise ValueError(f"{str(path / _CONFIG)!r} has no vocab_size; not a language model")
    manifest_file = path / EXPORT_MANIFEST
    manifest = read_json(manifest_file) if manifest_file.is_file() else {}
    return HFDirectory(path, config, manifest)


def load_hf_eval_tokenizer(override: str | Path | None, directory: HFDirectory) -> Tokenizer:
    """``override`` (a ``--tokenizer`` flag), else the directory's own tokenizer file, else the
    one its export manifest names (while it exists); checked to fit the model's vocabulary."""
    path: str | Path | None = override
    if path is None and any((directory.path / n).is_file() for n in _TOKENIZER_FILES):
        path = directory.path
    recorded = directory.manifest.get("tokenizer")
    if path is None and recorded and Path(recorded).exists():
        path = recorded
    if path is None:
        raise ValueError(
            f"{str(directory.path)!r} holds no {' or '.join(_TOKENIZER_FILES)} and its export "
            "manifest names no existing tokenizer; pass --tokenizer"
        )
    return load_tokenizer(path, model_vocab_size=directory.vocab_size)


class HFCausalLM(nn.Module):
    """A transformers causal LM called like a megatron language model.

    ``model(tokens, position_ids, attention_mask)`` returns float32 logits (b, s, V);
    with ``labels`` (already shifted, as megatron's GPT dataset gives them) it returns the
    per-token cross entropy (b, s) instead, as megatron's ``GPTModel`` does. ``position_ids`` and
    ``attention_mask`` are ignored: the evaluation passes causal, unpadded-prefix inputs, and the
    HF model derives positions and its causal mask itself. The KV / SSM cache is off.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> torch.Tensor:
        logits = self.hf_model(input_ids=tokens, use_cache=False).logits.float()  # (b, s, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (b, s)


class HFEvalCheckpoint:
    """An HF directory loaded for evaluation: one budget, like a megatron ``exported`` checkpoint
    (see :class:`~megatron_elastic.eval.loading.EvalCheckpoint`, whose methods it mirrors)."""

    def __init__(self, directory: HFDirectory, hf_model: nn.Module) -> None:
        self.directory = directory
        self.path, self.manifest = directory.path, directory.manifest
        self.kind: str = directory.kind
        self.hf_model = hf_model
        self.model = HFCausalLM(hf_model).eval()
        """The model called like a megatron language model (see :class:`HFCausalLM`)."""
        self.budget: str | None = None

    def budgets(self) -> list[str]:
        return [self.directory.budget]

    def _check(self, budget: str | float) -> None:
        if budget not in self.budgets():
            raise ValueError(
                f"unknown budget {budget!r}; this Hugging Face directory holds {self.budgets()}"
            )

    def spec(self, budget: str | float) -> None:
        """No sub-network to pick: the directory holds one fixed model."""
        self._check(budget)

    def set_budget(self, budget: str | float) -> None:
        self._check(budget)
        self.budget = budget  # type: ignore[assignment]  # checked to be the one name

    def params(self, budget: str | float) -> int:
        """Parameters of the loaded HF model (its own count, not the manifest's)."""
        self._check(budget)
        return sum(p.numel() for p in self.hf_model.parameters())

    def tokenizer_path(self) -> str | None:
        """The directory when it holds a tokenizer file, else the export manifest's tokenizer."""
        if any((self.path / n).is_file() for n in _TOKENIZER_FILES):
            return str(self.path)
        recorded = self.manifest.get("tokenizer")
        return str(recorded) if recorded else None


def open_hf_checkpoint(path: str | Path) -> HFEvalCheckpoint:
    """Load the HF directory ``path`` with ``AutoModelForCausalLM`` in float32, eval mode, on the
    device megatron models use here (trust_remote_code only when its config has ``auto_map``).
    Stock NemotronH gets ``attn_implementation="sdpa"`` (transformers' default too, said here so
    a fallback to its eager (s x s) attention fails loudly); the remote code calls causal SDPA
    itself."""
    from transformers import AutoModelForCausalLM

    directory = read_hf_directory(path)
    hf_weight_files(directory.path)  # whole files, or a one-line error naming the damaged one
    use_torch_nemotron_h_kernels()  # before transformers imports NemotronH (see its docstring)
    attention = {} if directory.remote_code else {"attn_implementation": "sdpa"}
    hf_model = AutoModelForCausalLM.from_pretrained(
        directory.path, dtype=torch.float32, trust_remote_code=directory.remote_code, **attention
    )
    return HFEvalCheckpoint(directory, hf_model.to(default_device()).eval())
