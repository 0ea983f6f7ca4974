"""MAE reconstructions for display: input, masked input and reconstruction per image."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lut_jax import image_utils, losses, masking, models


def reconstruct(model: models.LUTModel, params: Any, images: jax.Array, key: jax.Array, *,
                mask_ratio: float, norm_pix: bool) -> dict[str, np.ndarray]:
  """Masks ``images`` at random and reconstructs them with the MAE decoder.

  The same computation as :func:`lut_jax.train.reconstruction_summary` (kept here so the
  analysis tools do not import the training loop and, through CLU, TensorFlow): with
  ``norm_pix`` the decoder predicts per-patch standardised pixels, which are mapped back
  with each true patch's mean and ``sqrt(var + 1e-6)``. Equal ``key`` and image count give
  equal masks for every model with the same patch grid, so checkpoints compare on the same
  visible patches.

  Returns:
    ``{"input", "masked", "reconstruction", "reconstruction_visible", "mask"}``: the first
    four are normalised NHWC images (``reconstruction`` is the raw prediction everywhere,
    ``reconstruction_visible`` pastes the visible input patches back, the MAE paper's
    figure); ``mask`` is ``(batch, L)``, 1 where hidden.
  """
  images = jnp.asarray(images, jnp.float32)
  masks = masking.random_masks(key, images.shape[0], model.num_patches, mask_ratio,
                               two_views=False)
  pred = model.apply({"params": params}, images, masks.keep1, masks.ids_restore,
                     method=models.LUTModel.mae).astype(jnp.float32)
  p, c = model.patch_size, model.channels
  patches = losses.patchify(images, p)
  if norm_pix:
    mean = patches.mean(-1, keepdims=True)
    std = jnp.sqrt(patches.var(-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * std + mean
  hidden = masks.mask1[:, :, None]
  out = {
      "input": images,
      "masked": losses.unpatchify(patches * (1 - hidden), p, c),
      "reconstruction": losses.unpatchify(pred, p, c),
      "reconstruction_visible": losses.unpatchify(patches * (1 - hidden) + pred * hidden, p, c),
      "mask": masks.mask1,
  }
  return {k: np.asarray(v) for k, v in out.items()}


def display_images(recon: dict[str, np.ndarray], channels: int) -> dict[str, np.ndarray]:
  """De-normalised ``[0, 1]`` images of :func:`reconstruct`'s output (``mask`` passed
  through). Hidden patches are 0 in normalised space, so they show as the mean colour."""
  out = {}
  for k, v in recon.items():
    out[k] = v if k == "mask" else image_utils.denormalize(v, channels)
  return out
