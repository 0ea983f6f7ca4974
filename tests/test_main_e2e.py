"""End to end through the CLI on Fashion-MNIST: kill, restart, same losses as one run."""

import glob
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lut_jax.data import datasets
from tests import util

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.input.batch_size=16", "--config.total_steps=6", "--config.optim.warmup_steps=1",
        "--config.monitor.every_steps=0",
        "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
        "--config.image_summary_every_steps=3", "--config.model.decoder_width=32",
        "--config.model.decoder_depth=1", "--config.model.decoder_num_heads=2",
        "--config.model.head_hidden_dim=64"]


def _command(workdir, *extra):
  return [sys.executable, "-m", "lut_jax.cli.pretrain",
          "--config=configs/fashion_mnist.py:variant=mu/4", f"--workdir={workdir}", *TINY, *extra]


def _env():
  return util.one_device_env()


def _losses(workdir) -> dict[int, float]:
  """Per-step ``train/loss`` scalars from every TensorBoard event file in ``workdir``."""
  import tensorflow as tf  # the CLU writers already need it
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "train/loss":
          out[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def _fashion_mnist_available() -> bool:
  try:
    datasets.get_source("fashion_mnist", "train")
  except Exception:  # noqa: BLE001 - any failure means "not here"
    return False
  return True


@pytest.mark.skipif(not _fashion_mnist_available(), reason="Fashion-MNIST not installed")
def test_kill_and_restart_matches_uninterrupted(tmp_path):
  full, cut = tmp_path / "full", tmp_path / "cut"
  subprocess.run(_command(full), cwd=ROOT, env=_env(), check=True, capture_output=True,
                 timeout=600)
  # Hard-kill the second run once its step-2 checkpoint is complete, then rerun it.
  proc = subprocess.Popen(_command(cut), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not (cut / "checkpoints" / "2").is_dir() and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  result = subprocess.run(_command(cut), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming from" in result.stderr

  want, got = _losses(full), _losses(cut)
  assert sorted(want) == list(range(1, 7))
  assert set(got) == set(want)
  for step in want:  # the same data, keys and state: identical numbers on CPU
    assert got[step] == want[step], (step, got[step], want[step])
  assert (full / "config.json").is_file()
  assert sorted(os.listdir(full / "checkpoints"))[-1] == "6"
  assert np.isfinite(list(want.values())).all()


def test_bad_config_is_one_line(tmp_path):
  result = subprocess.run(_command(tmp_path, "--config.loss.mask_ratio=0.3"), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("lut_jax: error: mask_ratio must be")
  assert "Traceback" not in result.stderr


def test_missing_dataset_is_one_line(tmp_path):
  result = subprocess.run(
      _command(tmp_path, "--config.input.dataset=folder:/nonexistent/images"), cwd=ROOT,
      env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("lut_jax: error:") and "/nonexistent/images" in last
