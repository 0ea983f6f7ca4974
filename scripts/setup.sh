#!/usr/bin/env bash
# Sets up a fresh machine for lut_jax: the Fashion-MNIST files (Debian package, where apt
# is available) and a virtual environment in .venv with the package installed.
#   scripts/setup.sh        the core (pre-training on the device input path; no TensorFlow)
#   scripts/setup.sh data   plus tf.data pipelines and evaluation (TensorFlow, tfds)
#   scripts/setup.sh test   everything the tests need (data, analysis, PyTorch/timm)
# (also: analysis, torch; see setup.py's extras)
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO=sudo
  echo "== installing Debian's dataset-fashion-mnist"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) \
    || echo "warning: could not install dataset-fashion-mnist; set FASHION_MNIST_DIR to a folder with its idx .gz files"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
EXTRA=""
[ -n "${1:-}" ] && EXTRA="[$1]"
echo "== installing lut_jax$EXTRA into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".$EXTRA"
