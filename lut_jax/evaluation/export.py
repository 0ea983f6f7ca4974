r"""Exports the online encoder of a pre-training run for downstream use.

  python -m lut_jax.evaluation.export --workdir=runs/fashion_mnist \
      [--step=600] [--out=runs/fashion_mnist/encoder] [--timm=auto|pth|npz|none]

Writes, into ``--out`` (default ``<workdir>/encoder``):

* ``params/`` + ``encoder_config.json``: the *online* encoder (``params["encoder"]`` of the
  pre-training state, not the EMA teacher) via :func:`lut_jax.checkpointing.export_encoder`;
  reload with ``checkpointing.load_encoder`` or pass the directory as
  ``--config.pretrained`` to ``lut_jax.eval_main``;
* ``timm_vit.pth`` (torch available) or ``timm_vit.npz``: a state dict that loads with
  ``strict=True`` into timm's ``VisionTransformer`` (the kwargs are in
  ``timm_kwargs.json``) and computes the same ``forward_features``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Optional

from absl import app, flags
import jax
import numpy as np

from lut_jax import checkpointing, convert
from lut_jax.evaluation import features

TIMM_FORMATS = ("auto", "pth", "npz", "none")


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
    raise ValueError(f"unknown timm format {timm_format!r}; expected one of {TIMM_FORMATS}")
  pretrained = features.load_pretrained(path, step)
  out_dir = os.path.abspath(out_dir or os.path.join(path, "encoder"))
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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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


if __name__ == "__main__":
  _define_flags()
  app.run(main)
