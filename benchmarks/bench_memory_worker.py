"""torchrun worker of ``bench_memory.py``: real training steps of the Trainer, peak memory measured.

``prepare WORKDIR MODEL.yaml`` (one process) writes what a stage needs: a tokenizer, a random
token dataset and a parent checkpoint (the frozen teacher and the student's initial weights).
``run WORKDIR CONFIG.json`` (every rank, under torchrun) builds :class:`Trainer` from a recipe
(elastic student, frozen teacher, router, megatron DDP + optimizer, the recipe's TP/PP/SP/CP and
recompute), runs its steps and writes ``result_<rank>.json``:

* CPU: the peak of the bytes held by torch's CPU allocator during the steps, read from
  ``torch.profiler``'s allocation events: each carries the allocator's own live-bytes counter
  (``total_allocated``), which counts every allocation and free since before the Trainer was
  built (so the weights, gradient buffers and optimizer state allocated before the first step
  are counted) *on every thread*, gloo's worker threads included (see
  :func:`megatron_elastic.planning.measure.track_all_threads`; Python objects, gloo's own
  non-torch buffers and the data loader's memory maps are not). As a
  cross-check, the process's peak RSS minus its RSS before the Trainer was built, and the old
  replay of the events' byte deltas (``replay_peak_bytes``: it misses every free made on a
  thread the profiler does not record, so it drifts upward; ``untracked_free_bytes`` is that
  drift at the end).
* CUDA: ``torch.cuda.max_memory_allocated`` over the steps (the allocator's live bytes; not its
  cached-but-free blocks, not the CUDA context or NCCL buffers).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
from pathlib import Path

import torch
import yaml

BUDGETS = {"full": 1.0}
"""One budget, the parent: the router's only choice per axis is the full size, so every micro-
batch trains the largest sub-network (which bounds memory) through the elastic code path with
router weights, as in a real stage."""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prepare(workdir: Path, model_yaml: Path) -> None:
    from megatron_elastic.checkpoint import save_checkpoint
    from megatron_elastic.config import ParallelConfig, load_model_config
    from megatron_elastic.data import train_bpe_tokenizer, write_indexed_dataset
    from megatron_elastic.model import build_hybrid_model
    from megatron_elastic.parallel import destroy_process_groups, init_process_groups

    cfg = load_model_config(model_yaml)
    workdir.mkdir(parents=True, exist_ok=True)
    texts = [f"the sum of {i} and {i + 3} is {2 * i + 3}." for i in range(400)]
    train_bpe_tokenizer(texts, 300, workdir / "tokenizer.json")
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 300, (4096,), generator=g).tolist() for _ in range(160)]
    write_indexed_dataset(workdir / "data", docs, cfg.vocab_size)
    pgs = init_process_groups(ParallelConfig(), seed=0)
    torch.manual_seed(0)
    save_checkpoint(workdir / "parent", build_hybrid_model(cfg, pgs), cfg, kind="parent")
    destroy_process_groups()
    (workdir / "elastic.yaml").write_text(
        yaml.safe_dump(
            {
                "model": str(model_yaml.resolve()),
                "elastic": {
                    "budgets": BUDGETS,
                    "ffn_nesting_blocks": 2,
                    # experts nest per block of a rank's experts, so EP 2 can split them
                    **({"moe_expert_nesting_blocks": 2} if cfg.num_moe_experts else {}),
                },
            }
        )
    )


def recompute_fields(recompute: bool | int) -> dict:
    """``train`` fields of a run's ``recompute``: ``True`` every layer, ``N`` (an int) the first
    N layers of each stage (megatron's block method), ``False`` none."""
    if recompute is False:
        return {}
    if recompute is True:
        return {"recompute_granularity": "full"}
    return {
        "recompute_granularity": "full",
        "recompute_method": "block",
        "recompute_num_layers": recompute,
    }


def recipe_dict(workdir: Path, run: dict) -> dict:
    """A stage recipe for ``run`` (keys: model_yaml, parallel, seq_length, micro_batch_size,
    num_micro_batches, recompute (see :func:`recompute_fields`), steps, data_parallel_size)."""
    dp = run.get("data_parallel_size", 1)
    return {
        "stage": "bench",
        "mode": "elastic",
        "model": run["model_yaml"],
        "elastic": str(workdir / "elastic.yaml"),
        "data": {
            "blend": str(workdir / "data"),
            "tokenizer": str(workdir / "tokenizer.json"),
            "split": "100,0,0",
            "valid_samples": 1,
        },
        "train": {
            "steps": run["steps"],
            "seq_length": run["seq_length"],
            "micro_batch_size": run["micro_batch_size"],
            "global_batch_size": run["micro_batch_size"] * run["num_micro_batches"] * dp,
            **recompute_fields(run["recompute"]),
        },
        "optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 0},
        "router": {"anneal_steps": 100, "warmup_steps": 0},
        "budget_sampling": dict(BUDGETS),
        "distill": {"teacher": "parent", "teacher_checkpoint": str(workdir / "parent")},
        "checkpoint": {"init": str(workdir / "parent"), "save": str(workdir / "save")},
        "logging": {"tensorboard": False, "log_interval": 1000},
        "parallel": run["parallel"],
    }


def run(workdir: Path, config: Path) -> None:
    from megatron_elastic import platform
    from megatron_elastic.planning.measure import cpu_peak, track_all_threads
    from megatron_elastic.training.recipe import load_train_recipe
    from megatron_elastic.training.trainer import Trainer

    spec = json.loads(config.read_text())
    rank = int(os.environ.get("RANK", 0))
    path = workdir / f"recipe_{spec['name']}.yaml"
    if rank == 0:
        path.write_text(yaml.safe_dump(recipe_dict(workdir, spec)))
    else:
        import time

        while not path.exists():
            time.sleep(0.05)
        time.sleep(0.2)
    recipe = load_train_recipe(path)
    cuda = platform.cuda_available()
    rss0 = _rss_bytes()
    result: dict = {"rank": rank}
    if cuda:
        trainer = Trainer(recipe)
        torch.cuda.synchronize()
        peak = 0
        for step in range(1, spec["steps"] + 1):
            trainer.train_step(step)  # resets the peak at its start (its step log's window)
            peak = max(peak, torch.cuda.max_memory_allocated())
        result["peak_bytes"] = peak
        result["method"] = "torch.cuda.max_memory_allocated"
    else:
        from torch.profiler import ProfilerActivity, profile, record_function

        track_all_threads()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer = Trainer(recipe)
            with record_function("bench_memory_steps"):
                for step in range(1, spec["steps"] + 1):
                    if spec.get("gc_collect"):
                        gc.collect()  # diagnosis: free cyclic garbage before each step
                    trainer.train_step(step)
        result.update(cpu_peak(prof, "bench_memory_steps"))
        result["method"] = "CPU allocator live bytes (all threads) at torch.profiler events"
        result["rss_delta_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    pgs = trainer.pgs
    result.update(
        pp_rank=pgs.pp.rank(),
        tp_rank=pgs.tp.rank(),
        dp_size=pgs.dp.size(),
        num_micro=trainer.num_micro,
    )
    trainer.close()
    (workdir / f"result_{spec['name']}_{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        run(Path(sys.argv[2]), Path(sys.argv[3]))
