"""The pre-training loop: state, sharded step, data, logging, checkpoints, preemption.

``train_and_evaluate(config, workdir)`` runs (or resumes) one pre-training run. Only this
module and the input pipeline touch TensorFlow (through the CLU writers and tf.data).
"""


import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
from clu import metric_writers, metrics as clu_metrics, periodic_actions
import flax
import jax
import ml_collections
import numpy as np

from lut_jax import (build, checkpointing, config_lib, image_utils, reconstruction, sharding,
                     train_state, train_step)

METRIC_NAMES = ("loss", "rec_loss", "bc_loss", "lr", "momentum", "grad_norm")


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Averages of the step metrics over a logging interval (merged on device)."""

  loss: clu_metrics.Average.from_output("loss")
  rec_loss: clu_metrics.Average.from_output("rec_loss")
  bc_loss: clu_metrics.Average.from_output("bc_loss")
  lr: clu_metrics.LastValue.from_output("lr")
  momentum: clu_metrics.LastValue.from_output("momentum")
  grad_norm: clu_metrics.Average.from_output("grad_norm")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the run stops without saving that state."""


class _Preemption:
  """Turns SIGTERM into a flag the loop polls, so it can save and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):  # noqa: ARG001
      logging.warning("SIGTERM received: saving a checkpoint and stopping.")
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _data_iterator(config: ml_collections.ConfigDict, *, start_step: int,
                   batch_sharding: jax.sharding.NamedSharding) -> Iterator[dict[str, Any]]:
  from lut_jax import input_pipeline  # local: tf.data is only needed here

  it = input_pipeline.create_pretrain_iterator(config.input, seed=config.seed,
                                               start_step=start_step, sharding=batch_sharding)
  keys = ("view1", "view2") if config_lib.uses_bc(config) else ("view1",)
  finish = None
  if config.input.device_augment:
    from lut_jax import device_augment  # local: only this mode needs it
    # Per-example ops on batch-sharded inputs keep the batch sharding. Returning only `keys`
    # lets XLA drop view 2's colour ops for MAE.
    finish = jax.jit(lambda b: {k: v for k, v in device_augment.finish_batch(b).items()
                                if k in keys})
  for batch in it:
    if finish is not None:
      batch = finish(batch)
    yield {k: batch[k] for k in keys}


def _num_examples(config: ml_collections.ConfigDict) -> Optional[int]:
  if config.total_steps > 0 and config.optim.warmup_steps >= 0:
    return None
  from lut_jax import datasets  # local: tfds is only needed to count examples
  return datasets.num_examples(config.input)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str,
    data_fn: Optional[Callable[[int], Iterator[dict[str, Any]]]] = None,
) -> train_state.TrainState:
  """Pre-trains (or resumes) in ``workdir``; returns the final state.

  ``data_fn(start_step)`` replaces the tf.data pipeline (tests, benchmarks): it returns an
  iterator over the global batches from ``start_step`` on.
  """
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.create_mesh(config.mesh.fsdp)
  sharding.check_batch_size(config.input.batch_size, mesh, accum_steps=config.optim.accum_steps,
                            process_count=jax.process_count())
  total_steps, warmup_steps = build.run_length(config, _num_examples(config))
  model, abstract_state, state_shardings, p_step, p_init = build.build_training(
      config, mesh, total_steps=total_steps, warmup_steps=warmup_steps)

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=config.keep_checkpoints)
  base_key = jax.random.key(config.seed)
  init_key, step_base_key, summary_key = jax.random.split(base_key, 3)
  if ckpt.latest_step() is not None:
    logging.info("Resuming from %s step %d", ckpt.directory, ckpt.latest_step())
    state = ckpt.restore(checkpointing.abstract_like(abstract_state, state_shardings))
    state = state.replace(tx=abstract_state.tx)
  else:
    state = p_init(init_key)
  start_step = int(jax.device_get(state.step))

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    config_lib.save_config(config, workdir)
    writer.write_hparams(_flat_hparams(config))
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info("model %s (%s), %.2fM params, %d steps (%d warmup), mesh %s, start step %d",
               config.model.variant, config.method, num_params / 1e6, total_steps, warmup_steps,
               dict(mesh.shape), start_step)

  if data_fn is None:
    data = _data_iterator(config, start_step=start_step,
                          batch_sharding=sharding.batch_sharding(mesh))
  else:
    data = data_fn(start_step)
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)]
  if config.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                          first_profile=start_step + config.log_every_steps))
  num_images = min(8, config.input.batch_size)
  summary_fn = jax.jit(
      lambda params, view1, key: reconstruction.reconstruct(
          model, params, view1[:num_images], key, mask_ratio=config.loss.mask_ratio,
          norm_pix=config.loss.norm_pix),
      out_shardings=sharding.replicated(mesh))

  acc = None
  interval_start, interval_step = time.time(), start_step
  # Whatever stops the loop (end, preemption, an exception), a save in flight finishes:
  # a crash never leaves the newest checkpoint half-written or lost.
  try:
    with _Preemption() as preemption, metric_writers.ensure_flushes(writer):
      for step in range(start_step, total_steps):
        batch = next(data)
        state, metrics = p_step(state, batch, train_step.step_key(step_base_key, step))
        update = TrainMetrics.single_from_model_output(**metrics)
        acc = update if acc is None else acc.merge(update)
        done = step + 1
        for hook in hooks:
          hook(done)
        stop = preemption.requested or ckpt.reached_preemption(done)
        save = done % config.checkpoint_every_steps == 0 or done == total_steps or stop
        if done % config.log_every_steps == 0 or save:
          # Reading the metrics is the loop's only host synchronisation; it also guards
          # every save: a non-finite state is never written over a good checkpoint.
          scalars = {k: float(v) for k, v in acc.compute().items()}
          if not np.isfinite(scalars["loss"]):
            ckpt.wait()
            raise NonFiniteLossError(
                f"non-finite loss ({scalars['loss']}) between steps {interval_step + 1} and "
                f"{done}; last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}")
          elapsed = max(time.time() - interval_start, 1e-9)
          scalars["images_per_sec"] = (done - interval_step) * config.input.batch_size / elapsed
          writer.write_scalars(done, scalars)
          acc, interval_start, interval_step = None, time.time(), done
        if done % config.image_summary_every_steps == 0 or done == total_steps:
          images = summary_fn(state.params, batch["view1"], jax.random.fold_in(summary_key, done))
          writer.write_images(done, {
              k: image_utils.denormalize(jax.device_get(images[k]), config.input.channels)
              for k in ("input", "masked", "reconstruction_visible")})
        if save:
          ckpt.save(done, state, force=True)
        if stop:
          logging.warning("Stopped for preemption at step %d; rerun the command to resume.", done)
          break
  finally:
    ckpt.close()
  return state


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  out = {}

  def visit(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        visit(name + ".", value)
      elif isinstance(value, (int, float, str, bool)):
        out[name] = value
  visit("", config)
  return out

