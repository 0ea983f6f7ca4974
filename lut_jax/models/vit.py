"""Flax Linen modules of LUT: ViT encoder, MAE decoder, projector/predictor heads.

Images are NHWC, tokens ``(batch, length, width)``. Submodule and parameter names follow the
reference PyTorch code (``patch_embed``, ``blocks_N``, ``decoder_pred``, ``head``, ...), so
:mod:`lut_jax.weights.convert` maps one onto the other. Modules are pure: masking indices
come in as arguments (:mod:`lut_jax.pretrain.masking`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lut_jax.models import variants

Dtype = Any

# The reference initialises every Linear (and the patch projection, viewed as a Linear)
# with Xavier-uniform and zero bias; cls and mask tokens with N(0, 0.02).
dense_init = nn.initializers.xavier_uniform()
# Xavier over the flattened (p*p*C -> D) view of the patch-embedding convolution kernel.
patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
token_init = nn.initializers.normal(stddev=0.02)


def sincos_pos_embed_2d(width: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, shape ``(grid_size**2 [+1], width)``. Half of
  the channels encode the column, half the row (each as sin then cos over ``width // 4``
  frequencies ``1 / 10000**(i / (width/4))``), the MAE convention. The cls position (first row,
  when requested) is all zeros. It is a constant, never trained."""
  if width % 4:
    raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {width}")
  quarter = width // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                           np.arange(grid_size, dtype=np.float64), indexing="ij")

  def encode(positions: np.ndarray) -> np.ndarray:
    angles = positions.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  emb = np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)
  if cls_token:
    emb = np.concatenate([np.zeros((1, width), np.float32), emb], axis=0)
  return emb


class BatchNorm(nn.Module):
  """Batch normalisation over axis 0 with PyTorch's semantics: the running variance takes the
  *unbiased* batch variance, ``momentum`` weighs the new batch (0.1). Under ``jax.jit`` with a
  batch-sharded input the statistics are the global batch's, as SyncBatchNorm's. ``group_size``
  > 0 normalises consecutive groups of that many examples by their own statistics, updating the
  running averages once per group in order: SyncBatchNorm fed the batch as micro-batches (the
  reference's ImageNet command: 8 GPUs x 128, 4 per step)."""

  momentum: float = 0.1
  epsilon: float = 1e-5
  use_affine: bool = True
  dtype: Optional[Dtype] = None
  group_size: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
    x32 = x.astype(jnp.float32)
    n = x.shape[0]
    groups = n // self.group_size if 0 < self.group_size < n else 1
    if groups > 1 and n % self.group_size:
      raise ValueError(f"batch norm group size {self.group_size} does not divide the batch "
                       f"of {n}")
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xg = x32.reshape(groups, n // groups, features)
      mean = jnp.mean(xg, axis=1, keepdims=True)
      var = jnp.mean(jnp.square(xg - mean), axis=1, keepdims=True)
      # Batch statistics with an immutable ``batch_stats`` normalise without updating the
      # running averages (the teacher with ``teacher_bn="batch"``).
      if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
        size = n // groups
        unbiased = var[:, 0] * (size / max(size - 1, 1))
        for g in range(groups):  # one update per group, in order, as per micro-batch
          ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean[g, 0]
          ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased[g]
      x32 = xg
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    if self.use_affine:
      y = y * self.param("scale", nn.initializers.ones, (features,), jnp.float32)
      y = y + self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    return y.astype(self.dtype or x.dtype)


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
  """Exact GELU ``x * Phi(x)`` (``torch.nn.GELU()``), in float32 as under torch autocast;
  returned in ``x``'s dtype. Written with ``erf``, one native op: ``jax.nn.gelu``'s ``erfc``
  form expands into exponentials and branches (docs/benchmarks.md). ``approximate``: the
  tanh form, an opt-in speed lever that changes the function slightly.
  """
  x32 = x.astype(jnp.float32)
  if approximate:
    return jax.nn.gelu(x32, approximate=True).astype(x.dtype)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * np.float32(1 / np.sqrt(2))))).astype(x.dtype)


class Mlp(nn.Module):
  """Transformer MLP: fc1 -> GELU -> fc2."""

  hidden_dim: int
  dtype: Dtype = jnp.float32
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dim = x.shape[-1]
    x = Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x)
    x = gelu(x, self.gelu_approximate)
    return Dense(out_dim, dtype=self.dtype, name="fc2")(x)


def attention_padding(length: int, implementation: Optional[str]) -> int:
  """How many tokens to append so ``implementation`` can train on ``length`` tokens. jax's
  cuDNN path trains only on even sequence lengths (its backward rejects odd ones), and ViT
  sequences are odd: 196 patches + cls = 197 in the MAE decoder and the teacher."""
  return 1 if implementation == "cudnn" and length % 2 else 0


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          valid_length: Optional[int] = None,
                          implementation: Optional[str] = None) -> jax.Array:
  """``jax.nn.dot_product_attention`` on ``(B, T, N, H)`` inputs, any length with cuDNN.
  ``valid_length < T`` marks the last tokens as padding, masked out of every softmax. Without
  it an odd sequence under cuDNN is padded here, for this call only (block stacks pad once
  instead: ``apply_blocks``)."""
  batch, length = q.shape[:2]
  if valid_length is None:
    pad = attention_padding(length, implementation)
    if not pad:
      with _softmax_with_custom_gradient():
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    return dot_product_attention(q, k, v, valid_length=length,
                                 implementation=implementation)[:, :length]
  lengths = jnp.full((batch,), valid_length, dtype=jnp.int32)
  with _softmax_with_custom_gradient():
    return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths,
                                        implementation=implementation)


def head_major_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The math of ``jax.nn.dot_product_attention``'s XLA path on ``(B, T, N, H)`` inputs,
  computed on head-major ``(B, N, T, H)`` copies: both products are then plain batched
  matmuls, where XLA:CPU transposes ``jax.nn``'s probabilities and product. Faster forward
  on CPU, slower derivative (docs/benchmarks.md): for forwards without gradients only.
  """
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
  logits = jnp.einsum("bnth,bnsh->bnts", q, k,
                      preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
  logits *= jnp.array(1 / np.sqrt(q.shape[-1]), dtype=logits.dtype)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
  return jnp.swapaxes(jnp.einsum("bnts,bnsh->bnth", probs, v), 1, 2)


def _softmax_with_custom_gradient():
  """Tracing context in which ``jax.nn.softmax`` uses its custom derivative
  ``y * (g - sum(g * y))``: the same gradient as op by op, in fewer kernels
  (docs/benchmarks.md). Set for the attention's trace only (the ``jax_softmax_custom_jvp``
  upgrade flag is off by default), so a user's own softmax is untouched."""
  return jax.softmax_custom_jvp(True)


def _matmul_rows(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel`` as one 2-D product, the leading axes of ``x`` flattened into rows: the
  weight gradient is then one ``x^T g``, where a 3-D ``dot_general``'s contracts two axes,
  which XLA:CPU runs at half speed (docs/benchmarks.md). The reshapes are free, and a
  batch sharded over devices stays sharded over the rows.
  """
  rows = x.reshape(-1, x.shape[-1])
  return jnp.dot(rows, kernel).reshape(x.shape[:-1] + (kernel.shape[-1],))


class Dense(nn.Module):
  """``nn.Dense`` (same parameters) with the reference's Xavier-uniform kernel, computed by
  :func:`_matmul_rows`. ``parts > 1`` returns that many equal slices of the output, each
  from a slice of the kernel (the fused ``qkv``): q, k and v stay contiguous, and the
  backward assembles the small weight gradient, not three activation-sized ones.
  """

  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  parts: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> Union[jax.Array, list[jax.Array]]:
    kernel = self.param("kernel", dense_init, (x.shape[-1], self.features), jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    outputs = [_matmul_rows(x, w) for w in jnp.split(kernel, self.parts, axis=1)]
    if bias is not None:
      outputs = [y + b for y, b in zip(outputs, jnp.split(bias, self.parts))]
    return outputs if self.parts > 1 else outputs[0]


class Attention(nn.Module):
  """Multi-head self-attention with one fused ``qkv`` projection (timm layout), through
  ``jax.nn.dot_product_attention`` (cuDNN flash attention with ``implementation='cudnn'``).
  With a mutable ``intermediates`` collection the probabilities are also sown as
  ``attention`` ``(batch, heads, queries, keys)`` for the analysis tools.
  """

  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, valid_length: Optional[int] = None,
               forward_only: bool = False) -> jax.Array:
    """``valid_length``: the tokens after it are padding (see ``dot_product_attention``).
    ``forward_only``: no gradient will be taken of this call (the teacher); XLA's attention
    then runs as :func:`head_major_attention`."""
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    q, k, v = (t.reshape(batch, length, self.num_heads, head_dim)  # (B, T, N, H) each
               for t in Dense(3 * width, dtype=self.dtype, parts=3, name="qkv")(x))
    if self.is_mutable_collection("intermediates"):
      logits = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) / np.sqrt(head_dim)
      if valid_length is not None:
        logits = jnp.where(jnp.arange(length) < valid_length, logits, -jnp.inf)
      probs = jax.nn.softmax(logits, axis=-1)
      valid = length if valid_length is None else valid_length
      self.sow("intermediates", "attention", probs[:, :, :valid, :valid])  # no padding rows
      out = jnp.einsum("bnqk,bknh->bqnh", probs.astype(v.dtype), v)
    elif forward_only and self.implementation in (None, "xla") and valid_length is None:
      out = head_major_attention(q, k, v)
    else:
      out = dot_product_attention(q, k, v, valid_length=valid_length,
                                  implementation=self.implementation)
    out = out.reshape(batch, length, width)
    return Dense(width, dtype=self.dtype, name="proj")(out)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (fine-tuning only)."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               valid_length: Optional[int] = None, forward_only: bool = False) -> jax.Array:
    # The residual stream x keeps its own dtype (float32 normally; the teacher's may be the
    # compute dtype): LayerNorm statistics are float32 either way, the branches come back in
    # the compute dtype and the add promotes.
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
    drop = DropPath(self.drop_path)
    y = Attention(self.num_heads, dtype=self.dtype, implementation=self.attention_impl,
                  name="attn")(norm(name="norm1")(x), valid_length, forward_only)
    x = x + drop(y, deterministic=deterministic)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype,
            gelu_approximate=self.gelu_approximate, name="mlp")(norm(name="norm2")(x))
    return x + drop(y, deterministic=deterministic)


# Names of jax.checkpoint_policies for ``model.remat_policy``: what a rematerialised block
# keeps from its forward pass ("" keeps nothing: the whole block is recomputed).
REMAT_POLICIES = ("", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable")


def block_stack(num_blocks: int, prefix: str, *, remat: bool, remat_policy: str = "",
                drop_path: Optional[Sequence[float]] = None, **block_kwargs) -> list[nn.Module]:
  """``num_blocks`` blocks named ``{prefix}_{i}``; rematerialised (activations recomputed
  in the backward pass, trading compute for memory) when ``remat``, keeping what
  ``remat_policy`` (a :data:`REMAT_POLICIES` name) saves."""
  policy = getattr(jax.checkpoint_policies, remat_policy) if remat_policy else None
  block_cls = nn.remat(Block, static_argnums=(2, 3, 4), policy=policy) if remat else Block
  rates = list(drop_path) if drop_path is not None else [0.0] * num_blocks
  return [block_cls(drop_path=rates[i], name=f"{prefix}_{i}", **block_kwargs)
          for i in range(num_blocks)]


def apply_blocks(blocks: Sequence[nn.Module], x: jax.Array, deterministic: bool, *,
                 attention_impl: Optional[str], outputs_of: Sequence[int] = (),
                 forward_only: bool = False) -> Union[jax.Array, list[jax.Array]]:
  """Runs ``blocks`` on ``(batch, tokens, width)``; returns the last block's output, or with
  ``outputs_of`` the outputs of those blocks (0-based, in that order). Where the attention
  kernel needs an even length (cuDNN), the sequence is padded once for the whole stack and
  the padding token is masked out of every attention, instead of padding q, k and v in
  every layer (memory-bound copies in every layer; docs/benchmarks.md)."""
  length = x.shape[1]
  pad = attention_padding(length, attention_impl)
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
  outputs = {}
  for i, block in enumerate(blocks):
    x = block(x, deterministic, length if pad else None, forward_only)
    if i in outputs_of:
      outputs[i] = x[:, :length] if pad else x
  if outputs_of:
    return [outputs[i] for i in outputs_of]
  return x[:, :length] if pad else x


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> tokens: a strided convolution named ``proj``."""

  patch_size: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=patch_init, name="proj")(images)
    return x.reshape(x.shape[0], -1, self.width)


class EncoderArchitecture(nn.Module):
  """The fields of :class:`lut_jax.models.variants.EncoderConfig`, shared by the encoder and
  the models built around it (``variants.EncoderConfig.of(module)`` reads them back)."""

  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  gelu_approximate: bool = False


class Encoder(EncoderArchitecture):
  """ViT encoder of LUT/MAE: patch embedding + fixed sin-cos positions, cls token,
  pre-norm blocks, final LayerNorm (eps 1e-6).

  ``keep_ids`` ``(batch, keep)`` selects the visible patches (``None``: all); returns
  ``(batch, 1 + kept, width)`` tokens, cls first. ``final_norm=False`` skips the last
  LayerNorm (MAE's global-pool fine-tuning). ``output_blocks`` (0-based; segmentation's
  features) returns a list of the tokens after those blocks instead, without it.
  ``forward_only=True``: the same function in forms faster without a backward pass
  (:func:`head_major_attention`). ``learned_pos_embed``: the position table becomes a
  parameter ``pos_embed`` (cls row first), initialised to the sin-cos one (fine-tuning).
  """

  drop_path_rate: float = 0.0
  final_norm: bool = True
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: Optional[str] = None
  output_blocks: tuple[int, ...] = ()
  remat_policy: str = ""
  learned_pos_embed: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, keep_ids: Optional[jax.Array] = None,
               *, deterministic: bool = True, residual_dtype: Dtype = jnp.float32,
               forward_only: bool = False) -> Union[jax.Array, list[jax.Array]]:
    if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"encoder expects NHWC images of {self.image_size}x{self.image_size} "
                       f"pixels, got shape {images.shape}")
    grid = self.image_size // self.patch_size
    pos_embed = jnp.asarray(sincos_pos_embed_2d(self.width, grid))
    if self.learned_pos_embed:
      pos_embed = self.param("pos_embed", lambda _, shape: pos_embed.reshape(shape),
                             (1, 1 + grid * grid, self.width))[0]
    x = PatchEmbed(self.patch_size, self.width, dtype=self.dtype, name="patch_embed")(images)
    # The residual stream stays float32 whatever the compute dtype: only the matmuls and
    # attention run in bf16 (their outputs are added to float32 x), as with torch autocast.
    x = x.astype(jnp.float32) + pos_embed[1:]
    if keep_ids is not None:
      x = jnp.take_along_axis(x, keep_ids[:, :, None], axis=1)
    cls_token = self.param("cls_token", token_init, (1, 1, self.width), jnp.float32)
    cls = jnp.broadcast_to(cls_token + pos_embed[:1], (x.shape[0], 1, self.width))
    # ``residual_dtype`` other than float32 is for forwards without gradients (the teacher,
    # ``LUTModel._teacher_encode``).
    x = jnp.concatenate([cls, x], axis=1).astype(residual_dtype)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth).tolist()
    blocks = block_stack(self.depth, "blocks", remat=self.remat, remat_policy=self.remat_policy,
                         drop_path=rates, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                         dtype=self.dtype, attention_impl=self.attention_impl,
                         gelu_approximate=self.gelu_approximate)
    x = apply_blocks(blocks, x, deterministic, attention_impl=self.attention_impl,
                     outputs_of=self.output_blocks, forward_only=forward_only)
    if not self.final_norm or self.output_blocks:
      return x
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)


class Decoder(nn.Module):
  """MAE decoder: embeds the visible tokens, fills the masked positions with
  ``mask_token`` (unshuffling with ``ids_restore``), adds fixed sin-cos positions, runs the
  blocks and predicts ``patch_size**2 * channels`` pixels per patch (cls token dropped)."""

  num_patches: int
  patch_size: int
  channels: int
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: Optional[str] = None
  remat_policy: str = ""
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
    grid = int(round(self.num_patches ** 0.5))
    x = Dense(self.width, dtype=self.dtype, name="decoder_embed")(latent)
    x = x.astype(jnp.float32)  # float32 residual stream, as in the encoder
    mask_token = self.param("mask_token", token_init, (1, 1, self.width), jnp.float32)
    num_masked = self.num_patches - (x.shape[1] - 1)
    fill = jnp.broadcast_to(mask_token, (x.shape[0], num_masked, self.width))
    patches = jnp.concatenate([x[:, 1:], fill], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[:, :, None], axis=1)  # unshuffle
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + jnp.asarray(sincos_pos_embed_2d(self.width, grid))
    blocks = block_stack(self.depth, "decoder_blocks", remat=self.remat,
                         remat_policy=self.remat_policy, num_heads=self.num_heads,
                         mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                         attention_impl=self.attention_impl,
                         gelu_approximate=self.gelu_approximate)
    x = apply_blocks(blocks, x, True, attention_impl=self.attention_impl)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="decoder_norm")(x)
    x = Dense(self.patch_size ** 2 * self.channels, dtype=self.dtype, name="decoder_pred")(x)
    return x[:, 1:]


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": gelu,
}
HEAD_NORMS = ("batch", "layer", "none")
# How the teacher's projector batch norm normalises: "running" (the reference: the EMA model
# in eval mode uses its running averages) or "batch" (each view's batch statistics, BYOL's
# target network; not the reference).
TEACHER_BN = ("running", "batch")


class MLPHead(nn.Module):
  """Projector / predictor: ``depth`` bias-free linears, each but the last followed by a
  norm and an activation (``linear_0 -> norm_0 -> act -> linear_1``); ``depth == 0`` is the
  identity. Batch norm uses its running averages when ``train`` is False (the teacher)."""

  depth: int = 2
  hidden_dim: int = 4096
  out_dim: int = 768
  norm: str = "batch"
  activation: str = "relu"
  dtype: Dtype = jnp.float32
  bn_group_size: int = 0  # see BatchNorm.group_size

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i in range(self.depth):
      last = i == self.depth - 1
      x = Dense(self.out_dim if last else self.hidden_dim, use_bias=False, dtype=self.dtype,
                name=f"linear_{i}")(x)
      if not last:
        if self.norm == "batch":
          x = BatchNorm(dtype=self.dtype, group_size=self.bn_group_size,
                        name=f"norm_{i}")(x, use_running_average=not train)
        elif self.norm == "layer":
          x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"norm_{i}")(x)
        x = ACTIVATIONS[self.activation](x)
    return x


def mean_patch_token(tokens: jax.Array) -> jax.Array:
  """Mean over the patch tokens (cls, the first token, excluded), in float32."""
  return jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)


class LUTModel(EncoderArchitecture, kw_only=True):
  """The online network; the EMA target is a second copy of the same variables.
  ``use_bc=False`` builds plain MAE: no projector/predictor parameters at all. Methods (for
  ``model.apply(variables, ..., method=...)``): :meth:`student` (two masked views; head
  batch norm in training mode: ``batch_stats`` mutable), :meth:`mae` (one masked view),
  :meth:`teacher` (two full views) and :meth:`encode` (the encoder alone).
  """

  # No recipe defaults: the recipe is the config's (lut_jax.config_lib.base_config), and
  # build_model passes every field of it (mlp_ratio is the ViT architecture's).
  channels: int
  decoder_width: int
  decoder_depth: int
  decoder_num_heads: int
  use_bc: bool
  head_depth: int
  pred_depth: int
  head_hidden_dim: int
  head_norm: str
  head_activation: str
  teacher_bn: str = "running"  # see TEACHER_BN
  head_bn_group_size: int = 0  # examples per batch-norm statistics group; 0: the batch
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: Optional[str] = None
  # Speed levers (config.model; docs/benchmarks.md measures them): what remat keeps, the
  # tanh GELU (gelu_approximate), and the teacher's residual stream in the compute dtype.
  remat_policy: str = ""
  teacher_residual_in_compute_dtype: bool = False

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def setup(self):
    levers = dict(dtype=self.dtype, remat=self.remat, attention_impl=self.attention_impl,
                  remat_policy=self.remat_policy, gelu_approximate=self.gelu_approximate)
    self.encoder = Encoder(self.image_size, self.patch_size, self.width, self.depth,
                           self.num_heads, mlp_ratio=self.mlp_ratio, **levers)
    self.decoder = Decoder(self.num_patches, self.patch_size, self.channels,
                           width=self.decoder_width, depth=self.decoder_depth,
                           num_heads=self.decoder_num_heads, mlp_ratio=self.mlp_ratio, **levers)
    if self.use_bc:
      head = functools.partial(MLPHead, hidden_dim=self.head_hidden_dim, out_dim=self.width,
                               norm=self.head_norm, activation=self.head_activation,
                               dtype=self.dtype, bn_group_size=self.head_bn_group_size)
      self.head = head(depth=self.head_depth)
      self.predictor = head(depth=self.pred_depth)

  def __call__(self, view1, view2, keep1, keep2, ids_restore):
    """Initialisation entry point: touches every parameter of the chosen method."""
    if not self.use_bc:
      return self.mae(view1, keep1, ids_restore)
    return self.student(view1, view2, keep1, keep2, ids_restore), self.teacher(view1, view2)

  def encode(self, images: jax.Array, keep_ids: Optional[jax.Array] = None,
             forward_only: bool = False) -> jax.Array:
    """Encoder tokens ``(batch, 1 + kept, width)``, cls first (``forward_only``: see
    :class:`Encoder`)."""
    return self.encoder(images, keep_ids, forward_only=forward_only)

  def mae(self, view1: jax.Array, keep1: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """Pixel prediction ``(batch, num_patches, p*p*C)`` of the masked view 1."""
    return self.decoder(self.encoder(view1, keep1), ids_restore)

  def student(self, view1, view2, keep1, keep2, ids_restore) -> dict[str, jax.Array]:
    """Online network on two masked views -> ``{"pred", "q1", "q2"}``. Both views share
    one encoder call (it has no batch statistics); the heads run once per view, as in the
    reference, so each view has its own batch statistics (running averages: view 1 first).
    """
    batch = view1.shape[0]
    latent = self.encoder(jnp.concatenate([view1, view2]), jnp.concatenate([keep1, keep2]))
    latent1, latent2 = latent[:batch], latent[batch:]
    pred = self.decoder(latent1, ids_restore)
    q1 = self.predictor(self.head(mean_patch_token(latent1), train=True), train=True)
    q2 = self.predictor(self.head(mean_patch_token(latent2), train=True), train=True)
    return {"pred": pred, "q1": q1, "q2": q2}

  def teacher(self, view1: jax.Array, view2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Target network on two full views -> projector vectors ``(z1, z2)``; batch norm on
    the running averages (``teacher_bn="running"``, the reference's EMA model in eval mode)
    or on each view's batch statistics (``"batch"``), leaving the running averages alone.
    """
    batch = view1.shape[0]
    pooled = mean_patch_token(self._teacher_encode(jnp.concatenate([view1, view2])))
    if self.teacher_bn == "batch":
      return self.head(pooled[:batch], train=True), self.head(pooled[batch:], train=True)
    z = self.head(pooled, train=False)
    return z[:batch], z[batch:]

  def projector(self, images: jax.Array) -> jax.Array:
    """The teacher's projector vectors of whole images (one batch), normalised as
    :meth:`teacher` does; for monitoring."""
    return self.head(mean_patch_token(self._teacher_encode(images)),
                     train=self.teacher_bn == "batch")

  def _teacher_encode(self, images: jax.Array) -> jax.Array:
    # No gradient flows through the teacher, so its residual stream may be in the compute
    # dtype (bf16: half the memory traffic of the step's largest forward); the student's
    # stays float32 as under torch autocast.
    residual = self.dtype if self.teacher_residual_in_compute_dtype else jnp.float32
    return self.encoder(images, residual_dtype=residual, forward_only=True)


def default_attention_impl(dtype: Dtype) -> Optional[str]:
  """The attention kernel when ``model.attention_impl`` is empty: cuDNN's flash attention
  on NVIDIA GPUs in bf16 (faster there; docs/benchmarks.md), XLA's everywhere else."""
  if jnp.dtype(dtype) == jnp.float32:
    return None
  device = jax.devices()[0]
  cuda = device.platform == "gpu" and "cuda" in device.client.platform_version.lower()
  return "cudnn" if cuda else None


def check_model_config(model_config: Any, *, image_size: int,
                       dtype: Dtype) -> variants.EncoderSpec:
  """Validates a ``config.model`` block for ``image_size``-pixel images and compute
  ``dtype`` (a ``ValueError`` naming the bad field); returns the variant's encoder spec."""
  spec = variants.parse_variant(model_config.variant)
  if image_size % spec.patch_size:
    raise ValueError(f"image size {image_size} is not divisible by patch size {spec.patch_size} "
                     f"(variant {model_config.variant!r})")
  for field, allowed in (("head_norm", HEAD_NORMS), ("teacher_bn", TEACHER_BN),
                         ("head_activation", tuple(ACTIVATIONS)),
                         ("remat_policy", REMAT_POLICIES)):
    if getattr(model_config, field) not in allowed:
      raise ValueError(f"unknown model.{field} {getattr(model_config, field)!r}; expected one "
                       f"of {allowed}")
  impl = model_config.attention_impl
  if impl not in ("", "xla", "cudnn"):
    raise ValueError(f"unknown model.attention_impl {impl!r}; expected '', 'xla' or 'cudnn'")
  if impl == "cudnn" and jnp.dtype(dtype) == jnp.float32:
    raise ValueError("model.attention_impl='cudnn' needs dtype bfloat16 (cuDNN's fused "
                     "attention has no float32 kernel)")
  return spec


def build_model(model_config: Any, *, image_size: int, channels: int, use_bc: bool,
                dtype: Dtype = jnp.float32) -> LUTModel:
  """Builds :class:`LUTModel` from a complete ``config.model`` block (every field of
  ``lut_jax.config_lib.base_config``), checked by :func:`check_model_config`."""
  spec = check_model_config(model_config, image_size=image_size, dtype=dtype)
  m = model_config
  return LUTModel(
      image_size=image_size, patch_size=spec.patch_size, width=spec.width, depth=spec.depth,
      num_heads=spec.num_heads, channels=channels, decoder_width=m.decoder_width,
      decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_num_heads, use_bc=use_bc,
      head_depth=m.head_depth, pred_depth=m.pred_depth, head_hidden_dim=m.head_hidden_dim,
      head_norm=m.head_norm, head_activation=m.head_activation, teacher_bn=m.teacher_bn,
      head_bn_group_size=m.head_bn_group_size, dtype=dtype, remat=m.remat,
      remat_policy=m.remat_policy, gelu_approximate=m.gelu_approximate,
      teacher_residual_in_compute_dtype=m.teacher_residual_in_compute_dtype,
      attention_impl=m.attention_impl or default_attention_impl(dtype))
