"""End-to-end fine-tuning of the pre-trained encoder, MAE's recipe.

* Model (:class:`FinetuneViT`): the pre-trained ViT with stochastic depth (drop path 0.1,
  linearly increasing over the blocks), then MAE's global-average-pool head: mean of the
  patch tokens -> ``fc_norm`` LayerNorm -> ``head`` linear (weights N(0, 2e-5), zero bias).
  As in MAE, the encoder's final ``norm`` is dropped in this mode (``fc_norm`` replaces it);
  with ``pool="cls"`` the final ``norm`` is kept and the cls token classified.
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
``jax.jit`` over a data-parallel mesh, and the loop is pre-training's (:mod:`lut_jax.runtime.loop`):
the step key is ``fold_in(base_key, step)``, so a resumed run repeats an uninterrupted one;
a NaN or an infinity stops the run before it reaches a checkpoint; SIGTERM (or a multi-host
preemption notice) evaluates, saves and stops. This module imports without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, Optional

from absl import logging
from clu import metrics as clu_metrics
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lut_jax import metrics
from lut_jax.models import variants, vit
from lut_jax.pretrain import train_state
from lut_jax.runtime import checkpointing, loop, optim, sharding as sharding_lib
from lut_jax.weights import loading

# ------------------------------------------------------------------------------ model


class FinetuneViT(nn.Module):
  """Pre-trained encoder + classification head (``pool``: ``"mean"`` = MAE's global pool
  with ``fc_norm``; ``"cls"`` = the cls token after the final norm)."""

  num_classes: int
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.1
  pool: str = "mean"
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: Optional[str] = None
  gelu_approximate: bool = False  # as the encoder was pre-trained (model.gelu_approximate)
  learned_pos_embed: bool = True  # finetune.learn_pos_embed

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    if self.pool not in ("mean", "cls"):
      raise ValueError(f"unknown fine-tuning pool {self.pool!r}; expected 'mean' or 'cls'")
    # MAE's global pool normalises the pooled token (fc_norm), not the tokens.
    x = vit.Encoder(**variants.EncoderConfig.of(self).kwargs(),
                    drop_path_rate=self.drop_path_rate, final_norm=self.pool == "cls",
                    dtype=self.dtype, remat=self.remat, attention_impl=self.attention_impl,
                    learned_pos_embed=self.learned_pos_embed,
                    name="encoder")(images, deterministic=not train)
    if self.pool == "mean":
      x = jnp.mean(x[:, 1:], axis=1)
      x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="fc_norm")(x)
    else:
      x = x[:, 0]
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=nn.initializers.truncated_normal(2e-5), name="head")(x)
    return logits.astype(jnp.float32)


def build_model(encoder: variants.EncoderConfig, *, num_classes: int, image_size: int,
                drop_path_rate: float, pool: str = "mean", dtype: Any = jnp.float32,
                remat: bool = False, attention_impl: Optional[str] = None,
                learned_pos_embed: bool = True) -> FinetuneViT:
  """The fine-tuning model around a pre-trained encoder's architecture.

  ``image_size`` may differ from pre-training: the sin-cos positions are computed for the
  new grid (the reference interpolates the pre-training table bicubically instead). With
  ``learned_pos_embed`` (the reference's fine-tuning) they start there and are trained.
  """
  if image_size % encoder.patch_size:
    raise ValueError(f"image size {image_size} is not divisible by patch size "
                     f"{encoder.patch_size}")
  return FinetuneViT(
      num_classes=num_classes, **encoder.kwargs(image_size=image_size),
      drop_path_rate=drop_path_rate, pool=pool, dtype=dtype, remat=remat,
      attention_impl=attention_impl, learned_pos_embed=learned_pos_embed)


def init_params(model: FinetuneViT, key: jax.Array, pretrained_params: Any,
                channels: int) -> Any:
  """Fresh head parameters with the pre-trained encoder's weights in ``params["encoder"]``.

  The encoder's final ``norm`` is dropped for the global-pool head (MAE deletes it); any
  other missing, extra or mis-shaped encoder tensor is an error.
  """
  images = jnp.zeros((1, model.image_size, model.image_size, channels), jnp.float32)
  # jit: fast when called eagerly, inlined when called under an outer jit.
  params = jax.jit(functools.partial(model.init, train=False))(key, images)["params"]
  return {**params, "encoder": copy_pretrained_encoder(params["encoder"], pretrained_params)}


def copy_pretrained_encoder(encoder_params: Any, pretrained_params: Any) -> Any:
  """``encoder_params`` (a freshly initialised encoder tree) with every tensor replaced by
  the pre-trained one, in the target's dtype.

  The pre-trained final ``norm`` is dropped when the target has none (MAE's global-pool
  head, segmentation's multi-level features); a learned ``pos_embed`` the pre-trained
  encoder lacks (its table was fixed) keeps its initial value, that same sin-cos table;
  any other missing, extra or mis-shaped tensor is an error.
  """
  target = traverse_util.flatten_dict(encoder_params)
  source = traverse_util.flatten_dict(jax.tree.map(np.asarray, pretrained_params))
  if ("pos_embed",) in target and ("pos_embed",) not in source:
    source[("pos_embed",)] = target[("pos_embed",)]
  if "norm" not in encoder_params:
    source = {k: v for k, v in source.items() if k[0] != "norm"}
  missing, unexpected = sorted(set(target) - set(source)), sorted(set(source) - set(target))
  mismatched = [(k, target[k].shape, source[k].shape) for k in target
                if k in source and target[k].shape != source[k].shape]
  if missing or unexpected or mismatched:
    raise ValueError(f"pre-trained encoder does not fit the fine-tuning model: missing "
                     f"{missing}, unexpected {unexpected}, shape mismatches {mismatched}")
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(source[k], target[k].dtype) for k in target})


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
               key: jax.Array, *, model: FinetuneViT, mixup: MixupSpec,
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
              model: FinetuneViT) -> dict[str, jax.Array]:
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


# ------------------------------------------------------------------ loop


def finetune(
    config: ml_collections.ConfigDict, workdir: str, *, pretrained=None,
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
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  from lut_jax.evaluation import eval_config, features  # pylint: disable=g-import-not-at-top

  ft = config.finetune
  os.makedirs(workdir, exist_ok=True)
  pretrained = pretrained or loading.load(config.pretrained, config.pretrained_step,
                                         encoder_only=True)
  image_size = config.input.image_size if config.input.image_size > 0 else \
      pretrained.architecture.image_size
  input_config = eval_config.input_config(config, pretrained, image_size=image_size)
  mesh = sharding_lib.create_mesh(1)
  sharding_lib.check_batch_size(ft.batch_size, mesh, process_count=jax.process_count())
  batch_sharding, replicated = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)

  if num_train_examples is None:
    from lut_jax.data import datasets  # pylint: disable=g-import-not-at-top
    num_train_examples = datasets.get_source(config.input.dataset, config.input.train_split,
                                             config.input.data_dir).num_examples
  steps_per_epoch = max(num_train_examples // ft.batch_size, 1)
  total_steps = int(round(ft.epochs * steps_per_epoch))
  warmup_steps = int(round(ft.warmup_epochs * steps_per_epoch))
  eval_every = max(int(round(ft.eval_every_epochs * steps_per_epoch)), 1)
  num_classes = eval_config.num_classes(config)

  dtype = jnp.bfloat16 if config.get("dtype", "float32") == "bfloat16" else jnp.float32
  model = build_model(pretrained.architecture, num_classes=num_classes, image_size=image_size,
                      drop_path_rate=ft.drop_path, pool=ft.pool, dtype=dtype,
                      remat=ft.get("remat", False), learned_pos_embed=ft.learn_pos_embed)
  schedule = optim.learning_rate_schedule(
      peak_lr=optim.peak_learning_rate(ft.base_lr, ft.batch_size), warmup_steps=warmup_steps,
      total_steps=total_steps, min_lr=ft.min_lr)
  tx = optim.create_finetune_optimizer(
      schedule, depth=model.depth, layer_decay_rate=ft.layer_decay,
      weight_decay=ft.weight_decay, b1=ft.b1, b2=ft.b2, grad_clip_norm=ft.grad_clip_norm)
  base_key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(base_key)

  def init_fn(key):
    params = init_params(model, key, pretrained.params, pretrained.channels)
    return train_state.ClassifierState.create(params, {}, tx)

  abstract_state = jax.eval_shape(init_fn, init_key)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  # The state depends on the encoder, the training input and the recipe, not on the eval
  # crop.
  resume_key = {**features.features_key(pretrained, input_config, config.input.train_split),
                **features.training_key(config, "finetune", "augment")}
  features.check_resume_key(checkpoint_dir, "finetune", resume_key)
  ckpt = checkpointing.Checkpointer(checkpoint_dir, max_to_keep=1, async_save=False,
                                    best_metric="top1")
  try:
    state = ckpt.restore_or_init(init_fn, init_key, state_sharding, name="fine-tuning")
    start_step = int(jax.device_get(state.step))

    mixup = MixupSpec(num_classes=num_classes, mixup_alpha=ft.mixup_alpha,
                      cutmix_alpha=ft.cutmix_alpha, prob=ft.mixup_prob,
                      switch_prob=ft.mixup_switch_prob, label_smoothing=ft.label_smoothing)
    p_train = jax.jit(functools.partial(train_step, model=model, mixup=mixup,
                                        learning_rate=schedule),
                      in_shardings=(state_sharding, batch_sharding, replicated),
                      out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    p_eval = jax.jit(functools.partial(eval_step, model=model),
                     in_shardings=(state_sharding.params, batch_sharding),
                     out_shardings=replicated)

    if train_data_fn is None:
      from lut_jax.data import augment_ft  # pylint: disable=g-import-not-at-top
      train_iter = augment_ft.create_finetune_iterator(
          input_config, config.augment, split=config.input.train_split,
          batch_size=ft.batch_size, seed=config.seed, start_step=start_step,
          sharding=batch_sharding)
    else:
      train_iter = train_data_fn(start_step)
    if eval_data is None:
      from lut_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
      eval_data = input_pipeline.create_eval_dataset(
          input_config, config.input.eval_split, batch_size=config.input.eval_batch_size,
          crop_pct=config.input.crop_pct, sharding=batch_sharding)

    writer = metric_writers.create_default_writer(workdir,
                                                  just_logging=jax.process_index() > 0)
    logging.info("fine-tuning %s: %d classes, %d steps (%d warmup, %d per epoch), start %d",
                 pretrained.source, num_classes, total_steps, warmup_steps, steps_per_epoch,
                 start_step)
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps)
    interval = loop.Interval(FinetuneMetrics, start_step=start_step, batch_size=ft.batch_size,
                             checkpointer=ckpt, config_prefix="finetune")
    run = loop.train_evaluate_save(
        name="fine-tuning", state=state, train_step=p_train, train_iter=train_iter,
        step_key=step_key, start_step=start_step, total_steps=total_steps,
        eval_every=eval_every, log_every=config.log_every_steps, interval=interval,
        writer=writer, checkpointer=ckpt, best_metric="top1", report=report,
        evaluate=lambda state: evaluate(p_eval, state.params, eval_data))
    last = run.last
    best_step, best = ckpt.best() or (total_steps, last)
  finally:
    ckpt.close()
  results = {"top1": last["top1"], "top5": last["top5"],
             "steps": run.done if run.stopped else total_steps,
             "best_top1": best.get("top1", last["top1"]), "best_step": best_step}
  writer.flush()
  eval_config.write_results(workdir, "finetune", results,
                            source=features.describe_source(pretrained, [resume_key]))
  return results
