"""Shared fields and checks of the evaluation configs (``configs/knn.py``,
``configs/linear_probe.py``, ``configs/finetune.py``, ``configs/robustness.py``).

Every evaluation but robustness reads the pre-trained encoder from ``config.pretrained`` (a
pre-training work directory, an exported encoder, or converted weights: a PyTorch or
safetensors checkpoint, a timm folder, ``hf-hub:org/name``; see
``lut_jax.weights.loading.load``) and a labelled dataset from
``config.input``. Image size and channels default to the encoder's (``-1``), so a
Fashion-MNIST run needs nothing but the path. Robustness evaluates a fine-tuned classifier
on ImageNet's shifted test sets instead (``configs/robustness.py``).

The dataset is a preset name (:data:`PRESETS`: ``configs/finetune.py:dataset=cub``), any
tfds image-classification dataset as ``tfds:NAME``, or an image folder as ``folder:PATH``
(see :func:`dataset_preset`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NoReturn, Optional, Sequence

import ml_collections

from lut_jax import config_lib, errors
from lut_jax.data import folders


class EvalConfigError(errors.ConfigError):
  """An evaluation config value is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class DatasetPreset:
  """Where a labelled dataset comes from (``config.input.dataset``: a tfds name or
  ``folder:PATH``), the train / eval splits of its usual protocol, and its eval crop."""

  source: str
  train_split: str
  eval_split: str
  # The eval view's centre crop; -1: the reference's rule by image size
  # (image_utils.eval_crop_pct: 224/256 up to 224 px, the whole image above).
  crop_pct: float = -1.0


# Datasets by short name. iNaturalist and the fine-grained (FGVC) sets are the transfer sets
# of the MAE / LUT protocol; the names, splits and label spaces are tfds's.
PRESETS = {
    # Fashion-MNIST's pre-training views are not rescaled, so its eval images are neither.
    "fashion_mnist": DatasetPreset("fashion_mnist", "train", "test", crop_pct=1.0),
    "imagenet": DatasetPreset("imagenet2012", "train", "validation"),
    # iNaturalist's test split has no labels: its validation split is the benchmark's.
    "inat17": DatasetPreset("i_naturalist2017", "train", "validation"),
    "inat18": DatasetPreset("i_naturalist2018", "train", "validation"),
    "cub": DatasetPreset("caltech_birds2011", "train", "test"),
    # Flowers-102 is trained on its train and validation splits together (2 x 1,020 images)
    # and tested on the 6,149 test images, as in the usual transfer protocol.
    "flowers": DatasetPreset("oxford_flowers102", "train+validation", "test"),
    "pets": DatasetPreset("oxford_iiit_pet", "train", "test"),  # tfds's train: the trainval list
    "dogs": DatasetPreset("stanford_dogs", "train", "test"),
    "cars": DatasetPreset("cars196", "train", "test"),
}
DATASETS = tuple(PRESETS)
TFDS_PREFIX = "tfds:"


def dataset_preset(dataset: str) -> DatasetPreset:
  """The preset of ``dataset``: a name of :data:`PRESETS`, ``tfds:NAME`` (any prepared tfds
  image-classification dataset; splits ``train`` / ``test``, tfds's usual names) or
  ``folder:PATH`` (``PATH/train/<class>/...`` and ``PATH/val/<class>/...``, the ImageNet
  folder layout). Splits of the last two are overridden with ``--config.input.*_split``."""
  if dataset in PRESETS:
    return PRESETS[dataset]
  if dataset.startswith(TFDS_PREFIX) and len(dataset) > len(TFDS_PREFIX):
    return DatasetPreset(dataset[len(TFDS_PREFIX):], "train", "test")
  if dataset.startswith(folders.FOLDER_PREFIX) and len(dataset) > len(folders.FOLDER_PREFIX):
    return DatasetPreset(dataset, "train", "val")
  raise EvalConfigError(f"unknown dataset {dataset!r}; expected one of {DATASETS}, "
                        f"{TFDS_PREFIX}NAME (a tfds dataset) or {folders.FOLDER_PREFIX}PATH "
                        "(an image folder)")


def base_config(mode: str, dataset: str = "fashion_mnist") -> ml_collections.ConfigDict:
  """Fields common to every evaluation mode, with ``dataset``'s defaults
  (:func:`dataset_preset`).

  Robustness reads a fine-tuned classifier and its own datasets (``configs/robustness.py``):
  its config has no encoder fields and no dataset or training split in ``input``.
  """
  preset = dataset_preset(dataset)
  reads_encoder = mode != "robustness"
  c = ml_collections.ConfigDict()
  c.mode = mode
  if reads_encoder:
    # Pre-training workdir (its online encoder) or an exported encoder directory.
    c.pretrained = ""
    c.pretrained_step = -1  # pre-training checkpoint step; -1: the latest
    c.num_classes = -1  # -1: from the dataset (or the largest label + 1)
    c.cache_features = True  # kNN / linear probe: keep extracted features in workdir/features
  c.seed = 0
  c.dtype = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)

  c.input = ml_collections.ConfigDict()
  if reads_encoder:
    c.input.dataset = preset.source
    c.input.train_split = preset.train_split
    c.input.eval_split = preset.eval_split
    # Where kNN / linear-probe images are made: "device" (in memory, no TensorFlow),
    # "tfdata", or "auto" (lut_jax.data.eval_input.backend's rule); equal to float tolerance.
    c.input.backend = "auto"
  c.input.data_dir = ml_collections.config_dict.placeholder(str)
  c.input.image_size = -1  # -1: the pre-trained encoder's image size
  c.input.channels = -1  # -1: the pre-trained encoder's input channels
  # Eval resize: shorter side to int(S / crop_pct), then centre crop S; -1: by S (224/256 up
  # to 224 px, 1.0 above, as the reference).
  c.input.crop_pct = preset.crop_pct
  c.input.eval_batch_size = 256  # feature extraction / evaluation batch (global)
  c.input.num_parallel_calls = -1
  c.input.prefetch = 2
  c.input.shuffle_buffer = 10_000
  return c


def input_config(config: ml_collections.ConfigDict, pretrained: Any = None, *,
                 image_size: Optional[int] = None, channels: Optional[int] = None,
                 dataset: Optional[str] = None,
                 split: Optional[str] = None) -> ml_collections.ConfigDict:
  """The ``config.input`` block the input pipeline reads, with ``-1`` fields resolved.

  Image size and channels come from the arguments when given (a fine-tuned classifier's),
  else from ``config.input``, else from the pre-trained encoder
  (``loading.Pretrained``); ``dataset`` and ``split`` replace ``config.input.dataset`` and
  ``.train_split`` (the robustness sets, read one after the other, train on nothing).
  """
  size = image_size or config.input.image_size
  if size is None or size <= 0:
    size = pretrained.config["image_size"]
  if not channels:
    channels = config.input.channels if config.input.channels > 0 else pretrained.channels
  c = ml_collections.ConfigDict()
  c.dataset = dataset or config.input.dataset
  c.data_dir = config.input.data_dir
  c.split = config.input.train_split if split is None else split
  c.image_size = int(size)
  c.channels = int(channels)
  c.batch_size = config.input.eval_batch_size
  c.num_parallel_calls = config.input.num_parallel_calls
  c.prefetch = config.input.prefetch
  c.shuffle_buffer = config.input.shuffle_buffer
  return c


def num_classes(config: ml_collections.ConfigDict, labels=None) -> int:
  """``config.num_classes``, else the dataset's, else the largest label + 1."""
  if config.num_classes > 0:
    return int(config.num_classes)
  try:
    from lut_jax.data import datasets  # optional: tensorflow_datasets
    n = datasets.get_source(config.input.dataset, config.input.train_split,
                            config.input.data_dir).num_classes
  except (ImportError, ValueError, FileNotFoundError):  # no TensorFlow: the labels say
    n = None
  if n:
    return int(n)
  if labels is None:
    raise EvalConfigError("set num_classes: the dataset does not say how many classes it has")
  return int(max(labels)) + 1


def fail(message: str) -> NoReturn:
  """Raises the one-line :class:`EvalConfigError` of a config check."""
  raise EvalConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fields every evaluation config has (its protocol's ``validate`` checks the
  rest: ``lut_jax.evaluation.protocols.validate`` runs both); raises
  :class:`EvalConfigError` naming the bad field."""
  if "pretrained" in config and not config.pretrained:  # base_config: all but robustness
    fail("set --config.pretrained to a pre-training workdir, an exported encoder directory, "
         "a timm folder, a PyTorch or safetensors checkpoint, or hf-hub:org/name")
  if config.input.eval_batch_size <= 0:
    fail(f"input.eval_batch_size must be positive, got {config.input.eval_batch_size}")


def check_distinct_splits(config: ml_collections.ConfigDict) -> None:
  """A protocol scored on other images than it is fitted on: its two splits differ."""
  folders.check_distinct_splits(config.input.dataset, {
      "input.train_split": config.input.train_split,
      "input.eval_split": config.input.eval_split})


def check_dtype(config: ml_collections.ConfigDict) -> None:
  """``config.dtype`` of a protocol that runs bfloat16 for "bfloat16" and float32 otherwise,
  so that a misspelling ("bf16") is refused rather than silently run in float32."""
  if config.dtype not in config_lib.DTYPES:
    fail(f"unknown dtype {config.dtype!r}; expected one of {config_lib.DTYPES}")


def check_pools(value: str, name: str, known: Sequence[str]) -> None:
  """``value`` (field ``name``) is a comma-separated subset of the ``known`` pools."""
  items = pools(value)
  if not items or any(p not in known for p in items):
    fail(f"{name}={value!r}: expected a comma-separated subset of {tuple(known)}")


def pools(value: str) -> tuple[str, ...]:
  """``"cls,mean"`` -> ``("cls", "mean")``."""
  return tuple(p for p in value.split(",") if p)


def write_results(workdir: str, name: str, results: dict[str, Any],
                  source: Optional[dict[str, Any]] = None) -> str:
  """Writes ``workdir/<name>_results.json`` (process 0); returns the path.

  ``source`` (``features.describe_source``: the encoder's path, step, weights hash and
  input keys) is stored under ``"source"`` beside the metrics, so that a reader can tell
  which encoder produced them.
  """
  from etils import epath  # local: keep config files light at import
  import jax  # local: keep config files free of jax at import
  path = epath.Path(workdir) / f"{name}_results.json"
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**results, "source": source} if source else results,
                               indent=2, sort_keys=True))
  return os.fspath(path)
