"""A small real segmentation task that runs on a CPU: Fashion-MNIST items pasted on textured
backgrounds (``fashion_seg``).

Each example is a grey ``S x S`` image: a crop of one of scikit-image's bundled photos
(:data:`TEXTURES`: no download) with one to ``max_items`` 28 x 28 Fashion-MNIST items
pasted at random positions (56 px and two items by default; ``configs/segmentation.py``'s
CPU preset: 28 px, one item, filling the image as in pre-training). An item's pixels
brighter than ``threshold`` replace the background; the mask holds ``class + 1`` there
(1 .. 10) and 0 elsewhere, 11 classes in all; a later item covers an earlier one.

Training examples take their items from Fashion-MNIST's train split and their backgrounds
from the left 70 % of each photo; evaluation examples take items from the test split and
backgrounds from the right 30 %, so no evaluation pixel is seen in training. Example ``i``
of a split is a function of ``(seed, split, i)`` alone. numpy only (no TensorFlow, no JAX).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import numpy as np

from lut_jax import errors
from lut_jax.data import idx

TEXTURES = ("brick", "grass", "gravel", "camera", "coins", "moon", "text", "page", "clock",
            "cell")
NUM_CLASSES = 11  # background + the 10 Fashion-MNIST classes
SPLITS = {"train": 0, "test": 1}  # also the Fashion-MNIST split the items come from
TRAIN_FRACTION = 0.7  # of each photo's width, for training backgrounds
ITEM_SIZE = 28


@dataclasses.dataclass(frozen=True)
class Placement:
  """One pasted item: Fashion-MNIST index and class, top-left corner in the image."""

  item: int
  label: int
  top: int
  left: int


@functools.lru_cache(maxsize=1)
def load_textures() -> tuple[np.ndarray, ...]:
  """The background photos as float32 grey arrays in [0, 1]."""
  from skimage import data  # pylint: disable=g-import-not-at-top (optional, heavy)
  return tuple(np.asarray(getattr(data, name)(), np.float32) / 255.0 for name in TEXTURES)


def paste(background: np.ndarray, items: list[tuple[np.ndarray, int, int, int]],
          threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """``background`` (float [0, 1], ``(S, S)``) with ``(item, label, top, left)`` pasted in
  order -> ``(image float32, mask uint8)``: item pixels ``> threshold`` replace the image
  and set the mask to ``label + 1``."""
  image = np.array(background, np.float32)
  mask = np.zeros(image.shape, np.uint8)
  for item, label, top, left in items:
    h, w = item.shape
    fg = item > threshold
    image[top:top + h, left:left + w][fg] = item[fg]
    mask[top:top + h, left:left + w][fg] = label + 1
  return image, mask


def make_example(index: int, *, split: str, seed: int, image_size: int, max_items: int,
                 threshold: float, items: np.ndarray, labels: np.ndarray,
                 ) -> tuple[np.ndarray, np.ndarray, list[Placement]]:
  """Example ``index`` of ``split``: ``(image uint8 (S, S), mask uint8 (S, S), placements)``."""
  rng = np.random.default_rng([seed, SPLITS[split], index])
  textures = load_textures()
  texture = textures[rng.integers(len(textures))]
  height, width = texture.shape
  cut = int(width * TRAIN_FRACTION)
  lo, hi = (0, cut) if split == "train" else (cut, width)
  top = rng.integers(0, height - image_size + 1)
  left = rng.integers(lo, hi - image_size + 1)
  background = texture[top:top + image_size, left:left + image_size]
  placements = []
  for _ in range(rng.integers(1, max_items + 1)):
    item = int(rng.integers(len(items)))
    y, x = rng.integers(0, image_size - ITEM_SIZE + 1, size=2)
    placements.append(Placement(item, int(labels[item]), int(y), int(x)))
  image, mask = paste(background, [(items[p.item] / np.float32(255.0), p.label, p.top, p.left)
                                   for p in placements], threshold)
  return np.round(image * 255.0).astype(np.uint8), mask, placements


def make_split(split: str, num_examples: int, *, seed: int = 0, image_size: int = 56,
               max_items: int = 2, threshold: float = 0.2,
               data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(images uint8 (N, S, S), masks uint8 (N, S, S))``: ``num_examples`` examples of
  ``split`` ("train" or "test"); a DataError for a bad split or size, or Fashion-MNIST or
  scikit-image missing."""
  if split not in SPLITS:
    raise errors.DataError(f"fashion_seg has splits {sorted(SPLITS)}, not {split!r}")
  if image_size < ITEM_SIZE:
    raise errors.DataError(f"fashion_seg images must be at least {ITEM_SIZE} px (an item), "
                           f"got {image_size}")
  if image_size > 172:  # the shortest photo ("text")
    raise errors.DataError(f"fashion_seg images must be at most 172 px, got {image_size}")
  idx_dir = idx.find_fashion_mnist(data_dir, split)
  if idx_dir is None:
    raise errors.DataNotFoundError(
        "fashion_seg needs Fashion-MNIST's idx files (looked in $FASHION_MNIST_DIR, "
        f"input.data_dir and {idx.FASHION_MNIST_DIR})",
        hint="install Debian's dataset-fashion-mnist package or set FASHION_MNIST_DIR")
  if importlib.util.find_spec("skimage") is None:
    raise errors.ConfigError("fashion_seg needs scikit-image (its background photos), "
                             "which is not installed", hint="pip install scikit-image")
  items, labels = idx.load_fashion_mnist(idx_dir, split)
  images = np.empty((num_examples, image_size, image_size), np.uint8)
  masks = np.empty((num_examples, image_size, image_size), np.uint8)
  for i in range(num_examples):
    images[i], masks[i], _ = make_example(i, split=split, seed=seed, image_size=image_size,
                                          max_items=max_items, threshold=threshold,
                                          items=items, labels=labels)
  return images, masks
