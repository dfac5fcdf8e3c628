#!/usr/bin/env bash
# mmjax on one GPU: the compiled-kernel tests, then attention, tiled-loss and train-step benchmarks.
#
#   bash benchmarks/gpu.sh [OUTDIR] [--quick]      (OUTDIR default benchmarks/results/gpu)
#
# Writes OUTDIR/bench.jsonl (one JSON object per measurement, each with "benchmark"),
# OUTDIR/summary.md (markdown tables from it: benchmarks/gpu_summary.py) and OUTDIR/log.txt
# (every part's stderr). Parts, each with its own time budget in seconds (env overrides):
#   tests     BUDGET_TESTS=60       pytest -m accelerator tests/test_accelerator.py (the
#                                   compiled Pallas kernels against float64), one summary row
#   attention BUDGET_ATTENTION=150  benchmarks.attention: mmjax flash attention (Pallas/Triton),
#                                   cuDNN and XLA, bf16, fwd and fwd+bwd, head_dim 64 and 128,
#                                   seq 1k-16k at 16k tokens (batch = 16384 / seq), width 1024
#                                   (16 heads of 64, 8 of 128); non-causal first, then causal
#   losses    BUDGET_LOSSES=130     benchmarks.loss_memory: siglip / clip loss + grad, blocks
#                                   dense / tiled / pallas, batch 65,536-262,144, dim 768, f32
#                                   embeddings (as the towers give them), one process per point
#   train     BUDGET_TRAIN=140      benchmarks.train_step: ViT-B-16-SigLIP at batch 256, bf16,
#                                   AdamW, attention_impl xla and auto: samples/s and MFU
# 480 s in all by default, plus start-up. A part that fails, runs out of memory or hits its
# budget leaves rows with "error" or "skipped" and the next part runs; a part that dies
# altogether leaves one row saying so. PARTS="attention losses" runs a subset.
# --quick (or GPU_BENCH_QUICK=1): tiny sizes that run on a CPU in about a minute (cuDNN rows
# are then "skipped: no GPU"): tests/test_gpu_bench.py runs it so the script can't rot.
# PYTHON picks the interpreter (default python3).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR=""
QUICK="${GPU_BENCH_QUICK:-0}"
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) OUTDIR="$arg" ;;
  esac
done
OUTDIR="${OUTDIR:-$ROOT/benchmarks/results/gpu}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
JSONL="$OUTDIR/bench.jsonl"
LOG="$OUTDIR/log.txt"
: >"$JSONL"
: >"$LOG"
PY="${PYTHON:-python3}"
PARTS="${PARTS:-tests attention losses train}"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
# One child holds the GPU at a time (the parents never start JAX): let it take nearly all.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"

# A row from the shell: row BENCHMARK KEY=VALUE... (values are JSON-quoted strings).
row() {
  "$PY" - "$@" >>"$JSONL" <<'EOF'
import json, sys
r = {"benchmark": sys.argv[1]}
for kv in sys.argv[2:]:
  k, v = kv.split("=", 1)
  r[k] = v
print(json.dumps(r))
EOF
}

# part NAME BUDGET COMMAND...: runs COMMAND under `timeout` (budget + 30 s: the Python parts
# stop at their budget themselves), its stdout's JSON lines into bench.jsonl.
part() {
  local name="$1" budget="$2"; shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (budget ${budget} s): $*" | tee -a "$LOG" >&2
  local t0=$SECONDS rc
  timeout -k 10 "$((budget + 30))" "$@" 2>>"$LOG" | grep --line-buffered '^{' >>"$JSONL"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG" >&2
  if [ "$rc" -ne 0 ]; then
    row "$name" error="exit status $rc (124: over its budget + 30 s); see log.txt" \
        log_tail="$(tail -n 3 "$LOG" | head -c 600)"
  fi
}

if [ "$QUICK" = 1 ]; then
  ATT=(--seq 200 --head_dim 64 --width 128 --tokens 256 --masks none causal --repeats 1)
  LOSS=(--batch 600 --dim 32 --repeats 1 --same_process)
  TRAIN=(ViT-B-16-SigLIP 4 --tiny --steps 2 --attention_impl auto --peak_n 256)
else
  ATT=(--seq 1024 2048 4096 8192 16384 --head_dim 64 128 --width 1024 --tokens 16384
       --masks none causal --repeats 5)
  LOSS=(--batch 65536 131072 262144 --dim 768 --repeats 3 --point_budget_s 5)
  TRAIN=(ViT-B-16-SigLIP 256 --steps 10 --attention_impl xla auto --peak_n 8192)
fi

# The machine and the versions, first.
"$PY" - >>"$JSONL" 2>>"$LOG" <<'EOF' || row env error="jax did not start; see log.txt"
import json, subprocess, sys
import jax, jaxlib
d = jax.devices()[0]
r = {"benchmark": "env", "backend": jax.default_backend(), "device_kind": d.device_kind,
     "device_count": jax.device_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
     "python": sys.version.split()[0], "memory_stats": d.memory_stats()}
try:
  r["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
       "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
  pass
print(json.dumps(r))
EOF

# The kernels' correctness first: numbers from a wrong kernel are worth nothing.
tests_part() {
  local out rc
  out="$("$PY" -m pytest -q -p no:cacheprovider -m accelerator tests/test_accelerator.py 2>&1)"
  rc=$?
  echo "$out" >>"$LOG"
  row tests rc="$rc" summary="$(echo "$out" | tail -n 1)" \
      failed="$(echo "$out" | grep -E '^(FAILED|ERROR) ' | head -n 20 | tr '\n' ';')"
  return 0
}
case " $PARTS " in *" tests "*)
  echo "== tests (budget ${BUDGET_TESTS:-60} s)" | tee -a "$LOG" >&2
  export -f tests_part row; export PY JSONL LOG
  timeout -k 10 "${BUDGET_TESTS:-60}" bash -c tests_part \
      || row tests error="over its budget (${BUDGET_TESTS:-60} s) or failed; see log.txt" ;;
esac

part attention "${BUDGET_ATTENTION:-150}" "$PY" -m benchmarks.attention "${ATT[@]}" \
    --impl pallas cudnn xla --mode fwd fwd_bwd --dtype bfloat16 --same_process \
    --budget_s "${BUDGET_ATTENTION:-150}"
part losses "${BUDGET_LOSSES:-130}" "$PY" -m benchmarks.loss_memory "${LOSS[@]}" \
    --devices 1 --impl global --blocks dense tiled pallas --dtype float32 \
    --budget_s "${BUDGET_LOSSES:-130}"
part train "${BUDGET_TRAIN:-140}" "$PY" -m benchmarks.train_step "${TRAIN[@]}" \
    --dtypes bfloat16 --no_torch --budget_s "${BUDGET_TRAIN:-140}"

"$PY" -m benchmarks.gpu_summary "$JSONL" >"$OUTDIR/summary.md" 2>>"$LOG" \
    || echo "gpu_summary failed; see $LOG" >&2
cat "$OUTDIR/summary.md"
echo "rows: $JSONL; tables: $OUTDIR/summary.md; log: $LOG" >&2
