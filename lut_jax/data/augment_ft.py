"""Fine-tuning augmentation (TensorFlow, per example, stateless) and its input pipeline.

MAE's fine-tuning transform (timm ``create_transform(is_training=True, ...)``):

  RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic) -> horizontal flip (0.5)
  -> RandAugment ``rand-m9-mstd0.5-inc1`` -> normalise -> RandomErasing(0.25, "pixel").

RandAugment follows timm's increasing-magnitude variant: two ops drawn uniformly (with
replacement) from the 15 below, each applied with probability 0.5 at magnitude
``N(9, 0.5)`` clipped to [0, 10]; signed ops flip their sign with probability 0.5. The ops
work on float images in [0, 1] instead of PIL's uint8 (no rounding between ops); geometric
ops fill with the ImageNet mean colour, as timm, but sample bilinearly where timm (with
the recipe's ``interpolation="bicubic"``) samples bicubically: TensorFlow's projective
transform has no bicubic mode.

Every random draw is a ``tf.random.stateless_*`` op keyed by (seed, epoch, example id), so
a resumed run sees the same pixels (see :mod:`lut_jax.data.input_pipeline`). Mixup / cutmix are
not here: they mix examples and run on the device (:func:`finetune.mix_batch`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import tensorflow as tf

from lut_jax.data import augment, datasets, image_utils, input_pipeline

RANDAUG_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
               "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
               "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
               "TranslateXRel", "TranslateYRel")
_MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM
# Keeps the fine-tuning streams apart from pre-training's on the same seed.
_SEED_SALT = 0x4654  # "FT"


def _fill(channels: int) -> tf.Tensor:
  mean, _ = image_utils.normalization_constants(channels)
  return tf.constant(mean, tf.float32)


# ----------------------------------------------------------------- RandomResizedCrop
def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int, *,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """torchvision ``RandomResizedCrop``: ten tries at a box of ``scale`` x area and
  log-uniform aspect ``ratio``; the first that fits is used, else a centre crop clamped to
  ``ratio``. The box is resized to ``size x size`` (bicubic, antialiased, clipped)."""
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  area = height * width
  target = area * tf.random.stateless_uniform([10], seeds[0], scale[0], scale[1])
  log_ratio = tf.random.stateless_uniform([10], seeds[1], math.log(ratio[0]),
                                          math.log(ratio[1]))
  aspect = tf.exp(log_ratio)
  w = tf.round(tf.sqrt(target * aspect))
  h = tf.round(tf.sqrt(target / aspect))
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32))
  any_ok = tf.reduce_any(ok)
  # Fallback: the whole image, cropped to the nearest allowed aspect ratio.
  in_ratio = width / height
  fb_w = tf.where(in_ratio < ratio[0], width,
                  tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width))
  fb_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  crop_h = tf.cast(tf.where(any_ok, h[first], fb_h), tf.int32)
  crop_w = tf.cast(tf.where(any_ok, w[first], fb_w), tf.int32)
  u = tf.random.stateless_uniform([2], seeds[2])
  top = tf.where(any_ok, tf.cast(u[0] * tf.cast(shape[0] - crop_h + 1, tf.float32), tf.int32),
                 (shape[0] - crop_h) // 2)
  left = tf.where(any_ok, tf.cast(u[1] * tf.cast(shape[1] - crop_w + 1, tf.float32), tf.int32),
                  (shape[1] - crop_w) // 2)
  top = tf.minimum(top, shape[0] - crop_h)
  left = tf.minimum(left, shape[1] - crop_w)
  crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, shape[2]]))
  out = tf.image.resize(crop, [size, size], method="bicubic", antialias=True)
  return tf.ensure_shape(tf.clip_by_value(out, 0.0, 1.0), [size, size, image.shape[-1]])


# ----------------------------------------------------------------- RandAugment ops
def _luma(image: tf.Tensor) -> tf.Tensor:
  return augment.rgb_to_grayscale(image) if image.shape[-1] == 3 else image


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """PIL ``autocontrast``: stretch each channel to [0, 1] (constant channels unchanged)."""
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  stretched = (image - lo) / tf.maximum(hi - lo, 1e-8)
  return tf.where(hi > lo, stretched, image)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL ``equalize``: per-channel histogram equalisation on 256 grey levels."""
  levels = tf.cast(tf.clip_by_value(tf.round(image * 255.0), 0, 255), tf.int32)

  def channel(c):
    hist = tf.math.bincount(c, minlength=256, maxlength=256, dtype=tf.int32)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))  # count of the top level
    step = (tf.reduce_sum(hist) - tf.reshape(last, [])) // 255
    lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.where(step == 0, c, tf.gather(lut, c))

  out = tf.stack([channel(levels[..., i]) for i in range(image.shape[-1])], axis=-1)
  return tf.cast(out, tf.float32) / 255.0


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """Keeps the ``bits`` high bits of each 8-bit level (``bits`` in [0, 8])."""
  levels = tf.cast(tf.clip_by_value(tf.round(image * 255.0), 0, 255), tf.int32)
  shift = 8 - tf.cast(bits, tf.int32)
  out = tf.bitwise.left_shift(tf.bitwise.right_shift(levels, shift), shift)
  return tf.cast(out, tf.float32) / 255.0


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  """Inverts pixels at or above ``threshold`` (in [0, 1]; PIL's ``solarize``)."""
  return tf.where(image >= threshold, 1.0 - image, image)


def solarize_add(image: tf.Tensor, addition: tf.Tensor, threshold: float = 128 / 255
                 ) -> tf.Tensor:
  """Adds ``addition`` to pixels below ``threshold``, clipped (timm ``solarize_add``)."""
  return tf.where(image < threshold, tf.minimum(image + addition, 1.0), image)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image (3x3 kernel,
  centre 5, others 1, / 13); the one-pixel border is kept as is."""
  channels = image.shape[-1]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  padded = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  shape = tf.shape(image)
  interior = tf.pad(tf.ones(shape[:2] - 2), [[1, 1], [1, 1]])[..., None] > 0
  degenerate = tf.where(interior, padded, image)
  return tf.clip_by_value(factor * image + (1.0 - factor) * degenerate, 0.0, 1.0)


def _affine(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """Applies the inverse map ``matrix`` (output pixel -> input pixel, 8 projective
  coefficients, as PIL's ``Image.transform``) with bilinear sampling and mean fill."""
  channels = image.shape[-1]
  fill = _fill(channels)
  # ImageProjectiveTransformV3 fills with one scalar for every channel: shift the image so
  # the fill colour is 0, transform, shift back.
  shifted = image - fill
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=shifted[None], transforms=tf.reshape(matrix, [1, 8]),
      output_shape=tf.shape(image)[:2], fill_value=0.0, interpolation="BILINEAR",
      fill_mode="CONSTANT")[0]
  return tf.clip_by_value(out + fill, 0.0, 1.0)


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  """Rotation about the centre by ``degrees`` (counter-clockwise, as PIL)."""
  shape = tf.cast(tf.shape(image), tf.float32)
  cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
  theta = degrees * math.pi / 180
  cos, sin = tf.cos(theta), tf.sin(theta)
  # Output (x, y) samples input (cos*(x-cx) - sin*(y-cy) + cx, sin*(x-cx) + cos*(y-cy) + cy):
  # a counter-clockwise rotation of the picture in image (y-down) coordinates.
  matrix = tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                     sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])
  return _affine(image, matrix)


def shear_x(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return _affine(image, tf.stack([1.0, factor, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return _affine(image, tf.stack([1.0, 0.0, 0.0, factor, 1.0, 0.0, 0.0, 0.0]))


def translate_x(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
  return _affine(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
  return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0]))


def _enhance(kind: str):
  def op(image, factor):
    if kind == "color":
      return image if image.shape[-1] == 1 else augment.adjust_saturation(image, factor)
    if kind == "contrast":
      mean = tf.reduce_mean(_luma(image))
      return tf.clip_by_value(factor * image + (1.0 - factor) * mean, 0.0, 1.0)
    return augment.adjust_brightness(image, factor)
  return op


def apply_randaug_op(image: tf.Tensor, op: tf.Tensor, level: tf.Tensor,
                     sign: tf.Tensor) -> tf.Tensor:
  """Applies ``RANDAUG_OPS[op]`` at ``level`` in [0, 10] (``sign`` +-1 for signed ops),
  with timm's level -> argument maps of the increasing variants."""
  frac = level / _MAX_LEVEL
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  enhance = 1.0 + sign * frac * 0.9  # [0.1, 1.9]
  branches = [
      lambda: auto_contrast(image),
      lambda: equalize(image),
      lambda: 1.0 - image,
      lambda: rotate(image, sign * frac * 30.0),
      lambda: posterize(image, 4 - tf.cast(frac * 4, tf.int32)),
      lambda: solarize(image, (256.0 - tf.floor(frac * 256.0)) / 255.0),
      lambda: solarize_add(image, tf.floor(frac * 110.0) / 255.0),
      lambda: _enhance("color")(image, enhance),
      lambda: _enhance("contrast")(image, enhance),
      lambda: _enhance("brightness")(image, enhance),
      lambda: sharpness(image, enhance),
      lambda: shear_x(image, sign * frac * 0.3),
      lambda: shear_y(image, sign * frac * 0.3),
      lambda: translate_x(image, sign * frac * 0.45 * size[1]),
      lambda: translate_y(image, sign * frac * 0.45 * size[0]),
  ]
  out = tf.switch_case(op, branches)
  return tf.ensure_shape(out, image.shape)


def rand_augment(image: tf.Tensor, seed: tf.Tensor, *, num_ops: int = 2,
                 magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5) -> tf.Tensor:
  """timm ``RandAugment`` (``rand-m{magnitude}-mstd{magnitude_std}-inc1``) on [0, 1]."""
  seeds = tf.random.experimental.stateless_split(seed, max(num_ops, 1))
  for i in range(num_ops):
    s = tf.random.experimental.stateless_split(seeds[i], 4)
    op = tf.random.stateless_uniform([], s[0], 0, len(RANDAUG_OPS), dtype=tf.int32)
    level = magnitude + magnitude_std * tf.random.stateless_normal([], s[1])
    level = tf.clip_by_value(level, 0.0, _MAX_LEVEL)
    sign = tf.where(tf.random.stateless_uniform([], s[2]) < 0.5, -1.0, 1.0)
    apply = tf.random.stateless_uniform([], s[3]) < prob
    image = tf.cond(apply, lambda im=image, o=op, l=level, g=sign: apply_randaug_op(im, o, l, g),
                    lambda im=image: tf.identity(im))
  return image


def random_erasing(image: tf.Tensor, seed: tf.Tensor, *, probability: float = 0.25,
                   area: tuple[float, float] = (0.02, 1 / 3),
                   log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
                   ) -> tf.Tensor:
  """timm ``RandomErasing(mode="pixel", max_count=1)`` on a *normalised* image: with
  ``probability``, one box (ten tries at a fitting size) is filled with N(0, 1) noise."""
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, 5)
  target = height * width * tf.random.stateless_uniform([10], seeds[0], area[0], area[1])
  aspect = tf.exp(tf.random.stateless_uniform([10], seeds[1], log_aspect[0], log_aspect[1]))
  h = tf.round(tf.sqrt(target * aspect))
  w = tf.round(tf.sqrt(target / aspect))
  ok = (w < width) & (h < height)
  first = tf.argmax(tf.cast(ok, tf.int32))
  erase = tf.reduce_any(ok) & (tf.random.stateless_uniform([], seeds[2]) < probability)
  box_h, box_w = tf.cast(h[first], tf.int32), tf.cast(w[first], tf.int32)
  u = tf.random.stateless_uniform([2], seeds[3])
  top = tf.cast(u[0] * tf.cast(shape[0] - box_h + 1, tf.float32), tf.int32)
  left = tf.cast(u[1] * tf.cast(shape[1] - box_w + 1, tf.float32), tf.int32)
  ys = tf.range(shape[0])[:, None, None]
  xs = tf.range(shape[1])[None, :, None]
  inside = (ys >= top) & (ys < top + box_h) & (xs >= left) & (xs < left + box_w) & erase
  noise = tf.random.stateless_normal(tf.shape(image), seeds[4])
  return tf.where(inside, noise, image)


def train_view(image: tf.Tensor, seed: tf.Tensor, size: int,
               config: Any) -> tf.Tensor:
  """One augmented, normalised fine-tuning view of a decoded [0, 1] image. ``config``
  (``config.augment``): crop_scale_min, hflip, randaug_num_ops, randaug_magnitude,
  randaug_magnitude_std, randaug_prob, reprob."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  view = random_resized_crop(image, seeds[0], size, scale=(config.crop_scale_min, 1.0))
  flip = tf.random.stateless_uniform([], seeds[1]) < config.hflip
  view = tf.cond(flip, lambda: tf.reverse(view, axis=[1]), lambda: view)
  if config.randaug_num_ops > 0:
    view = rand_augment(view, seeds[2], num_ops=config.randaug_num_ops,
                        magnitude=config.randaug_magnitude,
                        magnitude_std=config.randaug_magnitude_std, prob=config.randaug_prob)
  view = augment.normalize(view)
  if config.reprob > 0:
    view = random_erasing(view, seeds[3], probability=config.reprob)
  return view


def create_finetune_iterator(input_config, augment_config, *, split: str, batch_size: int,
                             seed: int, start_step: int = 0,
                             sharding: Optional[jax.sharding.NamedSharding] = None,
                             process_index: Optional[int] = None,
                             process_count: Optional[int] = None,
                             ) -> input_pipeline.BatchIterator:
  """Labelled, augmented single-view batches ``{"image", "label"}`` forever, from
  ``start_step`` on (same epoch/shuffle/resume scheme as the pre-training pipeline)."""
  count = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  if batch_size <= 0 or batch_size % count:
    raise ValueError(f"batch_size {batch_size} must be positive and divisible by the "
                     f"{count} processes")
  image_utils.check_image_size(input_config.image_size)
  local_batch = batch_size // count
  size, channels = input_config.image_size, input_config.channels
  source = datasets.get_source(input_config.dataset, split, input_config.data_dir)
  share = source.share(index, count)
  steps = input_pipeline.epoch_steps(source, count, local_batch)
  ft_seed = seed ^ _SEED_SALT

  def make_view(epoch, element):
    image = augment.decode(element["image"], channels)
    key = input_pipeline.example_key(ft_seed, epoch, element["id"])
    return {"image": train_view(image, key, size, augment_config),
            "label": tf.cast(element["label"], tf.int32)}

  ds = input_pipeline.epoch_batches(share, make_view, input_config, seed=ft_seed,
                                    steps_per_epoch=steps, local_batch=local_batch,
                                    start_step=start_step)
  return input_pipeline.BatchIterator(
      ds, source=source, steps_per_epoch=steps, local_batch_size=local_batch,
      global_shape={"image": (batch_size, size, size, channels), "label": (batch_size,)},
      sharding=sharding, device_prefetch=input_config.prefetch,
      start_step=start_step)
