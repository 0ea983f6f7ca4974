"""The opt-in speed levers of ``config.model`` (docs/benchmarks.md): remat policies are exact,
the tanh GELU is the published tanh formula, and the teacher's low-precision residual
stream touches the teacher only, within bf16 rounding."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lut_jax import config_lib
from lut_jax.models import vit
from lut_jax.pretrain import build
from lut_jax.runtime import sharding
from tests import util


def test_tanh_gelu_is_the_tanh_formula_and_close_to_exact():
  x = np.linspace(-6, 6, 2001, dtype=np.float32)
  x64 = x.astype(np.float64)
  tanh_form = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)))
  np.testing.assert_allclose(vit.gelu(jnp.asarray(x), approximate=True), tanh_form,
                             rtol=1e-5, atol=1e-6)
  exact = vit.gelu(jnp.asarray(x))
  gap = np.max(np.abs(np.asarray(exact) - tanh_form))
  assert 1e-5 < gap < 1e-3  # a different function, but only just


def _first_step_grads(config):
  """Gradient-carrying outcome of one step: the new params (same start, same batch)."""
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  training = build.build_training(config, mesh, total_steps=10, warmup_steps=2)
  state, metrics = training.step(training.init(jax.random.key(0)),
                                 util.synthetic_batch(0, 16), jax.random.key(3))
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("policy", ["", "dots_saveable", "nothing_saveable"])
def test_remat_policies_leave_the_step_unchanged(policy):
  want_params, want_metrics = _first_step_grads(util.tiny_config())
  got_params, got_metrics = _first_step_grads(
      util.tiny_config(**{"model.remat": True, "model.remat_policy": policy}))
  for k in ("loss", "rec_loss", "bc_loss", "grad_norm"):
    np.testing.assert_allclose(got_metrics[k], want_metrics[k], rtol=1e-5, err_msg=k)
  chex.assert_trees_all_close(got_params, want_params, rtol=1e-5, atol=1e-7)


def test_unknown_remat_policy_names_the_field():
  config = util.tiny_config(**{"model.remat_policy": "dots"})
  with pytest.raises(ValueError, match="model.remat_policy"):
    vit.check_model_config(config.model, image_size=util.IMAGE_SIZE, dtype=jnp.float32)


def _lut_outputs(dtype, low_precision_teacher: bool):
  config = util.tiny_config(**{"model.teacher_residual_in_compute_dtype": low_precision_teacher})
  model = vit.build_model(config.model, image_size=util.IMAGE_SIZE, channels=3, use_bc=True,
                             dtype=dtype)
  rng = np.random.default_rng(0)
  views = [jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32) for _ in range(2)]
  keep = jnp.asarray(np.stack([rng.permutation(16)[:4] for _ in range(8)]), jnp.int32)
  restore = jnp.asarray(np.stack([rng.permutation(16) for _ in range(8)]), jnp.int32)
  variables = model.init(jax.random.key(0), views[0], views[1], keep, keep, restore)
  student, _ = model.apply(variables, views[0], views[1], keep, keep, restore,
                           method=model.student, mutable=["batch_stats"])
  z1, z2 = model.apply(variables, *views, method=model.teacher)
  return student, np.asarray(z1, np.float32), np.asarray(z2, np.float32)


def test_teacher_residual_in_compute_dtype_changes_the_teacher_only():
  student, *teacher = _lut_outputs(jnp.bfloat16, False)
  student_low, *teacher_low = _lut_outputs(jnp.bfloat16, True)
  chex.assert_trees_all_equal(student, student_low)  # the student keeps float32
  for want, got in zip(teacher, teacher_low):
    assert not np.array_equal(want, got)  # the lever does something...
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 5e-2, rel  # ...within bf16 rounding of a 2-block stack
  # In float32 there is no lower compute dtype: the lever is a no-op.
  _, *teacher32 = _lut_outputs(jnp.float32, False)
  _, *teacher32_low = _lut_outputs(jnp.float32, True)
  for want, got in zip(teacher32, teacher32_low):
    np.testing.assert_array_equal(got, want)


def test_levers_are_off_by_default():
  config = config_lib.base_config("lut")
  assert config.model.remat_policy == ""
  assert not config.model.gelu_approximate
  assert not config.model.teacher_residual_in_compute_dtype


def test_gelu_approximate_reaches_every_block():
  """The config field switches the MLPs of the encoder and the decoder (not the heads)."""
  config = util.tiny_config()
  exact = vit.build_model(config.model, image_size=util.IMAGE_SIZE, channels=3, use_bc=False)
  tanh = exact.clone(gelu_approximate=True)
  rng = np.random.default_rng(1)
  view = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
  keep = jnp.asarray(np.stack([rng.permutation(16)[:4] for _ in range(4)]), jnp.int32)
  restore = jnp.asarray(np.stack([rng.permutation(16) for _ in range(4)]), jnp.int32)
  variables = exact.init(jax.random.key(0), view, view, keep, keep, restore)
  latent = {m.gelu_approximate: np.asarray(m.apply(variables, view, keep, method=m.encode))
            for m in (exact, tanh)}
  pred = {m.gelu_approximate: np.asarray(m.apply(variables, view, keep, restore, method=m.mae))
          for m in (exact, tanh)}
  for out in (latent, pred):
    assert not np.array_equal(out[True], out[False])
    np.testing.assert_allclose(out[True], out[False], atol=2e-2)


def _architecture(config):
  """The encoder architecture of a pre-training config, as the loader of its run reads it."""
  from lut_jax.models import variants  # pylint: disable=g-import-not-at-top
  from lut_jax.weights import loading  # pylint: disable=g-import-not-at-top
  return variants.EncoderConfig.of(loading.run_model(config))


def test_an_encoder_pre_trained_with_tanh_gelu_keeps_it_downstream():
  """Evaluation, fine-tuning, segmentation and the timm export rebuild the encoder from its
  pre-training config: the activation it was trained with comes along."""
  from lut_jax.weights import loading  # pylint: disable=g-import-not-at-top
  from lut_jax.weights import export  # pylint: disable=g-import-not-at-top
  from lut_jax.models import classifier, segmenter
  exact_config = util.tiny_config()
  tanh_config = util.tiny_config(**{"model.gelu_approximate": True})
  assert "gelu_approximate" not in _architecture(exact_config).to_json()
  encoder_config = _architecture(tanh_config)
  assert encoder_config.to_json()["gelu_approximate"] is True
  tanh, exact = vit.Encoder(**encoder_config.kwargs()), vit.Encoder(
      **_architecture(exact_config).kwargs())
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  params = exact.init(jax.random.key(0), images)
  assert not np.array_equal(tanh.apply(params, images), exact.apply(params, images))
  lut = vit.build_model(tanh_config.model, image_size=util.IMAGE_SIZE, channels=3,
                           use_bc=True)
  np.testing.assert_array_equal(loading.encoder_of(lut).apply(params, images),
                                tanh.apply(params, images))
  assert classifier.build_model(encoder_config, num_classes=3, image_size=16,
                                drop_path_rate=0.0).gelu_approximate
  assert segmenter.build_model(encoder_config, num_classes=3,
                                        image_size=16).gelu_approximate
  assert export.timm_kwargs(encoder_config)["act_layer"] == "gelu_tanh"  # timm's GELUTanh
  assert "act_layer" not in export.timm_kwargs(_architecture(exact_config))


def test_a_tanh_gelu_timm_folder_reads_back_with_tanh_gelu(tmp_path):
  """lut-export writes act_layer="gelu_tanh"; lut-eval reads such a folder back with the
  activation it names (timm's config.json is the only place that says it)."""
  from lut_jax.weights import export, loading  # pylint: disable=g-import-not-at-top
  encoder_config = _architecture(util.tiny_config(**{"model.gelu_approximate": True}))
  tanh = vit.Encoder(**encoder_config.kwargs())
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  params = tanh.init(jax.random.key(0), images)["params"]
  folder = os.path.dirname(export.write_timm_folder(str(tmp_path), params, encoder_config, 3))
  loaded = loading.load(folder, encoder_only=True)
  assert loaded.kind == "timm" and loaded.config["gelu_approximate"] is True
  np.testing.assert_allclose(loaded.encoder.apply({"params": loaded.params}, images),
                             tanh.apply({"params": params}, images), atol=1e-6)
