"""Downstream evaluation of a pre-trained LUT / MAE encoder: kNN, linear probe, fine-tuning,
robustness and segmentation, each a protocol registered by name in
:mod:`~lut_jax.evaluation.protocols` (``validate(config)``, ``run(config, workdir)``) that
``lut-eval`` dispatches through; the probe, fine-tuning and segmentation share one loop
(:mod:`~lut_jax.runtime.loop`, :mod:`~lut_jax.evaluation.supervised`). The numerical parts
import neither TensorFlow nor torch; each protocol's ``run`` imports tf.data lazily.
"""
