"""Dataset presets of the evaluation configs (``configs/finetune.py:dataset=cub`` ...): each
builds and validates, its tfds name, splits and class count are tfds's, and the Flowers
preset fine-tunes end to end on a tiny stand-in prepared under its real tfds name."""

import inspect
import json
import os
import re
from unittest import mock

import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import knn as knn_config
from configs import linear_probe as linear_probe_config
from lut_jax import errors
from lut_jax.evaluation import eval_config, protocols
from lut_jax.models import variants, vit
from lut_jax.weights import sources

tfds = pytest.importorskip("tensorflow_datasets")

# Classes of each preset's dataset in its benchmark (the papers' numbers).
EXPECTED_CLASSES = {"fashion_mnist": 10, "imagenet": 1000, "inat17": 5089, "inat18": 8142,
                    "cub": 200, "flowers": 102, "pets": 37, "dogs": 120, "cars": 196}
ENCODER = dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=2)


def prepare_fake_tfds(name: str, data_dir: str, sizes: dict, *, label_fn=None,
                      image_shape=(20, 24, 3)):
  """Prepares ``name`` (a real tfds builder, with its features and label space) in
  ``data_dir`` from random images: ``sizes`` maps split -> examples, ``label_fn(i)`` gives
  example ``i``'s label. Only image / class-label / text features are filled."""
  builder = tfds.builder(name, data_dir=data_dir)
  features = builder.info.features
  shape = tuple(features["image"].shape)
  shape = shape if None not in shape else image_shape
  label_fn = label_fn or (lambda i: i % features["label"].num_classes)

  def examples(split, n):
    rng = np.random.default_rng(len(split))
    for i in range(n):
      example = {}
      for key, feature in features.items():
        if key == "image":
          example[key] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif isinstance(feature, tfds.features.ClassLabel):
          example[key] = label_fn(i)
        elif isinstance(feature, tfds.features.Text):
          example[key] = f"{split}_{i}.jpg"
        else:
          raise NotImplementedError(f"fake {name}: feature {key} ({type(feature).__name__})")
      yield f"{split}_{i}", example

  def split_generators(self, dl_manager):
    del self, dl_manager
    return {split: examples(split, n) for split, n in sizes.items()}

  with mock.patch.object(type(builder), "_split_generators", split_generators):
    builder.download_and_prepare()
  return builder


def _split_names(builder) -> set:
  """The split names in the builder's own ``_split_generators`` source (no download)."""
  cls = next(c for c in type(builder).__mro__ if "_split_generators" in c.__dict__)
  source = inspect.getsource(cls.__dict__["_split_generators"])
  names = {m.lower() for m in re.findall(r"Split\.(TRAIN|VALIDATION|TEST)\b", source)}
  names |= set(re.findall(r"""\bname\s*=\s*["'](\w+)["']""", source))
  names |= set(re.findall(r"""["'](\w+)["']\s*:\s*self\._generate_examples""", source))
  return names


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  encoder = vit.Encoder(**ENCODER)
  params = jax.jit(encoder.init)(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  return sources.write_export(str(tmp_path_factory.mktemp("encoder")), params["params"],
                              variants.EncoderConfig(**ENCODER))


@pytest.mark.parametrize("dataset", [*eval_config.DATASETS, "tfds:cifar10", "folder:/data/x"])
def test_every_preset_builds_and_validates(dataset, encoder_dir):
  for module in (finetune_config, knn_config, linear_probe_config):
    config = module.get_config(f"dataset={dataset}")
    config.unlock().pretrained = encoder_dir
    protocols.validate(config)
  preset = eval_config.dataset_preset(dataset)
  assert (config.input.dataset, config.input.train_split, config.input.eval_split) == (
      preset.source, preset.train_split, preset.eval_split)
  ft = finetune_config.get_config(f"dataset={dataset}")
  if dataset in ("fashion_mnist", "imagenet"):
    return
  # Transfer presets run at 224 px; generic sets at the encoder's size.
  assert ft.input.image_size == (-1 if ":" in dataset else 224)
  assert ft.finetune.batch_size % 2 == 0 and ft.finetune.epochs > 0


def test_generic_and_unknown_datasets():
  assert eval_config.dataset_preset("tfds:imagenet_v2/matched-frequency") == (
      eval_config.DatasetPreset("imagenet_v2/matched-frequency", "train", "test"))
  assert eval_config.dataset_preset("folder:/data/in1k").source == "folder:/data/in1k"
  for bad in ("birds", "tfds:", "folder:"):
    with pytest.raises(errors.ConfigError, match="unknown dataset") as e:
      finetune_config.get_config(f"dataset={bad}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dataset", eval_config.DATASETS)
def test_preset_names_splits_and_classes_are_tfds(dataset):
  preset = eval_config.PRESETS[dataset]
  builder = tfds.builder(preset.source)  # the builder's code only: nothing is downloaded
  features = builder.info.features
  assert "image" in features and features["label"].num_classes == EXPECTED_CLASSES[dataset]
  names = _split_names(builder)
  for split in (preset.train_split, preset.eval_split):
    assert set(split.split("+")) <= names, (dataset, split, names)


def test_robustness_splits_are_tfds():
  from configs import robustness as robustness_config  # pylint: disable=g-import-not-at-top
  config = robustness_config.get_config()
  for name, spec in config.robustness.items():
    if name == "imagenet_c":
      builder = tfds.builder(f"{spec.dataset}/fog_1")
      # It keeps ImageNet's splits but train (a filter in its own _split_generators).
      own = inspect.getsource(type(builder)._split_generators)
      names = _split_names(tfds.builder("imagenet2012")) - {"train"}
      assert "s.name != tfds.Split.TRAIN" in own
    else:
      builder = tfds.builder(spec.dataset)
      names = _split_names(builder)
    assert spec.split in names, (name, names)
    assert builder.info.features["label"].num_classes == 1000


def test_flowers_preset_fine_tunes_end_to_end_on_mock_data(tmp_path, encoder_dir):
  """``dataset=flowers`` through eval_main: tfds source on train+validation, augmented
  training, evaluation on test, checkpoints and results."""
  from lut_jax.cli import evaluate as evaluate_cli  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "tfds")
  prepare_fake_tfds("oxford_flowers102", data_dir, {"train": 8, "validation": 8, "test": 6})
  config = finetune_config.get_config("dataset=flowers")
  config.unlock()
  config.pretrained = encoder_dir
  config.dtype = "float32"
  config.input.data_dir = data_dir
  config.input.image_size = 16
  config.input.eval_batch_size = 8
  config.finetune.batch_size = 8
  config.finetune.epochs = 1.0
  config.finetune.warmup_epochs = 0.5
  workdir = str(tmp_path / "ft")
  results = evaluate_cli.evaluate(config, workdir)
  assert results["steps"] == 2  # 16 train + validation examples / batch 8
  assert 0.0 <= results["top1"] <= 100.0
  saved = json.load(open(os.path.join(workdir, "finetune_results.json")))
  assert saved["top1"] == results["top1"]
  record = json.load(open(os.path.join(workdir, "checkpoints", "eval_key.json")))
  assert record["key"]["dataset"] == "oxford_flowers102"
  assert record["key"]["split"] == "train+validation"


def test_a_misspelt_compute_dtype_is_refused_not_run_as_float32(encoder_dir):
  config = finetune_config.get_config("dataset=flowers").unlock()
  config.pretrained = encoder_dir
  config.dtype = "bf16"
  with pytest.raises(eval_config.EvalConfigError, match=r"unknown dtype 'bf16'"):
    protocols.validate(config)
  config.dtype = "bfloat16"
  protocols.validate(config)
