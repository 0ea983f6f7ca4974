"""Mean attention distance per layer and head (Dosovitskiy et al. 2021, Fig. 7; LUT Fig. 4).

For a query patch the distance is the attention-weighted mean of the Euclidean distances,
in pixels, from its centre to the centres of the key patches; it is then averaged over the
query patches and the images. Small values mean local attention, large values global.

The cls token is neither a query nor a key here: its row is dropped and each query's
attention over the *patch* keys is renormalised to sum to one. The cls token has no
position in the image, so it cannot take part in a distance, and renormalising (rather than
counting the cls weight as distance 0) keeps the measure about *where among the patches*
a head looks, independent of how much weight it parks on cls.
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
  """Mean attention distance per head, in pixels.

  Args:
    probs: attention probabilities ``(batch, heads, queries, keys)`` of one layer, over all
      patches of the image (no masking), cls first when ``has_cls``.
    patch_size: patch side in pixels (distances are between patch centres).
    has_cls: whether token 0 is the cls token (dropped as query and key; see the module
      docstring).

  Returns:
    ``(heads,)`` float64: mean over images and query patches of
    ``sum_k a[q, k] * ||c_q - c_k||``.
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
  """Attention probabilities of every block of an :class:`~lut_jax.models.vit.Encoder`.

  Making ``intermediates`` mutable switches the attention layers to their explicit path,
  which sows ``(batch, heads, 1 + L, 1 + L)`` probabilities (cls first).

  Returns:
    One array per block, in depth order.
  """
  _, state = encoder.apply({"params": encoder_params}, images, mutable=["intermediates"])
  inter = state["intermediates"]
  blocks = sorted((k for k in inter if k.startswith("blocks_")), key=lambda k: int(k[7:]))
  return [inter[k]["attn"]["attention"][0] for k in blocks]


AttentionFn = Callable[[Any, jax.Array], list[jax.Array]]


def attention_distance_per_layer(encoder: Any, encoder_params: Any, images: np.ndarray, *,
                                 batch_size: int = 16,
                                 apply_fn: Optional[AttentionFn] = None) -> np.ndarray:
  """``(layers, heads)`` mean attention distances in pixels over ``images``.

  ``apply_fn(params, images)`` returns the per-block attention (default: a jitted
  :func:`collect_attention`); pass one to share its compilation with other uses.

  Images are processed in chunks of ``batch_size`` (the explicit attention matrices of a
  ViT-B/16 at 224 px take ~22 MB per image); per-chunk means are weighted by the number of
  real images in the chunk, so the result equals the mean over all images at once.
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
