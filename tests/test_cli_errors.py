"""Adversarial use of the command lines: every mistake a user can make is one line.

Each case runs the real CLI in a subprocess and asserts the promised form: exit status 2,
the last stderr line ``<prog>: error: ...[; hint: ...]`` naming the problem, no traceback,
and nothing written where the input was refused early.
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import pytest

from lut_jax import errors
from lut_jax.runtime import checkpointing
from tests import util

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.input.batch_size=16", "--config.total_steps=4", "--config.optim.warmup_steps=1",
        "--config.monitor.every_steps=0",
        "--config.log_every_steps=1", "--config.checkpoint_every_steps=1",
        "--config.image_summary_every_steps=100", "--config.model.decoder_width=32",
        "--config.model.decoder_depth=1", "--config.model.decoder_num_heads=2",
        "--config.model.head_hidden_dim=64"]


def _run(module, *args, timeout=300):
  env = util.one_device_env()
  env.pop("LUT_JAX_DEBUG", None)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _pretrain(workdir, *extra, **kwargs):
  return _run("lut_jax.cli.pretrain", "--config=configs/fashion_mnist.py:variant=mu/4",
              f"--workdir={workdir}", *TINY, *extra, **kwargs)


def _error_line(result, prog="lut_jax"):
  """The ``prog: error:`` line, after checking the one-line form of the failure."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [l for l in result.stderr.strip().splitlines() if l.strip()]  # noqa: E741
  assert lines[-1].startswith(f"{prog}: error: "), lines[-5:]
  return lines[-1]


@pytest.mark.parametrize("args,expected", [
    (["--config.optim.bse_lr=1"], "base_lr"),  # misspelt key: names the right one
    (["--config.input.image_sise=32"], "image_size"),
    (["--config.optim.base_lr=-1"], "optim.base_lr must be > 0"),
    (["--config.optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0"),
    (["--config.optim.b1=1.0"], "optim.b1 must be in [0, 1)"),
    (["--config.ema.momentum=1.5"], "ema.momentum must be in [0, 1]"),
    (["--config.input.image_size=8"], "image_size"),
    (["--config.input.view2_ops=blur,sharpen"], "input.view2_ops"),
    (["--config.loss.mask_ratio=0.3"], "mask_ratio"),
    (["--config.model.head_bn_group_size=5"], "head_bn_group_size must be 0 or divide"),
    (["--config.optim.warmup_steps=10"], "optim.warmup_steps"),
    (["--config.input.dataset=no_such_dataset_xyz"], "no_such_dataset_xyz"),
    (["--config.input.split=no_such_split"], "no_such_split"),
    (["--config.input.dataset=folder:/nonexistent/images"], "/nonexistent/images"),
])
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, args, expected):
  workdir = tmp_path / "run"
  line = _error_line(_pretrain(workdir, *args))
  assert expected in line
  assert not workdir.exists()  # refused before anything was written


def test_a_store_orbax_cannot_write_is_one_line_and_writes_nothing():
  """Only local paths and gs:// hold runs: an s3:// workdir is refused before the lock, not
  a file-system traceback or checkpoints in a local folder named "s3:"."""
  line = _error_line(_pretrain("s3://bucket/run"))
  assert "s3://bucket/run" in line and "gs://" in line
  assert not (ROOT / "s3:").exists()
  with pytest.raises(errors.WorkdirError, match="not this scheme"):
    checkpointing.Checkpointer("https://host/run/checkpoints")
  checkpointing.check_store("gs://bucket/run")  # the supported store passes


def test_bad_config_file_argument_is_one_line(tmp_path):
  result = _run("lut_jax.cli.pretrain", "--config=configs/fashion_mnist.py:varant=mu/4",
                f"--workdir={tmp_path}")
  assert "varant=mu/4" in _error_line(result)


def test_missing_config_file_is_one_line(tmp_path):
  result = _run("lut_jax.cli.pretrain", "--config=configs/no_such_file.py", f"--workdir={tmp_path}")
  assert "no_such_file.py" in _error_line(result)


# Config files that fail to load: what each one raises, as the one line names it.
_BROKEN_CONFIGS = {
    "raises": ("def get_config(arg=None):\n  raise RuntimeError('no preset for this host')\n",
               "RuntimeError: no preset for this host"),
    "name_error": ("def get_config(arg=None):\n  return undefined_name\n",
                   "NameError: name 'undefined_name' is not defined"),
    "value_error": ("def get_config(arg=None):\n  raise ValueError('bad preset')\n",
                    "ValueError: bad preset"),
    "syntax_error": ("def get_config(:\n  pass\n", "SyntaxError: invalid syntax"),
    "import_error": ("import no_such_module_xyz\n", "ModuleNotFoundError: No module named "
                     "'no_such_module_xyz'"),
    "missing": (None, "FileNotFoundError: no such file"),
}


@pytest.mark.parametrize("module,prog,kind", [
    *[("lut_jax.cli.pretrain", "lut_jax", kind) for kind in sorted(_BROKEN_CONFIGS)],
    ("lut_jax.cli.evaluate", "lut-eval", "name_error"),
    ("lut_jax.cli.evaluate", "lut-eval", "missing"),
])
def test_a_config_file_that_fails_to_load_is_one_line(tmp_path, module, prog, kind):
  source, expected = _BROKEN_CONFIGS[kind]
  config = tmp_path / "my_config.py"
  if source is not None:
    config.write_text(source)
  result = _run(module, f"--config={config}:arg", f"--workdir={tmp_path / 'run'}")
  line = _error_line(result, prog)
  assert line.startswith(f"{prog}: error: --config {config}: {expected}"), line
  assert not (tmp_path / "run").exists()


def test_a_broken_config_file_keeps_its_traceback_with_debug(tmp_path):
  config = tmp_path / "my_config.py"
  config.write_text(_BROKEN_CONFIGS["name_error"][0])
  result = _run("lut_jax.cli.pretrain", f"--config={config}", f"--workdir={tmp_path}", "--debug")
  assert result.returncode == 2
  assert f'File "{config}", line 2, in get_config' in result.stderr  # the user's own line
  assert result.stderr.strip().splitlines()[-1].startswith(f"lut_jax: error: --config {config}")


@pytest.mark.parametrize("flag", ["--num_processes=2", "--process_id=1"])
def test_process_flags_without_a_coordinator_are_refused(tmp_path, flag):
  # Ignored, they would have each of N launched copies train alone on all the data.
  line = _error_line(_pretrain(tmp_path / "run", flag))
  assert flag.split("=")[0] in line and "--coordinator_address" in line
  assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("not a directory")
  assert "is a file" in _error_line(_pretrain(path))
  assert path.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_workdir(tmp_path):
  tmp_path.chmod(0o500)
  try:
    assert "permission denied" in _error_line(_pretrain(tmp_path / "run"))
  finally:
    tmp_path.chmod(0o700)


def test_empty_image_folder(tmp_path):
  (tmp_path / "images" / "cls").mkdir(parents=True)
  line = _error_line(_pretrain(tmp_path / "run",
                               f"--config.input.dataset=folder:{tmp_path / 'images'}"))
  assert "images" in line


def test_workdir_in_use_by_a_live_run(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    (workdir / "lut_jax.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": other.pid, "command": "lut-pretrain other",
         "started": "now"}))
    line = _error_line(_pretrain(workdir))
    assert "in use by another run" in line and str(other.pid) in line
    assert not (workdir / "checkpoints").exists()
  finally:
    other.kill()
    other.wait()


@pytest.fixture
def small_file_system(tmp_path):
  """``mount(size)``: a fresh tmpfs of that size (e.g. ``"2600k"``); skips the test where
  mounting is not allowed (not root, a container without the capability)."""
  mounted = []

  def mount(size):
    path = tmp_path / f"fs{len(mounted)}"
    path.mkdir()
    if shutil.which("mount") is None:
      pytest.skip("no mount command")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                            capture_output=True, text=True, check=False)
    if result.returncode:
      pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    mounted.append(path)
    return path

  yield mount
  for path in mounted:
    subprocess.run(["umount", path], check=False)


def test_a_full_disk_at_a_save_is_one_line_and_the_rerun_resumes(small_file_system):
  # The reproduction: a file system that holds two checkpoint steps of this model (1.1 MB
  # each) but not a third.
  fs = small_file_system("2600k")
  workdir = fs / "run"
  result = _pretrain(workdir, timeout=600)
  line = _error_line(result)
  # Not one of the errors Orbax logs from each of its threads (TensorFlow may still warn
  # that it could not flush the TensorBoard events file).
  assert "RESOURCE_EXHAUSTED: Error writing" not in result.stderr, result.stderr[-3000:]
  found = re.search(rf"saving checkpoint step (\d+) in {workdir}/checkpoints failed: no space "
                    r"left on device \((\d+\.\d) MB free\).* last saved step \((\d+)\)", line)
  assert found, line
  failed, last_good = int(found.group(1)), int(found.group(3))
  assert failed == last_good + 1 and last_good >= 1
  names = os.listdir(workdir / "checkpoints")
  assert sorted(names) == [str(s) for s in range(1, last_good + 1)], names  # no partial save

  subprocess.run(["mount", "-o", "remount,size=64m", fs], check=True)  # space freed
  result = _pretrain(workdir, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resuming from {workdir}/checkpoints step {last_good}" in result.stderr
  assert "4" in os.listdir(workdir / "checkpoints")


def test_diverging_run_stops_with_one_line_and_keeps_good_checkpoints(tmp_path):
  workdir = tmp_path / "run"
  line = _error_line(_pretrain(workdir, "--config.optim.base_lr=1e6", "--config.total_steps=12",
                               timeout=600))
  assert "NaN or infinite" in line and "Last good checkpoint: step" in line
  good = int(line.split("Last good checkpoint: step ")[1].split()[0])
  steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
  assert steps and max(steps) == good


def test_checkpoints_without_config_and_damaged_beyond_repair(tmp_path):
  workdir = tmp_path / "run"
  assert _pretrain(workdir, "--config.total_steps=2").returncode == 0
  (workdir / "config.json").rename(workdir / "config.json.bak")
  assert "--adopt_checkpoint" in _pretrain(workdir, "--config.total_steps=2").stderr
  (workdir / "config.json.bak").rename(workdir / "config.json")
  for step in ("1", "2"):
    for dirpath, _, files in os.walk(workdir / "checkpoints" / step):
      for name in files:
        if name not in ("sha256.json", "commit_success.txt", "_CHECKPOINT_METADATA"):
          open(os.path.join(dirpath, name), "wb").close()  # emptied: unreadable
  line = _error_line(_pretrain(workdir, "--config.total_steps=2"))
  assert "no checkpoint" in line and "restores" in line


def test_resume_with_a_changed_optimizer_is_one_line(tmp_path):
  workdir = tmp_path / "run"
  assert _pretrain(workdir, "--config.total_steps=2").returncode == 0
  line = _error_line(_pretrain(workdir, "--config.total_steps=2",
                               "--config.optim.grad_clip_norm=1.0"))
  assert "optim.grad_clip_norm: 0.0 -> 1.0" in line


def test_eval_of_a_missing_pretrained_run(tmp_path):
  result = _run("lut_jax.cli.evaluate", "--config=configs/knn.py", f"--workdir={tmp_path / 'e'}",
                f"--config.pretrained={tmp_path / 'nothing_here'}")
  assert "nothing_here" in _error_line(result, "lut-eval")


def test_debug_flag_shows_the_traceback(tmp_path):
  result = _pretrain(tmp_path / "run", "--config.optim.base_lr=-1", "--debug")
  assert result.returncode == 2
  assert "Traceback" in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("lut_jax: error:")
