r"""Command-line entry point for LUT / MAE pre-training.

  python -m lut_jax.cli.pretrain --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist
  lut-pretrain --config=configs/pretrain.py:variant=B/16 --workdir=gs://bucket/run \
      --config.input.batch_size=2048

Rerunning the same command resumes from the latest checkpoint in ``--workdir``. Errors the
user can fix (config, data, workdir) print one line and exit with status 2; ``--debug``
adds the traceback. Several processes (multi-host GPU or TPU): pass ``--distributed``
(cluster auto-detection) or the explicit ``--coordinator_address/--num_processes/--process_id``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from lut_jax import config_lib, errors
from lut_jax.pretrain import train
from lut_jax.runtime import host_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]), or a packaged config's name (e.g. fashion_mnist).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and config.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with cluster auto-detection.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for explicit multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.")
_ADOPT = flags.DEFINE_bool("adopt_checkpoint", False,
                           "Resume checkpoints that have no config.json beside them (copied "
                           "by hand) with this config, and save it.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  explicit = [f"--{f}" for f in ("num_processes", "process_id") if flags.FLAGS[f].present]
  if explicit and not _COORDINATOR.value:
    # Without a coordinator they would be ignored, and N copies would each train alone.
    raise errors.ConfigError(f"{' and '.join(explicit)} need --coordinator_address",
                             hint="pass --coordinator_address=host:port of process 0, or "
                                  "--distributed for cluster auto-detection")
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  train.pretrain(_CONFIG.value, _WORKDIR.value, adopt_checkpoint=_ADOPT.value)


def run() -> None:
  """Console-script entry point (``lut-pretrain``)."""
  host_memory.restart_with_tuned_malloc()  # first: it replaces the process
  sys.argv = config_lib.resolve_config_args(sys.argv)  # packaged configs by name
  errors.run_app(main, uses_tensorflow=True)


if __name__ == "__main__":
  run()
