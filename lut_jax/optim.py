"""Optimizer and schedules of the LUT recipe, built from optax pieces.

* AdamW (b1 0.9, b2 0.95, weight decay 0.05) with no decay on biases and normalisation
  parameters (every leaf of rank <= 1), the reference's rule.
* Peak learning rate ``base_lr * global_batch / 256`` (the linear rule; the reference code
  uses ``base_lr * sqrt(batch) / 4``, which equals it only at batch 4096).
* Per-step linear warmup then cosine decay to ``min_lr``.
* EMA momentum ``tau(k) = 1 - (1 - tau0) * (cos(pi k / K) + 1) / 2``: 0.996 -> 1.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

Schedule = Callable[[Any], Any]


def peak_learning_rate(base_lr: float, global_batch: int) -> float:
  """The linear scaling rule: ``base_lr * global_batch / 256``."""
  return base_lr * global_batch / 256


def learning_rate_schedule(*, peak_lr: float, warmup_steps: int, total_steps: int,
                           min_lr: float = 0.0) -> Schedule:
  """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then cosine to ``min_lr``
  at ``total_steps``."""
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup steps ({warmup_steps}) must be in [0, total steps "
                     f"({total_steps})]")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=min_lr)


def momentum_schedule(*, base_momentum: float, total_steps: int) -> Schedule:
  """EMA momentum, cosine from ``base_momentum`` at step 0 to 1 at ``total_steps``."""
  if not 0.0 <= base_momentum <= 1.0:
    raise ValueError(f"ema.momentum must be in [0, 1], got {base_momentum}")
  gap = optax.cosine_decay_schedule(init_value=1.0 - base_momentum, decay_steps=total_steps)
  return lambda step: 1.0 - gap(step)


def weight_decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: weight matrices, conv kernels and the
  cls / mask tokens (rank >= 2); False for biases and normalisation scales (rank <= 1)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(*, learning_rate: Schedule, weight_decay: float, b1: float = 0.9,
                     b2: float = 0.95, grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
  """AdamW with the decay mask above, optionally preceded by global-norm clipping."""
  adamw = optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay,
                      mask=weight_decay_mask)
  if grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw)
  return adamw
