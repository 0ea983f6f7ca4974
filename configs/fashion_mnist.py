r"""The embedded default: LUT on Fashion-MNIST with a tiny ViT, sized for a laptop CPU.

  python -m lut_jax.cli.pretrain --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist
  python -m lut_jax.cli.pretrain --config=configs/fashion_mnist.py:method=mae --workdir=runs/fmnist_mae

Fashion-MNIST is 28x28 grey; images are replicated to 3 channels (``input.channels``) so
the colour recipe of view 2 applies unchanged. Patch 4 gives 7x7 = 49 patches, 12 visible
per view at mask ratio 0.75.
"""

import ml_collections

from lut_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, variant="nano/4", method="lut")
  config = config_lib.base_config(method=args.method)

  # The whole split fits in device memory: views are made on the device, no TensorFlow.
  config.input.backend = "device"
  config.input.dataset = "fashion_mnist"
  config.input.image_size = 28
  config.input.channels = 3
  config.input.batch_size = 128

  config.model.variant = args.variant
  config.model.decoder_width = 64
  config.model.decoder_depth = 2
  config.model.decoder_num_heads = 4
  config.model.head_hidden_dim = 512

  # Counted in steps (the base recipe counts in epochs): --config.total_steps=N overrides
  # alone; to count in epochs instead, also pass --config.total_steps=None.
  config.total_steps, config.total_epochs = 600, None
  config.optim.warmup_steps, config.optim.warmup_epochs = 60, None
  config.optim.base_lr = 1.5e-4 * 10  # small data, short schedule: a larger base lr
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.image_summary_every_steps = 200
  config.monitor.every_steps = 200
  config.monitor.bank_split = "train[:5000]"  # a small bank: seconds per check on a CPU
  config.monitor.query_split = "test[:1000]"
  return config.lock()
