"""Spatial maps: attention of chosen query patches per head, and Grad-CAM of a classifier.

Both return maps on the patch grid (``(grid, grid)`` per image), scaled for display;
:mod:`lut_jax.analysis.plots` upsamples and overlays them on the images.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lut_jax.analysis import attention_distance
from lut_jax.models import vit

# A query: a patch as (row, column) on the grid, or "cls" for the cls token.
Query = Union[tuple[int, int], str]


def parse_queries(text: str, grid_size: int) -> list[Query]:
  """``"cls;center;3,4"`` -> ``["cls", (g//2, g//2), (3, 4)]`` (patch row, column)."""
  out: list[Query] = []
  for item in filter(None, (t.strip() for t in text.split(";"))):
    if item in ("cls", "center", "centre"):
      out.append("cls" if item == "cls" else (grid_size // 2, grid_size // 2))
      continue
    row, sep, col = item.partition(",")
    if not sep or not row.strip().isdigit() or not col.strip().isdigit():
      raise ValueError(f"bad query {item!r}: expected 'cls', 'center' or 'row,col'")
    r, c = int(row), int(col)
    if not (0 <= r < grid_size and 0 <= c < grid_size):
      raise ValueError(f"query patch ({r}, {c}) is outside the {grid_size}x{grid_size} grid")
    out.append((r, c))
  return out


def query_name(query: Query) -> str:
  """File-name friendly name of a query: ``cls`` or ``r3c4``."""
  return "cls" if query == "cls" else f"r{query[0]}c{query[1]}"


def attention_maps(probs: jax.Array, query: Query) -> np.ndarray:
  """``(batch, heads, grid, grid)`` float32 attention from one ``query`` (``(row, col)``
  or ``"cls"``) to every patch, from one layer's unmasked ``probs`` ``(batch, heads, 1 + L,
  1 + L)`` (cls first); renormalised over the patch keys, so every map sums to one.
  """
  probs = jnp.asarray(probs, jnp.float32)
  num_patches = probs.shape[-1] - 1
  grid = int(round(num_patches ** 0.5))
  if grid * grid != num_patches:
    raise ValueError(f"{num_patches} patch tokens do not form a square grid")
  if query == "cls":
    row = probs[:, :, 0, 1:]
    row = row / jnp.maximum(row.sum(-1, keepdims=True), 1e-12)
  else:
    r, c = query
    row = attention_distance.patch_attention(probs)[:, :, r * grid + c]
  return np.asarray(row.reshape(row.shape[0], row.shape[1], grid, grid))


def _block_interceptor(block_index: int, delta_ref: dict[str, Any], captured: list[jax.Array]):
  """A Flax method interceptor that records the output of encoder block ``block_index``
  (negative counts from the end) and adds ``delta_ref["delta"]`` to it, so that the gradient
  with respect to that zero perturbation is the gradient with respect to the block's
  activations, whatever function the classifier wraps around the encoder. The encoder's depth
  is taken from the enclosing :class:`~lut_jax.models.vit.Encoder` call."""
  # depth: of the Encoder being run (None outside one); inside: within the matched block,
  # so that nothing nested in it is taken for it.
  state = {"depth": None, "inside": False}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, vit.Encoder) and context.method_name == "__call__":
      outer, state["depth"] = state["depth"], module.depth
      try:
        return next_fun(*args, **kwargs)
      finally:
        state["depth"] = outer
    if (not isinstance(module, vit.Block) or state["depth"] is None or state["inside"]
        or context.method_name != "__call__"
        or module.name != f"blocks_{block_index % state['depth']}"):
      return next_fun(*args, **kwargs)
    state["inside"] = True
    try:
      out = next_fun(*args, **kwargs)
    finally:
      state["inside"] = False
    captured.append(out)
    if delta_ref.get("delta") is not None:
      out = out + delta_ref["delta"].astype(out.dtype)
    return out

  return interceptor


def gradcam(logits_fn: Callable[[Any, jax.Array], jax.Array], params: Any, images: jax.Array,
            targets: Optional[Sequence[int]] = None, *, block_index: int = -1,
            has_cls: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Grad-CAM (Selvaraju et al. 2017) of a ViT classifier on the patch grid:
  ``(cams (batch, grid, grid) float32 in [0, 1], targets (batch,) int)``.

  The "feature maps" are the patch tokens output by encoder block ``block_index``; channel
  weights are the gradients of the ``targets`` logits (default: the predicted classes)
  averaged over the patch tokens; the map is ``ReLU(sum_d w_d A[:, d])`` per patch, scaled
  to ``[0, 1]`` per image (``has_cls``: token 0, excluded, is cls).

  ``logits_fn(params, images) -> (batch, classes)`` may be any function that runs a
  :class:`~lut_jax.models.vit.Encoder` (built with ``remat=False``, as the loaders of
  :mod:`lut_jax.weights.loading` build it) exactly once: the block output is reached with a
  Flax method interceptor, so the classifier needs no hooks. A head that reads only the cls
  token gets no gradient through the *last* block's patch tokens (after it, tokens do not
  mix); use ``block_index=-2`` for such heads.
  """
  images = jnp.asarray(images)
  captured: list[jax.Array] = []
  with nn.intercept_methods(_block_interceptor(block_index, {}, captured)):
    # A fresh wrapper: eval_shape caches traces per function, and a cached trace would
    # never reach the interceptor. This pass only learns the activations' shape.
    jax.eval_shape(lambda p, x: logits_fn(p, x), params, images)
  if len(captured) != 1:
    raise ValueError(f"logits_fn ran encoder block {block_index} {len(captured)} times; "
                     "Grad-CAM needs exactly one encoder call")
  act_shape = captured[0].shape

  def selected_logit(delta, params, images, targets):
    captured_inner: list[jax.Array] = []
    with nn.intercept_methods(_block_interceptor(block_index, {"delta": delta},
                                                 captured_inner)):
      logits = logits_fn(params, images)
    logits = logits.astype(jnp.float32)
    if targets is None:
      targets = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)
    return picked.sum(), (captured_inner[0], targets)

  @jax.jit
  def run(params, images, targets):
    delta = jnp.zeros(act_shape, jnp.float32)
    grads, (acts, targets) = jax.grad(selected_logit, has_aux=True)(delta, params, images,
                                                                    targets)
    start = 1 if has_cls else 0
    acts, grads = acts[:, start:].astype(jnp.float32), grads[:, start:]
    weights = grads.mean(axis=1)  # (batch, width): gradient averaged over the "space"
    cam = jax.nn.relu(jnp.einsum("bld,bd->bl", acts, weights))
    cam = cam / jnp.maximum(cam.max(axis=1, keepdims=True), 1e-12)
    return cam, targets

  tgt = None if targets is None else jnp.asarray(np.asarray(targets), jnp.int32)
  try:
    cam, tgt = run(params, images, tgt)
  except jax.errors.UnexpectedTracerError as e:
    # A rematerialised block runs inside jax.checkpoint: its output cannot be read from
    # outside. Remat only saves training memory, so analysis models are built without it.
    raise ValueError("Grad-CAM cannot read the activations of a rematerialised encoder "
                     "block: build the model with remat=False (e.g. model.clone(remat=False))"
                     ) from e
  num_patches = cam.shape[1]
  grid = int(round(num_patches ** 0.5))
  if grid * grid != num_patches:
    raise ValueError(f"{num_patches} patch tokens do not form a square grid")
  return np.asarray(cam).reshape(-1, grid, grid), np.asarray(tgt)
