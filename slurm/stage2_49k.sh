#!/bin/bash
# Stage 2 of Nemotron Elastic (49k context, budget sampling 0.5/0.3/0.2 for 12B/9B/6B) on
# 16 nodes x 8 H100, starting from stage 1's newest checkpoint: one trainer process per GPU,
# launched by srun. Submit like stage 1 once it is done, or chain it with
# sbatch --dependency=afterok:STAGE1_JOB_ID:
#
#   mkdir -p logs
#   DATA_PREFIX=/data/stage2/train_long_text_document TOKENIZER=/data/tokenizer.json \
#   PARENT=/ckpt/nano12b_ranked sbatch slurm/stage2_49k.sh
#
# Environment (every variable, with its default: the table in slurm/README.md):
#   DATA_PREFIX or DATA_BLEND   the long-context dataset prefix, or a blend
#                    "W1 PREFIX1 W2 PREFIX2 ..." [one of them required]
#   TOKENIZER        tokenizer.json or .model the data was tokenized with [required]
#   PARENT           the ranked parent: the frozen teacher [required]
#   STAGE1_DIR       stage 1's save directory; its newest checkpoint (model + routers) is the
#                    starting point [runs/nemotron_nano_12b/stage1_8k]
#   SAVE_DIR         this stage's checkpoints, metrics.jsonl, tensorboard/
#                    [runs/nemotron_nano_12b/stage2_49k]; an existing one is resumed
#   RECIPE, TP, PP, SP, CP, EP, DP, DATA_CACHE, EXTRA_OVERRIDES, MAX_RESTARTS, CONTAINER_IMAGE,
#   CONTAINER_MOUNTS, SRUN_ARGS, ENV_FILE, PYTHON, DRY_RUN=1, ...: see slurm/README.md
# Relative paths are relative to the job's working directory (where sbatch was run). Arguments
# given to sbatch override the #SBATCH lines below (see slurm/stage1_8k.sh and slurm/README.md).
# Before the time limit SLURM sends SIGUSR1 to this script, which passes it to the trainer: it
# saves and exits 0, and the job requeues itself and resumes. --signal=B:USR1@600: ten minutes
# for up to two 49k steps and the save and checksum of the 12B checkpoint (the arithmetic:
# slurm/README.md). A crash (any status but 0, 2 bad input, 3 NaN/inf loss) requeues the job
# too, at most MAX_RESTARTS times. The job's exit status is the trainer's.
#
#SBATCH --job-name=elastic-stage2-49k
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
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

RECIPE=${RECIPE:-$REPO/examples/nemotron_nano_12b/stage2_49k.yaml}
TP=${TP:-4}
PP=${PP:-1}
CP=${CP:-1}
EP=${EP:-1}
SP=${SP:-}
STAGE1_DIR=${STAGE1_DIR:-runs/nemotron_nano_12b/stage1_8k}
SAVE_DIR=${SAVE_DIR:-runs/nemotron_nano_12b/stage2_49k}
require_env TOKENIZER "the tokenizer the data was prepared with (tokenizer.json or .model)"
require_env PARENT "the ranked parent checkpoint, the frozen teacher (tools/estimate_importance.py)"
data_overrides
require_file TOKENIZER
require_checkpoint PARENT
require_int TP
require_int PP
require_int CP
require_int EP
require_bool SP
# Stage 2 starts from stage 1's newest checkpoint, unless it is resuming its own.
if [ ! -f "$SAVE_DIR/latest.json" ] && [ ! -f "$STAGE1_DIR/latest.json" ]; then
  die "STAGE1_DIR=$STAGE1_DIR holds no checkpoint (no latest.json): run slurm/stage1_8k.sh first"
fi

launch_stage "$RECIPE" \
  "${DATA_ARGS[@]}" \
  "data.tokenizer=$TOKENIZER" \
  "checkpoint.init=$STAGE1_DIR" \
  "distill.teacher_checkpoint=$PARENT" \
  "checkpoint.save=$SAVE_DIR" \
  "parallel.tensor_parallel_size=$TP" \
  "parallel.pipeline_parallel_size=$PP" \
  "parallel.context_parallel_size=$CP" \
  "parallel.expert_model_parallel_size=$EP" \
  ${SP:+"parallel.sequence_parallel=$SP"}
