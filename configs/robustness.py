r"""Robustness of a fine-tuned ImageNet classifier: ImageNet-V2, -A, -R, -Sketch and -C.

  python -m lut_jax.cli.evaluate --config=configs/robustness.py --workdir=DIR \
      --config.finetuned=DIR_OF_IMAGENET_FINETUNING --config.input.data_dir=TFDS_DIR
  python -m lut_jax.cli.evaluate --config=configs/robustness.py --workdir=DIR \
      --config.finetuned=FT_DIR --config.sets=imagenet_a,imagenet_r \
      --config.robustness.imagenet_a.dataset=folder:/data/imagenet-a

``finetuned`` is the work directory of ``configs/finetune.py:dataset=imagenet`` (its best
top-1 checkpoint by default). Each set is read from tfds (``robustness.<set>.dataset``) or
from an image folder in its released layout (``folder:PATH``: one sub-folder per WordNet ID;
ImageNet-C: ``PATH/<corruption>/<severity>/<wnid>/``). Sets that are not prepared are
skipped and listed; results go to ``robustness_results.json`` and ``robustness_results.md``
(see ``lut_jax.evaluation.robustness``).
"""

import ml_collections

from lut_jax import config_lib
from lut_jax.evaluation import eval_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config_lib.parse_arg(arg)  # no arguments: every choice is a --config.* field
  # ImageNet's eval input: shorter side to size / 0.875, centre crop (eval_config).
  config = eval_config.base_config("robustness", "imagenet")
  config.finetuned = ""  # fine-tuning work directory (configs/finetune.py's --workdir)
  config.checkpoint = "best"  # "best" (highest eval top-1), "latest" or a step number
  config.dtype = ""  # compute dtype: "" = the fine-tuning run's, else float32 or bfloat16
  config.input.eval_batch_size = 1024
  # Comma list of imagenet_v2, imagenet_a, imagenet_r, imagenet_sketch, imagenet_c.
  config.sets = "imagenet_v2,imagenet_a,imagenet_r,imagenet_sketch,imagenet_c"
  config.skip_missing = True  # False: a set that is not prepared stops the run

  r = config.robustness = ml_collections.ConfigDict()
  for name, dataset, split in (
      ("imagenet_v2", "imagenet_v2/matched-frequency", "test"),
      ("imagenet_a", "imagenet_a", "test"),
      ("imagenet_r", "imagenet_r", "test"),
      ("imagenet_sketch", "imagenet_sketch", "test"),
      # tfds adds /<corruption>_<severity>; a folder gets /<corruption>/<severity>.
      ("imagenet_c", "imagenet2012_corrupted", "validation")):
    r[name] = ml_collections.ConfigDict()
    r[name].dataset = dataset  # tfds name or folder:PATH
    r[name].split = split
    r[name].crop_pct = -1.0  # -1: input.crop_pct
  # ImageNet-C's images are 224-px centre crops already: Hendrycks' evaluation reads them
  # as they are (a 224 centre crop of a 224 image).
  r.imagenet_c.crop_pct = 1.0
  # "benchmark" (the 15 of mCE), "all" (with the 4 extra ones) or a comma list of names.
  r.imagenet_c.corruptions = "benchmark"
  r.imagenet_c.severities = "1,2,3,4,5"
  return config.lock()
