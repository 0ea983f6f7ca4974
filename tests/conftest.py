"""Test set-up: 8 fake CPU devices (for the sharded paths) and float32 matmuls.

XLA reads its flags when the backend starts, so they are set here, before any test
module imports jax.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Many tests (and their subprocesses) compile the same tiny train step: a persistent
# compilation cache shared by all of them saves most of the suite's compile time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "lut_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# torchvision (imported by timm in the parity tests) crashes the interpreter when it is
# first imported after TensorFlow with these wheels; importing it first avoids that.
try:
  import torch  # noqa: F401,E402
  import torchvision  # noqa: F401,E402
except ImportError:  # the PyTorch references are optional: those tests skip
  pass

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
