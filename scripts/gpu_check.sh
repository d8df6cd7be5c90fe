#!/usr/bin/env bash
# One command that turns a few minutes on one CUDA GPU into evidence (issue 14).
#
#   bash scripts/gpu_check.sh                 # results in $OUT (default ./gpu_check_out)
#   GPU_CHECK_ONLY="gpu_tests step_8k" bash scripts/gpu_check.sh    # a rerun of some sections
#
# Without an NVIDIA GPU it stops within a second: one line on stderr, exit 2, and a summary.json
# saying so; nothing else runs.
#
# What it assumes (the device machine of this workplace, see /work/.library/device/KINDS.md):
#   * python3 (GPU_CHECK_PYTHON) already holds a CUDA torch, Triton, numpy, safetensors,
#     tokenizers, huggingface_hub, einops, pyyaml, psutil, pytest, tensorboard (there: torch
#     2.11+cu130, Python 3.12, x86_64); the machine reaches no package registry.
#   * Our other dependencies travel as wheels in runs/gpu_wheels (GPU_CHECK_WHEELS), built here by
#     `bash scripts/gpu_wheels.sh` (~37 MB: megatron-core, mamba-ssm without its CUDA extension,
#     transformers, nvidia-modelopt and its needs) and carried with the device tool
#     (carry: ["runs/gpu_wheels"]). They are installed with `pip install --no-index --no-deps
#     --target /tmp/gpu_check_site` and put first on PYTHONPATH with the repository root: no venv.
#     Install cost, measured on the 2-core CPU machine: 3.5 s (125 MB unpacked); downloading
#     and building the bundle: 6 s. Where megatron-core is already importable and no wheels are
#     there (a cluster venv), nothing is installed.
#   * Transformer Engine is NOT installed: transformer-engine-torch 2.20 exists only as an sdist
#     (no wheel for any platform), and compiling it against the image's torch takes far longer
#     than this script may run. So on that image the TE-spec test and the ModelOpt backend
#     (whose Megatron plugin needs TE) report "skipped"/"unavailable" with that reason; the
#     local spec's attention is torch's causal SDPA (flash / memory-efficient, no seq x seq
#     scores), so the 49k-token step keeps its attention layers.
#
# Sections (each under its own timeout, all clamped to GPU_CHECK_BUDGET_S=450 s in total; each
# one's exit status, time and log tail go into summary.json, so one failure hides nothing):
#   install    the wheels above
#   env        env.json: driver, CUDA, GPU, torch / Triton / TE / mamba-ssm / megatron versions
#   preflight  tools/preflight.py as the trainer runs it at start: the tiny recipe must pass every
#              check (CUDA, NCCL, TE or the local spec, mamba-ssm kernels, the causal-conv1d
#              route, memory, disk); the 12B stage-2 recipe's lines are recorded (its disk check
#              may fail on this machine's 64 GiB disk: reported, not a failure of the section)
#   gpu_tests  every `gpu`-marked test (gpu_tests.xml): mamba-ssm Triton SSD == the CPU scan on
#              both conv routes (fused: causal-conv1d or its torch test doubles; fallback),
#              elastic slice == mask on CUDA, TE specs == local specs, exported HF == elastic on
#              CUDA, ModelOpt's Minitron importance on the tiny model
#   plan       tools/plan_memory.py if present: both 12B recipes at TP 1 on one GPU (it plans
#              whole recipes, not the bench's stack; GPU_CHECK_PLAN_ARGS), else "not present"
#   step_8k    benchmarks/bench_gpu_step.py at seq 8192, 12B vocabulary (gpu_step_8k.json)
#   step_49k   the same at seq 49152, vocabulary 16384 = one TP-8 rank's shard (gpu_step_49k.json),
#              with attention layers; its eval/full case is the trainer's 49k evaluation step
#              (full budget, megatron's own modules), measured peak against the evaluation plan
#   importance benchmarks/bench_importance_backends.py: the rank-correlation table (importance.json)
#   nccl       NCCL all-reduce over every local GPU with torchrun (nccl.json; 1 GPU: world 1)
#   sp_cp      the SP (TP 2) and CP 2 equivalence tests, on gloo/CPU ranks (one GPU)
# Exit status of a section: 0 ok, 124/137 timeout, 2 "unavailable" (the tool says it cannot run
# here), 3 skipped, else failed. $OUT holds at most 8 files (the device tool returns no more):
# summary.json env.json log.txt gpu_tests.xml gpu_step_8k.json gpu_step_49k.json importance.json
# nccl.json.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$PWD/gpu_check_out}
PY=${GPU_CHECK_PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/runs/gpu_wheels}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
ONLY=${GPU_CHECK_ONLY:-}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.json
START=$SECONDS

fail_fast() {
  printf '{"status": "no_gpu", "reason": "%s", "sections": {}}\n' "$1" >"$SUMMARY"
  echo "gpu_check: $1; nothing was run (needs an NVIDIA GPU)" >&2
  exit 2
}

# --- preflight: fail fast without a GPU (no Python import before this point) ---
# GPU_CHECK_DRY_RUN=1 skips it, to exercise the sections on a CPU machine (each GPU tool then
# refuses or skips by itself); the summary says "dry_run".
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  gpus=1
  echo "gpu_check: DRY RUN without the GPU preflight" >&2
else
  command -v nvidia-smi >/dev/null 2>&1 || fail_fast "no CUDA GPU here: nvidia-smi not found"
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  [ "${gpus:-0}" -ge 1 ] || fail_fast "no CUDA GPU here: nvidia-smi lists no GPU"
  command -v "$PY" >/dev/null 2>&1 || fail_fast "no CUDA GPU usable here: $PY not found"
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1 ||
    fail_fast "no CUDA GPU usable here: $PY's torch sees no CUDA device"
fi

WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
LOG=$OUT/log.txt
: >"$LOG"
echo '{"status": "running", "sections": {}}' >"$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: $gpus GPU(s), python $PY, budget ${BUDGET}s, out $OUT" | tee -a "$LOG"

# section NAME TIMEOUT [RESULT_FILE] -- COMMAND...: run under min(TIMEOUT, time left), record it.
section() {
  local name=$1 limit=$2 result=
  shift 2
  if [ "$1" != "--" ]; then result=$1; shift; fi
  shift
  local slog=$WORK/$name.log rc=0 t0=$SECONDS
  local left=$((BUDGET - (SECONDS - START) - 5))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
    echo "skipped: not in GPU_CHECK_ONLY" >"$slog"
    rc=3
  elif [ "$limit" -lt 10 ]; then
    echo "skipped: out of time (${BUDGET}s budget)" >"$slog"
    rc=3
  else
    echo "=== $name (timeout ${limit}s) ===" | tee -a "$LOG"
    # bash -c: the command may be one of the functions below (exported with export -f).
    timeout --kill-after=10 "$limit" bash -c 'set -euo pipefail; "$@"' _ "$@" >"$slog" 2>&1 || rc=$?
  fi
  cat "$slog" >>"$LOG"
  echo "=== $name: rc $rc, $((SECONDS - t0))s ===" | tee -a "$LOG"
  "$PY" "$ROOT/scripts/gpu_check_helpers.py" record "$SUMMARY" "$name" "$rc" \
    "$((SECONDS - t0))" "$limit" "$slog" ${result:+"$result"} || true
}

install_deps() {
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    rm -rf "$SITE"
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
      --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    ls "$WHEELS"
  elif "$PY" -c 'import megatron.core' 2>/dev/null; then
    echo "no wheels in $WHEELS; megatron-core already importable: nothing installed"
  else
    echo "no wheels in $WHEELS and megatron-core is not importable:" \
      "run 'bash scripts/gpu_wheels.sh' where PyPI is reachable and carry runs/gpu_wheels"
    return 1
  fi
  "$PY" -c 'import megatron.core, megatron_elastic.model; print("megatron-core", megatron.core.__version__)'
}

gpu_tests() {
  local files rc=0
  files=$(grep -rlE 'pytest\.mark\.gpu|mark\.gpu' "$ROOT/tests/unit" | sort)
  echo "files: $files"
  # shellcheck disable=SC2086
  "$PY" -m pytest -m gpu -p no:cacheprovider -q -rA --junitxml="$OUT/gpu_tests.xml" $files || rc=$?
  [ "$rc" -eq 2 ] && rc=1 # pytest's 2 = interrupted / collection error: a failure, not "unavailable"
  return "$rc"
}

plan_memory() {
  if [ ! -f "$ROOT/tools/plan_memory.py" ]; then
    echo "tools/plan_memory.py: not present (no prediction to compare peak memory with)"
    return 3
  fi
  # The planner (written beside this script) plans recipes of the whole 62-layer 12B: it takes no
  # model override, so it cannot plan bench_gpu_step's few-layer stack. Its per-micro-batch terms
  # (logits + KD temporaries at seq 8192 with the full vocabulary) are what compares directly.
  # GPU_CHECK_PLAN_ARGS replaces the arguments below.
  local args recipe rc=0
  if [ -n "${GPU_CHECK_PLAN_ARGS:-}" ]; then
    # shellcheck disable=SC2086
    "$PY" "$ROOT/tools/plan_memory.py" $GPU_CHECK_PLAN_ARGS
    return
  fi
  for recipe in stage1_8k stage2_49k; do
    args=(--recipe "$ROOT/examples/nemotron_nano_12b/$recipe.yaml" parallel.tensor_parallel_size=1
      parallel.pipeline_parallel_size=1 --world-size 1 --profile gpu-bf16)
    echo "plan_memory.py ${args[*]}"
    "$PY" "$ROOT/tools/plan_memory.py" "${args[@]}" 2>&1 | grep -v -i warn || rc=$?
  done
  return "$rc"
}

step_49k() {
  local pattern=M-M*-M*-  # with or without TE: no attention materialises seq x seq scores
  "$PY" "$ROOT/benchmarks/bench_gpu_step.py" --seq 49152 --vocab 16384 --pattern "$pattern" \
    --warmup 1 --iters 2 --output "$OUT/gpu_step_49k.json"
}

preflight() {
  "$PY" "$ROOT/tools/preflight.py" --recipe "$ROOT/examples/tiny/stage1.yaml" \
    "checkpoint.save=$WORK/preflight_save"
  local rc=0
  "$PY" "$ROOT/tools/preflight.py" --recipe "$ROOT/examples/nemotron_nano_12b/stage2_49k.yaml" \
    "checkpoint.save=$WORK/preflight_save" || rc=$?
  echo "12B stage 2 preflight: exit $rc (lines above)"
}

nccl() {
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$gpus" \
    "$ROOT/scripts/gpu_check_helpers.py" nccl "$OUT/nccl.json"
}

sp_cp() {
  local file="$ROOT/tests/distributed/test_sequence_context_parallel.py"
  if [ ! -f "$file" ]; then
    echo "no SP/CP tests in tests/distributed yet"
    return 3
  fi
  # One GPU cannot host a 2-rank NCCL run: the ranks run on gloo/CPU (CUDA hidden), as in CI;
  # one layout of each (TP 2 + SP, CP 2 x DP 2) to stay inside the section's minute.
  echo "tests: $file (gloo/CPU processes)"
  CUDA_VISIBLE_DEVICES= "$PY" -m pytest -p no:cacheprovider -q -rA \
    "$file::test_invariant_sequence_parallel_matches_single_process[2-1]" \
    "$file::test_invariant_context_parallel_matches_single_process[1-False-2]"
}

export ROOT OUT PY WHEELS SITE WORK gpus
export -f install_deps preflight gpu_tests plan_memory step_49k nccl sp_cp
section install 90 -- install_deps
section env 30 "$OUT/env.json" -- "$PY" "$ROOT/scripts/gpu_check_helpers.py" env "$OUT/env.json"
section preflight 40 -- preflight
section gpu_tests 150 -- gpu_tests
section plan 45 -- plan_memory
section step_8k 130 "$OUT/gpu_step_8k.json" -- "$PY" "$ROOT/benchmarks/bench_gpu_step.py" \
  --seq 8192 --output "$OUT/gpu_step_8k.json"
section step_49k 110 "$OUT/gpu_step_49k.json" -- step_49k
section importance 60 "$OUT/importance.json" -- "$PY" "$ROOT/benchmarks/bench_importance_backends.py" \
  --train-steps 200 --output "$OUT/importance.json"
section nccl 40 "$OUT/nccl.json" -- nccl
section sp_cp 60 -- sp_cp

rm -rf "$WORK"
"$PY" - "$SUMMARY" "$((SECONDS - START))" <<'EOF'
import json, sys
path, seconds = sys.argv[1], int(sys.argv[2])
data = json.load(open(path))
data["status"], data["seconds"] = "done", seconds
data["dry_run"] = __import__("os").environ.get("GPU_CHECK_DRY_RUN") == "1"
json.dump(data, open(path, "w"), indent=1)
print(f"gpu_check: done in {seconds}s; not ok: {data.get('failed') or 'none'}")
EOF
