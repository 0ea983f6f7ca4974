"""Small shared builders for the tests: tiny configs, models and synthetic batches."""

import os

import ml_collections
import numpy as np

from configs import fashion_mnist
from lut_jax import config_lib
from lut_jax.models import vit

IMAGE_SIZE = 16


def tiny_config(method: str = "lut", **overrides) -> ml_collections.ConfigDict:
  """The Fashion-MNIST config shrunk to a 2-block, 32-wide ViT on 16 px images."""
  config = fashion_mnist.get_config(f"variant=mu/4,method={method}")
  config.unlock()
  config.input.image_size = IMAGE_SIZE
  config.input.batch_size = 16
  config.model.decoder_width = 32
  config.model.decoder_depth = 1
  config.model.decoder_num_heads = 2
  config.model.head_hidden_dim = 64
  config.total_steps = 6
  config.optim.warmup_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 3
  config.image_summary_every_steps = 3
  # The tf.data path, without the monitor: tests of the device path and the monitor set
  # them (tests/test_device_input.py).
  config.input.backend = "tfdata"
  config.monitor.every_steps = 0
  return override(config, overrides)


def one_device_env(**extra: str) -> dict[str, str]:
  """This process's environment without the suite's 8-device ``XLA_FLAGS`` (conftest): a
  subprocess started with it sees one CPU device, as a user's laptop run. ``extra`` adds
  variables."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(extra)
  return env


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets dotted keys (``{"model.head_norm": "layer"}``) like ``--config.x=y`` does."""
  return config_lib.override(config, overrides)


def synthetic_batch(step: int, batch_size: int, image_size: int = IMAGE_SIZE,
                    channels: int = 3) -> dict[str, np.ndarray]:
  """A deterministic batch that depends only on ``step`` (so resumed runs see the same)."""
  rng = np.random.default_rng(1000 + step)
  shape = (batch_size, image_size, image_size, channels)
  return {"view1": rng.normal(size=shape).astype(np.float32),
          "view2": rng.normal(size=shape).astype(np.float32)}


def synthetic_data_fn(batch_size: int, image_size: int = IMAGE_SIZE):
  """``data_fn(start_step)`` for :func:`lut_jax.pretrain.train.pretrain`."""
  def data_fn(start_step):
    step = start_step
    while True:
      yield synthetic_batch(step, batch_size, image_size)
      step += 1
  return data_fn


def tiny_model(**overrides) -> vit.LUTModel:
  """The model of :func:`tiny_config` (``mu/4`` at 16 px, a one-block, 32-wide decoder,
  64-wide heads) with LUTModel fields overridden (the parity and conversion tests')."""
  config = tiny_config()
  model = vit.build_model(config.model, image_size=IMAGE_SIZE,
                             channels=config.input.channels, use_bc=True)
  return model.clone(**overrides)
