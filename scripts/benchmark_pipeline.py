r"""Throughput of the two-view pre-training input pipeline on this host's CPUs.

  python scripts/benchmark_pipeline.py                 # all rows, all cores and one core
  python scripts/benchmark_pipeline.py --seconds=20 --num_files=400

Rows:
* ``jpeg224``: real JPEGs (scikit-image photos, randomly cropped and rescaled to ImageNet-
  like sizes, shorter side ~250-500 px, re-encoded at quality 90 into a temporary folder)
  through the folder source -> decode -> resize -> two views at 224 px -> batches.
* ``jpeg224_decode_resize``: the same files, decode + resize only (what the views cost on
  top of it is the difference).
* ``fmnist28``: Fashion-MNIST idx arrays -> two views at 28 px.

Each row runs in a child process pinned to N cores (``os.sched_setaffinity`` before
TensorFlow starts, so tf.data sizes its thread pool to them): N = all cores and N = 1.
Files are in the page cache after the first pass, so this measures CPU cost, not disk.
Images/s counts examples (each yields both views). The ViT-B/16 LUT step on one H100 eats
about 3500 images/s (docs/benchmarks.md), so the script also prints how many such cores
feed one GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_common
import bench_common  # noqa: E402  pylint: disable=g-import-not-at-top
GPU_IMAGES_PER_S = 3500.0  # ViT-B/16 LUT target step rate on one H100 (images/s)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina", "cat", "colorwheel", "camera")


def make_jpeg_folder(root: str, num_files: int, seed: int = 0) -> float:
  """Writes ``num_files`` JPEGs in 10 class folders; returns the mean file size in KB."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import skimage.data  # pylint: disable=g-import-not-at-top
  import skimage.transform  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  photos = []
  for name in PHOTOS:
    image = getattr(skimage.data, name)()
    photos.append(np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3])
  sizes = []
  for i in range(num_files):
    image = photos[i % len(photos)]
    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(image[y:y + ch, x:x + cw])
    # ImageNet train images: shorter side mostly 300-500 px (mean image ~400 x 350).
    short = rng.uniform(250, 500)
    scale = short / min(ch, cw)
    crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))),
                       Image.BICUBIC)
    folder = os.path.join(root, f"class_{i % 10}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{i:05d}.jpg")
    crop.save(path, quality=90)
    sizes.append(os.path.getsize(path))
  return sum(sizes) / len(sizes) / 1024


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
  return usage.ru_utime + usage.ru_stime


def _time_batches(iterator, batch: int, seconds: float, warmup: int = 3) -> dict:
  """Images per wall-clock second, and per CPU-second this process used.

  The second is the per-core cost whatever else runs on the machine (other jobs steal
  wall-clock time, not CPU time), so it is the number to plan hosts with.
  """
  for _ in range(warmup):
    next(iterator)
  n, t0, c0 = 0, time.perf_counter(), _cpu_seconds()
  while time.perf_counter() - t0 < seconds:
    next(iterator)
    n += batch
  wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
  return {"images_per_s": n / wall, "images_per_cpu_s": n / cpu, "cpu_utilisation": cpu / wall}


def run_row(row: str, folder: str, batch: int, seconds: float) -> dict:
  """Runs one row in this process (the child); returns its measurement."""
  sys.path.insert(0, str(ROOT))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from lut_jax.data import augment  # pylint: disable=g-import-not-at-top
  from lut_jax import config_lib  # pylint: disable=g-import-not-at-top
  from lut_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from lut_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  # config.input's defaults (lut_jax/config_lib.py) with this row's data.
  config = config_lib.base_config().input
  config.update(dict(
      dataset="", split="train", image_size=224, channels=3, batch_size=batch))
  out = {"row": row, "batch": batch}
  if row.startswith("jpeg224"):
    config.dataset, config.split, config.image_size = f"folder:{folder}", "train", 224
    t0 = time.perf_counter()
    source = datasets.source_for(config)  # includes the one-off decode check of every file
    out["validate_images_per_s"] = source.num_examples / (time.perf_counter() - t0)
  else:
    config.dataset, config.split, config.image_size = "fashion_mnist", "train", 28

  if row == "jpeg224_decode_resize":
    share = datasets.source_for(config).share(0, 1)
    ds = tf.data.Dataset.range(share.num_examples).repeat().map(
        lambda i: augment.resize_shorter_side(
            augment.decode(share.read(i)["image"], 3), 224)[:224, :224],
        num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.threading.max_intra_op_parallelism = 1
    ds = ds.batch(batch).prefetch(tf.data.AUTOTUNE).with_options(options)
    out.update(_time_batches(iter(ds), batch, seconds))
  else:
    iterator = input_pipeline.create_pretrain_iterator(config, seed=0)
    out.update(_time_batches(iterator, batch, seconds))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default="jpeg224,jpeg224_decode_resize,fmnist28")
  parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per run")
  parser.add_argument("--num_files", type=int, default=400)
  parser.add_argument("--batch_224", type=int, default=64)
  parser.add_argument("--batch_28", type=int, default=256)
  parser.add_argument("--json", default="", help="also write the results here")
  # Internal: run one row in this (child) process.
  parser.add_argument("--child_row", default="", help=argparse.SUPPRESS)
  parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child_row:
    batch = args.batch_28 if args.child_row == "fmnist28" else args.batch_224
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print("RESULT " + json.dumps(run_row(args.child_row, args.folder, batch, args.seconds)))
    return

  cores = sorted(os.sched_getaffinity(0))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  header = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "cpu": bench_common.cpu_model(), "cores": len(cores), "os_cpu_count": os.cpu_count(),
      "tensorflow": tf.__version__, "python": platform.python_version(),
      # Other work on the machine slows every row: report the load next to the numbers.
      "loadavg_1m_start": os.getloadavg()[0],
  }
  print(json.dumps(header))
  results = {"machine": header, "rows": []}
  with tempfile.TemporaryDirectory() as folder:
    t0 = time.time()
    kb = make_jpeg_folder(folder, args.num_files)
    print(f"wrote {args.num_files} JPEGs ({kb:.0f} KB mean) in {time.time() - t0:.1f} s")
    for row in args.rows.split(","):
      for n in sorted({len(cores), 1}, reverse=True):
        cmd = [sys.executable, __file__, f"--child_row={row}", f"--folder={folder}",
               f"--seconds={args.seconds}", f"--batch_224={args.batch_224}",
               f"--batch_28={args.batch_28}"]
        result = bench_common.run_pinned_child(cmd, cores, n, row)
        if result is None:
          continue
        result["per_core"] = result["images_per_s"] / n
        result["cores_per_gpu"] = GPU_IMAGES_PER_S / result["images_per_cpu_s"]
        results["rows"].append(result)
        print(f"{row:22s} cores={n} batch={result['batch']:3d} "
              f"{result['images_per_s']:7.1f} img/s wall ({result['per_core']:6.1f} per core, "
              f"CPU use {result['cpu_utilisation']:.2f} cores); "
              f"{result['images_per_cpu_s']:7.1f} img per CPU-s -> "
              f"{result['cores_per_gpu']:5.1f} cores per H100 at {GPU_IMAGES_PER_S:.0f} img/s"
              + (f"; file check {result['validate_images_per_s']:.0f} img/s"
                 if "validate_images_per_s" in result else ""))
  bench_common.finish(results, header["loadavg_1m_start"], args.json)


if __name__ == "__main__":
  main()
