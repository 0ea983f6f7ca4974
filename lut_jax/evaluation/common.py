"""Pieces shared by the linear probe and fine-tuning: state, losses, accuracy, checkpoints."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp


class ClassifierState(flax.struct.PyTreeNode):
  """Parameters, BatchNorm statistics and optimizer state of a classifier.

  As the pre-training ``TrainState``: arrays only (no RNG, no Python ints), so it saves as
  one pytree and each step's key is ``fold_in(base_key, step)``.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params: Any, batch_stats: Any,
             tx: optax.GradientTransformation) -> "ClassifierState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), tx=tx)

  def apply_gradients(self, grads: Any, **changes) -> "ClassifierState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
  """One-hot targets with label smoothing: ``1 - s + s/C`` on the label, ``s/C`` elsewhere
  (timm's convention, which sums to one)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example cross entropy against soft targets (rows summing to one), in float32."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def topk_correct(logits: jax.Array, labels: jax.Array, ks: tuple[int, ...] = (1, 5),
                 mask: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Number of examples whose label is among the ``k`` highest logits, per ``k``.

  ``k`` is capped at the number of classes (top-5 of a 3-class problem is top-3). Masked-out
  examples (padding) count for nothing. Ties rank the lower class index first.
  """
  num_classes = logits.shape[-1]
  # Rank of the true class: how many classes score strictly higher (or equal and earlier).
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  classes = jnp.arange(num_classes)
  above = (logits > true) | ((logits == true) & (classes[None, :] < labels[:, None]))
  rank = jnp.sum(above, axis=-1)
  weight = jnp.ones_like(rank, jnp.float32) if mask is None else mask.astype(jnp.float32)
  return {f"top{k}": jnp.sum((rank < min(k, num_classes)) * weight) for k in ks}


def warmup_cosine(peak_lr: float, *, warmup_steps: int, total_steps: int,
                  end_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup 0 -> ``peak_lr`` then cosine to ``end_lr`` at ``total_steps`` (per step,
  as MAE's per-iteration ``adjust_learning_rate``)."""
  total_steps = max(total_steps, 1)
  # optax needs at least one cosine step after the warmup.
  warmup_steps = max(0, min(warmup_steps, total_steps - 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=end_lr)


def checkpoint_manager(directory: str, *, keep_best: bool = False,
                       async_save: bool = False) -> ocp.CheckpointManager:
  """An Orbax manager that keeps the latest checkpoint (for resuming) and, with
  ``keep_best``, also the one with the highest ``top1`` metric."""
  latest = ocp.checkpoint_managers.LatestN(n=1)
  if keep_best:
    best = ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["top1"], n=1,
                                         keep_checkpoints_without_metrics=False)
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([latest, best])
    options = ocp.CheckpointManagerOptions(create=True, best_fn=lambda m: m["top1"],
                                           best_mode="max", preservation_policy=policy,
                                           enable_async_checkpointing=async_save)
  else:
    options = ocp.CheckpointManagerOptions(create=True, preservation_policy=latest,
                                           enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Optional[Any]:
  """The latest checkpoint restored into ``abstract_state``'s structure, or None."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def to_host(tree: Any) -> Any:
  """Fetches a (possibly multi-process) pytree of arrays to host numpy, gathered."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """``{name: float}`` of a dict of scalar arrays (a host sync)."""
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
