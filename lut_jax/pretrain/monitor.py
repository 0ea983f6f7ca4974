"""What a pre-training run measures of its own encoder while it trains (``config.monitor``).

Every ``monitor.every_steps`` steps and at the end, on whole held-out images read by
:mod:`lut_jax.data.device_input`: ``knn_cls`` / ``knn_mean``, the weighted kNN top-1 (as
``configs/knn.py``'s) of the *online* encoder's cls / mean patch token, bank
``monitor.bank_split``, queries ``monitor.query_split`` (a small bank: lower numbers than
the full evaluation, the same trend, in seconds); ``feature_rank``, the effective rank of
the queries' mean-token features; for LUT, the BC branch on the queries: ``z_std``, the
per-dimension std of the teacher's L2-normalised projector outputs (about
``1/sqrt(width)`` when spread, towards 0 when collapsing), and ``z_rank``, their effective
rank. How to read them: docs/method.md.

Effective ranks are taken of the *centred* features: uncentred, the mean every feature
shares is one large singular value, and the rank says little about how the examples differ.
Results go to the metric writer (``monitor/...``), the log and ``WORKDIR/monitor.jsonl``
(after a resume from an older checkpoint a step can appear twice: the later line counts).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lut_jax import errors, metrics
from lut_jax.data import device_input, folders
from lut_jax.models import vit
from lut_jax.pretrain import losses

HISTORY_FILE = "monitor.jsonl"
_CHUNK = 512  # images per encoder call: bounds the activations' memory


def effective_rank(x: Any) -> float:
  """Effective rank of the centred rows of ``x`` ``(n, d)`` (:func:`lut_jax.metrics.effective_rank`
  of their singular values)."""
  x = np.asarray(x, np.float64)
  return float(metrics.effective_rank(np.linalg.svd(x - x.mean(axis=0), compute_uv=False)))


class Monitor:
  """Loads the held-out images once (at construction, so that a bad split is reported
  before a run starts); ``__call__(model, state)`` measures the encoder."""

  def __init__(self, config: ml_collections.ConfigDict):
    m = config.monitor
    self.every_steps = m.every_steps
    self._k, self._temperature = m.knn_k, m.knn_temperature
    self._channels = config.input.channels
    # A class folder without split sub-folders is one set of images: the default queries
    # (test[...]) would be the bank's own images.
    folders.check_distinct_splits(config.input.dataset, {
        "monitor.bank_split": m.bank_split, "monitor.query_split": m.query_split})
    bank, queries = (self._load(config, field) for field in ("bank_split", "query_split"))
    if not 0 < self._k <= bank.num_examples:
      raise errors.ConfigError(f"monitor.knn_k must be in [1, {bank.num_examples}] (the "
                               f"bank's size), got {self._k}")
    if min(bank.labels.min(), queries.labels.min()) < 0:
      raise errors.ConfigError(f"monitor: {config.input.dataset} has no labels for kNN",
                               hint="set monitor.every_steps=0")
    self._bank, self._queries = bank, queries
    self._num_classes = int(max(bank.labels.max(), queries.labels.max())) + 1
    logging.info("Monitor every %d steps: kNN of %d %r queries against %d %r images.",
                 self.every_steps, queries.num_examples, m.query_split, bank.num_examples,
                 m.bank_split)

    self._model = None

  @staticmethod
  def _load(config: ml_collections.ConfigDict, field: str) -> device_input.Split:
    """``config.monitor.<field>``'s split; a split the data set lacks names the field."""
    split = config.monitor[field]
    try:
      return device_input.load_split(config.input, split)
    except errors.DataNotFoundError as e:
      raise errors.DataNotFoundError(
          f"monitor.{field}={split!r}: {e}",
          hint=(e.hint + "; " if e.hint else "") + "or set monitor.every_steps=0") from e

  def _compile(self, model: vit.LUTModel) -> None:
    eval_view = lambda images: device_input.eval_images(images, self._channels)  # noqa: E731

    def online(params, images):
      tokens = model.apply({"params": params}, eval_view(images), forward_only=True,
                           method=vit.LUTModel.encode)
      return tokens[:, 0].astype(jnp.float32), vit.mean_patch_token(tokens)

    def teacher(params, batch_stats, images):
      return model.apply({"params": params, "batch_stats": batch_stats}, eval_view(images),
                         method=vit.LUTModel.projector)

    self._online, self._teacher = jax.jit(online), jax.jit(teacher)
    self._model = model

  def _map(self, fn, images: np.ndarray, *args) -> Any:
    outs = [jax.device_get(fn(*args, images[i:i + _CHUNK]))
            for i in range(0, len(images), _CHUNK)]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  def __call__(self, model: vit.LUTModel, state: Any) -> dict[str, float]:
    """The measurements of ``state`` (a ``TrainState`` of ``model``)."""
    t0 = time.time()
    if self._model is not model:
      self._compile(model)
    bank_cls, bank_mean = self._map(self._online, self._bank.images, state.params)
    query_cls, query_mean = self._map(self._online, self._queries.images, state.params)
    out = {}
    for name, bank, query in (("cls", bank_cls, query_cls), ("mean", bank_mean, query_mean)):
      acc = metrics.knn_accuracy(bank, self._bank.labels, query, self._queries.labels,
                             num_classes=self._num_classes, k=self._k,
                             temperature=self._temperature)
      out[f"knn_{name}"] = acc["top1"]
    out["feature_rank"] = effective_rank(query_mean)
    if state.has_target:
      z = self._map(self._teacher, self._queries.images, state.target_params,
                    state.target_batch_stats)
      out["z_std"] = float(losses.normalized_std(z))
      out["z_rank"] = effective_rank(metrics.l2_normalize(jnp.asarray(z)))
    out["seconds"] = time.time() - t0
    return out


def append_history(workdir: str, record: dict[str, Any]) -> None:
  """Appends ``record`` to ``WORKDIR/monitor.jsonl`` (process 0 only)."""
  if jax.process_index() != 0:
    return
  from etils import epath  # local: gs:// work directories too

  path = epath.Path(workdir) / HISTORY_FILE
  previous = path.read_text() if path.exists() else ""
  path.write_text(previous + json.dumps(record) + "\n")


def read_history(workdir: str) -> list[dict[str, Any]]:
  """The records of ``WORKDIR/monitor.jsonl`` by step (the last one for a repeated step)."""
  path = os.path.join(workdir, HISTORY_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = {r["step"]: r for r in map(json.loads, filter(str.strip, f))}
  return [records[s] for s in sorted(records)]
