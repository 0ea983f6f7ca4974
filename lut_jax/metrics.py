"""Pieces the evaluation protocols share: accuracy, and fetching device results to the host."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np


def topk_correct(logits: jax.Array, labels: jax.Array, ks: tuple[int, ...] = (1, 5),
                 mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Number of examples whose label is among the ``k`` highest logits, per ``k``.

  ``k`` is capped at the number of classes (top-5 of a 3-class problem is top-3). Masked-out
  examples (padding) count for nothing. Ties rank the lower class index first. An example
  with any NaN or infinite logit is wrong: NaN compares false with everything, so it would
  otherwise rank first, and a diverged model would score 100%.
  """
  num_classes = logits.shape[-1]
  # Rank of the true class: how many classes score strictly higher (or equal and earlier).
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  classes = jnp.arange(num_classes)
  above = (logits > true) | ((logits == true) & (classes[None, :] < labels[:, None]))
  rank = jnp.where(jnp.all(jnp.isfinite(logits), axis=-1), jnp.sum(above, axis=-1),
                   num_classes)
  weight = jnp.ones_like(rank, jnp.float32) if mask is None else mask.astype(jnp.float32)
  return {f"top{k}": jnp.sum((rank < min(k, num_classes)) * weight) for k in ks}


def to_host(tree: Any) -> Any:
  """Fetches a (possibly multi-process) pytree of arrays to host numpy, gathered."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """``{name: float}`` of a dict of scalar arrays (a host sync)."""
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
