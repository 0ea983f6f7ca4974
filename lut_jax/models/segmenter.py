"""The segmentation model (pre-trained ViT -> multi-level features -> neck -> UperNet) and
its inference: whole-image and sliding-window logits. No TensorFlow.

Backbone (BEiT's ``out_indices``): the patch tokens after four blocks of the pre-trained
encoder as ``(grid, grid, width)`` maps, without the final LayerNorm (BEiT's has none
there). The blocks (from one) are at a third, half, two thirds and all of the depth,
rounded: 4, 6, 8, 12 of 12 (BEiT's ``[3, 5, 7, 11]``), 8, 12, 16, 24 of 24, 2, 3, 4, 6 of
6; a depth below 4 repeats blocks (:func:`feature_blocks`). The fixed sin-cos positions
follow the grid, so the encoder runs at the crop size whatever size it was pre-trained at
(learned position tables are refused when loaded: none needs interpolating).

The encoder's parameters keep their pre-trained names under ``params["encoder"]``, so
:func:`lut_jax.runtime.optim.layer_id` puts them in layers ``0 .. depth`` of the layer-wise
lr decay and the new neck and heads in layer ``depth + 1`` (BEiT's
``LayerDecayOptimizerConstructor``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lut_jax.models import classifier, upernet, variants, vit

EVAL_MODES = ("whole", "slide")


def feature_blocks(depth: int) -> tuple[int, ...]:
  """0-based indices of the blocks whose outputs feed the neck (see module doc)."""
  if depth < 1:
    raise ValueError(f"depth must be positive, got {depth}")
  ends = [max(1, (depth + 1) // 3), max(1, depth // 2), max(1, (2 * depth + 1) // 3), depth]
  return tuple(e - 1 for e in ends)


def token_maps(tokens: Sequence[jax.Array]) -> list[jax.Array]:
  """Token sequences ``(batch, 1 + grid**2, width)`` (cls first) -> patch-token maps
  ``(batch, grid, grid, width)``."""
  out = []
  for x in tokens:
    grid = int(round((x.shape[1] - 1) ** 0.5))
    out.append(x[:, 1:].reshape(x.shape[0], grid, grid, x.shape[-1]))
  return out


class SegmentationViT(vit.EncoderArchitecture, kw_only=True):
  """Pre-trained encoder + :class:`upernet.MultiLevelNeck` + :class:`upernet.UperNetHead`
  (+ the auxiliary :class:`upernet.FCNHead` on level ``aux_level`` when ``aux_channels``).
  Returns ``{"logits"}`` (and ``"aux_logits"`` in training) as float32
  ``(batch, H, W, num_classes)`` at the input's resolution (bilinear upsampling, as mmseg
  before its loss and in inference)."""

  num_classes: int
  feature_blocks: Sequence[int]
  rescales: Sequence[float] = (4, 2, 1, 0.5)
  channels: int = 768
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  aux_channels: int = 256  # 0: no auxiliary head
  aux_level: int = 2
  norm: str = "batch"
  dropout: float = 0.1
  drop_path_rate: float = 0.1
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    # The pre-trained encoder's own module (same parameters, same forward), returning the
    # tokens after the feature blocks; BEiT's features have no final norm.
    maps = token_maps(vit.Encoder(
        **variants.EncoderConfig.of(self).kwargs(), drop_path_rate=self.drop_path_rate,
        final_norm=False, dtype=self.dtype, remat=self.remat,
        attention_impl=self.attention_impl, output_blocks=tuple(self.feature_blocks),
        name="encoder")(images, deterministic=not train))
    levels = upernet.MultiLevelNeck(tuple(self.rescales), self.norm, self.dtype,
                                    name="neck")(maps, train=train)
    size = images.shape[1:3]
    logits = upernet.UperNetHead(self.num_classes, self.channels, tuple(self.pool_scales),
                                 self.norm, self.dropout, self.dtype,
                                 name="decode_head")(levels, train=train)
    out = {"logits": upernet.resize(logits.astype(jnp.float32), size)}
    # The auxiliary head only shapes training (BEiT's loss weight 0.4); inference skips it.
    if self.aux_channels and (train or self.is_initializing()):
      aux = upernet.FCNHead(self.num_classes, self.aux_channels, self.norm, self.dropout,
                            self.dtype, name="auxiliary_head")(levels[self.aux_level],
                                                               train=train)
      out["aux_logits"] = upernet.resize(aux.astype(jnp.float32), size)
    return out


def build_model(encoder: variants.EncoderConfig, *, num_classes: int, image_size: int,
                **kwargs) -> SegmentationViT:
  """The segmentation model around a pre-trained encoder's architecture; ``kwargs`` are
  :class:`SegmentationViT` fields (``feature_blocks`` defaults to :func:`feature_blocks` of
  the depth, ``channels`` to the encoder width when <= 0)."""
  if image_size % encoder.patch_size:
    raise ValueError(f"image size {image_size} is not divisible by patch size "
                     f"{encoder.patch_size}")
  kwargs = dict(kwargs)
  if not kwargs.get("feature_blocks"):
    kwargs["feature_blocks"] = feature_blocks(encoder.depth)
  if kwargs.get("channels", 0) <= 0:
    kwargs["channels"] = encoder.width
  return SegmentationViT(num_classes=num_classes, **encoder.kwargs(image_size=image_size),
                         **kwargs)


def init_variables(model: SegmentationViT, key: jax.Array, pretrained_params: Any,
                   channels: int) -> dict[str, Any]:
  """``{"params", "batch_stats"}``: fresh neck and heads, the pre-trained encoder (its
  final norm dropped; anything else that does not fit is an error)."""
  images = jnp.zeros((1, model.image_size, model.image_size, channels), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(key, images)
  params = dict(variables["params"])
  params["encoder"] = classifier.copy_pretrained_encoder(params["encoder"], pretrained_params)
  return {"params": params, "batch_stats": variables.get("batch_stats", {})}


# ------------------------------------------------------------------------ inference
def window_starts(size: jax.Array, canvas: int, crop: int, stride: int) -> tuple[jax.Array,
                                                                               jax.Array]:
  """Origins of mmseg's sliding windows along one axis of an image ``size`` pixels long
  (traced) in a ``canvas`` (static) -> ``(starts, valid)`` of static length.

  mmseg: ``n = max(size - crop + stride - 1, 0) // stride + 1`` windows at
  ``max(min(i * stride, size - crop), 0)``: the last one flush with the image's end.
  """
  count = max(canvas - crop + stride - 1, 0) // stride + 1  # the most any size can need
  i = jnp.arange(count)
  n = jnp.maximum(size - crop + stride - 1, 0) // stride + 1
  return jnp.maximum(jnp.minimum(i * stride, size - crop), 0), i < n


def slide_logits(forward: Callable[[jax.Array], jax.Array], image: jax.Array,
                 size: jax.Array, *, crop: int, stride: int, num_classes: int) -> jax.Array:
  """Sliding-window logits of one image, ``(H, W, num_classes)`` float32: the mean of the
  logits of every window that covers a pixel (mmseg's ``slide_inference``), zero outside.
  ``forward``: ``(n, crop, crop, C) -> (n, crop, crop, num_classes)`` logits. ``image``
  ``(H, W, C)``, at least ``crop`` on each side: the image in its top-left ``size`` (``(2,)``
  int, may be traced) corner, padding beyond it (in a window only if the image is smaller than
  the crop). ``stride``: step between windows."""

  height, width = image.shape[:2]
  if height < crop or width < crop:
    raise ValueError(f"canvas {height}x{width} is smaller than the {crop}-pixel window")
  ys, y_ok = window_starts(size[0], height, crop, stride)
  xs, x_ok = window_starts(size[1], width, crop, stride)
  ys, xs = (a.reshape(-1) for a in jnp.meshgrid(ys, xs, indexing="ij"))
  valid = (y_ok[:, None] & x_ok[None, :]).reshape(-1)
  windows = jax.vmap(lambda y, x: jax.lax.dynamic_slice(
      image, (y, x, 0), (crop, crop, image.shape[2])))(ys, xs)
  logits = forward(windows).astype(jnp.float32)

  def add(carry, window):
    total, count = carry
    logit, y, x, ok = window
    weight = ok.astype(jnp.float32)
    total = jax.lax.dynamic_update_slice(
        total, jax.lax.dynamic_slice(total, (y, x, 0), (crop, crop, num_classes))
        + weight * logit, (y, x, 0))
    count = jax.lax.dynamic_update_slice(
        count, jax.lax.dynamic_slice(count, (y, x), (crop, crop)) + weight, (y, x))
    return (total, count), None

  init = (jnp.zeros((height, width, num_classes), jnp.float32),
          jnp.zeros((height, width), jnp.float32))
  (total, count), _ = jax.lax.scan(add, init, (logits, ys, xs, valid))
  return total / jnp.maximum(count, 1.0)[..., None]


def predict_logits(model: SegmentationViT, variables: dict[str, Any], images: jax.Array,
                   sizes: jax.Array, *, mode: str, stride: int) -> jax.Array:
  """``(B, H, W, num_classes)`` logits of a batch of canvases: ``"whole"`` (one pass over
  the canvas, which must be the model's size) or ``"slide"`` (model-size windows with
  ``stride``, per image, over its ``sizes[b]`` corner)."""
  forward = lambda x: model.apply(variables, x, train=False)["logits"]  # noqa: E731
  if mode == "whole":
    return forward(images)
  if mode != "slide":
    raise ValueError(f"unknown eval mode {mode!r}; expected one of {EVAL_MODES}")
  slide = functools.partial(slide_logits, forward, crop=model.image_size, stride=stride,
                            num_classes=model.num_classes)
  return jax.vmap(slide)(images, sizes)
