"""MAE reconstructions of masked images, for summaries and figures (no TensorFlow)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lut_jax.models import vit
from lut_jax.pretrain import losses, masking


def reconstruct(model: vit.LUTModel, params: Any, images: jax.Array, key: jax.Array, *,
                mask_ratio: float, norm_pix: bool) -> dict[str, jax.Array]:
  """Masks ``images`` at random (one view) and reconstructs them with the decoder (jit-able):
  ``{"input", "masked", "reconstruction", "reconstruction_visible", "mask"}``, normalised
  NHWC images (``reconstruction_visible`` pastes the visible input patches back, the MAE
  paper's figure) and the ``(batch, L)`` mask, 1 where hidden. ``norm_pix`` predictions are
  mapped back with each true patch's mean and ``sqrt(var + 1e-6)``. The same ``key`` and
  image count mask alike every model with the same patch grid, so checkpoints compare.
  """
  images = jnp.asarray(images, jnp.float32)
  masks = masking.random_masks(key, images.shape[0], model.num_patches, mask_ratio,
                               two_views=False)
  pred = model.apply({"params": params}, images, masks.keep1, masks.ids_restore,
                     method=vit.LUTModel.mae).astype(jnp.float32)
  p, c = model.patch_size, model.channels
  patches = losses.patchify(images, p)
  if norm_pix:
    mean = patches.mean(-1, keepdims=True)
    std = jnp.sqrt(patches.var(-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * std + mean
  hidden = masks.mask1[:, :, None]
  return {
      "input": images,
      "masked": losses.unpatchify(patches * (1 - hidden), p, c),
      "reconstruction": losses.unpatchify(pred, p, c),
      "reconstruction_visible": losses.unpatchify(patches * (1 - hidden) + pred * hidden, p, c),
      "mask": masks.mask1,
  }
