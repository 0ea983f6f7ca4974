r"""End-to-end fine-tuning, MAE's recipe (global-average-pool head, layer-wise lr decay).

  python -m lut_jax.cli.evaluate --config=configs/finetune.py --workdir=runs/fmnist_ft \
      --config.pretrained=runs/fashion_mnist
  python -m lut_jax.cli.evaluate --config=configs/finetune.py:dataset=imagenet \
      --workdir=DIR --config.pretrained=DIR_OF_PRETRAINING
  python -m lut_jax.cli.evaluate --config=configs/finetune.py:dataset=cub \
      --workdir=DIR --config.pretrained=DIR_OF_PRETRAINING --config.input.data_dir=TFDS_DIR

ImageNet (ViT-B/16, the documented recipe): 100 epochs, batch 1024, AdamW (0.9, 0.999),
weight decay 0.05, base lr 1e-3 (peak 1e-3 x batch / 256), warmup 5 epochs, cosine to
1e-6, layer decay 0.75, drop path 0.1, mixup 0.8, cutmix 1.0, label smoothing 0.1,
RandAugment m9-mstd0.5, random erasing 0.25. Rerunning the command resumes from the
latest checkpoint; the best top-1 checkpoint is kept beside it.

Transfer (``dataset=`` inat17, inat18, cub, flowers, pets, dogs or cars: tfds datasets, see
``eval_config.PRESETS``): the ImageNet recipe at 224 px on the dataset's own train / eval
splits, with the schedule of ``_TRANSFER_SCHEDULES``. MAE fine-tunes iNaturalist with its
ImageNet recipe and sets the lr and epochs per dataset without publishing them, and the
fine-grained sets are not in MAE, so those schedules are our choice. Any other tfds
image-classification dataset (``dataset=tfds:NAME``, splits train / test) or image folder
(``dataset=folder:PATH``, PATH/train and PATH/val) gets the fine-grained schedule at the
encoder's image size; ``--config.input.*_split`` and ``--config.finetune.*`` override.

Fashion-MNIST: the same recipe over a short CPU-sized schedule on the pre-training image
size (28 px), with a milder crop scale (28-px images have little to spare).
"""

import ml_collections

from lut_jax import config_lib
from lut_jax.evaluation import eval_config

# (epochs, batch size, base lr) of the transfer presets: our choice (see the docstring).
# iNaturalist (0.4-0.6 M training images) keeps ImageNet's schedule; the fine-grained sets
# (2-12 k images) take a quarter of the batch, so that an epoch is still a few dozen steps.
_LARGE = (100.0, 1024, 1e-3)
_FINE_GRAINED = (100.0, 256, 1e-3)
_TRANSFER_SCHEDULES = {
    "inat17": _LARGE,
    "inat18": _LARGE,
    "cub": _FINE_GRAINED,
    "flowers": _FINE_GRAINED,
    "pets": _FINE_GRAINED,
    "dogs": _FINE_GRAINED,
    "cars": _FINE_GRAINED,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, dataset="fashion_mnist")
  config = eval_config.base_config("finetune", args.dataset)
  config.log_every_steps = 50

  ft = config.finetune = ml_collections.ConfigDict()
  ft.pool = "mean"  # "mean": MAE's global pool + fc_norm; "cls": cls token after the norm
  ft.batch_size = 1024
  ft.epochs = 100.0
  ft.warmup_epochs = 5.0
  ft.eval_every_epochs = 1.0
  ft.base_lr = 1e-3  # peak lr = base_lr * batch_size / 256
  ft.min_lr = 1e-6
  ft.layer_decay = 0.75
  ft.weight_decay = 0.05
  ft.b1 = 0.9
  ft.b2 = 0.999
  ft.grad_clip_norm = 0.0  # 0 disables clipping
  ft.drop_path = 0.1
  # The position table is trained from the sin-cos one (layer 0's lr, no weight decay), as
  # the reference's timm ViT does; False keeps it fixed as in pre-training.
  ft.learn_pos_embed = True
  ft.mixup_alpha = 0.8
  ft.cutmix_alpha = 1.0
  ft.mixup_prob = 1.0
  ft.mixup_switch_prob = 0.5
  ft.label_smoothing = 0.1
  ft.remat = False

  aug = config.augment = ml_collections.ConfigDict()
  aug.crop_scale_min = 0.08  # RandomResizedCrop scale (min, 1)
  aug.hflip = 0.5
  aug.randaug_num_ops = 2  # 0 disables RandAugment
  aug.randaug_magnitude = 9.0
  aug.randaug_magnitude_std = 0.5
  aug.randaug_prob = 0.5
  aug.reprob = 0.25  # random erasing probability

  if args.dataset == "imagenet":
    config.dtype = "bfloat16"
    config.input.image_size = 224
    config.input.eval_batch_size = 1024
    config.log_every_steps = 100
  elif args.dataset in _TRANSFER_SCHEDULES:
    config.dtype = "bfloat16"
    config.input.image_size = 224
    ft.epochs, ft.batch_size, ft.base_lr = _TRANSFER_SCHEDULES[args.dataset]
    if ft.batch_size >= 1024:
      config.input.eval_batch_size = 1024
      config.log_every_steps = 100
  elif args.dataset == "fashion_mnist":
    ft.batch_size = 256
    ft.epochs = 5.0
    ft.warmup_epochs = 1.0
    aug.crop_scale_min = 0.35
  else:  # tfds:NAME or folder:PATH, at the encoder's image size
    ft.epochs, ft.batch_size, ft.base_lr = _FINE_GRAINED
  return config.lock()
