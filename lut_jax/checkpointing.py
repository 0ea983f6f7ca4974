"""Orbax checkpoints of the train state: periodic async saves, resume, encoder export.

Orbax writes each step into a temporary directory and renames it when complete, so a
crash or preemption mid-save never damages the last finished checkpoint. On top of that:

* every finished step gets a SHA-256 manifest of its files (``<step>/sha256.json``),
  written in the background and verified before a restore, so a bit flip on disk is
  caught instead of restored;
* a restore that fails (damaged files, a bad manifest, non-finite values) falls back to the
  next older step, logging one line per damaged step; damaged steps are moved aside to
  ``damaged_<step>`` (never deleted), so later saves of that step number cannot collide;
* a save that fails (disk full, permissions) is reported as a one-line
  :class:`lut_jax.errors.WorkdirError` naming the step, and its temporary directory is
  removed so a full disk is not filled further.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

from lut_jax import errors

MANIFEST = "sha256.json"  # inside each step directory: copying a step copies it


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` for one train-state pytree."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               checksums: bool = True):
    # Local paths made absolute (Orbax needs that); URLs (gs://...) kept as they are.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.checksums = checksums
    self._pending: Optional[int] = None  # step of the save in flight
    self._hashing = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._hash_jobs: list[concurrent.futures.Future] = []
    try:
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save))
    except OSError as e:
      raise errors.WorkdirError(errors.describe_os_error(
          e, f"cannot create the checkpoint directory {self.directory}")) from e

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Starts saving ``state`` as ``step`` (asynchronously); returns whether it saves.

    The previous save is finished (and its failure, if any, raised) first.
    """
    self.wait()
    try:
      saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is the disk's fault
      self._raise_save_error(step, e)
    if saved:
      self._pending = step
    return saved

  def wait(self) -> None:
    """Blocks until the save in flight is committed; raises ``WorkdirError`` if it failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      self._raise_save_error(step, e)
    if step is not None and self.checksums and jax.process_index() == 0:
      self._hash_jobs.append(self._hashing.submit(self._write_checksums, step))

  def check_for_errors(self) -> None:
    """Raises the error of a background save that has already failed (cheap; no wait)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      self._raise_save_error(self._pending, e)

  def _raise_save_error(self, step: Optional[int], e: Exception):
    os_error = _os_error_in(e)
    if os_error is None:
      raise e
    # The temporary directory of a failed save is never a checkpoint; on a full disk it
    # is what keeps the disk full.
    if step is not None:
      for tmp in epath.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
        tmp.rmtree(missing_ok=True)
    raise errors.WorkdirError(errors.describe_os_error(
        os_error, f"saving checkpoint step {step} in {self.directory} failed"),
        hint="free space or fix permissions, then rerun the same command: it resumes from "
             f"the last saved step ({self.latest_step()})") from e

  def _write_checksums(self, step: int) -> None:
    step_dir = epath.Path(self.directory) / str(step)
    if not step_dir.exists():  # already garbage-collected by max_to_keep
      return
    tmp = step_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(_digest_files(step_dir), indent=0, sort_keys=True))
    tmp.rename(step_dir / MANIFEST)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restores ``step`` (default: latest) into arrays with ``abstract_state``'s shapes,
    dtypes and shardings (``jax.ShapeDtypeStruct`` leaves). Verifies the step's checksum
    manifest first, when it has one."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self._verify_checksums(step)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_newest_intact(self, abstract_state: Any,
                            is_valid: Callable[[Any], bool] = lambda _: True,
                            ) -> tuple[Any, int]:
    """``(state, step)`` of the newest step that restores cleanly and passes ``is_valid``.

    A damaged step is logged in one line and moved aside to ``damaged_<step>``; older
    steps are tried in turn. Raises ``WorkdirError`` if none restores.
    """
    failures, damaged = [], []
    for step in reversed(self.all_steps()):
      try:
        state = self.restore(abstract_state, step)
        if not is_valid(state):
          raise ValueError("it holds NaN or infinite values")
      except Exception as e:  # noqa: BLE001 - any failure to read a step means damage
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        logging.error("Checkpoint step %d in %s is damaged (%s); trying the previous one.",
                      step, self.directory, reason)
        failures.append(f"step {step}: {reason}")
        damaged.append(step)
        continue
      if damaged:
        self._move_damaged_aside(damaged)
      return state, step
    raise errors.WorkdirError(
        f"no checkpoint in {self.directory} restores: " + "; ".join(failures),
        hint="use a new --workdir, or repair the checkpoints (nothing was deleted)")

  def _move_damaged_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      root = epath.Path(self.directory)
      for step in steps:
        target = root / f"damaged_{step}_{int(time.time())}"
        (root / str(step)).rename(target)
        logging.warning("Moved damaged checkpoint step %d to %s (not deleted).", step, target)
    self.manager.reload()

  def _verify_checksums(self, step: int) -> None:
    step_dir = epath.Path(self.directory) / str(step)
    if not (step_dir / MANIFEST).exists():
      return  # saved by a run that stopped before hashing it (or with checksums off)
    expected = json.loads((step_dir / MANIFEST).read_text())
    actual = _digest_files(step_dir)
    bad = sorted(k for k in expected.keys() | actual.keys()
                 if expected.get(k) != actual.get(k))
    if bad:
      raise ValueError(f"{len(bad)} file(s) differ from their checksums, e.g. {bad[0]}")

  def reached_preemption(self, step: int) -> bool:
    """True on every process once any of them received a preemption notice (multi-host)."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._hashing.shutdown(wait=True)
      for job in self._hash_jobs:
        if job.exception() is not None:  # a missing manifest only skips a verification
          logging.warning("Could not write a checkpoint checksum manifest: %s",
                          job.exception())
      self.manager.close()


def _digest_files(step_dir: epath.Path) -> dict[str, str]:
  """``{relative path: sha256}`` of every file under ``step_dir`` but the manifest."""
  out = {}
  pending = [step_dir]
  while pending:  # epath has no recursive glob on object stores
    for path in sorted(pending.pop().iterdir()):
      if path.is_dir():
        pending.append(path)
      elif path.name not in (MANIFEST, f"{MANIFEST}.tmp"):
        digest = hashlib.sha256()
        with path.open("rb") as f:
          for chunk in iter(lambda: f.read(1 << 22), b""):  # noqa: B023
            digest.update(chunk)
        out[str(path.relative_to(step_dir))] = digest.hexdigest()
  return out


def _os_error_in(e: BaseException) -> Optional[OSError]:
  """The ``OSError`` that caused ``e`` (Orbax wraps its background errors), if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError) and e.errno is not None:
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


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
