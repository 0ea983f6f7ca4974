"""Data sources for the input pipelines: tfds datasets, Fashion-MNIST idx files, image folders.

``config.input.dataset`` names the source:

* any tfds image dataset by name (``imagenet2012``, ``cifar10``, ...), read from
  ``config.input.data_dir`` (tfds's default when unset). The dataset must already be
  prepared (``tfds build NAME``); ImageNet needs tfds's manual download;
* ``fashion_mnist``: tfds's prepared copy when there is one, else the idx files of Debian's
  ``dataset-fashion-mnist`` package (:mod:`lut_jax.data.idx`; no network);
* ``folder:/path``: one sub-folder per class (``/path/<class>/**/*.jpg``), or
  ``/path/<split>/<class>/...`` when a sub-folder named like the split exists. Files that
  cannot be decoded are skipped and counted once, when the source is built.

Building a source logs one summary line (name, split, examples, classes, files skipped);
what stops it raises ``errors.DataError`` (``DataNotFoundError``: also a FileNotFoundError).

A source hands each process its *share* of the split (disjoint, covering; sizes differ by at
most one) as elements ``{"image", "label", "id"}``: ``image`` encoded bytes or a uint8 HWC
array (folder files come decoded by :mod:`lut_jax.data.image_decode`, as on the device
path), ``label`` int64 (-1 if the dataset has none), ``id`` an int64 naming the example
whatever the shuffle, process count and read order (its global index, or a hash of tfds's
record id): the input pipeline keys each example's augmentation on it. This module imports
TensorFlow and tfds, never JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from lut_jax import errors
from lut_jax.data import folders, idx, image_decode, splits, tfds_open
from lut_jax.runtime import checkpointing

FOLDER_PREFIX = folders.FOLDER_PREFIX
_HASH_BUCKETS = 2**62  # ids from tfds record names: collisions are vanishingly unlikely


@dataclasses.dataclass(frozen=True)
class Share:
  """One process's part of a split. With ``random_access``, ``read`` maps a position (an
  int64 scalar in ``[0, num_examples)``) to an element (in-memory arrays, file lists), so
  the pipeline permutes and skips for free; else ``read()`` returns a ``tf.data.Dataset``
  of the elements in a fixed order (tfds records)."""

  num_examples: int
  random_access: bool
  read: Callable


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A split of a dataset; ``share(p, n)`` gives process ``p`` of ``n`` its part."""

  name: str  # config.input.dataset
  split: str  # tfds syntax (slices like train[:90%] everywhere)
  num_examples: int  # in the whole split, skipped files left out
  num_classes: int | None  # None: no labels
  num_skipped: int  # files left out: undecodable, or listed twice (folder sources)
  description: str  # where the data comes from, for logs
  _share: Callable[[int, int], Share] = dataclasses.field(repr=False)
  # (reason, count) of what was left out, for the summary line (a directory link that was
  # not followed counts as a link, not as files).
  skipped_by_reason: tuple[tuple[str, int], ...] = ()
  _explain: Callable[[tf.errors.OpError], errors.DataError | None] | None = (
      dataclasses.field(default=None, repr=False))
  # "tfds", "idx" or "folder": two readers of one data set may order its examples apart.
  reader: str = ""

  def share(self, process_index: int, process_count: int) -> Share:
    """This process's disjoint part of the split (all parts together cover it)."""
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return self._share(process_index, process_count)

  def read_error(self, error: tf.errors.OpError) -> errors.DataError | None:
    """The ``DataError`` behind a TensorFlow error raised while reading this source (a
    folder's: naming the files that went bad, from the error's text or else by checking
    every file again); None when the data does not explain it (the caller re-raises)."""
    return self._explain(error) if self._explain is not None else None


def num_examples(input_config) -> int:
  """Examples in ``input_config``'s split, for converting epochs to steps."""
  return source_for(input_config).num_examples


def source_for(input_config) -> DataSource:
  """The ``DataSource`` named by ``config.input`` (dataset, split, data_dir); cached."""
  return get_source(input_config.dataset, input_config.split,
                    input_config.data_dir)


def get_source(dataset: str, split: str, data_dir: str | None = None) -> DataSource:
  """Builds (and caches, so folder validation runs once) the source of ``dataset/split``
  and logs one summary line about it. A DataError for an unknown dataset or split, an
  empty one, a folder without decodable images or unreadable idx files; DataNotFoundError
  for a dataset or folder not on this machine (saying how to get it).
  """
  if not isinstance(dataset, str) or not dataset:
    raise errors.ConfigError(f"input.dataset must be a non-empty string, got {dataset!r}")
  # One cache key however the arguments are passed (lru_cache keys on the call's form).
  return _cached_source(dataset, split, data_dir)


@functools.lru_cache(maxsize=16)
def _cached_source(dataset: str, split: str, data_dir: str | None) -> DataSource:
  if dataset.startswith(FOLDER_PREFIX):
    source = _folder_source(dataset, dataset[len(FOLDER_PREFIX):], split)
  elif dataset == "fashion_mnist":
    source = _fashion_mnist_source(split, data_dir)
  else:
    source = _tfds_source(dataset, split, data_dir)
  if source.num_examples == 0:
    raise _empty_split_error(dataset, split)
  skipped = ", ".join(folders.plural(n, *_SKIP_NOUNS[reason])
                      for reason, n in source.skipped_by_reason if n)
  logging.info("Data set %s, split %r: %d examples, %s; skipped: %s. Read from %s.",
               source.name, source.split, source.num_examples,
               "unlabelled" if source.num_classes is None
               else folders.plural(source.num_classes, "class", "classes"), skipped or "nothing",
               source.description)
  return source


# The reasons of DataSource.skipped_by_reason, as (singular, plural) for the summary line.
_SKIP_NOUNS = {
    "undecodable": ("undecodable file", "undecodable files"),
    "duplicate": ("file listed twice", "files listed twice"),
    "link": ("directory link not followed", "directory links not followed"),
    "unreadable": ("folder that cannot be listed", "folders that cannot be listed"),
}


def _empty_split_error(name: str, split: str) -> errors.DataError:
  return errors.DataError(f"{name!r} split {split!r} selects no examples",
                          hint="check the split's slice (tfds syntax, e.g. 'train[:90%]')")


# ----------------------------------------------------------------------------- splits
def _even_range(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  # Same sizes as tfds.even_splits(drop_remainder=False): the first n % count parts get one
  # more example; every part has at least n // count.
  base, extra = divmod(n, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + (1 if process_index < extra else 0)


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
  builder = tfds_open.prepared_builder(name, data_dir)
  if "image" not in builder.info.features:
    raise errors.DataError(f"tfds dataset {name!r} has no 'image' feature "
                           f"(features: {list(builder.info.features)})")
  try:
    total = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise errors.DataError(f"dataset {name!r} has no split {split!r}; available: "
                           f"{sorted(builder.info.splits)}",
                           hint="tfds slice syntax, e.g. 'train[:90%]'") from e
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
                    f"tfds {name} {builder.info.version} at {builder.data_dir}", share,
                    reader="tfds")


# ----------------------------------------------------------------------------- Fashion-MNIST
def _fashion_mnist_source(split: str, data_dir: str | None) -> DataSource:
  tfds_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
  builder = None
  # Only ask tfds when it may have a copy: its builder warns about missing folders.
  if tf.io.gfile.exists(os.path.join(os.path.expanduser(tfds_dir), "fashion_mnist")):
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    if builder.is_prepared():
      return _tfds_source("fashion_mnist", split, data_dir)
  idx_dir = idx.find_fashion_mnist(data_dir)
  if idx_dir is None:
    raise errors.DataNotFoundError(
        "Fashion-MNIST not found: no prepared tfds copy under "
        f"{builder.data_dir if builder else tfds_dir} and no idx files (train-images-idx3-ubyte.gz, ...) in "
        f"{idx.FASHION_MNIST_DIR}. Install Debian's package (`apt-get install "
        "dataset-fashion-mnist`), set FASHION_MNIST_DIR to a folder with the idx .gz files, "
        "or download it with tfds (`tfds build fashion_mnist`).",
        hint="input.data_dir is searched for the idx files too (directly and in its "
        "fashion-mnist/ sub-folder)")
  sizes = {"train": 60_000, "test": 10_000}
  base, start, stop = splits.slice_split(split, sizes)
  images, labels = idx.load_fashion_mnist(idx_dir, base)
  # Captured once in the read function: 47 MB of uint8 for the train split.
  images_t = tf.constant(images[..., np.newaxis])
  labels_t = tf.constant(labels.astype(np.int64))

  def load(index: tf.Tensor) -> dict:
    return {"image": tf.gather(images_t, index), "label": tf.gather(labels_t, index),
            "id": index}

  share = lambda p, n: _random_access_share(stop - start, start, load, p, n)  # noqa
  return DataSource("fashion_mnist", split, stop - start, 10, 0,
                    f"Fashion-MNIST idx files in {idx_dir} ({base} split)", share,
                    reader="idx")


# ----------------------------------------------------------------------------- folders
def _folder_source(name: str, path: str, split: str) -> DataSource:
  if not path or not tf.io.gfile.isdir(path):
    raise errors.DataNotFoundError(
        f"{name!r}: {path!r} is not a directory",
        hint="expected folder:<folder> with <folder>/<class>/<image> (or "
        "<folder>/<split>/<class>/<image>)")
  base = split.split("[")[0]
  root, train_root = folders.split_folder(name, path, split, isdir=tf.io.gfile.isdir)
  listing = _list_folder(root) if checkpointing.is_url(root) else folders.list_local_folder(root)
  listing.warn(name)
  if train_root is not None:
    names = (_class_names(train_root) if checkpointing.is_url(train_root)
             else folders.local_class_names(train_root))
    folders.follow_classes(listing, names, name, split)
  files, labels = listing.files, listing.labels
  if not files:
    raise errors.DataNotFoundError(
        f"{name!r}: no images ({', '.join(folders.IMAGE_EXTENSIONS)}) in class sub-folders "
        f"of {root}",
        hint="expected <folder>/<class>/<image> (or <folder>/<split>/<class>/<image>)")
  _, start, stop = splits.slice_split(split, {base: len(files)})
  files, labels = files[start:stop], labels[start:stop]
  if not files:
    raise _empty_split_error(name, split)

  ok = _decodable(files)
  skipped = [f for f, good in zip(files, ok) if not good]
  if skipped:
    logging.warning("%s: skipping %d of %d files that cannot be decoded as images, e.g. %s",
                    name, len(skipped), len(files), skipped[:5])
  files = [f for f, good in zip(files, ok) if good]
  labels = [l for l, good in zip(labels, ok) if good]  # noqa: E741
  if not files:
    raise errors.DataError(f"{name!r}: none of the images in {root} could be decoded",
                           hint="the files have image names but are not JPEG, PNG, GIF, "
                           "BMP or WebP images (or are empty)")
  files_t = tf.constant(files)
  labels_t = tf.constant(np.asarray(labels, np.int64))

  def load(index: tf.Tensor) -> dict:
    return {"image": _decode_file(tf.io.read_file(tf.gather(files_t, index))),
            "label": tf.gather(labels_t, index), "id": index}

  def explain(error: tf.errors.OpError) -> errors.DataError | None:
    # The file names come back from the tensor only here, on the error path: no second
    # copy of a large folder's listing is kept for it.
    return _gone_bad_error(name, split, [f.decode() for f in files_t.numpy()], error)

  share = lambda p, n: _random_access_share(len(files), 0, load, p, n)  # noqa
  return DataSource(
      name, split, len(files), len(listing.classes), len(skipped) + len(listing.duplicates),
      f"image folder {root} ({len(listing.classes)} classes)", share,
      skipped_by_reason=(("undecodable", len(skipped)),
                         ("duplicate", len(listing.duplicates)),
                         ("link", len(listing.links)),
                         ("unreadable", len(listing.unreadable))),
      _explain=explain, reader="folder")


def _decode_file(encoded: tf.Tensor) -> tf.Tensor:
  """An image file's bytes -> uint8 ``(H, W, 3)`` by the device path's decoder, so both
  paths read a folder alike; Python in the map's threads (pillow releases the GIL)."""
  image = tf.numpy_function(_decode_rgb, [encoded], tf.uint8, stateful=False)
  image.set_shape([None, None, 3])
  return image


def _decode_rgb(data: bytes | np.ndarray) -> np.ndarray:
  # numpy_function passes a string as bytes inside tf.data, as a 0-d array when eager.
  return image_decode.decode_rgb(data if isinstance(data, bytes) else data.item())


def _class_names(root: str) -> list[str]:
  return sorted(d.rstrip("/") for d in tf.io.gfile.listdir(root)
                if tf.io.gfile.isdir(os.path.join(root, d)))


def _list_folder(root: str) -> folders.Listing:
  """Lists a folder through tf.io.gfile (gs:// and other file systems without links)."""
  classes = _class_names(root)
  listing = folders.Listing(classes)
  for label, cls in enumerate(classes):
    for dirpath, _, filenames in sorted(tf.io.gfile.walk(os.path.join(root, cls))):
      for f in sorted(filenames):
        if f.lower().endswith(folders.IMAGE_EXTENSIONS):
          listing.files.append(os.path.join(dirpath, f))
          listing.labels.append(label)
  return listing


def _gone_bad_error(name: str, split: str, files: list[str],
                    error: tf.errors.OpError) -> errors.DataError | None:
  """A ``DataError`` naming the files of ``files`` behind ``error``, raised while reading
  them after the source was built; None when no file is to blame."""
  if not isinstance(error, (tf.errors.NotFoundError, tf.errors.InvalidArgumentError,
                            tf.errors.DataLossError, tf.errors.PermissionDeniedError,
                            tf.errors.FailedPreconditionError, tf.errors.UnknownError)):
    return None
  # ReadFile names its file; the decoders do not. Of names that contain one another, the
  # longest is the one in the message.
  named = [f for f in files if f in error.message]
  named = [f for f in named if not any(f != g and f in g for g in named)]
  if named:
    bad, ok = named, _decodable(named)
  else:
    logging.warning("%s: a file failed to decode after the data set was checked (%s); "
                    "checking all %d files to find it.", name, type(error).__name__,
                    len(files))
    ok = _decodable(files)
    bad = [f for f, good in zip(files, ok) if not good]
    ok = np.zeros(len(bad), bool)
  if not bad:
    return None
  what = [f"{f} ({_file_problem(f, good)})" for f, good in zip(bad[:3], ok)]
  more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
  return errors.DataError(
      f"{name!r} split {split!r}: {folders.plural(len(bad), 'file', 'files')} that passed the "
      f"start-up check could not be read: {', '.join(what)}{more}",
      hint="restore the file(s) and resume. Removing them changes the examples of every "
      "epoch (the folder is listed and checked once, when the run starts), so a resumed "
      "run would not see the batches an uninterrupted one would")


def _file_problem(path: str, decodes_now: bool) -> str:
  if decodes_now:  # it failed during the run, yet reads fine now
    return "failed to read, but reads again now: a flaky file system?"
  if not tf.io.gfile.exists(path):
    return "missing"
  try:
    size = tf.io.gfile.stat(path).length
  except tf.errors.OpError:
    return "cannot be read"
  return "empty" if size == 0 else "not a decodable image"


def _decodable(files: list[str]) -> np.ndarray:
  """Which files decode to a non-empty image: one parallel decode pass (timed in the log),
  when the source is built, so that the examples per epoch (and the resume arithmetic) are
  fixed and a bad file can never stop training."""
  t0 = time.time()
  ds = tf.data.Dataset.from_tensor_slices((tf.range(len(files), dtype=tf.int64),
                                           tf.constant(files)))

  def check(index, path):
    image = _decode_file(tf.io.read_file(path))
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
