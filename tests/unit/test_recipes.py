"""Recipes under examples/: every one loads; the 12B stage recipes carry the paper's curriculum
(docs/background.md#distillation-and-the-two-stage-curriculum) and match the SLURM scripts;
overrides work; and bad input (unknown keys, bad budget sampling, missing data, a checkpoint of
another architecture) is a ValueError before any compute, which the CLI turns into exit status 2
with the message and no traceback."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml

from megatron_elastic.checkpoint import save_checkpoint
from megatron_elastic.config import load_model_config
from megatron_elastic.data import train_bpe_tokenizer, write_indexed_dataset
from megatron_elastic.elastic import load_elastic_recipe
from megatron_elastic.model import build_hybrid_model
from megatron_elastic.training.recipe import load_train_recipe
from megatron_elastic.training.state import write_latest
from megatron_elastic.training.trainer import preflight

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"
NANO = EXAMPLES / "nemotron_nano_12b"
NANO3 = EXAMPLES / "nemotron3_nano_30b"
TINY = EXAMPLES / "tiny"
ALL_YAML = sorted(EXAMPLES.rglob("*.yaml"))


def _kind(path: Path) -> str:
    data = yaml.safe_load(path.read_text())
    if "stage" in data:
        return "train"
    if set(data) == {"model", "elastic"}:
        return "elastic"
    return "model"


def _tokens(recipe) -> int:
    return recipe.train.steps * recipe.train.global_batch_size * recipe.train.seq_length


# --- every example loads ------------------------------------------------------------------------


def test_examples_hold_stage_recipes() -> None:
    names = {str(p.relative_to(EXAMPLES)) for p in ALL_YAML if _kind(p) == "train"}
    assert {
        "tiny/pretrain.yaml",
        "tiny/stage1.yaml",
        "tiny/stage2.yaml",
        "nemotron_nano_12b/stage1_8k.yaml",
        "nemotron_nano_12b/stage2_49k.yaml",
        "nemotron3_nano_30b/stage1_8k.yaml",
        "nemotron3_nano_30b/stage2_49k.yaml",
    } <= names, names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_loads(path: Path) -> None:
    kind = _kind(path)
    if kind == "train":
        recipe = load_train_recipe(path)
        assert recipe.stage == yaml.safe_load(path.read_text())["stage"]
    elif kind == "elastic":
        model, elastic = load_elastic_recipe(path)
        elastic.validate_for(model)
    else:
        assert load_model_config(path).num_layers > 0


# --- the paper's numbers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nano():
    return load_train_recipe(NANO / "stage1_8k.yaml"), load_train_recipe(NANO / "stage2_49k.yaml")


def test_12b_stage1_is_the_papers(nano) -> None:
    s1, _ = nano
    assert s1.stage == "stage1" and s1.mode == "elastic"
    assert s1.budget_sampling == pytest.approx({"12B": 1 / 3, "9B": 1 / 3, "6B": 1 / 3})
    assert math.fsum(s1.budget_sampling.values()) == pytest.approx(1.0, abs=1e-12)
    assert s1.train.seq_length == 8192
    assert s1.train.global_batch_size == 1536
    assert s1.train.micro_batch_size == 1
    assert _tokens(s1) == pytest.approx(65e9, rel=0.02)


def test_12b_stage2_is_the_papers(nano) -> None:
    s1, s2 = nano
    assert s2.stage == "stage2" and s2.mode == "elastic"
    assert s2.budget_sampling == pytest.approx({"12B": 0.5, "9B": 0.3, "6B": 0.2})
    assert s2.train.seq_length == 49152
    assert s2.train.global_batch_size == 512
    assert s2.train.micro_batch_size == 1
    assert _tokens(s2) == pytest.approx(45e9, rel=0.02)
    # Stage 2 starts from stage 1's save directory; the teacher stays the frozen ranked parent.
    assert s2.checkpoint.init == s1.checkpoint.save
    assert s2.distill.teacher_checkpoint == s1.distill.teacher_checkpoint == s1.checkpoint.init


def _launch_layout(path: Path) -> dict[str, int]:
    """TP, PP, CP, EP of the launch line in a recipe's header comment."""
    line = next(x for x in path.read_text().splitlines() if "sbatch slurm/" in x)
    return {k: int(v) for k, v in re.findall(r"\b(TP|PP|CP|EP)=(\d+)", line)}


def test_30b_recipes_are_the_curriculum_on_nemotron3_nano(nano) -> None:
    """The 30B stage recipes: the 12B curriculum (context, token counts, budget weights largest to
    smallest, stage 2 from stage 1) on the Nemotron 3 Nano parent and Star Elastic's family, with
    the layout their comments launch."""
    s1, s2 = (load_train_recipe(NANO3 / f) for f in ("stage1_8k.yaml", "stage2_49k.yaml"))
    assert s1.budget_sampling == pytest.approx({"30B": 1 / 3, "23B": 1 / 3, "12B": 1 / 3})
    assert s2.budget_sampling == pytest.approx({"30B": 0.5, "23B": 0.3, "12B": 0.2})
    for ours, theirs in zip((s1, s2), nano, strict=True):
        assert ours.stage == theirs.stage and ours.mode == "elastic"
        assert ours.train.seq_length == theirs.train.seq_length
        assert _tokens(ours) == _tokens(theirs)
        assert ours.model.num_moe_experts == 128 and ours.model.moe_router_topk == 6
        assert ours.router.budget_target == "params"
        assert ours.router.anneal_steps == s1.train.steps + s2.train.steps
        p = ours.parallel
        assert p.tensor_parallel_size == 1  # elastic MoE layers: TP 1 (issue 26 step 5)
        assert ours.model.num_moe_experts % p.expert_model_parallel_size == 0
        dp_cp = 128 // p.model_parallel_size * p.context_parallel_size
        assert dp_cp % p.expert_model_parallel_size == 0  # EP is carved out of DP x CP
        assert p.expert_model_parallel_size <= 8  # the token dispatch stays inside a node
    assert s2.checkpoint.init == s1.checkpoint.save
    assert s2.distill.teacher_checkpoint == s1.distill.teacher_checkpoint == s1.checkpoint.init
    for recipe, name in ((s1, "stage1_8k.yaml"), (s2, "stage2_49k.yaml")):
        p = recipe.parallel
        assert _launch_layout(NANO3 / name) == {
            "TP": p.tensor_parallel_size,
            "PP": p.pipeline_parallel_size,
            "CP": p.context_parallel_size,
            "EP": p.expert_model_parallel_size,
        }


@pytest.mark.parametrize("index", [0, 1], ids=["stage1", "stage2"])
def test_12b_optimisation_is_the_papers(nano, index: int) -> None:
    recipe = nano[index]
    assert recipe.optim.lr == pytest.approx(9e-5)
    assert recipe.optim.warmup_steps == 60
    assert recipe.optim.total_steps == recipe.train.steps
    router = recipe.router
    assert router.lr == pytest.approx(1e-2)
    assert router.warmup_steps == 60
    assert router.hidden_size == 256
    assert (router.temperature_start, router.temperature_end) == (1.0, 0.05)
    assert (router.logit_scale_start, router.logit_scale_end) == (1.0, 10.0)
    assert router.budget_loss_weight == 1.0
    assert router.budget_target == "params"
    # One anneal over the whole curriculum (the router step carries over into stage 2).
    assert router.anneal_steps == nano[0].train.steps + nano[1].train.steps
    assert recipe.distill.teacher == "parent"
    assert recipe.train.precision == "auto"
    assert dict(recipe.elastic.budgets) == {"12B": 1.0, "9B": 0.75, "6B": 0.5}
    assert recipe.model.hidden_size == 5120 and recipe.model.num_layers == 62


def _sbatch_geometry(script: Path) -> tuple[int, int, int, int]:
    """(nodes, tasks per node, default TP, default PP) of a stage launch script."""
    text = script.read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
    per_node = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", text, re.M).group(1))
    gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)$", text, re.M).group(1))
    assert per_node == gpus, "one task per GPU"
    tp = int(re.search(r"^TP=\$\{TP:-(\d+)\}$", text, re.M).group(1))
    pp = int(re.search(r"^PP=\$\{PP:-(\d+)\}$", text, re.M).group(1))
    return nodes, per_node, tp, pp


@pytest.mark.parametrize(
    ("index", "script"), [(0, "stage1_8k.sh"), (1, "stage2_49k.sh")], ids=["stage1", "stage2"]
)
def test_12b_recipes_match_the_slurm_scripts(nano, index: int, script: str) -> None:
    recipe = nano[index]
    nodes, per_node, tp, pp = _sbatch_geometry(ROOT / "slurm" / script)
    parallel = recipe.parallel
    assert (tp, pp) == (parallel.tensor_parallel_size, parallel.pipeline_parallel_size)
    assert tp <= per_node, "tensor parallelism stays inside a node"
    world = nodes * per_node
    assert world % (tp * pp) == 0
    dp = world // (tp * pp)
    assert recipe.train.global_batch_size % (recipe.train.micro_batch_size * dp) == 0
    assert f"examples/nemotron_nano_12b/{script.replace('.sh', '.yaml')}" in (
        (ROOT / "slurm" / script).read_text()
    )


def test_tiny_stage2_starts_from_tiny_stage1() -> None:
    s1, s2 = load_train_recipe(TINY / "stage1.yaml"), load_train_recipe(TINY / "stage2.yaml")
    assert s2.checkpoint.init == s1.checkpoint.save
    assert s2.distill.teacher_checkpoint == s1.distill.teacher_checkpoint


# --- overrides ----------------------------------------------------------------------------------


def test_overrides_apply_before_validation() -> None:
    recipe = load_train_recipe(
        NANO / "stage1_8k.yaml",
        [
            "train.steps=10",
            "optim.warmup_steps=1",
            "train.seq_length=64",
            "parallel.tensor_parallel_size=8",
            "data.blend=/somewhere/else",
            "budget_sampling.12B=1/2",
            "budget_sampling.9B=0.25",
            "budget_sampling.6B=0.25",
            "distill.temperature=2.0",
        ],
    )
    assert recipe.train.steps == 10 and recipe.optim.total_steps == 10
    assert recipe.optim.warmup_steps == 1
    assert recipe.train.seq_length == 64
    assert recipe.parallel.tensor_parallel_size == 8
    assert recipe.data.blend == "/somewhere/else"
    assert recipe.budget_sampling == pytest.approx({"12B": 0.5, "9B": 0.25, "6B": 0.25})
    assert recipe.distill.temperature == 2.0
    assert recipe.source["train"]["steps"] == 10  # what checkpoints record


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stpes=3"], "did you mean 'steps'"),
        (["budget_sampeling.12B=1"], "did you mean 'budget_sampling'"),
        (["train.steps"], "not of the form section.key=value"),
        (["train.steps=10"], "warmup_steps=60 must be in"),  # the 12B warmup needs more steps
        (["parallel.tensor_parallel_size=3"], "not divisible by tensor_parallel_size=3"),
        (["parallel.pipeline_parallel_size=4"], "62 layers do not split evenly"),
        (["budget_sampling.12B=1/2"], "sum to 1.16667, not 1"),
        (["budget_sampling.12B=a/b"], "is not a number"),
        (["budget_sampling.4B=0"], "unknown budgets ['4B']"),
        (["distill.teacher=parent", "distill.teacher_checkpoint=null"], "teacher_checkpoint"),
        (["train.micro_batch_size=5"], "must be a multiple of train.micro_batch_size=5"),
        (["distill.num_loss_chunks=0"], "distill.num_loss_chunks must be a positive integer"),
        (
            ["optim.use_distributed_optimizer=false", "optim.overlap_param_gather=true"],
            "optim.overlap_param_gather needs optim.use_distributed_optimizer=true",
        ),
        (["optim.overlap_grad_reduce=true"], "elastic.depth_choices [48, 52, 56, 62] skip layers"),
        (["optim.ddp_bucket_size=0"], "optim.ddp_bucket_size must be a positive integer"),
        (["train.recompute_granularity=some"], "train.recompute_granularity='some'"),
        (["train.recompute_num_layers=2"], "recompute_num_layers=2 with recompute_method=uniform"),
        (
            ["train.recompute_method=block", "train.recompute_num_layers=63"],
            "exceeds the 62 layers of the largest pipeline stage",
        ),
        (
            ["train.recompute_activations=true", "train.recompute_granularity=selective"],
            "recompute_activations=true means recompute_granularity=full",
        ),
    ],
)
def test_bad_overrides_raise(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_train_recipe(NANO / "stage1_8k.yaml", overrides)


def test_tuning_settings_reach_their_configs() -> None:
    """The 12B recipes: full recomputation of every layer, no deterministic kernels; the old
    ``recompute_activations`` spelling still means full; a block and a PP layout override."""
    for path in (NANO / "stage1_8k.yaml", NANO / "stage2_49k.yaml"):
        train = load_train_recipe(path).train
        assert (train.recompute_granularity, train.recompute_method) == ("full", "uniform")
        assert train.recompute_num_layers == 1 and train.deterministic is False
    tiny = load_train_recipe(TINY / "stage1.yaml").train
    assert tiny.deterministic is True and tiny.recompute.granularity is None
    old = load_train_recipe(TINY / "stage1.yaml", ["train.recompute_activations=true"]).train
    assert old.recompute == load_train_recipe(NANO / "stage1_8k.yaml").train.recompute
    recipe = load_train_recipe(
        NANO / "stage2_49k.yaml",
        [
            "train.recompute_method=block",
            "train.recompute_num_layers=20",
            "parallel.tensor_parallel_size=8",
            "parallel.pipeline_parallel_size=2",
            "parallel.pipeline_layout=[32, 30]",
            "optim.overlap_param_gather=true",
        ],
    )
    assert recipe.train.recompute.layers(30) == 20
    assert recipe.parallel.stage_layer_counts(62) == (32, 30)
    assert recipe.optim.overlap_param_gather


# --- bad recipe files ---------------------------------------------------------------------------


def _write_recipe(tmp_path: Path, change) -> Path:
    """examples/tiny/stage1.yaml, changed by ``change(data)``, written to tmp_path (its model and
    elastic files referenced by absolute path)."""
    data = yaml.safe_load((TINY / "stage1.yaml").read_text())
    data["model"] = str(TINY / "model.yaml")
    data["elastic"] = str(TINY / "elastic.yaml")
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _set(key: str, value):
    def change(data) -> None:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value

    return change


def _delete(key: str):
    return lambda data: data.pop(key)


BAD_RECIPES = {
    "unknown-top-level-key": (_set("budget_sampeling", {"full": 1.0}), "did you mean"),
    "unknown-section-key": (_set("optim.warmup_step", 5), "did you mean 'warmup_steps'"),
    "probabilities-not-summing-to-1": (
        _set("budget_sampling", {"full": 0.5, "75%": 0.3, "50%": 0.1}),
        "sum to 0.9, not 1",
    ),
    "negative-probability": (
        _set("budget_sampling", {"full": 1.5, "75%": -0.5, "50%": 0.0}),
        "must be >= 0",
    ),
    "unknown-budget": (
        _set("budget_sampling", {"full": 0.5, "75%": 0.3, "25%": 0.2}),
        "unknown budgets ['25%']",
    ),
    "no-budget-sampling": (_delete("budget_sampling"), "probabilities are empty"),
    "missing-section": (_delete("train"), "missing required key 'train'"),
    "missing-field": (lambda d: d["train"].pop("seq_length"), "missing required key(s) seq_length"),
    "bad-mode": (_set("mode", "elastik"), "mode='elastik'"),
    "plain-with-budgets": (_set("mode", "plain"), "mode 'plain' trains the parent alone"),
    "zero-steps": (_set("train.steps", 0), "train.steps must be a positive integer"),
    "missing-model-file": (_set("model", "/nonexistent/model.yaml"), "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_raises(tmp_path: Path, case: str) -> None:
    change, message = BAD_RECIPES[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        load_train_recipe(_write_recipe(tmp_path, change))


def test_missing_recipe_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_train_recipe(tmp_path / "nope.yaml")


# --- preflight: inputs checked before any compute -----------------------------------------------


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory, pgs, tiny_config, small_config) -> dict[str, Path]:
    """A dataset + tokenizer, a tiny parent checkpoint (the tiny recipes' architecture), a save
    directory holding one, and a checkpoint of another architecture (tests/fixtures)."""
    work = tmp_path_factory.mktemp("recipes")
    texts = [f"Question: what is {i} + {i + 1}?\nAnswer: {2 * i + 1}" for i in range(200)]
    train_bpe_tokenizer(texts, 300, work / "tokenizer.json")
    docs = [[int(t) for t in torch.randint(1, 300, (50,))] for _ in range(8)]
    write_indexed_dataset(work / "data" / "train", docs, tiny_config.vocab_size)
    torch.manual_seed(0)
    tiny = build_hybrid_model(tiny_config, pgs)
    save_checkpoint(work / "tiny_parent", tiny, tiny_config, kind="parent")
    save_checkpoint(work / "stage1" / "step_0000003", tiny, tiny_config, kind="parent")
    write_latest(work / "stage1", work / "stage1" / "step_0000003", 3, keep_last=2)
    small = build_hybrid_model(small_config, pgs)
    save_checkpoint(work / "small_parent", small, small_config, kind="parent")
    return {
        "data": work / "data" / "train",
        "tokenizer": work / "tokenizer.json",
        "parent": work / "tiny_parent",
        "stage1": work / "stage1",
        "other_arch": work / "small_parent",
        "save": work / "save",
    }


def _stage_recipe(inputs: dict[str, Path], **paths: Path | str):
    values = {
        "data.blend": inputs["data"],
        "data.tokenizer": inputs["tokenizer"],
        "checkpoint.init": inputs["parent"],
        "distill.teacher_checkpoint": inputs["parent"],
        "checkpoint.save": inputs["save"],
        **paths,
    }
    return load_train_recipe(TINY / "stage1.yaml", [f"{k}={v}" for k, v in values.items()])


def test_preflight_accepts_good_inputs(run_inputs) -> None:
    paths = preflight(_stage_recipe(run_inputs))
    assert paths == {"resume": None, "init": run_inputs["parent"], "teacher": run_inputs["parent"]}


def test_preflight_resolves_a_previous_stage_save_dir(run_inputs) -> None:
    paths = preflight(_stage_recipe(run_inputs, **{"checkpoint.init": run_inputs["stage1"]}))
    assert paths["init"] == run_inputs["stage1"] / "step_0000003"
    # A save directory that already holds a checkpoint is resumed: init is not read.
    paths = preflight(_stage_recipe(run_inputs, **{"checkpoint.save": run_inputs["stage1"]}))
    assert paths["resume"] == run_inputs["stage1"] / "step_0000003"
    assert paths["init"] is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("data.blend", "/nonexistent/train", "dataset prefix '/nonexistent/train' is missing"),
        ("data.tokenizer", "/nonexistent/tokenizer.json", "does not exist"),
        ("checkpoint.init", "/nonexistent/ckpt", "does not exist"),
        ("checkpoint.init", "other_arch", "was saved for a different architecture"),
        ("distill.teacher_checkpoint", "other_arch", "was saved for a different architecture"),
    ],
)
def test_preflight_rejects_bad_inputs(run_inputs, key: str, value: str, message: str) -> None:
    recipe = _stage_recipe(run_inputs, **{key: run_inputs.get(value, value)})
    with pytest.raises(ValueError, match=re.escape(message)):
        preflight(recipe)


# --- the CLI: exit status 2, the message on stderr, no traceback ---------------------------------


def test_cli_bad_recipe_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = _write_recipe(tmp_path, _set("train.stpes", 3))
    done = subprocess.run(
        [sys.executable, "-m", "megatron_elastic.train", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr and "did you mean 'steps'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_cli_missing_data_exits_2_before_compute(run_inputs, capsys) -> None:
    from megatron_elastic.train import main

    overrides = [
        f"data.tokenizer={run_inputs['tokenizer']}",
        f"checkpoint.init={run_inputs['parent']}",
        f"distill.teacher_checkpoint={run_inputs['parent']}",
        f"checkpoint.save={run_inputs['save']}",
        "data.blend=/nonexistent/train",
    ]
    assert main(["--config", str(TINY / "stage1.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert "error: dataset prefix '/nonexistent/train' is missing" in err, err
    assert not run_inputs["save"].exists(), "nothing written before the inputs were checked"


def test_fraction_strings_are_exact() -> None:
    recipe = load_train_recipe(NANO / "stage1_8k.yaml")
    assert recipe.source["budget_sampling"] == {"12B": "1/3", "9B": "1/3", "6B": "1/3"}
    assert sum(Fraction(v) for v in recipe.source["budget_sampling"].values()) == 1


# --- SP / CP in the 12B recipes and the SLURM scripts ---------------------------------------------


@pytest.mark.parametrize("script", ["stage1_8k.sh", "stage2_49k.sh"])
def test_12b_recipes_turn_on_sequence_parallelism(nano, script: str) -> None:
    recipe = nano[0 if script.startswith("stage1") else 1]
    assert recipe.parallel.sequence_parallel_active  # TP > 1 and SP on
    text = (ROOT / "slurm" / script).read_text()
    cp = int(re.search(r"^CP=\$\{CP:-(\d+)\}$", text, re.M).group(1))
    assert cp == recipe.parallel.context_parallel_size
    assert re.search(r"^SP=\$\{SP:-\}$", text, re.M), "SP defaults to the recipe's"
    # the planner's table for this layout is in the recipe's comments
    yaml_text = (NANO / script.replace(".sh", ".yaml")).read_text()
    assert "# Memory per GPU (python tools/plan_memory.py" in yaml_text
    assert "peak GiB per GPU: " in yaml_text


def _slurm_dry_run(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    import os

    for name in ("train.bin", "train.idx", "tokenizer.json"):
        (tmp_path / name).write_text("")
    (tmp_path / "ranked").mkdir(exist_ok=True)
    (tmp_path / "ranked" / "manifest.json").write_text("{}")
    (tmp_path / "s1").mkdir(exist_ok=True)
    (tmp_path / "s1" / "latest.json").write_text("{}")
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("TP", "PP", "SP", "CP", "EP", "DP", "RECIPE")
    }
    inputs = {
        "DATA_PREFIX": str(tmp_path / "train"),
        "TOKENIZER": str(tmp_path / "tokenizer.json"),
        "PARENT": str(tmp_path / "ranked"),
        "STAGE1_DIR": str(tmp_path / "s1"),
        "PYTHON": sys.executable,
        "DRY_RUN": "1",
    }
    return subprocess.run(
        ["bash", str(ROOT / "slurm" / script)],
        env={**base, **inputs, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_slurm_passes_sp_and_cp_through(tmp_path: Path) -> None:
    done = _slurm_dry_run(tmp_path, "stage2_49k.sh", SP="false", CP="2", SLURM_NTASKS="128")
    assert done.returncode == 0, done.stderr
    command = done.stderr.splitlines()[-1]
    assert "parallel.sequence_parallel=false" in command, command
    assert "parallel.context_parallel_size=2" in command, command
    # Unset SP: the recipe's value (no override); CP: the default 1.
    done = _slurm_dry_run(tmp_path, "stage1_8k.sh")
    command = done.stderr.splitlines()[-1]
    assert "parallel.sequence_parallel" not in command, command
    assert "parallel.context_parallel_size=1" in command, command


def test_slurm_passes_ep_through(tmp_path: Path) -> None:
    """EP becomes parallel.expert_model_parallel_size (default 1, the 12B recipes'); the 30B
    recipe's own launch line passes the world-size checks."""
    done = _slurm_dry_run(tmp_path, "stage1_8k.sh")
    assert "parallel.expert_model_parallel_size=1" in done.stderr.splitlines()[-1]
    recipe = str(ROOT / "examples" / "nemotron3_nano_30b" / "stage2_49k.yaml")
    done = _slurm_dry_run(
        tmp_path, "stage2_49k.sh", RECIPE=recipe, TP="1", PP="2", CP="4", EP="8",
        SLURM_NTASKS="128",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    command = done.stderr.splitlines()[-1]
    assert "parallel.expert_model_parallel_size=8" in command, command
    assert "nemotron3_nano_30b/stage2_49k.yaml" in command, command


@pytest.mark.parametrize("script", ["stage1_8k.sh", "stage2_49k.sh"])
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EP": "0"}, "EP must be a positive integer, got '0'"),
        ({"EP": "two"}, "EP must be a positive integer, got 'two'"),
        (
            {"TP": "4", "CP": "2", "EP": "3", "SLURM_NTASKS": "128"},
            "EP=3 does not divide DP x CP = 16 x 2 = 32",
        ),
    ],
)
def test_slurm_refuses_bad_ep(tmp_path: Path, script: str, env, message: str) -> None:
    done = _slurm_dry_run(tmp_path, script, **env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr, done.stderr
    assert "dry run" not in done.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SP": "yes"}, "SP must be true or false, got 'yes'"),
        ({"CP": "0"}, "CP must be a positive integer"),
        ({"CP": "3", "SLURM_NTASKS": "128"}, "128 tasks do not split into TP=4 x PP=1 x CP=3"),
        (
            {"CP": "2", "DP": "8", "SLURM_NTASKS": "128"},
            "DP=8 but 128 tasks = TP=4 x PP=1 x CP=2",
        ),
    ],
)
def test_slurm_checks_the_world_size_before_srun(tmp_path: Path, env, message: str) -> None:
    done = _slurm_dry_run(tmp_path, "stage2_49k.sh", **env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr, done.stderr
    assert "dry run" not in done.stderr


def test_slurm_world_is_tp_pp_cp_dp(tmp_path: Path) -> None:
    done = _slurm_dry_run(tmp_path, "stage2_49k.sh", CP="2", DP="16", SLURM_NTASKS="128")
    assert done.returncode == 0, done.stderr  # 4 x 1 x 2 x 16 = 128
