"""Loads encoders (and MAE decoders, when there are any) for analysis.

The sources, told apart by :func:`lut_jax.runtime.checkpointing.locate_pretrained` (the one place that
decides what a path is):

* a pre-training workdir (``config.json`` + ``checkpoints/``; or one step directory
  ``WORKDIR/checkpoints/<step>``): the latest (or given) Orbax TrainState checkpoint. Only
  the chosen parameter tree is read (:func:`lut_jax.runtime.checkpointing.restore_subtrees`), so
  neither the optimizer nor the mesh/sharding of the run has to be rebuilt;
* an exported encoder directory (:func:`lut_jax.runtime.checkpointing.export_encoder`);
* a PyTorch ``.pth``/``.pt`` reference (naver-ai/lut, MAE) or timm checkpoint, or a
  ``.safetensors`` state dict, converted with :mod:`lut_jax.weights.convert`. The architecture is
  read from the tensor shapes; the number of heads is not in the shapes and comes from the
  standard ViT size of that width unless given;
* a timm / Hugging Face folder (``model.safetensors`` + ``config.json``, what ``lut-export``
  writes and ``timm.create_model("local-dir:...")`` reads) or ``hf-hub:org/name`` (the same
  two files downloaded with ``huggingface_hub``): the heads and image size come from
  ``config.json``, and an architecture our encoder cannot compute exactly (a learned
  position embedding, register tokens, layer scale, another activation...) is refused.

PyTorch is imported only to read ``.pth`` files; safetensors are read with
``safetensors.numpy``.

Probes for Grad-CAM (:func:`load_probe`) are linear-probe work directories or ``.npz``
files: ``kernel (D, classes)``, ``bias (classes,)``, optionally ``bn_mean``/``bn_var`` (the
MAE linear-probe recipe's affine-free BatchNorm, eps 1e-6) and ``pool`` (``"mean"`` of the
patch tokens, the default, or ``"cls"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from typing import Any, Callable, Mapping, Optional

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from lut_jax import config_lib, errors
from lut_jax.data import image_utils
from lut_jax.evaluation import features
from lut_jax.models import variants, vit
from lut_jax.runtime import checkpointing


@dataclasses.dataclass
class LoadedModel:
  """An encoder (always) and the full LUT/MAE model with its decoder (when available).

  Attributes:
    label: name used in plots and metrics.
    source: where it came from (an absolute path, or ``hf-hub:org/name``).
    kind: a :data:`lut_jax.runtime.checkpointing.PRETRAINED_KINDS` entry (``"workdir"``,
      ``"encoder"``, ``"timm"``, ``"torch"``, ``"safetensors"``, ``"hf-hub"``).
    encoder: an :class:`~lut_jax.models.vit.Encoder` (float32, no remat).
    encoder_params: its parameters.
    channels: input channels.
    model: a :class:`~lut_jax.models.vit.LUTModel` for reconstructions, or ``None``.
    params: ``model``'s parameters, or ``None``.
    mask_ratio, norm_pix: the pre-training settings (for reconstructions).
    step: the checkpoint step, when known.
  """

  label: str
  source: str
  kind: str
  encoder: vit.Encoder
  encoder_params: Any
  channels: int
  model: Optional[vit.LUTModel] = None
  params: Optional[Any] = None
  mask_ratio: float = 0.75
  norm_pix: bool = True
  step: Optional[int] = None

  @property
  def image_size(self) -> int:
    return self.encoder.image_size

  @property
  def patch_size(self) -> int:
    return self.encoder.patch_size

  @property
  def grid_size(self) -> int:
    return self.encoder.image_size // self.encoder.patch_size

  @property
  def has_decoder(self) -> bool:
    return self.model is not None and self.params is not None and "decoder" in self.params

  def describe(self) -> dict[str, Any]:
    """JSON-ready description (for metrics.json)."""
    e = self.encoder
    return {"source": self.source, "kind": self.kind, "step": self.step,
            "image_size": e.image_size, "patch_size": e.patch_size, "width": e.width,
            "depth": e.depth, "num_heads": e.num_heads, "channels": self.channels,
            "has_decoder": self.has_decoder}


def encoder_of(model: vit.LUTModel) -> vit.Encoder:
  """A standalone Encoder with ``model``'s encoder architecture (its parameters are
  ``params["encoder"]``), in float32 and without remat: analysis wants exact numbers and
  has no backward pass to save memory for."""
  return vit.Encoder(model.image_size, model.patch_size, model.width, model.depth,
                        model.num_heads, mlp_ratio=model.mlp_ratio,
                        gelu_approximate=model.gelu_approximate)


# ----------------------------------------------------------------------------- workdirs


def load_workdir(workdir: str, *, step: Optional[int] = None, which: str = "params",
                 label: Optional[str] = None) -> LoadedModel:
  """The online network (``which="params"``) or the EMA teacher (``"target_params"``) of
  a pre-training workdir, at ``step`` (None: the latest)."""
  workdir = os.fspath(checkpointing.absolute(workdir))
  config = checkpointing.load_run_config(workdir, step)
  model = vit.build_model(config.model, image_size=int(config.input.image_size),
                             channels=int(config.input.channels),
                             use_bc=config_lib.uses_bc(config))
  subtrees, step = checkpointing.restore_subtrees(
      epath.Path(workdir) / checkpointing.CHECKPOINT_DIR, [which], step)
  params = subtrees[which]
  return LoadedModel(
      label=label or os.path.basename(workdir), source=workdir, kind="workdir",
      encoder=encoder_of(model), encoder_params=params["encoder"], channels=model.channels,
      model=model, params=params, mask_ratio=float(config.loss.mask_ratio),
      norm_pix=bool(config.loss.norm_pix), step=step)


# ----------------------------------------------------------------------------- exports


def load_exported_encoder(path: str, *, label: Optional[str] = None) -> LoadedModel:
  """An encoder written by :func:`lut_jax.runtime.checkpointing.export_encoder`."""
  encoder, params = checkpointing.load_encoder(path)
  params = jax.tree.map(np.asarray, params)
  channels = int(params["patch_embed"]["proj"]["kernel"].shape[2])
  encoder = encoder.clone(dtype=jnp.float32, remat=False, attention_impl=None)
  source = checkpointing.absolute(path)
  return LoadedModel(label=label or source.name, source=os.fspath(source), kind="encoder",
                     encoder=encoder, encoder_params=params, channels=channels)


# ----------------------------------------------------------------------------- PyTorch


def read_torch_checkpoint(path: str) -> Any:
  """``torch.load`` on the CPU, weights only. Reference training checkpoints also pickle
  their ``argparse.Namespace``; that one class is allowed, nothing else.

  Raises:
    DataError: naming ``path``, when it is not a PyTorch checkpoint (truncated, corrupt or
      another kind of file) or holds Python objects the weights-only reader refuses.
  """
  import argparse
  import io
  import pickle
  import torch  # local: an optional dependency, only for .pth inputs

  # torch reads local files itself; other file systems (gs://...) through epath.
  data = epath.Path(path).read_bytes() if "://" in path else None
  source = lambda: path if data is None else io.BytesIO(data)  # noqa: E731
  try:
    try:
      return torch.load(source(), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a pickled Namespace (or a file that is no pickle)
      with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(source(), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    reason = _weights_only_reason(e)
    # Any object the file pickles (a class, a function to call: what a payload needs) is
    # first named by a GLOBAL, which the weights-only reader refuses.
    unpicklable = re.search(r"\bGLOBAL (\S+)", reason)
    name = unpicklable.group(1) if unpicklable else None
    if reason.startswith("Unsupported operand"):  # it stopped before any GLOBAL
      name = _pickled_global(epath.Path(path).read_bytes() if data is None else data)
    if name:
      raise errors.DataError(
          f"{path}: holds Python objects that are not plain tensors (e.g. "
          f"{name}); they will not be unpickled: only tensors, containers "
          "and argparse.Namespace are read",
          hint="if you made the file, save the weights alone, e.g. "
               "torch.save(model.state_dict(), path)") from e
    raise _not_a_checkpoint(path, reason) from e
  except OSError as e:
    if errors.as_user_error(e) is not None:  # missing, unreadable: the OS says which
      raise
    # torch's zip reader fails with a bare EINVAL on an archive cut short.
    raise _not_a_checkpoint(path, f"unreadable zip archive: {e.strerror or e}") from e
  except EOFError as e:
    raise _not_a_checkpoint(path, "unexpected end of file") from e
  except (KeyError, IndexError) as e:
    # The legacy (pre-zip) reader unpickles arbitrary bytes and fails on the first
    # unknown opcode with a bare KeyError/IndexError such as KeyError(101).
    raise _not_a_checkpoint(path, f"invalid pickle data: {type(e).__name__} {e}") from e
  except (RuntimeError, ValueError) as e:  # "failed finding central directory", ...
    raise _not_a_checkpoint(path, _first_line(e)) from e


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A ``.safetensors`` file as ``{name: numpy array}`` (``safetensors.numpy``: no torch).

  Raises:
    DataError: naming ``path``, when it is not a safetensors file (truncated, corrupt) or
      holds a dtype numpy lacks (bfloat16).
  """
  try:
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError(f"{path}: reading safetensors files needs the safetensors "
                           "package", hint="pip install safetensors") from e
  data = epath.Path(path).read_bytes()
  try:
    return dict(safetensors_numpy.load(data))
  except KeyError as e:  # the dtype table of safetensors.numpy has no BF16
    raise errors.DataError(f"{path}: holds {e.args[0]} tensors, which numpy cannot hold",
                           hint="save the weights as float32") from e
  except Exception as e:  # noqa: BLE001 - safetensors' own SafetensorError, by name
    if type(e).__name__ != "SafetensorError":
      raise
    raise errors.DataError(f"{path}: not a safetensors file ({_first_line(e)})") from e


def read_state_dict_file(path: str) -> Any:
  """A checkpoint file: ``.safetensors`` with :func:`read_safetensors`, anything else with
  :func:`read_torch_checkpoint` (which imports torch)."""
  if path.endswith(checkpointing.SAFETENSORS_EXTENSION):
    return read_safetensors(path)
  return read_torch_checkpoint(path)


def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0] if lines else type(e).__name__


def _weights_only_reason(e: BaseException) -> str:
  """The line of torch's long weights-only failure message that says what failed, without
  the advice around it (to rerun with ``weights_only=False`` or to allow the object: never
  for a file of unknown origin)."""
  for line in str(e).splitlines():
    line = line.strip().removeprefix("Weights only load failed.").strip()
    line = line.removeprefix("WeightsUnpickler error:").strip()
    if line and not re.search(r"weights_only|trust the source", line):
      return line.split(" Please use `torch.serialization.add_safe_globals", 1)[0]
  return type(e).__name__


def _pickled_global(data: bytes) -> Optional[str]:
  """A class or function a plain pickle (``pickle.dump``'s default protocol, which the
  weights-only reader stops at) names, read without running it: the first outside torch
  and collections (the tensor rebuilders and OrderedDict any pickled tensor names) if any;
  None if it names none."""
  import pickletools  # local: only this error path needs it

  names, strings = [], []
  try:
    for opcode, arg, _ in pickletools.genops(data):
      if opcode.name in ("GLOBAL", "INST"):
        names.append(arg.replace(" ", "."))
      elif opcode.name == "STACK_GLOBAL":  # module and name were pushed just before
        names.append(".".join(strings[-2:]))
      elif isinstance(arg, str):
        strings.append(arg)
  except ValueError:  # not a pickle, or cut short: what was read still counts
    pass
  return next((n for n in names if not n.startswith(("torch.", "collections."))),
              names[0] if names else None)


def _not_a_checkpoint(path: str, reason: str) -> errors.DataError:
  return errors.DataError(f"{path}: not a PyTorch checkpoint (truncated or corrupt: "
                          f"{reason})")


def _state_dict_of(path: str, checkpoint: Any, key: Optional[str]) -> dict[str, Any]:
  """The ``{name: tensor}`` mapping inside what ``torch.load`` returned, or a DataError
  saying what the file holds instead."""
  from lut_jax.weights import convert  # local: only PyTorch inputs need the converter

  if not isinstance(checkpoint, Mapping):
    raise errors.DataError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict "
                           "(a mapping of tensor names to tensors)")
  if key is not None:
    if key not in checkpoint:
      raise errors.DataError(f"{path} has no entry {key!r}; it has "
                             f"{_names(checkpoint)}")
    if not isinstance(checkpoint[key], Mapping):
      raise errors.DataError(f"{path}: entry {key!r} holds a "
                             f"{type(checkpoint[key]).__name__}, not a state_dict")
  return convert.unwrap_state_dict(checkpoint, key)


def _names(mapping: Mapping[str, Any], limit: int = 8) -> str:
  names = sorted(map(repr, map(str, mapping)))
  more = f", ... ({len(names)} in all)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more if names else "nothing"


def _count_blocks(state_dict: dict[str, Any], prefix: str) -> int:
  pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
  ids = {int(m.group(1)) for name in state_dict if (m := pattern.match(name))}
  return max(ids) + 1 if ids else 0


def _default_heads(path: str, width: int) -> int:
  for w, _, heads in variants.ENCODER_SIZES.values():
    if w == width:
      return heads
  raise errors.DataError(
      f"{path}: no standard ViT size has width {width}, so its number of heads (which the "
      "tensor shapes do not show) is unknown",
      hint="pass --num_heads (num_heads= in Python)")


def _check_fixed_pos_embed(path: str, state_dict: dict[str, Any], name: str, width: int,
                           grid: int) -> None:
  """A DataError unless ``state_dict[name]`` (when present) is our fixed sin-cos table.

  Our encoder has no position-embedding parameter, so a learned one (a standard timm or a
  fine-tuned ViT) would be dropped and the analyses would describe a different model.
  """
  from lut_jax.weights import convert  # local: only PyTorch inputs need the converter

  if name not in state_dict:
    return
  value = convert._to_numpy(state_dict[name])  # pylint: disable=protected-access
  expected = vit.sincos_pos_embed_2d(width, grid)[None]
  if value.shape != expected.shape:
    # Only the number of positions can come from a wrong image size; a wrong width cannot.
    grid_only = value.ndim == 3 and value.shape[-1] == width
    raise errors.DataError(
        f"{path}: {name} has shape {value.shape}; a {grid}x{grid} patch grid with a cls "
        f"token needs {expected.shape}",
        hint="pass the checkpoint's image size with --image_size (image_size= in Python), "
             "or leave it out to read it from pos_embed" if grid_only else "")
  diff = float(np.max(np.abs(value.astype(np.float64) - expected)))
  if diff > convert._POS_EMBED_ATOL:  # pylint: disable=protected-access
    raise errors.DataError(
        f"{path}: {name} is a learned position embedding (it differs from the fixed 2-D "
        f"sin-cos one by up to {diff:.3g}); lut_jax's encoder has only the fixed one, so "
        "analysing these weights with it would describe a different model",
        hint="analyse a checkpoint pre-trained with the fixed sin-cos embedding (MAE or LUT "
             "pre-training, or a timm_vit.pth written by lut-export)")


def _shape(state_dict: dict[str, Any], name: str) -> tuple[int, ...]:
  from lut_jax.weights import convert  # local: only PyTorch inputs need the converter

  return tuple(np.shape(convert._to_numpy(state_dict[name])))  # pylint: disable=protected-access


def load_torch(path: str, *, key: Optional[str] = None, num_heads: Optional[int] = None,
               decoder_num_heads: int = 16, image_size: Optional[int] = None,
               label: Optional[str] = None, encoder_only: bool = False) -> LoadedModel:
  """A PyTorch checkpoint (or a ``.safetensors`` state dict): encoder + decoder when it has
  ``decoder_*`` tensors (a reference pre-training checkpoint) and not ``encoder_only``, else
  the encoder alone (e.g. timm). ``key`` picks an entry such as ``"model_ema"`` (the
  reference's teacher).

  Raises:
    DataError: naming ``path``, when the file is not a PyTorch checkpoint, does not hold a
      ViT state_dict, or holds a ViT that our encoder cannot represent (a learned position
      embedding, tensors of the wrong shape or that our encoder has no place for).
  """
  kind = "safetensors" if path.endswith(checkpointing.SAFETENSORS_EXTENSION) else "torch"
  checkpoint = read_state_dict_file(path)
  state_dict = _state_dict_of(path, checkpoint, key)
  args = checkpoint.get("args")
  return _from_state_dict(
      path, state_dict, kind=kind, key=key, num_heads=num_heads,
      decoder_num_heads=decoder_num_heads, image_size=image_size, encoder_only=encoder_only,
      label=label or os.path.splitext(os.path.basename(path))[0],
      norm_pix=bool(getattr(args, "norm_pix_loss", True)),
      mask_ratio=float(getattr(args, "mask_ratio", 0.75)))


def _from_state_dict(path: str, state_dict: dict[str, Any], *, kind: str, label: str,
                     key: Optional[str] = None, num_heads: Optional[int] = None,
                     decoder_num_heads: int = 16, image_size: Optional[int] = None,
                     encoder_only: bool = False, source: Optional[str] = None,
                     norm_pix: bool = True, mask_ratio: float = 0.75,
                     gelu_approximate: bool = False) -> LoadedModel:
  """The model of a reference/timm-named ``state_dict`` read from ``path`` (the name its
  errors give); the architecture is read from the tensor shapes, the activation (which
  they do not show) from ``gelu_approximate`` (encoder only)."""
  from lut_jax.weights import convert  # local: only these sources need the converter

  for name, ndim in (("patch_embed.proj.weight", 4), ("blocks.0.mlp.fc1.weight", 2)):
    if name not in state_dict or len(_shape(state_dict, name)) != ndim:
      nested = [k for k, v in state_dict.items() if isinstance(v, Mapping)]
      raise errors.DataError(
          f"{path}: no {ndim}-D {name}: not a ViT checkpoint (it has {_names(state_dict)})",
          hint=(f"pick the entry that holds the weights among {', '.join(map(repr, nested))} "
                "with --torch_key (key= in Python)") if nested and key is None else "")
  width, channels, patch, _ = _shape(state_dict, "patch_embed.proj.weight")
  depth = _count_blocks(state_dict, "blocks")
  mlp_ratio = _shape(state_dict, "blocks.0.mlp.fc1.weight")[0] / width
  if image_size is None:
    if "pos_embed" not in state_dict:
      raise errors.DataError(f"{path}: no pos_embed to read the image size from",
                             hint="pass --image_size (image_size= in Python)")
    positions = _shape(state_dict, "pos_embed")[-2] - 1
    grid = int(round(max(positions, 0) ** 0.5))
    if len(_shape(state_dict, "pos_embed")) != 3 or grid * grid != positions or grid < 1:
      raise errors.DataError(
          f"{path}: pos_embed of shape {_shape(state_dict, 'pos_embed')} is not a cls token "
          "plus a square grid of patches")
    image_size = grid * patch
  num_heads = num_heads or _default_heads(path, width)
  if width % num_heads:
    raise errors.UserError(f"{path}: width {width} is not divisible by num_heads={num_heads}")
  grid = image_size // patch
  _check_fixed_pos_embed(path, state_dict, "pos_embed", width, grid)
  common = dict(label=label, source=source or os.fspath(checkpointing.absolute(path)),
                kind=kind, channels=channels, norm_pix=norm_pix, mask_ratio=mask_ratio)
  # The converter's own problems (missing or mis-shaped tensors) are DataErrors too; they
  # name tensors, not the file, so the file is put in front.
  if "decoder_embed.weight" in state_dict and not encoder_only:
    decoder_width = _shape(state_dict, "decoder_embed.weight")[0]
    if decoder_width % decoder_num_heads:
      raise errors.UserError(f"{path}: decoder width {decoder_width} is not divisible by "
                             f"decoder_num_heads={decoder_num_heads}")
    _check_fixed_pos_embed(path, state_dict, "decoder_pos_embed", decoder_width, grid)
    model = vit.LUTModel(
        image_size=image_size, patch_size=patch, width=width, depth=depth,
        num_heads=num_heads, channels=channels, mlp_ratio=mlp_ratio,
        decoder_width=decoder_width,
        decoder_depth=_count_blocks(state_dict, "decoder_blocks"),
        decoder_num_heads=decoder_num_heads, use_bc=False,  # no heads: these go unused
        head_depth=0, pred_depth=0, head_hidden_dim=0, head_norm="none", head_activation="relu")
    # The projector/predictor (if any) are not needed for the analyses: skip them. The
    # position embeddings were checked above, against the file's name.
    try:
      params, _ = convert.params_from_torch_state_dict(
          state_dict, model, ignore_unexpected=True, check_pos_embed=False)
    except errors.DataError as e:
      raise errors.DataError(f"{path}: {e}", e.hint) from e
    return LoadedModel(encoder=encoder_of(model), encoder_params=params["encoder"],
                       model=model, params=params, **common)
  encoder = vit.Encoder(image_size, patch, width, depth, num_heads, mlp_ratio=mlp_ratio,
                           gelu_approximate=gelu_approximate)
  # The decoder, mask token and heads are skipped by name; anything else (register tokens,
  # layer scale, a pre-norm, an fc_norm) is a tensor our encoder would silently lack.
  try:
    params = convert.encoder_params_from_torch_state_dict(
        state_dict, encoder, ignore_unexpected=False, check_pos_embed=False)
  except errors.DataError as e:
    raise errors.DataError(f"{path}: {e}", e.hint) from e
  return LoadedModel(encoder=encoder, encoder_params=params, **common)


# ----------------------------------------------------------------------------- timm, Hub

# timm act_layer values our encoder computes, and the gelu_approximate that computes each.
_TIMM_GELU_APPROXIMATE = {None: False, "gelu": False, "gelu_tanh": True}
# timm VisionTransformer kwargs (a config.json's model_args) that do not change what the
# encoder computes in inference (None), or the values it can compute (read elsewhere where
# they matter, as act_layer): any other key or value is an architecture our encoder cannot
# represent exactly.
_NEUTRAL_TIMM_ARGS: dict[str, Optional[tuple[Any, ...]]] = {
    "img_size": None, "patch_size": None, "in_chans": None, "embed_dim": None, "depth": None,
    "num_heads": None, "mlp_ratio": None, "num_classes": None, "global_pool": None,
    "dynamic_img_size": None, "dynamic_img_pad": None, "drop_rate": None,
    "pos_drop_rate": None, "patch_drop_rate": None, "proj_drop_rate": None,
    "attn_drop_rate": None, "drop_path_rate": None, "weight_init": None, "fix_init": None,
    "qkv_bias": (True,), "proj_bias": (True,), "class_token": (True,), "pos_embed": ("learn",),
    "no_embed_class": (False,), "reg_tokens": (0,), "pre_norm": (False,),
    "final_norm": (True,), "fc_norm": (None, False), "init_values": (None,),
    "qk_norm": (False,), "scale_attn_norm": (False,), "scale_mlp_norm": (False,),
    "act_layer": tuple(_TIMM_GELU_APPROXIMATE), "norm_layer": (None, "layernorm"),
}


def timm_encoder_args(path: str, config: Mapping[str, Any]) -> dict[str, Any]:
  """``{"num_heads", "image_size", "gelu_approximate"}`` of a timm ``config.json`` (None
  where it does not say; ``act_layer="gelu_tanh"``, as ``lut-export`` writes for a tanh-GELU
  encoder, is ``gelu_approximate``),
  or a user error naming ``path`` when it is not a ViT that our encoder computes exactly.

  Both layouts timm reads are accepted: ``{"architecture", "model_args", "pretrained_cfg"}``
  and the older single dict. Without ``model_args`` (most Hub repositories) the geometry is
  the tensors' and the heads the standard ViT size's.
  """
  if not isinstance(config, Mapping) or not isinstance(config.get("architecture"), str):
    raise errors.DataError(f"{path}: not a timm config (no architecture)")
  architecture = config["architecture"]
  # timm's VisionTransformer family; "quickgelu" variants (CLIP) use another activation,
  # which the tensors do not show.
  if not architecture.startswith("vit_") or "quickgelu" in architecture:
    raise errors.DataError(
        f"{path}: unsupported architecture {architecture!r}: lut_jax's encoder is a plain ViT "
        "(timm vit_*, GELU, cls token, fixed 2-D sin-cos position embedding)")
  model_args = config.get("model_args") or {}
  pretrained_cfg = config.get("pretrained_cfg", config)
  for name, value in model_args.items():
    allowed = _NEUTRAL_TIMM_ARGS.get(name, ())
    if allowed is not None and value not in allowed:
      raise errors.DataError(f"{path}: unsupported architecture {architecture!r} with "
                             f"model_args {name}={value!r}: lut_jax's encoder cannot compute it")
  size = model_args.get("img_size") or (pretrained_cfg.get("input_size") or [None])[1:]
  if isinstance(size, (list, tuple)):
    if len(set(size)) > 1:
      raise errors.DataError(f"{path}: non-square input size {list(size)}: lut_jax's encoder "
                             "takes square images")
    size = size[0] if size else None
  mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
  if mean is not None and std is not None:
    ours = image_utils.normalization_constants(len(mean)) if len(mean) in (1, 3) else None
    if ours is None or not (np.allclose(mean, ours[0], atol=1e-3)
                            and np.allclose(std, ours[1], atol=1e-3)):
      logging.warning("%s was trained on images normalised with mean %s, std %s; lut_jax "
                      "feeds ImageNet-normalised images", path, mean, std)
  return {"num_heads": model_args.get("num_heads"),
          "image_size": int(size) if size else None,
          "gelu_approximate": _TIMM_GELU_APPROXIMATE[model_args.get("act_layer")]}


def load_timm(directory: str, *, label: Optional[str] = None, kind: str = "timm",
              source: Optional[str] = None) -> LoadedModel:
  """The encoder of a timm / Hugging Face folder: ``model.safetensors`` and the
  ``config.json`` beside it (the layout ``lut-export`` writes and timm's ``local-dir:``
  and ``hf-hub:`` read). ``source`` names it in descriptions (default: ``directory``)."""
  root = epath.Path(directory)
  weights = os.fspath(root / checkpointing.TIMM_WEIGHTS_FILE)
  config_file = root / checkpointing.TIMM_CONFIG_FILE
  name = source or os.fspath(root)
  if not config_file.exists():
    raise errors.DataError(f"{name}: no {checkpointing.TIMM_CONFIG_FILE} beside "
                           f"{checkpointing.TIMM_WEIGHTS_FILE}: the architecture is unknown",
                           hint="a timm model folder holds both (model.save_pretrained / "
                                "timm.models.push_to_hf_hub write them)")
  try:
    config = json.loads(config_file.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{name}/{checkpointing.TIMM_CONFIG_FILE}: not valid JSON "
                           f"({e})") from e
  args = timm_encoder_args(f"{name}/{checkpointing.TIMM_CONFIG_FILE}", config)
  state_dict = _state_dict_of(weights, read_safetensors(weights), None)
  if "pos_embed" not in state_dict:  # e.g. a rotary-embedding ViT
    raise errors.DataError(f"{name}: no pos_embed: not a ViT with a fixed position embedding")
  return _from_state_dict(
      f"{name}/{checkpointing.TIMM_WEIGHTS_FILE}", state_dict, kind=kind,
      num_heads=args["num_heads"], image_size=args["image_size"], encoder_only=True,
      gelu_approximate=args["gelu_approximate"],
      source=name, label=label or os.path.basename(name.rstrip("/")))


def download_hf_hub(repo: str) -> str:
  """The local folder (in the Hugging Face cache) holding ``config.json`` and
  ``model.safetensors`` of the Hub repository ``repo`` (``org/name[@revision]``)."""
  name = checkpointing.HF_HUB_PREFIX + repo
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top (optional dependency)
  except ImportError as e:
    raise errors.UserError(
        f"{name}: reading from the Hugging Face Hub needs the huggingface_hub package",
        hint="pip install huggingface_hub, or pass a folder holding the repository's "
             f"{checkpointing.TIMM_WEIGHTS_FILE} and {checkpointing.TIMM_CONFIG_FILE}") from e
  repo_id, _, revision = repo.partition("@")
  # huggingface_hub's errors (a missing repository or file, no network) are OSErrors or
  # EntryNotFoundErrors; a malformed name is a ValueError.
  failures = (OSError, ValueError, getattr(getattr(huggingface_hub, "errors", None),
                                           "EntryNotFoundError", OSError))
  paths = []
  for filename in (checkpointing.TIMM_CONFIG_FILE, checkpointing.TIMM_WEIGHTS_FILE):
    try:
      paths.append(huggingface_hub.hf_hub_download(repo_id, filename,
                                                   revision=revision or None))
    except failures as e:
      raise errors.UserError(f"{name}: cannot download {filename}: {_first_line(e)}") from e
  # Files of one revision share a snapshot folder.
  return os.path.dirname(paths[-1])


def load_hf_hub(repo: str, *, label: Optional[str] = None) -> LoadedModel:
  """The encoder of the Hub repository ``repo`` (``org/name[@revision]``), a timm folder
  once downloaded (:func:`download_hf_hub`)."""
  return load_timm(download_hf_hub(repo), label=label or repo.split("@")[0].split("/")[-1],
                   kind="hf-hub", source=checkpointing.HF_HUB_PREFIX + repo)


# ----------------------------------------------------------------------------- dispatch


def load(path: str, *, label: Optional[str] = None, which: str = "params",
         **torch_kwargs) -> LoadedModel:
  """Loads ``path`` as a workdir, an exported encoder, a timm folder, a PyTorch or
  safetensors checkpoint, or ``hf-hub:org/name``.

  Args:
    path: see the module docstring.
    label: display name (default: the directory or file name).
    which: for workdirs, ``"params"`` (the online network) or ``"target_params"``.
    **torch_kwargs: :func:`load_torch`'s options (``key``, ``num_heads``, ...), for
      checkpoint files.
  """
  return load_located(*checkpointing.locate_pretrained(path), label=label, which=which,
                      **torch_kwargs)


def load_located(kind: str, location: str, step: Optional[int] = None, *,
                 label: Optional[str] = None, which: str = "params",
                 **torch_kwargs) -> LoadedModel:
  """:func:`load` of what :func:`lut_jax.runtime.checkpointing.locate_pretrained` found."""
  if which != "params" and kind != "workdir":
    # Only a run keeps the EMA teacher: analysing the online weights under its name would
    # report the wrong network.
    raise errors.ConfigError(f"{location}: which={which!r} reads a pre-training work "
                             f"directory's teacher; a {kind} source holds one network",
                             hint="pass the work directory, or which='params'")
  if kind in ("torch", "safetensors"):
    loaded = load_torch(location, label=label, **torch_kwargs)
  elif kind == "timm":
    loaded = load_timm(location, label=label)
  elif kind == "hf-hub":
    loaded = load_hf_hub(location, label=label)
  elif kind == "encoder":  # checkpointing.load_encoder checks finiteness
    return load_exported_encoder(location, label=label)
  else:  # checkpointing.restore_subtrees checks finiteness
    return load_workdir(location, step=step, which=which, label=label)
  # Converted weights get the check checkpointing's loaders make (check_finite).
  checkpointing.check_finite(
      loaded.params if loaded.params is not None else loaded.encoder_params, loaded.source)
  return loaded


# ----------------------------------------------------------------------------- probes


def load_probe(path: str, pool: Optional[str] = None) -> dict[str, Any]:
  """A linear classifier on the encoder's features: an ``.npz`` file (see the module
  docstring) or a linear-probe work directory of :mod:`lut_jax.evaluation.linear_probe`
  (latest ``checkpoints/<step>``: ``params["head"]`` and the ``batch_stats["bn"]`` of its
  affine-free BatchNorm; the pooling from ``config.json``'s ``linear_probe.pool``, else
  ``"cls"``, that recipe's default). ``pool`` overrides the stored pooling.
  """
  if os.path.isdir(path):
    state, _ = checkpointing.restore_subtrees(
        os.path.join(path, checkpointing.CHECKPOINT_DIR), ["params", "batch_stats"])
    head = state["params"].get("head", {})
    if not isinstance(head, Mapping) or not {"kernel", "bias"} <= set(head):
      # e.g. a LUT pre-training run, whose "head" is the multi-layer BC head.
      raise errors.WorkdirError(f"{path}: not a linear-probe run (its params have no "
                                "linear head/kernel and head/bias)")
    probe = {"kernel": head["kernel"], "bias": head["bias"]}
    if state["batch_stats"].get("bn"):
      probe["bn_mean"] = state["batch_stats"]["bn"]["mean"]
      probe["bn_var"] = state["batch_stats"]["bn"]["var"]
    # The pooling the probe was trained with is in its resume record (the workdir's
    # config.json is the last lut-eval's, which may be another mode's).
    stored = "cls"
    record = os.path.join(path, checkpointing.CHECKPOINT_DIR, features.RESUME_KEY_FILE)
    if os.path.exists(record):
      with open(record) as f:
        stored = json.load(f)["key"].get("pools", ["cls"])[0]
  else:
    with open(path, "rb") as f:
      head = f.read(6)
    # np.load takes anything that is neither .npy nor .npz for a pickle and says so, which
    # would mislead about a file that is simply something else.
    if head.startswith(b"\x93NUMPY"):
      raise errors.DataError(f"{path}: a probe .npz holds named arrays; this .npy holds one")
    if not head.startswith(b"PK"):
      raise errors.DataError(f"{path}: not a probe .npz (not a NumPy .npz archive)")
    try:
      with np.load(path, allow_pickle=False) as data:
        probe = {k: np.asarray(data[k]) for k in data.files}
    except (EOFError, ValueError, zipfile.BadZipFile) as e:  # cut short, object arrays
      raise errors.DataError(f"{path}: not a probe .npz ({_first_line(e)})") from e
    for name in ("kernel", "bias"):
      if name not in probe:
        raise errors.DataError(f"{path}: a probe needs {name!r}; it has {sorted(probe)}")
    checkpointing.check_finite(probe, path)  # a workdir's is checked by restore_subtrees
    stored = str(probe.get("pool", "mean"))
  probe["pool"] = pool or stored
  if probe["pool"] not in ("mean", "cls"):
    raise errors.DataError(f"{path}: pool must be 'mean' or 'cls', got {probe['pool']!r}")
  return probe


def probe_logits_fn(encoder: vit.Encoder,
                    probe: dict[str, Any]) -> Callable[[Any, jax.Array], jax.Array]:
  """``logits_fn(encoder_params, images)`` of ``encoder`` followed by the probe."""
  kernel, bias = jnp.asarray(probe["kernel"]), jnp.asarray(probe["bias"])
  bn = ((jnp.asarray(probe["bn_mean"]), jnp.asarray(probe["bn_var"]))
        if "bn_mean" in probe else None)
  pool = probe["pool"]

  def logits_fn(encoder_params: Any, images: jax.Array) -> jax.Array:
    tokens = encoder.apply({"params": encoder_params}, images)
    feats = tokens[:, 0] if pool == "cls" else vit.mean_patch_token(tokens)
    if bn is not None:
      feats = (feats - bn[0]) * jax.lax.rsqrt(bn[1] + 1e-6)
    return feats @ kernel + bias

  return logits_fn
