"""Measurements that pre-training's monitor, the evaluation protocols and the analyses share:
top-k accuracy, the weighted kNN classifier, effective rank, L2 normalisation, and
fetching device results to the host. The lowest layer above the config: it imports no
other part of lut_jax, so any of them can use it without importing each other."""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along the last axis in float32
  (``torch.nn.functional.normalize``). Written as ``rsqrt(max(sum(x^2), eps^2))`` so the
  gradient stays finite at ``x = 0`` (the gradient of ``jnp.linalg.norm`` there is NaN)."""
  x = x.astype(jnp.float32)
  sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))


def topk_correct(logits: jax.Array, labels: jax.Array, ks: tuple[int, ...] = (1, 5),
                 mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Number of examples whose label is among the ``k`` highest logits, per ``k``. ``k`` is
  capped at the number of classes (top-5 of a 3-class problem is top-3). Masked-out examples
  (padding) count for nothing. Ties rank the lower class index first. An example with any NaN
  or infinite logit is wrong: NaN compares false with everything, so it would otherwise rank
  first, and a diverged model would score 100%."""
  num_classes = logits.shape[-1]
  # Rank of the true class: how many classes score strictly higher (or equal and earlier).
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  classes = jnp.arange(num_classes)
  above = (logits > true) | ((logits == true) & (classes[None, :] < labels[:, None]))
  rank = jnp.where(jnp.all(jnp.isfinite(logits), axis=-1), jnp.sum(above, axis=-1),
                   num_classes)
  weight = jnp.ones_like(rank, jnp.float32) if mask is None else mask.astype(jnp.float32)
  return {f"top{k}": jnp.sum((rank < min(k, num_classes)) * weight) for k in ks}


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def knn_votes(bank: jax.Array, bank_labels: jax.Array, queries: jax.Array, *,
              num_classes: int, k: int = 20, temperature: float = 0.07) -> jax.Array:
  """Class votes ``(Q, num_classes)`` of the ``k`` (at most N) nearest bank entries (DINO's
  weighted kNN: cosine similarity, each neighbour voting ``exp(similarity / temperature)``).
  ``bank`` ``(N, D)``: L2-normalised training features with int ``bank_labels``;
  ``queries`` ``(Q, D)``: normalised here.
  """
  sims = l2_normalize(queries) @ bank.T  # (Q, N) cosine similarities
  top_sims, top_ids = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  onehot = jax.nn.one_hot(bank_labels[top_ids], num_classes, dtype=jnp.float32)  # (Q, k, C)
  votes = jnp.einsum("qk,qkc->qc", weights, onehot)
  # A query with a non-finite similarity (its feature, or any bank feature) gets NaN votes,
  # which score as wrong (topk_correct): whether top_k picks a NaN neighbour is the
  # backend's choice, and a vote that skipped it would score a broken encoder.
  return jnp.where(jnp.all(jnp.isfinite(sims), axis=-1, keepdims=True), votes, jnp.nan)


def knn_classify(train_features: Any, train_labels: Any, test_features: Any, *,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 query_batch: int = 256) -> np.ndarray:
  """Votes ``(num_test, num_classes)`` for every test feature (numpy), in query chunks: the
  ``(chunk, N_train)`` similarity matrix bounds memory; the bank stays on the device. The last
  chunk is zero-padded to ``query_batch`` so one compiled function serves them all."""
  num_train = int(np.shape(train_features)[0])
  if not 0 < k <= num_train:
    raise ValueError(f"k must be in [1, {num_train}] (the training set size), got {k}")
  bank = l2_normalize(jnp.asarray(train_features))
  bank_labels = jnp.asarray(train_labels, jnp.int32)
  test_features = np.asarray(test_features, np.float32)
  num_test = test_features.shape[0]
  query_batch = max(1, min(query_batch, num_test))
  votes = []
  for start in range(0, num_test, query_batch):
    chunk = test_features[start:start + query_batch]
    pad = query_batch - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])
    out = knn_votes(bank, bank_labels, jnp.asarray(chunk), num_classes=num_classes, k=k,
                    temperature=temperature)
    votes.append(np.asarray(out)[:query_batch - pad])
  return np.concatenate(votes)


def knn_accuracy(train_features: Any, train_labels: Any, test_features: Any,
                 test_labels: Any, *, num_classes: int, k: int = 20,
                 temperature: float = 0.07, query_batch: int = 256) -> dict[str, float]:
  """Top-1 / top-5 accuracy (percent) of the weighted kNN classifier on the test set."""
  votes = knn_classify(train_features, train_labels, test_features, num_classes=num_classes,
                       k=k, temperature=temperature, query_batch=query_batch)
  correct = topk_correct(jnp.asarray(votes), jnp.asarray(test_labels, jnp.int32))
  n = len(test_labels)
  return {name: 100.0 * float(count) / n for name, count in correct.items()}


def effective_rank(values: np.ndarray) -> np.ndarray:
  """Roy & Vetterli's effective rank of each row of singular values (``0 log 0 = 0``): with
  ``p_i = s_i / sum_j s_j``, ``exp(-sum_i p_i log p_i)``; ``k`` for ``k`` equal non-zero
  values, 1 for one. Returns a scalar array for a 1-D input, else one value per row."""
  s = np.asarray(values, np.float64)
  total = s.sum(axis=-1, keepdims=True)
  p = np.divide(s, total, out=np.zeros_like(s), where=total > 0)
  entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
  return np.exp(entropy)


def to_host(tree: Any) -> Any:
  """Fetches a (possibly multi-process) pytree of arrays to host numpy, gathered."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """``{name: float}`` of a dict of scalar arrays (a host sync)."""
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
