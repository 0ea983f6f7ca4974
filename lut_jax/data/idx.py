"""Fashion-MNIST's idx files (Debian's ``dataset-fashion-mnist`` package), read with numpy.

The one reader of the format, for the training data (:mod:`lut_jax.data.datasets`) and the
analyses (:mod:`lut_jax.analysis.images`). It imports neither TensorFlow nor JAX.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib

import numpy as np

from lut_jax import errors

# Debian's package; the FASHION_MNIST_DIR environment variable overrides it.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_IMAGES_MAGIC, _LABELS_MAGIC = 0x0803, 0x0801  # uint8 data; 3 and 1 dimensions
_INSTALL_HINT = ("install Debian's package (`apt-get install dataset-fashion-mnist`) or set "
                 "FASHION_MNIST_DIR to a folder with the idx .gz files")
_DAMAGED_HINT = ("the Fashion-MNIST idx files are damaged or mixed up: reinstall "
                 "dataset-fashion-mnist or point FASHION_MNIST_DIR at good copies")


def find_fashion_mnist(data_dir: str | None = None, split: str = "train") -> str | None:
  """The first folder holding ``split``'s idx files: ``$FASHION_MNIST_DIR``, ``data_dir``,
  ``data_dir/fashion-mnist``, then Debian's location; None when none has them."""
  candidates = [os.environ.get("FASHION_MNIST_DIR")]
  if data_dir:
    candidates += [data_dir, os.path.join(data_dir, "fashion-mnist")]
  candidates.append(FASHION_MNIST_DIR)
  for d in filter(None, candidates):
    if all(os.path.exists(os.path.join(d, f)) for f in FASHION_MNIST_FILES[split]):
      return d
  return None


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(idx_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """One split of the idx files in ``idx_dir``: ``(images uint8 [N, 28, 28], labels uint8
  [N])``, read-only. A missing or damaged file is an ``errors.DataError`` naming it."""
  image_file, label_file = FASHION_MNIST_FILES[split]
  images = read(os.path.join(idx_dir, image_file), _IMAGES_MAGIC)
  labels = read(os.path.join(idx_dir, label_file), _LABELS_MAGIC)
  if images.shape[0] != labels.shape[0]:
    raise errors.DataError(f"{idx_dir}: {images.shape[0]} images but {labels.shape[0]} "
                           "labels", hint=_DAMAGED_HINT)
  return images, labels


def read(path: str, expected_magic: int) -> np.ndarray:
  """A gzipped idx file: big-endian int32 magic (0x08 = uint8 data, low byte = number of
  dimensions), one big-endian int32 per dimension, then the data."""
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip, or cut short
    raise errors.DataError(f"{path}: not a valid gzip file ({e})", hint=_DAMAGED_HINT) from e
  except FileNotFoundError as e:
    raise errors.DataNotFoundError(f"Fashion-MNIST file not found: {path}",
                                   hint=_INSTALL_HINT) from e
  except OSError as e:
    raise errors.DataError(errors.describe_os_error(e, "reading Fashion-MNIST")) from e
  magic = int.from_bytes(data[:4], "big")
  if magic != expected_magic:
    raise errors.DataError(f"{path}: bad idx magic {magic:#x}, expected "
                           f"{expected_magic:#x}", hint=_DAMAGED_HINT)
  ndim = magic & 0xFF
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  array = np.frombuffer(data, dtype=np.uint8, offset=min(len(data), 4 + 4 * ndim))
  if array.size != int(np.prod(dims)):
    raise errors.DataError(f"{path}: {array.size} bytes of data for shape {dims}",
                           hint=_DAMAGED_HINT)
  return array.reshape(dims)
