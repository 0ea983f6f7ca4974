#!/usr/bin/env bash
# One prepared GPU check for one H100/H200 (about 8 minutes): float32 parity tests on the
# GPU (if torch and timm are there), the train-step benchmark of ViT-B/16 and ViT-S/16 at
# 224 px, LUT and MAE, bf16, with cuDNN attention, the PyTorch reference step (bf16
# autocast) for the ours / PyTorch ratio, a ViT-L/16 LUT batch-256 fit check with remat,
# and finally the same benchmarks with XLA attention. Everything goes to
# $OUT/gpu_results.json and $OUT/gpu_check.log (or /tmp/gpu_check_out/ without $OUT).
#
# The GPU machine has jax (CUDA), flax, optax, orbax-checkpoint and chex but no
# ml_collections (nor TensorFlow / CLU, which nothing here needs). Carry its wheel:
#
#   # here, once, in the repository root (.whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl ml_collections==1.1.0
#   # then through the device tool (one call; the script installs .whl/*.whl itself):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# The script starts with the install the device README prescribes:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Knobs (environment): GPU_CHECK_BUDGET_S (default 450: stages that would start later are
# skipped and say so), BATCH_B16 / BATCH_S16 (global batch, default 256 / 512), STEPS
# (timed steps per window, default 10), SKIP_PARITY=1, SKIP_TORCH=1. For a dry run of the
# script's plumbing on a CPU: VARIANT_B16=mu/4 VARIANT_S16=mu/4 VARIANT_L16=mu/4
# IMAGE_SIZE=16 BATCH_B16=8 BATCH_S16=8 BATCH_L16=8 PARITY_PLATFORM=cpu
# BENCH_EXTRA="--override=model.decoder_depth=1" (the cuDNN stages then fail, which
# exercises the error path).
# Stages run in priority order (B/16 cuDNN first), each under its own timeout, and every
# stage's JSON is merged at the end even if later ones failed or were skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu_check.log
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
BATCH_B16=${BATCH_B16:-256}
BATCH_S16=${BATCH_S16:-512}
STEPS=${STEPS:-10}
VARIANT_B16=${VARIANT_B16:-B/16}
VARIANT_S16=${VARIANT_S16:-S/16}
VARIANT_L16=${VARIANT_L16:-L/16}
BATCH_L16=${BATCH_L16:-256}
IMAGE_SIZE=${IMAGE_SIZE:-224}
PARITY_PLATFORM=${PARITY_PLATFORM:-cuda}
BENCH_EXTRA=${BENCH_EXTRA:-}
START=$(date +%s)
export PYTHONUNBUFFERED=1
# JAX preallocates 75% of the GPU by default; the L/16 fit check should see (almost) all.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME MIN_SECONDS MAX_SECONDS CMD...: runs CMD under a timeout of at most
# MAX_SECONDS and at most what is left of the budget; skipped if less than MIN_SECONDS
# is left. Output is appended to the log.
stage() {
  local name=$1 min=$2 max=$3; shift 3
  local left; left=$(remaining)
  if (( left < min )); then
    log "SKIP $name: ${left}s left of the ${BUDGET}s budget (needs ${min}s)"
    echo "{\"stage\": \"$name\", \"status\": \"skipped\", \"seconds_left\": $left}" \
        > "$WORK/stage_$name.json"
    return 0
  fi
  local limit=$(( left < max ? left : max ))
  log "START $name (timeout ${limit}s): $*"
  local t0; t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  log "END $name rc=$rc in $(( $(date +%s) - t0 ))s"
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" \
      > "$WORK/stage_$name.json"
}

log "gpu_check.sh in $ROOT, results in $OUTDIR, budget ${BUDGET}s"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 || log "wheel install failed"
  export PYTHONPATH=/tmp/site:$ROOT
else
  log "no .whl/*.whl carried: ml_collections must already be importable"
  export PYTHONPATH=$ROOT
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 - <<'EOF'
import importlib.metadata as md, platform
print("python", platform.python_version())
for d in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
          "orbax-checkpoint", "chex", "ml_collections", "torch", "timm", "pytest"):
  try:
    print(d, md.version(d))
  except md.PackageNotFoundError:
    print(d, "not installed")
import jax
print("devices", jax.devices())
EOF
} >> "$LOG" 2>&1
python3 -c "import ml_collections" 2>/dev/null \
    || log "WARNING: ml_collections is not importable; the benchmarks will fail (carry .whl)"

# 1. float32 parity tests on the GPU (conftest's JAX_PLATFORMS default is cpu: override it).
if [[ "${SKIP_PARITY:-0}" != 1 ]] && python3 -c "import torch, timm" 2>/dev/null; then
  stage parity 60 120 env JAX_PLATFORMS="$PARITY_PLATFORM" python3 -m pytest -q \
      -p no:cacheprovider tests/test_parity.py --junitxml="$WORK/parity.xml"
else
  log "SKIP parity: torch/timm not importable (or SKIP_PARITY=1)"
  echo '{"stage": "parity", "status": "skipped: no torch/timm"}' > "$WORK/stage_parity.json"
fi

# 2. Our step. Priority order: B/16 with cuDNN attention first; S/16 with XLA attention
# comes last, after the PyTorch reference.
bench() {  # bench NAME VARIANT BATCH ATTENTION
  # shellcheck disable=SC2086  (BENCH_EXTRA is a list of arguments)
  stage "$1" 90 170 python3 scripts/benchmark.py --variant="$2" --batch="$3" --method=both \
      --image_size="$IMAGE_SIZE" --dtype=bfloat16 --attention="$4" --steps="$STEPS" \
      --warmup=3 --repeats=3 --measure_peak --json_out="$WORK/bench_$1.json" $BENCH_EXTRA
}
bench b16_cudnn "$VARIANT_B16" "$BATCH_B16" cudnn
bench s16_cudnn "$VARIANT_S16" "$BATCH_S16" cudnn

# 3. The PyTorch reference step (eager, bf16 autocast) at the B/16 shapes.
if [[ "${SKIP_TORCH:-0}" != 1 ]] && python3 -c "import torch, timm" 2>/dev/null; then
  # shellcheck disable=SC2086
  stage torch_b16 60 120 python3 scripts/benchmark_torch.py --variant="$VARIANT_B16" \
      --image_size="$IMAGE_SIZE" --batch="$BATCH_B16" --method=both --dtype=bfloat16 \
      --steps="$STEPS" --warmup=3 --repeats=3 --json_out="$WORK/torch_b16.json" $BENCH_EXTRA
else
  log "SKIP torch_b16: torch/timm not importable (or SKIP_TORCH=1)"
fi

# 4. Does ViT-L/16 LUT at global batch 256 fit on the one GPU (with remat)? Two timed steps.
# shellcheck disable=SC2086
stage l16_remat 90 150 python3 scripts/benchmark.py --variant="$VARIANT_L16" \
    --batch="$BATCH_L16" --method=lut --image_size="$IMAGE_SIZE" --dtype=bfloat16 \
    --attention=auto --remat --steps=2 --warmup=1 --repeats=1 \
    --json_out="$WORK/bench_l16_remat.json" $BENCH_EXTRA

bench b16_xla "$VARIANT_B16" "$BATCH_B16" xla
bench s16_xla "$VARIANT_S16" "$BATCH_S16" xla

# 5. Merge everything into one JSON (with the ours / PyTorch ratios where both ran).
python3 - "$WORK" "$OUTDIR/gpu_results.json" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys, xml.etree.ElementTree as ET
work, out = sys.argv[1], sys.argv[2]
merged = {"stages": [], "benchmarks": {}, "torch": [], "parity": None}
for path in sorted(glob.glob(os.path.join(work, "stage_*.json"))):
  merged["stages"].append(json.load(open(path)))
for path in sorted(glob.glob(os.path.join(work, "bench_*.json"))):
  name = os.path.basename(path)[len("bench_"):-len(".json")]
  merged["benchmarks"][name] = json.load(open(path))
if os.path.exists(os.path.join(work, "torch_b16.json")):
  merged["torch"] = json.load(open(os.path.join(work, "torch_b16.json")))
xml = os.path.join(work, "parity.xml")
if os.path.exists(xml):
  suite = ET.parse(xml).getroot()
  suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
  merged["parity"] = {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")}
torch_ips = {r["method"]: r["images_per_s"] for r in merged["torch"] if "images_per_s" in r}
print("summary (images/s, ms/step, MFU vs spec peak, MFU vs measured matmul):")
for name, b in merged["benchmarks"].items():
  for r in b.get("results", []):
    if name.startswith("b16") and r["method"] in torch_ips:
      r["ratio_vs_torch"] = r["images_per_s"] / torch_ips[r["method"]]
    mfu = r.get("mfu"); mm = r.get("mfu_vs_measured_matmul")
    print(f"  {name:10s} {r['method']}: {r['images_per_s']:8.1f} img/s "
          f"{r['ms_per_step']:8.2f} ms MFU {mfu if mfu is None else round(mfu, 3)} / "
          f"{mm if mm is None else round(mm, 3)} "
          f"compile {r['compile_s']:.0f}s peak mem "
          f"{(r.get('memory') or {}).get('peak_bytes_in_use', 0) / 2**30:.1f} GiB"
          + (f" ours/torch {r['ratio_vs_torch']:.2f}" if "ratio_vs_torch" in r else ""))
for r in merged["torch"]:
  print(f"  torch      {r['method']}: {r['images_per_s']:8.1f} img/s {r['ms_per_step']:8.2f} ms")
print("parity:", merged["parity"])
json.dump(merged, open(out, "w"), indent=2, default=str)
print("wrote", out)
EOF
log "done in $(( $(date +%s) - START ))s"
