r"""Semantic-segmentation fine-tuning: UperNet on the pre-trained ViT (BEiT's protocol).

  python -m lut_jax.cli.evaluate --config=configs/segmentation.py --workdir=runs/fmnist_seg \
      --config.pretrained=runs/fashion_mnist
  python -m lut_jax.cli.evaluate --config=configs/segmentation.py:dataset=ade20k \
      --workdir=DIR --config.pretrained=DIR_OF_PRETRAINING \
      --config.input.folder=/data/ADEChallengeData2016

Presets (``:dataset=...``):

* ``fashion_seg`` (default): a Fashion-MNIST item on a textured background, 28-px grey
  images, 11 classes (background + the item's), generated in memory
  (lut_jax/data/segmentation_synthetic.py); 600 steps of batch 16, about three
  minutes on a 2-core CPU. Every value here is our choice, scaled down from the ADE20K
  recipe.
* ``ade20k``: the published recipe for MAE's ViT-B (mmsegmentation's
  ``configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py``, after BEiT's
  ``upernet_beit_base_12_512_slide_160k_ade20k``): ADEChallengeData2016 as a folder, 150
  classes with ``reduce_zero_label``, 512-px crops from images rescaled to fit 2048 x 512
  times a ratio in [0.5, 2], flips; batch 16, 160k iterations, AdamW (0.9, 0.999) lr 1e-4,
  weight decay 0.05, layer decay 0.65, linear warmup over 1500 iterations then poly (power
  1) to 0; drop path 0.1; features of blocks 4, 6, 8, 12, neck x4, x2, x1, x1/2; UperNet
  with 768 channels (the ViT-B width) and the auxiliary FCN head (256 channels, weight
  0.4); sliding-window evaluation with 512-px windows on images rescaled to fit 2048 x 512,
  at BEiT's stride 341 (mmsegmentation's MAE config uses 256). BEiT's own lr for its
  self-supervised ViT-B is 7e-4 (layer decay 0.65) and MAE searched the lr per model:
  sweep ``segmentation.lr`` for other encoders.
* ``scene_parse150``: the same recipe on tfds's ``scene_parse150`` (its annotations are
  the 100-category instance masks, not the 150-class benchmark:
  lut_jax/data/segmentation_data.py).
* ``folder``: the ADE20K recipe on any folder in the same layout
  (``--config.input.folder`` and ``--config.num_classes`` required).
"""

import ml_collections

from lut_jax import config_lib
from lut_jax.evaluation import eval_config

PRESETS = ("fashion_seg", "ade20k", "scene_parse150", "folder")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_lib.parse_arg(arg, dataset="fashion_seg")
  if args.dataset not in PRESETS:
    raise ValueError(f"unknown segmentation preset {args.dataset!r}; expected one of "
                     f"{PRESETS}")
  config = eval_config.base_config("segmentation", "fashion_mnist")
  config.log_every_steps = 50

  inp = config.input
  inp.dataset = "folder"  # fashion_seg, folder or scene_parse150
  inp.folder = ""  # dataset=folder: FOLDER/images/<split>/*.jpg + FOLDER/annotations/<split>/*.png
  inp.train_split = "training"
  inp.eval_split = "validation"
  inp.image_size = 512  # the crop: training crops and sliding windows; the encoder runs on it
  inp.reduce_zero_label = True  # ADE20K: label 0 ("other") ignored, 1..150 -> 0..149
  inp.ignore_label = 255
  inp.train_scale = "2048,512"  # keep-ratio fit before the random ratio; "" = native size
  inp.ratio_range = "0.5,2.0"
  inp.hflip = 0.5
  inp.eval_scale = "2048,512"  # keep-ratio fit of eval images; "" = native size
  inp.eval_canvas_multiple = 32  # eval canvases rounded up to this (fewer compilations)
  inp.eval_batch_size = 16  # fixed-size sources only; others are evaluated one by one

  seg = config.segmentation = ml_collections.ConfigDict()
  seg.feature_blocks = ""  # "3,5,7,11"; "": blocks at 1/3, 1/2, 2/3 and all of the depth
  seg.rescales = "4,2,1,0.5"  # per level: x4, x2, x1, x1/2 (BEiT's fpn1..fpn4, patch 16)
  seg.channels = -1  # UperNet channels; -1: the encoder width (BEiT: 768 for ViT-B)
  seg.pool_scales = "1,2,3,6"
  seg.aux_channels = 256  # auxiliary FCN head; 0 disables it
  seg.aux_level = 2
  seg.aux_weight = 0.4
  seg.norm = "batch"  # "batch" (SyncBN over the global batch) or "group"
  seg.dropout = 0.1
  seg.drop_path = 0.1
  seg.remat = False
  seg.batch_size = 16
  seg.total_steps = 160_000
  seg.warmup_steps = 1500
  seg.schedule = "poly"  # "poly" (BEiT/mmseg) or "cosine"
  seg.poly_power = 1.0
  seg.lr = 1e-4  # as given, not scaled with the batch
  seg.min_lr = 0.0
  seg.layer_decay = 0.65
  seg.weight_decay = 0.05
  seg.b1 = 0.9
  seg.b2 = 0.999
  seg.grad_clip_norm = 0.0
  seg.eval_every_steps = 16_000
  seg.eval_mode = "slide"  # "slide" or "whole" (images of the crop size only)
  seg.eval_stride = 341

  # fashion_seg's generator (read only for that dataset).
  syn = config.synthetic = ml_collections.ConfigDict()
  syn.seed = 0  # the data's seed, apart from the training seed
  syn.image_size = 56
  syn.train_examples = 4000
  syn.eval_examples = 500
  syn.max_items = 2
  syn.threshold = 0.2  # item pixels above this (of 1) are pasted and labelled

  if args.dataset in ("ade20k", "folder"):
    config.dtype = "bfloat16"
    config.num_classes = 150 if args.dataset == "ade20k" else -1
  elif args.dataset == "scene_parse150":
    config.dtype = "bfloat16"
    inp.dataset = "scene_parse150"
    inp.train_split, inp.eval_split = "train", "test"
  else:  # fashion_seg: our choices, sized for a 2-core CPU
    inp.dataset = "fashion_seg"
    inp.train_split, inp.eval_split = "train", "test"
    inp.image_size = 28
    inp.reduce_zero_label = False  # 0 is the background class here
    inp.train_scale = inp.eval_scale = ""
    inp.ratio_range = "0.75,1.5"
    inp.eval_canvas_multiple = 1
    inp.eval_batch_size = 100
    # One item filling a 28-px image, the pre-training size: on a CPU budget the head
    # learns the classes of items the encoder saw framed like this; 56-px images with two
    # displaced items (synthetic.image_size=56, max_items=2, input.image_size=56 or
    # slide windows of 28) need a far longer schedule (docs/results.md).
    syn.image_size = 28
    syn.max_items = 1
    seg.rescales = "2,1,0.5,0.25"  # patch 4: maps at strides 2, 4, 8, 16 px
    seg.channels = 32
    seg.aux_channels = 32
    seg.batch_size = 16
    seg.total_steps = 600
    seg.warmup_steps = 30
    seg.lr = 3e-3
    seg.layer_decay = 0.75
    seg.eval_every_steps = 600
    seg.eval_mode = "whole"
    seg.eval_stride = 14
    config.log_every_steps = 100
  return config.lock()
