r"""LUT / MAE pre-training on ImageNet-1K, the documented recipe.

  python -m lut_jax.cli.pretrain --config=configs/pretrain.py:variant=B/16 --workdir=DIR
  python -m lut_jax.cli.pretrain --config=configs/pretrain.py:variant=L/16,method=mae --workdir=DIR

Arguments after the colon: ``variant`` (S/16, B/16, L/16, H/14, ...), ``method``
(``lut`` or ``mae``; ``mae`` is the baseline: no second view, no teacher, ``w_bc = 0``).
The learning rate follows the linear rule ``base_lr * batch / 256`` (the reference code's
``sqrt`` rule equals it only at batch 4096).
"""

import ml_collections

from lut_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, variant="B/16", method="lut")
  config = config_lib.base_config(method=args.method)

  # Data set, batch, run length and learning rate: base_config's (the documented recipe).

  # At 224 px host CPU limits the step rate: the colour ops of view 2 go to the accelerator
  # (host cores per GPU with and without: docs/benchmarks.md).
  config.input.device_augment = True

  config.model.variant = args.variant
  # The heads' batch-norm statistics over 1024 examples at a time, as the reference's command
  # (4 micro-batches of 8 x 128 per step of 4096) computes them.
  config.model.head_bn_group_size = 1024
  config.dtype = "bfloat16"
  # ViT-L/H: shard parameters and optimizer state over the data devices (FSDP).
  config.mesh.fsdp = 1 if args.variant.split("/")[0] in ("Ti", "S", "M", "B") else -1
  config.model.remat = args.variant.split("/")[0] in ("L", "H")
  return config.lock()
