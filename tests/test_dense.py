"""``vit.Dense``: ``nn.Dense``'s parameters and values, computed as one 2-D product whose
weight gradient XLA:CPU compiles to a plain ``x^T g`` (docs/benchmarks.md)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lut_jax.models import vit

SHAPE = (4, 13, 24)  # (batch, tokens, width), as in the blocks


def _inputs():
  rng = np.random.default_rng(0)
  return rng.standard_normal(SHAPE).astype(np.float32), rng.standard_normal(
      SHAPE[:-1] + (12,)).astype(np.float32)


def test_parameters_and_initialisation_are_those_of_flax_dense():
  x = jnp.zeros(SHAPE)
  ours = vit.Dense(12).init(jax.random.key(1), x)
  flax_dense = nn.Dense(12, kernel_init=vit.dense_init).init(jax.random.key(1), x)
  assert jax.tree.structure(ours) == jax.tree.structure(flax_dense)
  jax.tree.map(np.testing.assert_array_equal, ours, flax_dense)
  no_bias = vit.Dense(12, use_bias=False).init(jax.random.key(1), x)
  assert set(no_bias["params"]) == {"kernel"}


@pytest.mark.parametrize("parts", [1, 3])
def test_output_and_gradients_match_numpy(parts):
  x, cotangent = _inputs()
  dense = vit.Dense(12, parts=parts)
  params = dense.init(jax.random.key(2), x)["params"]
  params = {"kernel": params["kernel"], "bias": params["bias"] + 0.5}  # a bias that shows

  def apply(p, x):
    out = dense.apply({"params": p}, x)
    return jnp.concatenate(out, axis=-1) if parts > 1 else out

  out, vjp = jax.vjp(apply, params, jnp.asarray(x))
  grads, grad_x = vjp(jnp.asarray(cotangent))
  w, b = np.asarray(params["kernel"], np.float64), np.asarray(params["bias"], np.float64)
  rows, g = x.reshape(-1, SHAPE[-1]).astype(np.float64), cotangent.reshape(-1, 12)
  np.testing.assert_allclose(out, (rows @ w + b).reshape(cotangent.shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads["kernel"], rows.T @ g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads["bias"], g.sum(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_x, (g @ w.T).reshape(SHAPE), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's lowering")
def test_weight_gradient_compiles_to_one_plain_product_on_cpu():
  """The regression this module exists for: on ``(batch, tokens, width)`` input,
  ``dot_general`` contracting the last axis gives a weight gradient contracting two axes,
  which XLA:CPU lowers with a transposed copy of ``g`` and a product of two transposed
  operands. Ours must stay one ``x^T g``: both operands contracted on their row axis."""
  x, cotangent = _inputs()
  dense = vit.Dense(12)
  params = dense.init(jax.random.key(2), x)["params"]

  def kernel_grad(kernel, x, g):
    _, vjp = jax.vjp(lambda k: dense.apply({"params": dict(params, kernel=k)}, x), kernel)
    return vjp(g)[0]

  hlo = jax.jit(kernel_grad).lower(params["kernel"], x, cotangent).compile().as_text()
  dots = re.findall(r"= f32\[(\d+),(\d+)\]\S* dot\(.*?lhs_contracting_dims=\{([\d,]+)\}, "
                    r"rhs_contracting_dims=\{([\d,]+)\}", hlo)
  assert dots == [("24", "12", "0", "0")], dots
