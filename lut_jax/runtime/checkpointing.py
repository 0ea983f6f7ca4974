"""Orbax checkpoints of the train state: periodic async saves, resume, and reading chosen
subtrees of a step (:func:`restore_subtrees`, which ``lut_jax.weights`` loads through).

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save never damages the last finished checkpoint. On top of that, every finished step
gets a SHA-256 manifest of its files (``<step>/sha256.json``, written in the background,
verified before a restore: a bit flip is caught, not restored) and the run's config
(``<step>/config.json``: a step copied elsewhere still says what it is). A restore that
fails (damaged files, a bad manifest, non-finite values) falls back to the next older step,
moving the damaged one aside to ``damaged_<step>`` (never deleted); a resume sets aside to
``foreign_<step>`` a step whose ``config.json`` is another run's. A save that fails (disk
full, permissions) is one :class:`lut_jax.errors.WorkdirError` line naming the step (and
the space left), its temporary directory removed so a full disk is not filled further.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lut_jax import config_lib, errors

MANIFEST = "sha256.json"  # inside each step directory: copying a step copies it


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` for one train-state pytree: keeps the
  ``max_to_keep`` newest steps, also every multiple of ``keep_every_steps > 0`` and, with
  ``best_metric``, the step whose ``metrics[best_metric]`` (given to :meth:`save`) is
  highest; writes ``run_config`` (JSON text) into every finished step.
  ``async_save=False`` saves (and hashes) each step before :meth:`save` returns.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               checksums: bool = True, best_metric: Optional[str] = None,
               keep_every_steps: int = 0, run_config: Optional[str] = None):
    # Local paths made absolute (Orbax needs that); URLs (gs://...) kept as they are.
    check_store(directory)
    self.directory = directory if is_url(directory) else os.path.abspath(directory)
    self.checksums = checksums
    self.run_config = run_config
    self.async_save = async_save
    self._pending: Optional[int] = None  # step of the save in flight
    self._hashing = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._hash_jobs: list[concurrent.futures.Future] = []
    policies = ocp.checkpoint_managers
    policy, best = policies.LatestN(n=max_to_keep), {}
    if keep_every_steps > 0:
      policy = policies.AnyPreservationPolicy(
          [policy, policies.EveryNSteps(interval_steps=keep_every_steps)])
    if best_metric is not None:
      metric = lambda metrics: metrics[best_metric]  # noqa: E731
      policy = policies.AnyPreservationPolicy([policy, policies.BestN(
          get_metric_fn=metric, n=1, keep_checkpoints_without_metrics=False)])
      best = dict(best_fn=metric, best_mode="max")
    try:
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                               enable_async_checkpointing=async_save, **best))
    except OSError as e:
      raise errors.WorkdirError(errors.describe_os_error(
          e, f"cannot create the checkpoint directory {self.directory}")) from e

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, *, force: bool = False,
           metrics: Optional[dict[str, float]] = None) -> bool:
    """Starts saving ``state`` as ``step`` (once the previous save is finished, its failure
    raised); returns whether it saves. ``metrics`` rank it for ``best_metric``."""
    self.wait()
    try:
      saved = self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics,
                                force=force)
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is the disk's fault
      self._raise_save_error(step, e)
    if saved:
      self._pending = step
      if not self.async_save:
        self.wait()
    return saved

  def wait(self) -> None:
    """Blocks until the save in flight is committed; raises ``WorkdirError`` if it failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      self._raise_save_error(step, e)
    if (step is not None and (self.checksums or self.run_config is not None)
        and jax.process_index() == 0):
      job = self._hashing.submit(self._finish_step, step)
      self._hash_jobs.append(job)
      if not self.async_save:  # hashed before a later save can garbage-collect the step
        concurrent.futures.wait([job])

  def check_for_errors(self) -> None:
    """Raises the error of a background save that has already failed (cheap; no wait)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      self._raise_save_error(self._pending, e)

  def _raise_save_error(self, step: Optional[int], e: Exception):
    os_error = errors.os_error_in(e)
    if os_error is None:
      raise e
    # The temporary directory of a failed save is never a checkpoint; on a full disk it
    # is what keeps the disk full. Its other writes finish (and fail) first.
    with contextlib.suppress(Exception):
      self.manager.wait_until_finished()
    if step is not None:
      for tmp in epath.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
        tmp.rmtree(missing_ok=True)
    free = ""
    if os_error.errno == errno.ENOSPC and not is_url(self.directory):
      with contextlib.suppress(OSError):
        free = f" ({shutil.disk_usage(self.directory).free / 2**20:.1f} MB free)"
    raise errors.WorkdirError(errors.describe_os_error(
        os_error, f"saving checkpoint step {step} in {self.directory} failed") + free,
        hint="free space or fix permissions, then rerun the same command: it resumes from "
             f"the last saved step ({self.latest_step()})") from e

  def _finish_step(self, step: int) -> None:
    """Adds the run config and the checksum manifest (which covers it) to a committed step."""
    step_dir = epath.Path(self.directory) / str(step)
    if not step_dir.exists():  # already garbage-collected by max_to_keep
      return
    if self.run_config is not None:
      (step_dir / config_lib.CONFIG_FILE).write_text(self.run_config)
    if not self.checksums:
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
    verify_checksums(epath.Path(self.directory) / str(step))
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def restore_newest_intact(self, abstract_state: Any, config_changes: Optional[
      Callable[[Any], list[str]]] = None) -> tuple[Any, int]:
    """``(state, step)`` of the newest step that restores cleanly, all finite (older steps
    tried in turn; a damaged one logged and moved aside to ``damaged_<step>``). With
    ``config_changes`` (a step's saved config -> how it differs from this run's), a step
    whose ``config.json`` differs is moved aside to ``foreign_<step>``. A WorkdirError if
    none restores.
    """
    failures, aside = [], {}  # aside: {step: (name prefix, why)}
    for step in reversed(self.all_steps()):
      try:
        step_dir = epath.Path(self.directory) / str(step)
        if config_changes is not None and (step_dir / config_lib.CONFIG_FILE).exists():
          changed = config_changes(config_lib.load_config(os.fspath(step_dir)))
          if changed:  # a step copied in from another run: never continue it
            why = f"another run's ({'; '.join(changed)})"
            failures.append(f"step {step}: {why}")
            aside[step] = ("foreign", f": it is {why}")
            continue
        state = self.restore(abstract_state, step)
        check_finite(state, f"checkpoint step {step}")
      except Exception as e:  # noqa: BLE001 - any failure to read a step means damage
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        logging.error("Checkpoint step %d in %s is damaged (%s); trying the previous one.",
                      step, self.directory, reason)
        failures.append(f"step {step}: {reason}")
        aside[step] = ("damaged", "")
        continue
      if aside:
        self._move_aside(aside)
      return state, step
    raise errors.WorkdirError(
        f"no checkpoint in {self.directory} restores: " + "; ".join(failures),
        hint="use a new --workdir, or repair the checkpoints (nothing was deleted)")

  def restore_or_init(self, init_fn: Any, key: Any, shardings: Any, *, name: str) -> Any:
    """The newest intact step (:meth:`restore_newest_intact`), else ``init_fn(key)``
    compiled with ``shardings``; for a ``train_state`` whose ``tx`` is static (it is taken
    from ``init_fn``'s abstract state). ``name`` says which loop resumed, in the log."""
    abstract = jax.eval_shape(init_fn, key)
    if self.latest_step() is None:
      return jax.jit(init_fn, out_shardings=shardings)(key)
    state, step = self.restore_newest_intact(abstract_like(abstract, shardings))
    logging.info("%s: resumed at step %d", name, step)
    return state.replace(tx=abstract.tx)

  def _move_aside(self, steps: dict[int, tuple[str, str]]) -> None:
    if jax.process_index() == 0:
      root = epath.Path(self.directory)
      for step, (prefix, why) in steps.items():
        target = root / f"{prefix}_{step}_{int(time.time())}"
        (root / str(step)).rename(target)
        logging.warning("Moved %s checkpoint step %d to %s (not deleted)%s.", prefix, step,
                        target, why)
    self.manager.reload()

  def best(self) -> Optional[tuple[int, dict[str, float]]]:
    """``(step, metrics)`` of the kept step with the highest ``best_metric`` (which must be
    set), or None before the first save with metrics."""
    step = self.manager.best_step()
    return None if step is None else (step, self.manager.metrics(step))

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
          logging.warning("Could not finish a checkpoint step (config.json, checksum "
                          "manifest): %s", job.exception())
      self.manager.close()


def verify_checksums(step_dir: epath.Path) -> None:
  """Raises ``ValueError`` when a file of ``step_dir`` differs from its SHA-256 manifest
  (a bit flip, a truncation, a missing or extra file); a missing ``config.json`` alone is a
  warning. Steps without a manifest pass: saved by a run that stopped before hashing them,
  or with checksums off."""
  if not (step_dir / MANIFEST).exists():
    return
  expected = json.loads((step_dir / MANIFEST).read_text())
  actual = _digest_files(step_dir)
  bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
  if bad == [config_lib.CONFIG_FILE] and bad[0] not in actual:
    # The arrays are intact: only the record of the config is gone, and the work
    # directory's config.json (which a resume checks) says the same.
    logging.warning("Checkpoint step %s has lost its %s, but its arrays match their "
                    "checksums: restoring it as a step of the run in %s.", step_dir,
                    config_lib.CONFIG_FILE, step_dir.parent.parent)
    return
  if bad:
    raise ValueError(f"{len(bad)} file(s) differ from their checksums, e.g. {bad[0]}")


def check_finite(tree: Any, what: str, hint: str = "") -> None:
  """Raises ``NonFiniteError`` naming ``what`` and the first leaves of ``tree`` that hold
  NaN or infinity. Every load of weights checks: checksums only say the files are as
  written, and an unhashed step or weights made elsewhere can hold NaN, which would train
  on silently or score as if correct."""
  leaves = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jnp.issubdtype(x.dtype if hasattr(x, "dtype") else np.result_type(x),
                              jnp.inexact)]
  finite = jax.device_get(_leaves_finite([x for _, x in leaves]))
  bad = [jax.tree_util.keystr(path) for (path, _), ok in zip(leaves, finite) if not ok]
  if bad:
    raise errors.NonFiniteError(
        f"{what} holds NaN or infinite values in {len(bad)} of {len(leaves)} arrays: "
        + ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else ""), hint=hint)


# One dispatch for a whole tree, sharded or not (the output is a few replicated booleans).
_leaves_finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])


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


def abstract_like(tree: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct`` leaves with the given shardings (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


CHECKPOINT_DIR = "checkpoints"  # a work directory's Checkpointer directory


# The object stores a work directory can be on: those both epath and Orbax's TensorStore
# reach. Other schemes fail deep inside a file-system layer (s3:// has no epath backend
# here) or, where one exists, Orbax would write the arrays to a local folder named "s3:".
OBJECT_STORES = ("gs://",)


def is_url(path: Any) -> bool:
  """Whether ``path`` is a URL (``gs://...``): an object store, which only ``epath`` (and
  Orbax) reach; ``os`` functions would take it for a local folder named ``gs:``."""
  return "://" in os.fspath(path)


def check_store(path: Any) -> None:
  """Raises ``WorkdirError`` for a URL outside ``OBJECT_STORES`` (``s3://``, ``https://``):
  one line before anything is written, instead of a file-system traceback or files in the
  wrong place."""
  if is_url(path) and not os.fspath(path).startswith(OBJECT_STORES):
    raise errors.WorkdirError(
        f"{os.fspath(path)}: work directories and checkpoints can be local paths or "
        f"{', '.join(OBJECT_STORES)} URLs, not this scheme",
        hint="use a gs:// bucket, or a local path (a mounted bucket works as one)")


def absolute(path: str) -> epath.Path:
  """``path`` as an ``epath.Path``, made absolute when local (a URL such as ``gs://...`` is
  absolute already; Orbax needs absolute paths). Every file of a work directory is reached
  through it or ``epath``, so that a work directory can be on an object store."""
  check_store(path)
  return epath.Path(path) if is_url(path) else epath.Path(path).resolve()


def finished_steps(checkpoint_dir: epath.Path) -> list[int]:
  """The steps of a :class:`Checkpointer` directory, sorted (none when it is missing).
  Orbax writes a step under a temporary name and renames it when complete: all-digit names
  are the finished steps."""
  return sorted(int(p.name) for p in (checkpoint_dir.iterdir() if checkpoint_dir.is_dir()
                                      else ()) if p.name.isdigit())


def restore_subtrees(checkpoint_dir: str, subtrees: Sequence[str],
                     step: Optional[int] = None, *,
                     sharding: Optional[jax.sharding.Sharding] = None,
                     ) -> tuple[dict[str, Any], int]:
  """``({subtree: arrays}, step)`` of a :class:`Checkpointer` directory's ``step`` (None or
  negative: the latest): an Orbax partial restore guided by the checkpoint's metadata, so
  nothing else is read and neither the model nor the mesh is rebuilt. ``subtrees``:
  ``/``-separated paths (``"params/encoder"``, ``"target_params"``, ``"batch_stats"``...);
  ``sharding``: of every array (default replicated). A WorkdirError for a missing step or
  subtree.
  """
  root = absolute(checkpoint_dir)  # Orbax's reader needs absolute paths
  checkpoint_dir = os.fspath(root)
  steps = finished_steps(root)
  if not steps:
    raise errors.WorkdirError(f"no finished checkpoint in {checkpoint_dir}")
  step = steps[-1] if step is None or step < 0 else step
  if step not in steps:
    raise errors.WorkdirError(f"no checkpoint of step {step} in {checkpoint_dir}; it has "
                              f"{steps}")
  # The flag of each tool that reads these steps: evaluation, export, analysis.
  intact_hint = (f"pick an intact step of {steps}: --config.pretrained_step=STEP (lut-eval), "
                 "--step=STEP (lut-export) or WORKDIR/checkpoints/STEP (lut-analyze)")
  try:  # the same verification a resume makes: damaged weights are never evaluated
    verify_checksums(root / str(step))
  except ValueError as e:
    raise errors.WorkdirError(f"checkpoint step {step} in {checkpoint_dir} is damaged: {e}",
                              hint=intact_hint) from e
  if sharding is None:
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("d",)),
                                          jax.sharding.PartitionSpec())
  item_dir = root / str(step) / "default"
  # Opening the item directly makes Orbax warn that the step-level metadata file is not
  # there, which is expected: hide that warning.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.metadata(item_dir).item_metadata.tree
      item = {}
      for name in subtrees:
        node = _subtree(tree, name)
        if node is None:  # absent, or None (an MAE run's target_params)
          raise errors.WorkdirError(
              f"checkpoint step {step} in {checkpoint_dir} has no {name}; it has "
              f"{sorted(k for k, v in tree.items() if v is not None)}",
              hint="an MAE run has no EMA teacher (target_params)"
              if name.startswith("target_params") else "")
        *parents, leaf = name.split("/")
        target = item
        for key in parents:
          target = target.setdefault(key, {})
        target[leaf] = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), node)
      restored = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=jax.tree.map(
              lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item),
          partial_restore=True))
  finally:
    logging.set_verbosity(verbosity)
  check_finite(restored, f"checkpoint step {step} in {checkpoint_dir}", hint=intact_hint)
  return {name: _subtree(restored, name) for name in subtrees}, step


def _subtree(tree: Any, name: str) -> Any:
  """``tree["a"]["b"]`` for the name ``"a/b"``; None where a key is missing."""
  for key in name.split("/"):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree
