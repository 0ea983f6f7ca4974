"""Robustness evaluation: the ImageNet-A / -R class lists, restricted-logit accuracy, the
mCE arithmetic, the config, and an end-to-end run of a tiny fine-tuned classifier on tiny
stand-ins of the tfds sets (one of them missing)."""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import finetune as finetune_config
from configs import robustness as robustness_config
from lut_jax import config_lib, errors
from lut_jax.evaluation import eval_config, finetune, protocols, robustness
from lut_jax.models import vit
from lut_jax.weights import loading

tfds = pytest.importorskip("tensorflow_datasets")
from tests.test_transfer_presets import prepare_fake_tfds  # noqa: E402

IMAGE, PATCH, WIDTH, DEPTH = 16, 4, 32, 2

# (WordNet ID, ImageNet-1k index, class) read off the ImageNet class list by hand.
IMAGENET_A_CLASSES = [("n01498041", 6, "stingray"), ("n01531178", 11, "goldfinch"),
                      ("n01558993", 15, "robin"), ("n02099601", 207, "golden retriever"),
                      ("n12267677", 988, "acorn")]
IMAGENET_R_CLASSES = [("n01443537", 1, "goldfish"), ("n01484850", 2, "great white shark"),
                      ("n02099601", 207, "golden retriever"), ("n10565667", 983, "scuba diver"),
                      ("n12267677", 988, "acorn")]

# AlexNet's mean error per benchmark corruption, as ALEXNET_ERR in google-research/augmix's
# imagenet.py lists them (its CORRUPTIONS order), typed in independently of the module.
AUGMIX_CORRUPTIONS = [
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression"]
AUGMIX_ALEXNET_ERR = [0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360,
                      0.866816, 0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840,
                      0.606500]


def test_imagenet_a_and_r_classes_are_the_official_lists():
  wnids = robustness.imagenet_wnids()
  assert len(wnids) == 1000 and list(wnids) == sorted(set(wnids))  # sorted-WNID order
  for subset, hand in ((robustness.IMAGENET_A_WNIDS, IMAGENET_A_CLASSES),
                       (robustness.IMAGENET_R_WNIDS, IMAGENET_R_CLASSES)):
    assert len(subset) == 200 and list(subset) == sorted(set(subset))
    indices = robustness.subset_indices(subset)
    assert list(indices) == sorted(indices) and len(set(indices)) == 200
    for wnid, index, _ in hand:
      assert wnid in subset and wnids.index(wnid) == index
      assert indices[list(subset).index(wnid)] == index
  assert "n01558993" not in robustness.IMAGENET_R_WNIDS  # robin: A only
  assert "n01443537" not in robustness.IMAGENET_A_WNIDS  # goldfish: R only
  timm = pytest.importorskip("timm")  # a second copy of the lists, in timm's package data
  info = os.path.join(os.path.dirname(timm.__file__), "data", "_info")
  for name, subset in (("a", robustness.IMAGENET_A_WNIDS), ("r", robustness.IMAGENET_R_WNIDS)):
    with open(os.path.join(info, f"imagenet_{name}_synsets.txt")) as f:
      assert f.read().split() == list(subset)
    with open(os.path.join(info, f"imagenet_{name}_indices.txt")) as f:
      assert [int(i) for i in f.read().split()] == list(robustness.subset_indices(subset))


def test_restricted_accuracy_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  indices = robustness.subset_indices(robustness.IMAGENET_A_WNIDS)
  logits = rng.normal(size=(64, 1000)).astype(np.float32)
  labels = indices[rng.integers(0, 200, 64)]
  labels[:8] = rng.integers(0, 1000, 8)  # whatever the label, only the 200 are predicted
  logits[np.arange(16, 40), labels[16:40]] += 5.0  # some rows right, some wrong
  mask = np.ones(64, bool)
  mask[-5:] = False
  # Hendrycks' evaluation: argmax over the 200 columns, compared with the 200-class label.
  label_200 = np.array([list(indices).index(y) if y in indices else -1 for y in labels])
  expected = np.sum((np.argmax(logits[:, indices], axis=1) == label_200) & mask)
  out = robustness.correct_counts(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
                                  indices)
  assert out["correct"] == expected and out["count"] == 59
  assert 0 < expected < 59
  whole = robustness.correct_counts(jnp.asarray(logits), jnp.asarray(labels),
                                    jnp.asarray(mask))
  assert whole["correct"] == np.sum((np.argmax(logits, axis=1) == labels) & mask)


def test_mce_matches_a_hand_computation():
  assert dict(zip(AUGMIX_CORRUPTIONS, AUGMIX_ALEXNET_ERR)) == robustness.ALEXNET_ERRORS
  assert tuple(AUGMIX_CORRUPTIONS) == robustness.BENCHMARK_CORRUPTIONS
  # Made-up top-1: 50% everywhere but Gaussian noise (90, 80, 70, 60, 50) and fog (all 20).
  top1 = {(c, s): 50.0 for c in robustness.BENCHMARK_CORRUPTIONS for s in range(1, 6)}
  top1.update({("gaussian_noise", s): 100.0 - 10.0 * s for s in range(1, 6)})
  top1.update({("fog", s): 20.0 for s in range(1, 6)})
  top1[("saturate", 1)] = 99.0  # an extra corruption: top-1 only
  out = robustness.corruption_metrics(top1)
  # Gaussian noise: errors 0.1 + 0.2 + 0.3 + 0.4 + 0.5 = 1.5 against AlexNet's 5 x 0.886428.
  assert out["imagenet_c/gaussian_noise/ce"] == pytest.approx(100 * 1.5 / 4.43214)
  assert out["imagenet_c/fog/ce"] == pytest.approx(100 * 4.0 / 4.09662)  # 5 x 0.8 / 5 x .819324
  assert out["imagenet_c/snow/ce"] == pytest.approx(100 * 2.5 / 4.33408)
  assert out["imagenet_c/gaussian_noise/top1"] == pytest.approx(70.0)
  ces = [100 * 2.5 / (5 * e) for e in AUGMIX_ALEXNET_ERR]
  ces[0], ces[9] = 100 * 1.5 / 4.43214, 100 * 4.0 / 4.09662
  assert out["imagenet_c/mce"] == pytest.approx(sum(ces) / 15)
  # Plain mean top-1 over the 75 benchmark pairs (the extra corruption is not in it).
  assert out["imagenet_c/mean_top1"] == pytest.approx((13 * 5 * 50 + 350 + 100) / 75)
  assert "imagenet_c/saturate/ce" not in out and out["imagenet_c/saturate/1/top1"] == 99.0
  # A corruption short of a severity has no CE, and then there is no mCE.
  del top1[("fog", 5)]
  partial = robustness.corruption_metrics(top1)
  assert "imagenet_c/fog/ce" not in partial and "imagenet_c/mce" not in partial


def _label_folders(root, names):
  for name in names:
    os.makedirs(os.path.join(root, name))
  return f"folder:{root}"


def _part(name, dataset):
  return robustness.Part(name, name, dataset, "test", 0.875, dataset)


def test_label_spaces_of_tfds_and_folder_sources(tmp_path):
  assert robustness.label_map(_part("imagenet_a", "imagenet_a"), 1000) is None
  folder = _label_folders(str(tmp_path / "a"), robustness.IMAGENET_A_WNIDS)
  np.testing.assert_array_equal(robustness.label_map(_part("imagenet_a", folder), 200),
                                robustness.subset_indices(robustness.IMAGENET_A_WNIDS))
  # ImageNet-V2's release names its folders 0..999: listed in string order, they would
  # label images wrongly, so they are refused.
  numbered = _label_folders(str(tmp_path / "v2"), [str(i) for i in range(1000)])
  with pytest.raises(errors.DataError, match="not the sorted WordNet IDs"):
    robustness.label_map(_part("imagenet_v2", numbered), 1000)
  with pytest.raises(errors.DataError, match="has 200 classes"):
    robustness.label_map(_part("imagenet_sketch", "imagenet_sketch"), 200)


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory):
  """A fine-tuning work directory of a tiny 1000-class classifier (2 steps of
  ``finetune.run``, the best-top-1 checkpoint kept)."""
  config_ = dict(image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=2,
                 mlp_ratio=4.0)
  encoder = vit.Encoder(**config_)
  params = jax.jit(encoder.init)(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
  pretrained = loading.Pretrained(encoder=encoder, params=params, channels=3, source="test",
                                  path="/tmp/encoder")
  config = finetune_config.get_config("dataset=imagenet")
  config.unlock()
  config.dtype = "float32"
  config.num_classes = 1000
  config.input.image_size = IMAGE
  config.finetune.batch_size = 16
  config.finetune.epochs = 1.0
  config.finetune.warmup_epochs = 0.5
  config.finetune.eval_every_epochs = 0.5
  rng = np.random.default_rng(0)

  def batch(n):
    return {"image": rng.normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32),
            "label": rng.integers(0, 1000, n).astype(np.int32)}

  def train_data_fn(start_step):
    while True:
      yield batch(16)

  workdir = str(tmp_path_factory.mktemp("finetuned"))
  finetune.run(config, workdir, pretrained=pretrained, train_data_fn=train_data_fn,
                    eval_data=[dict(batch(16), mask=np.ones(16, bool))],
                    num_train_examples=32)
  return workdir


def _config(finetuned_dir, data_dir, **overrides):
  config = robustness_config.get_config()
  config.unlock()
  config.finetuned = finetuned_dir
  config.input.data_dir = data_dir
  config.input.eval_batch_size = 8
  return config_lib.override(config, overrides)


def test_config_builds_and_validates(finetuned_dir, tmp_path):
  protocols.validate(_config(finetuned_dir, None))
  assert "pretrained" not in robustness_config.get_config()  # it reads no encoder
  for overrides, message in (
      ({"finetuned": ""}, "set --config.finetuned"),
      ({"finetuned": str(tmp_path)}, "not a fine-tuning work directory"),
      ({"checkpoint": "bestest"}, "checkpoint must be"),
      ({"sets": "imagenet_a,imagenet_x"}, "sets="),
      ({"robustness.imagenet_c.corruptions": "fog,rain"}, "corruptions="),
      ({"robustness.imagenet_c.severities": "1,6"}, "severities="),
      ({"robustness.imagenet_a.crop_pct": 1.5}, "crop_pct"),
      ({"dtype": "float16"}, "dtype")):
    with pytest.raises(eval_config.EvalConfigError, match=message) as e:
      protocols.validate(_config(finetuned_dir, None, **overrides))
    assert "\n" not in str(e.value)


def test_loads_the_best_checkpoint_of_the_finetuning(finetuned_dir):
  classifier = robustness.load_finetuned(finetuned_dir)
  saved = json.load(open(os.path.join(finetuned_dir, "finetune_results.json")))
  assert classifier.step == saved["best_step"] and classifier.top1 == saved["best_top1"]
  assert classifier.num_classes == 1000 and classifier.image_size == IMAGE
  assert robustness.load_finetuned(finetuned_dir, "latest").step == 2
  with pytest.raises(errors.WorkdirError, match="not a fine-tuning work directory"):
    robustness.load_finetuned(os.path.dirname(finetuned_dir))


@pytest.fixture(scope="module")
def known_classifier(finetuned_dir):
  """``(classifier, a_class, r_class)``: the tiny classifier with a zero head kernel, so
  that its logits are a fixed bias whatever the image: tench (0, in neither subset)
  highest, then ``a_class`` (ImageNet-A only), then ``r_class`` (ImageNet-R only)."""
  a_indices = robustness.subset_indices(robustness.IMAGENET_A_WNIDS)
  r_indices = robustness.subset_indices(robustness.IMAGENET_R_WNIDS)
  a_class = int(next(i for i in a_indices if i not in r_indices))
  r_class = int(next(i for i in r_indices if i not in a_indices))
  assert 0 not in a_indices and 0 not in r_indices
  bias = np.zeros(1000, np.float32)
  bias[[0, a_class, r_class]] = 10.0, 5.0, 4.0
  classifier = robustness.load_finetuned(finetuned_dir)
  head = {"kernel": jnp.zeros_like(classifier.params["head"]["kernel"]),
          "bias": jnp.asarray(bias)}
  classifier = dataclasses.replace(classifier, params={**classifier.params, "head": head})
  return classifier, a_class, r_class


def test_end_to_end_on_tiny_tfds_sets_with_one_missing(finetuned_dir, known_classifier,
                                                       tmp_path):
  from lut_jax.cli import evaluate as evaluate_cli  # pylint: disable=g-import-not-at-top
  a_indices = robustness.subset_indices(robustness.IMAGENET_A_WNIDS)
  r_indices = robustness.subset_indices(robustness.IMAGENET_R_WNIDS)
  classifier, a_class, r_class = known_classifier
  # Labels: the first few images of each set are the class it predicts there.
  data_dir = str(tmp_path / "tfds")
  prepare_fake_tfds("imagenet_v2/matched-frequency", data_dir, {"test": 10},
                    label_fn=lambda i: 0 if i < 3 else 7 * i)  # 3 of 10
  prepare_fake_tfds("imagenet_a", data_dir, {"test": 10},
                    label_fn=lambda i: a_class if i < 4 else a_indices[9 * i])  # 4 of 10
  prepare_fake_tfds("imagenet_r", data_dir, {"test": 9},
                    label_fn=lambda i: r_class if i < 2 else r_indices[3 * i + 1])  # 2 of 9
  for name in ("gaussian_noise_1", "gaussian_noise_2", "fog_1", "fog_2"):
    prepare_fake_tfds(f"imagenet2012_corrupted/{name}", data_dir, {"validation": 4},
                      label_fn=lambda i: 0 if i < 1 else 500 + i)  # 1 of 4
  config = _config(finetuned_dir, data_dir, **{
      "robustness.imagenet_c.corruptions": "gaussian_noise,fog",
      "robustness.imagenet_c.severities": "1,2,3"})

  # The command's path: validation, the classifier read from disk, both result files.
  # ImageNet-Sketch is not prepared, nor is ImageNet-C's severity 3.
  workdir = str(tmp_path / "robustness")
  results = evaluate_cli.evaluate(config, workdir)
  assert sorted(results["skipped"]) == ["imagenet_c", "imagenet_sketch"]
  assert "tfds build imagenet_sketch" in results["skipped"]["imagenet_sketch"]
  assert "2 of its 6 corruption / severity pairs" in results["skipped"]["imagenet_c"]
  assert results["examples"] == {"imagenet_v2": 10, "imagenet_a": 10, "imagenet_r": 9,
                                 **{f"imagenet_c/{c}/{s}": 4 for c in ("gaussian_noise", "fog")
                                    for s in (1, 2)}}
  for key in ("imagenet_v2/top1", "imagenet_a/top1", "imagenet_r/top1",
              "imagenet_c/fog/2/top1", "imagenet_c/mean_top1"):
    assert 0.0 <= results[key] <= 100.0
  assert "imagenet_c/mce" not in results  # 2 of 15 corruptions, 2 of 5 severities
  saved = json.load(open(os.path.join(workdir, "robustness_results.json")))
  assert saved["source"]["finetuned"] == os.path.abspath(finetuned_dir)
  assert saved["imagenet_a/top1"] == results["imagenet_a/top1"]
  markdown = open(os.path.join(workdir, "robustness_results.md")).read()
  for text in ("| ImageNet-A | imagenet_a | test | 10 |", "| imagenet2012_corrupted |",
               "mCE: not computed", "* ImageNet-Sketch: ", "* ImageNet-C: 2 of its 6"):
    assert text in markdown
  # Severities 1 and 2 of each corruption, no CE (severities 3-5 are missing).
  assert re.search(r"\| fog \| [\d.]+ \| [\d.]+ \| - \| - \| - \| [\d.]+ \| - \|", markdown)

  # Known predictions: A and R score their own best class, V2 and C the overall best.
  known = robustness.run(config, str(tmp_path / "known"), classifier=classifier)
  assert known["imagenet_v2/top1"] == pytest.approx(30.0)
  assert known["imagenet_a/top1"] == pytest.approx(40.0)
  assert known["imagenet_r/top1"] == pytest.approx(200.0 / 9)
  assert known["imagenet_c/fog/1/top1"] == pytest.approx(25.0)
  assert known["imagenet_c/mean_top1"] == pytest.approx(25.0)


def _images(folder, count):
  os.makedirs(folder, exist_ok=True)
  for i in range(count):
    Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(f"{folder}/{i}.png")


def test_released_folder_layouts(finetuned_dir, known_classifier, tmp_path):
  """ImageNet-A as released (200 WordNet-ID folders: labels 0..199) and ImageNet-C as
  released (<corruption>/<severity>/<1000 WordNet-ID folders>)."""
  classifier, a_class, _ = known_classifier
  wnids = robustness.imagenet_wnids()
  a_root = tmp_path / "imagenet-a"
  for wnid in robustness.IMAGENET_A_WNIDS:
    os.makedirs(a_root / wnid)
  _images(a_root / wnids[a_class], 2)  # predicted: right
  _images(a_root / robustness.IMAGENET_A_WNIDS[-1], 1)  # wrong
  c_root = tmp_path / "imagenet-c"
  for wnid in wnids:
    os.makedirs(c_root / "fog" / "3" / wnid)
  _images(c_root / "fog" / "3" / wnids[0], 1)  # predicted: right
  _images(c_root / "fog" / "3" / wnids[500], 3)
  config = _config(finetuned_dir, None, sets="imagenet_a,imagenet_c", **{
      "robustness.imagenet_a.dataset": f"folder:{a_root}",
      "robustness.imagenet_c.dataset": f"folder:{c_root}",
      "robustness.imagenet_c.corruptions": "fog", "robustness.imagenet_c.severities": "3"})
  results = robustness.run(config, str(tmp_path / "w"), classifier=classifier)
  assert results["imagenet_a/top1"] == pytest.approx(200.0 / 3)
  assert results["imagenet_c/fog/3/top1"] == pytest.approx(25.0)
  assert results["examples"] == {"imagenet_a": 3, "imagenet_c/fog/3": 4}


def test_missing_sets_are_one_line(finetuned_dir, tmp_path):
  empty = str(tmp_path / "empty")
  with pytest.raises(errors.DataNotFoundError) as e:
    robustness.run(_config(finetuned_dir, empty), str(tmp_path / "w"))
  message = str(e.value)
  assert "\n" not in message and "none of the robustness sets" in message
  assert "ImageNet-A" in message and "tfds build" in e.value.hint
  with pytest.raises(errors.DataNotFoundError, match="ImageNet-V2") as e:
    robustness.run(_config(finetuned_dir, empty, skip_missing=False),
                              str(tmp_path / "w"))
  assert "\n" not in str(e.value)
