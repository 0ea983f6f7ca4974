r"""Host vs device colour augmentation: what each costs the host, and the device.

  python scripts/benchmark_device_augment.py                  # both modes, all cores and 1
  python scripts/benchmark_device_augment.py --seconds=20 --json=device_augment.json

Rows (real JPEGs at 224 px, made as in scripts/benchmark_pipeline.py):
* ``host``: the default pipeline: decode, resize, both views with all colour ops and
  normalisation on the host, float32 batches.
* ``device``: ``input.device_augment = True``: decode, resize, the two crops/flips and view
  2's parameter draws on the host; uint8 crops + packed parameters out. Its colour ops and
  normalisation then run in ``device_augment.finish_batch`` on the accelerator.
* ``finish_batch``: that device-side work, jitted, on a ``--device_batch`` batch on the
  default JAX backend of this machine (CPU here; an accelerator does it far faster), with
  XLA's count of the bytes it moves (bytes / HBM bandwidth: a memory-bound estimate of an
  accelerator's time). On a GPU machine: ``--rows=finish_batch --device_iters=20``.

Each pipeline row runs in a child process pinned to N cores (N = all, and 1) before
TensorFlow starts. The number to plan hosts with is images per CPU-second (examples divided
by the pipeline process's user+system CPU time), which does not depend on what else runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import benchmark_pipeline  # noqa: E402  pylint: disable=g-import-not-at-top
import bench_common  # noqa: E402  pylint: disable=g-import-not-at-top

GPU_IMAGES_PER_S = benchmark_pipeline.GPU_IMAGES_PER_S
HBM_TB_S = 3.35  # H100 SXM HBM3 bandwidth, for the memory-bound estimate of finish_batch


def run_pipeline_row(mode: str, folder: str, batch: int, seconds: float) -> dict:
  """One pipeline row in this (child) process."""
  from lut_jax import config_lib  # pylint: disable=g-import-not-at-top
  from lut_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  # config.input's defaults (lut_jax/config_lib.py) with this row's data and mode.
  config = config_lib.base_config().input
  config.update(dict(
      dataset=f"folder:{folder}", split="train", image_size=224, channels=3,
      batch_size=batch, device_augment=mode == "device"))
  iterator = input_pipeline.create_pretrain_iterator(config, seed=0)
  first = next(iterator)
  out = {"row": mode, "batch": batch,
         "bytes_per_image": sum(v.nbytes for v in first.values()) / batch}
  # pylint: disable-next=protected-access
  out.update(benchmark_pipeline._time_batches(iterator, batch, seconds))
  return out


def run_device_row(batch: int, iters: int, size: int = 224) -> dict:
  """Times jitted ``finish_batch`` on a uint8 batch on the default JAX backend."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lut_jax.data import device_augment  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  # The ops have no data-dependent control flow (vmapped switches compute every branch), so
  # random pixels cost the same as photos.
  crops = lambda: rng.integers(0, 256, (batch, size, size, 3), np.uint8)  # noqa: E731
  params = device_augment.pack_params(device_augment.sample_params(jax.random.key(0), batch))
  raw = jax.device_put({"view1_crop": crops(), "view2_crop": crops(),
                        "view2_params": np.asarray(params)})
  t0 = time.perf_counter()
  fn = jax.jit(device_augment.finish_batch).lower(raw).compile()
  compile_s = time.perf_counter() - t0
  # XLA's own count of the compiled program's memory traffic: the ops are elementwise and
  # memory-bound, so bytes / HBM bandwidth estimates an accelerator's time without one.
  cost = fn.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  jax.block_until_ready(fn(raw))
  times, c0 = [], benchmark_pipeline._cpu_seconds()  # pylint: disable=protected-access
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(raw))
    times.append(time.perf_counter() - t0)
  cpu = benchmark_pipeline._cpu_seconds() - c0  # pylint: disable=protected-access
  return {"row": "finish_batch", "batch": batch, "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "compile_s": compile_s,
          "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
          "xla_flops": float(cost.get("flops", 0.0)),
          "ms_per_batch_median": 1e3 * sorted(times)[len(times) // 2],
          "ms_per_batch_min": 1e3 * min(times),
          "cpu_ms_per_image": 1e3 * cpu / (iters * batch)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default="host,device,finish_batch")
  parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per run")
  parser.add_argument("--num_files", type=int, default=400)
  parser.add_argument("--batch", type=int, default=64, help="pipeline batch")
  parser.add_argument("--device_batch", type=int, default=256)
  parser.add_argument("--device_iters", type=int, default=5)
  parser.add_argument("--json", default="", help="also write the results here")
  parser.add_argument("--child_row", default="", help=argparse.SUPPRESS)
  parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child_row:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.child_row == "finish_batch":
      result = run_device_row(args.device_batch, args.device_iters)
    else:
      result = run_pipeline_row(args.child_row, args.folder, args.batch, args.seconds)
    print("RESULT " + json.dumps(result))
    return

  cores = sorted(os.sched_getaffinity(0))
  header = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "cpu": bench_common.cpu_model(), "cores": len(cores),
      "python": platform.python_version(), "loadavg_1m_start": os.getloadavg()[0]}
  print(json.dumps(header))
  results = {"machine": header, "rows": []}
  rows = args.rows.split(",")
  with tempfile.TemporaryDirectory() as folder:
    if any(r != "finish_batch" for r in rows):
      t0 = time.time()
      kb = benchmark_pipeline.make_jpeg_folder(folder, args.num_files)
      print(f"wrote {args.num_files} JPEGs ({kb:.0f} KB mean) in {time.time() - t0:.1f} s")
    for row in rows:
      counts = [len(cores)] if row == "finish_batch" else sorted({len(cores), 1}, reverse=True)
      for n in counts:
        cmd = [sys.executable, __file__, f"--child_row={row}", f"--folder={folder}",
               f"--seconds={args.seconds}", f"--batch={args.batch}",
               f"--device_batch={args.device_batch}", f"--device_iters={args.device_iters}"]
        result = bench_common.run_pinned_child(cmd, cores, n, row)
        if result is None:
          continue
        results["rows"].append(result)
        if row == "finish_batch":
          print(f"finish_batch           {result['backend']} ({result['device']}), "
                f"{n} cores, batch {result['batch']}: {result['ms_per_batch_median']:.0f} ms "
                f"per batch (min {result['ms_per_batch_min']:.0f}; compile "
                f"{result['compile_s']:.1f} s), {result['cpu_ms_per_image']:.2f} CPU-ms "
                f"per image; XLA: {result['xla_bytes_accessed'] / 1e9:.1f} GB accessed, "
                f"{result['xla_flops'] / 1e9:.1f} GFLOP per batch (at {HBM_TB_S} TB/s: "
                f"~{result['xla_bytes_accessed'] / (HBM_TB_S * 1e12) * 1e3:.1f} ms)")
        else:
          result["cores_per_gpu"] = GPU_IMAGES_PER_S / result["images_per_cpu_s"]
          print(f"{row:22s} cores={n} batch={result['batch']:3d} "
                f"{result['images_per_s']:7.1f} img/s wall (CPU use "
                f"{result['cpu_utilisation']:.2f} cores); "
                f"{result['images_per_cpu_s']:7.1f} img per CPU-s -> "
                f"{result['cores_per_gpu']:5.1f} cores per H100 at {GPU_IMAGES_PER_S:.0f} "
                f"img/s; {result['bytes_per_image'] / 1024:.0f} KiB per image to the device")
  bench_common.finish(results, header["loadavg_1m_start"], args.json)


if __name__ == "__main__":
  main()
