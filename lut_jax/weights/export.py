r"""Exports the online encoder of a pre-training run for downstream use.

  lut-export --workdir=runs/fashion_mnist \
      [--step=600] [--out=runs/fashion_mnist/encoder] [--timm=safetensors|pth|npz|none] \
      [--hub_repo=org/name]

(or ``python -m lut_jax.weights.export``).

Writes, into ``--out`` (default ``<workdir>/encoder``):

* ``params/`` + ``encoder_config.json``: the *online* encoder (``params["encoder"]`` of the
  pre-training state, not the EMA teacher) via :func:`lut_jax.weights.sources.write_export`;
  reload with :func:`lut_jax.weights.loading.load` or pass the directory as
  ``--config.pretrained`` to ``lut_jax.cli.evaluate``;
* by default (``--timm=safetensors``), ``model.safetensors`` + ``config.json``: the same
  encoder as a timm ``VisionTransformer`` (float32, timm's parameter names), in the layout
  timm and the Hugging Face Hub read, written without torch:
  ``timm.create_model("local-dir:" + out, pretrained=True)`` builds it and loads the
  weights strictly, and its ``forward_features`` are our encoder's tokens (its
  ``forward``, with ``global_pool="token"``, the ``cls`` feature). Upload the folder to
  the Hub (``--hub_repo=org/name`` does it, with ``huggingface_hub`` installed and a
  token from ``huggingface-cli login`` or ``HF_TOKEN``) and ``hf-hub:org/name`` does the
  same;
* or, with ``--timm=pth`` (torch needed) / ``--timm=npz``, the state dict alone as
  ``timm_vit.pth`` / ``timm_vit.npz``, with the ``VisionTransformer`` kwargs in
  ``timm_kwargs.json``.

``--workdir`` may also name weights made elsewhere (a PyTorch or safetensors checkpoint, a
timm folder, ``hf-hub:org/name``: see :func:`lut_jax.weights.loading.load`),
which are converted; ``--out`` is then required.

Bad input (a missing or foreign work directory, an output path that is a file or cannot be
written) ends as one line, ``lut-export: error: ...``, with exit status 2; ``--debug``
shows its traceback.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from absl import flags
from etils import epath
import jax
import numpy as np

from lut_jax import config_lib, errors
from lut_jax.data import image_utils
from lut_jax.models import variants
from lut_jax.runtime import checkpointing
from lut_jax.weights import convert, loading, sources

TIMM_FORMATS = ("safetensors", "pth", "npz", "none")
PROG = "lut-export"

# (width, depth, heads) -> timm's name of that ViT size, and the vit_<size>_patch<p>_<px>
# architectures timm registers: config.json names one of them (model_args carry the actual
# geometry either way, so any registered ViT name builds the same model).
_TIMM_SIZE_NAMES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base",
                    (1024, 24, 16): "large", (1280, 32, 16): "huge"}
_TIMM_ARCHITECTURES = frozenset({
    "vit_tiny_patch16_224", "vit_tiny_patch16_384", "vit_small_patch8_224",
    "vit_small_patch16_224", "vit_small_patch16_384", "vit_small_patch32_224",
    "vit_small_patch32_384", "vit_base_patch8_224", "vit_base_patch16_224",
    "vit_base_patch16_384", "vit_base_patch32_224", "vit_base_patch32_384",
    "vit_large_patch14_224", "vit_large_patch16_224", "vit_large_patch16_384",
    "vit_large_patch32_224", "vit_large_patch32_384", "vit_huge_patch14_224"})
# Non-standard sizes (the test and CPU models) are built by this one's VisionTransformer.
_TIMM_GENERIC_ARCHITECTURE = "vit_base_patch16_224"


def timm_kwargs(encoder: variants.EncoderConfig, channels: int = 3) -> dict[str, Any]:
  """``timm.models.vision_transformer.VisionTransformer`` kwargs of our encoder (timm's
  default norm layer is already ``LayerNorm(eps=1e-6)``, ours). ``global_pool="token"``:
  the model's output is the cls token after the final norm, our ``cls`` feature."""
  kwargs = {"img_size": encoder.image_size, "patch_size": encoder.patch_size,
            "in_chans": channels, "embed_dim": encoder.width, "depth": encoder.depth,
            "num_heads": encoder.num_heads, "mlp_ratio": encoder.mlp_ratio, "qkv_bias": True,
            "class_token": True, "num_classes": 0, "global_pool": "token"}
  if encoder.gelu_approximate:  # trained with tanh GELU: timm's GELUTanh
    kwargs["act_layer"] = "gelu_tanh"
  return kwargs


def timm_architecture(encoder: variants.EncoderConfig) -> str:
  """The registered timm ViT of our encoder's size, patch and image size, else a generic
  one (see ``_TIMM_GENERIC_ARCHITECTURE``)."""
  size = _TIMM_SIZE_NAMES.get((encoder.width, encoder.depth, encoder.num_heads))
  name = f"vit_{size}_patch{encoder.patch_size}_{encoder.image_size}"
  return name if name in _TIMM_ARCHITECTURES else _TIMM_GENERIC_ARCHITECTURE


def timm_config(encoder: variants.EncoderConfig, channels: int = 3) -> dict[str, Any]:
  """The ``config.json`` timm's ``local-dir:`` / ``hf-hub:`` loaders read
  (``timm.models._hub.load_model_config_from_path``): the architecture, the kwargs that
  rebuild our encoder (``model_args``) and the preprocessing it expects
  (``pretrained_cfg``: ImageNet normalisation, the evaluation centre crop)."""
  size = encoder.image_size
  mean, std = image_utils.normalization_constants(channels)
  return {
      "architecture": timm_architecture(encoder),
      "num_classes": 0,
      "num_features": encoder.width,
      "global_pool": "token",
      "model_args": timm_kwargs(encoder, channels),
      "pretrained_cfg": {
          "input_size": [channels, size, size],
          "fixed_input_size": True,
          "interpolation": "bicubic",
          # The evaluation's default centre crop.
          "crop_pct": image_utils.eval_crop_pct(size),
          "crop_mode": "center",
          "mean": [round(float(v), 6) for v in mean],
          "std": [round(float(v), 6) for v in std],
          "num_classes": 0,
          "first_conv": "patch_embed.proj",
          "classifier": "head",
      },
  }


def write_timm_folder(out_dir: str, encoder_params: Any, encoder: variants.EncoderConfig,
                      channels: int = 3) -> str:
  """Writes ``model.safetensors`` (float32, timm names, via ``safetensors.numpy``: no
  torch) and ``config.json`` (:func:`timm_config`) into ``out_dir``; returns the weights'
  path."""
  try:
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UserError("writing model.safetensors needs the safetensors package",
                           hint="pip install safetensors, or pass --timm=npz") from e
  state_dict = convert.encoder_to_timm_state_dict(encoder_params,
                                                  image_size=encoder.image_size)
  state_dict = {name: np.ascontiguousarray(value, np.float32)
                for name, value in state_dict.items()}
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  target = out / sources.TIMM_WEIGHTS_FILE
  # "format": "pt" is the metadata the Hub's loaders expect of a torch state dict.
  target.write_bytes(safetensors_numpy.save(state_dict, metadata={"format": "pt"}))
  (out / sources.TIMM_CONFIG_FILE).write_text(
      json.dumps(timm_config(encoder, channels), indent=2) + "\n")
  return os.fspath(target)


def export(path: str, out_dir: Optional[str] = None, *, step: Optional[int] = None,
           timm_format: str = "safetensors") -> dict[str, str]:
  """Exports the online encoder of ``path`` (a pre-training workdir, an exported encoder to
  re-export, or weights to convert: see :func:`check_source`) to ``out_dir``. Returns
  ``{"encoder": dir, "timm": file}`` (no ``"timm"`` with ``timm_format="none"``)."""
  if timm_format not in TIMM_FORMATS:
    raise errors.ConfigError(f"unknown timm format {timm_format!r}; expected one of "
                             f"{TIMM_FORMATS}")
  source = check_source(path)
  if out_dir is None and source is None:
    raise errors.UserError(f"{path}: weights to convert have no default output directory",
                           hint="pass --out=DIR")
  out = checkpointing.absolute(out_dir) if out_dir else epath.Path(source) / "encoder"
  out_dir = os.fspath(out)
  # Before the checkpoint is read: restoring it is the slow part.
  check_output_dir(out_dir)
  pretrained = loading.load(path, step, encoder_only=True)
  params, encoder = jax.device_get(pretrained.params), pretrained.architecture
  sources.write_export(out_dir, params, encoder)
  written = {"encoder": out_dir}
  if timm_format != "none" and jax.process_index() == 0:
    if timm_format == "safetensors":
      target = write_timm_folder(out_dir, params, encoder, pretrained.channels)
    else:
      state_dict = convert.encoder_to_timm_state_dict(params, image_size=encoder.image_size)
      target = out / f"timm_vit.{timm_format}"
      with target.open("wb") as f:
        if timm_format == "pth":
          import torch  # pylint: disable=g-import-not-at-top (optional dependency)
          torch.save(convert.torch_tensors(state_dict), f)
        else:
          np.savez(f, **state_dict)
      (out / "timm_kwargs.json").write_text(json.dumps(
          timm_kwargs(encoder, pretrained.channels), indent=2, sort_keys=True))
      target = os.fspath(target)
    written["timm"] = target
  return written


def push_to_hub(folder: str, repo_id: str, *, private: bool = True) -> str:
  """Uploads the timm folder ``folder`` (``model.safetensors`` + ``config.json``) to the
  Hugging Face Hub repository ``repo_id`` (created if needed, private by default); returns
  its ``hf-hub:`` name, which ``timm.create_model`` and ``--config.pretrained`` read."""
  errors.require("huggingface_hub", purpose="--hub_repo (uploading to the Hugging Face Hub)",
                 extra="torch")
  import huggingface_hub  # pylint: disable=g-import-not-at-top (optional dependency)

  names = (sources.TIMM_WEIGHTS_FILE, sources.TIMM_CONFIG_FILE)
  if not all((epath.Path(folder) / name).is_file() for name in names):
    raise errors.UserError(f"{folder}: no timm folder ({' + '.join(names)}) to upload",
                           hint="export with --timm=safetensors")
  api = huggingface_hub.HfApi()
  try:
    api.create_repo(repo_id, private=private, exist_ok=True)
    # Only the timm files: the Orbax copy beside them is for lut_jax, not for the Hub.
    api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=list(names),
                      commit_message="Upload a lut_jax encoder (timm VisionTransformer)")
  except Exception as e:  # noqa: BLE001 - the network's or the Hub's failure, else re-raised
    reason = _hub_failure(e)
    if reason is None:
      raise
    raise errors.UserError(
        f"uploading to the Hugging Face Hub ({repo_id}) failed: {reason}; the local export "
        f"is complete in {folder}",
        hint="rerun the same command once that is fixed: it exports again, then uploads"
        ) from e
  return sources.HF_HUB_PREFIX + repo_id


def _hub_failure(e: BaseException) -> Optional[str]:
  """Why the Hub client failed, in one line, when the network or the Hub is to blame: no
  connection (requests' and httpx's errors, known by name: both clients are optional), or
  the Hub's answer (``HfHubHTTPError`` and the missing token are ``OSError``, a bad repo id
  a ``ValueError``). None for anything else (a bug)."""
  names = {cls.__name__ for cls in type(e).__mro__}
  if names & {"ConnectionError", "TransportError", "Timeout", "TimeoutError"}:
    return f"the Hub is unreachable (no network?): {type(e).__name__}: {e}"
  if isinstance(e, (OSError, ValueError)):
    return f"{type(e).__name__}: {e}"
  return None


def check_source(path: str) -> Optional[str]:
  """The directory of the run or exported encoder ``path`` names (see
  :func:`lut_jax.weights.sources.locate`), None for weights to convert (a timm
  folder, a checkpoint file, ``hf-hub:``); a user error unless it is one of these, with a
  ``config.json`` that names the model for a run."""
  kind, location, _ = sources.locate(path)
  if kind == "encoder":
    return location
  if kind != "workdir":
    return None
  # The encoder is rebuilt from these entries (loading.run_model); a config.json
  # without them is another program's file, not a corrupt run.
  config_file = epath.Path(location) / config_lib.CONFIG_FILE
  if not config_file.is_file():
    raise errors.WorkdirError(f"{location}: no {config_lib.CONFIG_FILE}: not the work "
                              "directory of a lut_jax run")
  try:
    config = json.loads(config_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.WorkdirError(f"{config_file}: not valid JSON ({e})") from e
  missing = [f"{section}.{key}" for section, key in (("model", "variant"),
                                                     ("input", "image_size"))
             if not isinstance(config, dict) or not isinstance(config.get(section), dict)
             or key not in config[section]]
  if missing:
    raise errors.WorkdirError(f"{config_file}: not the config of a lut_jax pre-training run "
                              f"(no {', '.join(missing)})")
  return location


def check_output_dir(out_dir: str) -> None:
  """A UserError unless ``out_dir`` is, or can be created as, a writable directory.

  Creates nothing: a failed export must not leave an empty directory behind. On an object
  store (``gs://``...) there are no permissions to check here: a write that is refused
  fails when it is made.
  """
  path = checkpointing.absolute(out_dir)
  if path.exists():
    if not path.is_dir():
      raise errors.UserError(f"{out_dir}: not a directory (a file is in the way)")
    existing = path
  else:
    existing = path.parent
    while existing != existing.parent and not existing.exists():
      existing = existing.parent
    if existing.exists() and not existing.is_dir():
      raise errors.UserError(f"cannot create {out_dir}: {existing} is not a directory (a "
                             "file is in the way)")
  if not checkpointing.is_url(out_dir) and not os.access(existing, os.W_OK | os.X_OK):
    raise errors.UserError(f"cannot write to {out_dir}: {existing} is not writable")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}",
                           hint="every option is a --flag=value; see --help")
  flag_values = flags.FLAGS
  step = flag_values.step if flag_values.step >= 0 else None
  if flag_values.hub_repo and flag_values.timm != "safetensors":
    raise errors.ConfigError("--hub_repo uploads the timm folder: it needs "
                             f"--timm=safetensors, not {flag_values.timm!r}")
  written = export(flag_values.workdir, flag_values.out, step=step,
                   timm_format=flag_values.timm)
  for kind, where in written.items():  # before the upload, which may fail
    print(f"{kind}: {where}")
  if flag_values.hub_repo:
    print("hub: " + push_to_hub(os.path.dirname(written["timm"]), flag_values.hub_repo,
                                private=not flag_values.hub_public))


def _define_flags() -> None:
  # Defined only when run as a program: importing this module (tests, eval_main, which has
  # its own --workdir) must not register flags.
  flags.DEFINE_string("workdir", None, "Pre-training work directory (or exported encoder, or "
                      "weights to convert: .pth, .safetensors, timm folder, hf-hub:org/name).")
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the latest.")
  flags.DEFINE_string("out", None, "Output directory (default: <workdir>/encoder).")
  flags.DEFINE_enum("timm", "safetensors", TIMM_FORMATS,
                    "timm copy: safetensors (model.safetensors + config.json, the folder "
                    "timm's local-dir: and the Hugging Face Hub read), pth (torch), npz "
                    "or none.")
  flags.DEFINE_string("hub_repo", None, "Also upload the timm folder to this Hugging Face "
                      "Hub repository (org/name); needs huggingface_hub and a token.")
  flags.DEFINE_bool("hub_public", False, "Create the Hub repository public (default: "
                    "private).")
  flags.mark_flags_as_required(["workdir"])


def run() -> None:
  """Console-script entry point (``lut-export``)."""
  _define_flags()
  errors.run_app(main, prog=PROG)


if __name__ == "__main__":
  run()
