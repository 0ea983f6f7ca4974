"""Bad input to ``lut-analyze`` and ``lut-export`` ends as one line, status 2, no traceback.

Each test runs the real command line in a fresh interpreter, on input that fails before
any model runs, so that what the user sees (stderr, exit status) is what is checked.
"""

import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from lut_jax.models import vit
from lut_jax.weights import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYZE = ("lut_jax.cli.analyze", "lut-analyze")
EXPORT = ("lut_jax.weights.export", "lut-export")


def _run(tool, *args, cwd=None):
  module, _ = tool
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  env.pop("LUT_JAX_DEBUG", None)
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                        text=True, env=env, cwd=cwd or REPO, timeout=120, check=False)


def _error_line(tool, result) -> str:
  """The ``PROG: error:`` line, after checking the status and that it ends stderr  and that no traceback was printed."""
  _, prog = tool
  stderr = result.stderr
  assert result.returncode == 2, f"status {result.returncode}\n{stderr[-3000:]}"
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert lines, "nothing on stderr"
  assert lines[-1].startswith(f"{prog}: error:"), stderr[-3000:]
  return lines[-1]


def _torch():
  return pytest.importorskip("torch")


def _timm_state_dict(width=32, depth=2, image_size=16, patch_size=4):
  """A timm-named encoder state_dict (numpy) of a tiny ViT with the fixed pos_embed."""
  encoder = vit.Encoder(image_size, patch_size, width, depth, 2)
  params = jax.eval_shape(encoder.init, jax.random.key(0),
                          np.zeros((1, image_size, image_size, 3), np.float32))["params"]
  params = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), params)
  return convert.encoder_to_timm_state_dict(params, image_size=image_size)


# ----------------------------------------------------------------------------- lut-analyze


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_pth(tmp_path, zip_format):
  torch = _torch()
  full = tmp_path / "full.pth"
  torch.save(convert.torch_tensors(_timm_state_dict()), full,
             _use_new_zipfile_serialization=zip_format)
  data = full.read_bytes()
  (tmp_path / "x.pth").write_bytes(data[:len(data) // 2])
  line = _error_line(ANALYZE, _run(ANALYZE, "--checkpoint", "x.pth", "--out", "out",
                                   cwd=tmp_path))
  assert "x.pth: not a PyTorch checkpoint (truncated or corrupt" in line, line


class _Payload:
  """Unpickling it calls ``function(*args)``: what a malicious checkpoint does."""

  def __init__(self, function, *args):
    self.call = (function, args)

  def __reduce__(self):
    return self.call


@pytest.mark.parametrize("writer,payload,named", [
    ("torch.save", "open", "io.open"),  # a GLOBAL outside the allow-list
    ("torch.save", "os.system", f"{os.name}.system"),  # a module torch blocks outright
    # torch's legacy (non-zip) format: refused at the first unsafe GLOBAL, the tensors'
    ("pickle protocol 2", "open", "torch.storage._load_from_bytes"),
    # pickle's default protocol, which torch's reader stops at before any GLOBAL
    ("pickle.dump", "os.system", f"{os.name}.system"),
])
def test_pth_with_a_pickled_payload_is_refused_without_running_it(tmp_path, writer, payload,
                                                                  named):
  torch = _torch()
  touched = tmp_path / "touched"
  call = ((open, str(touched), "w") if payload == "open" else
          (os.system, f"touch {touched}"))
  checkpoint = {"model": convert.torch_tensors(_timm_state_dict()), "x": _Payload(*call)}
  with open(tmp_path / "x.pth", "wb") as f:
    if writer == "torch.save":
      torch.save(checkpoint, f)
    else:
      pickle.dump(checkpoint, f, **({"protocol": 2} if writer.endswith("2") else {}))
  line = _error_line(ANALYZE, _run(ANALYZE, "--checkpoint", "x.pth", "--out", "out",
                                   cwd=tmp_path))
  assert not touched.exists()
  assert (f"x.pth: holds Python objects that are not plain tensors (e.g. {named}); they "
          "will not be unpickled") in line, line
  # No advice to lower the protection (torch's own message suggests weights_only=False).
  assert "weights_only" not in line and "safe_globals" not in line, line


def test_text_file_named_pth(tmp_path):
  # torch.load's legacy reader fails on it with a bare KeyError ("error: 101").
  (tmp_path / "notes.pth").write_text("hello\n")
  line = _error_line(ANALYZE, _run(ANALYZE, "--checkpoint", "notes.pth", "--out", "out",
                                   cwd=tmp_path))
  assert "notes.pth: not a PyTorch checkpoint (truncated or corrupt" in line, line


def test_bare_tensor_pth(tmp_path):
  torch = _torch()
  torch.save(torch.zeros(3), tmp_path / "x.pth")
  line = _error_line(ANALYZE, _run(ANALYZE, "--checkpoint", "x.pth", "--out", "out",
                                   cwd=tmp_path))
  assert "x.pth holds a Tensor, not a state_dict" in line, line


def test_pth_without_a_vit(tmp_path):
  torch = _torch()
  torch.save({"fc.weight": torch.zeros(2, 3)}, tmp_path / "x.pth")
  line = _error_line(ANALYZE, _run(ANALYZE, "--checkpoint", "x.pth", "--out", "out",
                                   cwd=tmp_path))
  assert "x.pth" in line and "not a ViT checkpoint" in line, line


def test_missing_torch_key(tmp_path):
  torch = _torch()
  torch.save({"model": convert.torch_tensors(_timm_state_dict())}, tmp_path / "x.pth")
  line = _error_line(ANALYZE, _run(ANALYZE, "--checkpoint", "x.pth", "--torch_key",
                                   "model_ema", "--out", "out", cwd=tmp_path))
  assert "x.pth has no entry 'model_ema'" in line and "'model'" in line, line


def test_width_of_no_standard_size_names_the_flag(tmp_path):
  torch = _torch()
  torch.save(convert.torch_tensors(_timm_state_dict(width=48)), tmp_path / "x.pth")
  result = _run(ANALYZE, "--checkpoint", "x.pth", "--out", "out", cwd=tmp_path)
  line = _error_line(ANALYZE, result)
  assert "x.pth" in line and "width 48" in line, line
  assert "--num_heads" in result.stderr, result.stderr[-2000:]


def test_learned_pos_embed_is_refused_with_advice_the_cli_can_follow(tmp_path):
  torch = _torch()
  state_dict = _timm_state_dict()
  # A standard timm ViT learns its position embedding: anything but our sin-cos table.
  state_dict["pos_embed"] = np.random.default_rng(0).normal(
      size=state_dict["pos_embed"].shape).astype(np.float32)
  torch.save(convert.torch_tensors(state_dict), tmp_path / "vit.pth")
  result = _run(ANALYZE, "--checkpoint", "vit.pth", "--out", "out", cwd=tmp_path)
  line = _error_line(ANALYZE, result)
  assert "vit.pth" in line and "learned position embedding" in line, line
  assert "check_pos_embed" not in result.stderr, result.stderr[-2000:]


def test_missing_checkpoint_path(tmp_path):
  line = _error_line(ANALYZE, _run(ANALYZE, "--checkpoint", "runs/nothing", "--out", "out",
                                   cwd=tmp_path))
  assert "runs/nothing" in line, line


# ----------------------------------------------------------------------------- lut-export


def test_export_of_a_missing_workdir(tmp_path):
  missing = str(tmp_path / "nonexistent")
  line = _error_line(EXPORT, _run(EXPORT, f"--workdir={missing}", "--timm=none"))
  assert missing in line, line


def test_export_of_a_directory_that_is_not_a_run(tmp_path):
  line = _error_line(EXPORT, _run(EXPORT, f"--workdir={tmp_path}", "--timm=none"))
  assert str(tmp_path) in line and "config.json" in line, line


def _fake_run(tmp_path):
  """Enough of a pre-training workdir to pass the up-front checks (nothing is restored:
  the output directory is checked before the checkpoint is read)."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(
      {"model": {"variant": "mu/4"}, "input": {"image_size": 16}}))
  return str(workdir)


def test_export_of_a_foreign_config(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"lr": 0.1}))
  line = _error_line(EXPORT, _run(EXPORT, f"--workdir={workdir}", "--timm=none"))
  assert str(workdir / "config.json") in line and "model.variant" in line, line


def test_export_into_a_file(tmp_path):
  workdir = _fake_run(tmp_path)
  out = tmp_path / "encoder.txt"
  out.write_text("in the way")
  line = _error_line(EXPORT, _run(EXPORT, f"--workdir={workdir}", f"--out={out}"))
  assert str(out) in line and "not a directory" in line, line


def test_export_below_a_file(tmp_path):
  workdir = _fake_run(tmp_path)
  (tmp_path / "file").write_text("in the way")
  out = tmp_path / "file" / "encoder"
  line = _error_line(EXPORT, _run(EXPORT, f"--workdir={workdir}", f"--out={out}"))
  assert str(tmp_path / "file") in line and "not a directory" in line, line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes through directory permissions")
def test_export_into_a_read_only_directory(tmp_path):
  workdir = _fake_run(tmp_path)
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    line = _error_line(EXPORT, _run(EXPORT, f"--workdir={workdir}",
                                    f"--out={locked / 'encoder'}"))
  finally:
    locked.chmod(0o700)
  assert str(locked) in line and "not writable" in line, line


def test_unwritable_output_dir_is_a_user_error(tmp_path, monkeypatch):
  # In-process twin of the test above, for root (whom permissions do not stop): the check
  # asks os.access, which is what a read-only directory answers to.
  from lut_jax import errors  # pylint: disable=g-import-not-at-top
  from lut_jax.weights import export  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(export.os, "access", lambda path, mode: False)
  with pytest.raises(errors.UserError, match="not writable"):
    export.check_output_dir(str(tmp_path / "encoder"))
