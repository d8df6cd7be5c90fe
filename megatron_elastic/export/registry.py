"""The export formats, one :class:`Exporter` each, in one registry (:data:`EXPORTERS`).

Every format has the same signature: ``check(parent, specs, options)`` refuses what it cannot
write before anything is written, and ``export(model, spec, output, options) -> Path`` writes one
budget of a loaded (unsplit) elastic model and returns the path a user loads. Adding a format is
writing those two functions and one :func:`register` call; ``tools/export_budget.py --format``
offers every registered name (:func:`megatron_elastic.export.run.export_budgets` drives it).

- ``megatron``: megatron-elastic's checkpoint + ``model.yaml`` (:mod:`.megatron`).
- ``megatron-lm``: the layout Megatron-LM's ``pretrain_hybrid.py --load DIR --finetune
  --use-checkpoint-args`` and Megatron-Bridge load (:mod:`.megatron_lm`); homogeneous budgets.
- ``hf``: stock NemotronH, or the bundled remote-code model when heterogeneous (:mod:`.hf`).
- ``gguf``: ``model.gguf`` for llama.cpp (:mod:`.gguf`; ``nemotron_h_moe`` for MoE budgets); no
  heterogeneous Mamba budget, no per-layer MoE sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_elastic.config import ModelConfig
    from megatron_elastic.elastic.model import ElasticHybridModel
    from megatron_elastic.elastic.subnet import SubnetSpec

__all__ = ["EXPORTERS", "ExportOptions", "Exporter", "get_exporter", "register"]

Budget = str | float
UNTRAINED = " (router interpolation: untrained budget)"


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What an export writes besides the weights; one per budget (``budget``, ``interpolated``)."""

    budget: Budget = "budget"
    """The budget's name, or the fraction it was interpolated at."""
    interpolated: bool = False
    """True for a fraction between trained budgets (router interpolation: untrained)."""
    source_checkpoint: str | None = None
    """The elastic checkpoint exported from (recorded in the export's metadata)."""
    tokenizer: Path | None = None
    """Tokenizer shipped with formats that carry one (:attr:`Exporter.carries_tokenizer`)."""
    force: bool = False
    """Replace an output directory that is not empty."""
    gguf_type: str = "f32"
    """Tensor type of the ``gguf`` format (f32, f16, q8_0); other formats take f32 only."""
    log: Callable[[str], None] = print
    """Where the one-line summary of each export goes."""

    def metadata(self) -> dict[str, Any]:
        return {
            "source_checkpoint": self.source_checkpoint,
            "budget": self.budget,
            "interpolated": self.interpolated,
        }

    @property
    def note(self) -> str:
        return UNTRAINED if self.interpolated else ""

    def exported(self, params: int, pattern: str, detail: str, output: Path, how: str) -> None:
        """Say that this budget was written (the one line every format prints)."""
        self.log(
            f"exported budget {self.budget}: {params:,} params, pattern {pattern}, {detail} -> "
            f"{output}{how}{self.note}"
        )


Check = Callable[["ModelConfig", Mapping[Budget, "SubnetSpec"], ExportOptions], None]
Export = Callable[["ElasticHybridModel", "SubnetSpec", Path, ExportOptions], Path]


@dataclasses.dataclass(frozen=True)
class Exporter:
    """One export format."""

    name: str
    """``--format`` value."""
    description: str
    """What is written (one line)."""
    consumer: str
    """What loads the output."""
    proved_by: str
    """The test (path from the repository root) that loads exports in that consumer."""
    carries_tokenizer: bool
    """Whether the output ships a tokenizer (:attr:`ExportOptions.tokenizer`)."""
    check: Check
    """``check(parent, specs, options)``: ``ValueError`` for anything this format cannot write
    (every budget checked, nothing written)."""
    export: Export
    """``export(model, spec, output, options) -> Path``: write one budget, return what to load."""


EXPORTERS: dict[str, Exporter] = {}
"""Every export format by name, in the order ``--format`` lists them."""


def register(exporter: Exporter) -> Exporter:
    if exporter.name in EXPORTERS:
        raise ValueError(f"export format {exporter.name!r} is registered twice")
    EXPORTERS[exporter.name] = exporter
    return exporter


def get_exporter(name: str) -> Exporter:
    """The exporter of format ``name``; ``ValueError`` listing the known formats."""
    if name not in EXPORTERS:
        raise ValueError(f"unknown export format {name!r}; known formats: {', '.join(EXPORTERS)}")
    return EXPORTERS[name]


def _per_budget(specs: Mapping[Budget, Any], check: Callable[[Any], None]) -> None:
    for budget, spec in specs.items():
        try:
            check(spec)
        except ValueError as exc:
            raise ValueError(f"budget {budget}: {exc}") from None


def _f32_only(options: ExportOptions) -> None:
    if options.gguf_type != "f32":
        raise ValueError("--gguf-type applies to --format gguf only")


# -- megatron ---------------------------------------------------------------------------------


def _check_megatron(
    parent: ModelConfig, specs: Mapping[Budget, SubnetSpec], options: ExportOptions
) -> None:
    _f32_only(options)


def _export_megatron(
    model: ElasticHybridModel, spec: SubnetSpec, output: Path, options: ExportOptions
) -> Path:
    from megatron_elastic.export.megatron import export_subnet_to_megatron

    meta = export_subnet_to_megatron(model, spec, output, metadata=options.metadata())
    dims, how = meta["dims"], ""
    if dims["layer_widths"] is not None or dims["layer_mamba_head_dims"] is not None:
        how = f", per-layer widths {list(dims['layer_widths'] or ())}"
    hidden = f"hidden {dims['hidden_size']}"
    options.exported(meta["params"], dims["hybrid_pattern"], hidden, output, how)
    return output


# -- megatron-lm ------------------------------------------------------------------------------


def _check_megatron_lm(
    parent: ModelConfig, specs: Mapping[Budget, SubnetSpec], options: ExportOptions
) -> None:
    from megatron_elastic.export.megatron_lm import megatron_lm_args
    from megatron_elastic.export.standalone import standalone_config

    _per_budget(specs, lambda spec: megatron_lm_args(standalone_config(parent, spec)))
    _f32_only(options)


def _export_megatron_lm(
    model: ElasticHybridModel, spec: SubnetSpec, output: Path, options: ExportOptions
) -> Path:
    from megatron_elastic.elastic.budget import subnet_param_count
    from megatron_elastic.export.megatron import standalone_model
    from megatron_elastic.export.megatron_lm import save_megatron_lm

    cfg, plain = standalone_model(model, spec)
    params = subnet_param_count(model.model_config, spec)
    meta = {**options.metadata(), "params": params, "dims": dataclasses.asdict(cfg)}
    save_megatron_lm(
        output, plain, cfg, tokenizer_path=options.tokenizer, metadata=meta, force=options.force
    )
    hidden, how = f"hidden {cfg.hidden_size}", " (Megatron-LM / Megatron-Bridge)"
    options.exported(params, cfg.hybrid_pattern, hidden, output, how)
    return output


# -- hf ---------------------------------------------------------------------------------------


def _check_hf(
    parent: ModelConfig, specs: Mapping[Budget, SubnetSpec], options: ExportOptions
) -> None:
    _f32_only(options)


def _export_hf(
    model: ElasticHybridModel, spec: SubnetSpec, output: Path, options: ExportOptions
) -> Path:
    from megatron_elastic.export.hf import export_subnet_to_hf

    info = export_subnet_to_hf(
        model, spec, output, tokenizer_path=options.tokenizer, metadata=options.metadata()
    )
    how = " (stock NemotronH)"
    if info["format"] != "hf":
        how = " (remote-code model: load with trust_remote_code=True)"
    hidden = f"hidden {info['dims']['hidden']}"
    options.exported(info["params"], info["dims"]["pattern"], hidden, output, how)
    if not info["has_attention"]:
        options.log(
            f"note: budget {options.budget} keeps no attention layer: use_cache is false in "
            "config.json and generation_config.json (stock NemotronH's cache needs an attention "
            "layer)"
        )
    return output


# -- gguf -------------------------------------------------------------------------------------


def _check_gguf(
    parent: ModelConfig, specs: Mapping[Budget, SubnetSpec], options: ExportOptions
) -> None:
    from megatron_elastic.export.gguf import GGUF_TYPES, check_gguf_exportable

    if options.gguf_type not in GGUF_TYPES:
        raise ValueError(
            f"--gguf-type {options.gguf_type!r} is not one llama.cpp loads for this model; "
            f"choose one of {', '.join(GGUF_TYPES)}"
        )
    _per_budget(specs, lambda spec: check_gguf_exportable(parent, spec))


def _export_gguf(
    model: ElasticHybridModel, spec: SubnetSpec, output: Path, options: ExportOptions
) -> Path:
    from megatron_elastic.export.gguf import export_subnet_to_gguf

    info = export_subnet_to_gguf(
        model,
        spec,
        output,
        tokenizer_path=options.tokenizer,
        dtype=options.gguf_type,
        metadata=options.metadata(),
    )
    path, how = output / info["file"], " (GGUF for llama.cpp)"
    options.exported(info["params"], info["dims"]["pattern"], info["dtype"], path, how)
    if info["placeholder_attention_layer"]:
        options.log(
            f"note: budget {options.budget} keeps no attention layer: the file has one zero "
            "placeholder attention block (llama.cpp aborts without one; it adds exactly 0)"
        )
    if not info["tokenizer"]["in_gguf"]:
        options.log(f"note: token ids only: {info['tokenizer']['note']}")
    return output / info["file"]


register(
    Exporter(
        name="megatron",
        description="megatron-elastic checkpoint (kind exported) + model.yaml of the budget's dims",
        consumer="a plain megatron-core HybridModel (megatron_elastic.model.build_hybrid_model)",
        proved_by="tests/unit/test_export_standalone.py",
        carries_tokenizer=False,
        check=_check_megatron,
        export=_export_megatron,
    )
)
register(
    Exporter(
        name="megatron-lm",
        description="Megatron-LM / Megatron-Bridge checkpoint (TE names, args, run_config.yaml)",
        consumer="Megatron-LM pretrain_hybrid.py --load --finetune --use-checkpoint-args",
        proved_by="tests/unit/test_megatron_lm_export.py",
        carries_tokenizer=True,
        check=_check_megatron_lm,
        export=_export_megatron_lm,
    )
)
register(
    Exporter(
        name="hf",
        description="Hugging Face directory: stock NemotronH, or remote code when heterogeneous",
        consumer="transformers AutoModelForCausalLM.from_pretrained",
        proved_by="tests/unit/test_hf_export.py",
        carries_tokenizer=True,
        check=_check_hf,
        export=_export_hf,
    )
)
register(
    Exporter(
        name="gguf",
        description="model.gguf (f32, f16 or q8_0 tensors) with the tokenizer when representable",
        consumer="llama.cpp (llama-cpp-python)",
        proved_by="tests/unit/test_gguf_export.py",
        carries_tokenizer=True,
        check=_check_gguf,
        export=_export_gguf,
    )
)
