r"""kNN evaluation (DINO protocol: k = 20, T = 0.07, cosine on L2-normalised features).

  python -m lut_jax.cli.evaluate --config=configs/knn.py --workdir=runs/fmnist_knn \
      --config.pretrained=runs/fashion_mnist
  python -m lut_jax.cli.evaluate --config=configs/knn.py:dataset=imagenet --workdir=DIR \
      --config.pretrained=gs://bucket/run --config.input.data_dir=...

``pretrained`` is a pre-training work directory (its latest checkpoint's *online* encoder)
or an exported encoder directory (``python -m lut_jax.weights.export``). Both feature
kinds are evaluated: ``cls`` (the cls token after the final norm) and ``mean`` (mean of the
patch tokens).

Without TensorFlow on Fashion-MNIST and local image folders: ``input.backend`` (in
``lut_jax/evaluation/eval_config.py``) says which data sets are read in memory and which
through tf.data.
"""

import ml_collections

from lut_jax import config_lib
from lut_jax.evaluation import eval_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, dataset="fashion_mnist")
  config = eval_config.base_config("knn", args.dataset)
  config.knn = ml_collections.ConfigDict()
  config.knn.k = 20
  config.knn.temperature = 0.07
  config.knn.pools = "cls,mean"  # comma-separated subset of cls, mean
  if args.dataset == "imagenet":
    config.input.eval_batch_size = 1024
  return config.lock()
