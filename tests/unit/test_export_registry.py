"""The export registry (``megatron_elastic.export.registry``): every format is one
:class:`Exporter` with the same signature, named by ``export_budget.py --format``; an unknown
format is one line listing the known ones. (Each format's output is loaded by its consumer in
the test its ``proved_by`` names.)"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from megatron_elastic.config import load_model_config
from megatron_elastic.export.registry import (
    EXPORTERS,
    Exporter,
    ExportOptions,
    get_exporter,
    register,
)

ROOT = Path(__file__).parents[2]


def test_every_format_is_registered_with_one_signature() -> None:
    assert tuple(EXPORTERS) == ("megatron", "megatron-lm", "hf", "gguf")  # --format's order
    for name, exporter in EXPORTERS.items():
        assert isinstance(exporter, Exporter) and exporter.name == name
        assert exporter.description and exporter.consumer, name
        assert (ROOT / exporter.proved_by).is_file(), (name, exporter.proved_by)
        check = list(inspect.signature(exporter.check).parameters)
        export = inspect.signature(exporter.export)
        assert check == ["parent", "specs", "options"], (name, check)
        assert list(export.parameters) == ["model", "spec", "output", "options"], name
        assert export.return_annotation in (Path, "Path"), name
        assert get_exporter(name) is exporter


def test_unknown_format_is_one_line_listing_the_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        get_exporter("nemo")
    assert str(info.value) == (
        "unknown export format 'nemo'; known formats: megatron, megatron-lm, hf, gguf"
    )


def test_a_format_registers_once() -> None:
    with pytest.raises(ValueError, match="'hf' is registered twice"):
        register(dataclasses.replace(EXPORTERS["hf"]))
    assert len(EXPORTERS) == 4


def test_checks_refuse_options_their_format_does_not_take() -> None:
    """``check`` runs before anything is written: --gguf-type only for gguf, and gguf only with
    a type llama.cpp loads."""
    parent = load_model_config(ROOT / "examples" / "tiny" / "model.yaml")
    f16 = ExportOptions(gguf_type="f16")
    for name in ("megatron", "megatron-lm", "hf"):
        EXPORTERS[name].check(parent, {}, ExportOptions())
        with pytest.raises(ValueError, match="--gguf-type applies to --format gguf only"):
            EXPORTERS[name].check(parent, {}, f16)
    EXPORTERS["gguf"].check(parent, {}, f16)
    with pytest.raises(ValueError, match=r"'q4_0' is not one llama\.cpp loads"):
        EXPORTERS["gguf"].check(parent, {}, ExportOptions(gguf_type="q4_0"))
