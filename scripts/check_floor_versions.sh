#!/usr/bin/env bash
# Checks the core install's version floors: installs exactly the lowest version setup.py
# allows of every core dependency into a fresh venv, then pre-trains a few steps of the
# embedded default on the device input path, resumes, exports the encoder and reloads it.
# Slow (a full install), so not part of the tests; run it when a floor changes:
#   bash scripts/check_floor_versions.sh [VENV_DIR]      (default: /tmp/lut_jax_floor_venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/lut_jax_floor_venv}
PY=${PYTHON:-python3}
rm -rf "$VENV" && "$PY" -m venv "$VENV"
# ">=" -> "==" for each core requirement; jaxlib pinned beside jax (its own floor moves
# with jax's).
PINS=$("$VENV/bin/python" - <<'PY'
import re, runpy, sys, unittest.mock as mock
with mock.patch("setuptools.setup"):
  setup = runpy.run_path("setup.py")
pins = []
for req in setup["INSTALL_REQUIRES"]:
  name, _, floor = re.match(r"([A-Za-z0-9_.\[\]-]+)\s*(>=)\s*([^,;\s]+)", req).groups()
  pins.append(f"{name}=={floor}")
  if name == "jax":
    pins.append(f"jaxlib=={floor}")
print(" ".join(pins))
PY
)
echo "== floors: $PINS"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $PINS
# Not editable: the check runs the tree as it was at the start.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps .
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE "^(jax|jaxlib|flax|optax|orbax-checkpoint|ml.collections|clu|numpy|absl-py|etils|tensorboardX|safetensors|pillow) "
WORK=$(mktemp -d)
cd "$WORK"  # the installed package and its packaged configs, not the source tree
trap 'rm -rf "$WORK"' EXIT
run() { "$VENV/bin/lut-pretrain" --config=configs/fashion_mnist.py --workdir="$WORK/run" \
          --config.total_steps="$1" --config.optim.warmup_steps=2 --config.log_every_steps=2 \
          --config.checkpoint_every_steps=4 --config.monitor.every_steps=0; }
echo "== pre-training 4 steps, then the same command again (it resumes and finds the run done)"
run 4
run 4
echo "== export and reload"
"$VENV/bin/lut-export" --workdir="$WORK/run" --out="$WORK/export"
"$VENV/bin/python" -c "
from lut_jax.weights import loading
p = loading.load('$WORK/export')
print('reloaded', p.kind, p.config['width'], 'wide, depth', p.config['depth'])"
echo "== floor versions OK"
