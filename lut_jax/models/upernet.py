"""UperNet and the ViT neck of BEiT's semantic-segmentation protocol (MAE and LUT use it).

* :class:`MultiLevelNeck` (BEiT's ``fpn1`` .. ``fpn4``): each ViT feature map rescaled by
  its factor: 4 = 2x2 transposed conv -> norm -> GELU -> 2x2 transposed conv; 2 = one
  transposed conv; 1 = identity; 1/2, 1/4, ... = max-pooling (patch 16 and (4, 2, 1, 1/2):
  strides 4, 8, 16 and 32).
* :class:`UperNetHead` (mmseg's ``UPerHead``): pyramid pooling (PyTorch's adaptive bins
  1, 2, 3, 6) on the coarsest level, 1x1 lateral convs on the others, a top-down pathway,
  3x3 convs, all levels upsampled to the finest and concatenated, a fused 3x3 conv,
  channel dropout and a 1x1 classifier.
* :class:`FCNHead`: the auxiliary head (one 3x3 conv, dropout, 1x1 classifier) on one level.

Every conv is mmseg's ``ConvModule`` (conv without bias -> norm -> ReLU, He normal fan-out;
classifiers N(0, 0.01)). ``"batch"`` norm is the recipe's SyncBN (under ``jax.jit`` with a
batch-sharded input the statistics are the global batch's); ``"group"`` (32 groups) has no
batch statistics, for batches too small for BatchNorm.

Upsampling is bilinear with half-pixel centres and no antialiasing (PyTorch's
``interpolate(mode="bilinear", align_corners=False)``). Images are NHWC. No TensorFlow.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lut_jax.models import vit

NORMS = ("batch", "group")
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # mmcv kaiming_init
classifier_init = nn.initializers.normal(stddev=0.01)


def resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of NHWC maps to ``size`` (height, width); a no-op at that size."""
  size = tuple(int(s) for s in size)
  if x.shape[1:3] == size:
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "bilinear",
                          antialias=False).astype(x.dtype)


def adaptive_bins(length: int, bins: int) -> np.ndarray:
  """``(bins, length)`` averaging matrix of PyTorch's ``AdaptiveAvgPool``: bin ``i``
  averages ``[floor(i L / n), ceil((i + 1) L / n))`` (bins overlap when ``n`` does not
  divide ``L``)."""
  weights = np.zeros((bins, length), np.float32)
  for i in range(bins):
    start, stop = (i * length) // bins, -(-((i + 1) * length) // bins)
    weights[i, start:stop] = 1.0 / (stop - start)
  return weights


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
  """NHWC -> ``(N, bins, bins, C)`` by PyTorch's adaptive average pooling."""
  rows = jnp.asarray(adaptive_bins(x.shape[1], bins), x.dtype)
  cols = jnp.asarray(adaptive_bins(x.shape[2], bins), x.dtype)
  return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, x)


class Norm(nn.Module):
  """BatchNorm over every position of every example, or GroupNorm (see module doc)."""

  kind: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.kind == "batch":
      flat = x.reshape(-1, x.shape[-1])  # statistics over (N, H, W), as BatchNorm2d
      return vit.BatchNorm(dtype=self.dtype, name="bn")(
          flat, use_running_average=not train).reshape(x.shape)
    if self.kind == "group":
      groups = math.gcd(32, x.shape[-1])
      return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype, name="gn")(x)
    raise ValueError(f"unknown norm {self.kind!r}; expected one of {NORMS}")


class ConvNormAct(nn.Module):
  """mmseg's ``ConvModule``: conv (no bias) -> norm -> ReLU, 'same' padding."""

  features: int
  kernel_size: int = 1
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    k = self.kernel_size
    x = nn.Conv(self.features, (k, k), padding=k // 2, use_bias=False, dtype=self.dtype,
                kernel_init=conv_init, name="conv")(x)
    return nn.relu(Norm(self.norm, self.dtype, name="norm")(x, train=train))


def check_rescale(factor: float) -> None:
  """Raises ``ValueError`` unless ``factor`` is 4, 2, 1 or 1 / 2**k."""
  if factor in (4, 2, 1):
    return
  inverse = 1.0 / factor if factor > 0 else 0.0
  if not (0 < factor < 1 and inverse == round(inverse) and int(inverse) & (int(inverse) - 1) == 0):
    raise ValueError(f"rescale factor {factor} is not one of 4, 2, 1, 1/2, 1/4, ...")


class Rescale(nn.Module):
  """One level of :class:`MultiLevelNeck` (BEiT's ``fpnN``)."""

  factor: float
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    check_rescale(self.factor)
    width = x.shape[-1]
    deconv = lambda name: nn.ConvTranspose(width, (2, 2), strides=(2, 2),  # noqa: E731
                                           padding="VALID", dtype=self.dtype, name=name)
    if self.factor == 4:
      x = deconv("deconv_0")(x)
      x = vit.gelu(Norm(self.norm, self.dtype, name="norm")(x, train=train))
      return deconv("deconv_1")(x)
    if self.factor == 2:
      return deconv("deconv_0")(x)
    if self.factor == 1:
      return x
    k = int(round(1.0 / self.factor))
    return nn.max_pool(x, (k, k), strides=(k, k))  # floor, as PyTorch's MaxPool2d


class MultiLevelNeck(nn.Module):
  """BEiT's ``fpn1..fpnN``: feature map ``i`` rescaled by ``rescales[i]``."""

  rescales: Sequence[float] = (4, 2, 1, 0.5)
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool) -> list[jax.Array]:
    if len(features) != len(self.rescales):
      raise ValueError(f"{len(features)} feature maps for {len(self.rescales)} rescales")
    return [Rescale(r, self.norm, self.dtype, name=f"fpn{i + 1}")(x, train=train)
            for i, (x, r) in enumerate(zip(features, self.rescales))]


class UperNetHead(nn.Module):
  """mmseg's ``UPerHead`` on a finest-first list of maps -> logits at the finest level."""

  num_classes: int
  channels: int
  pool_scales: Sequence[int] = (1, 2, 3, 6)
  norm: str = "batch"
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array], *, train: bool) -> jax.Array:
    conv = lambda k, name: ConvNormAct(self.channels, k, self.norm, self.dtype,  # noqa: E731
                                       name=name)
    top = inputs[-1]
    pyramid = [top] + [
        resize(conv(1, f"psp_{s}")(adaptive_avg_pool(top, s), train=train), top.shape[1:3])
        for s in self.pool_scales]
    laterals = [conv(1, f"lateral_{i}")(x, train=train) for i, x in enumerate(inputs[:-1])]
    laterals.append(conv(3, "psp_bottleneck")(jnp.concatenate(pyramid, -1), train=train))
    for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse to fine
      laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(3, f"fpn_{i}")(x, train=train) for i, x in enumerate(laterals[:-1])]
    outs.append(laterals[-1])
    size = outs[0].shape[1:3]
    x = conv(3, "fpn_bottleneck")(jnp.concatenate([resize(o, size) for o in outs], -1),
                                  train=train)
    return classify(x, self.num_classes, self.dropout, train, self.dtype)


class FCNHead(nn.Module):
  """mmseg's ``FCNHead`` with one conv and no input concatenation (BEiT's auxiliary head)."""

  num_classes: int
  channels: int = 256
  norm: str = "batch"
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = ConvNormAct(self.channels, 3, self.norm, self.dtype, name="conv_0")(x, train=train)
    return classify(x, self.num_classes, self.dropout, train, self.dtype)


def classify(x: jax.Array, num_classes: int, dropout: float, train: bool,
             dtype: Any) -> jax.Array:
  """Channel dropout (PyTorch's ``Dropout2d``: whole maps) then the 1x1 classifier
  ``conv_seg`` (created in the calling module's scope)."""
  x = nn.Dropout(dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
  return nn.Conv(num_classes, (1, 1), dtype=dtype, kernel_init=classifier_init,
                 name="conv_seg")(x)
