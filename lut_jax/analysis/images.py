"""Evaluation images for the analyses: Fashion-MNIST idx files, a folder, or skimage photos.

Images are read as float32 ``[0, 1]`` HWC arrays at their own size, then :func:`prepare`
brings them to a model's input: grey/RGB conversion, resize of the shorter side (bicubic)
and centre crop, and the training pipeline's normalisation (ImageNet mean/std, see
:mod:`lut_jax.data.image_utils`). Plain numpy + PIL: no TensorFlow.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from lut_jax.data import idx, image_utils

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Photos bundled with scikit-image (no download needed).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry",
                  "hubble_deep_field", "coins")
# ITU-R 601 luma, as lut_jax.data.augment (PIL "L").
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


def fashion_mnist(num_images: int) -> tuple[list[np.ndarray], np.ndarray]:
  """The first ``num_images`` test images: ``([28x28x1 float], int64 labels)``, from
  ``$FASHION_MNIST_DIR`` or Debian's package location (see :mod:`lut_jax.data.idx`)."""
  directory = idx.find_fashion_mnist(split="test") or idx.FASHION_MNIST_DIR
  images, labels = idx.load_fashion_mnist(directory, "test")
  return ([im[..., None].astype(np.float32) / 255.0 for im in images[:num_images]],
          labels[:num_images].astype(np.int64))


def folder(directory: str, num_images: int) -> list[np.ndarray]:
  """The first ``num_images`` decodable images under ``directory`` (sorted, recursive)."""
  files = sorted(os.path.join(root, f) for root, _, names in os.walk(directory)
                 for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
  out = []
  for path in files:
    if len(out) == num_images:
      break
    try:
      with Image.open(path) as im:
        out.append(np.asarray(im.convert("RGB"), np.float32) / 255.0)
    except OSError:  # unreadable file: skip it, as the training pipeline does
      continue
  if not out:
    raise FileNotFoundError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) in {directory}")
  return out


def skimage_photos(num_images: int) -> list[np.ndarray]:
  """Up to ``num_images`` of scikit-image's bundled photos (cycled if more are asked)."""
  import skimage.data  # local: only this source needs scikit-image

  out = []
  for i in range(num_images):
    im = np.asarray(getattr(skimage.data, SKIMAGE_PHOTOS[i % len(SKIMAGE_PHOTOS)])())
    im = im.astype(np.float32) / 255.0
    out.append(im[..., None] if im.ndim == 2 else im[..., :3])
  return out


def load(source: str, num_images: int) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
  """``source``: ``"fashion_mnist"``, ``"skimage"`` or a directory. Returns the raw images
  and, for Fashion-MNIST, their labels (else ``None``)."""
  if source == "fashion_mnist":
    return fashion_mnist(num_images)
  if source == "skimage":
    return skimage_photos(num_images), None
  if os.path.isdir(source):
    return folder(source, num_images), None
  raise ValueError(f"unknown image source {source!r}: expected 'fashion_mnist', 'skimage' "
                   "or a directory of images")


def _resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  if min(h, w) != size:
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    # PIL resizes float images one channel at a time ("F" mode), bicubic with antialiasing
    # as the training pipeline's resize.
    image = np.stack([np.asarray(Image.fromarray(image[..., c]).resize(
        (new_w, new_h), Image.Resampling.BICUBIC)) for c in range(image.shape[-1])], axis=-1)
    h, w = new_h, new_w
  top, left = (h - size) // 2, (w - size) // 2
  return np.clip(image[top:top + size, left:left + size], 0.0, 1.0)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """HWC image with 1 or 3 channels -> ``channels`` (grey replicated; RGB to luma)."""
  have = image.shape[-1]
  if have == channels:
    return image
  if channels == 3 and have == 1:
    return np.repeat(image, 3, axis=-1)
  if channels == 1 and have == 3:
    return (image @ GRAY_WEIGHTS)[..., None]
  raise ValueError(f"cannot convert {have} channels to {channels}")


def prepare(images: list[np.ndarray], image_size: int, channels: int) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
  """``(normalised (N, S, S, C) float32, display (N, S, S, C) in [0, 1])``."""
  display = np.stack([_resize_center_crop(to_channels(np.asarray(im, np.float32), channels),
                                          image_size) for im in images]).astype(np.float32)
  mean, std = image_utils.normalization_constants(channels)
  return (display - mean) / std, display


def batches(x: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """``(chunk, n)`` over ``x`` in order; the last chunk is padded (repeating its last
  image) to ``batch_size`` when ``x`` has more than one chunk, so a jitted function sees a
  single shape. Use the first ``n`` results of each chunk."""
  size = min(batch_size, len(x))
  for start in range(0, len(x), size):
    chunk = x[start:start + size]
    n = len(chunk)
    if n < size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
    yield chunk, n
