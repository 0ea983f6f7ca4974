"""The paper's analyses of pre-trained encoders: mean attention distance per layer and head
(:mod:`.attention_distance`), the patch tokens' singular-value spectrum (:mod:`.spectrum`),
attention maps and Grad-CAM (:mod:`.maps`), evaluation images (:mod:`.images`) and figures
(:mod:`.plots`). Models come from :mod:`lut_jax.weights.loading`; the command line is
:mod:`lut_jax.cli.analyze`. Nothing here imports TensorFlow.
"""
