"""Encoder export: the online encoder reloads bit-exactly; the timm export matches timm."""

import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from lut_jax import config_lib, errors
from lut_jax.models import variants, vit
from lut_jax.pretrain import train_state
from lut_jax.runtime import checkpointing
from lut_jax.weights import export, loading, sources
from tests import util

STEP = 5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_pretraining_workdir(path: str, method: str = "lut") -> train_state.TrainState:
  """A pre-training work directory (``config.json`` + one Orbax checkpoint) of the tiny
  test model, without running a step. The teacher is shifted away from the online network
  so that exporting the wrong one cannot pass."""
  config = util.tiny_config(method)
  model = vit.build_model(config.model, image_size=config.input.image_size,
                             channels=config.input.channels, use_bc=method == "lut")
  init = functools.partial(train_state.create_train_state, model, optax.sgd(0.1))
  state = jax.jit(init)(jax.random.key(0))  # compiled (and cached): faster than eager
  if state.has_target:
    state = state.replace(target_params=jax.tree.map(lambda x: x + 1.0, state.target_params))
  ckpt = checkpointing.Checkpointer(os.path.join(path, "checkpoints"), async_save=False,
                                    run_config=config_lib.config_json(config))
  ckpt.save(STEP, state, force=True)
  ckpt.close()
  config_lib.save_config(config, path)
  return state


def _assert_bit_exact(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def test_export_reloads_the_online_encoder_bit_exactly(tmp_path):
  workdir = str(tmp_path / "run")
  state = make_pretraining_workdir(workdir)
  online = jax.device_get(state.params["encoder"])

  loaded = loading.load(workdir, encoder_only=True)  # partial restore of params/encoder only
  _assert_bit_exact(online, loaded.params)
  assert str(STEP) in loaded.source

  written = export.export(workdir, str(tmp_path / "enc"), timm_format="npz")
  reloaded = loading.load(written["encoder"])
  encoder, params = reloaded.encoder, reloaded.params
  _assert_bit_exact(online, params)
  teacher = jax.device_get(state.target_params["encoder"])
  assert not np.array_equal(params["blocks_0"]["attn"]["qkv"]["kernel"],
                            teacher["blocks_0"]["attn"]["qkv"]["kernel"])
  assert encoder == vit.Encoder(**json.load(
      open(os.path.join(written["encoder"], sources.ENCODER_CONFIG_FILE))))
  assert (encoder.image_size, encoder.width, encoder.depth) == (util.IMAGE_SIZE, 32, 2)
  # An exported directory is itself a valid `pretrained` source.
  _assert_bit_exact(online, loading.load(written["encoder"], encoder_only=True).params)
  with np.load(written["timm"]) as timm_sd:
    np.testing.assert_array_equal(timm_sd["cls_token"], np.asarray(online["cls_token"]))


def test_a_checkpoint_copied_without_its_workdir_config_still_loads(tmp_path):
  """Every checkpoint step carries the run's config: a work directory that lost its
  config.json (e.g. only checkpoints/ copied) still says what model its steps hold."""
  workdir = tmp_path / "run"
  state = make_pretraining_workdir(str(workdir))
  step_dir = workdir / "checkpoints" / str(STEP)
  assert (step_dir / "config.json").read_text() == (workdir / "config.json").read_text()
  (workdir / "config.json").unlink()
  online = jax.device_get(state.params["encoder"])
  _assert_bit_exact(online, loading.load(str(workdir), encoder_only=True).params)
  loaded = loading.load(str(step_dir), encoder_only=True)
  _assert_bit_exact(online, loaded.params)
  assert (loaded.config["width"], loaded.config["depth"]) == (32, 2)
  # The copy is covered by the step's checksum manifest: a changed byte is caught.
  step_dir.joinpath("config.json").write_text(
      step_dir.joinpath("config.json").read_text().replace("32", "64"))
  with pytest.raises(errors.WorkdirError, match="damaged"):
    loading.load(str(workdir), encoder_only=True)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="work directory of a lut_jax run"):
    loading.load(str(tmp_path), encoder_only=True)
  workdir = str(tmp_path / "run")
  make_pretraining_workdir(workdir, method="mae")
  with pytest.raises(errors.WorkdirError, match="no checkpoint of step 7"):
    loading.load(workdir, step=7, encoder_only=True)


def test_a_step_the_source_cannot_give_is_refused(tmp_path):
  """A checkpoint step asked of an exported encoder, or of a ``checkpoints/<step>`` that is
  another step, would silently evaluate other weights than the ones asked for."""
  workdir = str(tmp_path / "run")
  make_pretraining_workdir(workdir)
  written = export.export(workdir, str(tmp_path / "enc"), timm_format="none")
  assert loading.load(written["encoder"], step=-1, encoder_only=True).step is None
  with pytest.raises(errors.ConfigError, match=f"step {STEP} was asked for.*one set of "):
    loading.load(written["encoder"], step=STEP, encoder_only=True)
  with pytest.raises(errors.ConfigError, match=f"step {STEP} was asked for"):
    export.export(written["encoder"], str(tmp_path / "again"), step=STEP)
  step_dir = os.path.join(workdir, "checkpoints", str(STEP))
  assert loading.load(step_dir, step=STEP, encoder_only=True).step == STEP
  with pytest.raises(errors.ConfigError, match=f"names checkpoint {STEP}"):
    loading.load(step_dir, step=STEP + 1, encoder_only=True)
  # The teacher exists only in a run: asked of an export, it is refused, not replaced.
  with pytest.raises(errors.ConfigError, match="which='target_params'"):
    loading.load(written["encoder"], which="target_params")
  state = make_pretraining_workdir(str(tmp_path / "run2"))
  teacher = loading.load(str(tmp_path / "run2"), which="target_params")
  np.testing.assert_array_equal(teacher.params["cls_token"],
                                np.asarray(state.params["encoder"]["cls_token"]) + 1.0)


def test_a_bfloat16_run_with_cudnn_attention_loads_whole_in_float32(tmp_path):
  """Analysis reads a run as evaluation does: its config in the run's dtype (cuDNN
  attention is refused in float32), the model (decoder included) built in float32."""
  workdir = tmp_path / "run"
  state = make_pretraining_workdir(str(workdir))
  config = config_lib.load_config(str(workdir))
  config.dtype, config.model.attention_impl = "bfloat16", "cudnn"
  config_lib.save_config(config, str(workdir))
  loaded = loading.load(str(workdir))
  assert loaded.has_decoder and loaded.model.dtype == np.float32
  assert loaded.model.attention_impl is None and not loaded.model.remat
  _assert_bit_exact(jax.device_get(state.params), loaded.model_params)
  _assert_bit_exact(jax.device_get(state.params["encoder"]),
                    loading.load(str(workdir), encoder_only=True).params)


# Runs in a fresh interpreter: importing torchvision (which timm does) after TensorFlow
# segfaults with the wheels on these machines, and other tests load TensorFlow.
_TIMM_FORWARD = """
import functools, json, os, sys
import numpy as np, torch
from timm.models import vision_transformer
out = sys.argv[1]
kwargs = json.load(open(os.path.join(out, "timm_kwargs.json")))
vit = vision_transformer.VisionTransformer(
    **kwargs, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()
vit.load_state_dict(torch.load(os.path.join(out, "timm_vit.pth")), strict=True)
images = np.load(os.path.join(out, "images.npy"))
with torch.no_grad():
  tokens = vit.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2))
np.save(os.path.join(out, "timm_tokens.npy"), tokens.numpy())
"""


def test_timm_export_from_cli_matches_timm_vision_transformer(tmp_path):
  pytest.importorskip("torch")
  if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed")
  workdir = str(tmp_path / "run")
  state = make_pretraining_workdir(workdir)
  out = str(tmp_path / "enc")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  result = subprocess.run(
      [sys.executable, "-m", "lut_jax.weights.export", f"--workdir={workdir}",
       f"--out={out}", "--timm=pth"], capture_output=True, text=True, env=env, cwd=REPO,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]

  images = np.random.default_rng(0).normal(
      size=(2, util.IMAGE_SIZE, util.IMAGE_SIZE, 3)).astype(np.float32)
  np.save(os.path.join(out, "images.npy"), images)
  result = subprocess.run([sys.executable, "-c", _TIMM_FORWARD, out], capture_output=True,
                          text=True, env=env, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr[-3000:]  # includes load_state_dict(strict)

  reloaded = loading.load(out)
  encoder, params = reloaded.encoder, reloaded.params
  ours = np.asarray(jax.jit(encoder.apply)({"params": params}, images))
  theirs = np.load(os.path.join(out, "timm_tokens.npy"))
  np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-5)
  _assert_bit_exact(jax.device_get(state.params["encoder"]), params)


# The default export, with torch made unimportable: the timm folder needs no torch.
_EXPORT_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now fails
from lut_jax.weights import export
written = export.export(sys.argv[1], sys.argv[2])
print(written["timm"])
"""


def test_default_export_is_a_timm_folder_that_timm_loads_strictly(tmp_path):
  timm = pytest.importorskip("timm")
  torch = pytest.importorskip("torch")
  workdir = str(tmp_path / "run")
  state = make_pretraining_workdir(workdir)
  out = str(tmp_path / "enc")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  result = subprocess.run([sys.executable, "-c", _EXPORT_WITHOUT_TORCH, workdir, out],
                          capture_output=True, text=True, env=env, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == os.path.join(out, "model.safetensors")

  config = json.load(open(os.path.join(out, "config.json")))
  assert timm.is_model(config["architecture"]) and config["num_classes"] == 0
  assert config["model_args"]["embed_dim"] == 32 and config["model_args"]["img_size"] == 16
  vit = timm.create_model("local-dir:" + out, pretrained=True).eval()
  # create_model loads strictly; checked here once more, key by key.
  from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top
  weights = safetensors_torch.load_file(os.path.join(out, "model.safetensors"))
  assert all(w.dtype == torch.float32 for w in weights.values())
  incompatible = vit.load_state_dict(weights, strict=True)
  assert not incompatible.missing_keys and not incompatible.unexpected_keys

  images = np.random.default_rng(0).normal(
      size=(3, util.IMAGE_SIZE, util.IMAGE_SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    theirs, pooled = vit.forward_features(batch).numpy(), vit(batch).numpy()
  online = jax.device_get(state.params["encoder"])
  from lut_jax.models.vit import Encoder  # pylint: disable=g-import-not-at-top (vit: timm's)
  encoder = Encoder(**json.load(open(os.path.join(out, "encoder_config.json"))))
  ours = np.asarray(jax.jit(encoder.apply)({"params": online}, images))
  assert np.max(np.abs(ours - theirs)) < 1e-4
  np.testing.assert_allclose(pooled, ours[:, 0], atol=1e-4)  # forward(): the cls feature
  # The folder alone (no Orbax copy beside it) is also a `pretrained` source.
  folder = tmp_path / "timm_only"
  folder.mkdir()
  for name in ("model.safetensors", "config.json"):
    (folder / name).write_bytes(open(os.path.join(out, name), "rb").read())
  loaded = loading.load(str(folder), encoder_only=True)
  assert loaded.kind == "timm" and loaded.config == json.load(
      open(os.path.join(out, "encoder_config.json")))
  _assert_bit_exact(online, loaded.params)


def test_export_of_weights_made_elsewhere_needs_an_output_directory(tmp_path):
  encoder = vit.Encoder(util.IMAGE_SIZE, 4, 32, 2, 2)
  params = jax.jit(encoder.init)(jax.random.key(0),
                                 np.zeros((1, util.IMAGE_SIZE, util.IMAGE_SIZE, 3)))["params"]
  config = {"image_size": util.IMAGE_SIZE, "patch_size": 4, "width": 32, "depth": 2,
            "num_heads": 2, "mlp_ratio": 4.0}
  export.write_timm_folder(str(tmp_path / "timm"), jax.device_get(params),
                           variants.EncoderConfig(**config))
  with pytest.raises(errors.UserError, match="no default output directory"):
    export.export(str(tmp_path / "timm"))
  # Converted into our format: the Orbax copy holds the same weights.
  written = export.export(str(tmp_path / "timm"), str(tmp_path / "ours"), timm_format="none")
  assert set(written) == {"encoder"}
  reloaded = loading.load(written["encoder"]).params
  _assert_bit_exact(jax.device_get(params), reloaded)


def test_hub_push_uploads_the_timm_folder_that_hf_hub_reads_back(tmp_path, monkeypatch):
  """``lut-export --hub_repo`` uploads model.safetensors + config.json only; reading the
  repository back as ``hf-hub:org/name`` gives the exported encoder bit-exactly. The Hub is
  a local stand-in for ``HfApi`` and ``hf_hub_download`` (no network)."""
  huggingface_hub = pytest.importorskip("huggingface_hub")
  hub = tmp_path / "hub"
  calls = []

  class FakeApi:
    def create_repo(self, repo_id, *, private, exist_ok):
      calls.append(("create", repo_id, private, exist_ok))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, commit_message):
      del commit_message
      calls.append(("upload", repo_id))
      for name in os.listdir(folder_path):
        if name in allow_patterns:
          (hub / repo_id).mkdir(parents=True, exist_ok=True)
          (hub / repo_id / name).write_bytes(open(os.path.join(folder_path, name), "rb").read())

  monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
  monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                      lambda repo_id, filename, **_: str(hub / repo_id / filename))
  workdir = str(tmp_path / "run")
  state = make_pretraining_workdir(workdir)
  written = export.export(workdir, str(tmp_path / "out"))
  name = export.push_to_hub(os.path.dirname(written["timm"]), "org/tiny")
  assert name == "hf-hub:org/tiny"
  assert calls == [("create", "org/tiny", True, True), ("upload", "org/tiny")]
  assert sorted(os.listdir(hub / "org" / "tiny")) == ["config.json", "model.safetensors"]
  loaded = loading.load(name, encoder_only=True)
  _assert_bit_exact(jax.device_get(state.params["encoder"]), loaded.params)
  with pytest.raises(errors.UserError, match="no timm folder"):
    export.push_to_hub(written["encoder"] + "/params", "org/tiny")


def test_hub_push_without_network_is_one_line_and_keeps_the_local_export(tmp_path):
  """``lut-export --hub_repo`` where the Hub cannot be reached: the local export is written
  and printed, then one line names the failed upload and where the export is; status 2."""
  pytest.importorskip("huggingface_hub")
  workdir = str(tmp_path / "run")
  make_pretraining_workdir(workdir)
  out = str(tmp_path / "enc")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "HF_TOKEN": "hf_test"}
  for name in ("HF_HUB_OFFLINE", "LUT_JAX_DEBUG"):
    env.pop(name, None)
  with socket.socket() as hub:  # bound, never listening: every connection is refused
    hub.bind(("127.0.0.1", 0))
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{hub.getsockname()[1]}"
    result = subprocess.run(
        [sys.executable, "-m", "lut_jax.weights.export", f"--workdir={workdir}",
         f"--out={out}", "--hub_repo=org/tiny"], capture_output=True, text=True, env=env,
        cwd=REPO, check=False, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("lut-export: error: uploading to the Hugging Face Hub (org/tiny) "
                         "failed: the Hub is unreachable"), line
  assert f"the local export is complete in {out}" in line, line
  assert f"timm: {out}/model.safetensors" in result.stdout
  assert sorted(os.listdir(out)) == ["config.json", "encoder_config.json",
                                     "model.safetensors", "params"]


def test_hub_push_failures_of_the_network_are_user_errors_and_bugs_are_not(tmp_path,
                                                                           monkeypatch):
  huggingface_hub = pytest.importorskip("huggingface_hub")
  requests = pytest.importorskip("requests")
  for name in ("model.safetensors", "config.json"):
    (tmp_path / name).write_text("{}")
  failure = []

  class FailingApi:
    def create_repo(self, repo_id, **_):
      del repo_id

    def upload_folder(self, **_):
      raise failure[0]

  monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
  failure[:] = [requests.exceptions.ConnectionError("Max retries exceeded")]
  with pytest.raises(errors.UserError, match=r"\(org/tiny\) failed: the Hub is unreachable .*"
                                             r"ConnectionError: Max retries exceeded; the "
                                             f"local export is complete in {tmp_path}"):
    export.push_to_hub(str(tmp_path), "org/tiny")
  failure[:] = [KeyError("a bug")]
  with pytest.raises(KeyError):
    export.push_to_hub(str(tmp_path), "org/tiny")
