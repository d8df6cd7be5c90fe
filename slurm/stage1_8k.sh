#!/bin/bash
# Stage 1 of Nemotron Elastic (8k context, uniform budget sampling) on 16 nodes x 8 H100:
# one trainer process per GPU, launched by srun. Submit from the repository root (relative
# paths, like logs/ and runs/, are relative to the directory sbatch runs in):
#
#   mkdir -p logs
#   DATA_PREFIX=/data/stage1/train_text_document TOKENIZER=/data/tokenizer.json \
#   PARENT=/ckpt/nano12b_ranked sbatch slurm/stage1_8k.sh
#
# Environment (every variable, with its default: the table in slurm/README.md):
#   DATA_PREFIX or DATA_BLEND   one dataset prefix (PREFIX.bin/.idx, tools/prepare_data.py),
#                    or a blend "W1 PREFIX1 W2 PREFIX2 ..." [one of them required]
#   TOKENIZER        tokenizer.json or .model the data was tokenized with [required]
#   PARENT           the ranked parent (tools/estimate_importance.py): initial weights and the
#                    frozen teacher [required]
#   SAVE_DIR         this stage's checkpoints, metrics.jsonl, tensorboard/
#                    [runs/nemotron_nano_12b/stage1_8k]; an existing one is resumed
#   RECIPE, TP, PP, SP, CP, EP, DP, DATA_CACHE, EXTRA_OVERRIDES, MAX_RESTARTS, CONTAINER_IMAGE,
#   CONTAINER_MOUNTS, SRUN_ARGS, ENV_FILE, PYTHON, DRY_RUN=1, ...: see slurm/README.md
# Relative paths are relative to the job's working directory (where sbatch was run).
# Arguments given to sbatch override the #SBATCH lines below, e.g. the tiny CPU recipe on one
# machine: sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --time=30 \
#   with RECIPE=examples/tiny/stage1.yaml TP=1 (see slurm/README.md).
# Before the time limit SLURM sends SIGUSR1 to this script, which passes it to the trainer: it
# saves and exits 0, and the job requeues itself and resumes (the lead time: slurm/README.md).
# A crash (any status but 0, 2 bad input, 3 NaN/inf loss) requeues the job too, at most
# MAX_RESTARTS times. The job's exit status is the trainer's.
#
#SBATCH --job-name=elastic-stage1-8k
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# The repository: sbatch runs a copy of this script from its spool directory, but the job
# record names the original (Command=).
if [ -z "${REPO:-}" ]; then
  script=${BASH_SOURCE[0]}
  if [ ! -f "$(dirname "$script")/common.sh" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
  fi
  REPO=$(cd "$(dirname "$script")/.." && pwd)
fi
if [ ! -f "$REPO/slurm/common.sh" ]; then
  echo "error: $REPO/slurm/common.sh not found: set REPO to the repository" >&2
  exit 2
fi
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"

RECIPE=${RECIPE:-$REPO/examples/nemotron_nano_12b/stage1_8k.yaml}
TP=${TP:-4}
PP=${PP:-1}
CP=${CP:-1}
EP=${EP:-1}
SP=${SP:-}
SAVE_DIR=${SAVE_DIR:-runs/nemotron_nano_12b/stage1_8k}
require_env TOKENIZER "the tokenizer the data was prepared with (tokenizer.json or .model)"
require_env PARENT "the ranked parent checkpoint (tools/estimate_importance.py --output)"
data_overrides
require_file TOKENIZER
require_checkpoint PARENT
require_int TP
require_int PP
require_int CP
require_int EP
require_bool SP

launch_stage "$RECIPE" \
  "${DATA_ARGS[@]}" \
  "data.tokenizer=$TOKENIZER" \
  "checkpoint.init=$PARENT" \
  "distill.teacher_checkpoint=$PARENT" \
  "checkpoint.save=$SAVE_DIR" \
  "parallel.tensor_parallel_size=$TP" \
  "parallel.pipeline_parallel_size=$PP" \
  "parallel.context_parallel_size=$CP" \
  "parallel.expert_model_parallel_size=$EP" \
  ${SP:+"parallel.sequence_parallel=$SP"}
