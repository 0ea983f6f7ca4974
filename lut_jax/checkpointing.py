"""Orbax checkpoints of the train state: periodic async saves, resume, encoder export.

Orbax writes each step into a temporary directory and renames it when complete, so a
crash or preemption mid-save never damages the last finished checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` for one train-state pytree."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    # Local paths made absolute (Orbax needs that); URLs (gs://...) kept as they are.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Starts saving ``state`` as ``step`` (asynchronously); returns whether it saves."""
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restores ``step`` (default: latest) into arrays with ``abstract_state``'s shapes,
    dtypes and shardings (``jax.ShapeDtypeStruct`` leaves)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any of them received a preemption notice (multi-host)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct`` leaves with the given shardings (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


ENCODER_CONFIG_FILE = "encoder_config.json"


def export_encoder(directory: str, encoder_params: Any, encoder_config: dict[str, Any]) -> str:
  """Writes the encoder's parameters (an Orbax PyTree checkpoint) and its config (JSON).

  Reload with :func:`load_encoder`. ``encoder_config`` holds the keyword arguments of
  :class:`lut_jax.models.Encoder` (image_size, patch_size, width, depth, num_heads, ...).
  """
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), encoder_params, force=True)
  if jax.process_index() == 0:
    with open(os.path.join(directory, ENCODER_CONFIG_FILE), "w") as f:
      json.dump(encoder_config, f, indent=2, sort_keys=True)
  return directory


def load_encoder(directory: str) -> tuple[Any, Any]:
  """``(encoder_module, params)`` from :func:`export_encoder`'s output:

    encoder, params = load_encoder("runs/x/encoder")
    tokens = encoder.apply({"params": params}, images)
  """
  from lut_jax.models import Encoder  # local: keep checkpointing importable alone

  directory = os.path.abspath(directory)
  with open(os.path.join(directory, ENCODER_CONFIG_FILE)) as f:
    encoder_config = json.load(f)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(directory, "params"))
  return Encoder(**encoder_config), params
