"""End-to-end fine-tuning of the pre-trained encoder, MAE's recipe.

* Model (:class:`lut_jax.models.classifier.FinetuneViT`): the pre-trained ViT with
  stochastic depth (drop path 0.1), then MAE's global-average-pool head (``fc_norm`` +
  ``head``; ``pool="cls"``: the cls token after the final norm).
* Optimizer: AdamW (b = 0.9, 0.999; weight decay 0.05, not on biases, norms or the cls
  token: MAE's ``no_weight_decay``), layer-wise lr decay 0.75: a parameter in layer ``l``
  gets lr x ``0.75 ** (depth + 1 - l)``, with patch_embed / cls_token in layer 0, block
  ``i`` in layer ``i + 1`` and everything after the blocks (fc_norm, head) in layer
  ``depth + 1`` (MAE's ``param_groups_lrd``; :func:`lut_jax.runtime.optim.create_finetune_optimizer`).
  Peak lr ``base_lr * batch / 256``, linear warmup then cosine to ``min_lr`` (1e-6), per step.
* Regularisation: mixup 0.8 / cutmix 1.0 (one of them per batch, switch prob 0.5, timm's
  ``Mixup`` in ``batch`` mode) with label smoothing 0.1, computed on device with the step's
  key; RandAugment and random erasing on the host (:mod:`lut_jax.data.augment_ft`).
* Evaluation: top-1 / top-5 on the eval split after every ``eval_every_epochs`` epochs,
  each followed by a checkpoint; the latest (for resuming) and the best-top-1 one are kept.

The step is a pure ``(state, batch, key) -> (state, metrics)`` function compiled once with
``jax.jit`` over a data-parallel mesh, and the loop is the supervised protocols'
(:mod:`lut_jax.evaluation.supervised`, :mod:`lut_jax.runtime.loop`): the step key is
``fold_in(base_key, step)``, so a resumed run repeats an uninterrupted one;
a NaN or an infinity stops the run before it reaches a checkpoint; SIGTERM (or a multi-host
preemption notice) evaluates, saves and stops. This module imports without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional

from absl import logging
from clu import metrics as clu_metrics
import jax
import jax.numpy as jnp
import ml_collections
import optax

from lut_jax import metrics
from lut_jax.data import splits
from lut_jax.evaluation import eval_config, features, supervised
from lut_jax.models import classifier
from lut_jax.pretrain import train_state
from lut_jax.runtime import loop, optim
from lut_jax.weights import loading

NEEDS_TENSORFLOW = "RandAugment tf.data pipeline"  # see protocols

# ------------------------------------------------------------------ mixup / cutmix


@dataclasses.dataclass(frozen=True)
class MixupSpec:
  """timm ``Mixup`` (``mode="batch"``) settings; hashable, so a static jit argument."""

  num_classes: int
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.1


def cutmix_box(key: jax.Array, height: int, width: int,
               lam: jax.Array) -> tuple[jax.Array, jax.Array]:
  """timm's ``rand_bbox``: a box of side ``int(S * sqrt(1 - lam))`` centred uniformly,
  clipped to the image. Returns ``(mask (H, W) bool, corrected lam)`` where the corrected
  lam is one minus the box's share of the image (timm's ``correct_lam``)."""
  ky, kx = jax.random.split(key)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
  return mask, 1.0 - area / (height * width)


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array,
              spec: MixupSpec) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Mixup or cutmix of a batch with its reverse, and the mixed smoothed targets.

  Each example ``i`` is mixed with example ``B - 1 - i`` (timm's ``x.flip(0)``); one ``lam``
  per batch. Returns ``(images, targets (B, C) summing to one, {"lam", "cutmix"})``.
  """
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
  use_mixup, use_cutmix_alpha = spec.mixup_alpha > 0, spec.cutmix_alpha > 0
  if use_mixup and use_cutmix_alpha:
    cutmix = jax.random.uniform(k_switch) < spec.switch_prob
  else:
    cutmix = jnp.asarray(use_cutmix_alpha)
  lam_mix = (jax.random.beta(k_mix, spec.mixup_alpha, spec.mixup_alpha) if use_mixup
             else jnp.ones(()))
  lam_cut = (jax.random.beta(k_cut, spec.cutmix_alpha, spec.cutmix_alpha) if use_cutmix_alpha
             else jnp.ones(()))
  apply = (jax.random.uniform(k_apply) < spec.prob) & (use_mixup or use_cutmix_alpha)
  flipped = images[::-1]
  box, lam_box = cutmix_box(k_box, images.shape[1], images.shape[2], lam_cut)
  mixed = lam_mix.astype(images.dtype) * images + (1 - lam_mix).astype(images.dtype) * flipped
  cut = jnp.where(box[None, :, :, None], flipped, images)
  out = jnp.where(apply, jnp.where(cutmix, cut, mixed), images)
  lam = jnp.where(apply, jnp.where(cutmix, lam_box, lam_mix), 1.0).astype(jnp.float32)
  y = optax.smooth_labels(jax.nn.one_hot(labels, spec.num_classes), spec.label_smoothing)
  targets = lam * y + (1.0 - lam) * y[::-1]
  return out, targets, {"lam": lam, "cutmix": (apply & cutmix).astype(jnp.float32)}


# ------------------------------------------------------------------ steps


# Averages of the step metrics over a logging interval (merged on device). Built with
# ``create``: this module's postponed annotations would hide the fields from a class body.
FinetuneMetrics = clu_metrics.Collection.create(
    first_nonfinite_step=loop.FirstNonFiniteStep,
    **{k: clu_metrics.Average.from_output(k) for k in ("loss", "lr", "grad_norm", "lam",
                                                       "cutmix")})


def train_step(state: train_state.ClassifierState, batch: dict[str, jax.Array],
               key: jax.Array, *, model: classifier.FinetuneViT, mixup: MixupSpec,
               learning_rate: optax.Schedule) -> tuple[train_state.ClassifierState, dict]:
  """One fine-tuning step: mixup/cutmix (device), forward with drop path, soft-target
  cross entropy, AdamW update; the metrics ``FinetuneMetrics`` averages."""
  mix_key, drop_key = jax.random.split(key)
  images, targets, mix_info = mix_batch(mix_key, batch["image"], batch["label"], mixup)

  def loss_fn(params):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": drop_key})
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grad_norm = optax.tree.norm(grads)
  new_state = state.apply_gradients(grads)
  metrics = {"loss": loss, "lr": learning_rate(state.step), "grad_norm": grad_norm,
             "first_nonfinite_step": loop.first_nonfinite_step(new_state.step, loss, grad_norm,
                                                               new_state),
             **mix_info}
  return new_state, metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *,
              model: classifier.FinetuneViT) -> dict[str, jax.Array]:
  """Correct top-1 / top-5 counts, loss sum and example count of a (padded) batch."""
  logits = model.apply({"params": params}, batch["image"], train=False)
  mask = batch.get("mask", jnp.ones(logits.shape[0], bool))
  labels = jnp.maximum(batch["label"], 0)  # padding carries label -1
  out = metrics.topk_correct(logits, labels, mask=mask)
  ce = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
  out["loss"] = jnp.sum(ce * mask)
  out["count"] = jnp.sum(mask.astype(jnp.float32))
  return out


def evaluate(p_eval: Callable, params: Any, batches) -> dict[str, float]:
  """Top-1 / top-5 (percent) and mean loss over every unpadded example of ``batches``."""
  totals = None
  for batch in batches:
    out = p_eval(params, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = metrics.scalars(totals)
  n = max(totals.pop("count"), 1.0)
  return {"top1": 100.0 * totals["top1"] / n, "top5": 100.0 * totals["top5"] / n,
          "loss": totals["loss"] / n}


# ------------------------------------------------------------------ protocol


def validate(config: ml_collections.ConfigDict) -> None:
  """The fine-tuning fields (``configs/finetune.py``)."""
  eval_config.check_distinct_splits(config)
  eval_config.check_dtype(config)
  ft, fail = config.finetune, eval_config.fail
  if ft.epochs <= 0 or ft.batch_size <= 0 or not 0 <= ft.warmup_epochs <= ft.epochs:
    fail("finetune needs epochs > 0, batch_size > 0 and 0 <= warmup_epochs <= epochs")
  if not 0 < ft.layer_decay <= 1:
    fail(f"finetune.layer_decay must be in (0, 1], got {ft.layer_decay}")
  if ft.batch_size % 2 and (ft.mixup_alpha > 0 or ft.cutmix_alpha > 0):
    fail("mixup/cutmix pair each example with the reversed batch: "
         f"finetune.batch_size must be even, got {ft.batch_size}")
  if not 0 <= ft.label_smoothing < 1:
    fail(f"finetune.label_smoothing must be in [0, 1), got {ft.label_smoothing}")


def run(config: ml_collections.ConfigDict, workdir: str, *, pretrained=None,
        train_data_fn: Optional[Callable[[int], Iterator[dict[str, Any]]]] = None,
        eval_data: Optional[Any] = None, num_train_examples: Optional[int] = None,
        ) -> dict[str, float]:
  """Fine-tunes (or resumes) in ``workdir``; returns the final and best eval metrics.

  Args:
    config: an evaluation config with ``mode == "finetune"`` (``configs/finetune.py``).
    workdir: checkpoints (``checkpoints/``: latest + best top-1), CLU logs and
      ``finetune_results.json``.
    pretrained: a ``loading.Pretrained``; default: loaded from ``config.pretrained``.
    train_data_fn: ``fn(start_step)`` -> iterator over global ``{"image", "label"}`` batches
      (tests); default: the augmented tf.data pipeline of ``augment_ft``.
    eval_data: a re-iterable of ``{"image", "label", "mask"}`` batches; default: the
      centre-crop eval split.
    num_train_examples: training-set size (for epochs -> steps) when ``train_data_fn`` is
      given.
  """
  ft = config.finetune
  pretrained = pretrained or loading.load(config.pretrained, config.pretrained_step,
                                         encoder_only=True)
  image_size = config.input.image_size if config.input.image_size > 0 else \
      pretrained.architecture.image_size
  input_config = eval_config.input_config(config, pretrained, image_size=image_size)
  batch_sharding, replicated = shardings = supervised.data_parallel(ft.batch_size)

  if num_train_examples is None:
    from lut_jax.data import datasets  # optional: tensorflow
    num_train_examples = datasets.get_source(config.input.dataset, config.input.train_split,
                                             config.input.data_dir).num_examples
  steps_per_epoch = max(splits.steps_per_epoch(num_train_examples, ft.batch_size), 1)
  total_steps = int(round(ft.epochs * steps_per_epoch))
  warmup_steps = int(round(ft.warmup_epochs * steps_per_epoch))
  num_classes = eval_config.num_classes(config)

  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  model = classifier.build_model(pretrained.architecture, num_classes=num_classes,
                                 image_size=image_size, drop_path_rate=ft.drop_path,
                                 pool=ft.pool, dtype=dtype, remat=ft.remat,
                                 learned_pos_embed=ft.learn_pos_embed)
  schedule = optim.learning_rate_schedule(
      peak_lr=optim.peak_learning_rate(ft.base_lr, ft.batch_size), warmup_steps=warmup_steps,
      total_steps=total_steps, min_lr=ft.min_lr)
  mixup = MixupSpec(num_classes=num_classes, mixup_alpha=ft.mixup_alpha,
                    cutmix_alpha=ft.cutmix_alpha, prob=ft.mixup_prob,
                    switch_prob=ft.mixup_switch_prob, label_smoothing=ft.label_smoothing)
  if train_data_fn is None:
    from lut_jax.data import augment_ft  # optional: tensorflow
    train_data_fn = lambda start_step: augment_ft.create_finetune_iterator(  # noqa: E731
        input_config, config.augment, split=config.input.train_split,
        batch_size=ft.batch_size, seed=config.seed, start_step=start_step,
        sharding=batch_sharding)
  if eval_data is None:
    from lut_jax.data import input_pipeline  # optional: tensorflow
    eval_data = input_pipeline.create_eval_dataset(
        input_config, config.input.eval_split, batch_size=config.input.eval_batch_size,
        crop_pct=config.input.crop_pct, sharding=batch_sharding)
  p_eval = jax.jit(functools.partial(eval_step, model=model),
                   in_shardings=(replicated, batch_sharding), out_shardings=replicated)
  logging.info("fine-tuning %s: %d classes, %d steps (%d warmup, %d per epoch)",
               pretrained.source, num_classes, total_steps, warmup_steps, steps_per_epoch)
  return supervised.train(
      config, workdir, mode="finetune", pretrained=pretrained, model=model,
      schedule=schedule,
      init_variables=lambda key: {"params": classifier.init_params(
          model, key, pretrained.params, pretrained.channels), "batch_stats": {}},
      train_step=functools.partial(train_step, model=model, mixup=mixup,
                                   learning_rate=schedule),
      metrics=FinetuneMetrics, shardings=shardings,
      # The state depends on the encoder, the training input and the recipe, not on the
      # eval crop.
      resume_key={**features.features_key(pretrained, input_config, config.input.train_split),
                  **features.training_key(config, "finetune", "augment")},
      total_steps=total_steps,
      eval_every=max(int(round(ft.eval_every_epochs * steps_per_epoch)), 1),
      train_data=train_data_fn,
      evaluate=lambda state: evaluate(p_eval, state.params, eval_data),
      result_keys=("top1", "top5"))
