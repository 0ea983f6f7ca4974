"""Weight conversion between our Flax trees (``encoder/blocks_0/attn/qkv/kernel``,
``head/norm_0/mean``, ...) and the state dicts of the PyTorch reference (naver-ai/lut, on
facebookresearch/mae: ``blocks.0.attn.qkv.weight``, ``head.1.running_mean``, ...) and of
timm's ``VisionTransformer`` (the reference's encoder names).

Layouts: a torch ``Linear`` weight is ``(out, in)``, a Flax kernel ``(in, out)``; the patch
convolution is ``(D, C, p, p)`` in torch, ``(p, p, C, D)`` here; norm ``weight`` is our
``scale``, ``running_mean`` / ``running_var`` our ``batch_stats`` ``mean`` / ``var``. The
reference heads are ``nn.Sequential`` lists (``Linear, [Norm,] Act, Linear, ...``), ours
name ``linear_i`` / ``norm_i``: the index follows from the head's norm choice.

The fixed sin-cos position embeddings are constants here, not parameters: written on export
(so ``load_state_dict(strict=True)`` works), checked rather than loaded on import. torch is
never imported: its tensors are converted when met (``.detach().cpu().numpy()``).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from lut_jax import errors
from lut_jax.models import vit
from lut_jax.pretrain import train_state

StateDict = Mapping[str, Any]
Path = tuple[str, ...]

# Absolute tolerance for "this pos_embed is our fixed sin-cos constant": a reference
# checkpoint stores the same float64 -> float32 values, but its EMA copy may carry a few
# ulps of drift from `ema * d + (1 - d) * online` on equal inputs.
_POS_EMBED_ATOL = 1e-5

# Reference/timm names of tensors we never load: constants (checked instead) and
# BatchNorm's step counter (unused with a fixed momentum).
_POS_EMBED_NAMES = ("pos_embed", "decoder_pos_embed")
_BN_COUNTER = "num_batches_tracked"

# Prefixes of the non-encoder parts of a reference checkpoint (and timm's classifier
# `head.*`): skipped, not reported, when loading an encoder alone.
_NON_ENCODER_PREFIXES = ("decoder_", "mask_token", "head.", "predictor.")

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}


# ------------------------------------------------------------ helpers: arrays, templates, names
def _to_numpy(value: Any) -> np.ndarray:
  """``value`` as a numpy array (no copy where possible). Torch tensors are detected by
  duck typing, so torch is only touched when the caller already has it loaded."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16: widen first
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def unwrap_state_dict(checkpoint: Mapping[str, Any], key: Optional[str] = None) -> dict[str, Any]:
  """A new ``{name: tensor}`` dict of the model ``state_dict`` in ``checkpoint`` (a state
  dict, or the reference's ``{"model", "model_ema", "optimizer"}``), without the ``module.``
  prefix of DistributedDataParallel. ``key``: the entry to take (``"model_ema"``: the
  teacher); by default ``"model"`` or ``"state_dict"`` when present, else ``checkpoint``.
  """
  if key is not None:
    if key not in checkpoint:
      raise KeyError(f"checkpoint has no entry {key!r}; it has {sorted(checkpoint)}")
    checkpoint = checkpoint[key]
  else:
    for candidate in ("model", "state_dict"):
      if isinstance(checkpoint.get(candidate), Mapping):
        checkpoint = checkpoint[candidate]
        break
  out = {}
  for name, value in checkpoint.items():
    out[name[len("module."):] if name.startswith("module.") else name] = value
  return out


@functools.lru_cache(maxsize=32)
def _variable_shapes(module: nn.Module,
                     channels: int = 3) -> dict[str, dict[Path, jax.ShapeDtypeStruct]]:
  """``{collection: {path: ShapeDtypeStruct}}`` of ``module``'s variables by abstract
  evaluation of ``init``: the converter follows the model's actual structure."""
  rng = jax.random.PRNGKey(0)
  if isinstance(module, vit.LUTModel):
    variables = jax.eval_shape(functools.partial(train_state.init_variables, module), rng)
  elif isinstance(module, vit.Encoder):
    images = jnp.zeros((1, module.image_size, module.image_size, channels), jnp.float32)
    variables = jax.eval_shape(functools.partial(module.init, rng), images)
  else:
    raise TypeError(f"expected a LUTModel or an Encoder, got {type(module).__name__}")
  return {col: traverse_util.flatten_dict(tree) for col, tree in variables.items()}


def _head_stride(head_norm: str) -> int:
  """Sequential entries per hidden layer of a reference head: Linear, [Norm,] Act."""
  return 2 if head_norm == "none" else 3


def _torch_name(path: Path, head_stride: int) -> str:
  """Reference/timm name of our variable at ``path`` (collection excluded). ``path`` starts at
  the LUTModel level (``encoder``/``decoder``/``head``/``predictor``); the reference model is
  flat, so our ``encoder``/``decoder`` scopes disappear."""
  top, rest = path[0], list(path[1:])
  parts = [] if top in ("encoder", "decoder") else [top]
  in_head = top in ("head", "predictor")
  for i, part in enumerate(rest):
    last = i == len(rest) - 1
    if match := re.fullmatch(r"(decoder_blocks|blocks)_(\d+)", part):
      parts += [match.group(1), match.group(2)]
    elif in_head and (match := re.fullmatch(r"(linear|norm)_(\d+)", part)):
      index = head_stride * int(match.group(2)) + (match.group(1) == "norm")
      parts.append(str(index))
    elif last and part in _LEAF_TO_TORCH:
      parts.append(_LEAF_TO_TORCH[part])
    else:  # cls_token, mask_token, module names shared by both (attn, qkv, norm1, ...)
      parts.append(part)
  return ".".join(parts)


def _to_torch_layout(path: Path, value: np.ndarray, inverse: bool = False) -> np.ndarray:
  """Our array -> torch layout (Dense kernels transposed, conv kernel to OIHW), or back."""
  if path[-1] == "kernel" and value.ndim == 2:
    return value.T
  if path[-1] == "kernel" and value.ndim == 4:
    return value.transpose((2, 3, 1, 0) if inverse else (3, 2, 0, 1))
  return value


def _torch_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  return _to_torch_layout(path, np.empty(shape, np.uint8)).shape


class _Problems:
  """Collects every conversion problem so the user sees them all in one error."""

  def __init__(self):
    self.missing: list[str] = []
    self.shapes: list[str] = []
    self.unexpected: list[str] = []
    self.values: list[str] = []

  def raise_if_any(self, target: str, ignore_unexpected: bool) -> None:
    unexpected = [] if ignore_unexpected else self.unexpected
    if not (self.missing or self.shapes or unexpected or self.values):
      return
    lines = [f"cannot convert the state_dict into {target}:"]
    if self.missing:
      lines.append(f"  missing tensors ({len(self.missing)}): " + ", ".join(self.missing))
    if self.shapes:
      lines.append(f"  shape mismatches ({len(self.shapes)}):")
      lines += [f"    {s}" for s in self.shapes]
    if unexpected:
      lines.append(f"  unexpected tensors ({len(unexpected)}; pass ignore_unexpected=True to "
                   "skip them): " + ", ".join(unexpected))
    if self.values:
      lines.append("  value mismatches (a learned position embedding, which our fixed sin-cos "
                   "one cannot hold; the Python argument check_pos_embed=False drops it):")
      lines += [f"    {s}" for s in self.values]
    # A DataError (a ValueError): the state_dict does not fit the model, which the user
    # fixes by choosing another checkpoint or model, and command lines report it as such.
    raise errors.DataError("\n".join(lines))


def _check_pos_embed(name: str, value: np.ndarray, width: int, grid: int,
                     problems: _Problems) -> None:
  """Records a problem unless ``value`` is our fixed sin-cos embedding (cls row included). A
  mismatch means the checkpoint's model does not use the fixed embedding (e.g. a fine-tuned
  timm ViT with a learned one): loading it silently would change the model."""
  expected = vit.sincos_pos_embed_2d(width, grid)[None]
  if value.shape != expected.shape:
    problems.shapes.append(f"{name}: expected {expected.shape}, got {value.shape}")
    return
  diff = float(np.max(np.abs(value.astype(np.float64) - expected)))
  if diff > _POS_EMBED_ATOL:
    problems.values.append(f"{name}: differs from the fixed 2-D sin-cos embedding "
                           f"(max abs difference {diff:.3g})")


def _load(state_dict: StateDict, template: Mapping[str, Mapping[Path, Any]],
          name_of: Callable[[Path], str], problems: _Problems) -> dict[str, dict[Path, np.ndarray]]:
  """Fills every template entry from ``state_dict``, recording missing/mis-shaped ones."""
  flat: dict[str, dict[Path, np.ndarray]] = {}
  for collection, entries in template.items():
    for path, spec in entries.items():
      name = name_of(path)
      if name not in state_dict:
        problems.missing.append(name)
        continue
      value = _to_numpy(state_dict[name])
      expected = _torch_shape(path, tuple(spec.shape))
      if value.shape != expected:
        problems.shapes.append(f"{name}: expected {expected}, got {value.shape}")
        continue
      value = np.ascontiguousarray(_to_torch_layout(path, value, inverse=True)).astype(spec.dtype)
      flat.setdefault(collection, {})[path] = value
  return flat


def _unflatten(flat: Mapping[Path, np.ndarray]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat)) if flat else {}


# ------------------------ full model: reference pre-training checkpoints <-> LUTModel variables
def params_from_torch_state_dict(
    state_dict: StateDict, model: vit.LUTModel, *, key: Optional[str] = None,
    ignore_unexpected: bool = False, check_pos_embed: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """A reference (naver-ai/lut or MAE) pre-training ``state_dict`` (or a checkpoint wrapping
  it: :func:`unwrap_state_dict` with ``key``) -> ``(params, batch_stats)`` of ``model``
  (numpy; an MAE checkpoint fits a ``use_bc=False`` model), whose configuration decides
  which tensors are required and their shapes.

  ``ignore_unexpected``: skip tensors ``model`` has no place for. ``check_pos_embed``: the
  position embeddings, when present, must equal our fixed sin-cos constants. Raises a
  ``DataError`` (a ValueError) listing by torch name every missing, mis-shaped (in torch
  layout) and unexpected tensor and any position-embedding mismatch.
  """
  state_dict = unwrap_state_dict(state_dict, key)
  stride = _head_stride(model.head_norm)
  template = _variable_shapes(model)
  problems = _Problems()
  flat = _load(state_dict, template, lambda path: _torch_name(path, stride), problems)

  known = {_torch_name(p, stride) for entries in template.values() for p in entries}
  for path in template.get("batch_stats", {}):
    if path[-1] == "mean":  # one counter per BatchNorm layer
      known.add(_torch_name(path, stride).rsplit(".", 1)[0] + "." + _BN_COUNTER)
  grid = model.image_size // model.patch_size
  for name, width in zip(_POS_EMBED_NAMES, (model.width, model.decoder_width)):
    known.add(name)
    if check_pos_embed and name in state_dict:
      _check_pos_embed(name, _to_numpy(state_dict[name]), width, grid, problems)
  problems.unexpected = sorted(set(state_dict) - known)
  problems.raise_if_any(f"{type(model).__name__} (use_bc={model.use_bc})", ignore_unexpected)
  return (_unflatten(flat.get("params", {})), _unflatten(flat.get("batch_stats", {})))


def params_to_torch_state_dict(
    params: Mapping[str, Any], batch_stats: Optional[Mapping[str, Any]],
    model: vit.LUTModel, *, num_batches_tracked: int = 0,
) -> dict[str, np.ndarray]:
  """Our variables -> a reference-named ``state_dict`` of numpy arrays, which loads with
  ``load_state_dict(strict=True)`` into the reference module of the same configuration: it
  holds the fixed position embeddings and each BatchNorm's ``num_batches_tracked`` (the
  argument: we do not count batches). :func:`params_from_torch_state_dict` inverts it.
  """
  stride = _head_stride(model.head_norm)
  out: dict[str, np.ndarray] = {}
  grid = model.image_size // model.patch_size
  out["pos_embed"] = vit.sincos_pos_embed_2d(model.width, grid)[None]
  for collection, tree in (("params", params), ("batch_stats", batch_stats or {})):
    for path, value in traverse_util.flatten_dict(dict(tree)).items():
      name = _torch_name(path, stride)
      out[name] = np.ascontiguousarray(_to_torch_layout(path, _to_numpy(value)))
      if collection == "batch_stats" and path[-1] == "mean":
        out[name.rsplit(".", 1)[0] + "." + _BN_COUNTER] = np.asarray(num_batches_tracked,
                                                                     np.int64)
  if "decoder" in params:
    out["decoder_pos_embed"] = vit.sincos_pos_embed_2d(model.decoder_width, grid)[None]
  return out


# ------------------------------ encoder alone: reference checkpoints and timm VisionTransformer
def encoder_params_from_torch_state_dict(
    state_dict: StateDict, model: Union[vit.LUTModel, vit.Encoder], *,
    key: Optional[str] = None, ignore_unexpected: bool = False, check_pos_embed: bool = True,
) -> dict[str, Any]:
  """Encoder parameters (the tree under ``params["encoder"]``) from a reference, MAE or timm
  ``state_dict``, as :func:`params_from_torch_state_dict`. The decoder, mask token, heads
  and a timm classifier (``head.*``) are skipped silently; anything else ``model`` (a
  LUTModel, or an Encoder: channels from ``patch_embed.proj.weight``) has no place for
  (e.g. timm's ``fc_norm``) is reported unless ``ignore_unexpected``.
  """
  state_dict = unwrap_state_dict(state_dict, key)
  if isinstance(model, vit.LUTModel):
    template = {"params": {p[1:]: s for p, s in _variable_shapes(model)["params"].items()
                           if p[0] == "encoder"}}
  else:
    weight = state_dict.get("patch_embed.proj.weight")
    weight_shape = _to_numpy(weight).shape if weight is not None else ()
    channels = weight_shape[1] if len(weight_shape) == 4 else 3
    template = _variable_shapes(model, channels)
  width, grid = model.width, model.image_size // model.patch_size
  problems = _Problems()
  name_of = lambda path: _torch_name(("encoder",) + path, 3)  # noqa: E731
  flat = _load(state_dict, template, name_of, problems)
  known = {name_of(p) for p in template["params"]} | {"pos_embed"}
  if check_pos_embed and "pos_embed" in state_dict:
    _check_pos_embed("pos_embed", _to_numpy(state_dict["pos_embed"]), width, grid, problems)
  problems.unexpected = sorted(
      n for n in set(state_dict) - known if not n.startswith(_NON_ENCODER_PREFIXES))
  problems.raise_if_any("the encoder", ignore_unexpected)
  return _unflatten(flat.get("params", {}))


def encoder_params_from_timm_state_dict(
    state_dict: StateDict, model: Union[vit.LUTModel, vit.Encoder], *,
    ignore_unexpected: bool = False, check_pos_embed: bool = True,
) -> dict[str, Any]:
  """Encoder parameters from a timm ``VisionTransformer`` ``state_dict``: timm's encoder
  names are the reference's, so this is :func:`encoder_params_from_torch_state_dict`."""
  return encoder_params_from_torch_state_dict(
      state_dict, model, ignore_unexpected=ignore_unexpected, check_pos_embed=check_pos_embed)


def encoder_to_timm_state_dict(encoder_params: Mapping[str, Any], *,
                               image_size: int) -> dict[str, np.ndarray]:
  """Encoder parameters -> timm ``VisionTransformer`` ``state_dict`` (numpy), which loads
  with ``strict=True`` into ``VisionTransformer(img_size=image_size, patch_size=p,
  embed_dim=D, depth=N, num_heads=H, num_classes=0, global_pool='', norm_layer=partial(
  nn.LayerNorm, eps=1e-6))`` with the same ``forward_features``; ``pos_embed`` (a timm
  parameter) is our sin-cos constant for ``image_size``.
  """
  flat = traverse_util.flatten_dict(dict(encoder_params))
  kernel = _to_numpy(flat[("patch_embed", "proj", "kernel")])
  patch_size, width = kernel.shape[0], kernel.shape[-1]
  if image_size % patch_size:
    raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
  out = {"pos_embed": vit.sincos_pos_embed_2d(width, image_size // patch_size)[None]}
  for path, value in flat.items():
    out[_torch_name(("encoder",) + path, 3)] = np.ascontiguousarray(
        _to_torch_layout(path, _to_numpy(value)))
  return out


def torch_tensors(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """``{name: torch.Tensor}`` from numpy arrays (imports torch, lazily)."""
  import torch  # pylint: disable=g-import-not-at-top  (optional dependency)
  return {name: torch.from_numpy(np.array(value)) for name, value in state_dict.items()}
