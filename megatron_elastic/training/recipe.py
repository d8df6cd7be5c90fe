"""A training recipe: one YAML file per stage (``examples/*/stage*.yaml``), loaded strictly.

Sections map to typed configs owned by their components (model, elastic, parallel, optimizer,
router, distillation) plus the ones owned here (data, train, checkpoint, logging). ``model`` and
``elastic`` paths are relative to the recipe file (they belong to it); data and checkpoint paths
are relative to the working directory (they are the run's artefacts). Command-line overrides
``section.key=value`` (value parsed as YAML) are applied before validation, so a typo in an
override fails the same way as a typo in the file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from megatron_elastic.config import (
    ModelConfig,
    ParallelConfig,
    check_parallel_fit,
    config_from_dict,
    load_model_config,
    load_yaml,
)
from megatron_elastic.data.gpt_data import parse_blend
from megatron_elastic.elastic.config import ElasticConfig, load_elastic_recipe
from megatron_elastic.integrity import check_verify_mode
from megatron_elastic.model.builder import Recompute
from megatron_elastic.router.config import RouterConfig
from megatron_elastic.training.budget_sampling import (
    validate_budget_probs,
    validate_sampling_mode,
)
from megatron_elastic.training.optim import OptimConfig

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DistillConfig",
    "LoggingConfig",
    "TrainConfig",
    "TrainRecipe",
    "apply_overrides",
    "load_train_recipe",
    "recipe_summary",
]

MODES = ("plain", "elastic")
TEACHERS = ("parent", "self", "none")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class DataConfig:
    """Where the training tokens come from (megatron indexed datasets)."""

    blend: str | list[list[Any]]
    """A dataset prefix (``PREFIX.bin``/``.idx``), or ``[[weight, prefix], ...]`` to blend
    (weights: positive numbers, sampled in proportion)."""
    tokenizer: str
    """``tokenizer.json`` (HF tokenizers) or ``.model`` (SentencePiece); stored in checkpoints."""
    split: str = "98,2,0"
    """Train/valid/test proportions, split by document."""
    valid_samples: int = 64
    """Validation samples evaluated every ``train.eval_interval`` steps."""
    cache_dir: str | None = None
    """Where megatron writes the datasets' index caches (document/sample/shuffle ``.npy``;
    megatron-LM's ``--data-cache-path``), so the data directory may be read-only. It must be
    writable and seen by every rank (rank 0 builds the caches, the others then read them).
    None: ``index_cache/`` beside the blend's first prefix, which must then be writable."""

    def __post_init__(self) -> None:
        parse_blend(self.blend, field="data.blend")
        if self.cache_dir is not None and not (isinstance(self.cache_dir, str) and self.cache_dir):
            raise ValueError(
                f"data.cache_dir must be a directory path (a string), got {self.cache_dir!r}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Steps, batch geometry, seed and numerics."""

    steps: int
    """Optimizer steps of this stage."""
    seq_length: int
    """Tokens per sample."""
    micro_batch_size: int
    """Samples per micro-batch on one data-parallel rank."""
    global_batch_size: int
    """Samples per optimizer step over all data-parallel ranks (a multiple of
    ``micro_batch_size * data_parallel_size``; the rest is gradient accumulation)."""
    seed: int = 1234
    """Seeds weights init, data order, budget sampling and router noise."""
    precision: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16`` (bf16 weights and activations,
    megatron's mixed-precision optimizer with fp32 main weights and gradients; GPU or CPU)."""
    deterministic: bool = True
    """Deterministic torch algorithms (resume reproduces an uninterrupted run exactly)."""
    eval_interval: int = 0
    """Validation loss every this many steps (0: only at the end)."""
    recompute_granularity: str | None = None
    """Activation recomputation in backward, megatron's ``recompute_granularity``: ``null``
    (store everything), ``full`` (a recomputed layer keeps only its input; costs about one more
    forward of it) or ``selective`` (attention layers' core attention only: megatron's
    ``recompute_modules=["core_attn"]``; Mamba and MLP layers keep their activations)."""
    recompute_method: str | None = None
    """With ``full``: ``uniform`` (every layer; the default) or ``block`` (the first
    ``recompute_num_layers`` layers of each pipeline stage)."""
    recompute_num_layers: int | None = None
    """With ``full``: 1 for ``uniform`` (our stacks recompute layer by layer); with ``block``,
    the layers recomputed per stage (fewer: more memory, less recomputation)."""
    recompute_activations: bool = False
    """Older spelling of ``recompute_granularity: full`` (every layer), kept for old recipes."""
    budget_sampling_mode: str = "independent"
    """How elastic training draws each micro-batch's budget from ``budget_sampling``
    (``training/budget_sampling.py``): ``independent`` (the paper's: one draw per micro-batch),
    ``stratified`` (each step holds ``floor(p * n)`` micro-batches of every budget, ``n`` the
    step's micro-batches over all replicas, the rest drawn: every count within one of ``p * n``)
    or ``sandwich`` (BigNAS: every step trains the largest and the smallest budget, the other
    ``n - 2`` stratified; needs ``n >= 2``)."""

    def __post_init__(self) -> None:
        for name in ("steps", "seq_length", "micro_batch_size", "global_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        validate_sampling_mode(self.budget_sampling_mode, self.micro_batches_per_step)
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}; choose one of {PRECISIONS}")
        if self.eval_interval < 0:
            raise ValueError(f"train.eval_interval must be >= 0, got {self.eval_interval}")
        if not isinstance(self.recompute_activations, bool):
            raise ValueError(
                f"train.recompute_activations must be true or false, got "
                f"{self.recompute_activations!r}"
            )
        if self.recompute_activations:
            if self.recompute_granularity not in (None, "full"):
                raise ValueError(
                    "train.recompute_activations=true means recompute_granularity=full; set "
                    "only recompute_granularity"
                )
            object.__setattr__(self, "recompute_granularity", "full")
        recompute = self.recompute  # validates the three fields (and fills full's defaults)
        object.__setattr__(self, "recompute_method", recompute.method)
        object.__setattr__(self, "recompute_num_layers", recompute.num_layers)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches of one optimizer step over all data-parallel replicas."""
        return self.global_batch_size // self.micro_batch_size

    @property
    def recompute(self) -> Recompute:
        """The recomputation the model builders take."""
        return Recompute(
            self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        )

    def resolved_precision(self, cuda: bool) -> str:
        """``bf16`` or ``fp32``: what ``precision`` means on a machine with(out) CUDA."""
        if self.precision == "auto":
            return "bf16" if cuda else "fp32"
        return self.precision


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation of every budget from a frozen teacher."""

    teacher: str = "parent"
    """``parent``: a frozen copy of ``teacher_checkpoint``; ``self``: the full budget of the
    shared weights (no gradient); ``none``: plain cross entropy."""
    teacher_checkpoint: str | None = None
    """The (ranked) parent the teacher loads (``teacher: parent``)."""
    temperature: float = 1.0
    """Softmax temperature of the forward KL (the loss is scaled by T^2)."""
    ce_weight: float = 0.0
    """Weight of the student's cross entropy added to the KD loss."""
    num_loss_chunks: int = 8
    """Token chunks the KD loss (and the logged CE) runs over on the last pipeline stage: its
    fp32 (tokens x V/TP) temporaries are 1/num_loss_chunks of the whole; the loss and its
    gradient do not depend on it (bit for bit). 8: the measured peak above the logits is 3 B
    per bf16 logit (5 per fp32 logit) against 12 unchunked, with no measurable slow-down."""

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise ValueError(f"distill.teacher={self.teacher!r}; choose one of {TEACHERS}")
        if self.teacher == "parent" and not self.teacher_checkpoint:
            raise ValueError(
                "distill.teacher='parent' needs distill.teacher_checkpoint (the ranked parent)"
            )
        if not self.temperature > 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")
        if not self.ce_weight >= 0:
            raise ValueError(f"distill.ce_weight must be >= 0, got {self.ce_weight}")
        n = self.num_loss_chunks
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(
                f"distill.num_loss_chunks must be a positive integer (8 is the default), got {n!r}"
            )


@dataclass(frozen=True)
class CheckpointConfig:
    """Where the stage starts from and where it saves."""

    save: str
    """Directory of this stage's checkpoints (``step_NNNNNNN/`` + ``latest.json``). If it already
    holds a checkpoint, the run resumes from it (SLURM requeue)."""
    init: str | None = None
    """Weights to start from when not resuming: a parent/ranked checkpoint, or the save directory
    (or a checkpoint) of the previous stage, whose model and router are taken (not its
    optimizer: a new stage has its own schedule)."""
    save_interval: int = 100
    """Save every this many steps (and always at the end, and on SIGTERM/SIGUSR1)."""
    keep_last: int = 2
    """Checkpoints kept in ``save`` (older ones are deleted after a newer one is complete)."""
    verify: str = "full"
    """What loading a checkpoint (resume, init, teacher) checks against its manifest: ``full``
    hashes every file (sha256; minutes for a large checkpoint); ``manifest`` only checks that
    every listed file is there with its recorded size, for a trusted filesystem: a missing,
    truncated or foreign file is still refused, a flipped byte is not (torch's loader notices
    only damage to the structure it parses; a flip in tensor data loads as a changed weight)."""

    def __post_init__(self) -> None:
        if self.save_interval < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.save_interval and checkpoint.keep_last must be >= 1")
        check_verify_mode(self.verify, field="checkpoint.verify")


@dataclass(frozen=True)
class LoggingConfig:
    """Console, TensorBoard and (optional) Weights & Biases."""

    log_interval: int = 10
    """Print and record metrics every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``<save>/tensorboard``."""
    wandb_project: str | None = None
    """Also log to this W&B project when ``wandb`` is installed (ignored, with a note, if not).
    One W&B run per save directory: its id is kept in ``<save>/wandb_id`` and resumed."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for MFU (``None``: by device name, e.g. 989 for H100/H200 and
    312 for A100 bf16 dense; no MFU on CPU or an unknown device)."""
    memory_warning_ratio: float = 1.15
    """Warn (once per pipeline stage) when a step's measured peak memory exceeds the memory
    planner's prediction by more than this factor."""

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ValueError(f"logging.log_interval must be >= 1, got {self.log_interval}")
        tflops = self.peak_tflops
        if tflops is not None and (
            isinstance(tflops, bool) or not isinstance(tflops, int | float) or not tflops > 0
        ):
            raise ValueError(
                f"logging.peak_tflops must be a positive number of TFLOP/s (e.g. 989 for an "
                f"H100 SXM in bf16) or null, got {tflops!r}"
            )
        ratio = self.memory_warning_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio >= 1:
            raise ValueError(
                f"logging.memory_warning_ratio must be a number >= 1 (1.15: warn 15% over the "
                f"plan), got {ratio!r}"
            )


@dataclass(frozen=True)
class TrainRecipe:
    """Everything one training stage needs."""

    stage: str
    """Name of the stage (``pretrain``, ``stage1``, ``stage2``...), recorded in checkpoints."""
    mode: str
    """``plain``: train the parent with cross entropy; ``elastic``: budgets, router, KD."""
    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    elastic: ElasticConfig | None = None
    router: RouterConfig | None = None
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(teacher="none"))
    budget_sampling: dict[str, float] = field(default_factory=dict)
    """Budget name -> probability that a micro-batch trains it (sums to 1)."""
    source: dict[str, Any] = field(default_factory=dict)
    """The recipe as loaded (after overrides), stored in checkpoints."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; choose one of {MODES}")
        check_parallel_fit(self.model, self.parallel)
        self.parallel.check_sequence_length(self.train.seq_length)
        _check_tuning(self)
        if self.mode == "elastic":
            if self.elastic is None or self.router is None:
                raise ValueError("mode 'elastic' needs the 'elastic' recipe and a 'router' section")
            self.elastic.validate_for(self.model, self.parallel)
            validate_budget_probs(self.budget_sampling, self.elastic.budgets)
        elif self.distill.teacher != "none" or self.budget_sampling:
            raise ValueError(
                "mode 'plain' trains the parent alone: remove 'budget_sampling' and set "
                "distill.teacher to 'none'"
            )
        elif self.train.budget_sampling_mode != "independent":
            raise ValueError(
                "mode 'plain' trains the parent alone: remove train.budget_sampling_mode"
            )


def _check_tuning(recipe: TrainRecipe) -> None:
    """The tuning settings that depend on other sections."""
    train, model = recipe.train, recipe.model
    most = max(recipe.parallel.stage_layer_counts(model.num_layers))
    if train.recompute_method == "block" and train.recompute_num_layers > most:
        raise ValueError(
            f"train.recompute_num_layers={train.recompute_num_layers} with recompute_method=block "
            f"exceeds the {most} layers of the largest pipeline stage; use at most {most}"
        )
    elastic = recipe.elastic
    if recipe.optim.overlap_grad_reduce and recipe.mode == "elastic" and elastic is not None:
        depths = elastic.axis_choices(model)["depth"]
        if depths[0] < model.num_layers:
            raise ValueError(
                f"optim.overlap_grad_reduce: elastic.depth_choices {list(depths)} skip layers, "
                "whose parameters then get no gradient, and megatron starts a bucket's reduction "
                "only when all of its parameters have one; set optim.overlap_grad_reduce=false"
            )


_SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "router": RouterConfig,
    "distill": DistillConfig,
    "parallel": ParallelConfig,
}
_KEYS = {"stage", "mode", "model", "elastic", "budget_sampling", *_SECTIONS}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with each ``dotted.key=value`` set (value parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def _probability(name: str, value: Any) -> float:
    if isinstance(value, str):  # "1/3" keeps a uniform mix summing to exactly 1
        try:
            return float(Fraction(value))
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"budget_sampling[{name!r}]={value!r} is not a number") from exc
    return value


def load_train_recipe(path: str | Path, overrides: list[str] | None = None) -> TrainRecipe:
    """Load and validate a stage recipe (plus ``overrides``); every error is a ``ValueError``."""
    path = Path(path)
    data = apply_overrides(load_yaml(path), overrides or [])
    where = str(path)
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(_KEYS), n=1)
            hints.append(key + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{where}: unknown key(s) {', '.join(hints)}; known: {sorted(_KEYS)}")
    for key in ("stage", "mode", "model", "data", "train", "checkpoint"):
        if key not in data:
            raise ValueError(f"{where}: missing required key {key!r}")
    model = load_model_config(path.parent / data["model"])
    elastic = None
    if data.get("elastic") is not None:
        elastic_model, elastic = load_elastic_recipe(path.parent / data["elastic"])
        if elastic_model != model:
            raise ValueError(f"{where}: the elastic recipe's model differs from 'model'")
    sections: dict[str, Any] = {}
    for key, cls in _SECTIONS.items():
        if key in data and data[key] is not None:
            values = dict(data[key])
            if cls is OptimConfig:
                values.setdefault("total_steps", data["train"].get("steps", 1))
            sections[key] = config_from_dict(cls, values, where=f"{where}: {key}")
    probs = {
        str(k): _probability(str(k), v) for k, v in (data.get("budget_sampling") or {}).items()
    }
    return TrainRecipe(
        stage=str(data["stage"]),
        mode=str(data.get("mode", "elastic")),
        model=model,
        parallel=sections.get("parallel", ParallelConfig()),
        data=sections["data"],
        train=sections["train"],
        optim=sections.get(
            "optim", OptimConfig(total_steps=sections["train"].steps, warmup_steps=0)
        ),
        checkpoint=sections["checkpoint"],
        logging=sections.get("logging", LoggingConfig()),
        elastic=elastic,
        router=sections.get("router"),
        distill=sections.get("distill", DistillConfig(teacher="none")),
        budget_sampling=probs,
        source=data,
    )


def recipe_summary(recipe: TrainRecipe) -> dict[str, Any]:
    """Plain-data view of the recipe for manifests and logs."""
    return {
        "stage": recipe.stage,
        "mode": recipe.mode,
        "train": dataclasses.asdict(recipe.train),
        "optim": dataclasses.asdict(recipe.optim),
        "budget_sampling": recipe.budget_sampling,
        "distill": dataclasses.asdict(recipe.distill),
        "parallel": dataclasses.asdict(recipe.parallel),
    }
