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
from megatron_elastic.checkpoint import (
    load_checkpoint,
    load_extra,
    load_rank_state,
    manifest_model,
    read_manifest,
    save_checkpoint,
)
from megatron_elastic.data import build_gpt_datasets, check_blend, load_tokenizer, micro_batches
from megatron_elastic.distill.pair import DistillationPair
from megatron_elastic.elastic import build_elastic_model
from megatron_elastic.integrity import CheckpointDamaged
from megatron_elastic.model import build_hybrid_model, count_parameters
from megatron_elastic.parallel import destroy_process_groups, init_process_groups
from megatron_elastic.preflight import PreflightConfig, require_environment
from megatron_elastic.router import (
    ElasticRouter,
    build_router_optimizer,
    finalize_router_grads,
    router_state,
)
from megatron_elastic.training.budget_sampling import BudgetSampler
from megatron_elastic.training.determinism import set_deterministic
from megatron_elastic.training.lm_step import distill_forward, forward_backward, lm_forward
from megatron_elastic.training.metrics import MetricsWriter, reduce_step_stats
from megatron_elastic.training.optim import build_optimizer, cast_parameters, sync_params, wrap_ddp
from megatron_elastic.training.recipe import TrainRecipe, recipe_summary
from megatron_elastic.training.state import (
    Progress,
    capture_rng,
    is_rank0,
    latest_checkpoint,
    previous_checkpoint_advice,
    prune_checkpoints,
    resolve_init,
    restore_rng,
    step_dir,
    write_latest,
)
from megatron_elastic.training.step_log import StepLog

__all__ = ["EXIT_NONFINITE", "Trainer", "preflight"]

EXIT_NONFINITE = 3
"""Exit status of a run stopped by a NaN/inf loss or gradient norm."""
PLAIN = "parent"
"""The single "budget" name of plain (parent) training in logs."""
MIX = "all"
"""The loss name of elastic training without a teacher (budgets mixed in one number)."""


def _log(message: str) -> None:
    if is_rank0():
        print(f"[train] {message}", flush=True)


def preflight(recipe: TrainRecipe) -> dict[str, Path | None]:
    """Check every input the stage reads before any compute: dataset prefixes, tokenizer, and the
    architecture of every checkpoint it will load. Returns the checkpoints to load."""
    check_blend(recipe.data.blend, recipe.data.cache_dir)
    load_tokenizer(recipe.data.tokenizer, model_vocab_size=recipe.model.vocab_size)
    resume = latest_checkpoint(recipe.checkpoint.save)
    init = None if resume is not None or not recipe.checkpoint.init else recipe.checkpoint.init
    init = resolve_init(init) if init else None
    teacher = None
    if recipe.distill.teacher == "parent":
        teacher = resolve_init(recipe.distill.teacher_checkpoint)
    for path in (resume, init, teacher):
        if path is not None and manifest_model(read_manifest(path)) != recipe.model:
            raise ValueError(
                f"checkpoint {str(path)!r} was saved for a different architecture than the "
                "recipe's model"
            )
    if resume is not None:
        saved = read_manifest(resume)["metadata"].get("recipe", {}).get("optim", {})
        # train.steps (and the schedule horizon derived from it) may change on resume, e.g. to
        # stop early or extend; the LR schedule keeps its saved horizon (the trainer says so).
        changed = {
            k: (saved[k], v)
            for k, v in dataclasses.asdict(recipe.optim).items()
            if k in saved and saved[k] != v and k != "total_steps"
        }
        if changed:
            raise ValueError(
                f"{recipe.checkpoint.save} holds a run with other optimizer settings "
                f"(saved vs now: {changed}); resuming needs the same ones. To change them, start "
                "a new stage: a new checkpoint.save with checkpoint.init pointing at this one"
            )
    return {"resume": resume, "init": init, "teacher": teacher}


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
            require_environment(r, config, log=_log, device=self.device)
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
            self.sampler = BudgetSampler(r.budget_sampling, self.elastic.budgets, r.train.seed)
        self.runner = self._runner()
        self.step_log.attach(self.model.config, getattr(self.runner, "teacher", None))
        self.progress = Progress()
        self._load()
        self._resumed_at = self.progress.step
        self.train_ds, self.valid_ds = self._datasets()
        last = pgs.pp.rank() == pgs.pp.size() - 1
        self.reports_losses = last and pgs.tp.rank() == 0
        # Per-budget losses come from the distillation pair's per-micro-batch records; without a
        # teacher, one loss for the step's mix.
        if isinstance(self.runner, DistillationPair):
            self.budgets = sorted(self.elastic.budgets)
        else:
            self.budgets = [PLAIN if r.mode == "plain" else MIX]
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
        source = self.paths["resume"] or self.paths["init"]
        if ranking is None and source is not None:
            manifest = read_manifest(source)
            ranking = manifest["metadata"].get("layer_ranking")
            if manifest["kind"] == "elastic":
                extra = load_extra(source, r.checkpoint.verify)
                ranking = extra["elastic_config"].get("layer_ranking")
        if ranking is None:
            return r.elastic
        return dataclasses.replace(r.elastic, layer_ranking=tuple(ranking))

    def _teacher(self):
        r = self.recipe
        if r.distill.teacher != "parent":
            return None
        teacher = build_hybrid_model(r.model, self.pgs, r.parallel, params_dtype=self.dtype)
        load_checkpoint(self.paths["teacher"], teacher, r.model, verify=r.checkpoint.verify)
        _log(f"teacher: {self.paths['teacher']} (frozen)")
        return teacher

    def _runner(self):
        r = self.recipe
        if r.mode == "plain" or r.distill.teacher == "none":
            return self.ddp
        return DistillationPair(
            self.ddp,
            self._teacher(),
            temperature=r.distill.temperature,
            ce_weight=r.distill.ce_weight,
            tp_group=self.pgs.tp,
            num_loss_chunks=r.distill.num_loss_chunks,
        )

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

    def _load(self) -> None:
        r, paths, verify = self.recipe, self.paths, self.recipe.checkpoint.verify
        if (path := paths["resume"]) is not None:
            try:
                manifest = load_checkpoint(
                    path, self.model, r.model, optimizer=self.optimizer, verify=verify
                )
                extra, rank_state = load_extra(path, verify), load_rank_state(path, verify)
            except CheckpointDamaged as exc:
                advice = previous_checkpoint_advice(r.checkpoint.save, path)
                raise CheckpointDamaged(exc.path, exc.file, exc.problem, advice) from exc
            self.scheduler.load_state_dict(extra["scheduler"])
            if self.router is not None:
                self.router.load_state_dict(extra["state_dict"])
            if self.router_optimizer is not None:
                self.router_optimizer.load_state_dict(extra["router_optimizer"])
                self.router_scheduler.load_state_dict(extra["router_scheduler"])
            self.progress = Progress(**manifest["metadata"]["progress"])
            horizon = manifest["metadata"]["recipe"]["optim"]["total_steps"]
            if horizon != r.optim.total_steps:
                _log(
                    f"train.steps is now {r.train.steps}; the LR schedule keeps the horizon of "
                    f"{horizon} steps it was saved with"
                )
            exact = restore_rng(rank_state)
            _log(
                f"resumed from {path} at step {self.progress.step}"
                + ("" if exact else " (RNG not restored: saved at another world size)")
            )
        elif (path := paths["init"]) is not None:
            manifest = load_checkpoint(path, self.model, r.model, verify=verify)
            # bf16: the optimizer's fp32 main weights were copied from the initial weights when
            # it was built; without this, its first step would write those back over the loaded.
            self.optimizer.reload_model_params()
            if self.router is not None and manifest["kind"] == "elastic":
                extra = load_extra(path, verify)
                if extra["elastic_config"]["budgets"] != dict(self.elastic.budgets):
                    raise ValueError(
                        f"{path} trained budgets {extra['elastic_config']['budgets']}, this "
                        f"recipe trains {dict(self.elastic.budgets)}"
                    )
                self.router.load_state_dict(extra["state_dict"])
                self.progress.router_step = (
                    manifest["metadata"].get("progress", {}).get("router_step", 0)
                )
            _log(f"initialised from {path} ({manifest['kind']})")

    # ----------------------------------------------------------------------------- one step
    def _hook(self, step: int, records: list[str]):
        r, router = self.recipe, self.router
        runner = self.runner
        is_pair = isinstance(runner, DistillationPair)

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
            if is_pair:
                runner.set_student(decision.spec, decision.weights)
            else:
                self.model.set_subnet(decision.spec, decision.weights)
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

    def train_step(self, step: int) -> tuple[dict[str, dict[str, float]], float, bool]:
        """One optimizer step. Returns per-budget losses, the grad norm and whether a
        preemption signal arrived on any rank; stops the run on a non-finite loss."""
        r, timers = self.recipe, self.step_log.timers
        self.step_log.begin(step)
        with timers.span("data"):
            batches = self._batches(self.progress.consumed_samples)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        budgets: list[str] = []
        hook = None
        if self.router is not None:
            hook = self._hook(step, budgets)
        if self.router_optimizer is not None:
            self.router_optimizer.zero_grad(set_to_none=False)
        is_pair = isinstance(self.runner, DistillationPair)
        if is_pair:
            self.runner.records.clear()
        loss = forward_backward(
            self.runner,
            batches,
            self.pgs,
            num_micro_batches=self.num_micro,
            seq_length=r.train.seq_length,
            micro_batch_size=r.train.micro_batch_size,
            micro_batch_hook=hook,
            model_forward=distill_forward if is_pair else lm_forward,
            p2p_batch_factor=2 if is_pair else 1,
        )
        finalize_model_grads([self.ddp], pg_collection=self.pgs)
        if self.router_optimizer is not None:
            finalize_router_grads(self.router, self.pgs)
        per_budget: dict[str, list[torch.Tensor]] = {}
        if is_pair:
            # Under CP each rank's records hold its share of a micro-batch's tokens (summed over
            # the CP ranks below); the micro-batch itself is counted on CP rank 0 only.
            counted = float(self.cp_rank == 0)
            for name, rec in zip(budgets, self.runner.records, strict=False):
                count = torch.full_like(rec.tokens, counted)
                row = torch.stack([rec.kd, rec.ce, rec.tokens, count])
                per_budget.setdefault(name, []).append(row.cpu())
        elif loss is not None and self.cp_rank == 0:  # the CP-reduced mean: counted once
            name = self.budgets[0]
            tokens = sum(b["loss_mask"].sum() for b in batches).cpu()
            row = torch.stack([loss.detach().cpu() * tokens, loss.detach().cpu() * tokens, tokens])
            per_budget[name] = [torch.cat([row, torch.tensor([float(self.num_micro)])])]
        local_bad = any(
            not torch.isfinite(t).all() for rows in per_budget.values() for t in rows
        ) or (loss is not None and not torch.isfinite(loss).all())
        stats, (bad, preempt), ranks = reduce_step_stats(
            self.budgets,
            per_budget,
            [float(local_bad), float(self.preemption.requested)],
            self.reports_losses,
            self.device,
            per_rank=self.step_log.rank_values(),
        )
        self.step_log.reduced(step, ranks)
        if bad:
            return stats, math.nan, False
        with timers.span("optimizer"):
            ok, grad_norm, _ = self.optimizer.step()
            grad_norm = float("nan") if grad_norm is None else float(grad_norm)
            if not ok or not math.isfinite(grad_norm):
                return stats, math.nan, False
            self.scheduler.step(increment=1)
            if self.router_optimizer is not None:
                self.router_optimizer.step()
                self.router_scheduler.step()
        if self.router is not None:
            self.progress.router_step += 1
        self.progress.step = step
        self.progress.consumed_samples += r.train.global_batch_size
        self.progress.tokens += r.train.global_batch_size * r.train.seq_length
        return stats, grad_norm, bool(preempt)

    # ----------------------------------------------------------------------------- run
    def run(self) -> int:
        """Train to the end of the stage (or until preempted). Returns the process exit status."""
        r = self.recipe
        _log(
            f"stage {r.stage} ({r.mode}): {count_parameters(r.model):,} params, "
            f"{r.train.steps} steps x {r.train.global_batch_size} x {r.train.seq_length} tokens, "
            f"TP {r.parallel.tensor_parallel_size} PP {r.parallel.pipeline_parallel_size} "
            f"CP {r.parallel.context_parallel_size} DP {self.dp_size}"
            f"{' SP' if r.parallel.sequence_parallel_active else ''}, "
            f"{self.num_micro} micro-batches/step, {self.dtype}"
        )
        for step in range(self.progress.step + 1, r.train.steps + 1):
            stats, grad_norm, preempt = self.train_step(step)
            self.step_log.end(step, done=math.isfinite(grad_norm))
            if not math.isfinite(grad_norm):
                _log(
                    f"non-finite loss or gradient at step {step} ({stats}); stopping without "
                    f"saving. The last good checkpoint in {r.checkpoint.save} is kept; lower "
                    "the learning rate or check the data, then rerun to resume from it."
                )
                self.metrics.close()
                return EXIT_NONFINITE
            if self.step_log.due(step):
                self.step_log.log(step, stats, grad_norm)
            if r.train.eval_interval and step % r.train.eval_interval == 0:
                self.evaluate(step)
            if preempt:
                self.save()
                _log(f"preemption signal: saved step {step}, exiting cleanly")
                self.metrics.close()
                return 0
            if step % r.checkpoint.save_interval == 0 and step != r.train.steps:
                self.save()
        if self.progress.step == r.train.steps and self._saved_step != r.train.steps:
            if self.paths["resume"] is not None and self.progress.step == self._resumed_at:
                _log("this stage was already complete; nothing to do")
            else:
                self.evaluate(r.train.steps)
                self.save()
        self.metrics.close()
        _log(
            f"stage {r.stage} done: {self.progress.step} steps; checkpoints in {r.checkpoint.save}"
        )
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
        results = {}
        for name in self.budgets:
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
        extra = {"scheduler": self.scheduler.state_dict()}
        if self.router is not None:
            extra.update(router_state(self.router))
        if self.router_optimizer is not None:
            extra["router_optimizer"] = self.router_optimizer.state_dict()
            extra["router_scheduler"] = self.router_scheduler.state_dict()
        metadata = {
            "stage": r.stage,
            "progress": dataclasses.asdict(p),
            "tokenizer": self.tokenizer_path,
            "recipe": recipe_summary(r),
        }
        if self.elastic is not None and self.elastic.layer_ranking is not None:
            metadata["layer_ranking"] = list(self.elastic.layer_ranking)
        save_checkpoint(
            path,
            self.model,
            r.model,
            kind="elastic" if r.mode == "elastic" else "parent",
            metadata=metadata,
            extra=extra,
            optimizer=self.optimizer,
            rank_state=capture_rng(),
        )
        self._saved_step = p.step
        if is_rank0():
            write_latest(r.checkpoint.save, path, p.step, r.checkpoint.keep_last)
            prune_checkpoints(r.checkpoint.save)
        if dist.is_initialized():
            dist.barrier()
        _log(f"saved {path}")
        return path

    def close(self) -> None:
        destroy_process_groups()
