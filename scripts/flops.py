"""Analytic FLOP count of one LUT or MAE pre-training step (docs/method.md, "Cost model").

Counted: the matrix products of the model, as 2 FLOPs per multiply-add: every dense layer,
the patch embedding (a strided convolution is a ``(p*p*C) -> D`` dense layer per patch)
and the two attention products (``q k^T`` and ``softmax(.) v``). Not counted: layer and
batch norms, softmax, GELU, residual adds, position embeddings, masking (argsort, gathers),
the losses, the optimizer and the EMA. Those are elementwise, O(tokens * width) or
O(parameters), and the usual MFU convention (PaLM, appendix B) leaves them out; XLA's cost
analysis counts them, so it reads a little higher (see tests/test_flops.py).

Per transformer block over N tokens of width D, MLP ratio r (4 in ViTs):
  qkv 3ND^2 + proj ND^2 + MLP 2rND^2 multiply-adds, and N^2 D for each attention product,
  so forward FLOPs = (8 + 4r) N D^2 + 4 N^2 D  (= 24 N D^2 + 4 N^2 D at r = 4).
A backward pass costs twice its forward (one product for the input gradient, one for the
weight gradient), except the patch embedding, whose input (the image) needs no gradient:
its backward is the weight gradient alone, 1x.

One LUT step per image (two views, ``keep = int(L (1 - mask_ratio))``):
  * student: patch embedding of both views (all L patches are embedded, then the visible
    ones are gathered, as in the code and the reference), encoder on 1 + keep tokens per
    view, projector + predictor per view; forward and backward;
  * decoder (view 1): decoder_embed on 1 + keep tokens, blocks on 1 + L tokens,
    decoder_pred on 1 + L tokens (the cls row is dropped after the product); fwd + bwd;
  * teacher: patch embedding and encoder on both full views (1 + L tokens), projector;
    forward only.
An MAE step is view 1's student encoder and the decoder, without heads or teacher.

Numbers are *model* FLOPs per image: rematerialisation (``remat``) re-runs block forwards
(all but each block's last product) in the backward pass; that work is reported separately
(``recompute``) and is not part of ``model_total`` (MFU counts useful work only).

This module imports no JAX: the PyTorch benchmark uses it too.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from lut_jax.models import variants  # pure Python: no JAX


@dataclasses.dataclass(frozen=True)
class StepShape:
  """Everything the FLOP count depends on (one image, one step); no recipe defaults, see
  :func:`shape_from_config` for a config's."""

  image_size: int
  patch_size: int
  width: int
  depth: int
  channels: int
  decoder_width: int
  decoder_depth: int
  mask_ratio: float
  head_depth: int
  pred_depth: int
  head_hidden_dim: int
  mlp_ratio: float = 4.0  # the ViT architecture's, as lut_jax.models.vit.LUTModel

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def keep(self) -> int:
    """Visible patches per view (``lut_jax.pretrain.masking.num_kept``: int(L * (1 - r)))."""
    return int(self.num_patches * (1 - self.mask_ratio))


def block_forward_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> int:
  """Forward FLOPs of one pre-norm transformer block: (8 + 4r) N D^2 + 4 N^2 D."""
  n, d = tokens, width
  return int(round((8 + 4 * mlp_ratio) * n * d * d)) + 4 * n * n * d


def dense_flops(rows: int, fan_in: int, fan_out: int) -> int:
  """One dense layer applied to ``rows`` vectors: 2 * rows * fan_in * fan_out."""
  return 2 * rows * fan_in * fan_out


def patch_embed_flops(s: StepShape) -> int:
  """Forward FLOPs of the patch embedding of one view (all L patches)."""
  return dense_flops(s.num_patches, s.patch_size ** 2 * s.channels, s.width)


def encoder_blocks_flops(s: StepShape, tokens: int) -> int:
  """Forward FLOPs of the encoder's blocks over ``tokens`` tokens (cls included)."""
  return s.depth * block_forward_flops(tokens, s.width, s.mlp_ratio)


def decoder_forward_flops(s: StepShape) -> int:
  """Forward FLOPs of the MAE decoder on one masked view."""
  full = 1 + s.num_patches
  return (dense_flops(1 + s.keep, s.width, s.decoder_width)  # decoder_embed (visible + cls)
          + s.decoder_depth * block_forward_flops(full, s.decoder_width, s.mlp_ratio)
          + dense_flops(full, s.decoder_width, s.patch_size ** 2 * s.channels))  # decoder_pred


def head_forward_flops(width: int, hidden: int, depth: int) -> int:
  """Forward FLOPs of one bias-free MLP head (``lut_jax.models.vit.MLPHead``) on one vector:
  D -> H, (H -> H) x (depth - 2), H -> D; depth 1 is D -> D, depth 0 the identity."""
  if depth <= 0:
    return 0
  if depth == 1:
    return dense_flops(1, width, width)
  return (dense_flops(1, width, hidden) + (depth - 2) * dense_flops(1, hidden, hidden)
          + dense_flops(1, hidden, width))


def step_flops(s: StepShape, method: str, *, remat: bool = False) -> dict[str, int]:
  """Per-image FLOPs of one training step, by part.

  Returns a dict with one ``<part>_fwd`` / ``<part>_bwd`` entry per part, the totals
  ``forward``, ``backward`` and ``model_total`` (their sum), and ``recompute`` (block
  forwards re-run under ``remat``; 0 without it) and ``executed_total`` (model_total +
  recompute, what the hardware runs).
  """
  if method not in ("lut", "mae"):
    raise ValueError(f"unknown method {method!r}; expected 'lut' or 'mae'")
  views = 2 if method == "lut" else 1
  student_tokens = 1 + s.keep
  parts: dict[str, int] = {}
  parts["student_patch_embed_fwd"] = views * patch_embed_flops(s)
  parts["student_patch_embed_bwd"] = views * patch_embed_flops(s)  # weight gradient only
  parts["student_encoder_fwd"] = views * encoder_blocks_flops(s, student_tokens)
  parts["student_encoder_bwd"] = 2 * parts["student_encoder_fwd"]
  parts["decoder_fwd"] = decoder_forward_flops(s)
  parts["decoder_bwd"] = 2 * parts["decoder_fwd"]
  if method == "lut":
    projector = head_forward_flops(s.width, s.head_hidden_dim, s.head_depth)
    predictor = head_forward_flops(s.width, s.head_hidden_dim, s.pred_depth)
    parts["student_heads_fwd"] = views * (projector + predictor)
    parts["student_heads_bwd"] = 2 * parts["student_heads_fwd"]
    parts["teacher_patch_embed_fwd"] = views * patch_embed_flops(s)
    parts["teacher_encoder_fwd"] = views * encoder_blocks_flops(s, 1 + s.num_patches)
    parts["teacher_head_fwd"] = views * projector
  out = dict(parts)
  out["forward"] = sum(v for k, v in parts.items() if k.endswith("_fwd"))
  out["backward"] = sum(v for k, v in parts.items() if k.endswith("_bwd"))
  out["model_total"] = out["forward"] + out["backward"]
  if remat:
    # nn.remat wraps each block of the student encoder and the decoder: the backward pass
    # re-runs its forward, except the last product (MLP fc2), whose output the block's own
    # backward never needs (it is removed as dead code when the program is lowered).
    def rerun(tokens: int, width: int) -> int:
      fc2 = dense_flops(tokens, int(round(s.mlp_ratio * width)), width)
      return block_forward_flops(tokens, width, s.mlp_ratio) - fc2
    out["recompute"] = (views * s.depth * rerun(student_tokens, s.width)
                        + s.decoder_depth * rerun(1 + s.num_patches, s.decoder_width))
  else:
    out["recompute"] = 0
  out["executed_total"] = out["model_total"] + out["recompute"]
  return out


def shape_from_model(model: Any, mask_ratio: float) -> StepShape:
  """The :class:`StepShape` of a ``lut_jax.models.vit.LUTModel`` (read by attribute)."""
  return StepShape(image_size=model.image_size, patch_size=model.patch_size,
                   width=model.width, depth=model.depth, channels=model.channels,
                   mlp_ratio=model.mlp_ratio, decoder_width=model.decoder_width,
                   decoder_depth=model.decoder_depth, mask_ratio=mask_ratio,
                   head_depth=model.head_depth, pred_depth=model.pred_depth,
                   head_hidden_dim=model.head_hidden_dim)


def shape_from_config(config: Mapping[str, Any]) -> StepShape:
  """The :class:`StepShape` of a pre-training config (``configs/*.py``)."""
  spec = variants.parse_variant(config["model"]["variant"])
  model = config["model"]
  return StepShape(image_size=config["input"]["image_size"], patch_size=spec.patch_size,
                   width=spec.width, depth=spec.depth, channels=config["input"]["channels"],
                   decoder_width=model["decoder_width"], decoder_depth=model["decoder_depth"],
                   mask_ratio=config["loss"]["mask_ratio"], head_depth=model["head_depth"],
                   pred_depth=model["pred_depth"], head_hidden_dim=model["head_hidden_dim"])


_FUNC_RE = re.compile(r"^\s*func\.func\s+(?:public\s+|private\s+)?@([\w.$-]+)\(", re.M)
_CALL_RE = re.compile(r"\bcall\s+@([\w.$-]+)\(")
_TENSOR_RE = re.compile(r"tensor<([^>]*)>")
_CONTRACT_RE = re.compile(r"contracting_dims\s*=\s*\[([\d,\s]*)\]")
_CONV_DIMS_RE = re.compile(r"dim_numbers\s*=\s*\[[^\]]*\]x\[([^\]]*)\]->")


def _dims(tensor_type: str) -> list[int]:
  """``"16x17x32xf32"`` -> ``[16, 17, 32]``; ``"f32"`` -> ``[]``."""
  return [int(d) for d in tensor_type.split("x")[:-1]]


def _prod(xs) -> int:
  out = 1
  for x in xs:
    out *= x
  return out


def _signature(line: str) -> tuple[list[list[int]], list[int]]:
  """Operand and result shapes from the trailing ``: (T, T) -> T`` of a StableHLO op."""
  head, _, result = line.rpartition("->")
  operands = head[head.rfind(": (") + 3:] if ": (" in head else head
  return [_dims(t) for t in _TENSOR_RE.findall(operands)], _dims(_TENSOR_RE.findall(result)[0])


def _op_flops(line: str) -> tuple[str, int]:
  """(kind, FLOPs) of one StableHLO line: dot_general / dot / convolution, else ("", 0)."""
  if "stablehlo.dot_general" in line:
    (lhs, _), out = _signature(line)
    lhs_contract = [int(i) for i in _CONTRACT_RE.search(line).group(1).split(",") if i.strip()]
    return "dot_general", 2 * _prod(out) * _prod(lhs[i] for i in lhs_contract)
  if re.search(r"stablehlo\.dot\b", line):
    (lhs, _), out = _signature(line)
    return "dot_general", 2 * _prod(out) * lhs[-1]
  if "stablehlo.convolution" in line:
    (_, rhs), out = _signature(line)
    rhs_labels = [s.strip() for s in _CONV_DIMS_RE.search(line).group(1).split(",")]
    # Each output element sums over the kernel's spatial window x its input features:
    # the kernel's size divided by its output-feature dimension.
    return "convolution", 2 * _prod(out) * _prod(rhs) // rhs[rhs_labels.index("o")]
  if "stablehlo.custom_call" in line:
    return "custom_call", 0
  return "", 0


def matmul_flops_from_stablehlo(text: str) -> dict[str, int]:
  """Matrix-product FLOPs of a lowered JAX program, read from its StableHLO text.

  ``text`` is ``jax.jit(f).lower(...).as_text()``. Counts every ``dot_general`` and
  ``convolution`` (2 FLOPs per multiply-add), following ``call``s into private functions
  as often as they are called. This is the quantity :func:`step_flops` models, exactly,
  without the elementwise work that XLA's cost analysis adds. Loop bodies (``while``,
  from ``lax.scan``) count once, and custom calls (e.g. cuDNN fused attention) count 0:
  their number is returned as ``custom_call`` so a caller can tell.

  Returns ``{"flops", "dot_general", "convolution", "custom_call"}`` (the last three are
  op counts, calls followed).
  """
  starts = [(m.start(), m.group(1)) for m in _FUNC_RE.finditer(text)]
  if not starts:
    starts = [(0, "main")]
  bodies = {name: text[start:(starts[i + 1][0] if i + 1 < len(starts) else len(text))]
            for i, (start, name) in enumerate(starts)}
  memo: dict[str, dict[str, int]] = {}

  def visit(name: str, stack: tuple[str, ...] = ()) -> dict[str, int]:
    if name in memo:
      return memo[name]
    if name in stack:
      raise ValueError(f"recursive call to @{name} in StableHLO text")
    total = {"flops": 0, "dot_general": 0, "convolution": 0, "custom_call": 0}
    for line in bodies[name].splitlines()[1:]:  # skip the signature line
      kind, n = _op_flops(line)
      if kind:
        total[kind] += 1
        total["flops"] += n
      for callee in _CALL_RE.findall(line):
        if callee in bodies:
          for k, v in visit(callee, stack + (name,)).items():
            total[k] += v
    memo[name] = total
    return total

  entry = "main" if "main" in bodies else starts[0][1]
  return visit(entry)


