#!/usr/bin/env bash
# One prepared GPU check for one H100/H200, in stages that fit two calls of about 8
# minutes: float32 parity tests on the GPU (and the speed-lever tests), the train-step
# benchmark of ViT-B/16 at 224 px (LUT and MAE, bf16, cuDNN attention), the PyTorch
# reference step eager and under torch.compile (bf16 autocast) for the ours / PyTorch
# ratio, each speed lever of config.model on its own and all together (LUT), XLA GPU flags,
# the real-data training rate on the on-device input path against the synthetic-batch rate
# at the same shapes, the largest B/16 and L/16 batches with and without remat, and
# optionally S/16 and XLA attention. Everything goes to $OUT/gpu_results.json and
# $OUT/gpu_check.log (or /tmp/gpu_check_out/ without $OUT).
#
# The GPU machine may have jax (CUDA), flax, optax, orbax-checkpoint, chex, torch and timm
# but not ml_collections or clu (the real-data stage needs both; nothing needs TensorFlow).
# Carry their wheels and Fashion-MNIST's idx files (both git-ignored):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl ml_collections clu
#   mkdir -p .data/fashion-mnist && cp /path/to/fashion-mnist/*.gz .data/fashion-mnist/
#
# then run it on the GPU machine from the repository root, e.g. in two calls:
#
#   STAGES=parity,b16,torch,torch_compile,levers bash scripts/gpu_check.sh
#   STAGES=xla_flags,realdata,max_batch bash scripts/gpu_check.sh
#
# STAGES (comma list; default all but s16 and xla_attention): parity, b16, torch,
# torch_compile, levers, xla_flags, realdata, max_batch, l16, s16, xla_attention.
# Other knobs (environment): GPU_CHECK_BUDGET_S (default 450: stages that would start later
# are skipped and say so), BATCH_B16 / BATCH_S16 / BATCH_L16 (global batch, default 256 /
# 512 / 256), STEPS (timed steps per window, default 10), REALDATA_VARIANT / REALDATA_BATCH
# (default S/4 / 1024 at 28 px), XLA_FLAG_ROWS (space-separated flags, one row each; flags
# this jaxlib does not know are skipped). For a dry run of the plumbing on a CPU:
#   VARIANT_B16=mu/4 VARIANT_S16=mu/4 VARIANT_L16=mu/4 IMAGE_SIZE=16 BATCH_B16=8 \
#   BATCH_S16=8 BATCH_L16=8 PARITY_PLATFORM=cpu REALDATA_VARIANT=mu/4 REALDATA_BATCH=32 \
#   MAX_BATCH_LIMIT=16 BENCH_EXTRA="--override=model.decoder_depth=1" \
#   XLA_FLAG_ROWS="--xla_cpu_enable_fast_math=true" bash scripts/gpu_check.sh
# (the cuDNN stages then fail, which exercises the error path).
# Stages run in the order above, each under its own timeout, and every stage's JSON is
# merged at the end even if later ones failed or were skipped.
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
REALDATA_VARIANT=${REALDATA_VARIANT:-S/4}
REALDATA_BATCH=${REALDATA_BATCH:-1024}
MAX_BATCH_LIMIT=${MAX_BATCH_LIMIT:-8192}
STAGES=${STAGES:-parity,b16,torch,torch_compile,levers,xla_flags,realdata,max_batch}
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

# want NAME: is stage NAME selected by $STAGES?
want() { [[ ",$STAGES," == *",$1,"* ]]; }
have_torch() { python3 -c "import torch, timm" 2>/dev/null; }

# 1. float32 parity tests on the GPU (conftest's JAX_PLATFORMS default is cpu: override it),
# the speed levers' own tests (exactness of remat policies, scope of the others), and the
# model's own forms of its products (2-D linear layers, the teacher's head-major attention).
if want parity; then
  if [[ "${SKIP_PARITY:-0}" != 1 ]] && have_torch; then
    stage parity 60 150 env JAX_PLATFORMS="$PARITY_PLATFORM" python3 -m pytest -q \
        -p no:cacheprovider tests/test_parity.py tests/test_speed_levers.py tests/test_dense.py \
        "tests/test_attention.py::test_head_major_attention_matches_numpy_and_jax_values_and_gradients" \
        "tests/test_attention.py::test_only_forward_only_calls_take_the_head_major_form" \
        --junitxml="$WORK/parity.xml"
  else
    log "SKIP parity: torch/timm not importable (or SKIP_PARITY=1)"
    echo '{"stage": "parity", "status": "skipped: no torch/timm"}' > "$WORK/stage_parity.json"
  fi
fi

# bench NAME VARIANT BATCH ATTENTION [METHOD] [EXTRA ARGS...]: our step, synthetic batches.
bench() {
  local name=$1 variant=$2 batch=$3 attention=$4 method=${5:-both}
  shift 4; (( $# )) && shift
  # shellcheck disable=SC2086  (BENCH_EXTRA is a list of arguments)
  stage "$name" 90 170 python3 scripts/benchmark.py --variant="$variant" --batch="$batch" \
      --method="$method" --image_size="$IMAGE_SIZE" --dtype=bfloat16 --attention="$attention" \
      --steps="$STEPS" --warmup=3 --repeats=3 --measure_peak --json_out="$WORK/bench_$name.json" \
      $BENCH_EXTRA "$@"
}

# 2. B/16 with cuDNN attention, the defaults: the row every other is compared with.
want b16 && bench b16_cudnn "$VARIANT_B16" "$BATCH_B16" cudnn

# 3. The PyTorch reference step at the B/16 shapes: eager (as the reference runs) and
# torch.compile (what a PyTorch user would run for speed).
torch_row() {  # torch_row NAME [EXTRA ARGS...]
  local name=$1; shift
  if [[ "${SKIP_TORCH:-0}" != 1 ]] && have_torch; then
    # shellcheck disable=SC2086
    stage "$name" 60 180 python3 scripts/benchmark_torch.py --variant="$VARIANT_B16" \
        --image_size="$IMAGE_SIZE" --batch="$BATCH_B16" --method=both --dtype=bfloat16 \
        --steps="$STEPS" --warmup=3 --repeats=3 --json_out="$WORK/$name.json" $BENCH_EXTRA "$@"
  else
    log "SKIP $name: torch/timm not importable (or SKIP_TORCH=1)"
  fi
}
want torch && torch_row torch_b16
want torch_compile && torch_row torch_b16_compile --compile

# 4. The speed levers of config.model, LUT only, each alone and all together.
if want levers; then
  bench lever_teacher_bf16 "$VARIANT_B16" "$BATCH_B16" cudnn lut \
      --override=model.teacher_residual_in_compute_dtype=true
  bench lever_gelu_tanh "$VARIANT_B16" "$BATCH_B16" cudnn lut --override=model.gelu_approximate=true
  bench lever_all "$VARIANT_B16" "$BATCH_B16" cudnn lut \
      --override=model.teacher_residual_in_compute_dtype=true --override=model.gelu_approximate=true
fi

# 5. XLA GPU flags, one row each (LUT, defaults otherwise). A flag this jaxlib does not
# know would abort XLA, so each is looked up in XLA_FLAGS=--help first.
if want xla_flags; then
  known=$(XLA_FLAGS=--help python3 -c "import jax; jax.numpy.zeros(1)" 2>&1 || true)
  i=0
  for flag in ${XLA_FLAG_ROWS:---xla_gpu_enable_cublaslt=true --xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cudnn_layer_norm=true}; do
    i=$(( i + 1 ))
    if ! grep -q -- "${flag%%=*}[= ]" <<< "$known"; then
      log "SKIP xla_flag_$i: $flag is not a flag of this jaxlib"
      echo "{\"stage\": \"xla_flag_$i\", \"status\": \"unknown flag $flag\"}" > "$WORK/stage_xla_flag_$i.json"
      continue
    fi
    XLA_FLAGS="${XLA_FLAGS:-} $flag" bench "xla_flag_$i" "$VARIANT_B16" "$BATCH_B16" cudnn lut
    echo "$flag" > "$WORK/flag_xla_flag_$i.txt"
  done
fi

# 6. Real data: the on-device input path feeding the step (lut-pretrain's iterator), against
# the synthetic-batch step at the same config and shapes.
if want realdata; then
  if [[ -z "${FASHION_MNIST_DIR:-}" && -d .data/fashion-mnist ]]; then
    export FASHION_MNIST_DIR=$ROOT/.data/fashion-mnist
  fi
  stage realdata_device 60 150 python3 scripts/benchmark_input_backends.py \
      --config="configs/fashion_mnist.py:variant=$REALDATA_VARIANT" --batch_size="$REALDATA_BATCH" \
      --backends=device --steps=50 --warmup=3 --repeats=3 --override=dtype=bfloat16 \
      --json_out="$WORK/realdata.json"
  stage realdata_synthetic 60 150 python3 scripts/benchmark.py --config=configs/fashion_mnist.py \
      --variant="$REALDATA_VARIANT" --batch="$REALDATA_BATCH" --method=lut --dtype=bfloat16 \
      --attention=auto --steps=50 --warmup=3 --repeats=3 --json_out="$WORK/bench_realdata_synthetic.json"
fi

# 7. The largest batch that fits: B/16 LUT without and with remat, L/16 LUT with remat.
# max_batch NAME VARIANT START_BATCH REMAT_FLAG
max_batch() {
  # shellcheck disable=SC2086
  stage "max_batch_$1" 90 200 python3 scripts/benchmark.py --variant="$2" --batch="$3" \
      --method=lut --image_size="$IMAGE_SIZE" --dtype=bfloat16 --attention=auto --"$4" \
      --find_max_batch --max_batch="$MAX_BATCH_LIMIT" --steps=2 --warmup=1 --repeats=1 \
      --json_out="$WORK/bench_max_batch_$1.json" $BENCH_EXTRA
}
if want max_batch; then
  max_batch b16_no-remat "$VARIANT_B16" "$BATCH_B16" no-remat
  max_batch b16_remat "$VARIANT_B16" "$BATCH_B16" remat
  max_batch l16_remat "$VARIANT_L16" "$BATCH_L16" remat
fi

# 8. Optional: L/16 LUT at BATCH_L16 with remat (timed), S/16 and XLA attention.
# shellcheck disable=SC2086
want l16 && stage l16_remat 90 150 python3 scripts/benchmark.py --variant="$VARIANT_L16" \
    --batch="$BATCH_L16" --method=lut --image_size="$IMAGE_SIZE" --dtype=bfloat16 \
    --attention=auto --remat --steps=2 --warmup=1 --repeats=1 \
    --json_out="$WORK/bench_l16_remat.json" $BENCH_EXTRA
want s16 && bench s16_cudnn "$VARIANT_S16" "$BATCH_S16" cudnn
want xla_attention && bench b16_xla "$VARIANT_B16" "$BATCH_B16" xla

# Merge everything into one JSON: ratios against PyTorch eager and compiled, each lever's
# and flag's change against the b16_cudnn row, real data against synthetic.
python3 - "$WORK" "$OUTDIR/gpu_results.json" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys, xml.etree.ElementTree as ET
work, out = sys.argv[1], sys.argv[2]
load = lambda name: json.load(open(os.path.join(work, name)))
merged = {"stages": [], "benchmarks": {}, "torch": {}, "parity": None, "flags": {},
          "realdata": None}
for path in sorted(glob.glob(os.path.join(work, "stage_*.json"))):
  merged["stages"].append(json.load(open(path)))
for path in sorted(glob.glob(os.path.join(work, "bench_*.json"))):
  merged["benchmarks"][os.path.basename(path)[len("bench_"):-len(".json")]] = json.load(open(path))
for name in ("torch_b16", "torch_b16_compile"):
  if os.path.exists(os.path.join(work, name + ".json")):
    merged["torch"][name] = load(name + ".json")
for path in glob.glob(os.path.join(work, "flag_*.txt")):
  merged["flags"][os.path.basename(path)[len("flag_"):-len(".txt")]] = open(path).read().strip()
if os.path.exists(os.path.join(work, "realdata.json")):
  merged["realdata"] = load("realdata.json")
xml = os.path.join(work, "parity.xml")
if os.path.exists(xml):
  suite = ET.parse(xml).getroot()
  suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
  merged["parity"] = {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")}
torch_ips = {(name, r["method"]): r["images_per_s"] for name, rows in merged["torch"].items()
             for r in rows if "images_per_s" in r}
base = {r["method"]: r["images_per_s"]
        for r in merged["benchmarks"].get("b16_cudnn", {}).get("results", [])}
print("summary (images/s, ms/step, MFU vs spec peak / vs measured matmul):")
for name, b in merged["benchmarks"].items():
  for r in b.get("results", []):
    if "images_per_s" not in r:
      continue
    notes = []
    if name.startswith(("b16", "lever", "xla_flag")):
      for torch_name in merged["torch"]:
        if (torch_name, r["method"]) in torch_ips:
          r[f"ratio_vs_{torch_name}"] = r["images_per_s"] / torch_ips[(torch_name, r["method"])]
          notes.append(f"/{torch_name} {r[f'ratio_vs_{torch_name}']:.2f}x")
      if name != "b16_cudnn" and r["method"] in base:
        r["change_vs_b16_cudnn"] = r["images_per_s"] / base[r["method"]] - 1
        notes.append(f"vs b16_cudnn {r['change_vs_b16_cudnn']:+.1%}")
    mfu, mm = r.get("mfu"), r.get("mfu_vs_measured_matmul")
    flag = merged["flags"].get(name, "")
    print(f"  {name:22s} {r['method']}: {r['images_per_s']:8.1f} img/s {r['ms_per_step']:8.2f} ms "
          f"MFU {mfu if mfu is None else round(mfu, 3)} / {mm if mm is None else round(mm, 3)} "
          f"peak {(r.get('memory') or {}).get('peak_bytes_in_use', 0) / 2**30:.1f} GiB "
          + " ".join(notes) + (f" [{flag}]" if flag else ""))
  for search in b.get("max_batch", []):
    print(f"  {name:22s} {search['method']}: largest fitting batch "
          f"{search['largest_fitting_batch']}" + (" (limit)" if search["hit_limit"] else ""))
for name, rows in merged["torch"].items():
  for r in rows:
    if "images_per_s" in r:
      print(f"  {name:22s} {r['method']}: {r['images_per_s']:8.1f} img/s {r['ms_per_step']:8.2f} ms")
synthetic = merged["benchmarks"].get("realdata_synthetic", {}).get("results", [])
if merged["realdata"] and synthetic:
  real = merged["realdata"]["rows"][0]["train_images_per_s"]
  merged["realdata"]["synthetic_images_per_s"] = synthetic[0]["images_per_s"]
  merged["realdata"]["real_over_synthetic"] = real / synthetic[0]["images_per_s"]
  print(f"  real data (device path) {real:.1f} img/s vs synthetic "
        f"{synthetic[0]['images_per_s']:.1f}: {merged['realdata']['real_over_synthetic']:.2f}x")
print("parity:", merged["parity"])
json.dump(merged, open(out, "w"), indent=2, default=str)
print("wrote", out)
EOF
log "done in $(( $(date +%s) - START ))s"
