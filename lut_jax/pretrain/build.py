"""Builds a pre-training run's pieces from its config: run length, model, optimizer,
sharded state and the jitted step. TensorFlow-free, so the benchmark (and any launcher on
a machine without TensorFlow) compiles exactly the step that training runs."""

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections

from lut_jax import config_lib
from lut_jax.models import vit
from lut_jax.pretrain import train_state, train_step
from lut_jax.runtime import optim, sharding


def run_length(config: ml_collections.ConfigDict,
               num_examples: Optional[int] = None) -> tuple[int, int]:
  """``(total_steps, warmup_steps)`` of a validated config: each from whichever of its
  steps / epochs pair is set, epochs over ``num_examples`` (needed only for epochs)."""
  steps_per_epoch = None
  if num_examples is not None:
    steps_per_epoch = max(num_examples // config.input.batch_size, 1)
  total = _steps("total", config.total_steps, config.total_epochs, steps_per_epoch)
  warmup = _steps("optim.warmup", config.optim.warmup_steps, config.optim.warmup_epochs,
                  steps_per_epoch)
  if not 0 <= warmup < total:
    # The cosine needs at least one step after the warmup.
    raise config_lib.ConfigError(
        f"optim.warmup_steps/warmup_epochs: the warmup ({warmup} steps) must be shorter "
        f"than the run ({total} steps)", hint="lower the warmup or raise total_steps")
  return total, warmup


def _steps(name: str, steps: Optional[int], epochs: Optional[float],
           steps_per_epoch: Optional[int]) -> int:
  """Steps of the pair ``{name}_steps`` / ``{name}_epochs`` (exactly one is set)."""
  if steps is not None:
    return int(steps)
  if steps_per_epoch is None:
    raise config_lib.ConfigError(f"{name}_epochs needs the data set size; set {name}_steps")
  return int(round(epochs * steps_per_epoch))


class Training(NamedTuple):
  """What :func:`build_training` builds for a run."""

  model: vit.LUTModel
  abstract_state: train_state.TrainState  # shapes and dtypes only (``jax.eval_shape``)
  state_shardings: Any  # a TrainState of ``NamedSharding``s
  step: Callable[..., Any]  # jitted ``(state, batch, key) -> (state, metrics)``, donates state
  init: Callable[[jax.Array], train_state.TrainState]  # jitted, sharded ``key -> state``


def build_training(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                   total_steps: int, warmup_steps: int) -> Training:
  """Model, optimizer, abstract state with shardings and the jitted step, from a validated
  config (:func:`lut_jax.config_lib.validate`)."""
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  model = vit.build_model(config.model, image_size=config.input.image_size,
                             channels=config.input.channels,
                             use_bc=config_lib.uses_bc(config), dtype=dtype)
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
  loss_config = train_step.LossConfig(**config.loss)
  step_fn = train_step.make_train_step(model=model, loss_config=loss_config, learning_rate=lr,
                                       momentum=momentum, accum_steps=config.optim.accum_steps)
  replicated = sharding.replicated(mesh)
  return Training(
      model=model, abstract_state=abstract_state, state_shardings=state_shardings,
      step=jax.jit(step_fn,
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
                   out_shardings=(state_shardings, replicated),
                   donate_argnums=(0,)),  # the old state's buffers hold the new one
      init=jax.jit(init_fn, out_shardings=state_shardings))
