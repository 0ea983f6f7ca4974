"""LUT's objective as pure functions: reconstruction, broader-context (BC) and the total."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lut_jax import metrics


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """NHWC images -> ``(batch, L, p*p*C)`` patches, row-major patches, pixels ordered
  (row, column, channel) inside a patch: the MAE ``nhwpqc`` order."""
  n, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
  x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """Inverse of :func:`patchify` for square images."""
  n, num_patches, _ = patches.shape
  g = int(round(num_patches ** 0.5))
  p = patch_size
  x = patches.reshape(n, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, g * p, g * p, channels)


def reconstruction_target(images: jax.Array, patch_size: int, norm_pix: bool = True) -> jax.Array:
  """Per-patch target pixels; with ``norm_pix`` each patch is standardised by its mean and
  ``sqrt(var + 1e-6)``. The variance is the unbiased one (``torch.Tensor.var``'s default,
  which the reference uses)."""
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def reconstruction_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, *,
                        patch_size: int, norm_pix: bool = True) -> jax.Array:
  """Mean squared error per patch, averaged over the *hidden* patches (``mask == 1``)."""
  target = reconstruction_target(images, patch_size, norm_pix)
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def cosine_distance(q: jax.Array, z: jax.Array) -> jax.Array:
  """Per-example ``2 - 2 cos(q, z)``: 0 for equal directions, 4 for opposite ones."""
  q, z = metrics.l2_normalize(q), metrics.l2_normalize(z)
  return 2.0 - 2.0 * jnp.sum(q * z, axis=-1)


def bc_loss(q1: jax.Array, q2: jax.Array, z1: jax.Array, z2: jax.Array) -> jax.Array:
  """Symmetric cross-view loss: student view 2 vs teacher view 1 and student view 1 vs
  teacher view 2, each averaged over the batch, then averaged. The teacher vectors get no
  gradient."""
  z1, z2 = jax.lax.stop_gradient(z1), jax.lax.stop_gradient(z2)
  return 0.5 * (jnp.mean(cosine_distance(q2, z1)) + jnp.mean(cosine_distance(q1, z2)))


def normalized_std(v: jax.Array) -> jax.Array:
  """Mean over dimensions of the across-batch std of the L2-normalised rows of ``v``
  (BYOL/SimSiam's collapse indicator): about ``1/sqrt(dim)`` for well-spread vectors, 0 when
  every example maps to the same direction."""
  return jnp.mean(jnp.std(metrics.l2_normalize(v), axis=0))


def total_loss(rec: jax.Array, bc: jax.Array | float, *, w_mae: float, w_bc: float) -> jax.Array:
  """``w_mae * L_rec + w_bc * L_bc``."""
  return w_mae * rec + w_bc * bc
