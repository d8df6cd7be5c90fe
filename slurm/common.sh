# Shared logic of the stage launch scripts (slurm/stage1_8k.sh, slurm/stage2_49k.sh); sourced,
# not run. Sourcing it sources ENV_FILE (site settings) if set; a stage script then sets its
# defaults, checks its inputs with the require_* helpers, builds its data overrides with
# data_overrides, and ends with `launch_stage RECIPE OVERRIDE...`, which
#   - exports the site environment (Triton cache on node-local disk, CUDA allocator, NCCL error
#     handling; every one a ${VAR:-default} the user or ENV_FILE may set first),
#   - derives the torch.distributed rendezvous from SLURM's variables (MASTER_ADDR: the first
#     node of the allocation; MASTER_PORT: from the job id; per task RANK=SLURM_PROCID,
#     WORLD_SIZE=SLURM_NTASKS, LOCAL_RANK=SLURM_LOCALID),
#   - prints the resolved srun line, then runs one trainer process per task with srun, inside a
#     pyxis/enroot container when CONTAINER_IMAGE is set, with SRUN_ARGS added verbatim,
#   - forwards SIGUSR1/SIGTERM sent to the batch shell (sbatch --signal=B:USR1@N) to the tasks,
#     so the trainer saves and exits 0 before the time limit, and then requeues the job, which
#     resumes from that checkpoint (these requeues are not counted against MAX_RESTARTS),
#   - requeues the job after a failure (any status but 0, 2 bad input, 3 NaN/inf loss; not after
#     SIGTERM) at most MAX_RESTARTS times per job; the count is kept in the job's Comment
#     (elastic_failures=K), since SLURM_RESTART_COUNT also counts the time-limit requeues,
#   - exits with the trainer's exit status (0 done or preempted-and-saved, 2 bad input,
#     3 NaN/inf loss, anything else a crash).
# Every variable it reads is in the table of slurm/README.md.
# shellcheck shell=bash

_prog=${SLURM_JOB_NAME:-$(basename "$0")}
log() { echo "[$_prog] $*" >&2; }
die() {
  echo "[$_prog] error: $*" >&2
  exit 2 # the trainer's "bad input" status: nothing was computed
}

# Site settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, module loads, CONTAINER_IMAGE, ...): ENV_FILE is
# sourced here, before the stage script reads its variables, so it may set any of them. It runs
# without `set -eu` (module init scripts often trip them) and must not exit.
if [ -n "${ENV_FILE:-}" ]; then
  [ -f "$ENV_FILE" ] || die "ENV_FILE=$ENV_FILE does not exist (or is not a file)"
  _shell_opts=$(set +o)
  set +eu
  # shellcheck source=/dev/null
  source "$ENV_FILE"
  eval "$_shell_opts"
  unset _shell_opts
fi

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

# require_dataset NAME [LABEL]: variable NAME holds a megatron indexed dataset prefix (PREFIX.bin
# + .idx); LABEL (default NAME) names it in the message.
require_dataset() {
  local prefix=${!1}
  if [ ! -f "$prefix.bin" ] || [ ! -f "$prefix.idx" ]; then
    die "${2:-$1}=$prefix is not a dataset prefix: $prefix.bin and $prefix.idx must exist" \
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

# require_count NAME: NAME must be a non-negative integer (0 allowed).
require_count() {
  case ${!1:-} in
    '' | *[!0-9]* | 0?*) die "$1 must be a non-negative integer, got '${!1:-}'" ;;
  esac
}

# split_words NAME ARRAY: set ARRAY to the words of variable NAME, split as xargs splits them:
# blanks and newlines separate words; 'single' or "double" quotes keep a word with blanks
# together; outside quotes a backslash escapes the next character. Nothing in the value is
# expanded or run ($VAR, $(...), globs stay as written). An unmatched quote: exit 2.
split_words() {
  local err
  err=$(printf '%s' "${!1:-}" | xargs -r true 2>&1) ||
    die "$1 cannot be split into words (${err#xargs: }): close every quote"
  mapfile -d '' -t "$2" < <(printf '%s' "${!1:-}" | xargs -r printf '%s\0')
}

# _yaml_str VALUE: VALUE as a YAML single-quoted string (the trainer parses override values as
# YAML: a quoted path stays a string whatever it looks like, spaces, ': ', '#', '[' included).
_yaml_str() {
  printf "'%s'" "${1//\'/\'\'}"
}

# data_overrides: fill the array DATA_ARGS with the recipe overrides of the training data, from
# DATA_PREFIX (one dataset) or DATA_BLEND ("W1 PREFIX1 W2 PREFIX2 ...", split like SRUN_ARGS, so a
# prefix with spaces is quoted: "0.7 '/data/web docs/train' 0.3 /data/code/train"), exactly one of
# the two; and DATA_CACHE (megatron's index cache directory: data.cache_dir).
data_overrides() {
  DATA_ARGS=()
  if [ -n "${DATA_PREFIX:-}" ] && [ -n "${DATA_BLEND:-}" ]; then
    die "DATA_PREFIX and DATA_BLEND are both set: set DATA_PREFIX for one dataset or" \
      "DATA_BLEND=\"W1 PREFIX1 W2 PREFIX2 ...\" for a blend, not both"
  fi
  if [ -n "${DATA_BLEND:-}" ]; then
    local words=() i weight prefix flow=
    split_words DATA_BLEND words
    if [ ${#words[@]} -eq 0 ] || [ $((${#words[@]} % 2)) -ne 0 ]; then
      die "DATA_BLEND must be weight/prefix pairs \"W1 PREFIX1 W2 PREFIX2 ...\", got" \
        "${#words[@]} word(s): '$DATA_BLEND' (quote a prefix that has spaces)"
    fi
    for ((i = 0; i < ${#words[@]}; i += 2)); do
      weight=${words[i]} prefix=${words[i + 1]}
      # Decimals only: YAML reads 1e-3 as a string (it wants 1.0e-3).
      if ! [[ $weight =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] || ! [[ $weight =~ [1-9] ]]; then
        die "DATA_BLEND weight '$weight' (before $prefix) is not a positive decimal number" \
          "(write 0.001, not 1e-3)"
      fi
      case $prefix in *$'\n'*) die "DATA_BLEND prefix '$prefix' contains a newline" ;; esac
      _blend_prefix=$prefix
      require_dataset _blend_prefix "DATA_BLEND"
      flow+="${flow:+, }[$weight, $(_yaml_str "$prefix")]"
    done
    DATA_ARGS+=("data.blend=[$flow]")
  else
    require_env DATA_PREFIX "the training dataset prefix (PREFIX.bin/.idx from tools/prepare_data.py); or DATA_BLEND=\"W1 PREFIX1 W2 PREFIX2 ...\" for a blend"
    require_dataset DATA_PREFIX
    DATA_ARGS+=("data.blend=$(_yaml_str "$DATA_PREFIX")")
  fi
  if [ -n "${DATA_CACHE:-}" ]; then
    if [ -e "$DATA_CACHE" ] && { [ ! -d "$DATA_CACHE" ] || [ ! -w "$DATA_CACHE" ]; }; then
      die "DATA_CACHE=$DATA_CACHE is not a writable directory (megatron writes its index caches" \
        "there)"
    fi
    DATA_ARGS+=("data.cache_dir=$(_yaml_str "$DATA_CACHE")")
  fi
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

# site_env: export the site environment of the tasks; each a default the user (or ENV_FILE) may
# have set first. Inside a container these reach the tasks too (pyxis passes the exported
# environment; CONTAINER_ENV_VARS below win over values the image sets).
site_env() {
  # Node-local Triton cache, one per job: the 8 ranks of a node share it (triton >= 3.2 writes
  # each entry to a temporary directory and renames it into place), and 128 ranks never compile
  # into one NFS/Lustre directory. TRITON_CACHE_MANAGER is left unset: megatron's
  # ParallelFileCacheManager backports that fix to triton <= 3.1 and asserts on any later triton.
  export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-${USER:-$(id -un)}-${SLURM_JOB_ID:-local}}
  # Shapes change per micro-batch and per budget: expandable segments keep fragmentation down.
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  # NCCL: no recordStream on the communication streams (megatron's recommendation), and the
  # watchdog tears the process down when a collective exceeds the process-group timeout
  # (parallel.distributed_timeout_minutes; 3 = tear down without cleanup, torch's default,
  # set explicitly because a site or image may set 0).
  export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # megatron-core wants one CUDA connection so its TP communication and compute overlap in order.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: pass it on explicitly.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
  fi
}

# The variables a container takes from the host even where its image sets them (pyxis's
# --container-env; by default an image's own value wins).
CONTAINER_ENV_VARS=TRITON_CACHE_DIR,PYTORCH_CUDA_ALLOC_CONF,TORCH_NCCL_AVOID_RECORD_STREAMS,TORCH_NCCL_ASYNC_ERROR_HANDLING,OMP_NUM_THREADS,CUDA_DEVICE_MAX_CONNECTIONS

# srun_line COMMAND...: fill the array SRUN_LINE with the srun command that runs COMMAND once per
# task: the rank variables exported, this checkout first on PYTHONPATH (inside the task, so a
# container image's own PYTHONPATH is kept), in a container when CONTAINER_IMAGE is set, with
# SRUN_ARGS (split like DATA_BLEND) before the task command.
srun_line() {
  local srun_args=()
  split_words SRUN_ARGS srun_args
  SRUN_LINE=(srun --kill-on-bad-exit=0 --wait=120)
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    SRUN_LINE+=(--container-image="$CONTAINER_IMAGE")
    [ -n "${CONTAINER_MOUNTS:-}" ] && SRUN_LINE+=(--container-mounts="$CONTAINER_MOUNTS")
    # Relative paths (SAVE_DIR, logs) mean the same inside: the working directory must be mounted
    # at the same path. The home directory is not mounted: ~/.local packages would shadow the
    # image's (mount it in CONTAINER_MOUNTS if a task needs it).
    SRUN_LINE+=(--container-workdir="$PWD" --no-container-mount-home)
    SRUN_LINE+=(--container-env="$CONTAINER_ENV_VARS${CONTAINER_ENV:+,$CONTAINER_ENV}")
  elif [ -n "${CONTAINER_MOUNTS:-}${CONTAINER_ENV:-}" ]; then
    die "CONTAINER_MOUNTS/CONTAINER_ENV are set but CONTAINER_IMAGE is not: set the image too"
  fi
  SRUN_LINE+=("${srun_args[@]}")
  # Each task exports its own rank, then exec's the trainer (exec: the trainer itself receives
  # the signals srun delivers).
  # shellcheck disable=SC2016  # expanded by the task's shell, not here
  SRUN_LINE+=(bash -c 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID PYTHONPATH=$1${PYTHONPATH:+:$PYTHONPATH}; shift; exec "$@"' task "$REPO" "$@")
}

# State shared with the signal handlers below.
_srun_pid=
_requeue=0
_terminated=0

_forward() { # SIGNAL: pass it on to srun, which passes it on to every task
  local sig=$1
  log "received SIG$sig: asking the trainer to save and exit"
  [ "$sig" = USR1 ] && _requeue=1
  [ "$sig" = TERM ] && _terminated=1
  [ -n "$_srun_pid" ] && kill -s "$sig" "$_srun_pid" 2>/dev/null
  return 0
}

# The failure requeues this job has had, from its Comment (elastic_failures=K; 0 if none). If
# slurmctld cannot be asked, every requeue so far counts as one (SLURM_RESTART_COUNT): too many
# rather than too few.
_failures() {
  local comment
  if ! comment=$(squeue -h -j "$SLURM_JOB_ID" -o %k 2>/dev/null); then
    echo "${SLURM_RESTART_COUNT:-0}"
    return 0
  fi
  comment=$(sed -n 's/.*elastic_failures=\([0-9][0-9]*\).*/\1/p' <<<"$comment")
  echo "${comment:-0}"
}

# _requeue_after_failure RC: requeue this job after the trainer failed with status RC, unless
# MAX_RESTARTS failure requeues are used up. Everything is logged before `scontrol requeue`:
# requeueing a running job ends its batch script.
_requeue_after_failure() {
  local rc=$1 done_ max=$MAX_RESTARTS comment
  done_=$(_failures)
  if [ "$done_" -ge "$max" ]; then
    log "MAX_RESTARTS=$max exhausted: failing with status $rc"
    return 0
  fi
  log "trainer failed with status $rc: restart $((done_ + 1)) of MAX_RESTARTS=$max" \
    "(SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}); requeueing job $SLURM_JOB_ID to resume" \
    "from the newest checkpoint"
  comment=$(squeue -h -j "$SLURM_JOB_ID" -o %k 2>/dev/null | sed 's/ *elastic_failures=[0-9]*//;s/^(null)$//')
  scontrol update JobId="$SLURM_JOB_ID" Comment="${comment:+$comment }elastic_failures=$((done_ + 1))" ||
    log "cannot record the restart in the job's Comment"
  scontrol requeue "$SLURM_JOB_ID" || log "requeue failed: resubmit to resume"
}

# launch_stage RECIPE OVERRIDE...: run the trainer on every task of the allocation.
launch_stage() {
  local recipe=$1
  shift
  local overrides=("$@")
  local extra=()
  # Word-split on purpose: EXTRA_OVERRIDES holds several section.key=value items (no quoting:
  # a value with blanks goes in the recipe, or in DATA_BLEND for datasets).
  # shellcheck disable=SC2206
  [ -n "${EXTRA_OVERRIDES:-}" ] && extra=(${EXTRA_OVERRIDES})
  [ -f "$recipe" ] || die "recipe $recipe does not exist"
  MAX_RESTARTS=${MAX_RESTARTS:-3}
  require_count MAX_RESTARTS
  local python=${PYTHON:-python}
  # In a container the interpreter is the image's: it cannot be checked from the batch shell.
  if [ -z "${CONTAINER_IMAGE:-}" ]; then
    command -v "$python" >/dev/null 2>&1 || die "PYTHON=$python is not an executable"
  fi
  local cmd=("$python" -m megatron_elastic.train --config "$recipe" "${overrides[@]}" "${extra[@]}")

  local tp pp cp ep sp dp='' world=${SLURM_NTASKS:-}
  tp=$(_override_value parallel.tensor_parallel_size "${overrides[@]}" "${extra[@]}")
  pp=$(_override_value parallel.pipeline_parallel_size "${overrides[@]}" "${extra[@]}")
  cp=$(_override_value parallel.context_parallel_size "${overrides[@]}" "${extra[@]}")
  sp=$(_override_value parallel.sequence_parallel "${overrides[@]}" "${extra[@]}")
  ep=$(_override_value parallel.expert_model_parallel_size "${overrides[@]}" "${extra[@]}")
  cp=${cp:-1}
  ep=${ep:-1}
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
    # Expert parallelism is carved out of the DP x CP ranks (megatron's layout).
    if [ $(((dp * cp) % ep)) -ne 0 ]; then
      die "EP=$ep does not divide DP x CP = $dp x $cp = $((dp * cp)) ranks (expert parallelism" \
        "is carved out of them): choose an EP that divides $((dp * cp))"
    fi
  fi
  site_env
  srun_line "${cmd[@]}"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    log "dry run; srun line (one trainer per task):"
    printf '%q ' "${SRUN_LINE[@]}" >&2
    echo >&2
    return 0
  fi
  [ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit with sbatch (or DRY_RUN=1)"
  _rendezvous
  log "job $SLURM_JOB_ID: $world tasks on $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST)," \
    "TP ${tp:-recipe} PP ${pp:-recipe}${dp:+ DP $dp} CP $cp EP $ep SP ${sp:-recipe};" \
    "rendezvous $MASTER_ADDR:$MASTER_PORT; working directory $PWD;" \
    "restart ${SLURM_RESTART_COUNT:-0} of the job"
  log "srun line (RANK=SLURM_PROCID, WORLD_SIZE=SLURM_NTASKS, LOCAL_RANK=SLURM_LOCALID):"
  printf '%q ' "${SRUN_LINE[@]}" >&2
  echo >&2

  trap '_forward USR1' USR1
  trap '_forward TERM' TERM
  # The trainer's own failures (bad input, NaN) end every rank with the same status at about
  # the same time: srun --wait=120 gives them 2 minutes, so the job reports that status rather
  # than the SIGTERM of ranks killed a moment before they exited (--kill-on-bad-exit would); a
  # rank that dies alone does not leave the others hanging longer.
  "${SRUN_LINE[@]}" &
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
  if [ "$rc" -eq 0 ]; then
    if [ "$_requeue" = 1 ] && [ "${REQUEUE:-1}" = 1 ]; then
      log "saved before the time limit: requeueing job $SLURM_JOB_ID to resume from the" \
        "checkpoint (not counted against MAX_RESTARTS)"
      scontrol requeue "$SLURM_JOB_ID" || log "requeue failed: resubmit to resume"
    fi
  elif [ "$rc" -eq 2 ] || [ "$rc" -eq 3 ]; then
    log "not requeued: status $rc ($([ "$rc" -eq 2 ] && echo "bad input" || echo "NaN/inf loss")) would fail again"
  elif [ "$_terminated" = 1 ]; then
    log "not requeued: the job was cancelled or preempted (SIGTERM)"
  else
    _requeue_after_failure "$rc"
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
