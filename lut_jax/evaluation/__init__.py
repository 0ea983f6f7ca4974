"""Downstream evaluation of a pre-trained LUT / MAE encoder.

* :mod:`~lut_jax.evaluation.features`: frozen features of the *online* encoder (loaded by
  :mod:`lut_jax.weights.loading`): cls token or mean of the patch tokens.
* :mod:`~lut_jax.evaluation.knn`: DINO-style weighted k-nearest-neighbour classifier.
* :mod:`~lut_jax.evaluation.linear_probe`: MAE's linear probe (BatchNorm without affine +
  linear head, LARS) trained on cached frozen features.
* :mod:`~lut_jax.evaluation.finetune`: end-to-end fine-tuning with a global-average-pool
  head, layer-wise learning-rate decay, drop path, mixup/cutmix and label smoothing.
* :mod:`~lut_jax.evaluation.robustness`: a fine-tuned classifier on ImageNet's shifted
  test sets.
* :mod:`~lut_jax.evaluation.segmentation`: BEiT's semantic-segmentation protocol.

Each of these is a protocol registered by name in :mod:`~lut_jax.evaluation.protocols`
(``validate(config)``, ``run(config, workdir)``), which ``lut-eval`` dispatches through;
linear probe, fine-tuning and segmentation share one loop (:mod:`~lut_jax.runtime.loop`,
:mod:`~lut_jax.evaluation.supervised`).

The numerical parts (features, knn, the heads, optimizers, mixup) import neither TensorFlow
nor torch; the entry points (each protocol's ``run``) import the tf.data input pipeline
lazily.
"""
