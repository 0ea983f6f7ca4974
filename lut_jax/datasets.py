"""Data sources for the input pipelines: tfds datasets, Fashion-MNIST idx files, image folders.

``config.input.dataset`` names the source:

* any tfds image dataset by name (``imagenet2012``, ``cifar10``, ...), read from
  ``config.input.data_dir`` (tfds's default when unset). The dataset must already be
  prepared (``tfds build NAME``); ImageNet needs tfds's manual download;
* ``fashion_mnist``: tfds's prepared copy when there is one, else the idx files of Debian's
  ``dataset-fashion-mnist`` package (parsed here with numpy; no network);
* ``folder:/path``: one sub-folder per class (``/path/<class>/**/*.jpg``), or
  ``/path/<split>/<class>/...`` when a sub-folder named like the split exists. Files that
  cannot be decoded are skipped and counted once, when the source is built.

A source hands each process its *share* of the split (disjoint, covering; sizes differ by at
most one) as elements ``{"image", "label", "id"}``: ``image`` is encoded bytes or a uint8
HWC array (``augment.decode`` takes both), ``label`` int64 (-1 if the dataset has none), and
``id`` an int64 that names the example independently of shuffling, process count and read
order (its global index, or a hash of tfds's record id). The input pipeline keys each
example's augmentation on it.

This module imports TensorFlow and tfds, never JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import time
import types
from typing import Callable

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Debian's dataset-fashion-mnist package; FASHION_MNIST_DIR overrides it.
FASHION_MNIST_IDX_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_HASH_BUCKETS = 2**62  # ids from tfds record names: collisions are vanishingly unlikely


@dataclasses.dataclass(frozen=True)
class Share:
  """One process's part of a split.

  Attributes:
    num_examples: examples in this share.
    random_access: True when ``read`` maps a position to an element (in-memory arrays,
      file lists): the pipeline can then permute positions and skip for free. False when
      ``read()`` returns a ``tf.data.Dataset`` of elements in a fixed order (tfds records).
    read: see ``random_access``. Positions are int64 scalars in ``[0, num_examples)``.
  """

  num_examples: int
  random_access: bool
  read: Callable


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A split of a dataset; ``share(p, n)`` gives process ``p`` of ``n`` its part.

  Attributes:
    name: the ``config.input.dataset`` string.
    split: the split (tfds syntax; slices like ``train[:90%]`` are accepted everywhere).
    num_examples: examples in the whole split (after skipping undecodable files).
    num_classes: label classes, or None when the dataset has no labels.
    num_skipped: files left out because they could not be decoded (folder sources).
    description: where the data comes from, for logs.
  """

  name: str
  split: str
  num_examples: int
  num_classes: int | None
  num_skipped: int
  description: str
  _share: Callable[[int, int], Share] = dataclasses.field(repr=False)

  def share(self, process_index: int, process_count: int) -> Share:
    """This process's disjoint part of the split (all parts together cover it)."""
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return self._share(process_index, process_count)


def num_examples(input_config) -> int:
  """Examples in ``input_config``'s split, for converting epochs to steps."""
  return source_for(input_config).num_examples


def source_for(input_config) -> DataSource:
  """The ``DataSource`` named by ``config.input`` (dataset, split, data_dir); cached."""
  return get_source(input_config.dataset, input_config.split,
                    input_config.get("data_dir", None))


@functools.lru_cache(maxsize=16)
def get_source(dataset: str, split: str, data_dir: str | None = None) -> DataSource:
  """Builds (and caches, so folder validation runs once) the source of ``dataset/split``.

  Raises:
    ValueError: unknown dataset or split.
    FileNotFoundError: a known dataset that is not on this machine; the message says how
      to get it.
  """
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f"input.dataset must be a non-empty string, got {dataset!r}")
  if dataset.startswith(FOLDER_PREFIX):
    return _folder_source(dataset, dataset[len(FOLDER_PREFIX):], split)
  if dataset == "fashion_mnist":
    return _fashion_mnist_source(split, data_dir)
  return _tfds_source(dataset, split, data_dir)


# ----------------------------------------------------------------------------- splits


def _even_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  # Same sizes as tfds.even_splits(drop_remainder=False): the first n % count parts get one
  # more example; every part has at least n // count.
  base, extra = divmod(n, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (1 if process_index < extra else 0)


def _slice_split(split: str, sizes: dict[str, int]) -> tuple[str, int, int]:
  """``"train[:90%]"`` -> ("train", 0, 0.9 * n) with tfds's slicing rules."""
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(
        {k: types.SimpleNamespace(num_examples=v) for k, v in sizes.items()})
  except (ValueError, KeyError, AssertionError, AttributeError) as e:
    raise ValueError(f"bad split {split!r}; available: {sorted(sizes)} (tfds slice syntax, "
                     f"e.g. 'train[:90%]')") from e
  if len(instructions) != 1:
    raise ValueError(f"split {split!r}: only one (sliced) split is supported here")
  inst = instructions[0]
  n = sizes[inst.splitname]
  start = 0 if inst.from_ is None else inst.from_
  stop = n if inst.to is None else inst.to
  return inst.splitname, start, stop


def _random_access_share(n: int, start: int, load: Callable[[tf.Tensor], dict],
                         process_index: int, process_count: int) -> Share:
  """Share of ``n`` indexable examples starting at global index ``start``."""
  lo, hi = _even_range(n, process_index, process_count)
  offset = start + lo

  def read(position: tf.Tensor) -> dict:
    return load(tf.cast(position, tf.int64) + offset)

  return Share(hi - lo, True, read)


# ----------------------------------------------------------------------------- tfds


def _tfds_source(name: str, split: str, data_dir: str | None) -> DataSource:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    # tfds's own message lists every dataset it knows (thousands of lines).
    raise ValueError(
        f"unknown dataset {name!r}: input.dataset must be a tfds image dataset name "
        "(e.g. 'imagenet2012', 'fashion_mnist', 'cifar10'; see `tfds.list_builders()`) or "
        "'folder:/path/to/images' (one sub-folder per class)") from None
  if not builder.is_prepared():
    raise FileNotFoundError(_not_prepared_message(name, builder))
  if "image" not in builder.info.features:
    raise ValueError(f"tfds dataset {name!r} has no 'image' feature "
                     f"(features: {list(builder.info.features)})")
  try:
    total = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f"dataset {name!r} has no split {split!r}; available: "
                     f"{sorted(builder.info.splits)}") from e
  has_label = "label" in builder.info.features
  num_classes = builder.info.features["label"].num_classes if has_label else None

  def to_element(example: dict) -> dict:
    label = (tf.cast(example["label"], tf.int64) if has_label
             else tf.constant(-1, tf.int64))
    return {"image": example["image"], "label": label,
            "id": tf.strings.to_hash_bucket_fast(example["tfds_id"], _HASH_BUCKETS)}

  def share(process_index: int, process_count: int) -> Share:
    sub = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)

    def read() -> tf.data.Dataset:
      # Files in a fixed order: the per-epoch shuffle happens in the pipeline, seeded, so
      # that the stream is reproducible. Images stay encoded until after the resume skip.
      ds = builder.as_dataset(
          split=sub, shuffle_files=False,
          decoders={"image": tfds.decode.SkipDecoding()},
          read_config=tfds.ReadConfig(add_tfds_id=True))
      return ds.map(to_element, num_parallel_calls=tf.data.AUTOTUNE)

    return Share(builder.info.splits[sub].num_examples, False, read)

  return DataSource(name, split, total, num_classes, 0,
                    f"tfds {name} {builder.info.version} at {builder.data_dir}", share)


def _not_prepared_message(name: str, builder) -> str:
  if name.startswith("imagenet2012"):
    return (
        f"ImageNet ({name}) is not prepared under {builder.data_dir}. It needs tfds's "
        "manual download: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
        "image-net.org, put them in <data_dir>/downloads/manual/, then run "
        f"`tfds build {name} --data_dir=<data_dir>` (or pass input.data_dir). "
        "Alternatively point input.dataset at an image folder: 'folder:/path/to/train_dir'.")
  return (f"tfds dataset {name!r} is not prepared under {builder.data_dir}; run "
          f"`tfds build {name} --data_dir=<data_dir>` on a machine with internet access and "
          "set input.data_dir to that directory.")


# ----------------------------------------------------------------------------- Fashion-MNIST


def _fashion_mnist_source(split: str, data_dir: str | None) -> DataSource:
  tfds_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
  builder = None
  # Only ask tfds when it may have a copy: its builder warns about missing folders.
  if tf.io.gfile.exists(os.path.join(os.path.expanduser(tfds_dir), "fashion_mnist")):
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    if builder.is_prepared():
      return _tfds_source("fashion_mnist", split, data_dir)
  idx_dir = _find_fashion_mnist_idx(data_dir)
  if idx_dir is None:
    raise FileNotFoundError(
        "Fashion-MNIST not found: no prepared tfds copy under "
        f"{builder.data_dir if builder else tfds_dir} and no idx files (train-images-idx3-ubyte.gz, ...) in "
        f"{FASHION_MNIST_IDX_DIR}. Install Debian's package (`apt-get install "
        "dataset-fashion-mnist`), set FASHION_MNIST_DIR to a folder with the idx .gz files, "
        "or download it with tfds (`tfds build fashion_mnist`).")
  sizes = {"train": 60_000, "test": 10_000}
  base, start, stop = _slice_split(split, sizes)
  images, labels = load_fashion_mnist_idx(idx_dir, base)
  # Captured once in the read function: 47 MB of uint8 for the train split.
  images_t = tf.constant(images[..., np.newaxis])
  labels_t = tf.constant(labels.astype(np.int64))

  def load(index: tf.Tensor) -> dict:
    return {"image": tf.gather(images_t, index), "label": tf.gather(labels_t, index),
            "id": index}

  share = lambda p, n: _random_access_share(stop - start, start, load, p, n)  # noqa
  return DataSource("fashion_mnist", split, stop - start, 10, 0,
                    f"Fashion-MNIST idx files in {idx_dir} ({base} split)", share)


def _find_fashion_mnist_idx(data_dir: str | None) -> str | None:
  candidates = [os.environ.get("FASHION_MNIST_DIR")]
  if data_dir:
    candidates += [data_dir, os.path.join(data_dir, "fashion-mnist")]
  candidates.append(FASHION_MNIST_IDX_DIR)
  for d in filter(None, candidates):
    if all(os.path.exists(os.path.join(d, f)) for f in _FASHION_MNIST_FILES["train"]):
      return d
  return None


@functools.lru_cache(maxsize=2)
def load_fashion_mnist_idx(idx_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split of the idx files: ``(images uint8 [N, 28, 28], labels uint8 [N])``."""
  image_file, label_file = _FASHION_MNIST_FILES[split]
  images = _read_idx(os.path.join(idx_dir, image_file), expected_magic=2051)
  labels = _read_idx(os.path.join(idx_dir, label_file), expected_magic=2049)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{idx_dir}: {images.shape[0]} images but {labels.shape[0]} labels")
  return images, labels


def _read_idx(path: str, expected_magic: int) -> np.ndarray:
  # idx format: big-endian int32 magic (0x08 = uint8 data, low byte = number of dims),
  # then one big-endian int32 per dimension, then the raw data.
  with gzip.open(path, "rb") as f:
    data = f.read()
  magic = int.from_bytes(data[:4], "big")
  if magic != expected_magic:
    raise ValueError(f"{path}: bad idx magic {magic:#x}, expected {expected_magic:#x}")
  ndim = magic & 0xFF
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(dims)):
    raise ValueError(f"{path}: {array.size} bytes of data for shape {dims}")
  return array.reshape(dims)


# ----------------------------------------------------------------------------- folders


def _folder_source(name: str, path: str, split: str) -> DataSource:
  if not path or not tf.io.gfile.isdir(path):
    raise FileNotFoundError(f"{name!r}: {path!r} is not a directory")
  base = split.split("[")[0]
  root = path
  if base and tf.io.gfile.isdir(os.path.join(path, base)):
    root = os.path.join(path, base)
  elif base != "train":
    # No <split> sub-folder: the whole folder serves as this split. Fine for training, but
    # an evaluation on it would reuse the training images, so say so.
    logging.warning("%s: no sub-folder %r; using the whole folder as split %r", name, base,
                    split)
  classes = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root)
                   if tf.io.gfile.isdir(os.path.join(root, d)))
  files, labels = [], []
  for label, cls in enumerate(classes):
    for dirpath, _, filenames in sorted(tf.io.gfile.walk(os.path.join(root, cls))):
      for f in sorted(filenames):
        if f.lower().endswith(IMAGE_EXTENSIONS):
          files.append(os.path.join(dirpath, f))
          labels.append(label)
  if not files:
    raise FileNotFoundError(
        f"{name!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders of {root}; "
        "expected <folder>/<class>/<image> (or <folder>/<split>/<class>/<image>)")
  _, start, stop = _slice_split(split, {base: len(files)})
  files, labels = files[start:stop], labels[start:stop]

  ok = _decodable(files)
  skipped = [f for f, good in zip(files, ok) if not good]
  if skipped:
    logging.warning("%s: skipping %d of %d files that cannot be decoded as images, e.g. %s",
                    name, len(skipped), len(files), skipped[:5])
  files = [f for f, good in zip(files, ok) if good]
  labels = [l for l, good in zip(labels, ok) if good]  # noqa: E741
  if not files:
    raise ValueError(f"{name!r}: none of the images in {root} could be decoded")
  files_t = tf.constant(files)
  labels_t = tf.constant(np.asarray(labels, np.int64))

  def load(index: tf.Tensor) -> dict:
    return {"image": tf.io.read_file(tf.gather(files_t, index)),
            "label": tf.gather(labels_t, index), "id": index}

  share = lambda p, n: _random_access_share(len(files), 0, load, p, n)  # noqa
  return DataSource(name, split, len(files), len(classes), len(skipped),
                    f"image folder {root} ({len(classes)} classes)", share)


def _decodable(files: list[str]) -> np.ndarray:
  """Which files decode to a non-empty image: one parallel decode pass over all of them.

  Done once when the source is built, so that the examples per epoch (and the resume
  arithmetic) are fixed and a bad file can never stop training. It costs one full decode of
  the folder (roughly 1-5 ms per ImageNet-sized JPEG and core), logged below.
  """
  t0 = time.time()
  ds = tf.data.Dataset.from_tensor_slices((tf.range(len(files), dtype=tf.int64),
                                           tf.constant(files)))

  def check(index, path):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    shape = tf.shape(image)
    return index, tf.logical_and(shape[0] > 0, shape[1] > 0)

  ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors()  # an undecodable file raises inside the map: drop that element
  ok = np.zeros(len(files), bool)
  for index, good in ds.as_numpy_iterator():
    ok[index] = good
  logging.info("Checked %d image files in %.1f s: %d undecodable.", len(files),
               time.time() - t0, int((~ok).sum()))
  return ok
