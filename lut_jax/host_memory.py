"""Host memory on transparent huge pages: the command-line tools restart once to get it.

XLA:CPU allocates an executable's temporary buffer with ``malloc`` on every call, and for
the train step that buffer is large (hundreds of MB for the embedded default's batch).
glibc serves a request that large with a fresh ``mmap`` and unmaps it on ``free``, so every
step touches each 4 KiB page of it anew and the kernel zero-fills it one page fault at a
time: on a CPU, time the step does not spend computing (docs/benchmarks.md measures it).
glibc's ``glibc.malloc.hugetlb=1`` tunable makes ``malloc`` ask for transparent huge pages
(``madvise``) for such mappings, 2 MiB per fault instead of 4 KiB. Tunables are read only
when a process starts, so :func:`restart_with_huge_page_malloc` re-executes the process
with the tunable added to ``GLIBC_TUNABLES``, before any work is done. It changes which
pages hold the buffers, never what is computed.

It does nothing where it cannot help: not Linux with glibc >= 2.35, or transparent huge
pages set to ``never`` (nothing to ask for) or ``always`` (already given). To opt out, set
the tunable yourself: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0``. Code that calls the
trainer from Python gets it by starting Python with the tunable set; ``train.pretrain``
logs a warning on a CPU where it is missing (:func:`missing_huge_pages_note`).

This module imports only the standard library.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
# Set on the restarted process: a loader that drops GLIBC_TUNABLES (secure mode) must not
# make the restart repeat forever.
RESTARTED_ENV = "LUT_JAX_HUGE_PAGE_RESTART"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> Optional[tuple[int, int]]:
  """(major, minor) of the C library when it is glibc, else None."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):  # no such name (None), another C library
    return None


def transparent_huge_page_mode() -> Optional[str]:
  """The kernel's setting (``always``, ``madvise`` or ``never``), or None if unknown."""
  try:
    with open(THP_SETTING) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def environment_with_huge_pages(environ: Mapping[str, str], thp_mode: Optional[str],
                                glibc: Optional[tuple[int, int]]) -> Optional[dict[str, str]]:
  """The environment to restart with, or None when a restart would not help."""
  if glibc is None or glibc < (2, 35) or thp_mode != "madvise":
    return None  # older glibc ignores the tunable; "always" already uses huge pages
  tunables = environ.get("GLIBC_TUNABLES", "")
  if RESTARTED_ENV in environ or TUNABLE in tunables:
    return None  # restarted already, or the user chose a value
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
  env[RESTARTED_ENV] = "1"
  return env


def _restart_environment() -> Optional[dict[str, str]]:
  """:func:`environment_with_huge_pages` for this process and machine."""
  if not sys.platform.startswith("linux"):
    return None
  return environment_with_huge_pages(os.environ, transparent_huge_page_mode(), glibc_version())


def missing_huge_pages_note() -> Optional[str]:
  """One line for a process that was started without the tunable where it would help (code
  that calls the trainer from Python), else None."""
  if _restart_environment() is None:
    return None
  return (f"this process runs without {TUNABLE}=1: on a CPU, XLA's per-step buffers cost a "
          f"page fault per 4 KiB; start Python with GLIBC_TUNABLES={TUNABLE}=1 (the lut-* "
          f"commands restart themselves with it)")


def restart_with_huge_page_malloc() -> None:
  """Re-executes this process with huge-page ``malloc`` where that helps; else returns.

  Call it first thing in a command-line entry point: the process is replaced (same PID,
  same arguments and open files), so nothing done before the call survives.
  """
  env = _restart_environment()
  if env is None or not sys.executable or not getattr(sys, "orig_argv", None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    # argv[0] as a path: Python finds its prefix (a venv's) from it.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:  # an optimisation only: go on in this process
    print(f"lut_jax: note: could not restart with {TUNABLE}=1 ({e}); continuing without it",
          file=sys.stderr, flush=True)
