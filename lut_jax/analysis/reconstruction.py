"""MAE reconstructions for display: input, masked input and reconstruction per image."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from lut_jax import image_utils, models, reconstruction


def reconstruct(model: models.LUTModel, params: Any, images: jax.Array, key: jax.Array, *,
                mask_ratio: float, norm_pix: bool) -> dict[str, np.ndarray]:
  """:func:`lut_jax.reconstruction.reconstruct` with its outputs on the host (numpy)."""
  out = reconstruction.reconstruct(model, params, images, key, mask_ratio=mask_ratio,
                                   norm_pix=norm_pix)
  return {k: np.asarray(v) for k, v in out.items()}


def display_images(recon: dict[str, np.ndarray], channels: int) -> dict[str, np.ndarray]:
  """De-normalised ``[0, 1]`` images of :func:`reconstruct`'s output (``mask`` passed
  through). Hidden patches are 0 in normalised space, so they show as the mean colour."""
  out = {}
  for k, v in recon.items():
    out[k] = v if k == "mask" else image_utils.denormalize(v, channels)
  return out
