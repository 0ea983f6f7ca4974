"""Losses against numpy on hand-made inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lut_jax.pretrain import losses


def np_patchify(images, p):
  n, h, w, c = images.shape
  out = np.zeros((n, (h // p) * (w // p), p * p * c), images.dtype)
  for i in range(h // p):
    for j in range(w // p):
      out[:, i * (w // p) + j] = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(n, -1)
  return out


def test_patchify_order_and_inverse():
  images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  patches = losses.patchify(jnp.asarray(images), 4)
  np.testing.assert_array_equal(patches, np_patchify(images, 4))
  np.testing.assert_array_equal(losses.unpatchify(patches, 4, 3), images)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_loss_matches_numpy(norm_pix):
  rng = np.random.default_rng(1)
  images = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  pred = rng.normal(size=(3, 4, 48)).astype(np.float32)
  mask = np.array([[1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 0]], np.float32)
  target = np_patchify(images, 4).astype(np.float64)
  if norm_pix:
    target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
        target.var(-1, ddof=1, keepdims=True) + 1e-6)
  per_patch = ((pred - target) ** 2).mean(-1)
  want = (per_patch * mask).sum() / mask.sum()
  got = losses.reconstruction_loss(jnp.asarray(pred), jnp.asarray(images), jnp.asarray(mask),
                                   patch_size=4, norm_pix=norm_pix)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_bc_loss_extremes_and_value():
  v = jnp.array([[1.0, 2.0, -3.0], [0.5, 0.0, 1.0]])
  assert float(losses.bc_loss(v, v, 3 * v, 0.1 * v)) == pytest.approx(0.0, abs=1e-6)
  assert float(losses.bc_loss(v, v, -v, -2 * v)) == pytest.approx(4.0, abs=1e-6)
  rng = np.random.default_rng(2)
  q1, q2, z1, z2 = (rng.normal(size=(5, 7)) for _ in range(4))
  cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)  # noqa
  want = 0.5 * ((2 - 2 * cos(q2, z1)).mean() + (2 - 2 * cos(q1, z2)).mean())
  got = losses.bc_loss(*(jnp.asarray(x, jnp.float32) for x in (q1, q2, z1, z2)))
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_total_loss_weights():
  assert float(losses.total_loss(jnp.float32(2.0), jnp.float32(3.0), w_mae=1.0, w_bc=0.25)) \
      == pytest.approx(2.75)
  assert float(losses.total_loss(jnp.float32(2.0), 0.0, w_mae=1.0, w_bc=0.0)) == 2.0


def test_zero_vectors_do_not_produce_nan():
  z = jnp.zeros((2, 4))
  assert np.isfinite(float(losses.bc_loss(z, z, z, z)))
  assert np.all(np.isfinite(jax.grad(lambda a: losses.bc_loss(a, a, z + 1, z + 1))(z)))


def test_normalized_std_matches_numpy_and_reads_collapse():
  rng = np.random.default_rng(3)
  v = rng.normal(size=(64, 16)).astype(np.float32)
  unit = v / np.linalg.norm(v, axis=1, keepdims=True)
  np.testing.assert_allclose(losses.normalized_std(jnp.asarray(v)),
                             unit.std(axis=0).mean(), rtol=1e-5)
  # Well spread: about 1/sqrt(dim). Collapsed (every row one direction, any scale): 0.
  assert abs(float(losses.normalized_std(jnp.asarray(v))) - 1 / np.sqrt(16)) < 0.03
  collapsed = np.outer(rng.uniform(0.5, 2.0, size=64), rng.normal(size=16))
  assert float(losses.normalized_std(jnp.asarray(collapsed))) < 1e-6
