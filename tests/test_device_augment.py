"""Tests of the on-device view-2 colour ops (lut_jax.data.device_augment) against augment.py.

Each JAX op is checked against its TensorFlow counterpart on the same real photo (scikit-
image coffee / astronaut / camera, subsampled) and the same parameters; the remaining
differences are float32 summation order (contrast's image mean over ~10^4 pixels, the blur's
taps), so the tolerance is 1e-5 on [0, 1] values. The pipeline switch
(``input.device_augment``) is checked end to end on a small JPEG folder.
"""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.data
import tensorflow as tf

from lut_jax import config_lib
from lut_jax.data import augment, device_augment, image_utils, input_pipeline

ATOL = 1e-5  # float32 reduction-order differences; see the module docstring
N_DRAWS = 3000


def _photo(name: str, step: int = 4) -> np.ndarray:
  image = getattr(skimage.data, name)()
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image[::step, ::step, :3].astype(np.float32) / 255.0


def _binomial_sigma(p: float, n: int) -> float:
  return math.sqrt(p * (1 - p) / n)


def _params(apply=True, order=(0, 1, 2, 3), brightness=1.3, contrast=0.7, saturation=1.15,
            hue=0.08, op=0, sigma=1.0) -> device_augment.ColourParams:
  """One example's parameters (scalars), as device_augment takes them."""
  return device_augment.ColourParams(
      apply=jnp.asarray(apply), order=jnp.asarray(order, jnp.int32),
      brightness=jnp.float32(brightness), contrast=jnp.float32(contrast),
      saturation=jnp.float32(saturation), hue=jnp.float32(hue), op=jnp.int32(op),
      sigma=jnp.float32(sigma))


def _tf_colour(image: np.ndarray, p: device_augment.ColourParams) -> np.ndarray:
  """augment.py's colour part of view 2 with the same parameters."""
  jitter = augment.ColorJitter(
      apply=tf.constant(bool(p.apply)), order=tf.constant(np.asarray(p.order), tf.int32),
      brightness=tf.constant(float(p.brightness)), contrast=tf.constant(float(p.contrast)),
      saturation=tf.constant(float(p.saturation)), hue=tf.constant(float(p.hue)))
  strong = augment.StrongOp(tf.constant(int(p.op), tf.int32), tf.constant(float(p.sigma)))
  out = augment.apply_strong_op(augment.color_jitter(tf.constant(image), jitter), strong)
  return out.numpy()


def _stack(params: list[device_augment.ColourParams]) -> device_augment.ColourParams:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *params)


# ----------------------------------------------------------------------------- single ops


@pytest.mark.parametrize("name,factor", [
    ("brightness", 0.6), ("brightness", 1.4), ("contrast", 0.6), ("contrast", 1.4),
    ("saturation", 0.8), ("saturation", 1.2), ("hue", 0.1), ("hue", -0.1), ("hue", 0.031),
    ("hue", -0.5), ("hue", 0.0)])
@pytest.mark.parametrize("photo", ["coffee", "astronaut"])
def test_jitter_ops_match_augment(name, factor, photo):
  x = _photo(photo)
  expected = getattr(augment, f"adjust_{name}")(tf.constant(x), tf.constant(factor)).numpy()
  out = jax.jit(getattr(device_augment, f"adjust_{name}"))(x, factor)
  assert out.dtype == jnp.float32 and out.shape == x.shape
  np.testing.assert_allclose(np.asarray(out), expected, atol=ATOL, rtol=0)


def test_hue_ties_and_grey_pixels_match_augment():
  # Equal channels in every combination (the kernel's tie-breaking picks the sextant), grey
  # pixels (max == min), black and white, and shifts that wrap around 0 and 6.
  levels = np.array([0.0, 0.25, 0.5, 1.0], np.float32)
  x = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(8, 8, 3)
  for delta in (-0.5, -0.1, -1e-7, 0.0, 1e-7, 0.1, 1 / 6, 0.5):
    expected = augment.adjust_hue(tf.constant(x), tf.constant(delta)).numpy()
    np.testing.assert_allclose(np.asarray(device_augment.adjust_hue(x, delta)), expected,
                               atol=1e-6, rtol=0, err_msg=f"delta={delta}")


@pytest.mark.parametrize("sigma", [0.1, 0.37, 0.7, 1.13, 2.0])
def test_gaussian_blur_matches_augment(sigma):
  x = _photo("astronaut", 8)
  expected = augment.gaussian_blur(tf.constant(x), tf.constant(sigma)).numpy()
  np.testing.assert_allclose(np.asarray(device_augment.gaussian_blur(x, sigma)), expected,
                             atol=ATOL, rtol=0)


def test_blur_at_the_smallest_image_size_and_kernel():
  # 16 px (image_utils.MIN_IMAGE_SIZE): mirrored padding by the full radius still fits.
  x = _photo("coffee", 16)[:16, :16]
  expected = augment.gaussian_blur(tf.constant(x), tf.constant(2.0)).numpy()
  np.testing.assert_allclose(np.asarray(device_augment.gaussian_blur(x, 2.0)), expected,
                             atol=ATOL, rtol=0)
  kernel = np.asarray(device_augment.blur_kernel(0.3))  # radius int(1.7) = 1: 3 taps
  assert np.count_nonzero(kernel) == 3 and abs(kernel.sum() - 1) < 1e-6
  assert np.count_nonzero(np.asarray(device_augment.blur_kernel(2.0))) == 17


def test_grayscale_and_solarize_match_augment():
  x = _photo("coffee")
  np.testing.assert_array_equal(np.asarray(device_augment.grayscale(x)),
                                augment.grayscale(tf.constant(x)).numpy())
  np.testing.assert_array_equal(np.asarray(device_augment.solarize(x)),
                                augment.solarize(tf.constant(x)).numpy())
  levels = np.arange(256, dtype=np.float32).reshape(16, 16, 1).repeat(3, -1) / 255.0
  out = np.round(np.asarray(device_augment.solarize(levels)) * 255).astype(np.uint8)
  lv = np.round(levels * 255).astype(np.uint8)
  np.testing.assert_array_equal(out, np.where(lv >= 128, 255 - lv, lv))  # PIL's rule



def test_merged_jitter_step_equals_the_separate_ops():
  # color_jitter runs each step as one selected blend or the hue, with the same float32 ops.
  x = _photo("coffee", 8)
  p = _params(brightness=1.37, contrast=0.62, saturation=1.19, hue=-0.06)
  step = jax.jit(device_augment._jitter_step)  # pylint: disable=protected-access
  for op, name in enumerate(device_augment.JITTER_OPS):
    separate = getattr(device_augment, f"adjust_{name}")(x, getattr(p, name))
    # To an ulp or two: XLA may contract a multiply-add into an FMA in one and not the other.
    np.testing.assert_allclose(np.asarray(step(x, jnp.int32(op), p)), np.asarray(separate),
                               atol=3e-7, rtol=0, err_msg=name)

# ----------------------------------------------------------------------------- whole view 2

FIXED = [  # (order, op, apply): every op first, every strong op, jitter off
    ((0, 1, 2, 3), 0, True), ((3, 2, 1, 0), 1, True), ((1, 3, 0, 2), 2, True),
    ((2, 0, 3, 1), 2, True), ((3, 0, 2, 1), 0, True), ((0, 1, 2, 3), 1, False),
    ((2, 3, 1, 0), 2, False)]


def test_colour_augment_matches_augment_for_fixed_parameters():
  images = np.stack([_photo("coffee", 4)[:96, :96], _photo("astronaut", 4)[:96, :96]])
  params, cases = [], []
  for i, (order, op, apply) in enumerate(FIXED):
    p = _params(apply=apply, order=order, op=op, brightness=0.65 + 0.1 * i,
                contrast=1.35 - 0.1 * i, saturation=0.85 + 0.05 * i,
                hue=-0.09 + 0.03 * i, sigma=0.2 + 0.3 * i)
    for image in images:
      params.append(p)
      cases.append(image)
  batch = np.stack(cases)
  out = np.asarray(jax.jit(device_augment.colour_augment)(batch, _stack(params)))
  assert out.shape == batch.shape and out.dtype == np.float32
  for j, (image, p) in enumerate(zip(cases, params)):
    np.testing.assert_allclose(out[j], _tf_colour(image, p), atol=ATOL, rtol=0,
                               err_msg=f"case {j}: {p}")
  # Jitter off: only the strong op (here solarize / blur) acts.
  off = FIXED.index(((0, 1, 2, 3), 1, False)) * 2
  np.testing.assert_array_equal(out[off], np.minimum(cases[off], 1 - cases[off]))


def test_host_draws_reproduce_two_views():
  """augment.two_views_geometric + the colour ops == two_views; JAX finishes it the same."""
  image = tf.constant(_photo("astronaut", 2))
  size = 64
  finish = jax.jit(device_augment.finish_batch)
  for i in range(6):
    seed = tf.constant([7, i], tf.int64)
    view1, view2 = augment.two_views(image, seed, size, normalized=False)
    crop1, crop2, jitter, strong = augment.two_views_geometric(image, seed, size)
    np.testing.assert_array_equal(crop1.numpy(), view1.numpy())
    host = augment.apply_strong_op(augment.color_jitter(crop2, jitter), strong)
    np.testing.assert_array_equal(host.numpy(), view2.numpy())  # same draws, same pixels

    # pylint: disable-next=protected-access
    packed = input_pipeline._pack_colour_params(jitter, strong).numpy()
    batch = {"view1_crop": crop1.numpy()[None], "view2_crop": crop2.numpy()[None],
             "view2_params": packed[None]}
    out = finish(batch)
    n1, n2 = augment.two_views(image, seed, size)
    np.testing.assert_allclose(np.asarray(out["view1"])[0], n1.numpy(), atol=ATOL, rtol=0)
    # Normalised units: [0, 1] differences grow by 1 / std (~4.4).
    np.testing.assert_allclose(np.asarray(out["view2"])[0], n2.numpy(), atol=5 * ATOL, rtol=0)


def test_pack_unpack_round_trip():
  p = device_augment.sample_params(jax.random.key(3), 50)
  packed = device_augment.pack_params(p)
  assert packed.shape == (50, device_augment.NUM_PARAMS) and packed.dtype == jnp.float32
  back = device_augment.unpack_params(packed)
  for a, b in zip(p, back):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.dtype == b.dtype
  with pytest.raises(ValueError, match="11 values"):
    device_augment.unpack_params(jnp.zeros((4, 10)))


# ----------------------------------------------------------------------------- sampling


def test_sampled_parameters_follow_the_recipe():
  p = jax.tree.map(np.asarray, device_augment.sample_params(jax.random.key(0), N_DRAWS))
  # RandomApply p = 0.8 (sigma 0.0073 over 3000 draws; 4 sigma).
  assert abs(p.apply.mean() - 0.8) < 4 * _binomial_sigma(0.8, N_DRAWS)
  # Exactly one strong op, uniform over 3 (4 sigma = 0.034).
  freq = np.bincount(p.op, minlength=3) / N_DRAWS
  assert freq.shape == (3,) and np.all(np.abs(freq - 1 / 3) < 4 * _binomial_sigma(1 / 3,
                                                                                  N_DRAWS))
  # Order: a permutation, each op first a quarter of the time.
  assert (np.sort(p.order, axis=1) == np.arange(4)).all()
  first = np.bincount(p.order[:, 0], minlength=4) / N_DRAWS
  assert np.all(np.abs(first - 0.25) < 4 * _binomial_sigma(0.25, N_DRAWS))
  for name, lo, hi in [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4),
                       ("saturation", 0.8, 1.2), ("hue", -0.1, 0.1), ("sigma", 0.1, 2.0)]:
    values = getattr(p, name)
    assert values.min() >= lo and values.max() <= hi, name
    assert values.min() < lo + 0.01 * (hi - lo) and values.max() > hi - 0.01 * (hi - lo)
    sigma = (hi - lo) / math.sqrt(12 * N_DRAWS)
    assert abs(values.mean() - (lo + hi) / 2) < 4 * sigma, name
  # Independent draws: the jitter flag does not depend on the strong op.
  for op in range(3):
    sel = p.op == op
    assert abs(p.apply[sel].mean() - 0.8) < 4 * _binomial_sigma(0.8, sel.sum())


def test_jitter_applied_about_80_percent_of_images():
  # Observed on the pixels, not the flags: with solarize as the strong op, an image differs
  # from solarize(x) exactly when the jitter ran (factors are never exactly neutral).
  n = 400
  x = np.broadcast_to(_photo("coffee", 16)[:16, :16], (n, 16, 16, 3))
  p = device_augment.sample_params(jax.random.key(5), n)._replace(op=jnp.ones(n, jnp.int32))
  out = np.asarray(jax.jit(device_augment.colour_augment)(x, p))
  changed = np.abs(out - np.minimum(x, 1 - x)).reshape(n, -1).max(1) > 1e-6
  np.testing.assert_array_equal(changed, np.asarray(p.apply))
  assert abs(changed.mean() - 0.8) < 4 * _binomial_sigma(0.8, n)


def test_strong_view_deterministic_per_key_and_shapes():
  crops = (np.stack([_photo("coffee", 8)[:32, :32], _photo("astronaut", 8)[:32, :32]] * 4)
           * 255).round().astype(np.uint8)
  fn = jax.jit(device_augment.strong_view)
  a, b = fn(crops, jax.random.key(1)), fn(crops, jax.random.key(1))
  c = fn(crops, jax.random.key(2))
  assert a.shape == (8, 32, 32, 3) and a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  # Per-example keys: examples with the same pixels get different augmentations.
  assert not np.allclose(np.asarray(a[0]), np.asarray(a[2]))
  mean, std = image_utils.normalization_constants(3)
  raw = np.asarray(a) * std + mean
  assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5


def test_normalize_and_one_channel():
  u8 = (np.arange(2 * 16 * 16 * 3) % 256).astype(np.uint8).reshape(2, 16, 16, 3)
  mean, std = image_utils.normalization_constants(3)
  np.testing.assert_allclose(np.asarray(device_augment.normalize(u8)),
                             (u8 / 255.0 - mean) / std, atol=1e-6)
  np.testing.assert_allclose(np.asarray(device_augment.normalize(u8 / np.float32(255))),
                             (u8 / 255.0 - mean) / std, atol=1e-6)
  grey = u8[..., :1]
  p = _stack([_params(op=op, hue=0.1) for op in range(2)])
  out = np.asarray(jax.jit(device_augment.colour_augment)(grey, p))
  assert out.shape == (2, 16, 16, 1) and out.dtype == np.float32
  for j in range(2):  # augment.strong_view: grey goes through the ops as RGB, comes back grey
    rgb = np.repeat(grey[j] / np.float32(255), 3, -1)
    expected = _tf_colour(rgb, jax.tree.map(lambda x, j=j: x[j], p))[..., :1]
    np.testing.assert_allclose(out[j], expected, atol=ATOL, rtol=0)
  m1, s1 = image_utils.normalization_constants(1)
  np.testing.assert_allclose(np.asarray(device_augment.normalize(grey)),
                             (grey / 255.0 - m1) / s1, atol=1e-6)


def test_module_does_not_import_tensorflow():
  script = textwrap.dedent("""
      import sys
      sys.modules["tensorflow"] = None
      import lut_jax.data.device_augment
      """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                        text=True, check=False, env={**os.environ, "PYTHONPATH": root})
  assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("jpegs")
  rng = np.random.default_rng(0)
  for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"] * 2):
    image = (_photo(name, int(rng.integers(5, 9))) * 255).astype(np.uint8)
    folder = root / f"class_{i % 2}"
    folder.mkdir(exist_ok=True)
    tf.io.write_file(str(folder / f"{i:02d}.jpg"), tf.io.encode_jpeg(image, quality=90))
  return str(root)


def _folder_config(folder, **overrides) -> ml_collections.ConfigDict:
  config = config_lib.base_config().input
  config.update(dict(
      dataset=f"folder:{folder}", split="train", image_size=32, channels=3, batch_size=8,
      shuffle_buffer=8))
  config.update(overrides)
  return config.lock()


def test_pipeline_device_augment_matches_host_views(jpeg_folder):
  host = next(input_pipeline.create_pretrain_iterator(_folder_config(jpeg_folder), seed=5))
  it = input_pipeline.create_pretrain_iterator(
      _folder_config(jpeg_folder, device_augment=True), seed=5)
  raw = next(it)
  assert set(raw) == {"view1_crop", "view2_crop", "view2_params"}
  assert raw["view1_crop"].dtype == np.uint8 and raw["view1_crop"].shape == (8, 32, 32, 3)
  assert raw["view2_crop"].dtype == np.uint8 and raw["view2_crop"].shape == (8, 32, 32, 3)
  assert raw["view2_params"].shape == (8, device_augment.NUM_PARAMS)
  out = jax.jit(device_augment.finish_batch)(raw)
  assert set(out) == {"view1", "view2"}
  std = image_utils.normalization_constants(3)[1]
  # The only difference: the host rounds the crops to uint8 (at most half a grey level);
  # view 1 carries it as is, view 2 through the colour ops, which can scale a difference by
  # at most the product of the jitter factors (1.4 * 1.4 * 1.2) and the hue's mid-channel
  # interpolation (<= 2): a bound of ~5 grey levels, typically far below it.
  d1 = np.abs(np.asarray(out["view1"]) - host["view1"]) * std
  d2 = np.abs(np.asarray(out["view2"]) - host["view2"]) * std
  assert d1.max() <= 0.5 / 255 + 1e-6
  assert d2.max() <= 5 / 255 and d2.mean() < 0.5 / 255, (d2.max() * 255, d2.mean() * 255)


def test_pipeline_device_augment_sharded(jpeg_folder):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  config = _folder_config(jpeg_folder, device_augment=True, batch_size=len(jax.devices()))
  batch = next(input_pipeline.create_pretrain_iterator(config, seed=1, sharding=sharding))
  local = next(input_pipeline.create_pretrain_iterator(config, seed=1))
  for k, v in batch.items():
    assert v.sharding == sharding
    np.testing.assert_array_equal(np.asarray(v), local[k])
  out = jax.jit(device_augment.finish_batch)(batch)
  assert out["view2"].sharding.is_equivalent_to(sharding, 4)
  np.testing.assert_allclose(np.asarray(out["view2"]),
                             np.asarray(device_augment.finish_batch(local)["view2"]),
                             atol=5 * ATOL, rtol=0)  # per-shard vs whole-batch compilation
