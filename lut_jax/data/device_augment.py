"""LUT's view-2 colour augmentations and the normalisation of both views, in JAX.

With ``input.device_augment`` the host pipeline only decodes, resizes and crops/flips: it
ships both views as uint8 crops plus view 2's colour parameters (``view2_params``, laid out
as ``pack_params``), and ``finish_batch`` turns the batch into the normalised float32
``{"view1", "view2"}`` the train step takes: less host work and fewer bytes to the device
for a little elementwise work on it (docs/benchmarks.md).

The ops are ``augment.py``'s (torchvision semantics: colour jitter with p 0.8 in a random
order, then one of grayscale / solarize / blur, then ImageNet normalisation), restated per
example and vmapped, branching by ``jnp.where`` / ``lax.switch`` (selects under ``vmap``:
every candidate computed for every example, cheap on an accelerator). For the same input and
parameters each equals its ``augment.py`` counterpart to float32 rounding. ``sample_params``
draws the parameters from per-example JAX keys instead. No TensorFlow: part of the core.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from lut_jax.data import image_utils

# ITU-R 601-2 luma (PIL "L"), as augment.GRAY_WEIGHTS: the reference's grey conversion.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
JITTER_PROB = 0.8
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # indexed by ``order``
BLUR_SIGMA = (0.1, 2.0)
BLUR_RADIUS = 8  # widest kernel radius (augment.BLUR_RADIUS); smaller sigmas zero the rest

# Keys of a device-augmentation batch from input_pipeline (input.device_augment = True).
VIEW1_CROP, VIEW2_CROP, VIEW2_PARAMS = "view1_crop", "view2_crop", "view2_params"
# Layout of one example's packed parameters (float32; flags and indices are exact in it).
PARAM_FIELDS = ("apply", "order0", "order1", "order2", "order3", "brightness", "contrast",
                "saturation", "hue", "op", "sigma")
NUM_PARAMS = len(PARAM_FIELDS)


class ColourParams(NamedTuple):
  """View-2 colour parameters; leading axis = batch (or none, for one example)."""
  apply: jax.Array  # bool: jitter applied (p = 0.8)
  order: jax.Array  # int32 [..., 4]: permutation of range(4) indexing JITTER_OPS
  brightness: jax.Array  # float32, U[0.6, 1.4]
  contrast: jax.Array  # float32, U[0.6, 1.4]
  saturation: jax.Array  # float32, U[0.8, 1.2]
  hue: jax.Array  # float32, U[-0.1, 0.1] (turns)
  op: jax.Array  # int32 indexing image_utils.STRONG_OPS
  sigma: jax.Array  # float32 blur sigma, U(0.1, 2.0) (used only when op == 2)


def pack_params(params: ColourParams) -> jax.Array:
  """``ColourParams`` -> float32 ``[..., NUM_PARAMS]`` in ``PARAM_FIELDS`` order."""
  f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return jnp.concatenate([
      f(params.apply)[..., None], f(params.order),
      jnp.stack([f(params.brightness), f(params.contrast), f(params.saturation),
                 f(params.hue), f(params.op), f(params.sigma)], axis=-1)], axis=-1)


def unpack_params(packed: jax.Array) -> ColourParams:
  """Float32 ``[..., NUM_PARAMS]`` (``PARAM_FIELDS`` order) -> ``ColourParams``."""
  packed = jnp.asarray(packed, jnp.float32)
  if packed.shape[-1] != NUM_PARAMS:
    raise ValueError(f"packed colour parameters need {NUM_PARAMS} values per example "
                     f"({', '.join(PARAM_FIELDS)}), got shape {packed.shape}")
  col = lambda i: packed[..., i]  # noqa: E731
  # Indices are stored exactly (small integers); round anyway so a cast never truncates.
  idx = lambda x: jnp.round(x).astype(jnp.int32)  # noqa: E731
  return ColourParams(apply=col(0) > 0.5, order=idx(packed[..., 1:5]), brightness=col(5),
                      contrast=col(6), saturation=col(7), hue=col(8), op=idx(col(9)),
                      sigma=col(10))


def sample_params_one(key: jax.Array,
                      op_choices: tuple[int, ...] = image_utils.METHOD_OP_CHOICES
                      ) -> ColourParams:
  """One example's parameters from its own key; the strong op uniform over ``op_choices``
  (``image_utils.view2_op_choices``)."""
  keys = jax.random.split(key, 8)
  u = lambda k, lo, hi: jax.random.uniform(k, (), jnp.float32, lo, hi)  # noqa: E731
  return ColourParams(
      apply=jax.random.uniform(keys[0], ()) < JITTER_PROB,
      order=jax.random.permutation(keys[1], 4).astype(jnp.int32),
      brightness=u(keys[2], 1.0 - BRIGHTNESS, 1.0 + BRIGHTNESS),
      contrast=u(keys[3], 1.0 - CONTRAST, 1.0 + CONTRAST),
      saturation=u(keys[4], 1.0 - SATURATION, 1.0 + SATURATION),
      hue=u(keys[5], -HUE, HUE),
      op=jnp.asarray(op_choices, jnp.int32)[
          jax.random.randint(keys[6], (), 0, len(op_choices), jnp.int32)],
      sigma=u(keys[7], *BLUR_SIGMA))


def sample_params(key: jax.Array, num: int,
                  op_choices: tuple[int, ...] = image_utils.METHOD_OP_CHOICES
                  ) -> ColourParams:
  """Draws ``num`` examples' parameters, each from its own key (``split(key, num)``)."""
  return jax.vmap(lambda k: sample_params_one(k, op_choices))(jax.random.split(key, num))


# ----------------------------------------------------------------------------- per-image ops
# Each takes one float32 HWC RGB image in [0, 1] and scalar parameters.
def rgb_to_grayscale(image: jax.Array) -> jax.Array:
  """``(..., 3) -> (..., 1)`` ITU-R 601 luma, summed in augment.py's order."""
  r, g, b = GRAY_WEIGHTS
  return image[..., 0:1] * r + image[..., 1:2] * g + image[..., 2:3] * b


def _blend(image1: jax.Array, image2: jax.Array, ratio: jax.Array) -> jax.Array:
  # torchvision F._blend, clamped to the valid range.
  return jnp.clip(ratio * image1 + (1.0 - ratio) * image2, 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Blend with black."""
  return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Blend with the mean luma of the whole image."""
  mean = jnp.sum(jnp.mean(image, axis=(0, 1)) * jnp.asarray(GRAY_WEIGHTS, image.dtype))
  return _blend(image, mean, factor)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Blend with the per-pixel luma."""
  return _blend(image, rgb_to_grayscale(image), factor)


def adjust_hue(image: jax.Array, delta: jax.Array) -> jax.Array:
  """Rotates the HSV hue by ``delta`` turns as TensorFlow's ``adjust_hue`` CPU kernel does,
  in "hue sextant + (max, mid, min)" form: the sextant and the channels' roles come from
  comparisons, the position in the sextant is ``(mid - min) / (max - min)``. Its float32
  steps and tie-breaking, restated, keep the result equal to augment.adjust_hue to rounding
  (plain HSV formulas would not); only compares and selects, which vectorise and fuse.
  """
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  category = jnp.where(r < g,
                       jnp.where(b < r, 1, jnp.where(b > g, 3, 2)),
                       jnp.where(b < g, 0, jnp.where(b > r, 4, 5)))
  v_max = jnp.maximum(jnp.maximum(r, g), b)
  v_min = jnp.minimum(jnp.minimum(r, g), b)
  # The channel that is neither max nor min, as the kernel picks it in each sextant.
  v_mid = jnp.where((category == 1) | (category == 4), r,
                    jnp.where((category == 0) | (category == 3), g, b))
  ratio = (v_mid - v_min) / (v_max - v_min)  # NaN for grey pixels: replaced below
  odd = (category & 1) == 1
  h = category.astype(image.dtype) + jnp.where(odd, 1.0 - ratio, ratio)
  h = jnp.where(v_max == v_min, 0.0, h)
  h = h + jnp.asarray(delta, image.dtype) * 6.0
  h = jnp.where(h < 0.0, h + 6.0, h)  # |delta| <= 1/2: one wrap each way is enough
  h = jnp.where(h >= 6.0, h - 6.0, h)
  c = jnp.clip(h.astype(jnp.int32), 0, 5)  # h >= 0: truncation is the kernel's floor
  new_ratio = h - c.astype(image.dtype)
  new_ratio = jnp.where((c & 1) == 1, 1.0 - new_ratio, new_ratio)
  new_mid = v_min + new_ratio * (v_max - v_min)
  # Sextant -> (r, g, b) roles: 0 (max, mid, min), 1 (mid, max, min), 2 (min, max, mid),
  # 3 (min, mid, max), 4 (mid, min, max), 5 (max, min, mid).
  out_r = jnp.where((c == 0) | (c == 5), v_max, jnp.where((c == 1) | (c == 4), new_mid, v_min))
  out_g = jnp.where((c == 1) | (c == 2), v_max, jnp.where((c == 0) | (c == 3), new_mid, v_min))
  out_b = jnp.where((c == 3) | (c == 4), v_max, jnp.where((c == 2) | (c == 5), new_mid, v_min))
  return jnp.clip(jnp.stack([out_r, out_g, out_b], axis=-1), 0.0, 1.0)


def grayscale(image: jax.Array) -> jax.Array:
  """Three equal channels of ITU-R 601 luma."""
  return jnp.broadcast_to(rgb_to_grayscale(image), image.shape)


def solarize(image: jax.Array) -> jax.Array:
  """PIL ``solarize(128)`` on un-rounded floats: invert at/above 0.5, i.e. min(x, 1 - x)."""
  return jnp.minimum(image, 1.0 - image)


def blur_kernel(sigma: jax.Array) -> jax.Array:
  """The 1-D Gaussian of augment.gaussian_blur, zero-padded to ``2 * BLUR_RADIUS + 1`` taps.
  Radius ``int(4 sigma + 0.5)`` clipped to [1, BLUR_RADIUS] (scipy's truncation), normalised
  over the taps it keeps. A fixed width keeps shapes static under vmap/jit."""
  sigma = jnp.asarray(sigma, jnp.float32)
  radius = jnp.clip((4.0 * sigma + 0.5).astype(jnp.int32), 1, BLUR_RADIUS)
  x = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
  kernel = jnp.where(jnp.abs(x) <= radius, jnp.exp(-0.5 * jnp.square(x / sigma)), 0.0)
  return kernel / jnp.sum(kernel)


def gaussian_blur(image: jax.Array, sigma: jax.Array) -> jax.Array:
  """Separable Gaussian blur, mirrored edges (edge pixel repeated), as augment.py.

  Padding by the full ``BLUR_RADIUS`` and using only the taps within the example's radius
  reads exactly the pixels that padding by that radius would (the inner part of a
  symmetric padding is the narrower symmetric padding). The taps are a sum of shifted
  slices: one fused elementwise loop per axis on any backend, per-example kernels for free.
  """
  kernel = blur_kernel(sigma).astype(image.dtype)
  height, width = image.shape[0], image.shape[1]
  taps = 2 * BLUR_RADIUS + 1
  padded = jnp.pad(image, ((BLUR_RADIUS, BLUR_RADIUS), (BLUR_RADIUS, BLUR_RADIUS), (0, 0)),
                   mode="symmetric")
  rows = sum(kernel[t] * padded[t:t + height] for t in range(taps))
  out = sum(kernel[t] * rows[:, t:t + width] for t in range(taps))
  return jnp.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------------------- per example
def _jitter_step(image: jax.Array, op: jax.Array, params: ColourParams) -> jax.Array:
  """One ColorJitter step: ``op`` indexes JITTER_OPS. Brightness, contrast and saturation are
  the same blend with different targets (black, the image's mean luma, each pixel's luma), so a
  step is one blend with a selected target and factor, or the hue rotation: under vmap every
  example pays for 2 candidate results, not 4, with the same float32 operations as the separate
  ``adjust_*`` functions."""
  factor = jnp.where(op == 0, params.brightness,
                     jnp.where(op == 1, params.contrast, params.saturation))
  luma = rgb_to_grayscale(image)
  mean = jnp.sum(jnp.mean(image, axis=(0, 1)) * jnp.asarray(GRAY_WEIGHTS, image.dtype))
  target = jnp.where(op == 0, 0.0, jnp.where(op == 1, mean, luma))
  return jnp.where(op == 3, adjust_hue(image, params.hue), _blend(image, target, factor))


def color_jitter(image: jax.Array, params: ColourParams) -> jax.Array:
  """One example's ``RandomApply(ColorJitter)``: the four ops in ``params.order``."""
  out = image
  for i in range(len(JITTER_OPS)):
    out = _jitter_step(out, params.order[i], params)
  return jnp.where(params.apply, out, image)


def apply_strong_op(image: jax.Array, op: jax.Array, sigma: jax.Array) -> jax.Array:
  """One example's grayscale / solarize / blur / none, as ``op`` says."""
  return lax.switch(op, (grayscale, solarize, lambda x: gaussian_blur(x, sigma),
                         lambda x: x), image)


def _colour_one(image: jax.Array, params: ColourParams) -> jax.Array:
  channels = image.shape[-1]
  # Grey (1-channel) views go through the colour ops as RGB, like augment.strong_view.
  rgb = image if channels == 3 else jnp.broadcast_to(image, image.shape[:-1] + (3,))
  out = apply_strong_op(color_jitter(rgb, params), params.op, params.sigma)
  return out if channels == 3 else out[..., :1]


# ----------------------------------------------------------------------------- batches
def to_unit(images: jax.Array) -> jax.Array:
  """uint8 0..255 -> float32 0..1; float input is taken to be in [0, 1] already."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def colour_augment(images: jax.Array, params: ColourParams) -> jax.Array:
  """View 2's colour part on a batch: NHWC (C = 3 or 1), uint8 or [0, 1] -> [0, 1]."""
  images = to_unit(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be NHWC with 1 or 3 channels, got {images.shape}")
  if min(images.shape[1:3]) < BLUR_RADIUS:
    raise ValueError(f"images must be at least {BLUR_RADIUS} px (blur padding), got "
                     f"{images.shape}")
  return jax.vmap(_colour_one)(images, params)


def normalize(images: jax.Array) -> jax.Array:
  """uint8 or [0, 1] NHWC -> ``(x - mean) / std`` with ImageNet constants."""
  images = to_unit(images)
  mean, std = image_utils.normalization_constants(images.shape[-1])
  return (images - jnp.asarray(mean)) / jnp.asarray(std)


def strong_view(images: jax.Array, key: jax.Array) -> jax.Array:
  """Geometric view-2 crops -> normalised view 2, parameters drawn per example from
  ``key``."""
  return normalize(colour_augment(images, sample_params(key, images.shape[0])))


def finish_batch(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """A device-augmentation batch -> ``{"view1", "view2"}`` normalised float32 NHWC. ``batch``
  holds ``view1_crop``/``view2_crop`` (uint8 NHWC) and ``view2_params`` (float32
  ``[B, NUM_PARAMS]``), as input_pipeline yields with ``input.device_augment = True``. Jit it;
  with batch-sharded inputs every op is per example, so it runs where the data is."""
  out = {"view1": normalize(batch[VIEW1_CROP])}
  if VIEW2_CROP in batch:  # absent for the MAE baseline (one view)
    view2 = colour_augment(batch[VIEW2_CROP], unpack_params(batch[VIEW2_PARAMS]))
    out["view2"] = normalize(view2)
  return out

