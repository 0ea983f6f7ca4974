"""Builds a pre-training run's pieces from its config: run length, model, optimizer,
sharded state and the jitted step. TensorFlow-free, so the benchmark (and any launcher on
a machine without TensorFlow) compiles exactly the step that training runs."""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from lut_jax import config_lib, models, optim, sharding, train_state, train_step


def run_length(config: ml_collections.ConfigDict,
               num_examples: Optional[int] = None) -> tuple[int, int]:
  """``(total_steps, warmup_steps)``: explicit steps win, else epochs over the data set."""
  steps_per_epoch = None
  if num_examples is not None:
    steps_per_epoch = max(num_examples // config.input.batch_size, 1)
  if config.total_steps > 0:
    total = int(config.total_steps)
  elif steps_per_epoch is None:
    raise config_lib.ConfigError("total_epochs needs the data set size; set total_steps")
  else:
    total = int(round(config.total_epochs * steps_per_epoch))
  if config.optim.warmup_steps >= 0:
    warmup = int(config.optim.warmup_steps)
  elif steps_per_epoch is None:
    raise config_lib.ConfigError("optim.warmup_epochs needs the data set size; "
                                 "set optim.warmup_steps")
  else:
    warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
  if not 0 <= warmup < total:
    # The cosine needs at least one step after the warmup.
    raise config_lib.ConfigError(
        f"optim.warmup_steps/warmup_epochs: the warmup ({warmup} steps) must be shorter "
        f"than the run ({total} steps)", hint="lower the warmup or raise total_steps")
  return total, warmup


def build_training(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                   total_steps: int, warmup_steps: int):
  """Model, optimizer, abstract state with shardings and the jitted step, from a config.

  Returns ``(model, abstract_state, state_shardings, jitted_step, init_fn)``.
  """
  use_bc = config_lib.uses_bc(config)
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  model = models.build_model(config.model, image_size=config.input.image_size,
                             channels=config.input.channels, use_bc=use_bc, dtype=dtype)
  peak_lr = optim.peak_learning_rate(config.optim.base_lr, config.input.batch_size)
  lr = optim.learning_rate_schedule(peak_lr=peak_lr, warmup_steps=warmup_steps,
                                    total_steps=total_steps, min_lr=config.optim.min_lr)
  momentum = optim.momentum_schedule(base_momentum=config.ema.momentum, total_steps=total_steps)
  tx = optim.create_optimizer(learning_rate=lr, weight_decay=config.optim.weight_decay,
                              b1=config.optim.b1, b2=config.optim.b2,
                              grad_clip_norm=config.optim.grad_clip_norm)
  init_fn = functools.partial(train_state.create_train_state, model, tx)
  abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
  state_shardings = sharding.state_shardings(abstract_state, mesh)
  loss_config = train_step.LossConfig(mask_ratio=config.loss.mask_ratio,
                                      norm_pix=config.loss.norm_pix, w_mae=config.loss.w_mae,
                                      w_bc=config.loss.w_bc)
  step_fn = train_step.make_train_step(model=model, loss_config=loss_config, learning_rate=lr,
                                       momentum=momentum, accum_steps=config.optim.accum_steps)
  replicated = sharding.replicated(mesh)
  jitted_step = jax.jit(step_fn,
                        in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
                        out_shardings=(state_shardings, replicated),
                        donate_argnums=(0,))  # the old state's buffers hold the new one
  jitted_init = jax.jit(init_fn, out_shardings=state_shardings)
  return model, abstract_state, state_shardings, jitted_step, jitted_init
