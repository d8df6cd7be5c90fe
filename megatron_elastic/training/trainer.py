"""The training loop on megatron-core: one stage of a recipe (plain parent pretraining, or elastic
training of every budget with router and distillation), resumable and preemptible.

Per step: each micro-batch draws its budget (same draw on every TP/PP rank of a replica), the
router turns it into a sub-network, the student runs it and is distilled from the frozen teacher
on the same micro-batch, through megatron's pipeline schedule; then DDP/router gradient
reduction, one all-reduce of the step's statistics (losses, NaN and preemption flags), the
optimizer steps, logging and checkpointing.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from megatron_elastic import platform
from megatron_elastic.data import build_gpt_datasets, check_blend, load_tokenizer, micro_batches
from megatron_elastic.elastic import build_elastic_model
from megatron_elastic.model import build_hybrid_model, count_parameters
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.preflight import PreflightConfig, require_environment
from megatron_elastic.router import (
    ElasticRouter,
    build_router_optimizer,
    finalize_router_grads,
)
from megatron_elastic.training.budget_sampling import BudgetSampler
from megatron_elastic.training.checkpointing import (
    StageState,
    checkpoint_layer_ranking,
    load_stage,
    load_teacher,
    save_stage,
    stage_checkpoints,
)
from megatron_elastic.training.determinism import set_deterministic
from megatron_elastic.training.lm_step import forward_backward
from megatron_elastic.training.metrics import MetricsWriter, StepRecord, reduce_step_stats
from megatron_elastic.training.optim import build_optimizer, cast_parameters, sync_params, wrap_ddp
from megatron_elastic.training.recipe import TrainRecipe, recipe_summary
from megatron_elastic.training.runner import Runner, build_runner
from megatron_elastic.training.state import (
    is_rank0,
    log,
    prune_checkpoints,
    step_dir,
    write_latest,
)
from megatron_elastic.training.step_log import StepLog

__all__ = ["EXIT_NONFINITE", "Trainer", "preflight"]

EXIT_NONFINITE = 3
"""Exit status of a run stopped by a NaN/inf loss or gradient norm."""


def preflight(recipe: TrainRecipe) -> dict[str, Path | None]:
    """Check every input the stage reads before any compute: dataset prefixes, tokenizer, and the
    architecture of every checkpoint it will load. Returns the checkpoints to load."""
    check_blend(recipe.data.blend, recipe.data.cache_dir)
    load_tokenizer(recipe.data.tokenizer, model_vocab_size=recipe.model.vocab_size)
    return stage_checkpoints(recipe)


class _Preemption:
    """SIGTERM/SIGUSR1 (SLURM preemption, ``scancel``, ``--signal``) ask for a save and a clean
    exit at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


class Trainer:
    """One stage of a :class:`TrainRecipe` on this process's share of the model."""

    def __init__(self, recipe: TrainRecipe) -> None:
        self.recipe = r = recipe
        self.paths = preflight(r)
        self.preemption = _Preemption()
        set_deterministic(r.train.deterministic)  # (CUBLAS_WORKSPACE_CONFIG before any matmul)
        self.pgs = pgs = init_process_groups(r.parallel, seed=r.train.seed)
        # Data parallel replicas read distinct samples; the CP ranks of a replica read the same
        # ones and each trains its load-balanced share of every sequence.
        self.dp_rank, self.dp_size = pgs.dp.rank(), pgs.dp.size()
        self.step_log = StepLog(self)  # memory, timers, throughput: before the model is built
        self.cp_rank = pgs.cp.rank()
        per_step = r.train.micro_batch_size * self.dp_size
        if r.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={r.train.global_batch_size} is not a multiple of "
                f"micro_batch_size x data-parallel size = {per_step}"
            )
        self.num_micro = r.train.global_batch_size // per_step
        self.device = platform.default_device()
        # CUDA, NCCL, kernels, the Mamba conv route (said once here), memory, disk: preflight.py
        if platform.cuda_available():
            config = PreflightConfig(world_size=dist.get_world_size())
            require_environment(r, config, log=log, device=self.device)
        self.dtype = self._dtype()
        self.tokenizer_path = str(Path(r.data.tokenizer).resolve())
        self.elastic = self._elastic_config()
        recompute = r.train.recompute
        if r.mode == "elastic":
            self.model = build_elastic_model(
                r.model, self.elastic, pgs, r.parallel, params_dtype=self.dtype, recompute=recompute
            )
        else:
            self.model = build_hybrid_model(
                r.model, pgs, r.parallel, params_dtype=self.dtype, recompute=recompute
            )
        cast_parameters(self.model, self.dtype)
        self.ddp = wrap_ddp(self.model, pgs, r.optim)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, r.optim, params_dtype=self.dtype)
        self.router = self.router_optimizer = self.router_scheduler = None
        if r.mode == "elastic":
            self.router = ElasticRouter(r.model, self.elastic, r.router).to(self.device)
            self.router.check_reachable()
            if self.router.trainable:  # fixed architectures: nothing to optimise
                self.router_optimizer, self.router_scheduler = build_router_optimizer(
                    self.router, r.router
                )
            self.sampler = BudgetSampler(
                r.budget_sampling,
                self.elastic.budgets,
                r.train.seed,
                mode=r.train.budget_sampling_mode,
                per_step=self.dp_size * self.num_micro,
            )
        self.runner: Runner = self._runner()
        self.step_log.attach(self.model.config, self.runner.teacher)
        self.state = StageState(
            self.model,
            self.optimizer,
            self.scheduler,
            self.router,
            self.router_optimizer,
            self.router_scheduler,
        )
        budgets = self.elastic.budgets if self.elastic is not None else None
        self.progress = load_stage(r, self.paths, self.state, budgets)
        self._resumed_at = self.progress.step
        self.train_ds, self.valid_ds = self._datasets()
        last = pgs.pp.rank() == pgs.pp.size() - 1
        self.reports_losses = last and pgs.tp.rank() == 0
        self.budgets = self.runner.budgets
        self._saved_step = -1
        self.metrics = MetricsWriter(
            Path(r.checkpoint.save),
            enabled=is_rank0(),
            tensorboard=r.logging.tensorboard,
            wandb_project=r.logging.wandb_project,
            run_name=r.stage,
            config=recipe_summary(r),
        )

    # ----------------------------------------------------------------------------- set-up
    def _dtype(self) -> torch.dtype:
        precision = self.recipe.train.resolved_precision(platform.cuda_available())
        return torch.bfloat16 if precision == "bf16" else torch.float32

    def _elastic_config(self):
        """The recipe's elastic config, with the layer ranking of the checkpoint it starts from
        (importance estimation stores it; later stages carry it in their router state)."""
        r = self.recipe
        if r.mode != "elastic":
            return None
        ranking = r.elastic.layer_ranking
        if ranking is None:
            source = self.paths["resume"] or self.paths["init"]
            ranking = checkpoint_layer_ranking(source, r.checkpoint.verify)
        if ranking is None:
            return r.elastic
        return dataclasses.replace(r.elastic, layer_ranking=tuple(ranking))

    def _runner(self) -> Runner:
        r, teacher = self.recipe, None
        if r.mode == "elastic" and r.distill.teacher == "parent":
            teacher = load_teacher(r, self.paths["teacher"], self.pgs, self.dtype)
        budgets = list(self.elastic.budgets) if self.elastic is not None else []
        return build_runner(r, self.ddp, self.model, teacher, budgets, self.pgs.tp)

    def _datasets(self):
        r = self.recipe
        train, valid, _ = build_gpt_datasets(
            r.data.blend,
            seq_length=r.train.seq_length,
            tokenizer=load_tokenizer(r.data.tokenizer),
            num_samples=(r.train.steps * r.train.global_batch_size, r.data.valid_samples, None),
            split=r.data.split,
            seed=r.train.seed,
            cache_dir=r.data.cache_dir,
        )
        return train, valid

    # ----------------------------------------------------------------------------- one step
    def _hook(self, step: int, records: list[str], architectures: list[tuple[str, str]]):
        r, router = self.recipe, self.router

        def hook(i: int) -> torch.Tensor | None:
            index = self.dp_rank * self.num_micro + i  # distinct per replica, same across TP/PP
            budget = self.sampler.sample(step, index)
            records.append(budget)
            decision = router.decide(
                budget,
                self.progress.router_step,
                r.router.generator(self.progress.router_step, index, device=self.device),
                device=self.device,
            )
            architectures.append((budget, router.architecture_name(decision.indices)))
            self.runner.set_subnet(decision.spec, decision.weights)
            return router.budget_loss(decision)

        return hook

    def _batches(self, start: int):
        r = self.recipe
        stream = micro_batches(
            self.train_ds,
            r.train.micro_batch_size,
            start=start,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        batches = list(itertools.islice(stream, self.num_micro))
        if len(batches) < self.num_micro:
            raise RuntimeError("the training dataset ran out of samples")  # sized for all steps
        return [{k: v.to(self.device) for k, v in b.items()} for b in batches]

    def train_step(self, step: int) -> StepRecord:
        """One optimizer step; not taken (NaN grad norm) on a non-finite loss or gradient."""
        r, timers, runner = self.recipe, self.step_log.timers, self.runner
        self.step_log.begin(step)
        with timers.span("data"):
            batches = self._batches(self.progress.consumed_samples)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        drawn: list[str] = []  # each micro-batch's budget, in order
        self.step_architectures: list[tuple[str, str]] = []  # (budget, architecture) of each
        hook = None if self.router is None else self._hook(step, drawn, self.step_architectures)
        if self.router_optimizer is not None:
            self.router_optimizer.zero_grad(set_to_none=False)
        runner.begin_step()
        loss = forward_backward(
            runner.module,
            batches,
            self.pgs,
            num_micro_batches=self.num_micro,
            seq_length=r.train.seq_length,
            micro_batch_size=r.train.micro_batch_size,
            micro_batch_hook=hook,
            model_forward=runner.forward,
            p2p_batch_factor=runner.p2p_batch_factor,
        )
        finalize_model_grads([self.ddp], pg_collection=self.pgs)
        if self.router_optimizer is not None:
            finalize_router_grads(self.router, self.pgs)
        per_budget = runner.losses(drawn, loss, batches, counted=self.cp_rank == 0)
        local_bad = any(
            not torch.isfinite(s.row()).all() for sums in per_budget.values() for s in sums
        ) or (loss is not None and not torch.isfinite(loss).all())
        reduced = reduce_step_stats(
            self.budgets,
            per_budget,
            {"nonfinite": float(local_bad), "preempt": float(self.preemption.requested)},
            self.reports_losses,
            self.device,
            per_rank=self.step_log.rank_values(),
        )
        self.step_log.reduced(step, reduced.per_rank)
        not_taken = StepRecord(step, reduced.losses, math.nan, preempted=False)
        if reduced.flags["nonfinite"]:
            return not_taken
        with timers.span("optimizer"):
            ok, grad_norm, _ = self.optimizer.step()
            grad_norm = float("nan") if grad_norm is None else float(grad_norm)
            if not ok or not math.isfinite(grad_norm):
                return not_taken
            self.scheduler.step(increment=1)
            if self.router_optimizer is not None:
                self.router_optimizer.step()
                self.router_scheduler.step()
        if self.router is not None:
            self.progress.router_step += 1
        self.progress.step = step
        self.progress.consumed_samples += r.train.global_batch_size
        self.progress.tokens += r.train.global_batch_size * r.train.seq_length
        return StepRecord(step, reduced.losses, grad_norm, bool(reduced.flags["preempt"]))

    # ----------------------------------------------------------------------------- run
    def run(self) -> int:
        """Train to the end of the stage (or until preempted). Returns the process exit status."""
        r = self.recipe
        log(
            f"stage {r.stage} ({r.mode}): {count_parameters(r.model):,} params, "
            f"{r.train.steps} steps x {r.train.global_batch_size} x {r.train.seq_length} tokens, "
            f"TP {r.parallel.tensor_parallel_size} PP {r.parallel.pipeline_parallel_size} "
            f"CP {r.parallel.context_parallel_size} DP {self.dp_size}"
            f"{' SP' if r.parallel.sequence_parallel_active else ''}, "
            f"{self.num_micro} micro-batches/step, {self.dtype}"
        )
        for step in range(self.progress.step + 1, r.train.steps + 1):
            try:
                record = self.train_step(step)
            except BaseException:
                self.step_log.memory.close()  # else it outlives this trainer, in-process
                raise
            self.step_log.end(step, done=record.taken)
            if not record.taken:
                losses = {k: dataclasses.asdict(v) for k, v in record.losses.items()}
                log(
                    f"non-finite loss or gradient at step {step} ({losses}); stopping without "
                    f"saving. The last good checkpoint in {r.checkpoint.save} is kept; lower "
                    "the learning rate or check the data, then rerun to resume from it."
                )
                self.metrics.close()
                return EXIT_NONFINITE
            if self.step_log.due(step):
                self.step_log.log(record)
            if r.train.eval_interval and step % r.train.eval_interval == 0:
                self.evaluate(step)
            if record.preempted:
                self.save()
                log(f"preemption signal: saved step {step}, exiting cleanly")
                self.metrics.close()
                return 0
            if step % r.checkpoint.save_interval == 0 and step != r.train.steps:
                self.save()
        if self.progress.step == r.train.steps and self._saved_step != r.train.steps:
            if self.paths["resume"] is not None and self.progress.step == self._resumed_at:
                log("this stage was already complete; nothing to do")
            else:
                self.evaluate(r.train.steps)
                self.save()
        self.metrics.close()
        log(f"stage {r.stage} done: {self.progress.step} steps; checkpoints in {r.checkpoint.save}")
        return 0

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Validation cross entropy per budget (the router's deterministic choice)."""
        r = self.recipe
        if self.valid_ds is None or len(self.valid_ds) < r.train.micro_batch_size * self.dp_size:
            return {}
        batches = [
            {k: v.to(self.device) for k, v in b.items()}
            for b in micro_batches(
                self.valid_ds,
                r.train.micro_batch_size,
                dp_rank=self.dp_rank,
                dp_size=self.dp_size,
            )
        ]
        results = {}  # every trained budget at the router's choice (the loss may be a mix)
        for name in list(self.elastic.budgets) if self.router is not None else self.budgets:
            if self.router is not None:
                spec = self.router.decide(name, 0, None, deterministic=True).spec
                self.model.set_subnet(spec)
            loss = forward_backward(
                self.ddp,
                batches,
                self.pgs,
                num_micro_batches=len(batches),
                seq_length=r.train.seq_length,
                micro_batch_size=r.train.micro_batch_size,
                forward_only=True,
            )
            value = torch.zeros(1, dtype=torch.float64, device=self.device)
            if loss is not None and self.reports_losses and self.cp_rank == 0:
                value += loss.double()  # (already the mean over the CP ranks' tokens)
            dist.all_reduce(value)
            results[name] = value.item() / self.dp_size
        if self.router is not None:
            self.model.set_subnet(None)
        self.metrics.log(
            step,
            {f"valid/{k}": v for k, v in results.items()},
            "[train] validation loss " + " ".join(f"{k} {v:.4f}" for k, v in results.items()),
        )
        return results

    def save(self) -> Path:
        """Checkpoint the full training state of this step."""
        r, p = self.recipe, self.progress
        sync_params(self.ddp)  # (overlap_param_gather: the last step's gather is still pending)
        path = step_dir(r.checkpoint.save, p.step)
        ranking = None if self.elastic is None else self.elastic.layer_ranking
        save_stage(path, r, self.state, p, tokenizer=self.tokenizer_path, layer_ranking=ranking)
        self._saved_step = p.step
        if is_rank0():
            write_latest(r.checkpoint.save, path, p.step, r.checkpoint.keep_last)
            prune_checkpoints(r.checkpoint.save)
        if dist.is_initialized():
            dist.barrier()
        log(f"saved {path}")
        return path

    def close(self) -> None:
        destroy_process_groups()
