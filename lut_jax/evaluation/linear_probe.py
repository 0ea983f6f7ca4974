"""Linear probing of frozen features, MAE's recipe.

Head: BatchNorm without affine parameters (eps 1e-6, as MAE's ``BatchNorm1d(affine=False)``)
then a linear layer (weights N(0, 0.01), zero bias). Optimizer: LARS (``optax.lars``,
trust coefficient 0.001, momentum 0.9, weight decay 0 by default; biases excluded from decay
and from the trust ratio as in MAE's ``LARS``: :func:`lut_jax.runtime.optim.create_probe_optimizer`),
peak lr ``base_lr * batch / 256`` with ``base_lr = 0.1``, linear warmup then cosine to 0, per
step.

The loop is the supervised protocols' (:func:`lut_jax.runtime.loop.train_evaluate_save`:
a NaN stops it before a checkpoint, SIGTERM evaluates, saves and stops, a rerun resumes);
the state is saved with every evaluation (the latest and the best top-1 kept).

One deliberate difference from MAE: the head trains on features extracted *once* from
centre crops (cached in ``workdir/features``) instead of re-encoding RandomResizedCrop +
flip views every epoch. It makes a 90-epoch probe cost one pass of the encoder, which is
what makes probing practical on a CPU; it typically changes top-1 by well under a point.
(``optax.lars`` also multiplies by the learning rate before the momentum trace, MAE after;
the two agree for a constant rate and differ negligibly under a smooth schedule.)
"""

from __future__ import annotations

import functools
import itertools
import os
import types
from typing import Any, Callable, Iterator, Optional

from absl import logging
from clu import metrics as clu_metrics
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lut_jax import metrics
from lut_jax.data import splits
from lut_jax.evaluation import eval_config, features
from lut_jax.models import vit
from lut_jax.pretrain import train_state
from lut_jax.runtime import checkpointing, loop, optim, writers
from lut_jax.weights import loading

NEEDS_TENSORFLOW = ""  # see protocols


class LinearProbe(nn.Module):
  """``BatchNorm(affine=False) -> Dense(num_classes)`` on a feature vector."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = vit.BatchNorm(epsilon=1e-6, use_affine=False, name="bn")(
        x.astype(jnp.float32), use_running_average=not train)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01),
                    name="head")(x)


# Averages of the step metrics over a logging interval (merged on device).
ProbeMetrics = clu_metrics.Collection.create(
    first_nonfinite_step=loop.FirstNonFiniteStep,
    **{k: clu_metrics.Average.from_output(k) for k in ("loss", "top1", "lr", "grad_norm")})


def train_step(state: train_state.ClassifierState, batch: dict[str, jax.Array],
               key: jax.Array, *, model: LinearProbe, learning_rate: optax.Schedule,
               ) -> tuple[train_state.ClassifierState, dict[str, jax.Array]]:
  """One step on a batch of ``{"features", "label"}``; ``ProbeMetrics``' inputs."""
  del key  # the batch order (:func:`batches`) is the probe's only randomness
  x, y = batch["features"], batch["label"]

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                  train=True, mutable=["batch_stats"])
    targets = jax.nn.one_hot(y, model.num_classes)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets)), (updates, logits)

  (loss, (updates, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  new_state = state.apply_gradients(grads, batch_stats=updates["batch_stats"])
  return new_state, {
      "loss": loss, "top1": 100.0 * jnp.mean(jnp.argmax(logits, -1) == y),
      "lr": learning_rate(state.step), "grad_norm": grad_norm,
      "first_nonfinite_step": loop.first_nonfinite_step(new_state.step, loss, grad_norm,
                                                        new_state)}


def batches(train_features: jax.Array, train_labels: jax.Array, key: jax.Array, *,
            batch_size: int, start_step: int) -> Iterator[dict[str, jax.Array]]:
  """The training batches from step ``start_step`` on: epoch ``e`` visits the examples in
  the order of ``permutation(fold_in(key, e))``, ``N // batch_size`` batches (the remainder
  dropped, as MAE's ``drop_last``), so a resumed run sees an uninterrupted run's batches."""
  n = train_features.shape[0]
  steps_per_epoch = splits.steps_per_epoch(n, batch_size)
  for step in itertools.count(start_step):
    epoch, i = divmod(step, steps_per_epoch)
    if i == 0 or step == start_step:
      order = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield {"features": train_features[idx], "label": train_labels[idx]}


@functools.partial(jax.jit, static_argnames=("model",))
def _logits(state: train_state.ClassifierState, x: jax.Array, *, model: LinearProbe) -> jax.Array:
  return model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                     train=False)


def evaluate(state: train_state.ClassifierState, model: LinearProbe, features: Any, labels: Any,
             *, batch_size: int = 4096) -> dict[str, float]:
  """Top-1 / top-5 accuracy (percent) with BatchNorm on its running averages."""
  features, labels = np.asarray(features, np.float32), np.asarray(labels, np.int32)
  n = features.shape[0]
  batch_size = max(1, min(batch_size, n))
  totals = {"top1": 0.0, "top5": 0.0}
  for start in range(0, n, batch_size):
    x, y = features[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - x.shape[0]
    mask = np.arange(batch_size) < x.shape[0]
    if pad:  # one compiled shape for every batch
      x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
      y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    correct = metrics.topk_correct(_logits(state, jnp.asarray(x), model=model),
                                  jnp.asarray(y), mask=jnp.asarray(mask))
    for k in totals:
      totals[k] += float(correct[k])
  return {k: 100.0 * v / n for k, v in totals.items()}


def train_linear_probe(
    train_features: Any, train_labels: Any, eval_features: Any, eval_labels: Any, *,
    num_classes: int, epochs: int = 90, batch_size: int = 16384, base_lr: float = 0.1,
    warmup_epochs: float = 10, weight_decay: float = 0.0, optimizer: str = "lars",
    momentum: float = 0.9, seed: int = 0, eval_every_epochs: int = 10,
    checkpoint_dir: Optional[str] = None,
    log_fn: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> tuple[train_state.ClassifierState, dict[str, float]]:
  """Trains the probe on ``(N, D)`` features and ``(N,)`` labels and evaluates it on the
  eval split's; returns ``(state, {"top1", "top5"})`` of the last evaluation (the final
  epoch's, or the preempted step's). Peak lr ``base_lr * batch_size / 256``, the batch
  capped at N; ``seed`` fixes the permutations and the initialisation (:func:`batches`: a
  resumed run is an uninterrupted one); the last epoch is always evaluated.
  ``checkpoint_dir``: the state is saved there with every evaluation and resumed from;
  None: nothing is saved (SIGTERM ends the process as usual). ``log_fn(step, scalars)``
  gets the training (every epoch) and evaluation metrics.
  """
  train_features = jnp.asarray(train_features, jnp.float32)
  train_labels = jnp.asarray(train_labels, jnp.int32)
  n, dim = train_features.shape
  batch_size = min(batch_size, n)
  steps = splits.steps_per_epoch(n, batch_size)
  schedule = optim.learning_rate_schedule(
      peak_lr=optim.peak_learning_rate(base_lr, batch_size),
      warmup_steps=int(round(warmup_epochs * steps)), total_steps=epochs * steps)
  tx = optim.create_probe_optimizer(schedule, name=optimizer, weight_decay=weight_decay,
                                    momentum=momentum)
  model = LinearProbe(num_classes)
  init_key, shuffle_key = jax.random.split(jax.random.key(seed))

  def init_fn(key):
    variables = model.init(key, jnp.zeros((2, dim), jnp.float32), train=False)
    return train_state.ClassifierState.create(variables["params"], variables["batch_stats"],
                                              tx)

  # On one device, as the features.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shardings = jax.tree.map(lambda _: device, jax.eval_shape(init_fn, init_key))
  ckpt = None
  if checkpoint_dir:
    ckpt = checkpointing.Checkpointer(checkpoint_dir, max_to_keep=1, async_save=False,
                                      best_metric="top1")
  try:
    state = (ckpt.restore_or_init(init_fn, init_key, shardings, name="linear probe") if ckpt
             else jax.jit(init_fn, out_shardings=shardings)(init_key))
    start_step = int(state.step)
    run = loop.train_evaluate_save(
        name="linear probe", state=state,
        train_step=jax.jit(functools.partial(train_step, model=model, learning_rate=schedule),
                           donate_argnums=(0,)),
        train_iter=batches(train_features, train_labels, shuffle_key, batch_size=batch_size,
                           start_step=start_step),
        step_key=shuffle_key, start_step=start_step, total_steps=epochs * steps,
        eval_every=eval_every_epochs * steps, log_every=steps,
        interval=loop.Interval(ProbeMetrics, start_step=start_step, batch_size=batch_size,
                               checkpointer=ckpt, config_prefix="linear_probe", clips=False),
        writer=types.SimpleNamespace(write_scalars=log_fn or (lambda step, scalars: None)),
        checkpointer=ckpt, best_metric="top1",
        evaluate=lambda state: evaluate(state, model, eval_features, eval_labels))
  finally:
    if ckpt is not None:
      ckpt.close()
  return run.state, run.last


def validate(config: ml_collections.ConfigDict) -> None:
  """The ``linear_probe`` fields (``configs/linear_probe.py``)."""
  eval_config.check_distinct_splits(config)
  features.eval_backend(config)  # an unknown input.backend fails here
  lp = config.linear_probe
  eval_config.check_pools(lp.pool, "linear_probe.pool", features.POOLS)
  if lp.pool.count(",") > 0:
    eval_config.fail(f"linear_probe.pool is one pool, got {lp.pool!r}")
  if lp.optimizer not in ("lars", "sgd"):
    eval_config.fail(f"linear_probe.optimizer must be 'lars' or 'sgd', got {lp.optimizer!r}")
  if lp.epochs <= 0 or lp.batch_size <= 0 or not 0 <= lp.warmup_epochs <= lp.epochs:
    eval_config.fail("linear_probe needs epochs > 0, batch_size > 0 and 0 <= warmup_epochs "
                     "<= epochs")


def run(config: ml_collections.ConfigDict, workdir: str,
        pretrained=None) -> dict[str, float]:
  """Linear probe of a pre-trained encoder (``config.mode == "linear_probe"``): extracts
  (or loads cached) features of both splits, trains the head, writes TensorBoard scalars and
  ``workdir/linear_probe_results.json``.

  Raises:
    errors.WorkdirError: ``workdir`` holds a probe of another encoder or input (checked
      before any feature is extracted, so that run's cache is kept too).
  """
  lp = config.linear_probe
  pretrained = pretrained or loading.load(config.pretrained, config.pretrained_step,
                                         encoder_only=True)
  input_config = eval_config.input_config(config, pretrained)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  # The probe's state depends on the training features of its pool only.
  features.check_resume_key(checkpoint_dir, "linear_probe", {
      **features.features_key(pretrained, input_config, config.input.train_split,
                              pools=(lp.pool,), crop_pct=config.input.crop_pct,
                              backend=features.eval_backend(config)),
      **features.training_key(config, "linear_probe")})
  train, test, source = features.train_and_eval_features(config, workdir, pretrained,
                                                         input_config, ("cls", "mean"))
  num_classes = eval_config.num_classes(config, train["label"])
  writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
  _, results = train_linear_probe(
      train[lp.pool], train["label"], test[lp.pool], test["label"], num_classes=num_classes,
      epochs=lp.epochs, batch_size=lp.batch_size, base_lr=lp.base_lr,
      warmup_epochs=lp.warmup_epochs, weight_decay=lp.weight_decay, optimizer=lp.optimizer,
      momentum=lp.momentum, seed=config.seed, eval_every_epochs=lp.eval_every_epochs,
      checkpoint_dir=checkpoint_dir, log_fn=writer.write_scalars)
  writer.flush()
  results = {f"{lp.pool}/{k}": v for k, v in results.items()}
  logging.info("linear probe (%s) of %s: %s", lp.pool, pretrained.source, results)
  eval_config.write_results(workdir, "linear_probe", results, source=source)
  return results
