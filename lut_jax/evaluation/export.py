r"""Exports the online encoder of a pre-training run for downstream use.

  lut-export --workdir=runs/fashion_mnist \
      [--step=600] [--out=runs/fashion_mnist/encoder] [--timm=auto|pth|npz|none]

(or ``python -m lut_jax.evaluation.export``).

Writes, into ``--out`` (default ``<workdir>/encoder``):

* ``params/`` + ``encoder_config.json``: the *online* encoder (``params["encoder"]`` of the
  pre-training state, not the EMA teacher) via :func:`lut_jax.checkpointing.export_encoder`;
  reload with ``checkpointing.load_encoder`` or pass the directory as
  ``--config.pretrained`` to ``lut_jax.eval_main``;
* ``timm_vit.pth`` (torch available) or ``timm_vit.npz``: a state dict that loads with
  ``strict=True`` into timm's ``VisionTransformer`` (the kwargs are in
  ``timm_kwargs.json``) and computes the same ``forward_features``.

Bad input (a missing or foreign work directory, an output path that is a file or cannot be
written) ends as one line, ``lut-export: error: ...``, with exit status 2; ``--debug``
shows its traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Optional

from absl import flags
import jax
import numpy as np

from lut_jax import checkpointing, config_lib, convert, errors
from lut_jax.evaluation import features

TIMM_FORMATS = ("auto", "pth", "npz", "none")
PROG = "lut-export"


def timm_kwargs(encoder_config: dict[str, Any], channels: int = 3) -> dict[str, Any]:
  """``timm.models.vision_transformer.VisionTransformer`` kwargs of our encoder (besides
  ``norm_layer=partial(nn.LayerNorm, eps=1e-6)``, which JSON cannot hold)."""
  return {"img_size": encoder_config["image_size"], "patch_size": encoder_config["patch_size"],
          "in_chans": channels, "embed_dim": encoder_config["width"],
          "depth": encoder_config["depth"], "num_heads": encoder_config["num_heads"],
          "mlp_ratio": encoder_config.get("mlp_ratio", 4.0), "qkv_bias": True,
          "class_token": True, "num_classes": 0, "global_pool": ""}


def export(path: str, out_dir: Optional[str] = None, *, step: Optional[int] = None,
           timm_format: str = "auto") -> dict[str, str]:
  """Exports the online encoder of ``path`` (a pre-training workdir, or an exported encoder
  to re-export / convert) to ``out_dir``. Returns ``{"encoder": dir, "timm": file}``."""
  if timm_format not in TIMM_FORMATS:
    raise errors.ConfigError(f"unknown timm format {timm_format!r}; expected one of "
                             f"{TIMM_FORMATS}")
  out_dir = os.path.abspath(out_dir or os.path.join(check_source(path), "encoder"))
  # Before the checkpoint is read: restoring it is the slow part.
  check_output_dir(out_dir)
  pretrained = features.load_pretrained(path, step)
  params = jax.device_get(pretrained.params)
  checkpointing.export_encoder(out_dir, params, pretrained.config)
  written = {"encoder": out_dir}
  if timm_format == "auto":
    timm_format = "pth" if importlib.util.find_spec("torch") is not None else "npz"
  if timm_format != "none" and jax.process_index() == 0:
    state_dict = convert.encoder_to_timm_state_dict(params,
                                                    image_size=pretrained.config["image_size"])
    if timm_format == "pth":
      import torch  # pylint: disable=g-import-not-at-top (optional dependency)
      target = os.path.join(out_dir, "timm_vit.pth")
      torch.save(convert.torch_tensors(state_dict), target)
    else:
      target = os.path.join(out_dir, "timm_vit.npz")
      np.savez(target, **state_dict)
    with open(os.path.join(out_dir, "timm_kwargs.json"), "w") as f:
      json.dump(timm_kwargs(pretrained.config, pretrained.channels), f, indent=2,
                sort_keys=True)
    written["timm"] = target
  return written


def check_source(path: str) -> str:
  """The directory of the run or exported encoder ``path`` names (see
  :func:`lut_jax.checkpointing.locate_pretrained`); a user error unless it is one, with a
  ``config.json`` that names the model for a run."""
  kind, location, _ = checkpointing.locate_pretrained(path)
  if kind == "encoder":
    return location
  # The encoder is rebuilt from these entries (features.encoder_config); a config.json
  # without them is another program's file, not a corrupt run.
  config_file = os.path.join(location, config_lib.CONFIG_FILE)
  if not os.path.isfile(config_file):
    raise errors.WorkdirError(f"{location}: no {config_lib.CONFIG_FILE}: not the work "
                              "directory of a lut_jax run")
  try:
    with open(config_file) as f:
      config = json.load(f)
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

  Creates nothing: a failed export must not leave an empty directory behind.
  """
  if os.path.exists(out_dir):
    if not os.path.isdir(out_dir):
      raise errors.UserError(f"{out_dir}: not a directory (a file is in the way)")
    existing = out_dir
  else:
    existing = os.path.dirname(out_dir)
    while existing and not os.path.exists(existing):
      existing = os.path.dirname(existing)
    existing = existing or os.curdir
    if not os.path.isdir(existing):
      raise errors.UserError(f"cannot create {out_dir}: {existing} is not a directory (a "
                             "file is in the way)")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise errors.UserError(f"cannot write to {out_dir}: {existing} is not writable")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}",
                           hint="every option is a --flag=value; see --help")
  flag_values = flags.FLAGS
  step = flag_values.step if flag_values.step >= 0 else None
  written = export(flag_values.workdir, flag_values.out, step=step,
                   timm_format=flag_values.timm)
  for kind, where in written.items():
    print(f"{kind}: {where}")


def _define_flags() -> None:
  # Defined only when run as a program: importing this module (tests, eval_main, which has
  # its own --workdir) must not register flags.
  flags.DEFINE_string("workdir", None, "Pre-training work directory (or exported encoder).")
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the latest.")
  flags.DEFINE_string("out", None, "Output directory (default: <workdir>/encoder).")
  flags.DEFINE_enum("timm", "auto", TIMM_FORMATS,
                    "timm state dict format: pth (torch), npz, auto (pth if torch is "
                    "installed) or none.")
  flags.mark_flags_as_required(["workdir"])


def run() -> None:
  """Console-script entry point (``lut-export``)."""
  _define_flags()
  errors.run_app(main, prog=PROG)


if __name__ == "__main__":
  run()
