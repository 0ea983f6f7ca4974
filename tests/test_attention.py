"""The attention wrapper: padding odd sequences for cuDNN must not change the result."""

import jax
import jax.numpy as jnp
import numpy as np

from lut_jax import models


def numpy_attention(q, k, v):
  """Softmax attention on (B, T, N, H) arrays, written out in numpy (float64)."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
  logits -= logits.max(-1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknh->bqnh", probs, v)


def random_qkv(length, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (2, length, 3, 8)) for key in keys)


def test_padded_attention_matches_numpy_for_odd_lengths():
  q, k, v = random_qkv(7)
  for pad in (1, 3):
    out = models.padded_attention(q, k, v, pad=pad, implementation="xla")
    assert out.shape == q.shape
    np.testing.assert_allclose(out, numpy_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_padded_attention_gradients_match_unpadded():
  """The padded token gets no gradient and changes none of the real tokens' gradients."""
  q, k, v = random_qkv(5, seed=1)
  weights = jax.random.normal(jax.random.key(9), q.shape)

  def loss(attention, q, k, v):
    return jnp.sum(attention(q, k, v) * weights)

  plain = jax.grad(lambda *a: loss(jax.nn.dot_product_attention, *a), argnums=(0, 1, 2))
  padded = jax.grad(
      lambda *a: loss(lambda q, k, v: models.padded_attention(
          q, k, v, pad=1, implementation="xla"), *a), argnums=(0, 1, 2))
  for got, want in zip(padded(q, k, v), plain(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_wrapper_pads_only_odd_cudnn_sequences(monkeypatch):
  """cuDNN requests with odd lengths go through the padded path; the rest go straight."""
  calls = []

  def fake_attention(q, k, v, *, implementation=None, **kwargs):
    calls.append((q.shape[1], implementation, sorted(kwargs)))
    return q

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_attention)
  for length, impl in ((7, "cudnn"), (8, "cudnn"), (7, "xla"), (7, None)):
    q = jnp.zeros((1, length, 2, 8))
    out = models.dot_product_attention(q, q, q, implementation=impl)
    assert out.shape == q.shape
  assert calls == [
      (8, "cudnn", ["key_value_seq_lengths", "query_seq_lengths"]),
      (8, "cudnn", []), (7, "xla", []), (7, None, [])]
