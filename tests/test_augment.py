"""Tests of the two-view augmentation ops (lut_jax.data.augment) on real photos.

Photos come from scikit-image (astronaut, coffee, chelsea, camera); torchvision semantics
are checked against numpy/scipy/skimage re-statements of its formulas (torch is not needed).
Statistical tests use fixed seeds; each states its tolerance in sigmas of the binomial.
"""

import io
import math

import numpy as np
from PIL import Image
import pytest
import scipy.ndimage
import skimage.color
import skimage.data
import tensorflow as tf

from lut_jax.data import augment, image_utils

N_DRAWS = 3000  # draws per statistical test: cheap in one batched tf.data pass


def _photo(name: str) -> np.ndarray:
  return getattr(skimage.data, name)()


def _float(image: np.ndarray) -> tf.Tensor:
  return tf.constant(image.astype(np.float32) / 255.0)


def _seed(i: int) -> tf.Tensor:
  return tf.constant([1234, i], tf.int64)


def _draws(fn, n: int = N_DRAWS):
  """Evaluates ``fn(seed)`` for ``n`` seeds in one tf.data pass; returns numpy, stacked."""
  ds = tf.data.Dataset.range(n).map(lambda i: fn(tf.stack([tf.constant(99, tf.int64), i])))
  return next(iter(ds.batch(n).as_numpy_iterator()))


def _binomial_sigma(p: float, n: int) -> float:
  return math.sqrt(p * (1 - p) / n)


# ----------------------------------------------------------------------------- decode/resize


def test_decode_grey_rgb_and_jpeg():
  grey = _photo("camera")[:40, :50, None]
  out = augment.decode(tf.constant(grey), channels=3).numpy()
  assert out.shape == (40, 50, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  np.testing.assert_allclose(out[..., 0], grey[..., 0] / 255.0, atol=1e-7)

  rgb = _photo("coffee")[:40, :50]
  grey_out = augment.decode(tf.constant(rgb), channels=1).numpy()
  assert grey_out.shape == (40, 50, 1)
  expected = (rgb.astype(np.float64) / 255.0) @ np.array(augment.GRAY_WEIGHTS)
  np.testing.assert_allclose(grey_out[..., 0], expected, atol=1e-6)

  jpeg = tf.io.encode_jpeg(tf.constant(rgb), quality=95)
  decoded = augment.decode(jpeg, channels=3).numpy()
  assert decoded.shape == (40, 50, 3)
  assert np.abs(decoded - rgb / 255.0).mean() < 0.02  # JPEG at q95: small error


def test_jpeg_decodes_as_pil_does():
  """The reference reads images with PIL; its JPEG decoder (libjpeg's accurate integer DCT)
  is the one to match, to the pixel, and TF's default (fast DCT) is not it."""
  buffer = io.BytesIO()
  Image.fromarray(_photo("astronaut")).save(buffer, format="JPEG", quality=90)
  pil = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
  ours = augment.decode(tf.constant(buffer.getvalue()), channels=3).numpy()
  np.testing.assert_array_equal(np.round(ours * 255.0).astype(np.uint8), pil)
  fast = tf.io.decode_image(buffer.getvalue(), channels=3).numpy()
  assert (fast != pil).mean() > 0.01  # what decode_image alone would give


@pytest.mark.parametrize("name,size,expected", [
    ("coffee", 224, (224, 336)),   # 400x600: long side int(224 * 600 / 400) = 336
    ("chelsea", 224, (224, 336)),  # 300x451: int(224 * 451 / 300) = int(336.7) = 336
    ("astronaut", 64, (64, 64)),
])
def test_resize_shorter_side(name, size, expected):
  out = augment.resize_shorter_side(_float(_photo(name)), size).numpy()
  assert out.shape[:2] == expected
  assert out.min() >= 0.0 and out.max() <= 1.0
  # Bicubic keeps the picture: the mean grey level moves by well under one percent.
  assert abs(out.mean() - _photo(name).mean() / 255.0) < 0.01


def test_resize_is_identity_at_target_size():
  image = _float(_photo("astronaut")[:32, :48])
  np.testing.assert_array_equal(augment.resize_shorter_side(image, 32).numpy(), image.numpy())


# ----------------------------------------------------------------------------- geometry


def test_crop_stays_in_padding_window_and_flips():
  """A unique marker pixel moves by at most 4 px in each direction (reflect padding 4)."""
  size, r, c = 32, 10, 13
  image = _photo("chelsea")[100:100 + size, 200:200 + size].astype(np.float32) / 255.0
  marker = np.array([1.0, 0.0, 1.0], np.float32)  # magenta: absent from the photo
  assert not np.any(np.all(image == marker, axis=-1))
  image[r, c] = marker
  image_t = tf.constant(image)

  def draw(seed):
    params = augment.sample_crop_flip(seed, size, size, size)
    return params, augment.crop_flip(image_t, params, size)

  (oy, ox, flip), crops = _draws(draw, 800)
  assert crops.shape == (800, size, size, 3)
  # Offsets are uniform over every position of the padded (size + 8) image: 0..8.
  assert set(oy) == set(range(9)) and set(ox) == set(range(9))
  for k in range(800):
    hits = np.argwhere(np.all(crops[k] == marker, axis=-1))
    assert len(hits) == 1
    row, col = hits[0]
    unflipped_col = size - 1 - col if flip[k] else col
    assert row == r + augment.PADDING - oy[k]
    assert unflipped_col == c + augment.PADDING - ox[k]
    assert abs(row - r) <= 4 and abs(unflipped_col - c) <= 4
  # Flip p = 0.5 over 800 draws: sigma = 0.018; 0.07 is ~4 sigma.
  assert abs(flip.mean() - 0.5) < 0.07


def test_reflect_padding_matches_numpy():
  image = _float(_photo("astronaut")[:20, :24])
  params = augment.CropFlip(tf.constant(0), tf.constant(0), tf.constant(False))
  crop = augment.crop_flip(image, params, 20).numpy()
  padded = np.pad(image.numpy(), ((4, 4), (4, 4), (0, 0)), mode="reflect")
  np.testing.assert_array_equal(crop, padded[:20, :20])


def test_center_crop_matches_torchvision_rounding():
  image = tf.reshape(tf.range(7 * 10, dtype=tf.float32), [7, 10, 1])
  crop = augment.center_crop(image, 4).numpy()[..., 0]
  # torchvision: top = int(round((7 - 4) / 2)) = 2, left = int(round((10 - 4) / 2)) = 3.
  np.testing.assert_array_equal(crop, image.numpy()[2:6, 3:7, 0])


# ----------------------------------------------------------------------------- colour


def _np_gray(x):
  return x @ np.array(augment.GRAY_WEIGHTS)


def _np_blend(a, b, ratio):
  return np.clip(ratio * a + (1 - ratio) * b, 0, 1)


def _np_jitter_op(name, x, factor):
  """torchvision's functional definitions (F.adjust_*), restated in numpy."""
  if name == "brightness":
    return _np_blend(x, 0.0, factor)
  if name == "contrast":
    return _np_blend(x, _np_gray(x).mean(), factor)
  if name == "saturation":
    return _np_blend(x, _np_gray(x)[..., None], factor)
  hsv = skimage.color.rgb2hsv(x)
  hsv[..., 0] = (hsv[..., 0] + factor) % 1.0
  return skimage.color.hsv2rgb(hsv)


@pytest.mark.parametrize("name,fn,factor", [
    ("brightness", augment.adjust_brightness, 1.3),
    ("brightness", augment.adjust_brightness, 0.6),
    ("contrast", augment.adjust_contrast, 0.7),
    ("contrast", augment.adjust_contrast, 1.4),
    ("saturation", augment.adjust_saturation, 1.2),
    ("saturation", augment.adjust_saturation, 0.8),
    ("hue", augment.adjust_hue, 0.07),
    ("hue", augment.adjust_hue, -0.1),
])
def test_jitter_ops_match_torchvision_semantics(name, fn, factor):
  x = _photo("coffee")[::4, ::4].astype(np.float64) / 255.0
  out = fn(tf.constant(x, tf.float32), tf.constant(factor, tf.float32)).numpy()
  np.testing.assert_allclose(out, _np_jitter_op(name, x, factor), atol=2e-5)


def test_color_jitter_factor_ranges_and_probability():
  p = _draws(augment.sample_color_jitter)
  for name, lo, hi in [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4),
                       ("saturation", 0.8, 1.2), ("hue", -0.1, 0.1)]:
    values = getattr(p, name)
    assert values.min() >= lo and values.max() <= hi, name
    # Uniform over [lo, hi]: 3000 draws come within 1% of the range of each end (the chance
    # of missing is (0.99)^3000 ~ 1e-13), and the mean is within 4 sigma of the centre.
    assert values.min() < lo + 0.01 * (hi - lo) and values.max() > hi - 0.01 * (hi - lo)
    sigma = (hi - lo) / math.sqrt(12 * N_DRAWS)
    assert abs(values.mean() - (lo + hi) / 2) < 4 * sigma, name
  # RandomApply p = 0.8: sigma = 0.0073 over 3000 draws; 0.03 is ~4 sigma.
  assert abs(p.apply.mean() - 0.8) < 4 * _binomial_sigma(0.8, N_DRAWS)
  # Order: a permutation; each op comes first a quarter of the time (4 sigma).
  assert (np.sort(p.order, axis=1) == np.arange(4)).all()
  first = np.bincount(p.order[:, 0], minlength=4) / N_DRAWS
  assert np.all(np.abs(first - 0.25) < 4 * _binomial_sigma(0.25, N_DRAWS))


def test_color_jitter_applies_ops_in_sampled_order():
  x = _photo("astronaut")[::8, ::8].astype(np.float64) / 255.0
  for i in range(6):
    params = augment.sample_color_jitter(_seed(i), p=1.0)
    out = augment.color_jitter(tf.constant(x, tf.float32), params).numpy()
    expected = x
    for op in params.order.numpy():
      name = augment.JITTER_OPS[op]
      expected = _np_jitter_op(name, expected, getattr(params, name).numpy())
    np.testing.assert_allclose(out, expected, atol=5e-5)
  skip = augment.sample_color_jitter(_seed(0), p=0.0)
  np.testing.assert_array_equal(
      augment.color_jitter(tf.constant(x, tf.float32), skip).numpy(), x.astype(np.float32))


def test_solarize_threshold():
  levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
  out = augment.solarize(tf.constant(levels / 255.0, tf.float32)).numpy()
  out = np.round(out * 255).astype(np.uint8)
  # PIL ImageOps.solarize(threshold=128): v >= 128 -> 255 - v, else unchanged.
  expected = np.where(levels >= 128, 255 - levels, levels)
  np.testing.assert_array_equal(out, expected)
  assert out.reshape(-1, 3)[127, 0] == 127 and out.reshape(-1, 3)[128, 0] == 127


def test_grayscale_has_equal_channels():
  x = _float(_photo("coffee")[::4, ::4])
  out = augment.grayscale(x).numpy()
  assert out.shape == x.shape
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 1], out[..., 2])
  np.testing.assert_allclose(out[..., 0], _np_gray(x.numpy().astype(np.float64)), atol=1e-6)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_gaussian_blur_matches_scipy(sigma):
  x = _photo("chelsea")[50:114, 100:164].astype(np.float64) / 255.0
  out = augment.gaussian_blur(tf.constant(x, tf.float32), tf.constant(sigma)).numpy()
  # scipy's "reflect" is TF's SYMMETRIC; both truncate the kernel at round(4 sigma).
  expected = scipy.ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_blur_keeps_constant_images_and_smooths():
  flat = tf.fill([32, 32, 3], 0.3)
  np.testing.assert_allclose(augment.gaussian_blur(flat, tf.constant(1.5)).numpy(), 0.3,
                             atol=1e-6)
  x = _float(_photo("astronaut")[::8, ::8])
  blurred = augment.gaussian_blur(x, tf.constant(2.0)).numpy()
  grad = lambda a: np.abs(np.diff(a, axis=0)).mean()  # noqa: E731
  assert grad(blurred) < 0.5 * grad(x.numpy())


def test_strong_ops_each_chosen_a_third_of_the_time():
  p = _draws(augment.sample_strong_op)
  freq = np.bincount(p.op, minlength=3) / N_DRAWS
  assert set(np.unique(p.op)) == {0, 1, 2}
  # Uniform over 3 ops: sigma = 0.0086 over 3000 draws; 4 sigma = 0.034.
  assert np.all(np.abs(freq - 1 / 3) < 4 * _binomial_sigma(1 / 3, N_DRAWS)), freq
  assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
  assert p.sigma.min() < 0.12 and p.sigma.max() > 1.98  # reaches both ends (see above)


def test_apply_strong_op_dispatch():
  x = _float(_photo("coffee")[::8, ::8])
  sigma = tf.constant(1.0)
  for op, fn in [(0, augment.grayscale), (1, augment.solarize),
                 (2, lambda im: augment.gaussian_blur(im, sigma))]:
    out = augment.apply_strong_op(x, augment.StrongOp(tf.constant(op), sigma)).numpy()
    np.testing.assert_array_equal(out, fn(x).numpy())


# ----------------------------------------------------------------------------- views


def test_views_shapes_ranges_reproducible_and_different():
  image = _float(_photo("astronaut"))
  v1, v2 = augment.two_views(image, _seed(0), 224, normalized=False)
  assert v1.shape == (224, 224, 3) and v2.shape == (224, 224, 3)
  assert v1.dtype == tf.float32
  for v in (v1, v2):
    assert 0.0 <= v.numpy().min() and v.numpy().max() <= 1.0
  assert not np.allclose(v1.numpy(), v2.numpy())
  again = augment.two_views(image, _seed(0), 224, normalized=False)
  np.testing.assert_array_equal(again[0].numpy(), v1.numpy())
  np.testing.assert_array_equal(again[1].numpy(), v2.numpy())
  other = augment.two_views(image, _seed(1), 224, normalized=False)
  assert not np.array_equal(other[1].numpy(), v2.numpy())

  n1, n2 = augment.two_views(image, _seed(0), 224)
  mean, std = image_utils.IMAGENET_MEAN, image_utils.IMAGENET_STD
  np.testing.assert_allclose(n1.numpy(), (v1.numpy() - mean) / std, atol=1e-5)
  np.testing.assert_allclose(n2.numpy() * std + mean, v2.numpy(), atol=1e-5)
  lo, hi = (0 - mean) / std, (1 - mean) / std
  assert np.all(n2.numpy() >= lo - 1e-5) and np.all(n2.numpy() <= hi + 1e-5)


def test_strong_view_of_grey_image_keeps_channels_equal():
  grey = augment.decode(tf.constant(_photo("camera")[::8, ::8, None]), channels=3)
  for i in range(30):
    _, v2 = augment.two_views(grey, _seed(i), 48, normalized=False)
    v2 = v2.numpy()
    np.testing.assert_allclose(v2[..., 0], v2[..., 1], atol=1e-6)
    np.testing.assert_allclose(v2[..., 1], v2[..., 2], atol=1e-6)


def test_one_channel_views_and_normalisation():
  grey = augment.decode(tf.constant(_photo("coffee")[::4, ::4]), channels=1)
  v1, v2 = augment.two_views(grey, _seed(3), 64)
  assert v1.shape == (64, 64, 1) and v2.shape == (64, 64, 1)
  mean, std = image_utils.normalization_constants(1)
  assert mean == pytest.approx((0.449,)) and std == pytest.approx((0.226,), abs=1e-3)
  raw1, _ = augment.two_views(grey, _seed(3), 64, normalized=False)
  np.testing.assert_allclose(v1.numpy(), (raw1.numpy() - mean[0]) / std[0], atol=1e-5)


def test_eval_view():
  image = _float(_photo("chelsea"))  # 300 x 451
  out = augment.eval_view(image, 224, 224 / 256, normalized=False).numpy()
  assert out.shape == (224, 224, 3)
  small = _float(_photo("astronaut")[:28, :28])
  np.testing.assert_array_equal(augment.eval_view(small, 28, 1.0, normalized=False).numpy(),
                                small.numpy())


def test_check_image_size():
  for bad in (0, 8, 15, 28.0, "224", True):
    with pytest.raises(ValueError, match="image_size"):
      image_utils.check_image_size(bad)
  image_utils.check_image_size(16)
  image_utils.check_image_size(224)
