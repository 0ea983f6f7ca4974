"""Mean attention distance per layer and head (Dosovitskiy et al. 2021, Fig. 7; LUT Fig. 4).

For a query patch the distance is the attention-weighted mean of the Euclidean distances,
in pixels, from its centre to the key patches' centres, averaged over query patches and
images: small means local attention, large global. The cls token (no position in the
image) is neither query nor key: each query's attention over the *patch* keys is
renormalised to sum to one (rather than counting cls as distance 0), so the measure says
*where among the patches* a head looks, whatever weight it parks on cls.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lut_jax.analysis import images as images_lib


def patch_centres(grid_size: int, patch_size: int) -> np.ndarray:
  """``(grid_size**2, 2)`` pixel coordinates (row, column) of the patch centres, patches
  in row-major order (the encoder's token order)."""
  idx = (np.arange(grid_size, dtype=np.float64) + 0.5) * patch_size
  rows, cols = np.meshgrid(idx, idx, indexing="ij")
  return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1)


def patch_distances(grid_size: int, patch_size: int) -> np.ndarray:
  """``(L, L)`` Euclidean distances in pixels between patch centres."""
  centres = patch_centres(grid_size, patch_size)
  return np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)


def patch_attention(probs: jax.Array, *, has_cls: bool = True) -> jax.Array:
  """Attention among patches only: ``(..., Q, K)`` -> ``(..., L, L)``, the cls query and
  key removed (when ``has_cls``) and every row renormalised over the patch keys."""
  probs = jnp.asarray(probs, jnp.float32)
  if has_cls:
    probs = probs[..., 1:, 1:]
  # A row can only sum to ~0 if a head puts all its weight on cls; the floor avoids 0/0.
  return probs / jnp.maximum(probs.sum(-1, keepdims=True), 1e-12)


def mean_attention_distance(probs: jax.Array, patch_size: int, *,
                            has_cls: bool = True) -> np.ndarray:
  """``(heads,)`` float64 mean attention distances in pixels: the mean over images and
  query patches of ``sum_k a[q, k] * ||c_q - c_k||``, from one layer's unmasked attention
  ``probs`` ``(batch, heads, queries, keys)`` (cls first when ``has_cls``).
  """
  attn = patch_attention(probs, has_cls=has_cls)
  num_patches = attn.shape[-1]
  grid = int(round(num_patches ** 0.5))
  if grid * grid != num_patches:
    raise ValueError(f"{num_patches} patch tokens do not form a square grid; pass the "
                     "attention of an unmasked image (and has_cls matching the tokens)")
  dist = jnp.asarray(patch_distances(grid, patch_size), jnp.float32)
  per_query = jnp.einsum("bhqk,qk->bhq", attn, dist)
  return np.asarray(per_query.mean(axis=(0, 2)), np.float64)


def collect_attention(encoder: Any, encoder_params: Any, images: jax.Array) -> list[jax.Array]:
  """The ``(batch, heads, 1 + L, 1 + L)`` attention probabilities (cls first) of every
  block of an :class:`~lut_jax.models.vit.Encoder`, in depth order: a mutable
  ``intermediates`` switches the attention layers to their explicit path, which sows them.
  """
  _, state = encoder.apply({"params": encoder_params}, images, mutable=["intermediates"])
  inter = state["intermediates"]
  blocks = sorted((k for k in inter if k.startswith("blocks_")), key=lambda k: int(k[7:]))
  return [inter[k]["attn"]["attention"][0] for k in blocks]


AttentionFn = Callable[[Any, jax.Array], list[jax.Array]]


def attention_distance_per_layer(encoder: Any, encoder_params: Any, images: np.ndarray, *,
                                 batch_size: int = 16,
                                 apply_fn: Optional[AttentionFn] = None) -> np.ndarray:
  """``(layers, heads)`` mean attention distances in pixels over ``images``, in chunks of
  ``batch_size`` (a ViT-B/16's attention matrices take ~22 MB per 224 px image), weighted
  by their real images. ``apply_fn(params, images)``: the per-block attention (default: a
  jitted :func:`collect_attention`), to share its compilation.
  """
  fn = apply_fn or jax.jit(lambda p, x: collect_attention(encoder, p, x))
  patch = encoder.patch_size
  total, count = None, 0
  for chunk, n in images_lib.batches(np.asarray(images), batch_size):
    probs = fn(encoder_params, jnp.asarray(chunk))
    per_layer = np.stack([mean_attention_distance(p[:n], patch) for p in probs])
    total = per_layer * n if total is None else total + per_layer * n
    count += n
  if count == 0:
    raise ValueError("no images")
  return total / count


def layer_means(distances: np.ndarray) -> np.ndarray:
  """Mean over heads of a ``(layers, heads)`` distance table."""
  return np.asarray(distances).mean(axis=-1)


def summarize(distances: np.ndarray) -> dict[str, Any]:
  """JSON-ready summary of a ``(layers, heads)`` table: the table, per-layer means (over
  heads) and the overall mean, in pixels."""
  d = np.asarray(distances, np.float64)
  return {"per_layer_head": d.tolist(), "per_layer_mean": layer_means(d).tolist(),
          "mean": float(d.mean())}
