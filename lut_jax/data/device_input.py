"""The on-device input path (``input.backend = "device"``): the split lives in accelerator
memory and a jitted function of ``(seed, step)`` makes each batch's two views there.

For data sets that fit in device memory (Fashion-MNIST, CIFAR-sized tfds splits, small
local image folders): the images are decoded once to uint8 and replicated on every device;
each step gathers its examples and builds both views without the host (no tf.data, no
TensorFlow). The recipe is the tf.data path's (lut_jax/data/augment.py, after the
reference): view 1 takes 4 px reflect padding, a random ``S x S`` crop and a horizontal flip
with p 0.5; view 2 the same geometry drawn independently, then the colour ops of
:mod:`lut_jax.data.device_augment`; both ImageNet normalisation. Images not at
``input.image_size`` are resized once, when loaded (shorter side bicubic, centre crop).

Order: epoch ``e`` visits the split in a permutation keyed by ``(seed, e)``; step ``k`` takes
positions ``[j*B, (j+1)*B)`` of epoch ``k // steps_per_epoch`` (``j`` its remainder), each
example's draws keyed by ``(seed, epoch, example index)``. So a batch is a function of
``(seed, step)``: a resumed run sees an uninterrupted one's batches on any mesh. The split
is replicated, not sharded, so gathering a batch needs no communication (sharding would
need an all-to-all per step). The tf.data path draws from TensorFlow's generators: the two
paths give different (equally distributed) batches for the same seed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Iterator

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from lut_jax import errors
from lut_jax.data import device_augment, folders, idx, image_decode, image_utils, splits
from lut_jax.runtime import sharding

BACKENDS = ("tfdata", "device")
PADDING = 4  # reflect padding before the random crop (reference: RandomCrop(padding=4))
# Keeps this path's random streams apart from anything else keyed on the same seed.
_SEED_SALT = 0x4C555444  # "LUTD" (fold_in takes 32 bits)


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class Split:
  """A split in host memory: ``images`` uint8 ``(N, S, S, C)``, ``labels`` int32 ``(N,)``
  (-1 where the data set has none), and where it came from."""

  images: np.ndarray
  labels: np.ndarray
  description: str

  @property
  def num_examples(self) -> int:
    return int(self.images.shape[0])

  @functools.cached_property
  def fingerprint(self) -> str:
    """SHA-256 of the examples and labels in their order: what a step's batch is drawn
    from, wherever the files live."""
    digest = hashlib.sha256(str(self.images.shape).encode())
    digest.update(np.ascontiguousarray(self.images).data)
    digest.update(np.ascontiguousarray(self.labels).data)
    return digest.hexdigest()


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 NHWC of one shape -> shorter side ``size`` (bicubic, antialiased), centre
  ``size x size`` crop, uint8. Once per split, in chunks to bound host memory."""
  _, height, width, channels = images.shape
  if (height, width) == (size, size):
    return images
  scale = size / min(height, width)
  new_h, new_w = max(size, int(height * scale)), max(size, int(width * scale))
  top, left = round((new_h - size) / 2), round((new_w - size) / 2)
  resize = jax.jit(lambda x: jnp.clip(jnp.round(jax.image.resize(
      x.astype(jnp.float32), (x.shape[0], new_h, new_w, channels), "cubic", antialias=True)),
      0, 255).astype(jnp.uint8)[:, top:top + size, left:left + size])
  chunks = [np.asarray(resize(images[i:i + 4096])) for i in range(0, len(images), 4096)]
  return np.concatenate(chunks)


def _fashion_mnist(split: str, data_dir: str | None) -> Split:
  base, start, stop = splits.slice_split(split, {"train": 60_000, "test": 10_000})
  idx_dir = idx.find_fashion_mnist(data_dir, base)
  if idx_dir is None:
    raise errors.DataNotFoundError(
        f"Fashion-MNIST idx files not found (looked in $FASHION_MNIST_DIR, input.data_dir "
        f"and {idx.FASHION_MNIST_DIR})",
        hint="install Debian's dataset-fashion-mnist package or set FASHION_MNIST_DIR")
  images, labels = idx.load_fashion_mnist(idx_dir, base)
  return Split(images[start:stop, :, :, None], labels[start:stop].astype(np.int32),
               f"Fashion-MNIST idx files in {idx_dir} ({split})")


def _resize_one(image: Any, size: int) -> Any:
  """A PIL image -> shorter side ``size`` (bicubic; pillow antialiases when shrinking), then
  the centre ``size x size`` crop: :func:`_resize`'s arithmetic, for images of any size."""
  from PIL import Image  # local: only folders need it

  width, height = image.size
  if (height, width) == (size, size):
    return image
  scale = size / min(height, width)
  new_h, new_w = max(size, int(height * scale)), max(size, int(width * scale))
  top, left = round((new_h - size) / 2), round((new_w - size) / 2)
  return image.resize((new_w, new_h), Image.Resampling.BICUBIC).crop(
      (left, top, left + size, top + size))


def folder_files(name: str, split: str) -> tuple[list[str], np.ndarray, str]:
  """The files and labels of a local image folder's split (``<folder>/<class>/**/<image>``,
  or ``<folder>/<split>/<class>/...`` when a sub-folder named like the split exists, as on
  the tf.data path), and a description for logs."""
  root = name[len(folders.FOLDER_PREFIX):]
  if not os.path.isdir(root):
    raise errors.DataNotFoundError(
        f"{name!r}: {root!r} is not a local directory",
        hint="expected folder:<folder> with <folder>/<class>/<image>; folders on object "
             "stores (gs://) need input.backend='tfdata'")
  base = split.split("[")[0]
  root, train_root = folders.split_folder(name, root, split)
  listing = folders.list_local_folder(root)
  listing.warn(name)
  if train_root is not None:
    folders.follow_classes(listing, folders.local_class_names(train_root), name, split)
  _, start, stop = splits.slice_split(split, {base: len(listing.files)})
  return (listing.files[start:stop], np.asarray(listing.labels[start:stop], np.int32),
          f"image folder {root} ({len(listing.classes)} classes, {split})")


def _folder(name: str, split: str, image_size: int) -> Split:
  """:func:`folder_files` decoded by :mod:`lut_jax.data.image_decode` (as on the tf.data
  path; files that do not decode are skipped with one warning), each image resized at load
  time (shorter side to ``image_size``, bicubic, centre crop)."""
  files, all_labels, description = folder_files(name, split)
  images, labels, skipped, grey = [], [], [], True
  for path, label in zip(files, all_labels):
    try:
      image = image_decode.open_image(path)
    except image_decode.DECODE_ERRORS:
      skipped.append(path)
      continue
    grey = grey and image.mode == "L"
    images.append(np.asarray(_resize_one(image, image_size).convert("RGB"), np.uint8))
    labels.append(label)
  if skipped:
    logging.warning("%s: skipped %d files that cannot be decoded as images, e.g. %s", name,
                    len(skipped), skipped[:3])
  if not images:
    raise errors.DataNotFoundError(
        f"{name!r} split {split!r}: no decodable images in {description}",
        hint="expected <folder>/<class>/<image> (or <folder>/<split>/<class>/<image>)")
  stacked = np.stack(images)
  if grey:  # every file was single-channel: keep one channel (views add the rest)
    stacked = stacked[..., :1]
  return Split(stacked, np.asarray(labels, np.int32), description)


def _tfds(name: str, split: str, data_dir: str | None) -> Split:
  """Any prepared tfds split in a random-access format, read without TensorFlow."""
  try:
    from lut_jax.data import tfds_open  # optional: tensorflow_datasets
  except ImportError:
    raise errors.DataError(
        f"input.backend='device' reads {name!r} through tensorflow_datasets, which is not "
        "installed", hint="pip install tensorflow-datasets, or use fashion_mnist") from None
  builder = tfds_open.prepared_builder(name, data_dir, random_access=True)
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # noqa: BLE001  tfds raises many kinds; all mean "cannot read"
    raise errors.DataError(
        f"cannot read tfds {name!r} split {split!r} without TensorFlow: {e}".split("\n")[0],
        hint="tfds.data_source needs the data set prepared in array_record format (tfds "
             "build --file_format=array_record); or use input.backend='tfdata'") from None
  records = [source[i] for i in range(len(source))]
  shapes = {np.shape(r["image"]) for r in records}
  if len(shapes) != 1:
    raise errors.DataError(
        f"tfds {name!r} split {split!r} has images of {len(shapes)} different sizes; the "
        "device path needs one size", hint="use input.backend='tfdata'")
  labels = np.asarray([r.get("label", -1) for r in records], np.int32)
  return Split(np.stack([np.asarray(r["image"], np.uint8) for r in records]), labels,
               f"tfds {name} ({split}) via tfds.data_source")


def stored_images(dataset: str, split: str, data_dir: str | None) -> Split:
  """Fashion-MNIST's idx files or a tfds split (images of one size; tfds images are HWC), NHWC
  at their stored size."""
  if dataset == "fashion_mnist":
    return _fashion_mnist(split, data_dir)
  return _tfds(dataset, split, data_dir)


def load_split(input_config: Any, split: str | None = None) -> Split:
  """See :func:`_load_split` (cached: the loop and the monitor ask for the same splits)."""
  return _load_split(input_config.dataset, split or input_config.split,
                     input_config.data_dir, input_config.image_size,
                     input_config.channels)


@functools.lru_cache(maxsize=8)
def _load_split(dataset: str, split: str, data_dir: str | None, image_size: int,
                channels: int) -> Split:
  """:func:`_read_split`, then the examples ``split``'s selector keeps (see
  :func:`lut_jax.data.splits.select_examples`)."""
  base, _ = splits.select_examples(split, None)
  data = _read_split(dataset, base, data_dir, image_size, channels)
  if base == split:
    return data
  _, kept = splits.select_examples(split, data.labels)
  if len(kept) == 0:
    raise errors.DataError(f"{dataset!r} split {split!r} selects no examples")
  return Split(data.images[kept], data.labels[kept], f"{data.description} {split}")


@functools.lru_cache(maxsize=4)
def _read_split(dataset: str, split: str, data_dir: str | None, image_size: int,
                channels: int) -> Split:
  """``split`` of ``dataset`` as uint8 arrays at ``image_size``, with the stored channels (1
  for grey sources; views add the rest). ``DataError`` for an unknown split or a source the
  device path cannot read (folders on object stores, tfds sets without random access or of
  several image sizes), ``DataNotFoundError`` for a data set not on this machine."""
  if dataset.startswith(folders.FOLDER_PREFIX):
    data = _folder(dataset, split, image_size)
  else:
    data = stored_images(dataset, split, data_dir)
  if data.num_examples == 0:
    raise errors.DataError(f"{dataset!r} split {split!r} selects no examples")
  images = _resize(data.images, image_size)
  if channels == 1 and images.shape[-1] == 3:
    grey = images.astype(np.float32) @ np.asarray(device_augment.GRAY_WEIGHTS, np.float32)
    images = np.round(grey)[..., None].astype(np.uint8)
  return dataclasses.replace(data, images=images)


# ----------------------------------------------------------------------------- views


def crop_flip(image: jax.Array, offset_y: jax.Array, offset_x: jax.Array,
              flip: jax.Array) -> jax.Array:
  """Reflect-pads one HWC image by ``PADDING``, crops its size back at the offsets (in
  ``[0, 2 * PADDING]``), flips horizontally if ``flip``: ``augment.crop_flip`` in JAX."""
  height, width, channels = image.shape
  padded = jnp.pad(image, ((PADDING, PADDING), (PADDING, PADDING), (0, 0)), mode="reflect")
  crop = lax.dynamic_slice(padded, (offset_y, offset_x, 0), (height, width, channels))
  return jnp.where(flip, crop[:, ::-1], crop)


def _random_crop_flip(image: jax.Array, key: jax.Array, flip: bool) -> jax.Array:
  ky, kx, kf = jax.random.split(key, 3)
  offset = lambda k: jax.random.randint(k, (), 0, 2 * PADDING + 1)  # noqa: E731
  return crop_flip(image, offset(ky), offset(kx), (jax.random.uniform(kf) < 0.5) & flip)


def _with_channels(images: jax.Array, channels: int) -> jax.Array:
  """Grey sources shown as RGB when the model takes three channels (the tf.data path's
  ``decode`` does the same)."""
  if images.shape[-1] == channels:
    return images
  return jnp.broadcast_to(images, images.shape[:-1] + (channels,))


def make_views(images: jax.Array, keys: jax.Array, *, channels: int, two_views: bool,
               recipe: image_utils.ViewRecipe = image_utils.ViewRecipe()
               ) -> dict[str, jax.Array]:
  """uint8 ``(B, S, S, C0)`` images and one key per example -> ``{"view1"[, "view2"]}``,
  normalised float32 ``(B, S, S, channels)``: the weak view, and the strong view with its
  own geometry and colour draws, as ``recipe`` says."""
  images = _with_channels(images, channels)
  view_keys = jax.vmap(lambda k: jax.random.split(k, 3))(keys)  # geometry 1, 2, colour 2
  crop_flip_all = jax.vmap(lambda image, k: _random_crop_flip(image, k, recipe.flip))
  out = {"view1": device_augment.normalize(crop_flip_all(images, view_keys[:, 0]))}
  if two_views:
    crops = crop_flip_all(images, view_keys[:, 1])
    colour = jax.vmap(lambda k: device_augment.sample_params_one(k, recipe.op_choices))(
        view_keys[:, 2])
    out["view2"] = device_augment.normalize(device_augment.colour_augment(crops, colour))
  return out


def eval_images(images: jax.Array, channels: int) -> jax.Array:
  """uint8 images at the model's size -> the normalised whole images evaluation uses."""
  return device_augment.normalize(_with_channels(jnp.asarray(images), channels))


# ----------------------------------------------------------------------------- batches


class DeviceData:
  """The pre-training split on the devices and the jitted maker of each step's batch.

  Attributes:
    num_examples: examples in the split.
    steps_per_epoch: global batches per epoch (the remainder is left out, changing with
      each epoch's permutation).
  """

  def __init__(self, input_config: Any, *, seed: int, mesh: jax.sharding.Mesh,
               two_views: bool = True, split: Split | None = None):
    split = split or load_split(input_config)
    self.num_examples = split.num_examples
    self.batch_size = input_config.batch_size
    self.steps_per_epoch = splits.steps_per_epoch(self.num_examples, self.batch_size)
    if self.steps_per_epoch == 0:
      raise errors.DataError(
          f"{input_config.dataset} split {input_config.split!r} has {self.num_examples} "
          f"examples, fewer than one batch of {self.batch_size}",
          hint="use a smaller batch size or more data")
    replicated = sharding.replicated(mesh)
    # Every process holds the whole split, so each can fill its devices' copies.
    self.images = jax.make_array_from_callback(split.images.shape, replicated,
                                               lambda index: split.images[index])
    logging.info("Pre-training input on the devices: %s, %d examples of %s uint8 "
                 "(%.1f MB on every device), %d steps per epoch.", split.description,
                 self.num_examples, split.images.shape[1:], split.images.nbytes / 2**20,
                 self.steps_per_epoch)
    key = jax.random.fold_in(jax.random.key(seed), _SEED_SALT)
    make = lambda images, step: batch_at(  # noqa: E731
        images, step, key, batch_size=self.batch_size,
        steps_per_epoch=self.steps_per_epoch, channels=input_config.channels,
        two_views=two_views, recipe=image_utils.view_recipe(input_config))
    self._make = jax.jit(make, out_shardings=sharding.batch_sharding(mesh))

  def batch(self, step: int) -> dict[str, jax.Array]:
    """The global batch of ``step`` (asynchronous: returns before it is computed)."""
    return self._make(self.images, np.int32(step))

  def iterator(self, start_step: int) -> Iterator[dict[str, jax.Array]]:
    """Batches from ``start_step`` on, forever."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1


def batch_at(images: jax.Array, step: jax.Array, key: jax.Array, *, batch_size: int,
             steps_per_epoch: int, channels: int, two_views: bool,
             recipe: image_utils.ViewRecipe = image_utils.ViewRecipe()
             ) -> dict[str, jax.Array]:
  """The views of step ``step``: positions ``[j*B, (j+1)*B)`` of epoch ``step //
  steps_per_epoch``'s permutation, each example keyed by (epoch, example index)."""
  epoch, position = jnp.divmod(step, steps_per_epoch)
  epoch_key = jax.random.fold_in(key, epoch)
  order = jax.random.permutation(epoch_key, images.shape[0])
  ids = lax.dynamic_slice(order, (position * batch_size,), (batch_size,))
  keys = jax.vmap(lambda i: jax.random.fold_in(epoch_key, i))(ids)
  return make_views(images[ids], keys, channels=channels, two_views=two_views,
                    recipe=recipe)


def check_backend(input_config: Any) -> None:
  """Raises ``ConfigError`` for an unknown ``input.backend``, or options it ignores."""
  backend = input_config.backend
  if backend not in BACKENDS:
    raise errors.ConfigError(f"unknown input.backend {backend!r}; expected one of {BACKENDS}")
  if backend == "device" and input_config.device_augment:
    raise errors.ConfigError(
        "input.device_augment applies to input.backend='tfdata' only (the device path "
        "makes both views on the device anyway)", hint="drop input.device_augment")

