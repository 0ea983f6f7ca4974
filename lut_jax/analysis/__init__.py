"""Analysis tools for pre-trained encoders: the paper's attention, spectrum and map studies.

* :mod:`.attention_distance`: mean attention distance per layer and head;
* :mod:`.spectrum`: singular-value spectrum and effective rank of the patch tokens;
* :mod:`.maps`: attention maps of chosen query patches, Grad-CAM of a classifier;
* :mod:`.loading`: models from a pre-training workdir, an exported encoder or a PyTorch
  checkpoint; :mod:`.images`: evaluation images; :mod:`.plots`: matplotlib figures.

The command-line front end is :mod:`lut_jax.cli.analyze`. Nothing here imports TensorFlow.
"""
