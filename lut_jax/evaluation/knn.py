"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

For each query: cosine similarity to every training feature (both L2-normalised), the ``k``
most similar neighbours (k = 20), each voting for its label with weight
``exp(similarity / T)`` (T = 0.07); the class with the largest total vote wins (top-5: the
five largest). Queries are processed in fixed-size chunks so the ``(chunk, N_train)``
similarity matrix bounds memory; the training bank stays on the device.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lut_jax import metrics
from lut_jax.evaluation import eval_config, features
from lut_jax.weights import loading


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm (``torch.nn.functional.normalize``'s eps convention)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def knn_votes(bank: jax.Array, bank_labels: jax.Array, queries: jax.Array, *,
              num_classes: int, k: int = 20, temperature: float = 0.07) -> jax.Array:
  """Class votes ``(num_queries, num_classes)`` of the ``k`` nearest bank entries.

  Args:
    bank: ``(N, D)`` training features, already L2-normalised.
    bank_labels: ``(N,)`` int labels.
    queries: ``(Q, D)`` features (normalised here).
    num_classes: number of classes.
    k: neighbours per query (at most N).
    temperature: T of the weights ``exp(sim / T)``.
  """
  sims = l2_normalize(queries) @ bank.T  # (Q, N) cosine similarities
  top_sims, top_ids = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  onehot = jax.nn.one_hot(bank_labels[top_ids], num_classes, dtype=jnp.float32)  # (Q, k, C)
  votes = jnp.einsum("qk,qkc->qc", weights, onehot)
  # A query with a non-finite similarity (its feature, or any bank feature) gets NaN votes,
  # which score as wrong (metrics.topk_correct): whether top_k picks a NaN neighbour is the
  # backend's choice, and a vote that skipped it would score a broken encoder.
  return jnp.where(jnp.all(jnp.isfinite(sims), axis=-1, keepdims=True), votes, jnp.nan)


def knn_classify(train_features: Any, train_labels: Any, test_features: Any, *,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 query_batch: int = 256) -> np.ndarray:
  """Votes ``(num_test, num_classes)`` for every test feature (numpy), in query chunks.

  The last chunk is zero-padded to ``query_batch`` so one compiled function serves them all.
  """
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
  correct = metrics.topk_correct(jnp.asarray(votes), jnp.asarray(test_labels, jnp.int32))
  n = len(test_labels)
  return {name: 100.0 * float(count) / n for name, count in correct.items()}


def validate(config: ml_collections.ConfigDict) -> None:
  """The kNN fields (``configs/knn.py``)."""
  eval_config.check_distinct_splits(config)
  if config.knn.k <= 0 or config.knn.temperature <= 0:
    eval_config.fail(f"knn.k and knn.temperature must be positive, got {config.knn.k}, "
                     f"{config.knn.temperature}")
  eval_config.check_pools(config.knn.pools, "knn.pools", features.POOLS)


def run(config: ml_collections.ConfigDict, workdir: str,
        pretrained=None) -> dict[str, float]:
  """kNN evaluation of a pre-trained encoder (``config.mode == "knn"``); writes CLU scalars.

  ``pretrained`` (a :class:`lut_jax.weights.loading.Pretrained`) overrides ``config.pretrained``.
  Returns ``{"<pool>/top1": ..., "<pool>/top5": ...}`` for each of ``config.knn.pools``.
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top (imports TF)

  pretrained = pretrained or loading.load(config.pretrained, config.pretrained_step,
                                         encoder_only=True)
  input_config = eval_config.input_config(config, pretrained)
  pools = eval_config.pools(config.knn.pools)
  cache = os.path.join(workdir, "features") if config.cache_features else None
  splits = (config.input.train_split, config.input.eval_split)
  t0 = time.time()
  train, test = (features.dataset_features(pretrained, input_config, split,
                                           batch_size=config.input.eval_batch_size,
                                           pools=pools, cache_dir=cache,
                                           crop_pct=config.input.crop_pct)
                 for split in splits)
  extract_s = time.time() - t0
  num_classes = eval_config.num_classes(config, train["label"])
  results = {}
  for pool in pools:
    acc = knn_accuracy(train[pool], train["label"], test[pool], test["label"],
                       num_classes=num_classes, k=config.knn.k,
                       temperature=config.knn.temperature)
    results.update({f"{pool}/{name}": value for name, value in acc.items()})
  logging.info("kNN (k=%d, T=%g) of %s: %s", config.knn.k, config.knn.temperature,
               pretrained.source, results)
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() > 0)
  writer.write_scalars(0, {f"knn/{k}": v for k, v in results.items()}
                       | {"knn/feature_seconds": extract_s})
  writer.flush()
  keys = [features.features_key(pretrained, input_config, split, pools=pools,
                                 crop_pct=config.input.crop_pct) for split in splits]
  eval_config.write_results(workdir, "knn", results,
                            source=features.describe_source(pretrained, keys))
  return results
