"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

For each query: cosine similarity to every training feature (both L2-normalised), the ``k``
most similar neighbours (k = 20), each voting for its label with weight
``exp(similarity / T)`` (T = 0.07); the class with the largest total vote wins (top-5: the
five largest). The classifier is :func:`lut_jax.metrics.knn_accuracy`, which the
pre-training monitor uses too.
"""

from __future__ import annotations

import time

from absl import logging
import jax
import ml_collections

from lut_jax import metrics
from lut_jax.evaluation import eval_config, features
from lut_jax.runtime import writers
from lut_jax.weights import loading

NEEDS_TENSORFLOW = ""  # see protocols


def validate(config: ml_collections.ConfigDict) -> None:
  """The kNN fields (``configs/knn.py``)."""
  eval_config.check_distinct_splits(config)
  features.eval_backend(config)  # an unknown input.backend fails here
  if config.knn.k <= 0 or config.knn.temperature <= 0:
    eval_config.fail(f"knn.k and knn.temperature must be positive, got {config.knn.k}, "
                     f"{config.knn.temperature}")
  eval_config.check_pools(config.knn.pools, "knn.pools", features.POOLS)


def run(config: ml_collections.ConfigDict, workdir: str,
        pretrained=None) -> dict[str, float]:
  """kNN evaluation of a pre-trained encoder (``config.mode == "knn"``); writes TensorBoard scalars.

  ``pretrained`` (a :class:`lut_jax.weights.loading.Pretrained`) overrides ``config.pretrained``.
  Returns ``{"<pool>/top1": ..., "<pool>/top5": ...}`` for each of ``config.knn.pools``.
  """
  pretrained = pretrained or loading.load(config.pretrained, config.pretrained_step,
                                         encoder_only=True)
  input_config = eval_config.input_config(config, pretrained)
  pools = eval_config.pools(config.knn.pools)
  t0 = time.time()
  train, test, source = features.train_and_eval_features(config, workdir, pretrained,
                                                         input_config, pools)
  extract_s = time.time() - t0
  num_classes = eval_config.num_classes(config, train["label"])
  results = {}
  for pool in pools:
    acc = metrics.knn_accuracy(train[pool], train["label"], test[pool], test["label"],
                       num_classes=num_classes, k=config.knn.k,
                       temperature=config.knn.temperature)
    results.update({f"{pool}/{name}": value for name, value in acc.items()})
  logging.info("kNN (k=%d, T=%g) of %s: %s", config.knn.k, config.knn.temperature,
               pretrained.source, results)
  writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(0, {f"knn/{k}": v for k, v in results.items()}
                       | {"knn/feature_seconds": extract_s})
  writer.flush()
  eval_config.write_results(workdir, "knn", results, source=source)
  return results
