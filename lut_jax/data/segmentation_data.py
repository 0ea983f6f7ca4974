"""Segmentation data: sources (``config.input.dataset``) and tf.data pipelines.

Sources (elements ``{"image", "annotation", "id"}``; layouts in docs/downstream.md):
``fashion_seg``, the synthetic task of :mod:`segmentation_synthetic`, generated in memory;
``folder``, ``config.input.folder`` laid out as ADE20K's ``ADEChallengeData2016`` (checked
when the source is built: an image without its annotation, sizes that differ, a palette PNG
whose indices TensorFlow would turn into colours); ``scene_parse150``, tfds's, whose
annotations are instance masks: the class (one of 100 categories) is the red channel.
``input.reduce_zero_label``: mmseg's (0 -> ignore, ``1 .. K`` -> ``0 .. K - 1``).

Training view (mmseg's ADE20K pipeline without its crop retry and photometric distortion):
resize by a random ratio in ``input.ratio_range`` (of the keep-ratio fit into
``input.train_scale`` when set, else of the image; bilinear, labels nearest) -> random
``crop x crop`` crop -> flip with ``input.hflip`` -> normalise -> pad to the crop (image 0,
labels ignored). Draws are keyed by (seed, epoch, example id), so resuming is exact.

Evaluation view: resized to fit ``input.eval_scale`` keeping the ratio (when set), normalised
and put in the top-left corner of a canvas with sides rounded up to
``input.eval_canvas_multiple`` (at least the crop); the labels are resized with it (nearest)
and scored there, where mmseg resizes the logits back (a few canvas shapes, so a few
compilations, not one per image size). Fixed-size sources come in batches of
``input.eval_batch_size`` (the last padded with ignored pixels), others one image per
process and batch. This module imports TensorFlow; the model, loss and metrics do not.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Optional

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from lut_jax import errors
from lut_jax.data import augment, datasets, input_pipeline, segmentation_synthetic, splits

DATASETS = ("fashion_seg", "folder", "scene_parse150")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_SEED_SALT = 0x5345  # "SE": keeps these streams apart from the other pipelines'


@dataclasses.dataclass(frozen=True)
class SegSource:
  """A split and what the pipelines need to know of it."""

  source: datasets.DataSource  # elements {"image", "annotation", "id"}
  num_classes: Optional[int]  # after reduce_zero_label; None: unknown
  fixed_size: Optional[int] = None  # the side of every (square) image, if they are equal


def get_source(input_config: Any, split: str, synthetic: Any = None) -> SegSource:
  """The source ``input_config.dataset`` names (see module doc)."""
  name = input_config.dataset
  if name == "fashion_seg":
    return _synthetic_source(split, synthetic, input_config.data_dir)
  if name == "folder":
    return _folder_source(input_config.folder, split)
  if name == "scene_parse150":
    return _scene_parse_source(split, input_config.data_dir,
                               input_config.reduce_zero_label)
  raise errors.ConfigError(f"unknown segmentation dataset {name!r}; expected one of "
                           f"{DATASETS}")


def _synthetic_source(split: str, synthetic: Any, data_dir: Optional[str]) -> SegSource:
  size = synthetic.image_size
  count = synthetic.train_examples if split == "train" else synthetic.eval_examples
  images, masks = segmentation_synthetic.make_split(
      split, count, seed=synthetic.seed, image_size=size, max_items=synthetic.max_items,
      threshold=synthetic.threshold, data_dir=data_dir)
  images_t, masks_t = tf.constant(images[..., None]), tf.constant(masks[..., None])

  def load(index: tf.Tensor) -> dict:
    return {"image": tf.gather(images_t, index), "annotation": tf.gather(masks_t, index),
            "id": index}

  def share(process_index: int, process_count: int) -> datasets.Share:
    # pylint: disable-next=protected-access
    return datasets._random_access_share(count, 0, load, process_index, process_count)

  source = datasets.DataSource(
      "fashion_seg", split, count, segmentation_synthetic.NUM_CLASSES, 0,
      f"Fashion-MNIST items on textures, {count} generated {size}-px images (seed "
      f"{synthetic.seed})", share)
  return SegSource(source, segmentation_synthetic.NUM_CLASSES, size)


def list_folder(folder: str, split: str) -> list[tuple[str, str]]:
  """``(image, annotation)`` path pairs of ``split`` (see module doc), sorted by name; a
  DataNotFoundError without images, a DataError for a pair that does not fit."""
  base = split.split("[")[0]
  image_dir = os.path.join(folder, "images", base)
  label_dir = os.path.join(folder, "annotations", base)
  layout = "FOLDER/images/<split>/NAME.jpg with FOLDER/annotations/<split>/NAME.png"
  if not os.path.isdir(image_dir):
    raise errors.DataNotFoundError(f"segmentation folder: no directory {image_dir}",
                                   hint=f"expected {layout}")
  names = sorted(n for n in os.listdir(image_dir)
                 if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
  if not names:
    raise errors.DataNotFoundError(f"segmentation folder: no images in {image_dir}",
                                   hint=f"expected {layout}")
  _, start, stop = splits.slice_split(split, {base: len(names)})
  from PIL import Image  # pylint: disable=g-import-not-at-top (headers only)
  pairs = []
  for name in names[start:stop]:
    image = os.path.join(image_dir, name)
    label = os.path.join(label_dir, os.path.splitext(name)[0] + ".png")
    if not os.path.exists(label):
      raise errors.DataError(f"segmentation folder: {image} has no annotation {label}")
    with Image.open(image) as im, Image.open(label) as lb:
      if im.size != lb.size:
        raise errors.DataError(f"segmentation folder: {image} is {im.size[0]}x{im.size[1]} "
                               f"but its annotation {label} is {lb.size[0]}x{lb.size[1]}")
      if lb.mode != "L":
        raise errors.DataError(
            f"segmentation folder: annotation {label} has mode {lb.mode}; expected one "
            "8-bit channel of class indices (mode L)",
            hint="palette (VOC-style) masks: save their indices, e.g. "
                 "Image.fromarray(np.array(img)).save(path)")
    pairs.append((image, label))
  if not pairs:
    raise errors.DataError(f"segmentation folder: split {split!r} selects no images")
  return pairs


def _folder_source(folder: str, split: str) -> SegSource:
  pairs = list_folder(folder, split)
  images_t = tf.constant([p[0] for p in pairs])
  labels_t = tf.constant([p[1] for p in pairs])

  def load(index: tf.Tensor) -> dict:
    return {"image": tf.io.read_file(tf.gather(images_t, index)),
            "annotation": tf.io.read_file(tf.gather(labels_t, index)), "id": index}

  def share(process_index: int, process_count: int) -> datasets.Share:
    # pylint: disable-next=protected-access
    return datasets._random_access_share(len(pairs), 0, load, process_index, process_count)

  source = datasets.DataSource("folder", split, len(pairs), None, 0,
                               f"segmentation folder {folder} ({split})", share)
  return SegSource(source, None)  # the class count is the config's (num_classes)


def _scene_parse_source(split: str, data_dir: Optional[str],
                        reduce_zero_label: bool) -> SegSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("scene_parse150", data_dir=data_dir)
  if not builder.is_prepared():
    raise errors.DataNotFoundError(
        f"tfds dataset 'scene_parse150' is not prepared under {builder.data_dir}",
        hint="run `tfds build scene_parse150 --data_dir=<dir>` on a machine with internet "
             "access and set input.data_dir to <dir>")
  try:
    total = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise errors.DataError(f"scene_parse150 has no split {split!r}; available: "
                           f"{sorted(builder.info.splits)}") from e

  def to_element(example: dict) -> dict:
    return {"image": example["image"], "annotation": example["annotation"],
            "id": tf.strings.to_hash_bucket_fast(example["tfds_id"], 2**62)}

  def share(process_index: int, process_count: int) -> datasets.Share:
    sub = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)

    def read() -> tf.data.Dataset:
      ds = builder.as_dataset(split=sub, shuffle_files=False,
                              decoders={"image": tfds.decode.SkipDecoding(),
                                        "annotation": tfds.decode.SkipDecoding()},
                              read_config=tfds.ReadConfig(add_tfds_id=True))
      return ds.map(to_element, num_parallel_calls=tf.data.AUTOTUNE)

    return datasets.Share(builder.info.splits[sub].num_examples, False, read)

  source = datasets.DataSource("scene_parse150", split, total, None, 0,
                               f"tfds scene_parse150 {builder.info.version} at "
                               f"{builder.data_dir}", share)
  return SegSource(source, 100 if reduce_zero_label else 101)


# ------------------------------------------------------------------------- decoding
def decode_annotation(annotation: tf.Tensor) -> tf.Tensor:
  """Encoded PNG or a uint8 array -> int32 ``(H, W)`` class indices (the first channel:
  the only one of an ADE20K map, the category of a scene_parse150 instance mask)."""
  if annotation.dtype == tf.string:
    annotation = tf.io.decode_png(annotation, dtype=tf.uint8)  # channels as stored
  return tf.cast(annotation[..., 0], tf.int32)


def reduce_zero_label(labels: tf.Tensor, ignore_label: int) -> tf.Tensor:
  """mmseg's ``reduce_zero_label``: 0 -> ignore, ``k`` -> ``k - 1``; the ignore label stays."""
  return tf.where((labels == 0) | (labels == ignore_label), ignore_label, labels - 1)


def _decode(element: dict, input_config: Any, channels: int) -> tuple[tf.Tensor, tf.Tensor]:
  image = augment.decode(element["image"], channels)
  labels = decode_annotation(element["annotation"])
  if input_config.reduce_zero_label:
    labels = reduce_zero_label(labels, input_config.ignore_label)
  return image, labels


def parse_pair(text: str) -> Optional[tuple[int, int]]:
  """``"2048,512"`` -> ``(2048, 512)`` (long side, short side); ``""`` -> None."""
  if not text:
    return None
  parts = [int(p) for p in str(text).split(",")]
  if len(parts) != 2 or min(parts) <= 0:
    raise ValueError(f"expected two positive sizes 'LONG,SHORT', got {text!r}")
  return max(parts), min(parts)


def _fit_scale(height: tf.Tensor, width: tf.Tensor, scale: tuple[int, int]) -> tf.Tensor:
  """mmseg's keep-ratio rescale factor: the largest that fits ``(long, short)``."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  return tf.minimum(scale[0] / tf.maximum(h, w), scale[1] / tf.minimum(h, w))


def _resize(image: tf.Tensor, labels: tf.Tensor,
            factor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  shape = tf.cast(tf.shape(labels), tf.float32)
  size = tf.maximum(tf.cast(tf.round(shape * factor), tf.int32), 1)
  image = tf.image.resize(image, size, "bilinear")
  labels = tf.image.resize(labels[..., None], size, "nearest")[..., 0]
  return image, labels


def train_view(image: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, *, crop: int,
               ratio_range: tuple[float, float], scale: Optional[tuple[int, int]],
               hflip: float, ignore_label: int) -> tuple[tf.Tensor, tf.Tensor]:
  """One training view (module doc): ``(image (crop, crop, C) normalised, labels int32
  (crop, crop))``."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  shape = tf.shape(labels)
  factor = tf.random.stateless_uniform([], seeds[0], ratio_range[0], ratio_range[1])
  if scale is not None:
    factor = factor * _fit_scale(shape[0], shape[1], scale)
  image, labels = _resize(image, labels, factor)
  shape = tf.shape(labels)
  height, width = tf.minimum(shape[0], crop), tf.minimum(shape[1], crop)
  top = tf.random.stateless_uniform([], seeds[1], 0, shape[0] - height + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], seeds[2], 0, shape[1] - width + 1, dtype=tf.int32)
  image = image[top:top + height, left:left + width]
  labels = labels[top:top + height, left:left + width]
  flip = tf.random.stateless_uniform([], seeds[3]) < hflip
  image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
  labels = tf.cond(flip, lambda: tf.reverse(labels, [1]), lambda: labels)
  pad = [[0, crop - height], [0, crop - width]]
  image = tf.pad(augment.normalize(image), pad + [[0, 0]])
  labels = tf.pad(labels, pad, constant_values=ignore_label)
  image.set_shape([crop, crop, image.shape[-1]])
  labels.set_shape([crop, crop])
  return image, labels


def eval_view(image: tf.Tensor, labels: tf.Tensor, *, crop: int,
              scale: Optional[tuple[int, int]], multiple: int,
              ignore_label: int) -> dict[str, tf.Tensor]:
  """One evaluation canvas (module doc): ``{"image", "label", "size"}``."""
  if scale is not None:
    shape = tf.shape(labels)
    image, labels = _resize(image, labels, _fit_scale(shape[0], shape[1], scale))
  size = tf.shape(labels)
  canvas = tf.maximum((size + multiple - 1) // multiple * multiple, crop)
  pad = [[0, canvas[0] - size[0]], [0, canvas[1] - size[1]]]
  return {"image": tf.pad(augment.normalize(image), pad + [[0, 0]]),
          "label": tf.pad(labels, pad, constant_values=ignore_label),
          "size": tf.cast(size, tf.int32)}


# ------------------------------------------------------------------------- pipelines
def create_train_iterator(seg: SegSource, input_config: Any, *, batch_size: int, crop: int,
                          channels: int, seed: int, start_step: int = 0,
                          sharding: Optional[jax.sharding.NamedSharding] = None,
                          ) -> input_pipeline.BatchIterator:
  """Augmented ``{"image" (B, crop, crop, C), "label" (B, crop, crop)}`` batches forever,
  from ``start_step`` on (global arrays with ``sharding``, else numpy)."""
  count, index = jax.process_count(), jax.process_index()
  if batch_size <= 0 or batch_size % count:
    raise errors.ConfigError(f"segmentation.batch_size={batch_size} must be positive and "
                             f"divisible by the {count} processes")
  local_batch = batch_size // count
  share = seg.source.share(index, count)
  steps = input_pipeline.epoch_steps(seg.source, count, local_batch)
  seg_seed = seed ^ _SEED_SALT
  ratio = tuple(float(r) for r in input_config.ratio_range.split(","))
  scale = parse_pair(input_config.train_scale)

  def make_view(epoch, element):
    image, labels = _decode(element, input_config, channels)
    key = input_pipeline.example_key(seg_seed, epoch, element["id"])
    image, labels = train_view(image, labels, key, crop=crop, ratio_range=ratio,
                               scale=scale, hflip=input_config.hflip,
                               ignore_label=input_config.ignore_label)
    return {"image": image, "label": labels}

  ds = input_pipeline.epoch_batches(share, make_view, input_config, seed=seg_seed,
                                    steps_per_epoch=steps, local_batch=local_batch,
                                    start_step=start_step)
  return input_pipeline.BatchIterator(
      ds, source=seg.source, steps_per_epoch=steps, local_batch_size=local_batch,
      global_shape={"image": (batch_size, crop, crop, channels),
                    "label": (batch_size, crop, crop)},
      sharding=sharding, device_prefetch=input_config.prefetch,
      start_step=start_step)


class EvalData:
  """Re-iterable evaluation batches of this process's share: numpy ``{"image" (b, H, W,
  C), "label" (b, H, W), "size" (b, 2)}``; padding examples are all ignored pixels."""

  def __init__(self, dataset: tf.data.Dataset, source: datasets.DataSource):
    self._dataset, self.source = dataset, source

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return input_pipeline.numpy_batches(self._dataset, self.source)


def create_eval_data(seg: SegSource, input_config: Any, *, batch_size: int, crop: int,
                     channels: int) -> EvalData:
  """This process's evaluation canvases (module doc)."""
  count, index = jax.process_count(), jax.process_index()
  share = seg.source.share(index, count)
  scale = parse_pair(input_config.eval_scale)
  multiple = max(1, input_config.eval_canvas_multiple)

  def view(element: dict) -> dict[str, tf.Tensor]:
    image, labels = _decode(element, input_config, channels)
    return eval_view(image, labels, crop=crop, scale=scale, multiple=multiple,
                     ignore_label=input_config.ignore_label)

  ds = (tf.data.Dataset.range(share.num_examples).map(share.read) if share.random_access
        else share.read())
  ds = ds.map(view, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if seg.fixed_size is not None and scale is None:
    side = max(-(-seg.fixed_size // multiple) * multiple, crop)
    local_batch = max(1, batch_size // count)
    padding = tf.data.Dataset.from_tensors({
        "image": tf.zeros([side, side, channels], tf.float32),
        "label": tf.fill([side, side], input_config.ignore_label),
        "size": tf.constant([side, side], tf.int32)})
    ds = ds.concatenate(padding.repeat(-share.num_examples % local_batch))
    ds = ds.batch(local_batch)
  else:
    ds = ds.batch(1)
  logging.info("segmentation eval: %s, %d examples on this process", seg.source.description,
               share.num_examples)
  return EvalData(ds.prefetch(tf.data.AUTOTUNE), seg.source)
