r"""Writes scikit-learn's handwritten digits as a ``folder:`` data set at 28 px.

  pip download scikit-learn --no-deps -d /tmp/sklearn      # or have scikit-learn installed
  python scripts/digits_folder.py --out=data/digits28 --sklearn_wheel=/tmp/sklearn/*.whl
  python scripts/compare_lut_mae.py --set=input.dataset=folder:data/digits28 ...

A small data set whose classes a mirror image changes (a flipped 2 or 7 is no digit; the
raw-pixel kNN of mirrored queries falls from ~98% to ~36%), unlike Fashion-MNIST's: the
stand-in for digit- and text-like data in docs/results.md. The 1,797 8x8 images (16 grey
levels, 10 classes) are scaled to 0-255 and resized bicubic to 28 px; per class, the first
``--train_per_class`` in file order go to ``train/<digit>/``, the rest (~40 per class) to
``test/<digit>/``. Without scikit-learn installed, ``--sklearn_wheel`` reads the same file
from its wheel (no install needed).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import os
import zipfile

import numpy as np
from PIL import Image

_MEMBER = "sklearn/datasets/data/digits.csv.gz"


def load_digits(wheel: str = "") -> tuple[np.ndarray, np.ndarray]:
  """``(images float (N, 8, 8) in 0..16, labels int (N,))`` in scikit-learn's file order."""
  if wheel:
    paths = glob.glob(wheel)
    if len(paths) != 1:
      raise SystemExit(f"digits_folder.py: --sklearn_wheel {wheel!r} matches {len(paths)} "
                       "files; expected one scikit-learn wheel")
    with zipfile.ZipFile(paths[0]) as z:
      text = gzip.decompress(z.read(_MEMBER))
    data = np.loadtxt(io.BytesIO(text), delimiter=",")
  else:
    try:
      from sklearn import datasets  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise SystemExit("digits_folder.py: install scikit-learn or pass --sklearn_wheel "
                       "(pip download scikit-learn --no-deps)") from None
    bunch = datasets.load_digits()
    data = np.concatenate([bunch.data, bunch.target[:, None]], axis=1)
  return data[:, :64].reshape(-1, 8, 8), data[:, 64].astype(np.int64)


def write_folder(images: np.ndarray, labels: np.ndarray, out: str, *, size: int = 28,
                 train_per_class: int = 140) -> dict[str, int]:
  """Writes the PNGs; returns the number of images per split."""
  counts = {"train": 0, "test": 0}
  seen = np.zeros(10, np.int64)
  for i, (image, label) in enumerate(zip(images, labels)):
    split = "train" if seen[label] < train_per_class else "test"
    seen[label] += 1
    folder = os.path.join(out, split, str(label))
    os.makedirs(folder, exist_ok=True)
    grey = Image.fromarray(np.round(image * 255 / 16).astype(np.uint8))
    grey.resize((size, size), Image.BICUBIC).save(os.path.join(folder, f"{i:04d}.png"))
    counts[split] += 1
  return counts


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--sklearn_wheel", default="", help="a scikit-learn wheel (glob)")
  parser.add_argument("--size", type=int, default=28)
  parser.add_argument("--train_per_class", type=int, default=140)
  args = parser.parse_args(argv)
  if os.path.exists(args.out) and os.listdir(args.out):
    raise SystemExit(f"digits_folder.py: --out {args.out} is not empty")
  images, labels = load_digits(args.sklearn_wheel)
  counts = write_folder(images, labels, args.out, size=args.size,
                        train_per_class=args.train_per_class)
  print(f"{args.out}: {counts['train']} train, {counts['test']} test images of 10 digits "
        f"at {args.size} px")


if __name__ == "__main__":
  main()
