"""Device mesh and shardings: data parallelism plus optional FSDP.

The mesh has two axes, ``data`` and ``fsdp``; the batch is split over both. Parameters and
optimizer state are replicated over ``data`` and, when ``fsdp > 1``, each large leaf is
split along its largest divisible dimension over ``fsdp`` (ZeRO-3 style). Under ``jax.jit``
gradients and batch statistics are then global: no pmean, no SyncBatchNorm code.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lut_jax.errors import ConfigError

DATA_AXES = ("data", "fsdp")
# Leaves smaller than this stay replicated: splitting them saves nothing and costs latency.
MIN_FSDP_SIZE = 2 ** 14


def create_mesh(fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default: all); ``fsdp=-1`` uses all of them."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  fsdp = n if fsdp == -1 else fsdp
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f"mesh.fsdp={fsdp} must be -1 or a divisor of the device count {n}")
  # Auto axis types: ordinary Linen code needs no sharding annotations inside the model.
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _leaf_spec(shape: Sequence[int], fsdp: int) -> P:
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for every array of a (abstract) state pytree, by the FSDP rule above."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(x.shape, fsdp)), abstract_state)


def check_batch_size(global_batch: int, mesh: Mesh, *, accum_steps: int = 1,
                     process_count: int = 1) -> None:
  """Raises :class:`ConfigError` unless the global batch splits evenly over micro-batches,
  processes and devices."""
  devices = mesh.devices.size
  if global_batch % process_count:
    raise ConfigError(f"input.batch_size={global_batch} is not divisible by the number of "
                     f"processes ({process_count})")
  if accum_steps < 1 or global_batch % (accum_steps * devices):
    raise ConfigError(f"input.batch_size={global_batch} is not divisible by optim.accum_steps "
                     f"({accum_steps}) x number of devices ({devices})")
