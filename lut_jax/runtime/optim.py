"""Optimizers and schedules of pre-training, fine-tuning and the linear probe (optax pieces).

* Peak learning rate ``base_lr * global_batch / 256`` everywhere (the linear rule; the
  reference's square-root rules differ: README), per-step linear warmup, cosine to ``min_lr``.
* Weight decay only on tensors of rank >= 2 (never on biases or normalisation parameters);
  fine-tuning also skips the cls token and positions (MAE's ``no_weight_decay()``).
* Pre-training: AdamW (b1 0.9, b2 0.95, weight decay 0.05), and the EMA momentum
  ``tau(k) = 1 - (1 - tau0) * (cos(pi k / K) + 1) / 2``: 0.996 -> 1.
* Fine-tuning: AdamW (0.9, 0.999) with layer-wise lr decay (MAE's ``param_groups_lrd``).
* Linear probe: LARS (MAE's), or SGD with momentum.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

from flax import traverse_util
import jax
import optax

Schedule = Callable[[Any], Any]

# MAE's fine-tuning ``no_weight_decay()``: these names are never decayed there (``pos_embed``
# is a parameter only in fine-tuning, ``finetune.learn_pos_embed``).
FINETUNE_NO_DECAY = ("cls_token", "pos_embed")


def peak_learning_rate(base_lr: float, global_batch: int) -> float:
  """The linear scaling rule: ``base_lr * global_batch / 256``."""
  return base_lr * global_batch / 256


def learning_rate_schedule(*, peak_lr: float, warmup_steps: int, total_steps: int,
                           min_lr: float = 0.0) -> Schedule:
  """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then cosine to ``min_lr`` at
  ``total_steps`` (per step, as MAE's per-iteration ``adjust_learning_rate``). A warmup as long
  as the run (evaluation configs allow ``warmup_epochs == epochs``) stops one step short: optax
  needs at least one cosine step."""
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup steps ({warmup_steps}) must be in [0, total steps "
                     f"({total_steps})]")
  total_steps = max(total_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=min(warmup_steps, total_steps - 1),
      decay_steps=total_steps, end_value=min_lr)


def momentum_schedule(*, base_momentum: float, total_steps: int) -> Schedule:
  """EMA momentum, cosine from ``base_momentum`` at step 0 to 1 at ``total_steps``."""
  if not 0.0 <= base_momentum <= 1.0:
    raise ValueError(f"ema.momentum must be in [0, 1], got {base_momentum}")
  gap = optax.cosine_decay_schedule(init_value=1.0 - base_momentum, decay_steps=total_steps)
  return lambda step: 1.0 - gap(step)


def weight_decay_mask(params: Any, skip: tuple[str, ...] = ()) -> Any:
  """True for leaves that get weight decay: rank >= 2 (weight matrices, conv kernels, the cls /
  mask tokens) unless named in ``skip``; False for biases and normalisation scales.
  Pre-training and the probe skip nothing (as MAE's pre-training ``add_weight_decay``, which
  decays the tokens); fine-tuning skips :data:`FINETUNE_NO_DECAY`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and getattr(path[-1], "key", None) not in skip, params)


def _chain(grad_clip_norm: float,
           *parts: optax.GradientTransformation) -> optax.GradientTransformation:
  """``parts`` after global-norm clipping when ``grad_clip_norm > 0``; one flat chain (or
  the lone part), so the optimizer state keeps the layout older checkpoints have."""
  parts = ((optax.clip_by_global_norm(grad_clip_norm),) if grad_clip_norm > 0 else ()) + parts
  return parts[0] if len(parts) == 1 else optax.chain(*parts)


def create_optimizer(*, learning_rate: Schedule, weight_decay: float, b1: float = 0.9,
                     b2: float = 0.95, grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
  """Pre-training's AdamW with the decay mask above, optionally after clipping."""
  return _chain(grad_clip_norm, optax.adamw(learning_rate, b1=b1, b2=b2,
                                            weight_decay=weight_decay, mask=weight_decay_mask))


def layer_id(path: tuple[str, ...], depth: int) -> int:
  """MAE's ``get_layer_id_for_vit`` on the fine-tuning model's parameter paths:
  ``patch_embed`` and ``cls_token`` -> 0, ``blocks_i`` -> ``i + 1``, anything else (the
  encoder's final norm, ``fc_norm``, ``head``) -> ``depth + 1``."""
  names = path[1:] if path and path[0] == "encoder" else ()
  if names and names[0] in ("patch_embed", "cls_token", "pos_embed"):
    return 0
  if names and (match := re.fullmatch(r"blocks_(\d+)", names[0])):
    return int(match.group(1)) + 1
  return depth + 1


def layer_decay(depth: int, decay: float) -> optax.GradientTransformation:
  """Scales each update by ``decay ** (depth + 1 - layer_id)`` (layer-wise lr decay)."""
  transforms = {f"layer_{i}": optax.scale(decay ** (depth + 1 - i)) for i in range(depth + 2)}
  labels = lambda params: traverse_util.path_aware_map(  # noqa: E731
      lambda path, _: f"layer_{layer_id(path, depth)}", params)
  return optax.multi_transform(transforms, labels)


def create_finetune_optimizer(learning_rate: optax.ScalarOrSchedule, *, depth: int,
                              layer_decay_rate: float = 0.75, weight_decay: float = 0.05,
                              b1: float = 0.9, b2: float = 0.999,
                              grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
  """Fine-tuning's AdamW with layer-wise lr decay: ``-lr * scale_l * (adam + wd * p)``. The
  per-layer scale multiplies both the Adam step and the decoupled decay, as a PyTorch param
  group's ``lr * lr_scale`` does in MAE."""
  mask = functools.partial(weight_decay_mask, skip=FINETUNE_NO_DECAY)
  return _chain(grad_clip_norm, optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8),
                optax.add_decayed_weights(weight_decay, mask),
                layer_decay(depth, layer_decay_rate), optax.scale_by_learning_rate(learning_rate))


def create_probe_optimizer(learning_rate: optax.ScalarOrSchedule, *, name: str = "lars",
                           weight_decay: float = 0.0, momentum: float = 0.9,
                           ) -> optax.GradientTransformation:
  """The linear probe's LARS (MAE's: trust coefficient 0.001, decay and trust ratio on
  rank >= 2 tensors only) or plain SGD with momentum (the documented alternative for small
  batches, where LARS's per-layer trust ratio buys nothing)."""
  if name == "lars":
    return optax.lars(learning_rate, weight_decay=weight_decay,
                      weight_decay_mask=weight_decay_mask, trust_coefficient=0.001, eps=0.0,
                      trust_ratio_mask=weight_decay_mask, momentum=momentum)
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay, weight_decay_mask),
                       optax.sgd(learning_rate, momentum=momentum))
  raise ValueError(f"unknown linear-probe optimizer {name!r}; expected 'lars' or 'sgd'")
