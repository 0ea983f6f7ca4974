"""An exclusive lock on a work directory: two runs never write into the same one.

Taking it creates the directory (one-line errors for a file, read-only or full disk). The
lock, ``WORKDIR/lut_jax.lock``, is created atomically (``O_EXCL``) with the owner's host,
pid, command and start time. A lock left by a dead run (kill -9, a crash) is recognised by
its pid on the same host and taken over with one warning; one held by a live process or
another host is a :class:`lut_jax.errors.WorkdirError` naming the holder. Only process 0 of
a multi-process run takes it. On an object store (``gs://``), with no exclusive create, the
lock is written if absent and read back: a run started while another holds the directory
is refused, two started at the same moment are not (one log line says so).

A lock for a ``kind`` of run also refuses a directory holding the other kind, before
writing anything: an evaluation's ``config.json`` over a pre-training run's would make that
run unresumable and unreadable.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Optional

from absl import logging
from etils import epath

from lut_jax import config_lib, errors
from lut_jax.runtime import checkpointing

LOCK_FILE = "lut_jax.lock"
PRETRAINING, EVALUATION = "pre-training", "evaluation"  # the kinds of run
# A lock file that cannot be parsed is a writer caught between create and write unless it
# is older than this; then it is debris of a crash.
_UNREADABLE_STALE_S = 10.0


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def run_kind(workdir: epath.Path) -> Optional[str]:
  """The kind of run ``workdir`` holds, by its ``config.json`` (an evaluation config has a
  ``mode``), else by its checkpoint steps' (only pre-training saves one in each); None if
  it holds none that can be read."""
  for pattern in ("", f"{checkpointing.CHECKPOINT_DIR}/*/"):
    for path in workdir.glob(pattern + config_lib.CONFIG_FILE):
      try:
        config = json.loads(path.read_text())
      except (OSError, ValueError):
        continue
      if isinstance(config, dict):
        return EVALUATION if "mode" in config else PRETRAINING
  return None


class WorkdirLock:
  """Context manager holding ``WORKDIR/lut_jax.lock`` for the duration of a run; with a
  ``kind`` (:data:`PRETRAINING`, :data:`EVALUATION`), only in a directory that holds no run
  of another kind."""

  def __init__(self, workdir: str, command: str = "", *, enabled: bool = True,
               kind: str = ""):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.command = command or " ".join(sys.argv)
    self.enabled = enabled
    self.kind = kind
    self._owner = {"host": socket.gethostname(), "pid": os.getpid(),
                   "command": self.command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    self._held = False

  def __enter__(self) -> "WorkdirLock":
    if self.enabled:
      self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    """Creates the work directory if needed and takes its lock."""
    workdir = self.path.parent
    checkpointing.check_store(workdir)
    if workdir.exists() and not workdir.is_dir():
      raise errors.WorkdirError(f"--workdir {workdir} is a file, not a directory")
    found = run_kind(workdir) if self.kind else None
    if found not in (None, self.kind):
      raise errors.WorkdirError(f"--workdir {workdir} holds a run of another kind ({found}); "
                                f"this {self.kind} run would write over its files",
                                hint="use another --workdir")
    if checkpointing.is_url(self.path):
      logging.warning("Lock on %s: object stores offer no exclusive create; a run started "
                      "while this one runs is refused, two started at the same moment are "
                      "not detected.", self.path)
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      self._acquire()
    except OSError as e:
      raise errors.WorkdirError(errors.describe_os_error(
          e, f"cannot write to --workdir {workdir}")) from e

  def _acquire(self) -> None:
    for _ in range(3):  # a stale lock taken over by a third process: look again
      if self._try_create():
        self._held = True
        return
      owner = self._read_owner()
      if not self._is_stale(owner):
        raise errors.WorkdirError(
            f"{self.path.parent} is in use by another run ({_describe(owner)})",
            hint=f"wait for it, or use another --workdir; if no such run exists, delete "
                 f"{self.path}")
      logging.warning("Taking over the lock of a run that is gone (%s).", _describe(owner))
      self._remove_stale()
    raise errors.WorkdirError(f"could not lock {self.path.parent}: other runs keep taking it")

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    try:
      if self._read_owner() == self._owner:  # never remove a lock another run took over
        self.path.unlink(missing_ok=True)
    except OSError as e:
      logging.warning("Could not remove the work-directory lock %s: %s", self.path, e)

  def _try_create(self) -> bool:
    text = json.dumps(self._owner)
    if checkpointing.is_url(self.path):  # object store: no O_EXCL
      if self.path.exists():
        return False
      self.path.write_text(text)
      # Of two writers, the store keeps the last: the first one to read back another's
      # lock gives way (a narrower window, not an exclusion).
      return self._read_owner() == self._owner
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def _read_owner(self) -> Optional[dict]:
    try:
      owner = json.loads(self.path.read_text())
      return owner if isinstance(owner, dict) else None
    except FileNotFoundError:
      return {}
    except (OSError, ValueError):
      return None

  def _is_stale(self, owner: Optional[dict]) -> bool:
    if owner == {}:  # released between our create and our read
      return True
    if owner is None:
      try:
        age = time.time() - self.path.stat().mtime
      except OSError:
        return True
      return age > _UNREADABLE_STALE_S
    if owner.get("host") != self._owner["host"]:
      return False  # no way to know whether a pid on another host lives
    pid = owner.get("pid")
    return not isinstance(pid, int) or not _pid_alive(pid)

  def _remove_stale(self) -> None:
    # Rename first: of several processes taking over the same stale lock, only one rename
    # succeeds, so none of them removes a lock another has just created.
    aside = self.path.parent / f"{LOCK_FILE}.stale.{os.getpid()}"
    try:
      self.path.rename(aside)
    except FileNotFoundError:
      return
    aside.unlink(missing_ok=True)


def _describe(owner: Optional[dict]) -> str:
  if not owner:
    return "an unreadable lock file"
  return (f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}: "
          f"{owner.get('command', '')[:120]}")
