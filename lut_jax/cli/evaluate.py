r"""Command-line entry point for downstream evaluation: kNN, linear probe, fine-tuning,
robustness, segmentation (:mod:`lut_jax.evaluation.protocols`).

  python -m lut_jax.cli.evaluate --config=configs/knn.py --workdir=runs/fmnist_knn \
      --config.pretrained=runs/fashion_mnist
  python -m lut_jax.cli.evaluate --config=configs/linear_probe.py --workdir=runs/fmnist_lp \
      --config.pretrained=runs/fashion_mnist/encoder
  python -m lut_jax.cli.evaluate --config=configs/finetune.py:dataset=imagenet --workdir=DIR \
      --config.pretrained=DIR_OF_PRETRAINING --config.finetune.batch_size=512

The mode is the config file's. ``--config.pretrained``: a pre-training work directory (the
*online* encoder of its latest checkpoint, or ``pretrained_step``) or an exported encoder.
Rerunning a command resumes (cached features, the latest Orbax checkpoint). Results go to
TensorBoard, the log and ``workdir/<mode>_results.json``. kNN and the linear probe run
without TensorFlow on the data sets that fit in memory (``input.backend``).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from lut_jax import config_lib, errors
from lut_jax.evaluation import protocols
from lut_jax.runtime import host_memory, workdir_lock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]), or a packaged config's name (e.g. fashion_mnist).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with cluster auto-detection.")
flags.mark_flags_as_required(["config", "workdir"])


def evaluate(config, workdir: str) -> dict[str, float]:
  """Runs ``config.mode``'s protocol (``protocols.PROTOCOLS``); returns its result metrics."""
  protocols.validate(config)
  with workdir_lock.WorkdirLock(workdir, enabled=jax.process_index() == 0,
                                kind=workdir_lock.EVALUATION):
    results = protocols.get(config.mode).run(config, workdir)
    # After the run: a run refused for its work directory (another encoder or recipe)
    # leaves the config of the run that is there.
    config_lib.save_config(config, workdir)
    return results


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  mode = _CONFIG.value.mode
  needs = protocols.get(mode).NEEDS_TENSORFLOW
  if needs:
    errors.require("tensorflow", extra="data", purpose=f"lut-eval {mode} ({needs})")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("JAX %s: process %d of %d, %d devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  results = evaluate(_CONFIG.value, _WORKDIR.value)
  print({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()})


def run() -> None:
  """Console-script entry point (``lut-eval``)."""
  host_memory.restart_with_tuned_malloc()  # first: it replaces the process
  sys.argv = config_lib.resolve_config_args(sys.argv)  # packaged configs by name
  errors.run_app(main, prog="lut-eval", uses_tensorflow=True)


if __name__ == "__main__":
  run()
