# Shared logic of the stage launch scripts (slurm/stage1_8k.sh, slurm/stage2_49k.sh); sourced,
# not run. A stage script sets its defaults, checks its inputs with the require_* helpers and
# ends with `launch_stage RECIPE OVERRIDE...`, which
#   - derives the torch.distributed rendezvous from SLURM's variables (MASTER_ADDR: the first
#     node of the allocation; MASTER_PORT: from the job id; per task RANK=SLURM_PROCID,
#     WORLD_SIZE=SLURM_NTASKS, LOCAL_RANK=SLURM_LOCALID),
#   - prints the resolved command, then runs one trainer process per task with srun,
#   - forwards SIGUSR1/SIGTERM sent to the batch shell (sbatch --signal=B:USR1@300) to the tasks,
#     so the trainer saves and exits 0 before the time limit, and then requeues the job, which
#     resumes from that checkpoint,
#   - exits with the trainer's exit status (0 done or preempted-and-saved, 2 bad input,
#     3 NaN/inf loss).
# Environment read here: PYTHON (interpreter, default python), EXTRA_OVERRIDES (more recipe
# overrides, whitespace-separated section.key=value), MASTER_PORT (default 20000 + job id mod
# 20000), OMP_NUM_THREADS (default 1), REQUEUE (1: requeue after a SIGUSR1 save, the default),
# DRY_RUN (1: validate and print the command, run nothing; works outside SLURM), DP (optional:
# the data-parallel size the job must have; checked against tasks / (TP x PP x CP)).
# The task count must be a multiple of TP x PP x CP (parallel.* overrides): checked before srun.
# shellcheck shell=bash

_prog=${SLURM_JOB_NAME:-$(basename "$0")}
log() { echo "[$_prog] $*" >&2; }
die() {
  echo "[$_prog] error: $*" >&2
  exit 2 # the trainer's "bad input" status: nothing was computed
}

# require_env NAME HINT: NAME must be set and non-empty.
require_env() {
  [ -n "${!1:-}" ] || die "$1 is not set: $2"
}

# require_int NAME: NAME must be a positive integer.
require_int() {
  case ${!1:-} in
    '' | *[!0-9]* | 0*) die "$1 must be a positive integer, got '${!1:-}'" ;;
  esac
}

# require_bool NAME: NAME must be empty (the recipe's value), true or false.
require_bool() {
  case ${!1:-} in
    '' | true | false) ;;
    *) die "$1 must be true or false, got '${!1}'" ;;
  esac
}

# require_file NAME: the file named by variable NAME must exist.
require_file() {
  [ -f "${!1}" ] || die "$1=${!1} does not exist (or is not a file)"
}

# require_dataset NAME: variable NAME holds a megatron indexed dataset prefix (PREFIX.bin + .idx).
require_dataset() {
  local prefix=${!1}
  if [ ! -f "$prefix.bin" ] || [ ! -f "$prefix.idx" ]; then
    die "$1=$prefix is not a dataset prefix: $prefix.bin and $prefix.idx must exist" \
      "(tools/prepare_data.py --output PREFIX writes them)"
  fi
}

# require_checkpoint NAME: variable NAME holds a checkpoint directory (manifest.json) or a stage's
# save directory (latest.json).
require_checkpoint() {
  local dir=${!1}
  [ -f "$dir/manifest.json" ] || [ -f "$dir/latest.json" ] ||
    die "$1=$dir is neither a checkpoint (no manifest.json) nor a save directory with a" \
      "checkpoint (no latest.json)"
}

# The torch.distributed rendezvous of this job (env:// initialisation in the trainer).
_rendezvous() {
  local first
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  [ -n "$first" ] || die "cannot read the first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
  # A node name that does not resolve (small test clusters) is reached at its NodeAddr.
  if ! getent hosts "$first" >/dev/null 2>&1; then
    local addr
    addr=$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
    first=${addr:-$first}
  fi
  export MASTER_ADDR=$first
  # One port per job: consecutive jobs on the same node never meet a socket in TIME_WAIT.
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
}

# State shared with the signal handlers below.
_srun_pid=
_requeue=0

_forward() { # SIGNAL: pass it on to srun, which passes it on to every task
  local sig=$1
  log "received SIG$sig: asking the trainer to save and exit"
  [ "$sig" = USR1 ] && _requeue=1
  [ -n "$_srun_pid" ] && kill -s "$sig" "$_srun_pid" 2>/dev/null
  return 0
}

# launch_stage RECIPE OVERRIDE...: run the trainer on every task of the allocation.
launch_stage() {
  local recipe=$1
  shift
  local overrides=("$@")
  local extra=()
  # Word-split on purpose: EXTRA_OVERRIDES holds several section.key=value items.
  # shellcheck disable=SC2206
  [ -n "${EXTRA_OVERRIDES:-}" ] && extra=(${EXTRA_OVERRIDES})
  [ -f "$recipe" ] || die "recipe $recipe does not exist"
  local python=${PYTHON:-python}
  command -v "$python" >/dev/null 2>&1 || die "PYTHON=$python is not an executable"
  local cmd=("$python" -m megatron_elastic.train --config "$recipe" "${overrides[@]}" "${extra[@]}")

  # The package of this checkout, whatever is installed.
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # megatron-core wants one CUDA connection so its TP communication and compute overlap in order.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: pass it on explicitly.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
  fi

  local tp pp cp sp dp= world=${SLURM_NTASKS:-}
  tp=$(_override_value parallel.tensor_parallel_size "${overrides[@]}" "${extra[@]}")
  pp=$(_override_value parallel.pipeline_parallel_size "${overrides[@]}" "${extra[@]}")
  cp=$(_override_value parallel.context_parallel_size "${overrides[@]}" "${extra[@]}")
  sp=$(_override_value parallel.sequence_parallel "${overrides[@]}" "${extra[@]}")
  cp=${cp:-1}
  # The world is TP x PP x CP x DP: one model replica spans TP x PP x CP ranks.
  if [ -n "$world" ] && [ -n "$tp" ] && [ -n "$pp" ]; then
    if [ $((world % (tp * pp * cp))) -ne 0 ]; then
      die "$world tasks do not split into TP=$tp x PP=$pp x CP=$cp model replicas: launch a" \
        "multiple of $((tp * pp * cp)) tasks (sbatch --nodes/--ntasks-per-node)"
    fi
    dp=$((world / (tp * pp * cp)))
    if [ -n "${DP:-}" ] && [ "$DP" != "$dp" ]; then
      die "DP=$DP but $world tasks = TP=$tp x PP=$pp x CP=$cp x DP=$dp: change DP or the" \
        "task count"
    fi
  fi
  if [ "${DRY_RUN:-0}" = 1 ]; then
    log "dry run; command of every task:"
    printf '%q ' "${cmd[@]}" >&2
    echo >&2
    return 0
  fi
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit with sbatch (or DRY_RUN=1)"
  _rendezvous
  log "job $SLURM_JOB_ID: $world tasks on $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST)," \
    "TP ${tp:-recipe} PP ${pp:-recipe}${dp:+ DP $dp} CP $cp SP ${sp:-recipe};" \
    "rendezvous $MASTER_ADDR:$MASTER_PORT; working directory $PWD"
  log "command of every task (RANK=SLURM_PROCID, WORLD_SIZE=SLURM_NTASKS, LOCAL_RANK=SLURM_LOCALID):"
  printf '%q ' "${cmd[@]}" >&2
  echo >&2

  trap '_forward USR1' USR1
  trap '_forward TERM' TERM
  # One process per task; each exports its own rank before exec'ing the trainer (exec: the
  # trainer itself receives the signals srun delivers). The trainer's own failures (bad input,
  # NaN) end every rank with the same status at about the same time: give them 2 minutes, so the
  # job reports that status rather than the SIGTERM of ranks killed a moment before they exited
  # (--kill-on-bad-exit would); a rank that dies alone does not leave the others hanging longer.
  # shellcheck disable=SC2016  # expanded by the task's shell, not here
  srun --kill-on-bad-exit=0 --wait=120 bash -c \
    'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"' \
    task "${cmd[@]}" &
  _srun_pid=$!
  local rc
  while :; do
    rc=0
    wait "$_srun_pid" || rc=$?
    # A trapped signal interrupts `wait` (status > 128) while srun runs on: wait again.
    if [ "$rc" -gt 128 ] && kill -0 "$_srun_pid" 2>/dev/null; then
      continue
    fi
    break
  done
  trap - USR1 TERM
  log "trainer exited with status $rc"
  if [ "$rc" -eq 0 ] && [ "$_requeue" = 1 ] && [ "${REQUEUE:-1}" = 1 ]; then
    log "saved before the time limit: requeueing job $SLURM_JOB_ID to resume from the checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || log "requeue failed: resubmit to resume"
  fi
  return "$rc"
}

# _override_value KEY ITEM...: the value of the last KEY=value among ITEMs (empty if none).
_override_value() {
  local key=$1 item value=
  shift
  for item in "$@"; do
    [ "${item%%=*}" = "$key" ] && value=${item#*=}
  done
  echo "$value"
}
