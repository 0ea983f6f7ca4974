#!/usr/bin/env bash
# LUT vs MAE on one GPU within a fixed time: scripts/compare_lut_mae.py on the on-device
# input path (no TensorFlow), 3 seeds each, Fashion-MNIST. Writes $OUT/compare_results.json
# and $OUT/compare.log (or /tmp/gpu_compare_out/ without $OUT); render the Markdown table and
# the curves anywhere afterwards with
#   python scripts/compare_lut_mae.py --from_json=OUT/compare_results.json \
#       --results=docs/results.md --plots=docs/images/compare_gpu --tag=gpu
#
# Needs, besides jax (CUDA), flax, optax and orbax-checkpoint: ml_collections and clu
# (pure-Python wheels: put them in .whl/, the script installs them), and Fashion-MNIST's
# idx .gz files: FASHION_MNIST_DIR, or a copy in .data/fashion-mnist/ (git-ignored; copy
# the four files of Debian's dataset-fashion-mnist there before sending the tree), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 -d .whl ml_collections clu
#   mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
#
# Knobs (environment): EPOCHS (default 100), BATCH (1024), SEEDS (0,1,2), MONITOR_EVERY
# (steps, default one tenth of a run), BUDGET_S (default 450: runs that would start later
# are skipped and reported), EXTRA (more compare_lut_mae.py flags). Time a short run first
# (EPOCHS=5 SEEDS=0) and size EPOCHS from its pre-training seconds; results are saved after
# every run, so a job stopped by the time limit keeps the finished ones. CPU dry run of the
# plumbing: EPOCHS=0.05 BATCH=64 SEEDS=0 EXTRA="--variant=mu/4 --probe_train_split=train[:2000]
# --probe_eval_split=test[:500] --lp_epochs=2".
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=${OUT:-/tmp/gpu_compare_out}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/compare.log
EPOCHS=${EPOCHS:-100}
BATCH=${BATCH:-1024}
SEEDS=${SEEDS:-0,1,2}
BUDGET_S=${BUDGET_S:-450}
STEPS=$(python3 -c "print(max(1, round($EPOCHS * 60000 / $BATCH)))")
MONITOR_EVERY=${MONITOR_EVERY:-$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))}
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 || echo "wheel install failed" >> "$LOG"
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT
fi
if [[ -z "${FASHION_MNIST_DIR:-}" && -d .data/fashion-mnist ]]; then
  export FASHION_MNIST_DIR=$ROOT/.data/fashion-mnist
fi
{
  echo "gpu_compare.sh: $EPOCHS epochs = $STEPS steps of batch $BATCH, seeds $SEEDS, budget ${BUDGET_S}s"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
} >> "$LOG"
# shellcheck disable=SC2086  (EXTRA is a list of arguments)
timeout --signal=TERM --kill-after=20 $(( BUDGET_S + 60 )) \
  python3 scripts/compare_lut_mae.py --workdir=/tmp/gpu_compare_runs --total_steps="$STEPS" \
    --batch_size="$BATCH" --seeds="$SEEDS" --monitor_every="$MONITOR_EVERY" \
    --deadline_s="$BUDGET_S" --tag=gpu ${EXTRA:-} >> "$LOG" 2>&1
echo "rc=$?" >> "$LOG"
cp /tmp/gpu_compare_runs/compare_results.json "$OUTDIR/" 2>> "$LOG"
tail -30 "$LOG"
