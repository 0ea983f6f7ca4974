"""The one loader of pre-trained weights: :func:`load` builds the encoder (and the LUT/MAE
model with its decoder, when the source has one and it is asked for) of any source
:func:`lut_jax.weights.sources.locate` tells apart, refusing NaN or infinite weights.

The architecture comes from a run's config, an export's ``encoder_config.json``, or the
tensor shapes of converted weights with what they do not show (the heads: a timm
``config.json``'s, else the standard ViT size's of that width); one our encoder cannot
compute exactly (a learned position embedding, register tokens, layer scale, another
activation...) is refused. From a run only the chosen tree is read, not the optimizer state.

Probes for Grad-CAM (:func:`load_probe`) are linear-probe work directories or ``.npz``
files: ``kernel (D, classes)``, ``bias (classes,)``, optionally ``bn_mean``/``bn_var`` (the
MAE probe's affine-free BatchNorm, eps 1e-6) and ``pool`` (``"mean"``, the default, or
``"cls"``). Fine-tuned classifiers: :func:`load_finetuned`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import zipfile
from typing import Any, Callable, Mapping, NamedTuple, Optional

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lut_jax import config_lib, errors
from lut_jax.models import variants, vit
from lut_jax.runtime import checkpointing
from lut_jax.weights import convert, sources


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """Pre-trained weights, loaded: the encoder, and the whole model when there is one."""

  encoder: vit.Encoder  # float32, no remat
  params: Any  # the encoder's
  channels: int
  source: str = ""  # where it was loaded from, in words, for logs
  path: str = ""  # absolute directory or file, or hf-hub:org/name ("" when built in memory)
  kind: str = ""  # a sources.KINDS key ("" when built in memory)
  step: Optional[int] = None  # of a pre-training run's checkpoint
  label: str = ""  # its name in the analyses' plots and metrics
  model: Optional[vit.LUTModel] = None  # float32, for reconstructions
  model_params: Optional[Any] = None
  mask_ratio: float = 0.75  # pre-training's (for reconstructions)
  norm_pix: bool = True

  @property
  def architecture(self) -> variants.EncoderConfig:
    return variants.EncoderConfig.of(self.encoder)

  @property
  def config(self) -> dict[str, Any]:
    """The architecture as JSON: what an export's ``encoder_config.json`` holds."""
    return self.architecture.to_json()

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
    return self.model_params is not None and "decoder" in self.model_params

  def describe(self) -> dict[str, Any]:
    """JSON-ready description (for metrics.json)."""
    e = self.encoder
    return {"source": self.path, "kind": self.kind, "step": self.step,
            "image_size": e.image_size, "patch_size": e.patch_size, "width": e.width,
            "depth": e.depth, "num_heads": e.num_heads, "channels": self.channels,
            "has_decoder": self.has_decoder}

  @functools.cached_property
  def fingerprint(self) -> str:
    """SHA-256 of the parameters' names, shapes, dtypes and values: it identifies the weights
    whatever their source (an export overwritten in place, a checkpoint step rewritten)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(self.params)[0]:
      if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_data(0)  # replicated: each process holds a whole copy
      value = np.ascontiguousarray(leaf)
      digest.update(f"{jax.tree_util.keystr(path)} {value.dtype} {value.shape};".encode())
      digest.update(value.tobytes())
    return digest.hexdigest()


def encoder_of(model: vit.LUTModel) -> vit.Encoder:
  """A standalone Encoder with ``model``'s encoder architecture (its parameters are
  ``params["encoder"]``), in float32 and without remat: evaluation and analysis want exact
  numbers and have no backward pass to save memory for."""
  return vit.Encoder(**variants.EncoderConfig.of(model).kwargs())


def run_model(config: ml_collections.ConfigDict) -> vit.LUTModel:
  """The model of a pre-training config, as the run built it (in its dtype: ``build_model``
  refuses some attention choices in float32)."""
  return vit.build_model(config.model, image_size=int(config.input.image_size),
                         channels=int(config.input.channels),
                         use_bc=config_lib.uses_bc(config), dtype=config.dtype)


def load(path: str, step: Optional[int] = None, *, which: str = "params",
         encoder_only: bool = False, label: Optional[str] = None, key: Optional[str] = None,
         num_heads: Optional[int] = None, decoder_num_heads: int = 16,
         image_size: Optional[int] = None) -> Pretrained:
  """The pre-trained weights at ``path``, any :func:`lut_jax.weights.sources.locate` path.

  Args:
    step: a work directory's checkpoint step (None or negative: the one ``path`` names,
      else the latest). Every other source holds one set of weights.
    which: a work directory's ``"params"`` (the online network, which evaluation starts
      from, as the reference does) or ``"target_params"`` (the EMA teacher).
    encoder_only: from a run only ``<which>/encoder`` is read, from a reference checkpoint
      not the decoder.
    label: display name (default: the directory or file name).
    key: the entry of a checkpoint file that holds the weights (``"model_ema"``: the
      reference's teacher).
    num_heads, decoder_num_heads, image_size: of a checkpoint file, where its tensor shapes
      do not say (default: the standard ViT size of its width; 16; read from pos_embed).

  A UserError (or FileNotFoundError) when ``path`` holds nothing it reads, an architecture
  the encoder cannot represent or non-finite weights, or ``step`` / ``which`` ask too much.
  """
  kind, location, path_step = sources.locate(path)
  if step is not None and step >= 0:
    # Silently reading other weights than the step asked for would evaluate the wrong model.
    if kind != "workdir":
      raise errors.ConfigError(
          f"step {step} was asked for, but {location} holds one set of weights (a "
          f"{sources.KINDS[kind]}), not a run's checkpoints",
          hint="drop the step (pretrained_step=-1 / --step=-1), or pass the pre-training "
               "work directory")
    if path_step is not None and step != path_step:
      raise errors.ConfigError(f"step {step} was asked for, but {location} names checkpoint "
                               f"{path_step}", hint="pass the work directory, or drop the step")
  else:
    step = path_step
  if which != "params" and kind != "workdir":
    # Only a run keeps the EMA teacher: analysing the online weights under its name would
    # report the wrong network.
    raise errors.ConfigError(f"{location}: which={which!r} reads a pre-training work "
                             f"directory's teacher; a {kind} source holds one network",
                             hint="pass the work directory, or which='params'")
  name = sources.HF_HUB_PREFIX + location if kind == "hf-hub" else location
  source = f"{sources.KINDS[kind]} {name}"
  if kind == "workdir":
    loaded = _load_run(location, step, which, encoder_only)
    step = loaded["step"]
    source += f", step {step} ({'online encoder' if which == 'params' else 'EMA teacher'})"
  elif kind == "encoder":
    architecture, params = sources.read_export(location)
    loaded = {"encoder": vit.Encoder(**architecture.kwargs()), "params": params}
  elif kind in ("torch", "safetensors"):
    checkpoint = (sources.read_safetensors(location) if kind == "safetensors"
                  else sources.read_torch_checkpoint(location))
    state_dict = _state_dict_of(location, checkpoint, key)
    args = checkpoint.get("args")
    loaded = _from_state_dict(
        location, state_dict, key=key, num_heads=num_heads,
        decoder_num_heads=decoder_num_heads, image_size=image_size, encoder_only=encoder_only,
        norm_pix=bool(getattr(args, "norm_pix_loss", True)),
        mask_ratio=float(getattr(args, "mask_ratio", 0.75)))
  else:  # a timm folder, or the one a Hub repository holds
    folder = sources.download_hf_hub(location) if kind == "hf-hub" else location
    args = sources.timm_encoder_args(folder, name)
    weights = os.fspath(epath.Path(folder) / sources.TIMM_WEIGHTS_FILE)
    state_dict = _state_dict_of(weights, sources.read_safetensors(weights), None)
    if "pos_embed" not in state_dict:  # e.g. a rotary-embedding ViT
      raise errors.DataError(f"{name}: no pos_embed: not a ViT with a fixed position embedding")
    loaded = _from_state_dict(f"{name}/{sources.TIMM_WEIGHTS_FILE}", state_dict,
                              encoder_only=True, **args)
  if kind != "workdir":  # restore_subtrees checked the run's step (naming the intact ones)
    checkpointing.check_finite(loaded.get("model_params", loaded["params"]), source)
  if label is None:
    base = location.split("@")[0] if kind == "hf-hub" else location.rstrip("/")
    label = os.path.basename(os.path.splitext(base)[0] if kind in ("torch", "safetensors")
                             else base)
  channels = int(loaded["params"]["patch_embed"]["proj"]["kernel"].shape[2])
  return Pretrained(**loaded, channels=channels, source=source, path=name, kind=kind,
                    label=label)


def _load_run(workdir: str, step: Optional[int], which: str,
              encoder_only: bool) -> dict[str, Any]:
  """:class:`Pretrained` fields of the ``which`` network of a pre-training run at ``step``
  (None: the latest)."""
  config = sources.load_run_config(workdir, step)
  model = run_model(config)
  tree = f"{which}/encoder" if encoder_only else which
  subtrees, step = checkpointing.restore_subtrees(
      epath.Path(workdir) / checkpointing.CHECKPOINT_DIR, [tree], step)
  params = subtrees[tree]
  out = dict(encoder=encoder_of(model), step=step, mask_ratio=float(config.loss.mask_ratio),
             norm_pix=bool(config.loss.norm_pix))
  if encoder_only:
    return dict(out, params=params)
  return dict(out, params=params["encoder"], model_params=params,
              model=model.clone(dtype=jnp.float32, remat=False, attention_impl=None))


# ----------------------------------------------------------------------------- state dicts
def _state_dict_of(path: str, checkpoint: Any, key: Optional[str]) -> dict[str, Any]:
  """The ``{name: tensor}`` mapping inside what ``torch.load`` returned, or a DataError
  saying what the file holds instead."""
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
  """A DataError unless ``state_dict[name]`` (when present) is our fixed sin-cos table. Our
  encoder has no position-embedding parameter, so a learned one (a standard timm or a
  fine-tuned ViT) would be dropped and the analyses would describe a different model."""
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
  return tuple(np.shape(convert._to_numpy(state_dict[name])))  # pylint: disable=protected-access


def _from_state_dict(path: str, state_dict: dict[str, Any], *, key: Optional[str] = None,
                     num_heads: Optional[int] = None, decoder_num_heads: int = 16,
                     image_size: Optional[int] = None, encoder_only: bool = False,
                     norm_pix: bool = True, mask_ratio: float = 0.75,
                     gelu_approximate: bool = False) -> dict[str, Any]:
  """:class:`Pretrained` fields of a reference/timm-named ``state_dict`` read from ``path``
  (the name its errors give): encoder + decoder when it has ``decoder_*`` tensors and not
  ``encoder_only``, else the encoder alone. The architecture comes from the tensor shapes,
  the activation from ``gelu_approximate``. A DataError naming ``path`` when it holds no ViT
  or one our encoder cannot represent.
  """
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
  architecture = variants.EncoderConfig(image_size, patch, width, depth, num_heads, mlp_ratio,
                                        gelu_approximate)
  pretraining = dict(norm_pix=norm_pix, mask_ratio=mask_ratio)
  # The converter's own problems (missing or mis-shaped tensors) are DataErrors too; they
  # name tensors, not the file, so the file is put in front.
  if "decoder_embed.weight" in state_dict and not encoder_only:
    decoder_width = _shape(state_dict, "decoder_embed.weight")[0]
    if decoder_width % decoder_num_heads:
      raise errors.UserError(f"{path}: decoder width {decoder_width} is not divisible by "
                             f"decoder_num_heads={decoder_num_heads}")
    _check_fixed_pos_embed(path, state_dict, "decoder_pos_embed", decoder_width, grid)
    model = vit.LUTModel(
        **architecture.kwargs(), channels=channels, decoder_width=decoder_width,
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
    return dict(encoder=encoder_of(model), params=params["encoder"], model=model,
                model_params=params, **pretraining)
  encoder = vit.Encoder(**architecture.kwargs())
  # The decoder, mask token and heads are skipped by name; anything else (register tokens,
  # layer scale, a pre-norm, an fc_norm) is a tensor our encoder would silently lack.
  try:
    params = convert.encoder_params_from_torch_state_dict(
        state_dict, encoder, ignore_unexpected=False, check_pos_embed=False)
  except errors.DataError as e:
    raise errors.DataError(f"{path}: {e}", e.hint) from e
  return dict(encoder=encoder, params=params, **pretraining)


# ----------------------------------------------------------------------------- probes
def load_probe(path: str, pool: Optional[str] = None) -> dict[str, Any]:
  """A linear classifier on the encoder's features: an ``.npz`` file (see the module
  docstring) or a linear-probe work directory (latest step: ``params["head"]``, the
  ``batch_stats["bn"]`` of its affine-free BatchNorm, the pooling of its resume record, else
  ``"cls"``). ``pool`` overrides the stored pooling.
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
    record = os.path.join(path, checkpointing.CHECKPOINT_DIR, sources.RESUME_KEY_FILE)
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
      raise errors.DataError(f"{path}: not a probe .npz ({sources.first_line(e)})") from e
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


# ----------------------------------------------------------------------------- fine-tuned
class Finetuned(NamedTuple):
  """A checkpoint of a fine-tuning run, read back (see :func:`load_finetuned`)."""

  params: Any
  step: int
  top1: Optional[float]  # the eval top-1 recorded with the checkpoint, when known
  record: dict[str, Any]  # the run's resume key: its encoder (EncoderConfig JSON), input...


def load_finetuned(workdir: str, checkpoint: str = "best", *,
                   sharding: Optional[jax.sharding.Sharding] = None) -> Finetuned:
  """The parameters of a fine-tuning work directory at ``checkpoint``: ``"best"`` (the kept
  step with the highest eval top-1), ``"latest"`` or a step number; ``sharding``: of the
  parameters (default replicated). A WorkdirError for another directory or step.
  """
  checkpoint_dir = checkpointing.absolute(workdir) / checkpointing.CHECKPOINT_DIR
  record_path = checkpoint_dir / sources.RESUME_KEY_FILE
  hint = "pass the --workdir of a configs/finetune.py run"
  try:
    record = json.loads(record_path.read_text())
  except FileNotFoundError:
    raise errors.WorkdirError(f"{workdir} is not a fine-tuning work directory: it has no "
                              f"{checkpointing.CHECKPOINT_DIR}/{sources.RESUME_KEY_FILE}",
                              hint=hint) from None
  except (OSError, ValueError) as e:
    raise errors.WorkdirError(f"cannot read {record_path}: {e}", hint=hint) from e
  if not isinstance(record, dict) or record.get("mode") != "finetune":
    mode = record.get("mode") if isinstance(record, dict) else None
    raise errors.WorkdirError(f"{workdir} holds a {mode} run, not a fine-tuning run",
                              hint=hint)
  ckpt = checkpointing.Checkpointer(os.fspath(checkpoint_dir), best_metric="top1",
                                    async_save=False)
  try:
    top1 = None
    if checkpoint == "best":
      best = ckpt.best()
      step, top1 = (best[0], best[1].get("top1")) if best else (ckpt.latest_step(), None)
    elif checkpoint == "latest":
      step = ckpt.latest_step()
    else:
      step = int(checkpoint)
  finally:
    ckpt.close()
  if step is None:
    raise errors.WorkdirError(f"no finished checkpoint in {checkpoint_dir}", hint=hint)
  subtrees, step = checkpointing.restore_subtrees(os.fspath(checkpoint_dir), ["params"], step,
                                                  sharding=sharding)
  return Finetuned(subtrees["params"], int(step), None if top1 is None else float(top1),
                   record["key"])
