"""Training states: pre-training's (online network, optimizer state, EMA target) and the
classifiers' of fine-tuning and the linear probe.

The target (momentum / teacher) network is a second copy of the online variables, kept as
its own parameter tree, BYOL style. Both states hold arrays only: no RNG and no Python
ints, so each checkpoints as one pytree and a step's randomness comes from
``fold_in(base_key, step)`` (a resumed run is bit-identical to an uninterrupted one).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lut_jax.models.vit import LUTModel
from lut_jax.pretrain import masking


class TrainState(flax.struct.PyTreeNode):
  """``target_params``/``target_batch_stats`` are ``None`` for the MAE baseline."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  target_params: Any
  target_batch_stats: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @property
  def has_target(self) -> bool:
    return self.target_params is not None


class ClassifierState(flax.struct.PyTreeNode):
  """Parameters, BatchNorm statistics and optimizer state of a classifier."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, params: Any, batch_stats: Any,
             tx: optax.GradientTransformation) -> ClassifierState:
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), tx=tx)

  def apply_gradients(self, grads: Any, **changes) -> ClassifierState:
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)


def init_variables(model: LUTModel, key: jax.Array) -> dict[str, Any]:
  """Initial ``{"params", "batch_stats"}`` of ``model`` (shapes from a 2-example batch)."""
  images = jnp.zeros((2, model.image_size, model.image_size, model.channels), jnp.float32)
  masks = masking.random_masks(jax.random.key(0), 2, model.num_patches, 0.75,
                               two_views=model.use_bc)
  variables = model.init(key, images, images, masks.keep1, masks.keep2, masks.ids_restore)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def create_train_state(model: LUTModel, tx: optax.GradientTransformation, key: jax.Array,
                       variables: Optional[dict[str, Any]] = None) -> TrainState:
  """Fresh state; the target starts as an exact copy of the online network. Pass ``variables``
  to start from given weights (e.g. converted PyTorch ones). Call it under
  ``jax.jit(..., out_shardings=...)`` to create the state directly with its sharding."""
  if variables is None:
    variables = init_variables(model, key)
  params, batch_stats = variables["params"], variables["batch_stats"]
  copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731 (fresh buffers, not aliases)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params),
      target_params=copy(params) if model.use_bc else None,
      target_batch_stats=copy(batch_stats) if model.use_bc else None,
      tx=tx)


def ema_update(target: Any, online: Any, momentum: jax.Array) -> Any:
  """``target <- momentum * target + (1 - momentum) * online``, leaf by leaf. Not
  ``optax.incremental_update(online, target, 1 - momentum)``: equal in exact arithmetic but not
  bit-identical once compiled (XLA fuses the two forms differently), so switching would change
  every run's weights in the last bits."""
  return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)
