"""Input pipelines: LUT's two-view pre-training batches and a single-view evaluation set.

Pre-training (``create_pretrain_iterator``), per process:

  share of the split (datasets.py) -> per-epoch seeded shuffle -> first epoch: skip to the
  resume point -> decode -> two views (augment.py), keyed by (seed, epoch, example id)
  -> batch (drop remainder) -> tf.data prefetch -> global jax.Array (double-buffered).

Every random choice is a function of (seed, epoch, example id) and the epoch's order of
(seed, epoch), so the batch at step k is the same whether the run started at 0 or resumed at
k: nothing about the data goes into checkpoints. Each epoch yields exactly
``steps_per_epoch`` batches on every process (from the smallest share), so epochs start at
known steps; the examples an epoch leaves out change with the shuffle.

Shuffling: random-access sources (idx arrays, image folders) get a full permutation per
epoch, and resuming skips for free. tfds sources are read in file order and shuffled through
a ``config.input.shuffle_buffer`` window (tfds shuffles records when it prepares a dataset);
resuming reads and drops the skipped records of the current epoch, still encoded.

A file of a folder source that goes bad after the source was checked stops the iterator
with a ``DataError`` naming it, found on the host side once TensorFlow has raised (the
tf.data graph is the same either way). This module imports TensorFlow, which the training
core must not; programs using it hide the GPUs from TensorFlow first (``errors.run_app``).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from lut_jax import errors
from lut_jax.data import augment, datasets, image_utils, splits
from lut_jax.data import device_augment as device_augment_lib

# Keeps this pipeline's random streams apart from anything else keyed on the same seed.
_SEED_SALT = 0x4C5554_44415441  # "LUTDATA"
_MAX_EPOCHS = 2**62


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """[0, 1] float -> uint8 (rounded): a quarter of the bytes to move to the device, and the
  quantisation PIL applies after the reference's resize anyway."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)


def _pack_colour_params(jitter: augment.ColorJitter, strong: augment.StrongOp) -> tf.Tensor:
  """View 2's colour draws as float32 ``[NUM_PARAMS]`` in device_augment's layout."""
  values = {"apply": jitter.apply, "brightness": jitter.brightness,
            "contrast": jitter.contrast, "saturation": jitter.saturation, "hue": jitter.hue,
            "op": strong.op, "sigma": strong.sigma}
  values.update({f"order{i}": jitter.order[i] for i in range(4)})
  return tf.stack([tf.cast(values[name], tf.float32)
                   for name in device_augment_lib.PARAM_FIELDS])


def _check_input(input_config) -> None:
  """Validates the image fields the pipelines read."""
  image_utils.check_image_size(input_config.image_size)
  if input_config.channels not in (1, 3):
    raise ValueError(f"input.channels must be 1 or 3, got {input_config.channels!r}")


def _local_batch_size(batch_size: int, process_count: int) -> int:
  """The per-process batch size; the global one must split evenly over the processes."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if batch_size % process_count:
    raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of "
                     f"processes ({process_count}): each process loads batch_size / "
                     "process_count examples")
  return batch_size // process_count


def numpy_batches(dataset: tf.data.Dataset,
                  source: datasets.DataSource) -> Iterator[dict[str, np.ndarray]]:
  """``dataset``'s batches as numpy; a read failure becomes the ``DataError`` that names
  the file gone bad, where ``source`` can tell (otherwise TensorFlow's error stands)."""
  iterator = iter(dataset)  # here, not at the first batch: reading and prefetching start now

  def batches() -> Iterator[dict[str, np.ndarray]]:
    while True:
      try:
        batch = next(iterator)
      except StopIteration:
        return
      except tf.errors.OpError as e:
        data_error = source.read_error(e)
        if data_error is not None:
          raise data_error from e
        raise
      yield {k: v.numpy() for k, v in batch.items()}

  return batches()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  count = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} not in [0, {count})")
  return index, count


def _key(seed: tf.Tensor, data: tf.Tensor) -> tf.Tensor:
  """Folds ``data`` into a ``[2]`` int64 key: 128 fresh Philox bits per (key, data)."""
  seed = tf.cast(seed, tf.int64)
  return tf.random.stateless_uniform(
      [2], seed=tf.stack([seed[0], tf.bitwise.bitwise_xor(seed[1], tf.cast(data, tf.int64))]),
      minval=None, maxval=None, dtype=tf.int64)


def epoch_key(seed: int, epoch: tf.Tensor) -> tf.Tensor:
  """The ``[2]`` key of one epoch (its shuffle, and the parent of its examples' keys)."""
  return _key(tf.constant([seed, _SEED_SALT], tf.int64), epoch)


def example_key(seed: int, epoch: tf.Tensor, example_id: tf.Tensor) -> tf.Tensor:
  """The stateless seed of one example's two views in one epoch."""
  return _key(epoch_key(seed, epoch), example_id)


class BatchIterator:
  """Yields the global batches of :func:`epoch_batches` forever (pre-training's views,
  fine-tuning's labelled images); also says what it reads."""

  def __init__(self, dataset: tf.data.Dataset, *, source: datasets.DataSource,
               steps_per_epoch: int, local_batch_size: int, global_shape: dict,
               sharding: jax.sharding.Sharding | None, device_prefetch: int,
               start_step: int):
    self.source = source
    self.num_examples = source.num_examples
    self.num_skipped = source.num_skipped  # files left out (folder sources); log it
    self.steps_per_epoch = steps_per_epoch  # equal on every process
    self.local_batch_size = local_batch_size
    self.step = start_step  # of the next batch
    self.element_spec = dataset.element_spec
    self._batches = numpy_batches(dataset, source)  # endless: epoch_batches repeats
    self._global_shape = global_shape
    self._sharding = sharding
    self._device_prefetch = max(1, device_prefetch)
    self._queue: collections.deque = collections.deque()

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def _next_local(self) -> dict[str, np.ndarray]:
    return next(self._batches)

  def _to_global(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    # Transfers are asynchronous: queueing the next batches overlaps their host->device
    # copies with the current step (double buffering, without flax.jax_utils).
    return {k: jax.make_array_from_process_local_data(self._sharding, v,
                                                      self._global_shape[k])
            for k, v in local.items()}

  def __next__(self) -> dict[str, Any]:
    if self._sharding is None:
      batch = self._next_local()
    else:
      while len(self._queue) < self._device_prefetch:
        self._queue.append(self._to_global(self._next_local()))
      batch = self._queue.popleft()
    self.step += 1
    return batch


def epoch_steps(source: datasets.DataSource, process_count: int, local_batch: int) -> int:
  """Batches per epoch, the same on every process (from the smallest share)."""
  steps = splits.steps_per_epoch(source.num_examples, local_batch * process_count)
  if steps == 0:
    # A share holds at least N // process_count examples, so this is N < the global batch.
    raise errors.DataError(
        f"{source.name} split {source.split!r} has {source.num_examples} examples, fewer "
        f"than one batch of {local_batch * process_count}",
        hint="use a smaller batch size (a multiple of the process count) or more data")
  return steps


def epoch_batches(share: datasets.Share, make_example: Callable[..., dict[str, tf.Tensor]],
                  input_config, *, seed: int, steps_per_epoch: int, local_batch: int,
                  start_step: int) -> tf.data.Dataset:
  """``make_example(epoch, element)`` over this process's share, batched, forever, from
  ``start_step`` on: each epoch's order is a function of ``(seed, epoch)`` and holds
  exactly ``steps_per_epoch`` batches, so the batch at a step never depends on where the run
  started. Shared by pre-training and fine-tuning."""
  per_epoch = steps_per_epoch * local_batch
  start_epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
  skip = step_in_epoch * local_batch
  shuffle_buffer = max(1, min(input_config.shuffle_buffer, share.num_examples))

  def epoch_stream(epoch: tf.Tensor) -> tf.data.Dataset:
    key = epoch_key(seed, epoch)
    first = tf.where(epoch == start_epoch, tf.constant(skip, tf.int64),
                     tf.constant(0, tf.int64))
    if share.random_access:
      order = tf.random.experimental.stateless_shuffle(
          tf.range(share.num_examples, dtype=tf.int64), key)
      ds = tf.data.Dataset.from_tensor_slices(order[first:per_epoch])
    else:
      ds = share.read().shuffle(shuffle_buffer, seed=key[0], reshuffle_each_iteration=False)
      ds = ds.take(per_epoch).skip(first)
    return ds.map(lambda x: (epoch, x))

  def read_and_make(epoch: tf.Tensor, x) -> dict[str, tf.Tensor]:
    return make_example(epoch, share.read(x) if share.random_access else x)

  ds = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS).flat_map(epoch_stream)
  ds = ds.map(read_and_make, num_parallel_calls=_parallel_calls(input_config),
              deterministic=True)
  return _deterministic(ds.batch(local_batch, drop_remainder=True))


def _parallel_calls(input_config) -> int:
  parallel = input_config.num_parallel_calls
  return tf.data.AUTOTUNE if parallel is None or parallel < 0 else parallel


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
  """``ds`` prefetched, in a fixed order (the resume guarantee needs it)."""
  options = tf.data.Options()
  options.deterministic = True
  # One thread per op: parallelism comes from the map's many elements (big_vision does this).
  options.threading.max_intra_op_parallelism = 1
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def create_pretrain_iterator(input_config, *, seed: int, start_step: int = 0,
                             sharding: jax.sharding.NamedSharding | None = None,
                             process_index: int | None = None,
                             process_count: int | None = None,
                             with_ids: bool = False,
                             two_views: bool = True) -> BatchIterator:
  """A ``BatchIterator`` of the two-view pre-training stream from ``start_step`` on:
  ``{"view1", "view2"}``, float32 ``(B, S, S, C)`` normalised images, forever; the batches
  an uninterrupted run yields from that step. ``two_views=False`` (MAE): view 1 alone, the
  same view 1.

  Args:
    input_config: ``config.input``; ``prefetch`` is the number of global batches kept on the
      devices ahead of the one returned (tf.data's own prefetch is autotuned).
      ``device_augment``: the host only decodes, resizes and crops, yielding uint8
      ``view1_crop``/``view2_crop`` and ``view2_params`` (float32 ``(B,
      device_augment.NUM_PARAMS)``, the host path's draws), which the jitted
      ``device_augment.finish_batch`` turns into ``{"view1", "view2"}``.
    seed: base seed of the shuffles and augmentations.
    sharding: of the global batch, assembled with
      ``jax.make_array_from_process_local_data`` from ``batch_size / process_count``
      examples per process. None: numpy arrays of this process's examples.
    process_index, process_count: override ``jax.process_index/count()`` (tests simulate
      several processes with them).
    with_ids: also yield ``"id"`` (int64 example ids; numpy output only), for debugging.

  Raises ValueError for a bad batch size, image size, channels or start_step; DataError
  for an unknown dataset or split, or one smaller than a batch; DataNotFoundError (also a
  FileNotFoundError) for a dataset not on this machine.
  """
  index, count = _process(process_index, process_count)
  _check_input(input_config)
  local_batch = _local_batch_size(input_config.batch_size, count)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if with_ids and sharding is not None:
    raise ValueError("with_ids is for numpy output (sharding=None) only")
  size, channels = input_config.image_size, input_config.channels
  source = datasets.source_for(input_config)
  share = source.share(index, count)
  steps = epoch_steps(source, count, local_batch)
  on_device = input_config.device_augment
  recipe = image_utils.view_recipe(input_config)

  def make_views(epoch: tf.Tensor, element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = augment.decode(element["image"], channels)
    key = example_key(seed, epoch, element["id"])
    if not two_views:
      view1 = augment.first_view(image, key, size, normalized=not on_device, recipe=recipe)
      out = {device_augment_lib.VIEW1_CROP: _to_uint8(view1)} if on_device else {"view1": view1}
    elif on_device:
      view1, view2, jitter, strong = augment.two_views_geometric(image, key, size,
                                                                      recipe)
      out = {device_augment_lib.VIEW1_CROP: _to_uint8(view1),
             device_augment_lib.VIEW2_CROP: _to_uint8(view2),
             device_augment_lib.VIEW2_PARAMS: _pack_colour_params(jitter, strong)}
    else:
      view1, view2 = augment.two_views(image, key, size, recipe=recipe)
      out = {"view1": view1, "view2": view2}
    if with_ids:
      out["id"] = element["id"]
    return out

  ds = epoch_batches(share, make_views, input_config, seed=seed, steps_per_epoch=steps,
                     local_batch=local_batch, start_step=start_step)
  start_epoch, step_in_epoch = divmod(start_step, steps)
  skip = step_in_epoch * local_batch

  logging.info("Pre-training input: %s, split %r: %d examples (%d skipped), process %d/%d "
               "loads %d per step, %d steps per epoch; starting at step %d (epoch %d, "
               "example %d of its share).", source.description, source.split,
               source.num_examples, source.num_skipped, index, count, local_batch, steps,
               start_step, start_epoch, skip)
  if on_device:
    logging.info("Pre-training input: view 2's colour ops and normalisation run on the "
                 "accelerator (input.device_augment); the host yields uint8 crops.")
  shape = (input_config.batch_size, size, size, channels)
  if on_device:
    global_shape = {device_augment_lib.VIEW1_CROP: shape, device_augment_lib.VIEW2_CROP: shape,
                    device_augment_lib.VIEW2_PARAMS: (input_config.batch_size,
                                                      device_augment_lib.NUM_PARAMS)}
  else:
    global_shape = {"view1": shape, "view2": shape}
  global_shape = {k: v for k, v in global_shape.items() if k in ds.element_spec}
  return BatchIterator(
      ds, source=source, steps_per_epoch=steps, local_batch_size=local_batch,
      global_shape=global_shape, sharding=sharding,
      device_prefetch=input_config.prefetch, start_step=start_step)


class EvalDataset:
  """Re-iterable single-view evaluation batches (``for batch in eval_ds``). Each batch:
  ``image`` float32 ``(B, S, S, C)`` normalised centre crops, ``label`` int32, ``mask`` bool
  (False on padding; padded labels are -1). Every process yields ``num_batches`` batches;
  together they hold each example of the split exactly once."""

  def __init__(self, dataset: tf.data.Dataset, *, source: datasets.DataSource,
               num_batches: int, local_batch_size: int,
               sharding: jax.sharding.Sharding | None, global_batch_size: int):
    self.source = source
    self.num_examples = source.num_examples
    self.num_classes = source.num_classes
    self.num_batches = num_batches
    self.local_batch_size = local_batch_size
    self._dataset = dataset
    self._sharding = sharding
    self._global_batch_size = global_batch_size

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for local in numpy_batches(self._dataset, self.source):
      if self._sharding is None:
        yield local
      else:
        yield {k: jax.make_array_from_process_local_data(
            self._sharding, v, (self._global_batch_size,) + v.shape[1:])
               for k, v in local.items()}


def create_eval_dataset(input_config, split: str, *, batch_size: int,
                        crop_pct: float | None = None,
                        sharding: jax.sharding.NamedSharding | None = None,
                        process_index: int | None = None,
                        process_count: int | None = None) -> EvalDataset:
  """An ``EvalDataset`` of centre-crop views of ``split`` (tfds syntax) with labels, in
  global batches of ``batch_size``, the last ones padded (``mask`` False) so that every
  process yields as many; ``input_config``'s split and batch size are not used.

  ``crop_pct``: the shorter side is resized to ``int(S / crop_pct)`` before the ``S x S``
  centre crop; None or -1: the reference's rule, 224/256 for ``S <= 224`` else 1.0 (1.0
  keeps whole images, e.g. 28 px Fashion-MNIST). ``sharding``, ``process_index``,
  ``process_count``: as in ``create_pretrain_iterator``. Errors as there.
  """
  index, count = _process(process_index, process_count)
  _check_input(input_config)
  local_batch = _local_batch_size(batch_size, count)
  size, channels = input_config.image_size, input_config.channels
  crop_pct = image_utils.eval_crop_pct(size, crop_pct)
  source = datasets.get_source(input_config.dataset, split, input_config.data_dir)
  share = source.share(index, count)
  largest_share = -(-source.num_examples // count)
  num_batches = -(-largest_share // local_batch)
  parallel = _parallel_calls(input_config)

  def view(element: dict) -> dict[str, tf.Tensor]:
    image = augment.decode(element["image"], channels)
    return {"image": augment.eval_view(image, size, crop_pct),
            "label": tf.cast(element["label"], tf.int32), "mask": tf.constant(True)}

  if share.random_access:  # parallel: reading a folder's file decodes it
    ds = tf.data.Dataset.range(share.num_examples).map(
        share.read, num_parallel_calls=parallel, deterministic=True)
  else:
    ds = share.read()
  ds = ds.map(view, num_parallel_calls=parallel, deterministic=True)
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([size, size, channels], tf.float32),
      "label": tf.constant(-1, tf.int32), "mask": tf.constant(False)})
  ds = ds.concatenate(padding.repeat(num_batches * local_batch - share.num_examples))
  ds = _deterministic(ds.batch(local_batch, drop_remainder=True))
  return EvalDataset(ds, source=source, num_batches=num_batches, local_batch_size=local_batch,
                     sharding=sharding, global_batch_size=local_batch * count)

