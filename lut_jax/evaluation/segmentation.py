"""Semantic-segmentation fine-tuning, BEiT's ADE20K protocol (which MAE and LUT report).

* Model (:mod:`lut_jax.models.segmenter`, :mod:`lut_jax.models.upernet`): the pre-trained
  ViT's patch tokens after four blocks (3, 5, 7, 11 of 12), brought to four scales by
  BEiT's neck (x4, x2, x1, x1/2), then UperNet (pyramid pooling (1, 2, 3, 6) + FPN + fused
  3x3 conv + classifier) and the auxiliary FCN head on the third level (loss weight 0.4).
  BatchNorm in the heads, with statistics over the global batch (SyncBN;
  ``segmentation.norm="group"`` instead for tiny batches); drop path 0.1 in the encoder,
  channel dropout 0.1 before the classifiers.
* Loss: per-pixel cross-entropy, ignore label 255 (:mod:`segmentation_metrics`).
* Optimizer: :func:`lut_jax.runtime.optim.create_finetune_optimizer`: AdamW (0.9, 0.999), weight
  decay 0.05 (not on biases, norms, the cls token), layer-wise lr decay (patch embedding
  layer 0, block ``i`` layer ``i + 1``, neck and heads layer ``depth + 1``, the full lr).
  The lr is used as given (BEiT's is for batch 16; no linear scaling), with a linear warmup
  from 0 and then a polynomial decay (power 1) to ``min_lr`` at the last step (BEiT's
  schedule, per iteration), or a cosine (``segmentation.schedule="cosine"``).
* Evaluation: ``"slide"`` (crop-size windows at ``eval_stride``, logits averaged where they
  overlap) or ``"whole"`` (one pass; images of the crop size only); a confusion matrix over
  the whole eval split gives mIoU, pixel accuracy and mean class accuracy. Each process
  evaluates its share of the split on its first device; the matrices are summed.

The loop is fine-tuning's (:mod:`lut_jax.evaluation.supervised`,
:mod:`lut_jax.runtime.loop`): a pure jitted ``(state, batch, key)`` step over a
data-parallel mesh with ``fold_in(base_key, step)`` keys; evaluation and an Orbax
checkpoint every ``eval_every_steps`` (latest and best mIoU kept); a rerun resumes; a NaN
stops the run before it is saved; SIGTERM evaluates, saves and stops. Results:
``workdir/segmentation_results.json``. Data (:mod:`lut_jax.data.segmentation_data`,
tf.data) is imported only when it is read: this module imports without TensorFlow.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable, Optional

from absl import logging
from clu import metrics as clu_metrics
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lut_jax import errors
from lut_jax.evaluation import eval_config, features, segmentation_metrics as seg_metrics
from lut_jax.evaluation import supervised
from lut_jax.models import segmenter as seg_model, upernet, variants
from lut_jax.pretrain import train_state
from lut_jax.runtime import loop, optim
from lut_jax.weights import loading

NEEDS_TENSORFLOW = "tf.data pipeline"  # see protocols

DATASETS = ("fashion_seg", "folder", "scene_parse150")  # segmentation_data's sources
SCHEDULES = ("poly", "cosine")


def parse_list(text: str, kind: Callable[[str], Any] = int) -> tuple[Any, ...]:
  """``"3,5,7,11"`` -> ``(3, 5, 7, 11)``; ``""`` -> ``()``."""
  return tuple(kind(p) for p in str(text).split(",") if p.strip())


# ------------------------------------------------------------------------- config


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the segmentation fields (``configs/segmentation.py``). Reads no data."""
  eval_config.check_dtype(config)
  inp, seg, fail = config.input, config.segmentation, eval_config.fail
  if inp.dataset not in DATASETS:
    fail(f"input.dataset={inp.dataset!r}: segmentation reads one of {DATASETS}")
  if inp.dataset == "folder" and not inp.folder:
    fail("set --config.input.folder to a directory with images/<split>/ and "
         "annotations/<split>/ (ADE20K's ADEChallengeData2016 layout)")
  if inp.dataset == "folder" and config.num_classes <= 0:
    fail("set --config.num_classes: a segmentation folder does not say how many classes "
         "it has")
  if not 0 <= inp.ignore_label <= 255:
    fail(f"input.ignore_label must be in [0, 255], got {inp.ignore_label}")
  ratio = _safe_parse(inp.ratio_range, float)
  if not ratio or len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    fail(f"input.ratio_range={inp.ratio_range!r}: expected 'LOW,HIGH' with 0 < LOW <= HIGH")
  for name in ("train_scale", "eval_scale"):
    sizes = _safe_parse(inp[name])
    if sizes is None or (sizes and (len(sizes) != 2 or min(sizes) <= 0)):
      fail(f"input.{name}={inp[name]!r}: expected '' or 'LONG,SHORT' (e.g. '2048,512')")
  if not 0 <= inp.hflip <= 1:
    fail(f"input.hflip must be in [0, 1], got {inp.hflip}")
  if inp.dataset == "fashion_seg":
    syn = config.synthetic
    if syn.train_examples <= 0 or syn.eval_examples <= 0 or syn.max_items < 1:
      fail("synthetic.train_examples, synthetic.eval_examples and synthetic.max_items must "
           "be positive")
    if not 0 < syn.threshold < 1:
      fail(f"synthetic.threshold must be in (0, 1), got {syn.threshold}")
  if seg.batch_size <= 0 or seg.total_steps <= 0 or not 0 <= seg.warmup_steps < seg.total_steps:
    fail("segmentation needs batch_size > 0, total_steps > 0 and 0 <= warmup_steps < "
         "total_steps")
  if seg.eval_every_steps <= 0:
    fail(f"segmentation.eval_every_steps must be positive, got {seg.eval_every_steps}")
  if seg.lr <= 0 or not 0 < seg.layer_decay <= 1:
    fail(f"segmentation needs lr > 0 and layer_decay in (0, 1], got {seg.lr}, "
         f"{seg.layer_decay}")
  if seg.schedule not in SCHEDULES:
    fail(f"segmentation.schedule must be one of {SCHEDULES}, got {seg.schedule!r}")
  if seg.norm not in upernet.NORMS:
    fail(f"segmentation.norm must be one of {upernet.NORMS}, got {seg.norm!r}")
  if seg.eval_mode not in seg_model.EVAL_MODES:
    fail(f"segmentation.eval_mode must be one of {seg_model.EVAL_MODES}, got "
         f"{seg.eval_mode!r}")
  if seg.eval_stride <= 0:
    fail(f"segmentation.eval_stride must be positive, got {seg.eval_stride}")
  if not 0 <= seg.dropout < 1 or not 0 <= seg.drop_path < 1 or seg.aux_weight < 0:
    fail("segmentation.dropout and drop_path must be in [0, 1), aux_weight >= 0")
  rescales, blocks, pools = (_safe_parse(seg.rescales, float), _safe_parse(seg.feature_blocks),
                             _safe_parse(seg.pool_scales))
  if not rescales or len(rescales) < 2:
    fail(f"segmentation.rescales={seg.rescales!r}: expected at least two factors, e.g. "
         "'4,2,1,0.5'")
  for factor in rescales:
    try:
      upernet.check_rescale(factor)
    except ValueError as e:
      fail(f"segmentation.rescales: {e}")
  if blocks is None or (blocks and (len(blocks) != len(rescales) or min(blocks) < 0)):
    fail(f"segmentation.feature_blocks={seg.feature_blocks!r}: expected '' (the default "
         f"rule) or {len(rescales)} block indices, one per rescale")
  if not pools or min(pools) <= 0:
    fail(f"segmentation.pool_scales={seg.pool_scales!r}: expected positive bin counts")
  if seg.aux_channels < 0 or (seg.aux_channels and not 0 <= seg.aux_level < len(rescales)):
    fail(f"segmentation.aux_level={seg.aux_level} must index one of the {len(rescales)} "
         "levels (and aux_channels >= 0; 0 disables the auxiliary head)")


def _safe_parse(text: str, kind: Callable[[str], Any] = int) -> Optional[tuple[Any, ...]]:
  try:
    return parse_list(text, kind)
  except ValueError:
    return None


def poly_schedule(*, peak_lr: float, warmup_steps: int, total_steps: int,
                  power: float = 1.0, min_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to ``peak_lr``, then ``(peak - min) (1 - t)^power + min`` with
  ``t`` running from 0 after the warmup to 1 at ``total_steps`` (mmseg's ``LinearLR`` then
  ``PolyLR``, per iteration)."""
  warmup = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
  decay = optax.polynomial_schedule(peak_lr, min_lr, power,
                                    max(total_steps - warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [warmup_steps])


def build_schedule(seg: ml_collections.ConfigDict) -> optax.Schedule:
  if seg.schedule == "poly":
    return poly_schedule(peak_lr=seg.lr, warmup_steps=seg.warmup_steps,
                         total_steps=seg.total_steps, power=seg.poly_power, min_lr=seg.min_lr)
  return optim.learning_rate_schedule(peak_lr=seg.lr, warmup_steps=seg.warmup_steps,
                                      total_steps=seg.total_steps, min_lr=seg.min_lr)


def build_model(config: ml_collections.ConfigDict, encoder: variants.EncoderConfig, *,
                num_classes: int, image_size: int) -> seg_model.SegmentationViT:
  """The model of ``config.segmentation`` around a pre-trained encoder's architecture."""
  seg = config.segmentation
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  return seg_model.build_model(
      encoder, num_classes=num_classes, image_size=image_size,
      feature_blocks=parse_list(seg.feature_blocks), rescales=parse_list(seg.rescales, float),
      channels=seg.channels, pool_scales=parse_list(seg.pool_scales),
      aux_channels=seg.aux_channels, aux_level=seg.aux_level, norm=seg.norm,
      dropout=seg.dropout, drop_path_rate=seg.drop_path, dtype=dtype,
      remat=seg.remat)


# ------------------------------------------------------------------------- steps


SegmentationMetrics = clu_metrics.Collection.create(
    first_nonfinite_step=loop.FirstNonFiniteStep,
    **{k: clu_metrics.Average.from_output(k) for k in ("loss", "decode_loss", "aux_loss",
                                                       "pixel_acc", "lr", "grad_norm")})


def train_step(state: train_state.ClassifierState, batch: dict[str, jax.Array],
               key: jax.Array, *, model: seg_model.SegmentationViT,
               learning_rate: optax.Schedule, aux_weight: float = 0.4,
               ignore_label: int = seg_metrics.IGNORE_LABEL,
               ) -> tuple[train_state.ClassifierState, dict[str, jax.Array]]:
  """One step: forward with drop path, dropout and batch statistics, decode + weighted
  auxiliary cross-entropy, AdamW update; ``SegmentationMetrics``' inputs."""
  labels = batch["label"]

  def loss_fn(params):
    out, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                               batch["image"], train=True, rngs={"dropout": key},
                               mutable=["batch_stats"])
    decode = seg_metrics.pixel_cross_entropy(out["logits"], labels, ignore_label=ignore_label)
    aux = (seg_metrics.pixel_cross_entropy(out["aux_logits"], labels,
                                           ignore_label=ignore_label)
           if "aux_logits" in out else jnp.zeros((), jnp.float32))
    return decode + aux_weight * aux, (updates.get("batch_stats", {}), out["logits"], decode,
                                       aux)

  (loss, (batch_stats, logits, decode, aux)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  valid = seg_metrics.valid_pixels(labels, model.num_classes, ignore_label)
  hits = jnp.sum((jnp.argmax(logits, -1) == labels) & valid)
  grad_norm = optax.tree.norm(grads)
  new_state = state.apply_gradients(grads, batch_stats=batch_stats)
  metrics = {"loss": loss, "decode_loss": decode, "aux_loss": aux,
             "pixel_acc": 100.0 * hits / jnp.maximum(jnp.sum(valid), 1),
             "lr": learning_rate(state.step), "grad_norm": grad_norm,
             "first_nonfinite_step": loop.first_nonfinite_step(new_state.step, loss,
                                                               grad_norm, new_state)}
  return new_state, metrics


def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array], *,
              model: seg_model.SegmentationViT, mode: str, stride: int,
              ignore_label: int = seg_metrics.IGNORE_LABEL) -> jax.Array:
  """The ``(K, K)`` confusion matrix of a batch of canvases (``image``, ``label``,
  ``size``) under ``mode`` inference."""
  logits = seg_model.predict_logits(model, variables, batch["image"], batch["size"],
                                    mode=mode, stride=stride)
  return seg_metrics.confusion_matrix(jnp.argmax(logits, -1), batch["label"],
                                      model.num_classes, ignore_label=ignore_label)


def evaluate(eval_fn: Callable, variables: dict[str, Any],
             batches: Iterable[dict[str, np.ndarray]], num_classes: int) -> dict[str, float]:
  """Scores of ``eval_fn`` (a jitted :func:`eval_step`) over every batch of this process,
  summed over processes. Runs on the first device holding ``variables``."""
  local = jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a,
                       variables)
  leaves = [a for a in jax.tree.leaves(local) if isinstance(a, jax.Array)]
  device = next(iter(leaves[0].devices())) if leaves else jax.local_devices()[0]
  total = np.zeros((num_classes, num_classes), np.int64)
  pending = None
  for batch in batches:
    confusion = eval_fn(local, jax.device_put(dict(batch), device))  # dispatched async
    if pending is not None:  # fetch the previous one while this one runs
      total += np.asarray(pending)
    pending = confusion
  if pending is not None:
    total += np.asarray(pending)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    total = np.asarray(multihost_utils.process_allgather(total)).sum(axis=0)
  return seg_metrics.scores(total)


# ------------------------------------------------------------------------- loop


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Fine-tunes (or resumes) a segmentation model in ``workdir`` (``configs/segmentation.py``):
  checkpoints (latest + best mIoU), CLU logs, ``segmentation_results.json``; returns the
  final and best scores."""
  from lut_jax.data import segmentation_data  # optional: tensorflow
  seg = config.segmentation
  pretrained = loading.load(config.pretrained, config.pretrained_step, encoder_only=True)
  crop = config.input.image_size
  if crop <= 0:
    crop = (config.synthetic.image_size if config.input.dataset == "fashion_seg"
            else pretrained.architecture.image_size)
  if crop % pretrained.architecture.patch_size:
    raise errors.ConfigError(f"input.image_size={crop} (the crop the encoder runs on) is not "
                             f"divisible by the encoder's patch size "
                             f"{pretrained.architecture.patch_size}")
  input_config = eval_config.input_config(config, pretrained, image_size=crop)
  channels = input_config.channels
  train_source = segmentation_data.get_source(config.input, config.input.train_split,
                                              config.synthetic)
  eval_source = segmentation_data.get_source(config.input, config.input.eval_split,
                                             config.synthetic)
  _check_whole_mode(config, eval_source, crop)
  num_classes = config.num_classes if config.num_classes > 0 else train_source.num_classes
  if not num_classes:
    raise errors.ConfigError("set num_classes: the dataset does not say how many classes it "
                             "has")

  batch_sharding, _ = shardings = supervised.data_parallel(seg.batch_size)
  model = build_model(config, pretrained.architecture, num_classes=num_classes, image_size=crop)
  schedule = build_schedule(seg)
  p_eval = jax.jit(functools.partial(eval_step, model=model, mode=seg.eval_mode,
                                     stride=seg.eval_stride,
                                     ignore_label=config.input.ignore_label))
  eval_data = segmentation_data.create_eval_data(eval_source, config.input,
                                                 batch_size=config.input.eval_batch_size,
                                                 crop=crop, channels=channels)
  logging.info("segmentation %s: %d classes, %d-px crops, %d steps (%d warmup)",
               pretrained.source, num_classes, crop, seg.total_steps, seg.warmup_steps)
  return supervised.train(
      config, workdir, mode="segmentation", pretrained=pretrained, model=model,
      schedule=schedule,
      init_variables=lambda key: seg_model.init_variables(model, key, pretrained.params,
                                                          channels),
      train_step=functools.partial(train_step, model=model, learning_rate=schedule,
                                   aux_weight=seg.aux_weight,
                                   ignore_label=config.input.ignore_label),
      metrics=SegmentationMetrics, shardings=shardings,
      resume_key={**features.features_key(pretrained, input_config, config.input.train_split),
                  "segmentation_input": _data_key(config),
                  **features.training_key(config, "segmentation")},
      total_steps=seg.total_steps, eval_every=seg.eval_every_steps,
      train_data=lambda start_step: segmentation_data.create_train_iterator(
          train_source, config.input, batch_size=seg.batch_size, crop=crop,
          channels=channels, seed=config.seed, start_step=start_step,
          sharding=batch_sharding),
      evaluate=lambda state: evaluate(
          p_eval, {"params": state.params, "batch_stats": state.batch_stats}, eval_data,
          num_classes),
      result_keys=("miou", "pixel_acc", "mean_acc"))


def _check_whole_mode(config: ml_collections.ConfigDict, eval_source: Any, crop: int) -> None:
  """Whole-image inference runs the encoder on the canvas: it must be the crop size."""
  if config.segmentation.eval_mode != "whole":
    return
  multiple = max(1, config.input.eval_canvas_multiple)
  size = eval_source.fixed_size
  if size is None or config.input.eval_scale or max(-(-size // multiple) * multiple,
                                                    crop) != crop:
    raise errors.ConfigError(
        f"segmentation.eval_mode='whole' needs eval images of the crop size ({crop} px); "
        f"{config.input.dataset} images are not",
        hint="use segmentation.eval_mode='slide'")


def _data_key(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The input fields that change what the model is trained on (the resume key)."""
  inp = config.input
  key = {"folder": os.path.abspath(inp.folder) if inp.folder else "",
         "reduce_zero_label": bool(inp.reduce_zero_label), "ignore_label": inp.ignore_label,
         "train_scale": inp.train_scale, "ratio_range": inp.ratio_range, "hflip": inp.hflip}
  if inp.dataset == "fashion_seg":
    key["synthetic"] = config.synthetic.to_dict()
  return key
