"""Training options of issue 27: the full budget trains exactly the parent (``router.full_budget:
parent``), stratified and sandwich budget sampling, the warmup-stable-decay and constant
learning-rate schedules, and the micro-batch counts a logged step writes."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from training_workspace import write_training_workspace

from megatron_elastic.elastic.config import load_elastic_recipe
from megatron_elastic.elastic.subnet import SubnetSpec
from megatron_elastic.router import ElasticRouter, RouterConfig
from megatron_elastic.training.budget_sampling import BudgetSampler
from megatron_elastic.training.optim import OptimConfig, build_lr_scheduler
from megatron_elastic.training.recipe import TrainConfig, load_train_recipe

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "train_small"
BUDGETS = {"12B": 1.0, "9B": 0.75, "6B": 0.5}
MIXES = [
    {"12B": 1 / 3, "9B": 1 / 3, "6B": 1 / 3},
    {"12B": 0.5, "9B": 0.3, "6B": 0.2},
    {"12B": 0.7, "9B": 0.0, "6B": 0.3},
]


# ---- budget sampling -----------------------------------------------------------------------


@pytest.mark.parametrize("probs", MIXES)
def test_invariant_stratified_step_counts_within_one_micro_batch_of_the_proportions(probs) -> None:
    """Every step of ``n`` micro-batches holds each budget ``p * n`` times within one (and
    exactly ``floor`` or ``ceil`` of it); over many steps the mean count is ``p * n`` (the
    remainder is drawn, not fixed: no budget is favoured)."""
    for n in (1, 2, 3, 4, 7, 12):
        sampler = BudgetSampler(probs, BUDGETS, seed=5, mode="stratified", per_step=n)
        totals = dict.fromkeys(BUDGETS, 0)
        steps = 400
        for step in range(steps):
            drawn = [sampler.sample(step, i) for i in range(n)]
            for name, p in probs.items():
                count = drawn.count(name)
                assert math.floor(p * n + 1e-9) <= count <= math.ceil(p * n - 1e-9), (n, drawn)
                totals[name] += count
        for name, p in probs.items():  # a binomial mean of 400 steps: within ~4 sigma
            assert abs(totals[name] / steps - p * n) < 0.1, (n, name, totals)


def test_stratified_fixes_the_paper_stage_mix_that_independent_draws_miss() -> None:
    """The issue's numbers: 3 micro-batches per step at 1/3 each. Independent draws leave a
    budget out of ~30% of steps; stratified never does; both draw each budget 1/3 of the time."""
    probs = MIXES[0]
    independent = BudgetSampler(probs, BUDGETS, seed=1)
    stratified = BudgetSampler(probs, BUDGETS, seed=1, mode="stratified", per_step=3)
    missing = sum(
        "6B" not in {independent.sample(step, i) for i in range(3)} for step in range(2000)
    )
    assert 0.25 < missing / 2000 < 0.35, missing  # (2/3)^3 = 0.296
    assert all(sorted(stratified.step_budgets(s)) == ["12B", "6B", "9B"] for s in range(200))


@pytest.mark.parametrize("mode", ["independent", "stratified", "sandwich"])
def test_invariant_resumed_sampler_draws_the_uninterrupted_sequence(mode) -> None:
    """A sampler created at resume (a new process) draws, from the resumed step on, exactly what
    the uninterrupted one drew, whatever order replicas ask in; each step's order is shuffled
    (not fixed by the allocation) and depends on the seed."""
    probs, n = MIXES[1], 5
    whole = BudgetSampler(probs, BUDGETS, seed=11, mode=mode, per_step=n)
    sequence = [[whole.sample(step, i) for i in range(n)] for step in range(1, 41)]
    resumed = BudgetSampler(dict(probs), BUDGETS, seed=11, mode=mode, per_step=n)
    for step in range(21, 41):  # replicas ask in reverse order, each step from scratch
        assert [resumed.sample(step, i) for i in reversed(range(n))][::-1] == sequence[step - 1]
    assert len({tuple(s) for s in sequence}) > 3  # the order within a step varies
    other = BudgetSampler(probs, BUDGETS, seed=12, mode=mode, per_step=n)
    assert sequence != [[other.sample(step, i) for i in range(n)] for step in range(1, 41)]


def test_independent_mode_keeps_the_papers_draws() -> None:
    """The default draws are today's: one generator per (seed, step, micro-batch), seeded by the
    same 64-bit mix, one multinomial draw over the budgets largest first (so resumed and
    released runs keep their sequences)."""
    probs = MIXES[1]
    sampler = BudgetSampler(probs, BUDGETS, seed=7)
    names = ["12B", "9B", "6B"]
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for step in range(30):
        for mb in range(4):
            mixed = 7 * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + mb
            g = torch.Generator().manual_seed(mixed % 2**63)
            assert (
                sampler.sample(step, mb) == names[int(torch.multinomial(weights, 1, generator=g))]
            )


@pytest.mark.parametrize("n", [2, 3, 6])
def test_sandwich_steps_contain_both_extremes(n) -> None:
    """Every step trains the largest and the smallest budget the stage samples (``9B``'s
    probability 0 is not trained; ``6B`` the smallest with p > 0 in the last mix), the rest
    stratified, in a shuffled order."""
    for probs, smallest in ((MIXES[1], "6B"), ({"12B": 0.6, "9B": 0.4, "6B": 0.0}, "9B")):
        sampler = BudgetSampler(probs, BUDGETS, seed=3, mode="sandwich", per_step=n)
        firsts = set()
        for step in range(100):
            drawn = sampler.step_budgets(step)
            assert len(drawn) == n and "12B" in drawn and smallest in drawn, drawn
            assert "6B" not in drawn or probs["6B"] > 0
            firsts.add(drawn[0])
        assert len(firsts) > 1  # shuffled


def test_bad_sampling_settings_are_refused_in_one_line() -> None:
    """Sandwich with one micro-batch per step (recipe and sampler), an unknown mode, and a
    sampling mode in plain training."""
    one_line = r"^train\.budget_sampling_mode=sandwich .*train\.global_batch_size[^\n]*$"
    with pytest.raises(ValueError, match=one_line):
        TrainConfig(
            steps=1,
            seq_length=8,
            micro_batch_size=4,
            global_batch_size=4,
            budget_sampling_mode="sandwich",
        )
    with pytest.raises(ValueError, match="1 micro-batch"):
        BudgetSampler(MIXES[0], BUDGETS, seed=0, mode="sandwich", per_step=1)
    with pytest.raises(ValueError, match=r"choose one of \('independent'"):
        BudgetSampler(MIXES[0], BUDGETS, seed=0, mode="stratifed", per_step=4)
    plain = [f"data.blend={ROOT}", "data.tokenizer=t", "checkpoint.save=s", "mode=plain"]
    plain += ["elastic=null", "router=null", "budget_sampling=null", "distill.teacher=none"]
    with pytest.raises(ValueError, match=r"mode 'plain' .* remove train\.budget_sampling_mode"):
        load_train_recipe(FIXTURE / "stage.yaml", [*plain, "train.budget_sampling_mode=stratified"])


# ---- learning-rate schedules ---------------------------------------------------------------


def _lrs(**fields) -> list[float]:
    """The learning rate at steps 0..total_steps of the schedule megatron builds for ``fields``."""
    config = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=100, **fields)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = build_lr_scheduler(optimizer, config)
    out = [optimizer.param_groups[0]["lr"]]
    for _ in range(config.total_steps):
        scheduler.step(1)
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.filterwarnings("ignore:Could not determine rank:UserWarning")  # no process group here
def test_wsd_schedule_values() -> None:
    """Warmup-stable-decay over 100 steps, 10 of warmup, the last 20% decaying linearly from
    1e-3 to 1e-4: warmup ramps from 0, the stable phase holds the peak (the constant schedule's
    values, so its checkpoints are points of one curve), the decay ends at min_lr."""
    wsd = _lrs(lr_schedule="wsd", lr_decay_fraction=0.2)
    constant = _lrs(lr_schedule="constant")
    want = {0: 0.0, 5: 5e-4, 10: 1e-3, 50: 1e-3, 80: 1e-3, 85: 7.75e-4, 90: 5.5e-4, 100: 1e-4}
    for step, lr in want.items():
        assert wsd[step] == pytest.approx(lr, rel=1e-12, abs=1e-15), step
    assert wsd[:81] == pytest.approx(constant[:81], rel=1e-12) and constant[81:] == [1e-3] * 20
    cosine = _lrs()  # the default (unchanged): half-way through the decay, the mid-point
    assert cosine[55] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-12) and cosine[100] == 1e-4
    assert _lrs(lr_schedule="wsd", lr_decay_fraction=0.5)[50:52] == pytest.approx([1e-3, 9.82e-4])


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"lr_schedule": "linear"}, r"optim.lr_schedule='linear'; choose one of"),
        ({"lr_decay_fraction": 0.0}, r"optim.lr_decay_fraction must be in \(0, 1\]"),
        ({"lr_decay_fraction": 1.5}, r"optim.lr_decay_fraction must be in \(0, 1\]"),
        ({"lr_wsd_decay_style": "step"}, r"optim.lr_wsd_decay_style='step'"),
    ],
)
def test_bad_schedule_fields_are_refused(fields, match) -> None:
    with pytest.raises(ValueError, match=match):
        OptimConfig(**fields)


# ---- the full budget trains the parent -----------------------------------------------------


def _router(full_budget: str) -> ElasticRouter:
    model, elastic = load_elastic_recipe(FIXTURE / "elastic.yaml")
    return ElasticRouter(model, elastic, RouterConfig(anneal_steps=20, full_budget=full_budget))


def test_full_budget_parent_decision_is_the_parent_and_draws_no_noise() -> None:
    """``parent``: every training decision at fraction 1 is the parent without router weights
    (megatron's own forward), whatever the generator; the generator is not drawn from; the
    budget loss is the router's noiseless expected cost, positive at init (uniform choices) with
    a gradient into the router. Smaller budgets still sample. ``router`` (the paper's) samples
    sub-networks at fraction 1 from the same generators."""
    parent = _router("parent")
    full = SubnetSpec.full(parent.model_config)
    sampled = set()
    for seed in range(8):
        g = parent.config.generator(seed, 0)
        before = g.get_state()
        d = parent.decide("full", 3, g)
        assert d.spec == full and d.weights is None
        assert torch.equal(g.get_state(), before)
        loss = parent.budget_loss(d)
        assert loss.item() > 0.05
        parent.zero_grad()
        loss.backward()
        assert parent.routers["hidden"][2].bias.grad.abs().sum() > 0
        assert parent.decide("half", 3, parent.config.generator(seed, 0)).weights is not None
        sampled.add(_router("router").decide("full", 3, parent.config.generator(seed, 0)).spec)
    assert sampled != {full}  # the paper's mode trains sub-networks at the full budget
    assert parent.decide("full", 0, None, deterministic=True).spec == full


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, pgs):
    root = tmp_path_factory.mktemp("budget_modes")
    return write_training_workspace(root, FIXTURE / "model.yaml", pgs, records=120, seed=3)


def _one_step(workspace, name: str, *overrides: str, log: bool = False):
    """One ``Trainer.train_step`` of the train_small stage (no teacher: cross entropy) from the
    saved parent: its record, the gradient of every parameter by name, the updated weights and
    the trainer (``log``: the step is logged as ``Trainer.run`` logs it)."""
    from megatron_elastic.training.trainer import Trainer

    root, prefix = workspace
    recipe = load_train_recipe(
        FIXTURE / "stage.yaml",
        [
            f"data.blend={prefix}",
            f"data.tokenizer={root / 'tokenizer.json'}",
            "distill.teacher=none",
            f"checkpoint.init={root / 'parent'}",
            f"checkpoint.save={root / name}",
            "logging.tensorboard=false",
            "train.steps=2",
            *overrides,
        ],
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    trainer = Trainer(recipe)
    try:
        record = trainer.train_step(1)
        assert math.isfinite(record.grad_norm)
        grads = {n: p.main_grad.detach().clone() for n, p in trainer.model.named_parameters()}
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        if log:
            trainer.step_log.end(1, done=True)
            trainer.step_log.log(record)
    finally:
        trainer.metrics.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return record, grads, weights, trainer


def test_invariant_full_budget_parent_step_equals_a_plain_parent_step(workspace) -> None:
    """``router.full_budget: parent`` with every micro-batch at the full budget: the step's
    loss, every parameter's gradient and the updated weights equal (bitwise) one step of plain
    parent training on the same micro-batches from the same checkpoint; every micro-batch ran
    the parent's architecture. The router learns from the budget loss alone."""
    elastic, grads, weights, trainer = _one_step(
        workspace,
        "parent_mode",
        "router.full_budget=parent",
        "budget_sampling={full: 1.0}",
    )
    plain, plain_grads, plain_weights, _ = _one_step(
        workspace,
        "plain",
        "mode=plain",
        "elastic=null",
        "router=null",
        "budget_sampling=null",
    )
    assert elastic.losses["all"].loss == plain.losses["parent"].loss
    assert elastic.grad_norm == plain.grad_norm
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name
        assert torch.equal(weights[name], plain_weights[name]), name
    parent_name = trainer.router.architecture_name(
        trainer.router._indices_of(SubnetSpec.full(trainer.recipe.model))
    )
    assert trainer.step_architectures == [("full", parent_name)] * 2
    assert trainer.router.routers["hidden"][2].bias.grad.abs().sum() > 0


def test_logged_step_counts_micro_batches_per_budget_and_architecture(workspace) -> None:
    """A logged step writes ``micro_batches/<budget>`` (all replicas, since the previous log)
    and, in ``metrics.jsonl``, each budget's micro-batches per architecture run; the existing
    keys stay. Sandwich: both budgets in the step."""
    _, _, _, trainer = _one_step(
        workspace,
        "logged",
        "train.budget_sampling_mode=sandwich",
        "router.full_budget=parent",
        log=True,
    )
    row = json.loads((Path(trainer.recipe.checkpoint.save) / "metrics.jsonl").read_text())
    assert row["micro_batches/full"] == 1.0 and row["micro_batches/half"] == 1.0, row
    assert {"loss/all", "ce/all", "grad_norm", "lr", "router/temperature"} <= set(row)
    archs = row["architectures"]
    assert sorted(archs) == ["full", "half"] and all(sum(a.values()) == 1 for a in archs.values())
    assert archs["full"] == {trainer.router.architecture_name(trainer.router._parent_indices): 1}
