#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (munged + slurmctld + slurmd), for tests and for
# trying the sbatch scripts without a cluster. No systemd, no cgroups: every file it uses
# (slurm.conf, munge key and socket, state, spool, pid files, logs) lives in one work directory.
#
#   slurm/local_cluster.sh start  [--workdir DIR] [--port N]   bring it up (idempotent)
#   slurm/local_cluster.sh stop   [--workdir DIR]              stop the daemons it started
#   slurm/local_cluster.sh status [--workdir DIR]              exit 0 when up, 1 when not
#
# start and status print `export SLURM_CONF=DIR/slurm.conf` on stdout (everything else goes to
# stderr), so a caller can run:   eval "$(slurm/local_cluster.sh start)"
#
# Environment (options win): LOCAL_SLURM_WORKDIR (default /tmp/megatron-elastic-slurm),
# LOCAL_SLURM_PORT (slurmctld port; slurmd uses the next one; default 6817),
# LOCAL_SLURM_CPUS (CPUs the node advertises, at least the real count; default 4, so that
# 4-task jobs fit on a 2-core machine), LOCAL_SLURM_TIMEOUT (seconds to wait for the node; 60),
# LOCAL_SLURM_CRED_EXPIRE (credential lifetime, which a requeued job waits out before it may
# start again; default 10 s instead of Slurm's 120).
# Needs root (slurmd launches jobs as the submitting user) and scripts/install_slurm.sh.
set -euo pipefail

prog=$(basename "$0")
log() { echo "$prog: $*" >&2; }
die() {
  echo "$prog: error: $*" >&2
  exit 1
}

usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------
# Arguments
cmd=${1:-}
[ -n "$cmd" ] || usage
shift
workdir=${LOCAL_SLURM_WORKDIR:-/tmp/megatron-elastic-slurm}
port=${LOCAL_SLURM_PORT:-6817}
while [ $# -gt 0 ]; do
  case $1 in
    --workdir) [ $# -ge 2 ] || usage; workdir=$2; shift 2 ;;
    --workdir=*) workdir=${1#*=}; shift ;;
    --port) [ $# -ge 2 ] || usage; port=$2; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    -h | --help) usage ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case $port in '' | *[!0-9]*) die "--port must be a number, got '$port'" ;; esac
# Absolute paths: the daemons chdir to / and the conf must not depend on the caller's cwd.
# Only start creates the directory; stop and status just look.
[ "$cmd" = start ] && mkdir -p "$workdir"
if [ -d "$workdir" ]; then
  workdir=$(cd "$workdir" && pwd -P)
elif [ "${workdir#/}" = "$workdir" ]; then
  workdir=$PWD/$workdir
fi

conf=$workdir/slurm.conf
munge_dir=$workdir/munge
munge_socket=$munge_dir/munge.socket
munge_key=$munge_dir/munge.key
run_dir=$workdir/run
log_dir=$workdir/log
state_dir=$workdir/state
spool_dir=$workdir/spool
timeout=${LOCAL_SLURM_TIMEOUT:-60}
# The slurm clients (sinfo, sbatch, ...) run below must talk to this cluster, not /etc/slurm.
export SLURM_CONF=$conf
# The daemons live in /usr/sbin, which a caller's PATH may lack.
export PATH=$PATH:/usr/sbin:/sbin

# Daemon name -> pid file. The order is the start order; stop goes in reverse.
daemons=(munged slurmctld slurmd)
pid_file() {
  case $1 in
    munged) echo "$munge_dir/munged.pid" ;;
    *) echo "$run_dir/$1.pid" ;;
  esac
}
log_file() {
  case $1 in
    munged) echo "$munge_dir/munged.log" ;;
    *) echo "$log_dir/$1.log" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Process helpers. PID 1 on these machines reaps slowly, so a killed daemon lingers as a zombie:
# `kill -0` still succeeds on it. /proc/PID/stat tells the truth: state Z (or X) means dead.
pid_state() { # prints the one-letter state of a live process, nothing if it is gone
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) } # the command name may contain spaces and ')'; the state follows the last ')'
  echo "${stat%% *}"
}
pid_alive() {
  local s
  s=$(pid_state "$1")
  [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]
}
# The pid in NAME's pid file, if that process is alive and really is NAME (a stale pid file may
# name a recycled pid that now belongs to something else: never signal that).
daemon_pid() {
  local name=$1 file pid comm
  file=$(pid_file "$name")
  [ -s "$file" ] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [ -n "$pid" ] || return 1
  pid_alive "$pid" || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [ "$comm" = "$name" ] || return 1
  echo "$pid"
}
all_up() {
  local d
  for d in "${daemons[@]}"; do daemon_pid "$d" >/dev/null || return 1; done
}
any_up() {
  local d
  for d in "${daemons[@]}"; do daemon_pid "$d" >/dev/null && return 0; done
  return 1
}

show_logs() {
  local f
  for f in "$(log_file munged)" "$log_dir/munged.stderr" "$(log_file slurmctld)" \
    "$(log_file slurmd)"; do
    [ -s "$f" ] || continue
    echo "----- last lines of $f" >&2
    tail -n 20 "$f" >&2
  done
}

stop_daemon() {
  local name=$1 pid i
  if ! pid=$(daemon_pid "$name"); then
    rm -f "$(pid_file "$name")"
    return 0
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  # slurmctld saves its state on SIGTERM, which takes a moment; give each daemon 10 s.
  for ((i = 0; i < 100; i++)); do
    pid_alive "$pid" || break
    sleep 0.1
  done
  if pid_alive "$pid"; then
    log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      pid_alive "$pid" || break
      sleep 0.1
    done
  fi
  pid_alive "$pid" && die "could not stop $name (pid $pid)"
  rm -f "$(pid_file "$name")"
}

# Cancel jobs still in the queue so their slurmstepd/task processes do not outlive slurmd.
cancel_jobs() {
  daemon_pid slurmctld >/dev/null || return 0
  daemon_pid slurmd >/dev/null || return 0
  local jobs deadline=$((SECONDS + 15))
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null) || return 0
  [ -n "$jobs" ] || return 0
  log "cancelling jobs still queued or running: $(echo "$jobs" | tr '\n' ' ')"
  # shellcheck disable=SC2086  # one job id per word
  timeout 10 scancel $jobs 2>/dev/null || true
  while [ "$SECONDS" -lt "$deadline" ]; do
    [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break
    sleep 0.1
  done
}

do_stop() {
  if ! any_up; then
    log "not running (workdir $workdir)"
    local d
    for d in "${daemons[@]}"; do rm -f "$(pid_file "$d")"; done
    return 0
  fi
  cancel_jobs
  local i
  for ((i = ${#daemons[@]} - 1; i >= 0; i--)); do stop_daemon "${daemons[i]}"; done
  log "stopped (workdir $workdir)"
}

# ---------------------------------------------------------------------------------------------
need_root() {
  [ "$(id -u)" -eq 0 ] && return 0
  die "must run as root: slurmd launches jobs as the submitting user and munged runs as 'munge'"
}

need_binaries() {
  local b missing=()
  for b in munged mungekey munge slurmctld slurmd sinfo sbatch srun scontrol squeue scancel; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] || die "not installed: ${missing[*]}; run scripts/install_slurm.sh"
}

write_conf() {
  local host node_line real_cpus cpus cred_expire
  # slurmctld refuses to start unless SlurmctldHost is this machine's short host name.
  host=$(hostname -s)
  # The node's hardware as slurmd sees it, e.g.
  #   NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
  node_line=$(slurmd -C | head -n 1)
  real_cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
  [ -n "$real_cpus" ] || die "cannot parse 'slurmd -C' output: $node_line"
  cpus=${LOCAL_SLURM_CPUS:-4}
  cred_expire=${LOCAL_SLURM_CRED_EXPIRE:-10}
  case $cred_expire in '' | *[!0-9]*) die "LOCAL_SLURM_CRED_EXPIRE must be a number, got '$cred_expire'" ;; esac
  case $cpus in '' | *[!0-9]*) die "LOCAL_SLURM_CPUS must be a number, got '$cpus'" ;; esac
  node_line=${node_line#NodeName=* }
  if [ "$cpus" -gt "$real_cpus" ]; then
    # Advertise more CPUs than exist, so multi-task jobs (srun -n4) fit on a small machine:
    # CR_Core allocates cores, so describe CPUs as cores; config_overrides makes slurmd accept
    # a node description larger than the hardware instead of draining the node.
    local mem
    mem=$(sed -n 's/.*\(RealMemory=[0-9]*\).*/\1/p' <<<"$node_line")
    node_line="CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 $mem"
  fi
  cat >"$conf" <<CONF
# Generated by slurm/local_cluster.sh: a one-node cluster for tests. Overwritten on every start.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only after the credential lifetime (Slurm's
# default 120 s); a step's credential is checked within a second of its creation here.
AuthInfo=socket=$munge_socket,cred_expire=$cred_expire

# No systemd and no cgroups on these machines: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
# Accounting needs slurmdbd; without it, job results come from 'scontrol show job'.
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
# Without batch_sched_delay=0 every batch job waits ~3 s before it starts; sched_interval=1:
# a requeued job starts as soon as cred_expire has passed, not at the next minute's pass.
SchedulerParameters=batch_sched_delay=0,sched_interval=1
# A node that was down (e.g. slurmd restarted) comes back as soon as it registers.
ReturnToService=2
MailProg=/bin/true
# Short timeouts: a test cluster should notice dead steps and finish kills quickly.
KillWait=5
# 'sbatch --wait' polls after 2, 8, 32, 32... s unless MinJobAge <= 16, which caps its poll at
# 8 s (a 12 s job would otherwise return after 42 s). Ended jobs stay in 'scontrol show job' for
# MinJobAge plus up to a minute (slurmctld purges once a minute).
MinJobAge=16
InactiveLimit=0

StateSaveLocation=$state_dir
SlurmdSpoolDir=$spool_dir
SlurmctldPidFile=$run_dir/slurmctld.pid
SlurmdPidFile=$run_dir/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

NodeName=$host NodeAddr=127.0.0.1 $node_line State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  echo "$host"
}

# A failed start shows the daemons' logs and stops what it started: no half cluster left behind.
fail_start() {
  show_logs
  echo "$prog: error: $* (daemon logs above; workdir $workdir)" >&2
  do_stop >/dev/null 2>&1 || true
  exit 1
}

# Wait until CHECK succeeds, up to $timeout seconds in total since start_time. DAEMON, once its
# pid file exists, must stay alive: a daemon that died (e.g. its port is taken) fails at once.
wait_for() {
  local what=$1 daemon=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ -s "$(pid_file "$daemon")" ] && ! daemon_pid "$daemon" >/dev/null; then
      fail_start "$daemon exited while waiting for $what"
    fi
    if [ $((SECONDS - start_time)) -ge "$timeout" ]; then
      fail_start "timed out after ${timeout}s waiting for $what"
    fi
    sleep 0.2
  done
}

# Each probe is bounded: a client talking to a wedged daemon (or to whatever else holds its port)
# would otherwise block for MessageTimeout (10 s) before wait_for can look again.
munge_works() { timeout 3 munge -n -S "$munge_socket" | timeout 3 unmunge -S "$munge_socket"; }
ctld_answers() { timeout 3 scontrol ping; }
node_idle() {
  local state
  state=$(timeout 3 sinfo -h -N -n "$1" -o %T 2>/dev/null) || return 1
  [ "$state" = idle ]
}

start_munged() {
  local user=munge
  # munged refuses a key or socket directory that others can write, and wants to own its key.
  if ! id munge >/dev/null 2>&1; then
    user=root # the Debian package creates 'munge'; without it, run munged as root
  fi
  install -d -o "$user" -g "$(id -gn "$user")" -m 0755 "$munge_dir"
  if [ ! -s "$munge_key" ]; then
    log "creating munge key $munge_key"
    mungekey --create --keyfile="$munge_key"
  fi
  chown "$user:$(id -gn "$user")" "$munge_key"
  chmod 0600 "$munge_key"
  # Fresh logs, like the slurm ones (and munged refuses a log file it does not own).
  rm -f "$munge_socket" "$munge_socket.lock" "$(pid_file munged)" "$(log_file munged)"
  log "starting munged"
  # munged forks into the background itself; close our stdio so callers that capture output
  # (subprocess.run(capture_output=True)) are not held open by the daemon. Its early errors go
  # to a separate file: munged insists on owning its own log file. 9>&- (here and for the slurm
  # daemons): they must not inherit the lock fd of lock(), or it would stay held while they run.
  runuser -u "$user" -- munged --socket="$munge_socket" --key-file="$munge_key" \
    --pid-file="$(pid_file munged)" --log-file="$(log_file munged)" \
    --seed-file="$munge_dir/munged.seed" </dev/null >>"$log_dir/munged.stderr" 2>&1 9>&- ||
    fail_start "munged failed to start"
  wait_for "munged to answer" munged munge_works
}

do_start() {
  need_root
  need_binaries
  if all_up; then
    log "already running (workdir $workdir)"
    echo "export SLURM_CONF=$conf"
    return 0
  fi
  if any_up; then
    log "some daemons are running and others are not: restarting all of them"
    do_stop
  fi
  start_time=$SECONDS
  # A fresh start forgets old jobs and node states: leftover state from a crashed run would
  # otherwise resurrect jobs or keep the node down.
  rm -rf "$state_dir" "$spool_dir" "$run_dir" "$log_dir"
  mkdir -p "$state_dir" "$spool_dir" "$run_dir" "$log_dir"
  local node
  node=$(write_conf)
  start_munged
  log "starting slurmctld (port $port)"
  slurmctld -f "$conf" </dev/null >>"$log_dir/slurmctld.log" 2>&1 9>&- ||
    fail_start "slurmctld failed to start"
  wait_for "slurmctld to answer" slurmctld ctld_answers
  log "starting slurmd (node $node, port $((port + 1)))"
  slurmd -f "$conf" -N "$node" </dev/null >>"$log_dir/slurmd.log" 2>&1 9>&- ||
    fail_start "slurmd failed to start"
  wait_for "node $node to be idle in sinfo" slurmd node_idle "$node"
  wait_for "the pid files" slurmd all_up
  log "up in $((SECONDS - start_time))s: node $node idle (workdir $workdir)"
  echo "export SLURM_CONF=$conf"
}

do_status() {
  local d pid up=0
  for d in "${daemons[@]}"; do
    if pid=$(daemon_pid "$d"); then
      log "$d running (pid $pid)"
    else
      log "$d not running"
      up=1
    fi
  done
  if [ $up -ne 0 ]; then
    log "down (workdir $workdir)"
    return 1
  fi
  timeout 10 sinfo -N >&2 || {
    log "daemons running but sinfo fails"
    return 1
  }
  echo "export SLURM_CONF=$conf"
}

# Serialise start and stop on one work directory (two test sessions, a user in another shell).
lock() {
  [ -d "$workdir" ] || return 0
  exec 9>"$workdir/.lock"
  flock -w 120 9 || die "waited 120 s for another start/stop on $workdir ($workdir/.lock)"
}

case $cmd in
  start) lock && do_start ;;
  stop) lock && do_stop ;;
  status) do_status ;;
  -h | --help | help) usage ;;
  *) die "unknown command '$cmd' (expected start, stop or status)" ;;
esac
