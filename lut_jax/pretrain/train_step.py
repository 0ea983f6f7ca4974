"""One LUT (or MAE) optimisation step as a pure function.

``train_step(state, batch, key, *, ...) -> (state, metrics)``: masking, student forward
(both losses), teacher forward under stop-gradient, gradient, optimizer update, then the
EMA update of the target. Static configuration comes in as keyword-only arguments, so
``functools.partial`` + ``jax.jit`` compiles it once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lut_jax.models.vit import LUTModel
from lut_jax.pretrain import losses, masking
from lut_jax.pretrain.train_state import TrainState, ema_update
from lut_jax.runtime import loop
from lut_jax.runtime.optim import Schedule

Batch = dict[str, jax.Array]
# The step's metrics that the loop averages over each logging interval (train.TrainMetrics):
# the losses, the gradient norm and the BC branch's collapse indicators.
AVERAGED_METRICS = ("loss", "rec_loss", "bc_loss", "grad_norm", "q_std", "z_std")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """A run's ``config.loss`` block, frozen (hashable, so it can be a static argument);
  built by ``lut_jax.pretrain.build.build_training``, the recipe's values are the config's."""

  mask_ratio: float
  norm_pix: bool
  w_mae: float
  w_bc: float


def _micro_batches(tree: Any, accum_steps: int) -> Any:
  """Splits the leading axis into ``accum_steps`` interleaved micro-batches. Example
  ``j * accum_steps + i`` goes to micro-batch ``i``: with the batch sharded in contiguous
  blocks over devices, every micro-batch stays spread over all devices."""
  def split(x):
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, tree)


def _loss_fn(params, batch_stats, micro, *, model: LUTModel, loss_config: LossConfig):
  """Loss of one micro-batch; ``micro`` holds the views, masks and teacher vectors."""
  view1, masks = micro["view1"], micro["masks"]
  variables = {"params": params, "batch_stats": batch_stats}
  if model.use_bc:
    out, updates = model.apply(variables, view1, micro["view2"], masks.keep1, masks.keep2,
                               masks.ids_restore, method=LUTModel.student,
                               mutable=["batch_stats"])
    new_batch_stats, pred = updates["batch_stats"], out["pred"]
    bc = losses.bc_loss(out["q1"], out["q2"], micro["z1"], micro["z2"])
    # Collapse indicators of the BC branch (per view, averaged): see docs/method.md.
    spread = {name: (losses.normalized_std(a) + losses.normalized_std(b)) / 2 for name, (a, b)
              in {"q_std": (out["q1"], out["q2"]), "z_std": (micro["z1"], micro["z2"])}.items()}
  else:
    pred = model.apply(variables, view1, masks.keep1, masks.ids_restore, method=LUTModel.mae)
    new_batch_stats, bc = batch_stats, jnp.zeros((), jnp.float32)
    spread = {"q_std": jnp.zeros((), jnp.float32), "z_std": jnp.zeros((), jnp.float32)}
  rec = losses.reconstruction_loss(pred, view1, masks.mask1, patch_size=model.patch_size,
                                   norm_pix=loss_config.norm_pix)
  total = losses.total_loss(rec, bc, w_mae=loss_config.w_mae, w_bc=loss_config.w_bc)
  return total, (new_batch_stats, {"loss": total, "rec_loss": rec, "bc_loss": bc, **spread})


def train_step(state: TrainState, batch: Batch, key: jax.Array, *, model: LUTModel,
               loss_config: LossConfig, learning_rate: Schedule, momentum: Schedule,
               accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step over the global ``batch`` (``view1`` and, for LUT, ``view2``). ``key``
  is this step's key (``fold_in(base_key, step)``); it only draws the masking noise. With
  ``accum_steps > 1`` the batch is processed in micro-batches whose gradients are averaged: the
  same as one large batch except for batch-norm statistics, which are per micro-batch (as they
  would be per device without SyncBN). The EMA ticks once."""
  view1 = batch["view1"]
  masks = masking.random_masks(key, view1.shape[0], model.num_patches, loss_config.mask_ratio,
                               two_views=model.use_bc)
  inputs = {"view1": view1, "masks": masks}
  if model.use_bc:
    inputs["view2"] = batch["view2"]
  target_variables = {"params": state.target_params, "batch_stats": state.target_batch_stats}
  grad_fn = jax.value_and_grad(
      lambda p, bs, m: _loss_fn(p, bs, m, model=model, loss_config=loss_config), has_aux=True)

  def micro_step(batch_stats, micro):
    if model.use_bc:
      # The teacher sees both full views with the target weights of *before* this step's
      # update and its batch norm on running averages; nothing flows back into it. Run per
      # micro-batch, so accumulation bounds its activation memory too (eval-mode batch
      # norm makes the result independent of the split).
      z1, z2 = model.apply(target_variables, micro["view1"], micro["view2"],
                           method=LUTModel.teacher)
      micro = dict(micro, z1=jax.lax.stop_gradient(z1), z2=jax.lax.stop_gradient(z2))
    (_, (batch_stats, metrics)), grads = grad_fn(state.params, batch_stats, micro)
    return batch_stats, metrics, grads

  if accum_steps == 1:
    batch_stats, metrics, grads = micro_step(state.batch_stats, inputs)
  else:
    def accumulate(carry, micro):
      grads_sum, batch_stats = carry
      batch_stats, metrics, grads = micro_step(batch_stats, micro)
      return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, batch_stats), metrics = jax.lax.scan(
        accumulate, (zeros, state.batch_stats), _micro_batches(inputs, accum_steps))
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    metrics = jax.tree.map(jnp.mean, metrics)

  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  tau = jnp.asarray(momentum(state.step), jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  if model.use_bc:
    # The EMA follows the optimizer update, so the target tracks the weights the student
    # has just reached (BYOL / the reference order); batch-norm running averages too.
    new_state = new_state.replace(
        target_params=ema_update(state.target_params, params, tau),
        target_batch_stats=ema_update(state.target_batch_stats, batch_stats, tau))
  grad_norm = optax.tree.norm(grads)
  # The loop reads this before every save, so a state holding a NaN or an infinity is
  # never written. The loss alone is not enough: it is computed before the update, and an
  # overflow in the optimizer's moments can leave the loss and the gradient finite.
  metrics = dict(metrics, lr=jnp.asarray(learning_rate(state.step), jnp.float32),
                 momentum=tau, grad_norm=grad_norm,
                 first_nonfinite_step=loop.first_nonfinite_step(
                     state.step + 1, metrics["loss"], grad_norm, new_state))
  return new_state, metrics


def step_key(base_key: jax.Array, step: jax.Array | int) -> jax.Array:
  """The key of step ``step``: a pure function of the run's seed and the step."""
  return jax.random.fold_in(base_key, step)


def make_train_step(**static) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """``train_step`` with its keyword-only static arguments bound (ready for ``jax.jit``)."""
  return lambda state, batch, key: train_step(state, batch, key, **static)
