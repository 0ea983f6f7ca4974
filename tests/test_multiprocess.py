"""Two CPU processes on localhost (jax.distributed + gloo) reproduce one process."""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np

from tests import util

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(num_processes: int, out: pathlib.Path) -> dict:
  port = _free_port()
  env = util.one_device_env(PYTHONPATH=str(ROOT))
  # Logs go to files, not pipes: waiting on one process's pipe while the other fills its
  # own (XLA's slow-compile banners on a loaded machine) would block that process and fail
  # the shutdown barrier of both.
  log_paths = [out.with_name(f"{out.stem}_{i}.log") for i in range(num_processes)]
  procs = []
  for i, log_path in enumerate(log_paths):
    with open(log_path, "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "tests.multiprocess_worker", str(i), str(num_processes),
           str(port), str(out), str(STEPS)],
          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
  for p, log_path in zip(procs, log_paths):
    p.wait(timeout=600)
  for p, log_path in zip(procs, log_paths):
    assert p.returncode == 0, log_path.read_text()[-3000:]
  return json.loads(out.read_text())


def test_two_processes_match_one(tmp_path):
  single = _run(1, tmp_path / "single.json")
  multi = _run(2, tmp_path / "multi.json")
  assert single["devices"] == 2 and multi["devices"] == 4  # 2 fake CPU devices per process
  for step, (a, b) in enumerate(zip(single["losses"], multi["losses"])):
    for key in ("loss", "rec_loss", "bc_loss", "grad_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=f"step {step} {key}")
  np.testing.assert_allclose(single["cls_token"], multi["cls_token"], rtol=1e-4, atol=1e-6)
