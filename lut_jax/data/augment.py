"""TensorFlow ops for LUT's two views of an image (per example, stateless, deterministic).

The reference (naver-ai/lut, ``TwoGlobalViewAugmentation``) builds both views with
torchvision on PIL images:

* view 1 (weak): ``Resize(S, bicubic)`` (shorter side to S), ``RandomCrop(S, padding=4,
  padding_mode="reflect")``, ``RandomHorizontalFlip()``, ``Normalize(ImageNet)``;
* view 2 (strong): the same geometry sampled independently, ``RandomApply(ColorJitter(0.4,
  0.4, 0.2, 0.1), p=0.8)``, then exactly one of {grayscale, solarize, Gaussian blur with
  sigma ~ U(0.1, 2)} chosen uniformly, then ``Normalize(ImageNet)``.

Here every draw is a ``tf.random.stateless_*`` op keyed by a ``[2]`` int64 seed, so a view
is a pure function of (image, seed); the input pipeline derives the seed from (base seed,
epoch, example id), so a resumed run sees the same pixels. Sampling (``sample_*``) is kept
apart from applying, like torchvision's ``get_params``, so tests check both separately.

Images are float32 HWC in [0, 1] between decoding and normalisation; unlike PIL we do not
round to uint8 after every op (below one grey level apart). Grey is ITU-R 601 luma (PIL's
``convert("L")``, the reference's path; torchvision's tensor path uses 0.2989, which is not
exactly grey-preserving). This module imports TensorFlow; the training core never does.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from lut_jax.data import image_utils


# ITU-R 601-2 luma (PIL "L"); sums to exactly 1, so a grey image stays the same grey.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
PADDING = 4  # reflect padding before the random crop (reference: RandomCrop(padding=4))

# Colour jitter of view 2 (reference: ColorJitter(0.4, 0.4, 0.2, 0.1), p = 0.8).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
JITTER_PROB = 0.8
# Order of the ops inside ColorJitter as torchvision indexes them (fn_idx = randperm(4)).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# View 2's mutually exclusive ops (reference: RandomChoice of grayscale, solarize, blur) are
# image_utils.STRONG_OPS; input.view2_ops picks those drawn from (image_utils.ViewRecipe).
BLUR_SIGMA = (0.1, 2.0)  # PIL ImageFilter.GaussianBlur(radius=sigma), sigma ~ U(0.1, 2)
# Fixed kernel radius (taps on each side): 4 sigma at the largest sigma, as scipy's default
# truncation; a fixed size keeps the op shape-static, and small sigmas just get ~0 taps.
BLUR_RADIUS = 8


# ----------------------------------------------------------------------------- decoding
def decode(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Encoded bytes (JPEG/PNG/GIF/BMP/WebP) or a uint8 HWC array -> float32 HWC in [0, 1]
  with ``channels`` channels: grey inputs replicated to RGB, or colour ones made grey."""
  if image.dtype == tf.string:
    # Always decode to RGB: libpng's own grey conversion uses BT.709 weights, not 601.
    # JPEGs with libjpeg's accurate integer DCT, as PIL (the reference's loader) decodes
    # them: decode_image uses the fast DCT, a few grey levels off on most pixels.
    encoded = image
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
  image = tf.image.convert_image_dtype(image, tf.float32)  # uint8 -> [0, 1]
  in_channels = image.shape[-1]
  if in_channels is None:
    raise ValueError("decode needs a static channel count")
  if channels == 3:
    return image if in_channels == 3 else tf.tile(image[..., :1], [1, 1, 3])
  return image[..., :1] if in_channels == 1 else rgb_to_grayscale(image)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Replicates a one-channel image to three channels (no-op for three)."""
  return image if image.shape[-1] == 3 else tf.tile(image, [1, 1, 3])


def rgb_to_grayscale(image: tf.Tensor) -> tf.Tensor:
  """``(..., 3) -> (..., 1)`` luma with ITU-R 601 weights (PIL ``convert("L")``)."""
  # Three slices and two adds: a multiply broadcast over the 3-wide minor axis plus a
  # reduction over it is several times slower in TF's CPU kernels.
  r, g, b = GRAY_WEIGHTS
  return image[..., 0:1] * r + image[..., 1:2] * g + image[..., 2:3] * b


# ----------------------------------------------------------------------------- geometry
def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bicubic resize of the shorter side to ``size``, the longer to ``int(size * long /
  short)``, unchanged when already there (torchvision ``Resize(size)``). Anti-aliased, as
  PIL's bicubic when it shrinks; clipped to [0, 1] (bicubic overshoots; PIL stores uint8).
  """
  shape = tf.shape(image, out_type=tf.int64)
  height, width = shape[0], shape[1]
  short = tf.minimum(height, width)
  long = tf.maximum(height, width)
  # Integer floor == Python's int(size * long / short) for positive ints, without float error.
  new_long = (size * long) // short
  new_height = tf.where(height <= width, tf.constant(size, tf.int64), new_long)
  new_width = tf.where(height <= width, new_long, tf.constant(size, tf.int64))

  def _resize():
    new_size = tf.cast(tf.stack([new_height, new_width]), tf.int32)
    out = tf.image.resize(image, new_size, method="bicubic", antialias=True)
    return tf.clip_by_value(out, 0.0, 1.0)

  return tf.cond(short == size, lambda: tf.identity(image), _resize)


class CropFlip(NamedTuple):
  """Parameters of one random crop + flip: offsets into the padded image, flip flag."""
  offset_y: tf.Tensor  # int32 in [0, H + 2 * PADDING - size]
  offset_x: tf.Tensor  # int32 in [0, W + 2 * PADDING - size]
  flip: tf.Tensor  # bool, p = 0.5


def sample_crop_flip(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor, size: int,
                     padding: int = PADDING, flip: bool = True) -> CropFlip:
  """Samples ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()`` parameters: offsets
  uniform over every position in the padded image (torchvision's ``randint(0, h - th + 1)``);
  never a flip without ``flip`` (the same draws otherwise).
  """
  seeds = tf.random.experimental.stateless_split(seed, 3)
  max_y = tf.cast(height, tf.int32) + 2 * padding - size
  max_x = tf.cast(width, tf.int32) + 2 * padding - size
  offset_y = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=max_y + 1,
                                         dtype=tf.int32)
  offset_x = tf.random.stateless_uniform([], seeds[1], minval=0, maxval=max_x + 1,
                                         dtype=tf.int32)
  flipped = tf.logical_and(tf.random.stateless_uniform([], seeds[2]) < 0.5, flip)
  return CropFlip(offset_y, offset_x, flipped)


def crop_flip(image: tf.Tensor, params: CropFlip, size: int,
              padding: int = PADDING) -> tf.Tensor:
  """Reflect-pads by ``padding`` (torchvision's ``padding_mode="reflect"``: edge pixel not
  repeated), crops ``size x size`` at the offsets, flips if asked."""
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
  crop = tf.slice(padded, tf.stack([params.offset_y, params.offset_x, 0]),
                  tf.stack([size, size, tf.shape(image)[2]]))
  crop = tf.cond(params.flip, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
  return tf.ensure_shape(crop, [size, size, image.shape[-1]])


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Central ``size x size`` crop (torchvision ``CenterCrop``: offsets rounded)."""
  shape = tf.shape(image)
  # torchvision: int(round((h - size) / 2.0)); Python rounds half to even, so do we.
  top = tf.cast(tf.math.round(tf.cast(shape[0] - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.math.round(tf.cast(shape[1] - size, tf.float32) / 2.0), tf.int32)
  crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([size, size, shape[2]]))
  return tf.ensure_shape(crop, [size, size, image.shape[-1]])


# ----------------------------------------------------------------------------- colour
def _blend(image1: tf.Tensor, image2: tf.Tensor, ratio: tf.Tensor) -> tf.Tensor:
  # torchvision F._blend: ratio * img1 + (1 - ratio) * img2, clamped to the valid range.
  return tf.clip_by_value(ratio * image1 + (1.0 - ratio) * image2, 0.0, 1.0)


def adjust_brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision ``adjust_brightness``: blend with black, i.e. ``clip(factor * x)``."""
  return _blend(image, tf.zeros_like(image), factor)


def adjust_contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision ``adjust_contrast``: blend with the mean grey level of the whole image."""
  # mean(luma) = luma(per-channel means): reduce over the pixels first, it is cheaper.
  mean = tf.reduce_sum(tf.reduce_mean(image, axis=[0, 1]) * tf.constant(GRAY_WEIGHTS))
  return _blend(image, mean, factor)


def adjust_saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision ``adjust_saturation``: blend with the per-pixel grey image."""
  return _blend(image, rgb_to_grayscale(image), factor)


def adjust_hue(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision ``adjust_hue``: rotate the HSV hue by ``factor`` turns (mod 1)."""
  return tf.clip_by_value(tf.image.adjust_hue(image, factor), 0.0, 1.0)


class ColorJitter(NamedTuple):
  """Parameters of one ``RandomApply(ColorJitter(...), p)`` draw."""
  apply: tf.Tensor  # bool, p = JITTER_PROB
  order: tf.Tensor  # int32 [4], a permutation of range(4) indexing JITTER_OPS
  brightness: tf.Tensor  # U[1 - 0.4, 1 + 0.4]
  contrast: tf.Tensor  # U[1 - 0.4, 1 + 0.4]
  saturation: tf.Tensor  # U[1 - 0.2, 1 + 0.2]
  hue: tf.Tensor  # U[-0.1, 0.1]


def sample_color_jitter(seed: tf.Tensor, brightness: float = BRIGHTNESS,
                        contrast: float = CONTRAST, saturation: float = SATURATION,
                        hue: float = HUE, p: float = JITTER_PROB) -> ColorJitter:
  """Samples ``RandomApply(ColorJitter(b, c, s, h), p)`` as torchvision does: factors
  uniform in ``[1 - x, 1 + x]``, hue in ``[-h, h]``, the ops in random order."""
  seeds = tf.random.experimental.stateless_split(seed, 6)
  u = lambda s, lo, hi: tf.random.stateless_uniform([], s, minval=lo, maxval=hi)  # noqa
  return ColorJitter(
      apply=tf.random.stateless_uniform([], seeds[0]) < p,
      order=tf.random.experimental.stateless_shuffle(tf.range(4, dtype=tf.int32), seeds[1]),
      brightness=u(seeds[2], max(0.0, 1.0 - brightness), 1.0 + brightness),
      contrast=u(seeds[3], max(0.0, 1.0 - contrast), 1.0 + contrast),
      saturation=u(seeds[4], max(0.0, 1.0 - saturation), 1.0 + saturation),
      hue=u(seeds[5], -hue, hue))


def color_jitter(image: tf.Tensor, params: ColorJitter) -> tf.Tensor:
  """Applies the sampled jitter (if ``params.apply``) in ``params.order``; RGB in [0, 1]."""
  branches = [
      lambda x: adjust_brightness(x, params.brightness),
      lambda x: adjust_contrast(x, params.contrast),
      lambda x: adjust_saturation(x, params.saturation),
      lambda x: adjust_hue(x, params.hue),
  ]

  def _jitter():
    out = image
    for i in range(4):
      out = tf.switch_case(params.order[i], [lambda b=b, x=out: b(x) for b in branches])
    return out

  return tf.cond(params.apply, _jitter, lambda: tf.identity(image))


def grayscale(image: tf.Tensor) -> tf.Tensor:
  """``RandomGrayscale(p=1)`` on RGB: three equal channels of ITU-R 601 luma."""
  return tf.tile(rgb_to_grayscale(image), [1, 1, 3])


def solarize(image: tf.Tensor) -> tf.Tensor:
  """PIL ``ImageOps.solarize`` (threshold 128 of 255): inverts pixels at/above it. On
  un-rounded floats the threshold is exactly 0.5, so this is ``min(x, 1 - x)``: one fused
  op instead of a compare and a (slow) broadcasting select.
  """
  return tf.minimum(image, 1.0 - image)


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor) -> tf.Tensor:
  """Separable Gaussian blur with standard deviation ``sigma`` (PIL's ``radius``): a kernel
  of ``round(4 sigma)`` taps each side (scipy's truncation; at most ``BLUR_RADIUS``) summing
  to 1, borders mirrored with the edge repeated (scipy's ``reflect``, close to PIL's).
  """
  sigma = tf.convert_to_tensor(sigma, tf.float32)
  # scipy: int(truncate * sigma + 0.5); cost grows with the taps, so no wider than needed.
  radius = tf.clip_by_value(tf.cast(4.0 * sigma + 0.5, tf.int32), 1, BLUR_RADIUS)
  x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
  kernel = tf.exp(-0.5 * tf.square(x / sigma))
  kernel /= tf.reduce_sum(kernel)
  channels = image.shape[-1]
  padded = tf.pad(image, [[radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
  batch = padded[tf.newaxis]
  k_y = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
  k_x = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
  batch = tf.nn.depthwise_conv2d(batch, k_y, strides=[1, 1, 1, 1], padding="VALID")
  batch = tf.nn.depthwise_conv2d(batch, k_x, strides=[1, 1, 1, 1], padding="VALID")
  return tf.clip_by_value(batch[0], 0.0, 1.0)


class StrongOp(NamedTuple):
  """Parameters of the ``RandomChoice([grayscale, solarize, blur])`` draw."""
  op: tf.Tensor  # int32 indexing image_utils.STRONG_OPS, uniform over the op choices
  sigma: tf.Tensor  # blur sigma ~ U(0.1, 2.0) (drawn always, used only for blur)


def sample_strong_op(seed: tf.Tensor, sigma_range: tuple[float, float] = BLUR_SIGMA,
                     op_choices: tuple[int, ...] = image_utils.METHOD_OP_CHOICES
                     ) -> StrongOp:
  """Samples which of ``op_choices`` (``image_utils.STRONG_OPS`` indices; the method's:
  grayscale, solarize, blur) view 2 gets, and the blur's sigma."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  draw = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=len(op_choices),
                                     dtype=tf.int32)
  op = tf.gather(tf.constant(op_choices, tf.int32), draw)
  sigma = tf.random.stateless_uniform([], seeds[1], minval=sigma_range[0],
                                      maxval=sigma_range[1])
  return StrongOp(op, sigma)


def apply_strong_op(image: tf.Tensor, params: StrongOp) -> tf.Tensor:
  """Applies exactly one of grayscale / solarize / blur / none, as ``params.op`` says."""
  return tf.switch_case(params.op, [
      lambda: grayscale(image),
      lambda: solarize(image),
      lambda: gaussian_blur(image, params.sigma),
      lambda: tf.identity(image),
  ])


# ----------------------------------------------------------------------------- views
def normalize(image: tf.Tensor) -> tf.Tensor:
  """``(x - mean) / std`` with ImageNet constants (averaged for one channel)."""
  mean, std = image_utils.normalization_constants(image.shape[-1])
  return (image - tf.constant(mean, image.dtype)) / tf.constant(std, image.dtype)


def weak_view(image: tf.Tensor, seed: tf.Tensor, size: int, flip: bool = True) -> tf.Tensor:
  """View 1 without normalisation: crop after reflect padding, flip. ``image`` is already
  resized (shorter side == ``size``)."""
  shape = tf.shape(image)
  return crop_flip(image, sample_crop_flip(seed, shape[0], shape[1], size, flip=flip), size)


def strong_view(image: tf.Tensor, seed: tf.Tensor, size: int,
                recipe: image_utils.ViewRecipe = image_utils.ViewRecipe()) -> tf.Tensor:
  """View 2 without normalisation: the weak geometry (own draw), colour jitter with p 0.8,
  then one of ``recipe.op_choices`` (the method's: grayscale / solarize / blur). ``image``
  is resized RGB or grey (1 channel); grey images are processed as RGB (colour ops keep the
  channels equal) and returned grey.
  """
  geometry_seed, jitter, strong = strong_view_draws(seed, recipe.op_choices)
  view = to_rgb(weak_view(image, geometry_seed, size, recipe.flip))
  view = apply_strong_op(color_jitter(view, jitter), strong)
  return view if image.shape[-1] == 3 else view[..., :1]


def two_views(image: tf.Tensor, seed: tf.Tensor, size: int, *, normalized: bool = True,
              recipe: image_utils.ViewRecipe = image_utils.ViewRecipe()
              ) -> tuple[tf.Tensor, tf.Tensor]:
  """LUT's (weak, strong) float32 ``(size, size, C)`` views of one decoded image (``decode``'s
  output), a pure function of the int64 ``[2]`` ``seed``; ImageNet-normalised, or in [0, 1]
  without ``normalized``. Both share the (deterministic) resize.
  """
  seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  resized = resize_shorter_side(image, size)
  view1 = weak_view(resized, seed1, size, recipe.flip)
  view2 = strong_view(resized, seed2, size, recipe)
  if normalized:
    view1, view2 = normalize(view1), normalize(view2)
  return view1, view2


def first_view(image: tf.Tensor, seed: tf.Tensor, size: int, *, normalized: bool = True,
               recipe: image_utils.ViewRecipe = image_utils.ViewRecipe()) -> tf.Tensor:
  """View 1 of :func:`two_views` alone (the MAE baseline needs no view 2): the same crop
  and flip for the same ``seed``."""
  seed1, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  view1 = weak_view(resize_shorter_side(image, size), seed1, size, recipe.flip)
  return normalize(view1) if normalized else view1


def strong_view_draws(seed: tf.Tensor,
                      op_choices: tuple[int, ...] = image_utils.METHOD_OP_CHOICES
                      ) -> tuple[tf.Tensor, ColorJitter, StrongOp]:
  """``strong_view``'s three draws, not applied: (crop/flip seed, jitter, strong op)."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  return (seeds[0], sample_color_jitter(seeds[1]),
          sample_strong_op(seeds[2], op_choices=op_choices))


def two_views_geometric(image: tf.Tensor, seed: tf.Tensor, size: int,
                        recipe: image_utils.ViewRecipe = image_utils.ViewRecipe()
                        ) -> tuple[tf.Tensor, tf.Tensor, ColorJitter, StrongOp]:
  """``two_views`` split for ``input.device_augment``: the two crop/flip views (in [0, 1])
  and view 2's colour parameters, which ``color_jitter`` then ``apply_strong_op`` turn into
  ``two_views(..., normalized=False)`` exactly (:mod:`lut_jax.data.device_augment` applies
  them in JAX).
  """
  seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  resized = resize_shorter_side(image, size)
  view1 = weak_view(resized, seed1, size, recipe.flip)
  geometry_seed, jitter, strong = strong_view_draws(seed2, recipe.op_choices)
  return view1, weak_view(resized, geometry_seed, size, recipe.flip), jitter, strong


def eval_view(image: tf.Tensor, size: int, crop_pct: float, *,
              normalized: bool = True) -> tf.Tensor:
  """Deterministic evaluation view: resize shorter side to ``int(size / crop_pct)``, centre
  crop ``size`` (the reference's / MAE's eval transform), normalise."""
  resized = resize_shorter_side(image, int(size / crop_pct))
  view = center_crop(resized, size)
  return normalize(view) if normalized else view
