"""lut_jax: LUT (Learning with Unmasked Tokens, ECCV 2024) in JAX/Flax.

The core modules (models, masking, losses, conversion, train step, sharding, checkpoints)
import without TensorFlow; only ``lut_jax.data.input_pipeline`` and the CLU metric writers
need it.
"""

__version__ = "0.1.0"
