"""Evaluation images without TensorFlow: the eval view in numpy, batches of the data sets
:mod:`lut_jax.data.device_input` reads, and the rule that picks them over tf.data.

The view is ``augment.decode`` then ``augment.eval_view``, step for step: pixels to [0, 1]
(grey repeated for RGB, ITU-R 601 luma for grey), the shorter side to ``S' = int(S /
crop_pct)``, the longer to ``S' * long // short`` (bicubic, antialiased when shrinking,
clipped, not re-quantised), the centre ``S x S`` crop (offsets rounded half to even),
ImageNet normalisation. The paths agree to about 1e-6, not bit for bit, so feature caches
record which one computed them.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
from typing import Any, Iterator, Optional

from absl import logging
import jax
import numpy as np

from lut_jax import errors
from lut_jax.data import device_augment, device_input, folders, idx, image_decode
from lut_jax.data import image_utils, splits

BACKENDS = ("auto", *device_input.BACKENDS)


def backend(dataset: str, requested: str, data_dir: Optional[str] = None) -> str:
  """The path that computes ``dataset``'s evaluation images: ``"device"`` (here, no
  TensorFlow) or ``"tfdata"``. ``requested`` (``input.backend``) decides unless ``"auto"``:
  then Fashion-MNIST's idx files here, any other data set through tf.data when TensorFlow is
  installed (it reads tfds sets such as ImageNet in parallel), else here."""
  if requested not in BACKENDS:
    raise errors.ConfigError(f"unknown input.backend {requested!r}; expected one of {BACKENDS}")
  if requested != "auto":
    return requested
  if dataset == "fashion_mnist" and idx.find_fashion_mnist(data_dir) is not None:
    return "device"
  return "tfdata" if importlib.util.find_spec("tensorflow") else "device"


@functools.lru_cache(maxsize=128)  # a folder's common sizes
def _resize_matrix(size: int, new_size: int) -> np.ndarray:
  """``(new_size, size)`` float32: bicubic resizing of one axis, antialiased when shrinking
  (Keys' kernel, a = -0.5, stretched by the shrink factor, rows summing to 1: TF's and JAX's
  scale-and-translate). Separable: an image resizes with two matrix products."""
  if size == new_size:
    return np.eye(size, dtype=np.float32)
  scale = new_size / size
  centres = (np.arange(new_size) + 0.5) / scale - 0.5  # output pixels in input coordinates
  x = np.abs(centres[:, None] - np.arange(size)[None, :]) / max(1.0 / scale, 1.0)
  weights = np.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1.0,
                     np.where(x < 2.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, 0.0))
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def eval_view(images: np.ndarray, size: int, crop_pct: float, channels: int) -> np.ndarray:
  """uint8 ``(B, H, W, C)`` images of one size -> the normalised float32 eval views
  ``(B, size, size, channels)``; ``crop_pct`` as ``image_utils.eval_crop_pct`` resolves it."""
  x = np.asarray(images, np.float32) / 255.0
  if x.shape[-1] == 1 and channels == 3:
    x = np.repeat(x, 3, axis=-1)
  elif x.shape[-1] == 3 and channels == 1:
    x = (x @ np.asarray(device_augment.GRAY_WEIGHTS, np.float32))[..., None]
  height, width = x.shape[1:3]
  short = int(size / crop_pct)
  new_h, new_w = ((short, short * width // height) if height <= width
                  else (short * height // width, short))
  top, left = round((new_h - size) / 2), round((new_w - size) / 2)
  rows = _resize_matrix(height, new_h)[top:top + size]
  cols = _resize_matrix(width, new_w)[left:left + size]
  view = rows @ x.transpose(0, 3, 1, 2) @ cols.T  # (B, C, S, S): one matrix per plane
  mean, std = image_utils.normalization_constants(channels)
  return (np.clip(view.transpose(0, 2, 3, 1), 0.0, 1.0) - mean) / std


def _open(path: str) -> Optional[np.ndarray]:
  """A folder's file as uint8 HWC (``image_decode``, as both pre-training paths); None if
  it does not decode (the tf.data path leaves those out too)."""
  try:
    image = np.asarray(image_decode.open_image(path))
  except image_decode.DECODE_ERRORS:
    return None
  return image[..., None] if image.ndim == 2 else image


def eval_batches(input_config: Any, split: str, *, batch_size: int,
                 crop_pct: Optional[float] = None,
                 sharding: Optional[jax.sharding.Sharding] = None
                 ) -> Iterator[dict[str, Any]]:
  """``input_pipeline.create_eval_dataset``'s batches without tf.data: ``image``, ``label``
  int32 and ``mask`` (False on padding and undecodable files), every example once in file
  order, the last batch padded; global batches (``sharding``; None: numpy), every process
  reading the whole split. ``split`` may carry example selectors (``train{per_class=:400}``).
  Idx files and tfds splits are read into memory; folders stream, decoded batch by batch."""
  size, channels, dataset = input_config.image_size, input_config.channels, input_config.dataset
  image_utils.check_image_size(size)
  crop_pct = image_utils.eval_crop_pct(size, crop_pct)
  base, _ = splits.select_examples(split, None)
  if dataset.startswith(folders.FOLDER_PREFIX):
    files, labels, description = device_input.folder_files(dataset, base)
    data = None
  else:
    data = device_input.stored_images(dataset, base, input_config.data_dir)
    files, labels, description = [], data.labels, data.description
  order = np.arange(len(labels)) if base == split else splits.select_examples(split, labels)[1]
  if len(order) == 0:
    raise errors.DataError(f"{dataset!r} split {split!r} selects no examples")
  logging.info("Evaluation images of %s without tf.data: %d examples.", description,
               len(order))
  skipped = []
  with concurrent.futures.ThreadPoolExecutor() as pool:  # pillow decodes without the GIL
    for start in range(0, len(order), batch_size):
      ids = order[start:start + batch_size]
      images = (list(data.images[ids]) if data is not None
                else list(pool.map(_open, [files[i] for i in ids])))
      ok = np.arange(batch_size) < len(ids)
      ok[:len(ids)] = [image is not None for image in images]
      skipped += [files[i] for i, good in zip(ids, ok) if not good]
      views = np.zeros((batch_size, size, size, channels), np.float32)
      kept = [images[i] for i in np.flatnonzero(ok)]
      if len({image.shape for image in kept}) == 1:  # one size (in-memory sets): one call
        views[ok] = eval_view(np.stack(kept), size, crop_pct, channels)
      else:
        for i, image in zip(np.flatnonzero(ok), kept):
          views[i] = eval_view(image[None], size, crop_pct, channels)[0]
      batch = {"image": views, "mask": ok, "label": np.where(
          ok, np.pad(labels[ids], (0, batch_size - len(ids))), -1).astype(np.int32)}
      yield batch if sharding is None else {
          k: jax.make_array_from_callback(v.shape, sharding, v.__getitem__)
          for k, v in batch.items()}
  if skipped:
    logging.warning("%s: left out %d files that cannot be decoded as images, e.g. %s",
                    dataset, len(skipped), skipped[:3])
