"""Hugging Face remote code for heterogeneous budgets (per-layer widths).

The two modules here are copied next to the weights of an export and loaded by
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``; they import only ``torch``
and ``transformers`` (never megatron_elastic), so an export is self-contained.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["AUTO_MAP", "MODEL_TYPE", "REMOTE_CODE_FILES", "copy_remote_code"]

MODEL_TYPE = "elastic_nemotron_h"
REMOTE_CODE_FILES = ("configuration_elastic_nemotron_h.py", "modeling_elastic_nemotron_h.py")
AUTO_MAP = {
    "AutoConfig": "configuration_elastic_nemotron_h.ElasticNemotronHConfig",
    "AutoModel": "modeling_elastic_nemotron_h.ElasticNemotronHModel",
    "AutoModelForCausalLM": "modeling_elastic_nemotron_h.ElasticNemotronHForCausalLM",
}
"""``auto_map`` of the exported config.json."""


def copy_remote_code(directory: str | Path) -> None:
    """Copy the remote-code modules into an export directory."""
    here = Path(__file__).parent
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(here / name, Path(directory) / name)
