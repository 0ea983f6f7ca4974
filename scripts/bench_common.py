"""Helpers shared by the benchmark scripts: machine description, config overrides and
pinned child processes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from typing import Any, Iterable, Optional, Sequence

from lut_jax import config_lib


def cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo where there is one)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def minor_page_faults() -> int:
  """This process's minor page faults so far (0 where the system does not count them)."""
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # Windows
    return 0
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median(values: Sequence[float]) -> float:
  """The middle value (the upper one of an even count): the benchmarks' one summary of their
  timed windows, robust to a window with a one-off cost."""
  return sorted(values)[len(values) // 2]


def record_windows(rec: dict[str, Any], wall_s: Sequence[float], cpu_ms_per_step: Sequence[float],
                   faults_per_step: Sequence[float], *, steps: int, batch: int) -> float:
  """Records the timed windows of ``steps`` steps each in ``rec``, the same fields for both
  frameworks: per window (wall and CPU ms per step, minor faults per step), their medians
  (one window may pay a one-off cost the steady state does not, such as the heap growing),
  and the fastest window (on a shared machine other load only ever adds time). Returns the
  median seconds per step."""
  step_s, best_s = median(wall_s) / steps, min(wall_s) / steps
  rec["window_cpu_ms_per_step"] = list(cpu_ms_per_step)
  rec["window_minor_faults_per_step"] = list(faults_per_step)
  rec["cpu_ms_per_step"] = median(cpu_ms_per_step)
  rec["minor_faults_per_step"] = sum(faults_per_step) / len(faults_per_step)
  rec["window_ms_per_step"] = [w / steps * 1e3 for w in wall_s]
  rec["ms_per_step"] = step_s * 1e3
  rec["images_per_s"] = batch / step_s
  rec["best_ms_per_step"] = best_s * 1e3
  rec["best_images_per_s"] = batch / best_s
  return step_s


def apply_overrides(config, items: Iterable[str]):
  """Applies ``key.sub=value`` strings to an (unlocked) ConfigDict, like ``--config.x=y``;
  an unknown key raises ``ValueError`` (config_lib.override)."""
  return config_lib.override(config, config_lib.parse_overrides(items))


def finish(results: dict[str, Any], loadavg_start: float, json_path: Optional[str]) -> None:
  """Records the end load average, prints both, and writes ``results`` as JSON if asked."""
  results["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
  print(f"load average (1 min): {loadavg_start:.2f} at start, "
        f"{results['machine']['loadavg_1m_end']:.2f} at end")
  if json_path:
    with open(json_path, "w") as f:
      json.dump(results, f, indent=1)


def run_pinned_child(cmd: Sequence[str], cores: Sequence[int], n: int,
                     label: str) -> Optional[dict[str, Any]]:
  """Runs ``cmd`` pinned to the first ``n`` of ``cores`` and returns the JSON of its last
  ``RESULT {...}`` line, with ``"cores": n`` added; ``None`` (after printing the child's
  stderr) when it failed. Pinning happens before the child starts, so TensorFlow's and
  XLA's thread pools size themselves to ``n`` cores."""
  pin = lambda: os.sched_setaffinity(0, cores[:n])  # noqa: E731
  proc = subprocess.run(list(cmd), capture_output=True, text=True, preexec_fn=pin,
                        check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]  # noqa: E741
  if proc.returncode or not lines:
    print(f"{label} on {n} cores failed:\n{proc.stderr[-3000:]}")
    return None
  result = json.loads(lines[-1][len("RESULT "):])
  result["cores"] = n
  return result
