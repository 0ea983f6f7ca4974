"""Host memory for XLA:CPU's per-step buffers: the command-line tools restart once to tune it.

XLA:CPU ``malloc``s an executable's temporary buffer on every call, hundreds of MB for the
train step, which glibc by default serves with a fresh ``mmap``: every step the kernel maps
and zero-fills it anew, a page fault per page (docs/benchmarks.md measures the cost). Four
glibc tunables remove that cost:

* ``glibc.malloc.arena_max=1``, ``mmap_max=0`` and a 1 TiB ``trim_threshold`` keep the
  buffer mapped from step to step: the request comes from an XLA worker thread, whose own
  arena cannot serve it (capped at 64 MiB, it falls back to ``mmap``), so all threads share
  the main heap, which grows and is never given back. The price: the process keeps its
  high-water mark of host memory resident.
* ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) backs the heap with 2 MiB pages: fewer TLB
  misses in the step's kernels.

Tunables are read when a process starts, so :func:`restart_with_tuned_malloc` re-executes
it with them added to ``GLIBC_TUNABLES`` before any work (where buffers live changes, never
what is computed). CPU runs only, decided from the environment before JAX starts:
``JAX_PLATFORMS`` when set (``cpu`` first: tuned), else any sign of an accelerator plug-in
(where JAX looks for one, ``PJRT_NAMES_AND_LIBRARY_PATHS``, ``TPU_LIBRARY_PATH``) keeps
glibc's defaults: one arena for all threads could slow a many-threaded input pipeline.
Nothing without glibc >= 2.26. A tunable you set yourself (also glibc's older
``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``) keeps your value;
``LUT_JAX_MALLOC_TUNING=0`` keeps glibc's defaults. Python callers of the trainer start
Python with ``GLIBC_TUNABLES`` as :func:`missing_tuning_note` prints it (``train.pretrain``
logs that note, or :func:`applied_tuning_note`). Standard library only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from typing import Mapping, Optional

# Keep the step's buffers mapped between steps (glibc >= 2.26, where tunables began).
KEEP_MAPPED = {"glibc.malloc.arena_max": "1", "glibc.malloc.mmap_max": "0",
               "glibc.malloc.trim_threshold": str(2 ** 40)}
HUGE_PAGES = {"glibc.malloc.hugetlb": "1"}  # glibc >= 2.35
# glibc's older spellings of the same settings: set there, they are the user's choice too.
ALIASES = {"glibc.malloc.arena_max": "MALLOC_ARENA_MAX",
           "glibc.malloc.mmap_max": "MALLOC_MMAP_MAX_",
           "glibc.malloc.trim_threshold": "MALLOC_TRIM_THRESHOLD_"}
OPT_OUT_ENV = "LUT_JAX_MALLOC_TUNING"  # "0": keep glibc's defaults
# Set on the restarted process (and so inherited by its children), so that a loader that
# drops GLIBC_TUNABLES (secure mode) cannot make the restart repeat forever.
TUNED_ENV = "LUT_JAX_MALLOC_TUNED"
# Besides installed plug-ins, JAX loads accelerator plug-ins named by these.
ACCELERATOR_ENV = ("PJRT_NAMES_AND_LIBRARY_PATHS", "TPU_LIBRARY_PATH")
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


def accelerator_plugin_installed() -> bool:
  """Whether JAX would find a GPU or TPU plug-in: what it imports at start (modules in the
  ``jax_plugins`` namespace package or its entry-point group), or ``libtpu``."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and any(pkgutil.iter_modules(spec.submodule_search_locations or [])):
    return True
  return bool(importlib.metadata.entry_points(group="jax_plugins"))


def runs_on_cpu(environ: Mapping[str, str], accelerator_plugin: bool) -> bool:
  """Whether JAX will run on the CPU, as far as the environment tells before it starts. A
  plug-in installed on a machine without its accelerator counts as "not the CPU": the tuning is
  then skipped, which costs speed, never correctness."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not (accelerator_plugin or any(environ.get(name) for name in ACCELERATOR_ENV))


def _skips_tuning(environ: Mapping[str, str]) -> bool:
  """Restarted already, or opted out."""
  return TUNED_ENV in environ or environ.get(OPT_OUT_ENV, "").strip() == "0"


def tuned_environment(environ: Mapping[str, str], *, thp_mode: Optional[str],
                      glibc: Optional[tuple[int, int]],
                      accelerator_plugin: bool) -> Optional[dict[str, str]]:
  """The environment to restart with, or None when a restart would not help."""
  if _skips_tuning(environ) or glibc is None or glibc < (2, 26):
    return None  # no tunables to set before glibc 2.26
  if not runs_on_cpu(environ, accelerator_plugin):
    return None
  wanted = dict(KEEP_MAPPED)
  if glibc >= (2, 35) and thp_mode == "madvise":  # "always" already uses huge pages
    wanted.update(HUGE_PAGES)
  tunables = environ.get("GLIBC_TUNABLES", "")
  chosen = {item.split("=")[0] for item in tunables.split(":")}
  chosen |= {name for name, alias in ALIASES.items() if alias in environ}
  added = [f"{name}={value}" for name, value in wanted.items() if name not in chosen]
  if not added:
    return None  # the user chose every value
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables.strip(":"), *added]))
  env[TUNED_ENV] = "1"
  return env


def _restart_environment() -> Optional[dict[str, str]]:
  """:func:`tuned_environment` for this process and machine."""
  if not sys.platform.startswith("linux") or _skips_tuning(os.environ):
    return None  # before the plug-in scan: the restarted process skips it
  return tuned_environment(os.environ, thp_mode=transparent_huge_page_mode(),
                           glibc=glibc_version(),
                           accelerator_plugin=accelerator_plugin_installed())


def missing_tuning_note() -> Optional[str]:
  """One line for a process that was started without the tuning where it would help (code
  that calls the trainer from Python), else None."""
  env = _restart_environment()
  if env is None:
    return None
  return (f"this process runs with glibc's default malloc: on a CPU, XLA maps and "
          f"zero-fills its per-step buffers anew on every step; start Python with "
          f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (the lut-* commands restart themselves "
          f"with it)")


def applied_tuning_note() -> Optional[str]:
  """One line for a process that runs with the tuning (restarted into it), else None."""
  if os.environ.get(TUNED_ENV) != "1":
    return None
  return (f"malloc tuned for XLA:CPU's per-step buffers (GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '')}): they stay mapped between steps, and host "
          f"memory stays at its peak; {OPT_OUT_ENV}=0 turns this off")


def restart_with_tuned_malloc() -> None:
  """Re-executes this process with the tuned ``malloc`` where that helps; else returns. Call it
  first thing in a command-line entry point: the process is replaced (same PID, same arguments
  and open files), so nothing done before the call survives."""
  env = _restart_environment()
  if env is None or not sys.executable or not getattr(sys, "orig_argv", None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    # argv[0] as a path: Python finds its prefix (a venv's) from it.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:  # an optimisation only: go on in this process
    print(f"lut_jax: note: could not restart with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} "
          f"({e}); continuing with glibc's defaults", file=sys.stderr, flush=True)
