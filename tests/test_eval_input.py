"""kNN / linear-probe images without TensorFlow (lut_jax/data/eval_input.py): the same
pixels and features as the tf.data path to float tolerance, and the rule that picks it."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from lut_jax import errors
from lut_jax.data import eval_input, idx, image_utils
from lut_jax.evaluation import features
from lut_jax.models import vit
from lut_jax.weights import loading


def _input_config(dataset: str, image_size: int, channels: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "dataset": dataset, "data_dir": None, "image_size": image_size, "channels": channels,
      "num_parallel_calls": -1})


def _encoder(channels: int, image_size: int) -> loading.Pretrained:
  encoder = vit.Encoder(image_size=image_size, patch_size=4, width=32, depth=2, num_heads=2)
  params = jax.jit(encoder.init)(jax.random.key(0),
                                 jnp.zeros((1, image_size, image_size, channels)))["params"]
  return loading.Pretrained(encoder=encoder, params=params, channels=channels,
                            source="random encoder")


def _folder(root: str) -> str:
  """Two classes of non-square RGB and grey images of several sizes, and a file that is
  not an image (both paths leave it out)."""
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for cls in ("a", "b"):
      os.makedirs(os.path.join(root, split, cls))
      for i, (h, w) in enumerate([(37, 53), (61, 40), (20, 20), (18, 90)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
            os.path.join(root, split, cls, f"{i}.png"))
      Image.fromarray(rng.integers(0, 256, (30, 45), np.uint8)).save(
          os.path.join(root, split, cls, "grey.png"))
      with open(os.path.join(root, split, cls, "broken.jpg"), "wb") as f:
        f.write(b"not an image")
  return "folder:" + root


def _cases(tmp_path):
  cases = []
  if idx.find_fashion_mnist() is not None:
    # 28 px as pre-trained (crop 1.0: the images as they are), and a 16 px encoder with the
    # reference's crop (shorter side to 18, centre 16), grey shown as RGB.
    cases += [("fashion_mnist", "test[:40]", 28, 1, 1.0), ("fashion_mnist", "test[:40]", 16, 3, -1)]
  folder = _folder(str(tmp_path / "images"))
  cases += [(folder, "val", 16, 3, -1), (folder, "train", 24, 1, 0.8)]
  return cases


def test_both_paths_give_the_same_images_and_features(tmp_path):
  pytest.importorskip("tensorflow")
  for dataset, split, size, channels, crop_pct in _cases(tmp_path):
    input_config = _input_config(dataset, size, channels)
    pretrained = _encoder(channels, size)
    out = {backend: features.dataset_features(pretrained, input_config, split, batch_size=16,
                                              backend=backend, crop_pct=crop_pct)
           for backend in ("device", "tfdata")}
    images = {backend: np.concatenate([
        b["image"][b["mask"]] for b in features.eval_batches(
            input_config, split, backend, batch_size=16, crop_pct=crop_pct, sharding=None)])
        for backend in ("device", "tfdata")}
    case = (dataset, split, size, channels)
    assert images["device"].shape == (len(out["tfdata"]["label"]), size, size, channels), case
    np.testing.assert_allclose(images["device"], images["tfdata"], atol=2e-5, err_msg=str(case))
    np.testing.assert_array_equal(out["device"]["label"], out["tfdata"]["label"])
    for pool in features.POOLS:
      np.testing.assert_allclose(out["device"][pool], out["tfdata"][pool], atol=1e-4,
                                 err_msg=str(case))
  # The folder's broken files are left out (8 images a split), its labels kept in order.
  np.testing.assert_array_equal(out["device"]["label"], [0] * 5 + [1] * 5)


def test_whole_images_are_only_normalised():
  """At the stored size with crop 1.0 nothing is resampled: ``(x / 255 - mean) / std``."""
  images = np.random.default_rng(1).integers(0, 256, (2, 20, 20, 3), np.uint8)
  mean, std = image_utils.IMAGENET_MEAN, image_utils.IMAGENET_STD
  np.testing.assert_allclose(eval_input.eval_view(images, 20, 1.0, 3),
                             (images / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)


def test_a_constant_image_stays_constant_through_resize_and_crop():
  # The resize weights of every output pixel sum to 1 and the luma weights too: a flat
  # grey 50 x 31 image is the same grey at any size.
  image = np.full((1, 50, 31, 3), 200, np.uint8)
  grey = image_utils.IMAGENET_MEAN.mean(), image_utils.IMAGENET_STD.mean()
  np.testing.assert_allclose(eval_input.eval_view(image, 16, 0.875, 1),
                             (200 / 255 - grey[0]) / grey[1], rtol=1e-5)


def test_the_rule_that_picks_the_path(monkeypatch):
  has_idx = idx.find_fashion_mnist() is not None
  assert eval_input.backend("fashion_mnist", "tfdata") == "tfdata"
  assert eval_input.backend("imagenet2012", "device") == "device"
  if has_idx:
    assert eval_input.backend("fashion_mnist", "auto") == "device"
  with_tf = "tfdata" if importlib.util.find_spec("tensorflow") else "device"
  assert eval_input.backend("imagenet2012", "auto") == with_tf
  assert eval_input.backend("folder:/data/x", "auto") == with_tf
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "tensorflow" else find_spec(name, *a))
  assert eval_input.backend("imagenet2012", "auto") == "device"
  with pytest.raises(errors.ConfigError, match="input.backend"):
    eval_input.backend("fashion_mnist", "memory")


def test_selectors_and_bad_crops_on_the_in_memory_path(tmp_path):
  folder = _folder(str(tmp_path / "images"))
  config = _input_config(folder, 16, 3)
  batches = list(eval_input.eval_batches(config, "train{classes=1}", batch_size=4))
  assert [int(b["mask"].sum()) for b in batches] == [4, 1]
  assert set(np.concatenate([b["label"][b["mask"]] for b in batches])) == {1}
  with pytest.raises(errors.ConfigError, match="crop_pct"):
    next(eval_input.eval_batches(config, "train", batch_size=4, crop_pct=1.5))
