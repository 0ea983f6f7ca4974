r"""Pre-training rate with each input path, real data: the tf.data path against the
on-device path (``input.backend``), at the same config and shapes.

  python scripts/benchmark_input_backends.py                # the embedded default
  python scripts/benchmark_input_backends.py --config=configs/fashion_mnist.py:variant=S/4 \
      --batch_size=1024 --steps=200                         # e.g. on a GPU

For each backend: the train step fed by that path's iterator (``train._data_iterator``,
exactly what ``lut-pretrain`` runs), ``--warmup`` steps (compilation included) then
``--steps`` timed steps, ``--repeats`` times; and the data alone (batches produced and
waited for, no step). Prints one table (images/s, median of the repeats) and writes JSON
with ``--json_out``. The synthetic-batch benchmark (scripts/benchmark.py) measures the step
without any input path, for the "real data within 10% of synthetic" comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common

import bench_common  # noqa: E402
from lut_jax import config_lib  # noqa: E402
from lut_jax.pretrain import build, train, train_step
from lut_jax.runtime import host_memory, sharding


def load_config(spec: str, batch_size: int, overrides=()):
  path, _, arg = spec.partition(":")
  namespace: dict = {}
  exec(compile(open(path).read(), path, "exec"), namespace)  # noqa: S102 (a config file)
  config = namespace["get_config"](arg or None).unlock()
  if batch_size:
    config.input.batch_size = batch_size
  config.monitor.every_steps = 0
  return bench_common.apply_overrides(config, overrides)


def measure(config, backend: str, steps: int, warmup: int, repeats: int) -> dict:
  config = config_lib.override(config.copy_and_resolve_references(),
                               {"input.backend": backend})
  build.validate(config)
  mesh = sharding.create_mesh(config.mesh.fsdp)
  training = build.build_training(config, mesh, total_steps=10**6, warmup_steps=10)
  state = training.init(jax.random.key(0))
  data = train._data_iterator(config, start_step=0, mesh=mesh)  # pylint: disable=protected-access
  key = jax.random.key(1)
  step = 0

  def run(n: int, with_step: bool) -> float:
    nonlocal state, step
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
      batch = next(data)
      if with_step:
        state, out = training.step(state, batch, train_step.step_key(key, step))
      else:
        out = batch
      step += 1
    jax.block_until_ready(out)
    return n * config.input.batch_size / (time.perf_counter() - t0)

  run(warmup, True)
  with_step = [run(steps, True) for _ in range(repeats)]
  data_only = [run(steps, False) for _ in range(repeats)]
  return {"backend": backend, "train_images_per_s": statistics.median(with_step),
          "data_images_per_s": statistics.median(data_only), "repeats": with_step}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/fashion_mnist.py")
  parser.add_argument("--batch_size", type=int, default=0, help="0: the config's")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--backends", default="tfdata,device")
  parser.add_argument("--override", action="append", default=[],
                      help="key=value config override, e.g. dtype=bfloat16 (repeatable)")
  parser.add_argument("--json_out", default="")
  args = parser.parse_args()
  config = load_config(args.config, args.batch_size, args.override)
  rows = [measure(config, b, args.steps, args.warmup, args.repeats)
          for b in args.backends.split(",")]
  device = jax.devices()[0]
  info = {"date": datetime.date.today().isoformat(), "config": args.config,
          "batch_size": config.input.batch_size, "overrides": args.override,
          "device": device.device_kind,
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "load_average": os.getloadavg()[0], "rows": rows}
  print(f"{args.config}, batch {config.input.batch_size}, {device.device_kind}, "
        f"{os.cpu_count()} CPUs, load {info['load_average']:.1f}")
  print("| input path | train step + data, images/s | data alone, images/s |")
  print("|---|---:|---:|")
  for r in rows:
    print(f"| {r['backend']} | {r['train_images_per_s']:.0f} | {r['data_images_per_s']:.0f} |")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(info, f, indent=1)


if __name__ == "__main__":
  host_memory.restart_with_tuned_malloc()  # what lut-pretrain runs with
  main()
