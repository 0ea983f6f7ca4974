"""Analysis tools for pre-trained encoders: the paper's attention, spectrum and map studies.

* :mod:`.attention_distance`: mean attention distance per layer and head;
* :mod:`.spectrum`: singular-value spectrum and effective rank of the patch tokens;
* :mod:`.maps`: attention maps of chosen query patches, Grad-CAM of a classifier;
* :mod:`.images`: evaluation images; :mod:`.plots`: matplotlib figures. Models are loaded
  by :mod:`lut_jax.weights.loading` (a pre-training workdir, an export, a PyTorch checkpoint).

The command-line front end is :mod:`lut_jax.cli.analyze`. Nothing here imports TensorFlow.
"""
