"""Per-pixel loss and the segmentation scores: a confusion matrix accumulated over the whole
eval split, then mIoU, pixel accuracy and mean class accuracy (mmseg's ``mIoU``,
``aAcc`` and ``mAcc``).

Pixels labelled ``ignore_label`` (and any label outside ``[0, num_classes)``) count for
nothing, in the loss and in the scores. A class absent from both the ground truth and the
predictions of the whole split has no IoU and is left out of the mean (mmseg's ``nanmean``);
a class predicted but never present has IoU 0 and counts. No TensorFlow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255  # mmseg's and ADE20K's convention


def valid_pixels(labels: jax.Array, num_classes: int, ignore_label: int) -> jax.Array:
  """Pixels that have a class: not ``ignore_label`` and inside ``[0, num_classes)``."""
  return (labels != ignore_label) & (labels >= 0) & (labels < num_classes)


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                        ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """Mean softmax cross-entropy over the labelled pixels (PyTorch's ``cross_entropy`` with
  ``ignore_index``); 0 for a batch without any. ``logits`` ``(..., K)``, ``labels`` ``(...)``.
  mmseg's ``CrossEntropyLoss`` (without ``avg_non_ignore``) divides by every pixel, labelled or
  not; here ignored pixels do not dilute the loss (our choice, PyTorch's default)."""
  num_classes = logits.shape[-1]
  valid = valid_pixels(labels, num_classes, ignore_label)
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int, *,
                     ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """``(K, K)`` int32 counts of labelled pixels: row = true class, column = predicted."""
  valid = valid_pixels(labels, num_classes, ignore_label)
  index = jnp.where(valid, labels * num_classes + predictions, 0).reshape(-1)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(
      valid.reshape(-1).astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def scores(confusion: np.ndarray) -> dict[str, float]:
  """``{"miou", "pixel_acc", "mean_acc"}`` in percent from a whole split's confusion
  matrix (rows: truth); also ``"num_classes_scored"`` (classes in the mIoU mean)."""
  confusion = np.asarray(confusion, np.float64)
  hits = np.diag(confusion)
  truth, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
  union = truth + predicted - hits
  seen = union > 0
  total = confusion.sum()
  return {
      "miou": float(100.0 * np.mean(hits[seen] / union[seen])) if seen.any() else 0.0,
      "pixel_acc": float(100.0 * hits.sum() / total) if total else 0.0,
      "mean_acc": (float(100.0 * np.mean(hits[truth > 0] / truth[truth > 0]))
                   if (truth > 0).any() else 0.0),
      "num_classes_scored": int(seen.sum()),
  }
