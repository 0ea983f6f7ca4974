"""Checks a pre-training config and builds a run's pieces from it: run length, model,
optimizer, sharded state and the jitted step. TensorFlow-free, so the benchmark (and any
launcher on a machine without TensorFlow) compiles exactly the step that training runs."""

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections

from lut_jax import config_lib, errors
from lut_jax.data import device_input, splits
from lut_jax.models import vit
from lut_jax.pretrain import masking, train_state, train_step
from lut_jax.runtime import optim, sharding


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a pre-training config; raises :class:`errors.ConfigError` naming the bad field.
  Here, not in :mod:`lut_jax.config_lib`, because it asks the model, masking, optimizer and
  input code what they accept: config files import config_lib without JAX."""
  def fail(msg, hint=""):
    raise errors.ConfigError(msg, hint)

  if config.method not in config_lib.METHODS:
    fail(f"unknown method {config.method!r}; expected one of {config_lib.METHODS}")
  weights = {k: v for k, v in config.loss.items() if k.startswith("w_")}
  if any(w < 0 for w in weights.values()):
    fail("loss weights must be >= 0, got " + ", ".join(f"{k}={w}" for k, w in weights.items()))
  # `method` alone decides whether the BC branch exists (uses_bc): a weight contradicting
  # it would train one method and record the other.
  if config.method == "lut" and config.loss.w_bc <= 0:
    fail(f"method='lut' trains the BC loss: loss.w_bc must be > 0, got {config.loss.w_bc}",
         hint="use method=mae for the baseline")
  if config.method == "mae" and config.loss.w_bc != 0:
    fail(f"method='mae' is the baseline without the BC loss; got loss.w_bc={config.loss.w_bc}")
  if config.dtype not in config_lib.DTYPES:
    fail(f"unknown dtype {config.dtype!r}; expected one of {config_lib.DTYPES}")
  if config.input.batch_size <= 0:
    fail(f"input.batch_size must be positive, got {config.input.batch_size}")
  # Exactly one of each steps / epochs pair, the other None: were both set, one would
  # silently win while config.json recorded both.
  for name, steps, epochs in (
      ("total", config.total_steps, config.total_epochs),
      ("optim.warmup", config.optim.warmup_steps, config.optim.warmup_epochs)):
    if steps is not None and epochs is not None:
      fail(f"{name}_steps={steps} and {name}_epochs={epochs} are both set; set exactly one",
           hint=f"add --config.{name}_steps=None to count in epochs, or "
                f"--config.{name}_epochs=None to count in steps")
    if steps is None and epochs is None:
      fail(f"set one of {name}_steps and {name}_epochs; both are None")
    least = 1 if name == "total" else 0  # a run needs a step; a warmup may be empty
    if steps is not None and not (type(steps) is int and steps >= least):
      fail(f"{name}_steps must be an integer >= {least}, got {steps!r}")
    if epochs is not None and not (type(epochs) in (int, float)
                                   and (epochs > 0 if least else epochs >= 0)):
      fail(f"{name}_epochs must be a number {'> 0' if least else '>= 0'}, got {epochs!r}")
  for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
               "image_summary_every_steps"):
    if config[name] <= 0:
      fail(f"{name} must be positive, got {config[name]}")
  if config.keep_checkpoint_every_steps < 0:
    fail("keep_checkpoint_every_steps must be >= 0 (0: only the newest keep_checkpoints), "
         f"got {config.keep_checkpoint_every_steps}")
  if config.optim.accum_steps < 1:
    fail(f"optim.accum_steps must be >= 1, got {config.optim.accum_steps}")
  group = config.model.head_bn_group_size
  micro = config.input.batch_size // config.optim.accum_steps
  if group < 0 or 0 < group < micro and micro % group:
    fail(f"model.head_bn_group_size must be 0 or divide the (micro-)batch of {micro}, got "
         f"{group}")
  o = config.optim
  if not o.base_lr > 0:
    fail(f"optim.base_lr must be > 0, got {o.base_lr}")
  peak_lr = optim.peak_learning_rate(o.base_lr, config.input.batch_size)
  if not 0 <= o.min_lr <= peak_lr:
    fail(f"optim.min_lr must be in [0, peak lr {peak_lr:g}], got {o.min_lr}")
  if not o.weight_decay >= 0:
    fail(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
  for name in ("b1", "b2"):
    if not 0 <= o[name] < 1:
      fail(f"optim.{name} must be in [0, 1), got {o[name]}")
  if not o.grad_clip_norm >= 0:
    fail(f"optim.grad_clip_norm must be >= 0 (0 disables clipping), got {o.grad_clip_norm}")
  if not 0 <= config.ema.momentum <= 1:
    fail(f"ema.momentum must be in [0, 1], got {config.ema.momentum}")
  try:
    # Checked without building the model: build.build_training builds it, once.
    spec = vit.check_model_config(config.model, image_size=config.input.image_size,
                                  dtype=config.dtype)
    masking.check_mask_ratio(config.loss.mask_ratio,
                             (config.input.image_size // spec.patch_size) ** 2,
                             two_views=config_lib.uses_bc(config))
  except ValueError as e:
    fail(str(e))
  if config.input.channels not in (1, 3):
    fail(f"input.channels must be 1 or 3, got {config.input.channels}")
  device_input.check_backend(config.input)
  if config.monitor.every_steps < 0:
    fail(f"monitor.every_steps must be >= 0 (0 = off), got {config.monitor.every_steps}")


def run_length(config: ml_collections.ConfigDict,
               num_examples: Optional[int] = None) -> tuple[int, int]:
  """``(total_steps, warmup_steps)`` of a validated config: each from whichever of its
  steps / epochs pair is set, epochs over ``num_examples`` (needed only for epochs)."""
  steps_per_epoch = None
  if num_examples is not None:
    steps_per_epoch = max(splits.steps_per_epoch(num_examples, config.input.batch_size), 1)
  total = _steps("total", config.total_steps, config.total_epochs, steps_per_epoch)
  warmup = _steps("optim.warmup", config.optim.warmup_steps, config.optim.warmup_epochs,
                  steps_per_epoch)
  if not 0 <= warmup < total:
    # The cosine needs at least one step after the warmup.
    raise errors.ConfigError(
        f"optim.warmup_steps/warmup_epochs: the warmup ({warmup} steps) must be shorter "
        f"than the run ({total} steps)", hint="lower the warmup or raise total_steps")
  return total, warmup


def _steps(name: str, steps: Optional[int], epochs: Optional[float],
           steps_per_epoch: Optional[int]) -> int:
  """Steps of the pair ``{name}_steps`` / ``{name}_epochs`` (exactly one is set)."""
  if steps is not None:
    return int(steps)
  if steps_per_epoch is None:
    raise errors.ConfigError(f"{name}_epochs needs the data set size; set {name}_steps")
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
  config (:func:`validate`)."""
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
