"""Analysis tools: attention distance, spectrum, maps, loading and the analyze CLI."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from lut_jax import errors, metrics
from lut_jax.analysis import attention_distance, maps, spectrum
from lut_jax.cli import analyze as analyze_cli
from lut_jax.models import variants, vit
from lut_jax.pretrain import train_state
from lut_jax.runtime import checkpointing, optim
from lut_jax.weights import loading, sources
from tests import util

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_attention_distance_of_hand_built_attention():
  # A 2x2 grid of 4-pixel patches: centres (2,2), (2,6), (6,2), (6,6); neighbours are 4 px
  # apart, diagonals 4*sqrt(2).
  probs = np.zeros((1, 3, 5, 5), np.float32)
  probs[0, 0] = 0.2  # uniform over cls + 4 patches -> 1/4 per patch after renormalising
  probs[0, 1, :, 0] = 0.5  # half on cls, half on itself: distance 0 once cls is dropped
  probs[0, 1, np.arange(1, 5), np.arange(1, 5)] = 0.5
  probs[0, 2, 1:, 1:] = np.eye(4)[::-1]  # every patch looks at the opposite corner
  probs[0, 2, 0, 0] = 1.0
  got = attention_distance.mean_attention_distance(probs, patch_size=4)
  np.testing.assert_allclose(got, [(4 + 4 + 4 * np.sqrt(2)) / 4, 0.0, 4 * np.sqrt(2)],
                             rtol=1e-6)
  centres = attention_distance.patch_centres(2, 4)
  np.testing.assert_array_equal(centres, [[2, 2], [2, 6], [6, 2], [6, 6]])


def _orthonormal(rng, rows, cols, orthogonal_to_ones=False):
  a = rng.normal(size=(rows, cols))
  if orthogonal_to_ones:  # columns of mean zero: centring the matrix then changes nothing
    a -= a.mean(axis=0, keepdims=True)
  return np.linalg.qr(a)[0]


def test_spectrum_recovers_known_singular_values():
  rng = np.random.default_rng(0)
  s = np.array([5.0, 3.0, 2.0, 0.5, 0.1])
  tokens = []
  for scale in (1.0, 2.0):  # normalised spectra do not depend on the overall scale
    u = _orthonormal(rng, 12, 5, orthogonal_to_ones=True)
    v = _orthonormal(rng, 8, 5)
    tokens.append(u @ np.diag(scale * s) @ v.T)
  tokens = np.stack(tokens)
  values = spectrum.singular_values(tokens)
  np.testing.assert_allclose(values[0, :5], s, rtol=1e-10)
  np.testing.assert_allclose(values[1, :5], 2 * s, rtol=1e-10)
  assert values.shape == (2, 8)  # centred 12 x 8 tokens: min(12 - 1, 8) values
  np.testing.assert_allclose(values[:, 5:], 0.0, atol=1e-10)
  summary = spectrum.summarize(tokens)
  np.testing.assert_allclose(summary["spectrum"][:5], s / 5.0, rtol=1e-10)
  # Uncentred, a constant offset adds a direction: centring is what removes it.
  assert spectrum.singular_values(tokens + 10.0, center=False)[0, 0] > 5.0 + 1
  np.testing.assert_allclose(spectrum.singular_values(tokens + 10.0)[0, :5], s, rtol=1e-8)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_effective_rank(k):
  rng = np.random.default_rng(k)
  u, v = _orthonormal(rng, 20, k), _orthonormal(rng, 16, k)
  equal = spectrum.singular_values((u @ v.T)[None], center=False)
  np.testing.assert_allclose(metrics.effective_rank(equal), [k], rtol=1e-8)
  random = spectrum.singular_values((rng.normal(size=(20, k)) @ rng.normal(size=(k, 16)))[None],
                                    center=False)
  erank = float(metrics.effective_rank(random)[0])
  assert 0.5 * k <= erank <= k + 1e-8
  assert float(metrics.effective_rank(np.zeros(4))) == 1.0  # degenerate: no NaN


def _tiny_model(use_bc=True):
  model_config = util.tiny_config().model
  return model_config, vit.build_model(model_config, image_size=16, channels=3,
                                          use_bc=use_bc)


def test_attention_maps_and_gradcam():
  _, model = _tiny_model(use_bc=False)
  encoder = loading.encoder_of(model)
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = encoder.init(jax.random.key(0), images)["params"]
  probs = attention_distance.collect_attention(encoder, params, images)
  assert len(probs) == 2 and probs[0].shape == (2, 2, 17, 17)
  for query in maps.parse_queries("cls;center;0,3", 4):
    m = maps.attention_maps(probs[-1], query)
    assert m.shape == (2, 2, 4, 4)
    np.testing.assert_allclose(m.sum(axis=(2, 3)), 1.0, rtol=1e-5)

  kernel = jax.random.normal(jax.random.key(2), (32, 5))
  logits_fn = lambda p, x: vit.mean_patch_token(encoder.apply({"params": p}, x)) @ kernel  # noqa
  cams, targets = maps.gradcam(logits_fn, params, images)
  assert cams.shape == (2, 4, 4)
  assert np.all(cams >= 0) and np.allclose(cams.max(axis=(1, 2)), 1.0)
  np.testing.assert_array_equal(targets, np.argmax(logits_fn(params, images), axis=-1))
  _, chosen = maps.gradcam(logits_fn, params, images, targets=[3, 4])
  np.testing.assert_array_equal(chosen, [3, 4])
  # The same classifier written through the full LUTModel (the encoder as a submodule)
  # gives the same maps; a rematerialised encoder is refused with a clear message.
  def full_fn(model):
    return lambda p, x: vit.mean_patch_token(
        model.apply({"params": p}, x, method=vit.LUTModel.encode)) @ kernel
  cams_full, _ = maps.gradcam(full_fn(model), {"encoder": params}, images)
  np.testing.assert_allclose(cams_full, cams, atol=1e-5)
  with pytest.raises(ValueError, match="remat=False"):
    maps.gradcam(full_fn(model.clone(remat=True)), {"encoder": params}, images)


def _write_workdir(path, use_bc=True):
  """A workdir as training leaves it: config.json and an Orbax TrainState checkpoint."""
  model_config, model = _tiny_model(use_bc)
  config = ml_collections.ConfigDict(dict(
      method="lut" if use_bc else "mae", model=model_config,
      input=dict(image_size=16, channels=3, batch_size=16),
      loss=dict(mask_ratio=0.75, norm_pix=True, w_mae=1.0, w_bc=0.25 if use_bc else 0.0)))
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  tx = optim.create_optimizer(learning_rate=lambda step: 1e-3, weight_decay=0.05)
  state = jax.jit(lambda key: train_state.create_train_state(model, tx, key))(
      jax.random.key(int(use_bc)))
  ckpt = checkpointing.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  ckpt.save(3, state, force=True)
  ckpt.close()
  return state


def _check_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE, path
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.size[0] > 50 and im.size[1] > 50


def test_loading_and_cli(tmp_path, monkeypatch):
  lut_dir, mae_dir = tmp_path / "lut", tmp_path / "mae"
  state = _write_workdir(str(lut_dir), use_bc=True)
  _write_workdir(str(mae_dir), use_bc=False)

  monkeypatch.chdir(tmp_path)  # relative paths work too (Orbax itself wants absolute ones)
  loaded = loading.load("lut")
  assert loaded.kind == "workdir" and loaded.step == 3 and loaded.has_decoder
  jax.tree.map(np.testing.assert_array_equal, loaded.model_params, jax.device_get(state.params))
  teacher = loading.load(str(lut_dir / "checkpoints" / "3"), which="target_params")
  assert teacher.step == 3
  with pytest.raises(errors.WorkdirError, match="target_params"):  # user error: one line
    loading.load(str(mae_dir), which="target_params")

  # An exported encoder (no decoder: reconstructions are skipped) and a probe for Grad-CAM.
  enc_dir = sources.write_export(
      str(tmp_path / "encoder"), loaded.params,
      variants.EncoderConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2))
  probe = tmp_path / "probe.npz"
  rng = np.random.default_rng(0)
  np.savez(probe, kernel=rng.normal(size=(32, 10)).astype(np.float32),
           bias=np.zeros(10, np.float32), bn_mean=np.zeros(32, np.float32),
           bn_var=np.ones(32, np.float32))

  # A linear-probe workdir (lut_jax.evaluation.linear_probe's layout), cls-pooled, whose
  # config.json a later lut-eval run replaced: the pooling comes from the probe's record.
  probe_dir = tmp_path / "probe_run"
  ckpt = checkpointing.Checkpointer(str(probe_dir / "checkpoints"), async_save=False)
  ckpt.save(10, {"step": np.int32(10),
                 "params": {"head": {"kernel": rng.normal(size=(32, 10)).astype(np.float32),
                                     "bias": np.zeros(10, np.float32)}},
                 "batch_stats": {"bn": {"mean": np.zeros(32, np.float32),
                                        "var": np.ones(32, np.float32)}}}, force=True)
  ckpt.close()
  (probe_dir / "checkpoints" / sources.RESUME_KEY_FILE).write_text(json.dumps(
      {"mode": "linear_probe", "key": {"pools": ["cls"], "split": "train"}}))
  (probe_dir / "config.json").write_text(json.dumps({"linear_probe": {"pool": "mean"}}))

  out = tmp_path / "out"
  analyze_cli.analyze(analyze_cli.parse_args([
      "--checkpoint", str(lut_dir), "--checkpoint", str(mae_dir), "--checkpoint", enc_dir,
      "--labels", "LUT,MAE,Encoder", "--images", "fashion_mnist", "--num_images", "3",
      "--num_show", "2", "--probe", str(probe), "--probe", str(probe_dir), "--out", str(out)]))
  expected = ["attention_distance.png", "spectrum.png", "attention_maps_LUT_r2c2.png",
              "attention_maps_LUT_cls.png", "attention_maps_Encoder_cls.png",
              "reconstructions_LUT.png", "reconstructions_MAE.png", "gradcam_LUT.png",
              "gradcam_MAE.png"]
  for name in expected:
    _check_png(out / name)
  assert not (out / "reconstructions_Encoder.png").exists()
  assert not (out / "gradcam_Encoder.png").exists()  # two probes: first two checkpoints

  metrics = json.loads((out / "metrics.json").read_text())
  assert set(metrics["models"]) == {"LUT", "MAE", "Encoder"}
  lut = metrics["models"]["LUT"]
  assert lut["gradcam"]["pool"] == "mean" and lut["gradcam"]["block"] == 2
  # cls pooling: the last block's patch tokens do not reach cls, so the block before.
  assert metrics["models"]["MAE"]["gradcam"] == {"probe": str(probe_dir), "pool": "cls",
                                                 "block": 1}
  table = np.asarray(lut["attention_distance"]["per_layer_head"])
  assert table.shape == (2, 2) and np.all(table > 0) and np.all(table < 16 * np.sqrt(2))
  assert len(lut["spectrum"]["spectrum"]) == 15  # centred: min(L - 1, D) = min(15, 32)
  assert 1.0 <= lut["spectrum"]["effective_rank"] <= 15
  # The exported copy of the same encoder gives the same numbers.
  np.testing.assert_allclose(metrics["models"]["Encoder"]["attention_distance"]["mean"],
                             lut["attention_distance"]["mean"], rtol=1e-5)


def test_load_torch_reference_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  import argparse  # pylint: disable=g-import-not-at-top
  from lut_jax.weights import convert  # pylint: disable=g-import-not-at-top

  _, model = _tiny_model(use_bc=True)
  variables = train_state.init_variables(model, jax.random.key(3))
  state_dict = convert.params_to_torch_state_dict(variables["params"],
                                                  variables["batch_stats"], model)
  # A reference training checkpoint: {"model": ..., "args": Namespace(...)}.
  path = tmp_path / "checkpoint-3.pth"
  torch.save({"model": convert.torch_tensors(state_dict),
              "args": argparse.Namespace(norm_pix_loss=False, mask_ratio=0.6)}, path)
  loaded = loading.load(str(path), num_heads=2, decoder_num_heads=2)
  assert loaded.kind == "torch" and loaded.has_decoder
  assert (loaded.image_size, loaded.patch_size, loaded.encoder.depth) == (16, 4, 2)
  assert not loaded.norm_pix and loaded.mask_ratio == 0.6
  jax.tree.map(np.testing.assert_allclose, loaded.model_params["encoder"],
               jax.device_get(variables["params"]["encoder"]))
  jax.tree.map(np.testing.assert_allclose, loaded.model_params["decoder"],
               jax.device_get(variables["params"]["decoder"]))
  # Encoder only (timm-like): no decoder tensors -> encoder alone.
  encoder_only = {k: v for k, v in state_dict.items() if not k.startswith(("decoder", "mask"))}
  torch.save(convert.torch_tensors(encoder_only), tmp_path / "encoder.pth")
  enc = loading.load(str(tmp_path / "encoder.pth"), num_heads=2)
  assert not enc.has_decoder and enc.encoder.depth == 2


def test_analysis_imports_neither_tensorflow_nor_torch():
  code = ("import sys, lut_jax.cli.analyze; "
          "print(sorted(m for m in ('tensorflow', 'torch') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
