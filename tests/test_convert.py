"""Tests of lut_jax.weights.convert: name mapping, exact round trips, error reports, timm export."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lut_jax import errors
from lut_jax.models import vit
from lut_jax.weights import convert
from tests import util

IMAGE, BATCH = util.IMAGE_SIZE, 2


@functools.lru_cache(maxsize=None)
def _init(model: vit.LUTModel, seed: int = 0):
  """Random ``(params, batch_stats)`` of ``model``'s shapes (found by abstract evaluation of
  ``init``: no compilation). Every entry is random, biases and statistics included, so a
  swapped or dropped tensor cannot go unnoticed."""
  images = jnp.zeros((BATCH, IMAGE, IMAGE, model.channels))
  keep = jnp.zeros((BATCH, 1), jnp.int32)
  ids = jnp.tile(jnp.arange(model.num_patches), (BATCH, 1))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, images, keep, keep, ids)
  rng = np.random.default_rng(seed)
  fill = lambda s: rng.standard_normal(s.shape).astype(s.dtype)  # noqa: E731
  stats = jax.tree.map(lambda s: np.abs(fill(s)), shapes.get("batch_stats", {}))
  return jax.tree.map(fill, shapes["params"]), stats


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(x, y)


MODELS = {
    "lut_batchnorm": dict(),
    "lut_layernorm_gelu": dict(head_norm="layer", head_activation="gelu"),
    "lut_no_norm_deep": dict(head_norm="none", head_depth=3, pred_depth=1),
    "mae": dict(use_bc=False),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_names_round_trip_is_exact(name):
  model = util.tiny_model(**MODELS[name])
  params, stats = _init(model)
  state_dict = convert.params_to_torch_state_dict(params, stats, model)
  params2, stats2 = convert.params_from_torch_state_dict(state_dict, model)
  _assert_trees_equal(params, params2)
  _assert_trees_equal(stats, stats2)


def test_reference_names_and_layouts():
  model = util.tiny_model()
  params, stats = _init(model)
  sd = convert.params_to_torch_state_dict(params, stats, model)
  # Sequential indices: Linear(0), BatchNorm(1), ReLU(2), Linear(3).
  assert sd["head.0.weight"].shape == (64, 32) and sd["head.3.weight"].shape == (32, 64)
  np.testing.assert_array_equal(sd["predictor.1.running_var"], stats["predictor"]["norm_0"]["var"])
  np.testing.assert_array_equal(sd["head.1.weight"], params["head"]["norm_0"]["scale"])
  assert sd["head.1.num_batches_tracked"].dtype == np.int64
  np.testing.assert_array_equal(sd["blocks.1.mlp.fc1.weight"],
                                params["encoder"]["blocks_1"]["mlp"]["fc1"]["kernel"].T)
  kernel = params["encoder"]["patch_embed"]["proj"]["kernel"]  # (p, p, C, D)
  np.testing.assert_array_equal(sd["patch_embed.proj.weight"][5, 2, 1, 3], kernel[1, 3, 2, 5])
  assert sd["pos_embed"].shape == (1, 17, 32) and sd["decoder_pos_embed"].shape == (1, 17, 32)
  no_norm = util.tiny_model(head_norm="none", head_depth=3)
  sd = convert.params_to_torch_state_dict(*_init(no_norm), no_norm)
  # Linear(0), ReLU(1), Linear(2), ReLU(3), Linear(4).
  assert {k for k in sd if k.startswith("head.")} == {"head.0.weight", "head.2.weight",
                                                       "head.4.weight"}


def test_module_prefix_and_checkpoint_wrappers():
  model = util.tiny_model()
  params, stats = _init(model)
  sd = convert.params_to_torch_state_dict(params, stats, model)
  wrapped = {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}
  _assert_trees_equal((params, stats), convert.params_from_torch_state_dict(wrapped, model))
  teacher = convert.params_to_torch_state_dict(*_init(model, seed=1), model)
  checkpoint = {"model": sd, "model_ema": teacher, "optimizer": {}}
  _assert_trees_equal(_init(model, seed=1),
                      convert.params_from_torch_state_dict(checkpoint, model, key="model_ema"))


def test_mae_checkpoint_needs_a_use_bc_false_model():
  mae = util.tiny_model(use_bc=False)
  params, stats = _init(mae)
  assert stats == {}
  sd = convert.params_to_torch_state_dict(params, None, mae)
  assert not any(k.startswith(("head.", "predictor.")) for k in sd)
  with pytest.raises(ValueError, match=r"missing tensors \(12\).*head\.0\.weight"):
    convert.params_from_torch_state_dict(sd, util.tiny_model())
  # The other way round, the heads are unexpected unless ignored.
  lut_sd = convert.params_to_torch_state_dict(*_init(util.tiny_model()), util.tiny_model())
  with pytest.raises(ValueError, match=r"unexpected tensors.*predictor\.3\.weight"):
    convert.params_from_torch_state_dict(lut_sd, mae)
  params2, _ = convert.params_from_torch_state_dict(lut_sd, mae, ignore_unexpected=True)
  assert set(params2) == {"encoder", "decoder"}


def test_errors_list_every_problem_by_torch_name():
  model = util.tiny_model()
  sd = dict(convert.params_to_torch_state_dict(*_init(model), model))
  del sd["blocks.1.attn.qkv.weight"]
  del sd["head.1.running_var"]
  sd["decoder_pred.bias"] = np.zeros((47,), np.float32)
  sd["patch_embed.proj.weight"] = np.zeros((32, 1, 4, 4), np.float32)  # wrong channels
  sd["fc_norm.weight"] = np.zeros((32,), np.float32)
  with pytest.raises(ValueError) as error:
    convert.params_from_torch_state_dict(sd, model)
  # A user error (bad input), reported by the command lines as one line.
  assert isinstance(error.value, errors.DataError)
  message = str(error.value)
  for expected in ("missing tensors (2)", "blocks.1.attn.qkv.weight", "head.1.running_var",
                   "shape mismatches (2)", "decoder_pred.bias: expected (48,), got (47,)",
                   "patch_embed.proj.weight: expected (32, 3, 4, 4), got (32, 1, 4, 4)",
                   "unexpected tensors (1", "fc_norm.weight"):
    assert expected in message, message
  with pytest.raises(ValueError) as error:
    convert.params_from_torch_state_dict(sd, model, ignore_unexpected=True)
  assert "fc_norm" not in str(error.value) and "decoder_pred.bias" in str(error.value)


def test_pos_embed_is_checked_not_loaded():
  model = util.tiny_model()
  params, stats = _init(model)
  sd = dict(convert.params_to_torch_state_dict(params, stats, model))
  sd["decoder_pos_embed"] = sd["decoder_pos_embed"] + 0.01  # e.g. a learned embedding
  with pytest.raises(ValueError, match="decoder_pos_embed: differs from the fixed"):
    convert.params_from_torch_state_dict(sd, model)
  convert.params_from_torch_state_dict(sd, model, check_pos_embed=False)
  sd["pos_embed"] = np.zeros((1, 5, 32), np.float32)  # another grid size
  with pytest.raises(ValueError, match=r"pos_embed: expected \(1, 17, 32\), got \(1, 5, 32\)"):
    convert.params_from_torch_state_dict(sd, model)
  # Pos embeddings are optional on import.
  del sd["pos_embed"], sd["decoder_pos_embed"]
  _assert_trees_equal((params, stats), convert.params_from_torch_state_dict(sd, model))


def test_encoder_only_loading():
  model = util.tiny_model()
  params, stats = _init(model)
  sd = convert.params_to_torch_state_dict(params, stats, model)
  # From a full LUT checkpoint into the LUT model's encoder, or into a bare Encoder.
  _assert_trees_equal(params["encoder"], convert.encoder_params_from_torch_state_dict(sd, model))
  encoder = vit.Encoder(IMAGE, model.patch_size, model.width, model.depth, model.num_heads)
  _assert_trees_equal(params["encoder"], convert.encoder_params_from_torch_state_dict(sd, encoder))
  sd = {k: v for k, v in sd.items() if k != "norm.weight"}
  sd["fc_norm.weight"] = np.ones((32,), np.float32)
  with pytest.raises(ValueError, match=r"missing tensors \(1\): norm\.weight\n.*fc_norm\.weight"):
    convert.encoder_params_from_torch_state_dict(sd, encoder)


def test_timm_export_round_trip_is_exact():
  model = util.tiny_model()
  params, _ = _init(model)
  timm_sd = convert.encoder_to_timm_state_dict(params["encoder"], image_size=IMAGE)
  assert "pos_embed" in timm_sd and not any(k.startswith("decoder") for k in timm_sd)
  timm_sd["head.weight"] = np.zeros((10, 32), np.float32)  # a classifier is skipped
  _assert_trees_equal(params["encoder"],
                      convert.encoder_params_from_timm_state_dict(timm_sd, model))


def test_export_loads_strictly_into_torch_reference():
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  from tests import torch_reference  # pylint: disable=g-import-not-at-top
  for name, overrides in MODELS.items():
    model = util.tiny_model(**overrides)
    reference = torch_reference.TorchLUT(
        IMAGE, model.patch_size, 3, model.width, model.depth, model.num_heads,
        model.decoder_width, model.decoder_depth, model.decoder_num_heads,
        use_bc=model.use_bc, head_depth=model.head_depth, pred_depth=model.pred_depth,
        head_hidden_dim=model.head_hidden_dim, head_norm=model.head_norm,
        head_activation=model.head_activation)
    params, stats = _init(model)
    sd = convert.torch_tensors(convert.params_to_torch_state_dict(params, stats, model))
    reference.load_state_dict(sd, strict=True)
    # Torch tensors are accepted directly on the way back.
    back = convert.params_from_torch_state_dict(reference.state_dict(), model)
    _assert_trees_equal((params, stats), back)
    assert isinstance(sd["cls_token"], torch.Tensor), name


def test_convert_does_not_import_torch():
  code = ("import sys, lut_jax.weights.convert; "
          "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported'")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"JAX_PLATFORMS": "cpu", "PATH": ""}, cwd=_repo_root(),
                          check=False)
  assert result.returncode == 0, result.stderr


def _repo_root() -> str:
  import pathlib  # pylint: disable=g-import-not-at-top
  return str(pathlib.Path(__file__).resolve().parents[1])
