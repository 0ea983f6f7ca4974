"""Singular-value spectrum and effective rank of the encoder's patch-token features.

Per image, the ``L x D`` matrix of output patch tokens is centred over its tokens (so a
shared offset does not show as one dominant direction) and its singular values taken;
spectra are normalised by their largest value and averaged over images. A flatter
spectrum / higher effective rank (:func:`lut_jax.metrics.effective_rank`) means the tokens
of one image span more directions: they are less collapsed onto each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lut_jax import metrics


def singular_values(tokens: np.ndarray, *, center: bool = True) -> np.ndarray:
  """Singular values of ``(batch, L, D)`` patch tokens (no cls) per image, largest first:
  ``(batch, k)`` float64, ``k = min(L, D)``, or ``min(L - 1, D)`` when ``center``ed (each
  image's mean token subtracted): centring puts the ones vector in the token matrix's null
  space, so the value dropped is zero up to rounding (a meaningless ~1e-16 tail).
  """
  x = np.asarray(tokens, np.float64)
  if x.ndim != 3:
    raise ValueError(f"expected (batch, tokens, width), got shape {x.shape}")
  k = min(x.shape[1], x.shape[2])
  if center:
    x = x - x.mean(axis=1, keepdims=True)
    k = min(x.shape[1] - 1, x.shape[2])
  return np.linalg.svd(x, compute_uv=False)[:, :k]


def normalized_spectrum(values: np.ndarray) -> np.ndarray:
  """Mean over images of each image's spectrum divided by its largest singular value."""
  s = np.atleast_2d(np.asarray(values, np.float64))
  top = np.maximum(s[:, :1], np.finfo(np.float64).tiny)  # an all-zero image stays zero
  return (s / top).mean(axis=0)


def summarize(tokens: np.ndarray, *, center: bool = True) -> dict[str, Any]:
  """JSON-ready spectrum statistics of ``(batch, L, D)`` patch tokens: ``spectrum`` (mean
  normalised spectrum), ``effective_rank`` (mean of the per-image ones) and its ``_std``,
  ``effective_rank_of_mean_spectrum`` and ``num_images``."""
  s = singular_values(tokens, center=center)
  ranks = metrics.effective_rank(s)
  spectrum = normalized_spectrum(s)
  return {"spectrum": spectrum.tolist(), "effective_rank": float(ranks.mean()),
          "effective_rank_std": float(ranks.std()),
          "effective_rank_of_mean_spectrum": float(metrics.effective_rank(spectrum)),
          "num_images": int(s.shape[0])}
