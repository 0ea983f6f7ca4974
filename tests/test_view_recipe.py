"""The view recipe options: ``input.view2_ops`` (which strong op view 2 draws) and
``input.random_flip``, on both input paths.

The method's three ops keep the draws made before the option existed (written out by hand
here), a chosen subset is all that is drawn and uniformly so, ``none`` leaves the jittered
view as it is, and both options reach the views through both pipelines: with solarize alone
(``min(x, 1 - x)``) no pixel of view 2 is above 0.5, which the method's mix breaks; without
flips an image dark on the left stays dark on the left in every view, crop or not.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from lut_jax import config_lib, errors
from lut_jax.data import augment, device_augment, device_input, image_utils, input_pipeline
from lut_jax.runtime import sharding

N_DRAWS = 3000


@pytest.mark.parametrize("spec,expected", [
    ("grayscale,solarize,blur", (0, 1, 2)), ("blur", (2,)), (" solarize , none", (1, 3)),
    ("none", (3,))])
def test_names_give_the_op_indices(spec, expected):
  assert image_utils.view2_op_choices(spec) == expected
  assert [image_utils.STRONG_OPS[i] for i in expected] == [
      name.strip() for name in spec.split(",")]


@pytest.mark.parametrize("spec", ["", "blur,", "sharpen", "blur,blur", "Blur"])
def test_bad_lists_are_config_errors_naming_the_option(spec):
  with pytest.raises(errors.ConfigError, match="input.view2_ops"):
    image_utils.view2_op_choices(spec)


def test_the_method_default_keeps_the_earlier_draws():
  """Runs started before the option resume with the same views: the op is still
  ``randint(0, 3)`` of the same key on the device and ``stateless_uniform(0, 3)`` on the
  host."""
  assert image_utils.view2_op_choices(config_lib.base_config().input.view2_ops) == (0, 1, 2)
  keys = jax.random.split(jax.random.key(11), 200)
  ops = np.asarray(jax.vmap(device_augment.sample_params_one)(keys).op)
  before = [int(jax.random.randint(jax.random.split(k, 8)[6], (), 0, 3)) for k in keys]
  np.testing.assert_array_equal(ops, before)
  assert set(ops) == {0, 1, 2}
  for i in range(50):
    seed = tf.constant([3, i], tf.int64)
    op_seed = tf.random.experimental.stateless_split(seed, 2)[0]
    before = tf.random.stateless_uniform([], op_seed, minval=0, maxval=3, dtype=tf.int32)
    assert int(augment.sample_strong_op(seed).op) == int(before)


@pytest.mark.parametrize("choices", [(1, 2), (0, 3), (2,)])
def test_a_subset_is_drawn_alone_and_uniformly(choices):
  keys = jax.random.split(jax.random.key(5), N_DRAWS)
  device_ops = np.asarray(jax.vmap(lambda k: device_augment.sample_params_one(k, choices))(
      keys).op)
  host_ops = np.array([int(augment.sample_strong_op(tf.constant([9, i], tf.int64),
                                                    op_choices=choices).op)
                       for i in range(N_DRAWS // 3)])
  for ops in (device_ops, host_ops):
    assert set(ops) == set(choices)
    p = 1 / len(choices)
    for op in choices:  # each op's share within 4 binomial sigmas of uniform
      assert abs(np.mean(ops == op) - p) < 4 * math.sqrt(p * (1 - p) / len(ops)) + 1e-9


def test_none_leaves_the_jittered_view():
  image = np.random.default_rng(0).uniform(0, 1, (20, 24, 3)).astype(np.float32)
  none = image_utils.STRONG_OPS.index("none")
  out = device_augment.apply_strong_op(jnp.asarray(image), jnp.int32(none), jnp.float32(1.0))
  np.testing.assert_array_equal(np.asarray(out), image)
  host = augment.apply_strong_op(tf.constant(image), augment.StrongOp(tf.constant(none),
                                                                      tf.constant(1.0)))
  np.testing.assert_array_equal(host.numpy(), image)
  # On grey images "grayscale" is a no-op too: the same draws give the same views.
  grey = np.repeat(image[..., :1], 3, axis=-1)[None].repeat(64, axis=0)
  params = device_augment.sample_params(jax.random.key(2), 64, (none,))
  jittered = np.asarray(device_augment.colour_augment(grey, params))
  with_ops = params._replace(op=jnp.zeros_like(params.op))  # grayscale
  np.testing.assert_allclose(np.asarray(device_augment.colour_augment(grey, with_ops)),
                             jittered, atol=1e-6)


def _max_view2_pixel(view2: np.ndarray) -> float:
  return float(image_utils.denormalize(np.asarray(view2), view2.shape[-1]).max())


def _left_darker(views) -> np.ndarray:
  """Per view: is its left half darker than its right half (grey levels of channel 0)?"""
  v = np.asarray(views)[..., 0]
  half = v.shape[2] // 2
  return v[:, :, :half].mean(axis=(1, 2)) < v[:, :, half:].mean(axis=(1, 2))


def _assert_solarize_alone_reaches_view2(batch, config) -> None:
  """``batch()`` reads ``config``: view 2 with solarize alone has no pixel above mid-grey,
  with the method's mix it has; view 1 is unchanged."""
  method = batch()
  config.view2_ops = "solarize"
  solarized = batch()
  np.testing.assert_allclose(np.asarray(solarized["view1"]), np.asarray(method["view1"]))
  assert _max_view2_pixel(method["view2"]) > 0.6
  assert _max_view2_pixel(solarized["view2"]) <= 0.5 + 1e-5


def _half_dark_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """Noise, 0-99 on the left half and 156-255 on the right: any crop of the 4 px
  reflect-padded image keeps its left half darker unless it is mirrored."""
  images = rng.integers(0, 100, (n, size, size, 1), dtype=np.uint8)
  images[:, :, size // 2:] += 156
  return images


def test_the_options_reach_the_device_path():
  images = np.random.default_rng(1).integers(0, 256, (32, 16, 16, 1), dtype=np.uint8)
  split = device_input.Split(images, np.arange(32, dtype=np.int32) % 4, "random")
  config = config_lib.base_config().input
  config.update(dict(backend="device", dataset="random", image_size=16, channels=3,
                     batch_size=32))
  mesh = sharding.create_mesh(1)
  batch = lambda: device_input.DeviceData(config, seed=0, mesh=mesh,  # noqa: E731
                                          split=split).batch(0)
  _assert_solarize_alone_reaches_view2(batch, config)

  split = device_input.Split(_half_dark_images(32, 16, np.random.default_rng(2)),
                             split.labels, "half dark")
  config.view2_ops = "none"  # colour jitter can brighten a half, not swap them
  for flip, low, high in ((True, 0.2, 0.8), (False, 1.0, 1.0)):
    config.random_flip = flip
    views = batch()
    for view in ("view1", "view2"):
      assert low <= _left_darker(views[view]).mean() <= high, (flip, view)


@pytest.mark.parametrize("device_augment_on", [False, True])
def test_the_options_reach_the_tfdata_path(tmp_path, device_augment_on):
  rng = np.random.default_rng(2)
  noise, half_dark = tmp_path / "noise", tmp_path / "half_dark"
  for root, images in ((noise, rng.integers(0, 256, (16, 20, 20, 1), dtype=np.uint8)),
                       (half_dark, _half_dark_images(16, 20, rng))):
    for i, image in enumerate(images):
      folder = root / f"class_{i % 2}"
      folder.mkdir(parents=True, exist_ok=True)
      tf.io.write_file(str(folder / f"{i:02d}.png"), tf.io.encode_png(image))
  config = config_lib.base_config().input
  config.update(dict(dataset=f"folder:{noise}", image_size=16, batch_size=16,
                     shuffle_buffer=16, device_augment=device_augment_on))
  finish = jax.jit(device_augment.finish_batch) if device_augment_on else (lambda b: b)
  batch = lambda: finish(next(  # noqa: E731
      input_pipeline.create_pretrain_iterator(config, seed=0)))
  _assert_solarize_alone_reaches_view2(batch, config)

  config.update(dict(dataset=f"folder:{half_dark}", view2_ops="none", batch_size=16))
  for flip, low, high in ((True, 0.15, 0.85), (False, 1.0, 1.0)):
    config.random_flip = flip
    views = [batch() for _ in range(2)]
    for view in ("view1", "view2"):
      shares = [_left_darker(v[view]).mean() for v in views]
      assert low <= np.mean(shares) <= high, (flip, view, shares)


def test_the_config_gives_the_recipe():
  config = config_lib.base_config().input
  assert image_utils.view_recipe(config) == image_utils.ViewRecipe()  # the method's
  config.update(dict(random_flip=False, view2_ops="blur"))
  assert image_utils.view_recipe(config) == image_utils.ViewRecipe(op_choices=(2,), flip=False)
