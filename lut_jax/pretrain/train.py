"""The pre-training loop: state, sharded step, data, logging, checkpoints, preemption.

``pretrain(config, workdir)`` runs (or resumes) one pre-training run. With
``input.backend = "device"`` nothing imports TensorFlow (lut_jax/data/device_input.py, and
lut_jax/runtime/writers.py picks a TF-free writer when TensorFlow is absent); the ``"tfdata"``
backend reads data with tf.data.
"""


import importlib.util
import json
import os
import shlex
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
from etils import epath
from clu import metrics as clu_metrics
from clu import parameter_overview
import jax
import ml_collections
import numpy as np

from lut_jax import config_lib, errors
from lut_jax.data import device_augment, device_input, folders, image_utils
from lut_jax.pretrain import build, monitor as monitor_lib, reconstruction, train_state, train_step
from lut_jax.runtime import checkpointing, host_memory, loop, run_identity, sharding
from lut_jax.runtime import workdir_lock, writers


# Averages of the step metrics over a logging interval (merged on device); the schedules'
# values are their last ones.
TrainMetrics = clu_metrics.Collection.create(
    **{name: clu_metrics.Average.from_output(name) for name in train_step.AVERAGED_METRICS},
    lr=clu_metrics.LastValue.from_output("lr"),
    momentum=clu_metrics.LastValue.from_output("momentum"),
    first_nonfinite_step=loop.FirstNonFiniteStep)


def _data_iterator(config: ml_collections.ConfigDict, *, start_step: int,
                   mesh: jax.sharding.Mesh) -> Iterator[dict[str, Any]]:
  two_views = config_lib.uses_bc(config)  # MAE makes and transfers view 1 only
  if config.input.backend == "device":
    data = device_input.DeviceData(config.input, seed=config.seed, mesh=mesh,
                                   two_views=two_views)
    return data.iterator(start_step)
  return _tfdata_iterator(config, start_step=start_step, two_views=two_views,
                          batch_sharding=sharding.batch_sharding(mesh))


def _tfdata_iterator(config: ml_collections.ConfigDict, *, start_step: int, two_views: bool,
                     batch_sharding: jax.sharding.NamedSharding) -> Iterator[dict[str, Any]]:
  from lut_jax.data import input_pipeline  # optional: tensorflow (tf.data only here)

  it = input_pipeline.create_pretrain_iterator(config.input, seed=config.seed,
                                               start_step=start_step, sharding=batch_sharding,
                                               two_views=two_views)
  if not config.input.device_augment:
    yield from it
    return
  # Per-example ops on batch-sharded inputs keep the batch sharding.
  finish = jax.jit(device_augment.finish_batch)
  for batch in it:
    yield finish(batch)


def input_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What fixes the examples of every step besides the config
  (:func:`lut_jax.runtime.run_identity.check_input_record` compares it on resume).

  ``input.data_dir`` may change on resume (the data moved), and with it the reader
  (Fashion-MNIST from a tfds copy or from the idx files: two orders); a folder may have
  gained files; and on the tf.data path each process reads its own share of every epoch, so
  a step's examples (and an epoch's steps) depend on the process count. The device path's
  batches depend only on ``(seed, step)`` and the data, which its fingerprint covers.
  """
  if config.input.backend == "device":
    split = device_input.load_split(config.input)  # cached: the loop reads the same
    return {"backend": "device", "num_examples": split.num_examples,
            "data_sha256": split.fingerprint}
  from lut_jax.data import datasets  # optional: tensorflow (only where data is read)
  source = datasets.source_for(config.input)
  return {"backend": "tfdata", "num_examples": source.num_examples, "reader": source.reader,
          "process_count": jax.process_count()}


def _num_examples(config: ml_collections.ConfigDict, *, real_data: bool) -> Optional[int]:
  """Examples in the training split. With real data the source is always built here, so
  an unknown data set or split is reported before anything is written to the workdir."""
  if real_data:
    image_utils.check_image_size(config.input.image_size)
    image_utils.view_recipe(config.input)
  elif config.total_epochs is None and config.optim.warmup_epochs is None:
    return None
  if config.input.backend == "device":
    return device_input.load_split(config.input).num_examples
  errors.require("tensorflow", purpose="input.backend='tfdata' (tf.data pipelines)",
                 extra="data")
  from lut_jax.data import datasets  # optional: tensorflow (only where data is read)
  return datasets.num_examples(config.input)


def pretrain(
    config: ml_collections.ConfigDict, workdir: str,
    data_fn: Optional[Callable[[int], Iterator[dict[str, Any]]]] = None, *,
    adopt_checkpoint: bool = False,
) -> train_state.TrainState:
  """Pre-trains (or resumes) in ``workdir``; returns the final state.

  ``data_fn(start_step)`` replaces the tf.data pipeline (tests, benchmarks): it returns an
  iterator over the global batches from ``start_step`` on. ``adopt_checkpoint`` resumes
  checkpoints that have no ``config.json`` beside them (copied by hand) with ``config``.
  """
  # Everything that can be checked is checked before the workdir is touched.
  build.validate(config)
  mesh = sharding.create_mesh(config.mesh.fsdp)
  sharding.check_batch_size(config.input.batch_size, mesh, accum_steps=config.optim.accum_steps,
                            process_count=jax.process_count())
  if jax.default_backend() == "cpu":
    if note := host_memory.missing_tuning_note():
      logging.warning(note)
    elif note := host_memory.applied_tuning_note():
      logging.info(note)
  num_examples = _num_examples(config, real_data=data_fn is None)
  total_steps, warmup_steps = build.run_length(config, num_examples)
  monitor = monitor_lib.Monitor(config) if config.monitor.every_steps > 0 else None
  with workdir_lock.WorkdirLock(workdir, enabled=jax.process_index() == 0,
                                kind=workdir_lock.PRETRAINING):
    return _train(config, workdir, data_fn, mesh=mesh, total_steps=total_steps,
                  warmup_steps=warmup_steps, adopt_checkpoint=adopt_checkpoint,
                  num_examples=num_examples, monitor=monitor)


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _train(config, workdir, data_fn, *, mesh, total_steps, warmup_steps, adopt_checkpoint,
           num_examples, monitor):
  training = build.build_training(config, mesh, total_steps=total_steps,
                                  warmup_steps=warmup_steps)
  abstract_state = training.abstract_state

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=config.keep_checkpoints,
                                    keep_every_steps=config.keep_checkpoint_every_steps,
                                    run_config=config_lib.config_json(config))
  base_key = jax.random.key(config.seed)
  init_key, step_base_key, summary_key = jax.random.split(base_key, 3)
  if ckpt.latest_step() is not None:
    run_identity.check_resume_config(config, workdir, adopt=adopt_checkpoint)
    # Each step's own config.json is checked too: a step copied in from another run.
    state, step = ckpt.restore_newest_intact(
        checkpointing.abstract_like(abstract_state, training.state_shardings),
        config_changes=lambda saved: run_identity.config_changes(saved, config))
    logging.info("Resuming from %s step %d", ckpt.directory, step)
    state = state.replace(tx=abstract_state.tx)
  else:
    state = training.init(init_key)
  start_step = int(jax.device_get(state.step))
  if data_fn is None:
    run_identity.check_input_record(workdir, input_record(config), resuming=start_step > 0)

  writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
  # Written at every start: the checks above allow only run_identity.RESUME_MAY_CHANGE
  # fields to differ, and the file must say what the run does now.
  config_lib.save_config(config, workdir)
  if start_step == 0:
    hparams = run_identity.flat(json.loads(config.to_json_best_effort()))
    writer.write_hparams({k: v for k, v in hparams.items()
                          if isinstance(v, (int, float, str, bool))})
  if config.optim.accum_steps > 1 and config_lib.uses_bc(config) and \
      config.model.head_norm == "batch":
    logging.warning("optim.accum_steps=%d with batch norm in the heads: batch statistics are "
                    "per micro-batch (not over the global batch as SyncBatchNorm would give) "
                    "and running averages update twice per micro-batch.",
                    config.optim.accum_steps)
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  if jax.process_index() == 0:  # the table runs to hundreds of lines: a file, not the log
    table = epath.Path(workdir) / "parameters.txt"
    table.write_text(parameter_overview.get_parameter_overview(abstract_state.params,
                                                               include_stats=False) + "\n")
    logging.info("Parameter table (name, shape, dtype, size): %s", table)
  logging.info("model %s (%s), %.2fM params, %d steps (%d warmup), mesh %s, start step %d",
               config.model.variant, config.method, num_params / 1e6, total_steps, warmup_steps,
               dict(mesh.shape), start_step)

  if data_fn is None:
    data = _data_iterator(config, start_step=start_step, mesh=mesh)
  else:
    data = data_fn(start_step)
  profile_start = start_step + config.log_every_steps
  profile = config.profile_steps > 0 and jax.process_index() == 0
  epoch_size = num_examples / config.input.batch_size if num_examples else None
  num_images = min(8, config.input.batch_size)
  summary_fn = jax.jit(
      lambda params, view1, key: reconstruction.reconstruct(
          training.model, params, view1[:num_images], key, mask_ratio=config.loss.mask_ratio,
          norm_pix=config.loss.norm_pix),
      out_shardings=sharding.replicated(mesh))

  t_start = time.time()
  t_first_step = None  # when the first (compiled) step finished
  interval = loop.Interval(TrainMetrics, start_step=start_step,
                           batch_size=config.input.batch_size, checkpointer=ckpt,
                           config_prefix="optim")
  logging.info("Compiling the train step; the first step includes the compilation.")
  # Whatever stops the loop (end, preemption, an exception), a save in flight finishes:
  # a crash never leaves the newest checkpoint half-written or lost.
  try:
    with loop.PreemptionGuard(ckpt) as preemption:
      for step in range(start_step, total_steps):
        with interval.timed("input"):
          batch = next(data)
        state, metrics = training.step(state, batch, train_step.step_key(step_base_key, step))
        interval.add(metrics)
        done = step + 1
        if step == start_step:  # once: say what the wait was, and keep it out of the rates
          jax.block_until_ready(metrics)
          t_first_step = time.time()
          logging.info("First step done %.1f s after start-up (compilation included); rates "
                       "exclude it.", t_first_step - t_start)
          interval.restart_clock(done)
        if profile and done == profile_start:
          jax.profiler.start_trace(workdir)
        if profile and done == profile_start + config.profile_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          logging.info("Profile of steps %d-%d written to %s.", profile_start + 1, done, workdir)
        stop = preemption.stop(done)
        save = done % config.checkpoint_every_steps == 0 or done == total_steps or stop
        if done % config.log_every_steps == 0 or save:  # every save is guarded
          scalars = interval.read(done)
          writer.write_scalars(done, {f"train/{k}": v for k, v in scalars.items()})
          logging.info("%s", _progress_line(scalars, done, total_steps, epoch_size,
                                            config.input.batch_size))
        if monitor is not None and (done % monitor.every_steps == 0 or done == total_steps):
          measured = monitor(training.model, state)
          writer.write_scalars(done, {f"monitor/{k}": v for k, v in measured.items()})
          monitor_lib.append_history(workdir, {"step": done, **measured})
          interval.restart_clock(done)  # rates measure training, not the monitor
        if done % config.image_summary_every_steps == 0 or done == total_steps:
          with interval.timed("images"):  # the first one includes its compilation
            images = summary_fn(state.params, batch["view1"],
                                jax.random.fold_in(summary_key, done))
            writer.write_images(done, {"examples": _example_grid(
                images, batch.get("view2"), num_images, config.input.channels)})
        if save:
          t_save = time.time()
          with interval.timed("checkpoint"):
            ckpt.save(done, state, force=True)
          logging.info("Checkpoint step %d: %.1f s to hand over; written to %s in the "
                       "background.", done, time.time() - t_save, ckpt.directory)
        if stop:
          logging.warning("Stopped for preemption at step %d; rerun the command to resume.", done)
          break
  finally:
    writer.flush()
    ckpt.close()
  if int(jax.device_get(state.step)) == total_steps:
    _log_summary(workdir, ckpt.directory, start_step=start_step, total_steps=total_steps,
                 t_start=t_start, t_first_step=t_first_step,
                 batch_size=config.input.batch_size, dataset=config.input.dataset)
  return state


def _example_grid(images: dict[str, jax.Array], view2: Optional[jax.Array], num_images: int,
                  channels: int) -> np.ndarray:
  """One row per example: view 1 | its masked input | the reconstruction (visible patches
  pasted back) | view 2 (LUT), the pair the BC branch compares."""
  columns = [images[k] for k in ("input", "masked", "reconstruction_visible")]
  if view2 is not None:
    columns.append(view2[:num_images])
  return np.concatenate([image_utils.denormalize(jax.device_get(c), channels)
                         for c in columns], axis=2)


def _progress_line(scalars: dict[str, float], done: int, total_steps: int,
                   epoch_size: Optional[float], batch_size: int) -> str:
  """``step 200/600 (epoch 0.43): loss 0.61, 950 images/s (input 2%, checkpoint 1%),
  ETA 0m25s``."""
  line = f"step {done}/{total_steps}"
  if epoch_size:
    line += f" (epoch {done / epoch_size:.2f})"
  line += f": loss {scalars['loss']:.4g}"
  rate = scalars.get("images_per_sec")
  if rate:
    shares = ", ".join(f"{k.split('/', 1)[1]} {v:.0%}" for k, v in scalars.items()
                       if k.startswith("time_share/"))
    line += f", {rate:.0f} images/s" + (f" ({shares})" if shares else "")
    line += f", ETA {_duration((total_steps - done) * batch_size / rate)}"
  return line


def _log_summary(workdir: str, checkpoint_dir: str, *, start_step: int, total_steps: int,
                 t_start: float, t_first_step: Optional[float], batch_size: int,
                 dataset: str) -> None:
  """The last lines of a finished run: what ran, how fast, where it is, what to run next
  (commands that run in this install, and an install line for what needs more)."""
  now = time.time()
  rate = ""
  if t_first_step is not None and total_steps - start_step > 1:
    images = (total_steps - start_step - 1) * batch_size
    rate = f", {images / max(now - t_first_step, 1e-9):.0f} images/s on average after the first"
  run = shlex.quote(workdir.rstrip("/"))
  ran = (f"steps {start_step + 1}-{total_steps} in {_duration(now - t_start)}{rate}"
         if start_step < total_steps else f"the run had already finished ({total_steps} steps)")
  # The evaluation configs' name for the run's data set (their default: Fashion-MNIST).
  data = "" if dataset == "fashion_mnist" else ":dataset=" + shlex.quote(
      dataset if dataset.startswith(folders.FOLDER_PREFIX) else "tfds:" + dataset)
  lines = [f"lut-eval --config=configs/{name}.py{data} --workdir={run}_{short} "
           f"--config.pretrained={run}" for name, short in (("knn", "knn"),
                                                          ("linear_probe", "probe"))]
  lines.append(f"lut-export --workdir={run}      # timm / Hugging Face folder")
  lines.append(("" if importlib.util.find_spec("tensorboard") else "pip install tensorboard && ")
               + f"tensorboard --logdir={run}")
  if importlib.util.find_spec("tensorflow") is None:
    lines.append("# fine-tuning, robustness, segmentation need: pip install 'lut_jax[data]'")
  logging.info("Finished: %s. Checkpoint: %s/%d.\nNext:\n  %s", ran, checkpoint_dir,
               total_steps, "\n  ".join(lines))
