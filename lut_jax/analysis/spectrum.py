"""Singular-value spectrum and effective rank of the encoder's patch-token features.

Per image, the ``L x D`` matrix of output patch tokens is centred over its tokens (the
per-image mean token is removed, so a shared offset does not show up as one dominant
direction) and its singular values are taken. Spectra are normalised by their largest
value and averaged over images. A flatter spectrum / higher effective rank means the
tokens of one image span more directions, i.e. they are less collapsed onto each other.

Effective rank (Roy & Vetterli 2007, :func:`lut_jax.metrics.effective_rank`): with
``p_i = s_i / sum_j s_j``, ``erank = exp(-sum_i p_i log p_i)``; it is ``k`` for ``k`` equal
non-zero singular values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lut_jax import metrics


def singular_values(tokens: np.ndarray, *, center: bool = True) -> np.ndarray:
  """Singular values per image, largest first.

  Args:
    tokens: ``(batch, L, D)`` patch tokens (cls already removed).
    center: subtract each image's mean token first.

  Returns:
    ``(batch, k)`` float64 with ``k = min(L, D)``, or ``min(L - 1, D)`` when centred:
    centring puts the ones vector in the null space of the token matrix, so its rank is at
    most ``L - 1`` and the value dropped is zero up to rounding (it would only add a
    meaningless ~1e-16 tail to the spectrum).
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
  """JSON-ready spectrum statistics of ``(batch, L, D)`` patch tokens.

  Keys: ``spectrum`` (mean normalised spectrum), ``effective_rank`` (mean over images of
  the per-image effective rank), ``effective_rank_std``, ``effective_rank_of_mean_spectrum``
  and ``num_images``.
  """
  s = singular_values(tokens, center=center)
  ranks = metrics.effective_rank(s)
  spectrum = normalized_spectrum(s)
  return {"spectrum": spectrum.tolist(), "effective_rank": float(ranks.mean()),
          "effective_rank_std": float(ranks.std()),
          "effective_rank_of_mean_spectrum": float(metrics.effective_rank(spectrum)),
          "num_images": int(s.shape[0])}
