"""What fine-tuning and segmentation share around their models: the data-parallel layout, the
optimizer (AdamW with layer-wise lr decay), the state created or restored (newest intact
step), the checkpoints (the latest and the best of the first reported metric), the loop
(:func:`lut_jax.runtime.loop.train_evaluate_save`, the linear probe's too: non-finite guard
before every save, SIGTERM and multi-host preemption) and the results file.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import optax

from lut_jax.evaluation import eval_config, features
from lut_jax.pretrain import train_state
from lut_jax.runtime import checkpointing, loop, optim, sharding as sharding_lib

Shardings = tuple[jax.sharding.Sharding, jax.sharding.Sharding]


def data_parallel(batch_size: int) -> Shardings:
  """``(batch, replicated)`` shardings over every device, once ``batch_size`` splits evenly
  over them."""
  mesh = sharding_lib.create_mesh(1)
  sharding_lib.check_batch_size(batch_size, mesh, process_count=jax.process_count())
  return sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)


def train(config: ml_collections.ConfigDict, workdir: str, *, mode: str, pretrained: Any,
          model: Any, schedule: optax.Schedule,
          init_variables: Callable[[jax.Array], dict[str, Any]], train_step: Callable,
          metrics: type, shardings: Shardings, resume_key: dict[str, Any], total_steps: int,
          eval_every: int, train_data: Callable[[int], Iterator[dict[str, Any]]],
          evaluate: Callable[[Any], dict[str, float]],
          result_keys: Sequence[str]) -> dict[str, float]:
  """Trains (or resumes) ``model`` in ``workdir`` and writes ``<mode>_results.json``.

  Args:
    config: the protocol's config; ``config[mode]`` holds ``batch_size`` and the optimizer
      fields (``layer_decay``, ``weight_decay``, ``b1``, ``b2``, ``grad_clip_norm``).
    workdir: checkpoints (``checkpoints/``), CLU logs and the results.
    mode: ``"finetune"`` or ``"segmentation"``: the config block, the resume record's mode
      (``features.check_resume_key``) and the results' name.
    pretrained: the ``loading.Pretrained`` (the results name it).
    model: the model; its ``depth`` sets the layer-wise lr decay.
    schedule: the learning rate per step.
    init_variables: ``key -> {"params", "batch_stats"}`` of a new run.
    train_step: ``(state, batch, key) -> (state, metrics)``; jitted here.
    metrics: the ``clu.metrics.Collection`` that averages the step metrics.
    shardings: :func:`data_parallel`'s.
    resume_key: what the state depends on; another key never resumes it.
    total_steps, eval_every: steps in all, and between evaluations (each one saved).
    train_data: ``start_step -> iterator`` of global training batches.
    evaluate: ``state -> metrics``.
    result_keys: the evaluation metrics in the results; the first ranks the checkpoints.

  Returns:
    ``result_keys``' metrics of the last evaluation, ``steps`` (fewer than ``total_steps``
    after a preemption), ``best_<result_keys[0]>`` and its ``best_step``.
  """
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top (TF)
  c, best_metric = config[mode], result_keys[0]
  batch_sharding, replicated = shardings
  tx = optim.create_finetune_optimizer(
      schedule, depth=model.depth, layer_decay_rate=c.layer_decay,
      weight_decay=c.weight_decay, b1=c.b1, b2=c.b2, grad_clip_norm=c.grad_clip_norm)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))

  def init_fn(key):
    variables = init_variables(key)
    return train_state.ClassifierState.create(variables["params"], variables["batch_stats"],
                                              tx)

  state_sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(init_fn, init_key))
  root = checkpointing.absolute(workdir)  # through epath: gs:// as well as local disk
  root.mkdir(parents=True, exist_ok=True)
  checkpoint_dir = os.fspath(root / checkpointing.CHECKPOINT_DIR)
  features.check_resume_key(checkpoint_dir, mode, resume_key)
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() > 0)
  ckpt = checkpointing.Checkpointer(checkpoint_dir, max_to_keep=1, async_save=False,
                                    best_metric=best_metric)
  try:
    state = ckpt.restore_or_init(init_fn, init_key, state_sharding, name=mode)
    start_step = int(jax.device_get(state.step))
    run = loop.train_evaluate_save(
        name=mode, state=state,
        train_step=jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, replicated),
                           out_shardings=(state_sharding, replicated), donate_argnums=(0,)),
        train_iter=train_data(start_step), step_key=step_key, start_step=start_step,
        total_steps=total_steps, eval_every=eval_every, log_every=config.log_every_steps,
        interval=loop.Interval(metrics, start_step=start_step, batch_size=c.batch_size,
                               checkpointer=ckpt, config_prefix=mode),
        writer=writer, checkpointer=ckpt, evaluate=evaluate, best_metric=best_metric,
        report=periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                               every_steps=config.log_every_steps))
    best_step, best = ckpt.best() or (total_steps, run.last)
  finally:
    ckpt.close()
  results = {k: run.last[k] for k in result_keys}
  results.update(steps=run.done if run.stopped else total_steps, best_step=best_step,
                 **{f"best_{best_metric}": best.get(best_metric, run.last[best_metric])})
  writer.flush()
  eval_config.write_results(workdir, mode, results,
                            source=features.describe_source(pretrained, [resume_key]))
  return results
