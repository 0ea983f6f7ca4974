"""Random masking of the two views, as a pure function outside the model.

Per example, one random permutation of the patches (``argsort`` of uniform noise) serves
both views: view 1 keeps the first ``keep`` patches of it, view 2 the next ``keep`` ones.
The visible sets are therefore disjoint, which needs ``mask_ratio >= 0.5``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Masks(NamedTuple):
  """Indices and masks of one masking draw (all ``int32`` / ``float32``).

  keep1, keep2: ``(batch, keep)`` patch indices visible in view 1 / view 2.
  ids_restore:  ``(batch, L)`` inverse permutation (unshuffles decoder tokens).
  mask1, mask2: ``(batch, L)`` 1 where the patch is hidden from that view, 0 where visible.
  """

  keep1: jax.Array
  keep2: jax.Array
  ids_restore: jax.Array
  mask1: jax.Array
  mask2: jax.Array


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Visible patches per view, ``int(L * (1 - r))`` (49 of 196 at r = 0.75)."""
  return int(num_patches * (1 - mask_ratio))


def check_mask_ratio(mask_ratio: float, num_patches: int, *, two_views: bool = True) -> None:
  """Raises ``ValueError`` unless ``mask_ratio`` leaves each view at least one patch and
  (with two views) the two visible sets fit disjointly in the image."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
  if two_views and mask_ratio < 0.5:
    raise ValueError(f"mask_ratio must be >= 0.5 for LUT (got {mask_ratio}): view 2 keeps the "
                     "next disjoint block of the same permutation, so the views would overlap")
  if num_kept(num_patches, mask_ratio) < 1:
    raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")


def masks_from_noise(noise: jax.Array, mask_ratio: float, *, two_views: bool = True) -> Masks:
  """Masks from explicit noise ``(batch, L)``: lower noise = kept first (as the reference).
  With ``two_views=False`` (the MAE baseline) any ratio in [0, 1) is allowed; ``keep2`` is then
  empty and ``mask2`` all ones."""
  batch, num_patches = noise.shape
  check_mask_ratio(mask_ratio, num_patches, two_views=two_views)
  keep = num_kept(num_patches, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  rank = jnp.arange(num_patches)
  # Binary masks in shuffled order, then unshuffled: hidden = 1, visible = 0.
  shuffled1 = (rank >= keep).astype(jnp.float32)
  keep2 = keep if two_views else 0
  shuffled2 = ((rank < keep) | (rank >= keep + keep2)).astype(jnp.float32)
  unshuffle = lambda m: jnp.take_along_axis(jnp.broadcast_to(m, (batch, num_patches)),  # noqa
                                            ids_restore, axis=1)
  return Masks(keep1=ids_shuffle[:, :keep], keep2=ids_shuffle[:, keep:keep + keep2],
               ids_restore=ids_restore, mask1=unshuffle(shuffled1), mask2=unshuffle(shuffled2))


def random_masks(key: jax.Array, batch: int, num_patches: int, mask_ratio: float, *,
                 two_views: bool = True, noise: Optional[jax.Array] = None) -> Masks:
  """Draws ``noise ~ U(0, 1)^(batch, L)`` from ``key`` (unless given) and builds the masks."""
  if noise is None:
    noise = jax.random.uniform(key, (batch, num_patches))
  return masks_from_noise(noise, mask_ratio, two_views=two_views)
