"""Where pre-trained weights are, and reading them into arrays (:mod:`lut_jax.weights.loading`
builds the models): :func:`locate` is the one place that tells a ``pretrained`` path apart
(evaluation, export and analysis all ask it). PyTorch is imported only to read ``.pth``
files, ``huggingface_hub`` only for ``hf-hub:``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, NamedTuple, Optional

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from lut_jax import config_lib, errors
from lut_jax.data import image_utils
from lut_jax.models import variants
from lut_jax.runtime import checkpointing

ENCODER_CONFIG_FILE = "encoder_config.json"
TORCH_EXTENSIONS = (".pth", ".pt", ".bin")
SAFETENSORS_EXTENSION = ".safetensors"
# The layout timm's ``local-dir:`` loader and the Hugging Face Hub read: the weights under
# this name beside a ``config.json`` that names the architecture.
TIMM_WEIGHTS_FILE = "model.safetensors"
TIMM_CONFIG_FILE = "config.json"
HF_HUB_PREFIX = "hf-hub:"  # as in timm.create_model("hf-hub:org/name")
# What each kind of source is, in words (logs and messages).
KINDS = {"workdir": "pre-training run", "encoder": "exported encoder",
         "timm": "timm model folder", "torch": "PyTorch checkpoint",
         "safetensors": "safetensors state dict", "hf-hub": "Hugging Face Hub model"}
# Beside the checkpoints of a linear-probe / fine-tuning / segmentation run: the mode and
# the key (encoder, input, settings) it was trained with.
RESUME_KEY_FILE = "eval_key.json"


class Source(NamedTuple):
  """What a path given as pre-trained weights holds (see :func:`locate`)."""

  kind: str  # a KINDS key
  location: str  # absolute when local; "org/name[@revision]" for hf-hub
  step: Optional[int]  # the checkpoint a workdir's checkpoints/<step> names


def locate(path: str) -> Source:
  """What ``path``, given as pre-trained weights, holds: ``workdir`` (a pre-training work
  directory, step None: the latest, or one of its ``checkpoints/<step>``), ``encoder`` (a
  :func:`write_export` directory), ``timm`` (a folder with ``model.safetensors`` and the
  ``config.json`` naming its architecture), ``torch`` (a PyTorch checkpoint file),
  ``safetensors`` (a state dict alone) or ``hf-hub`` (``hf-hub:org/name[@revision]``, as
  timm names it; nothing is downloaded here). Anything else is a ``FileNotFoundError`` or
  ``errors.UserError`` saying what was expected.
  """
  if path.startswith(HF_HUB_PREFIX):
    repo = path[len(HF_HUB_PREFIX):]
    if not repo.split("@")[0].strip("/"):
      raise errors.UserError(f"{path}: no repository after {HF_HUB_PREFIX!r}",
                             hint=f"write {HF_HUB_PREFIX}org/name")
    return Source("hf-hub", repo, None)
  expected = (f"the work directory of a lut_jax run (with {config_lib.CONFIG_FILE} and "
              f"{checkpointing.CHECKPOINT_DIR}/), an exported encoder (with "
              f"{ENCODER_CONFIG_FILE}), a timm folder (with {TIMM_WEIGHTS_FILE}), a PyTorch "
              f"checkpoint file ({', '.join(TORCH_EXTENSIONS)}), a {SAFETENSORS_EXTENSION} "
              f"file or {HF_HUB_PREFIX}org/name")
  location = checkpointing.absolute(path)
  if location.is_file():
    if location.name.endswith(TORCH_EXTENSIONS):
      return Source("torch", os.fspath(location), None)
    if location.name.endswith(SAFETENSORS_EXTENSION):
      return Source("safetensors", os.fspath(location), None)
    raise errors.UserError(f"{path}: a file; expected {expected}")
  if (location / ENCODER_CONFIG_FILE).is_file():
    return Source("encoder", os.fspath(location), None)
  if (location / TIMM_WEIGHTS_FILE).is_file():
    return Source("timm", os.fspath(location), None)
  if location.name.isdigit() and location.parent.name == checkpointing.CHECKPOINT_DIR:
    return Source("workdir", os.fspath(location.parent.parent), int(location.name))
  if ((location / checkpointing.CHECKPOINT_DIR).is_dir()
      or (location / config_lib.CONFIG_FILE).is_file()):
    return Source("workdir", os.fspath(location), None)
  if location.exists():
    raise FileNotFoundError(f"{path}: not {expected}")
  raise FileNotFoundError(f"{path}: no such file or directory; expected {expected}")


# ----------------------------------------------------------------------------- lut_jax
def load_run_config(workdir: str, step: Optional[int] = None) -> Any:
  """The config of a pre-training run: ``WORKDIR/config.json``, else the copy inside the
  checkpoint ``step`` (the newest when None), for a work directory that kept its
  checkpoints but lost its top-level config."""
  try:
    return config_lib.load_config(workdir)
  except FileNotFoundError:
    root = checkpointing.absolute(workdir) / checkpointing.CHECKPOINT_DIR
    steps = checkpointing.finished_steps(root)
    if step is None or step < 0:
      step = steps[-1] if steps else None
    if step is None or not (root / str(step) / config_lib.CONFIG_FILE).exists():
      raise
    return config_lib.load_config(os.fspath(root / str(step)))


def write_export(directory: str, encoder_params: Any,
                 architecture: variants.EncoderConfig) -> str:
  """Writes an encoder's parameters (an Orbax PyTree checkpoint, ``params/``) and its
  architecture (``encoder_config.json``) into ``directory``; returns it, absolute.
  :func:`read_export` (and any loader of a ``pretrained`` path) reads it back."""
  root = checkpointing.absolute(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(root / "params", encoder_params, force=True)
  if jax.process_index() == 0:
    (root / ENCODER_CONFIG_FILE).write_text(json.dumps(architecture.to_json(), indent=2,
                                                       sort_keys=True))
  return os.fspath(root)


def read_export(directory: str) -> tuple[variants.EncoderConfig, Any]:
  """``(architecture, params)`` of a :func:`write_export` directory."""
  root = checkpointing.absolute(directory)
  architecture = variants.EncoderConfig(**json.loads((root / ENCODER_CONFIG_FILE).read_text()))
  with ocp.StandardCheckpointer() as ckptr:
    return architecture, ckptr.restore(root / "params")


# ----------------------------------------------------------------------------- PyTorch
def read_torch_checkpoint(path: str) -> Any:
  """``torch.load`` on the CPU, weights only: of classes only ``argparse.Namespace``, which
  reference training checkpoints pickle. A DataError naming ``path`` for anything else or
  a file that is no PyTorch checkpoint (truncated, corrupt, another kind).
  """
  import argparse
  import io
  import pickle
  import torch  # local: an optional dependency, only for .pth inputs

  # torch reads local files itself; other file systems (gs://...) through epath.
  data = epath.Path(path).read_bytes() if checkpointing.is_url(path) else None
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
    raise _not_a_checkpoint(path, first_line(e)) from e


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A ``.safetensors`` file as ``{name: numpy array}`` (``safetensors.numpy``: no torch); a
  DataError naming ``path`` when it is not one or holds a dtype numpy lacks (bfloat16)."""
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
    raise errors.DataError(f"{path}: not a safetensors file ({first_line(e)})") from e


def first_line(e: BaseException) -> str:
  """The first non-empty line of an error's message (else its type), for one-line errors."""
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


def timm_encoder_args(directory: str, name: str) -> dict[str, Any]:
  """``{"num_heads", "image_size", "gelu_approximate"}`` of the timm folder ``directory``'s
  ``config.json`` (``name`` in messages), None where it does not say; a user error when it
  is not a ViT our encoder computes exactly. Both of timm's layouts are read (``{"architecture",
  "model_args", "pretrained_cfg"}`` and the older single dict); without ``model_args`` (most
  Hub repositories) the geometry is the tensors' and the heads the standard ViT size's.
  """
  config_file = epath.Path(directory) / TIMM_CONFIG_FILE
  path = f"{name}/{TIMM_CONFIG_FILE}"
  if not config_file.exists():
    raise errors.DataError(f"{name}: no {TIMM_CONFIG_FILE} beside {TIMM_WEIGHTS_FILE}: the "
                           "architecture is unknown",
                           hint="a timm model folder holds both (model.save_pretrained / "
                                "timm.models.push_to_hf_hub write them)")
  try:
    config = json.loads(config_file.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise errors.DataError(f"{path}: not valid JSON ({e})") from e
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


def download_hf_hub(repo: str) -> str:
  """The local folder (in the Hugging Face cache) holding ``config.json`` and
  ``model.safetensors`` of the Hub repository ``repo`` (``org/name[@revision]``)."""
  name = HF_HUB_PREFIX + repo
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top (optional dependency)
  except ImportError as e:
    raise errors.UserError(
        f"{name}: reading from the Hugging Face Hub needs the huggingface_hub package",
        hint="pip install huggingface_hub, or pass a folder holding the repository's "
             f"{TIMM_WEIGHTS_FILE} and {TIMM_CONFIG_FILE}") from e
  repo_id, _, revision = repo.partition("@")
  # huggingface_hub's errors (a missing repository or file, no network) are OSErrors or
  # EntryNotFoundErrors; a malformed name is a ValueError.
  failures = (OSError, ValueError, getattr(getattr(huggingface_hub, "errors", None),
                                           "EntryNotFoundError", OSError))
  paths = []
  for filename in (TIMM_CONFIG_FILE, TIMM_WEIGHTS_FILE):
    try:
      paths.append(huggingface_hub.hf_hub_download(repo_id, filename,
                                                   revision=revision or None))
    except failures as e:
      raise errors.UserError(f"{name}: cannot download {filename}: {first_line(e)}") from e
  # Files of one revision share a snapshot folder.
  return os.path.dirname(paths[-1])
