"""The attention wrapper: padding odd sequences for cuDNN must not change the result."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lut_jax.models import vit
from lut_jax.pretrain import train_state
from tests import util


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


def test_valid_length_masks_the_padding():
  """Tokens past ``valid_length`` change nothing in the valid rows (numpy reference)."""
  q, k, v = random_qkv(7)
  noise = random_qkv(3, seed=5)
  padded = [jnp.concatenate([t, n], axis=1) for t, n in zip((q, k, v), noise)]
  out = vit.dot_product_attention(*padded, valid_length=7, implementation="xla")
  assert out.shape == padded[0].shape
  np.testing.assert_allclose(out[:, :7], numpy_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_per_call_padding_matches_numpy_and_unpadded_gradients(monkeypatch):
  """The per-call pad (forced here for XLA on an odd length) keeps values and gradients."""
  monkeypatch.setattr(vit, "attention_padding", lambda length, impl: length % 2)
  q, k, v = random_qkv(5, seed=1)
  weights = jax.random.normal(jax.random.key(9), q.shape)
  padded_attention = functools.partial(vit.dot_product_attention, implementation="xla")
  np.testing.assert_allclose(padded_attention(q, k, v), numpy_attention(q, k, v),
                             rtol=1e-5, atol=1e-6)

  def loss(attention, q, k, v):
    return jnp.sum(attention(q, k, v) * weights)

  want = jax.grad(functools.partial(loss, jax.nn.dot_product_attention), argnums=(0, 1, 2))
  got = jax.grad(functools.partial(loss, padded_attention), argnums=(0, 1, 2))
  for g, w in zip(got(q, k, v), want(q, k, v)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_wrapper_pads_only_odd_cudnn_sequences(monkeypatch):
  """cuDNN requests with odd lengths get one padding token; the rest go straight."""
  calls = []

  def fake_attention(q, k, v, *, implementation=None, **kwargs):
    calls.append((q.shape[1], implementation, sorted(kwargs)))
    return q

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_attention)
  for length, impl in ((7, "cudnn"), (8, "cudnn"), (7, "xla"), (7, None)):
    q = jnp.zeros((1, length, 2, 8))
    out = vit.dot_product_attention(q, q, q, implementation=impl)
    assert out.shape == q.shape
  assert calls == [
      (8, "cudnn", ["key_value_seq_lengths", "query_seq_lengths"]),
      (8, "cudnn", []), (7, "xla", []), (7, None, [])]


@pytest.mark.parametrize("remat", [False, True])
def test_stack_padding_keeps_encoder_and_decoder_outputs_and_gradients(monkeypatch, remat):
  """Padding once per block stack (as cuDNN needs, forced here for XLA) changes neither
  the student/teacher encoders and decoder nor their parameter gradients."""
  model = util.tiny_model(remat=remat)
  images = jax.random.normal(jax.random.key(0), (2, util.IMAGE_SIZE, util.IMAGE_SIZE, 3))
  keep = jnp.array([[0, 5, 9, 14], [3, 4, 8, 15]])  # 1 + 4 tokens: odd, as is 1 + 16
  restore = jnp.tile(jnp.arange(16), (2, 1))
  variables = train_state.init_variables(model, jax.random.key(1))

  def outputs(params):
    v = {**variables, "params": params}
    full = model.apply(v, images, None, method=lambda m, *a: m.encoder(*a))
    latent = model.apply(v, images, keep, method=lambda m, *a: m.encoder(*a))
    pred = model.apply(v, latent, restore, method=lambda m, *a: m.decoder(*a))
    return full, latent, pred

  def loss(params):
    return sum(jnp.sum(jnp.sin(o)) for o in outputs(params))

  want, want_grad = outputs(variables["params"]), jax.grad(loss)(variables["params"])
  monkeypatch.setattr(vit, "attention_padding", lambda length, impl: length % 2)
  got, got_grad = outputs(variables["params"]), jax.grad(loss)(variables["params"])
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # Float32 sums in another order (one more token per reduction): ~1e-6 apart.
  chex.assert_trees_all_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)


class _FakeClient:
  def __init__(self, platform_version):
    self.platform_version = platform_version


class _FakeDevice:
  def __init__(self, platform, platform_version):
    self.platform, self.client = platform, _FakeClient(platform_version)


@pytest.mark.parametrize("platform, version, dtype, expected", [
    ("gpu", "cuda 12080", jnp.bfloat16, "cudnn"),
    ("gpu", "cuda 12080", jnp.float32, None),   # cuDNN has no float32 kernel
    ("gpu", "rocm 6.2", jnp.bfloat16, None),    # AMD GPU: no cuDNN
    ("tpu", "PJRT C API", jnp.bfloat16, None),
    ("cpu", "cpu", jnp.bfloat16, None),
])
def test_default_attention_impl(monkeypatch, platform, version, dtype, expected):
  monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice(platform, version)])
  assert vit.default_attention_impl(dtype) == expected


def test_build_model_resolves_the_empty_attention_impl_on_this_machine():
  from lut_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.model.variant = "mu/4"
  model = vit.build_model(config.model, image_size=16, channels=3, use_bc=True,
                             dtype=jnp.bfloat16)
  assert model.attention_impl is None  # the test machines are CPUs: XLA's attention
  config.model.attention_impl = "xla"
  assert vit.build_model(config.model, image_size=16, channels=3, use_bc=True,
                            dtype=jnp.bfloat16).attention_impl == "xla"


def test_sown_attention_maps_leave_the_stack_padding_out(monkeypatch):
  """The analysis path (``intermediates`` mutable) reports maps over the real tokens only,
  equal to the unpadded ones, when the stack pads for cuDNN (forced here for XLA)."""
  model = util.tiny_model()
  variables = train_state.init_variables(model, jax.random.key(1))
  images = jax.random.normal(jax.random.key(0), (2, util.IMAGE_SIZE, util.IMAGE_SIZE, 3))

  def maps():
    _, state = model.apply(variables, images, mutable=["intermediates"],
                           method=lambda m, x: m.encoder(x))
    return jax.tree.leaves(state["intermediates"])

  want = maps()
  monkeypatch.setattr(vit, "attention_padding", lambda length, impl: length % 2)
  got = maps()
  assert len(got) == len(want) == model.depth
  for g, w in zip(got, want):
    assert g.shape == w.shape == (2, model.num_heads, 17, 17)
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_major_attention_matches_numpy_and_jax_values_and_gradients(dtype):
  """The teacher's form of XLA attention: numpy's values, and where it is differentiated
  anyway (it is only a speed choice), ``jax.nn.dot_product_attention``'s gradients."""
  q, k, v = (t.astype(dtype) for t in random_qkv(7, seed=3))
  got = vit.head_major_attention(q, k, v)
  assert got.shape == q.shape and got.dtype == dtype
  want = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, numpy_attention(q, k, v), rtol=1e-5, atol=1e-6)
  else:  # the same float32 logits and softmax, rounded to bf16 at the same two places
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=2e-2, atol=2e-2)
    return
  weights = jax.random.normal(jax.random.key(9), q.shape)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, k, v)
           for f in (vit.head_major_attention, jax.nn.dot_product_attention)]
  for g, w in zip(*grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_only_forward_only_calls_take_the_head_major_form(monkeypatch):
  """The teacher (and feature extraction) run the head-major form, the student does not;
  the encoder computes the same function either way."""
  calls = []
  head_major = vit.head_major_attention
  monkeypatch.setattr(vit, "head_major_attention",
                      lambda *a: calls.append(a[0].shape) or head_major(*a))
  model = util.tiny_model()
  variables = train_state.init_variables(model, jax.random.key(1))
  images = jax.random.normal(jax.random.key(0), (2, util.IMAGE_SIZE, util.IMAGE_SIZE, 3))
  calls.clear()

  def encode(forward_only):
    return model.apply(variables, images, method=lambda m, x: m.encoder(
        x, forward_only=forward_only))

  want = encode(False)
  assert not calls
  np.testing.assert_allclose(encode(True), want, rtol=1e-5, atol=1e-6)
  assert len(calls) == model.depth
  calls.clear()
  keep = jnp.array([[0, 5, 9, 14], [3, 4, 8, 15]])
  model.apply(variables, images, images, keep, keep, jnp.tile(jnp.arange(16), (2, 1)),
              method=vit.LUTModel.student, mutable=["batch_stats"])
  assert not calls
  model.apply(variables, images, images, method=vit.LUTModel.teacher)
  assert calls == [(4, 17, model.num_heads, model.width // model.num_heads)] * model.depth
