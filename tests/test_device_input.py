"""The on-device input path against the tf.data path and hand checks: crops and flips
per op, draw distributions, view statistics, (seed, step) determinism, epochs, resume."""

import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from lut_jax import config_lib, errors
from lut_jax.data import augment, device_input, idx, image_utils, input_pipeline, splits
from lut_jax.pretrain import train
from lut_jax.runtime import sharding
from tests import util

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_fashion_mnist = pytest.mark.skipif(idx.find_fashion_mnist() is None,
                                         reason="Fashion-MNIST idx files not installed")


def _input(**overrides):
  config = config_lib.base_config().input
  config.update(dict(
      backend="device", dataset="fashion_mnist", split="train", data_dir=None,
      image_size=28, channels=3, batch_size=32, shuffle_buffer=1000, prefetch=1))
  config.update(overrides)
  return config


def _random_split(n=40, size=16):
  images = np.random.default_rng(0).integers(0, 256, (n, size, size, 1), dtype=np.uint8)
  return device_input.Split(images, np.arange(n, dtype=np.int32) % 10, "random")


def _pixels(view):
  """Normalised one-channel views back to grey levels."""
  mean, std = image_utils.normalization_constants(1)
  return np.rint((np.asarray(view) * std + mean) * 255)


def _examples_shown(views, split):
  """For each view, the example whose central 8x8 block (maybe mirrored) it shows: every
  crop keeps it, somewhere."""
  found = []
  for view in _pixels(views)[..., 0]:
    hits = [i for i, image in enumerate(split.images[..., 0].astype(float))
            for block in (image[4:12, 4:12], image[4:12, 4:12][:, ::-1])
            if any(np.array_equal(view[y:y + 8, x:x + 8], block)
                   for y in range(9) for x in range(9))]
    assert len(set(hits)) == 1, hits
    found.append(hits[0])
  return found


@pytest.mark.parametrize("split", ["train", "train[:100]", "train[10:20]", "train[-30:]",
                                   "train[:33%]", "train[25%:75%]", "test[:-5]", "test[5:3]"])
def test_slice_split_matches_tfds(split):
  sizes = {"train": 1000, "test": 77}
  want = tfds.core.ReadInstruction.from_spec(split).to_absolute(
      {k: type("Info", (), {"num_examples": v}) for k, v in sizes.items()})[0]
  base, start, stop = splits.slice_split(split, sizes)
  n = sizes[want.splitname]
  assert (base, start, max(start, stop)) == (
      want.splitname, want.from_ or 0, max(want.from_ or 0, n if want.to is None else want.to))


@pytest.mark.parametrize("split", ["validation", "train[:x]", "train[1:2:3]", ""])
def test_bad_split_is_a_data_error(split):
  with pytest.raises(errors.DataError, match="bad split"):
    splits.slice_split(split, {"train": 10})


def test_example_selectors_keep_the_classes_and_per_class_ranges_in_file_order():
  labels = np.asarray([2, 0, 2, 1, 0, 2, 1, 1, 0, 2])
  # By hand: the n-th example of its class, in file order.
  rank = [0, 0, 1, 0, 1, 2, 1, 2, 2, 3]
  for split, keep in [
      ("train{per_class=:2}", [r < 2 for r in rank]),
      ("train{per_class=2:3}", [r == 2 for r in rank]),
      ("train{classes=0-1}", [l in (0, 1) for l in labels]),
      ("train{classes=2,per_class=1:}", [l == 2 and r >= 1 for l, r in zip(labels, rank)]),
      ("train{classes=0;2}", [l != 1 for l in labels])]:
    base, kept = splits.select_examples(split, labels)
    assert base == "train"
    np.testing.assert_array_equal(kept, np.flatnonzero(keep), err_msg=split)
  assert splits.select_examples("test[:5]", labels) == ("test[:5]", None)
  with pytest.raises(errors.DataError, match="bad example selector 'cls=1'"):
    splits.select_examples("train{cls=1}", labels)
  # A class-balanced subset of the real data set: 30 of each class, none of the held-out.
  small = device_input.load_split(_input(), "train{per_class=:30}")
  held = device_input.load_split(_input(), "train{per_class=30:40}")
  assert np.bincount(small.labels).tolist() == [30] * 10
  assert np.bincount(held.labels).tolist() == [10] * 10
  _, all_labels = idx.load_fashion_mnist(idx.find_fashion_mnist(), "train")
  first = np.concatenate([np.flatnonzero(all_labels == c)[:30] for c in range(10)])
  np.testing.assert_array_equal(small.labels, all_labels[np.sort(first)])


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_flip_matches_the_tf_op(channels):
  rng = np.random.default_rng(channels)
  image = rng.random((16, 16, channels), np.float32)
  for oy, ox, flip in [(0, 0, False), (8, 8, True), (3, 5, True), (7, 1, False)]:
    want = augment.crop_flip(tf.constant(image), augment.CropFlip(
        tf.constant(oy), tf.constant(ox), tf.constant(flip)), 16).numpy()
    got = device_input.crop_flip(image, oy, ox, flip)
    np.testing.assert_array_equal(got, want)


def test_crop_offsets_and_flips_are_uniform():
  """Every offset in [0, 8] and both flips equally likely (torchvision's randint, p 0.5)."""
  n = 2000
  ramp = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), (n, 16, 16, 1))
  views = device_input.make_views(ramp, jax.random.split(jax.random.key(0), n), channels=1,
                                  two_views=False)["view1"]
  pixels = _pixels(views)[..., 0].astype(int)
  # Unflipped, crop pixel (4, 4) is image pixel (offset_y, offset_x) (no reflection there)
  # and values grow to the right; flipped, that pixel moved to column 11.
  flipped = pixels[:, 4, 5] < pixels[:, 4, 4]
  value = np.where(flipped, pixels[:, 4, 11], pixels[:, 4, 4])
  for offsets in (value // 16, value % 16):
    counts = np.bincount(offsets, minlength=9)
    assert counts.size == 9 and counts.min() > n / 9 * 0.75, counts
  assert abs(flipped.mean() - 0.5) < 0.05


def test_batch_is_a_function_of_seed_and_step_and_epochs_visit_each_example_once():
  split = _random_split(n=40)
  config = _input(image_size=16, channels=1, batch_size=8)
  mesh = sharding.create_mesh(1)
  a = device_input.DeviceData(config, seed=3, mesh=mesh, split=split)
  b = device_input.DeviceData(config, seed=3, mesh=mesh, split=split)
  assert a.steps_per_epoch == 5
  chex.assert_trees_all_equal(a.batch(7), b.batch(7))
  assert not np.array_equal(a.batch(7)["view1"], a.batch(8)["view1"])
  other_seed = device_input.DeviceData(config, seed=4, mesh=mesh, split=split)
  assert not np.array_equal(a.batch(7)["view1"], other_seed.batch(7)["view1"])
  epochs = [[i for j in range(5) for i in _examples_shown(a.batch(e * 5 + j)["view1"], split)]
            for e in range(2)]
  for seen in epochs:
    assert sorted(seen) == list(range(40))
  assert epochs[0] != epochs[1]  # each epoch its own order


@needs_fashion_mnist
def test_view_statistics_match_the_tfdata_path():
  """Same data, same recipe: per-channel means and stds of both views agree."""
  config = _input(batch_size=256)
  device = device_input.DeviceData(config, seed=0, mesh=sharding.create_mesh(1))
  host = input_pipeline.create_pretrain_iterator(config, seed=0)
  for view in ("view1", "view2"):
    d = np.concatenate([np.asarray(device.batch(s)[view]) for s in range(4)])
    h = np.concatenate([next(host)[view] for _ in range(4)]) if view == "view1" else None
    if h is None:
      host = input_pipeline.create_pretrain_iterator(config, seed=0)
      h = np.concatenate([next(host)[view] for _ in range(4)])
    np.testing.assert_allclose(d.mean(axis=(0, 1, 2)), h.mean(axis=(0, 1, 2)), atol=0.06)
    np.testing.assert_allclose(d.std(axis=(0, 1, 2)), h.std(axis=(0, 1, 2)), rtol=0.05)
  # View 2's colour ops leave grey images grey, as on the host.
  v2 = np.asarray(device.batch(0)["view2"])
  assert np.allclose(v2[..., 0] * 0.229 + 0.485, v2[..., 1] * 0.224 + 0.456, atol=1e-5)


@needs_fashion_mnist
def test_load_split_resizes_once_and_checks_the_split():
  split = device_input.load_split(_input(image_size=16), "test[:10]")
  assert split.images.shape == (10, 16, 16, 1) and split.images.dtype == np.uint8
  images, labels = idx.load_fashion_mnist(idx.find_fashion_mnist(), "test")
  np.testing.assert_array_equal(split.labels, labels[:10])
  # Bicubic with antialiasing, as the tf.data path's resize (to the grey level).
  want = tf.image.resize(images[:10, :, :, None].astype(np.float32), (16, 16), "bicubic",
                         antialias=True).numpy()
  assert np.abs(split.images.astype(float) - np.clip(np.rint(want), 0, 255)).max() <= 2
  with pytest.raises(errors.DataError, match="bad split"):
    device_input.load_split(_input(), "validation")
  with pytest.raises(errors.DataNotFoundError, match="not a local directory"):
    device_input.load_split(_input(dataset="folder:/no/such/folder"))


def test_image_folders_load_like_the_tfdata_path(tmp_path):
  """A class folder on the device path: the tf.data path's examples and labels in its
  order, undecodable files skipped, each image resized once (shorter side, bicubic, centre
  crop) close to TensorFlow's resize of the same file; grey folders keep one channel."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from lut_jax.data import datasets  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  smooth = lambda h, w: np.clip(  # noqa: E731  resizing is compared on smooth images
      tf.image.resize(rng.integers(0, 256, (h // 4, w // 4, 3)).astype(np.float32), (h, w),
                      "bilinear").numpy(), 0, 255).astype(np.uint8)
  root = tmp_path / "data" / "train"
  for cls, sizes in (("cat", [(16, 16), (24, 40)]), ("dog", [(32, 20), (16, 16), (48, 48)])):
    (root / cls).mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
      Image.fromarray(smooth(h, w)).save(root / cls / f"{i}.png")
  (root / "dog" / "broken.png").write_bytes(b"not a png")
  dataset = f"folder:{tmp_path / 'data'}"
  split = device_input.load_split(_input(dataset=dataset, image_size=16))
  assert split.images.shape == (5, 16, 16, 3) and split.images.dtype == np.uint8
  reference = datasets.get_source(dataset, "train")
  share = reference.share(0, 1)
  elements = [jax.tree.map(lambda t: t.numpy(), share.read(tf.constant(i, tf.int64)))
              for i in range(share.num_examples)]
  np.testing.assert_array_equal(split.labels, [e["label"] for e in elements])
  assert list(split.labels) == [0, 0, 1, 1, 1]
  for image, element in zip(split.images, elements):
    decoded = augment.decode(tf.constant(element["image"]), 3).numpy() * 255
    h, w = decoded.shape[:2]
    scale = 16 / min(h, w)
    new_h, new_w = max(16, int(h * scale)), max(16, int(w * scale))
    want = tf.image.resize(decoded, (new_h, new_w), "bicubic", antialias=True).numpy()
    top, left = round((new_h - 16) / 2), round((new_w - 16) / 2)
    want = np.clip(np.rint(want[top:top + 16, left:left + 16]), 0, 255)
    if (h, w) == (16, 16):
      np.testing.assert_array_equal(image, np.rint(decoded))  # no resize: the file's pixels
    assert np.abs(image.astype(float) - want).mean() < 0.5  # pillow vs TF bicubic
  grey = tmp_path / "grey"
  (grey / "a").mkdir(parents=True)
  Image.fromarray(smooth(16, 16)[..., 0]).save(grey / "a" / "0.png")
  assert device_input.load_split(_input(dataset=f"folder:{grey}", image_size=16)).images.shape \
      == (1, 16, 16, 1)
  with pytest.raises(errors.DataNotFoundError, match="no decodable images"):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    device_input.load_split(_input(dataset=f"folder:{tmp_path / 'empty'}", image_size=16))


def resume_scenario(workdir: str) -> None:
  """Trains 4 steps uninterrupted, and again with a crash after step 2 and a rerun; raises
  unless parameters, teacher and Adam state are bit-identical. Run by the test below in a
  one-device process (``python -c``)."""
  config = util.tiny_config(**{"input.backend": "device", "total_steps": 4,
                               "checkpoint_every_steps": 2})
  uninterrupted = jax.device_get(train.pretrain(config, os.path.join(workdir, "a")))

  def stop_after_two(start_step):  # the real device data, cut after step 2
    data = device_input.DeviceData(config.input, seed=config.seed,
                                   mesh=sharding.create_mesh(1))
    for step in range(start_step, 2):
      yield data.batch(step)
    raise RuntimeError("simulated crash")
  try:
    train.pretrain(config, os.path.join(workdir, "b"), data_fn=stop_after_two)
  except RuntimeError as e:
    assert "simulated crash" in str(e), e
  else:
    raise AssertionError("the first run did not stop")
  resumed = jax.device_get(train.pretrain(config, os.path.join(workdir, "b")))
  chex.assert_trees_all_equal(uninterrupted.params, resumed.params)
  chex.assert_trees_all_equal(uninterrupted.target_params, resumed.target_params)
  chex.assert_trees_all_equal(uninterrupted.opt_state, resumed.opt_state)


@needs_fashion_mnist
def test_resume_on_the_device_path_is_exact(tmp_path):
  # One CPU device, as a laptop run. On this suite's 8 fake host devices the device path's
  # step (all-to-all collectives) sometimes deadlocks inside XLA:CPU's in-process
  # collectives on a 2-core machine, and XLA aborts the whole worker after 40 s.
  env = util.one_device_env()
  code = ("from tests import test_device_input as t; "
          f"t.resume_scenario({str(tmp_path)!r}); print('EXACT')")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("EXACT")


def test_device_augment_with_the_device_backend_is_a_config_error():
  with pytest.raises(errors.ConfigError, match="device_augment"):
    device_input.check_backend(_input(device_augment=True))
  with pytest.raises(errors.ConfigError, match="backend"):
    device_input.check_backend(_input(backend="gpu"))


def test_tfds_splits_load_through_the_data_source_route(monkeypatch):
  """Any fixed-size tfds split reaches the device path through ``tfds.data_source``
  (array_record, no TensorFlow ops): tfds' own records and labels (slicing is tfds' own;
  its mock ignores it)."""
  device_input._load_split.cache_clear()  # pylint: disable=protected-access
  # The mock's records stand in for a prepared copy (only prepared data sets are opened).
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  with tfds.testing.mock_data(num_examples=12):
    records = tfds.data_source("mnist", split="train")
    want = np.stack([records[i]["image"] for i in range(len(records))])
    labels = [records[i]["label"] for i in range(len(records))]
    split = device_input.load_split(_input(dataset="mnist", image_size=28))
  assert "tfds.data_source" in split.description
  np.testing.assert_array_equal(split.images, want)
  np.testing.assert_array_equal(split.labels, labels)
  device_input._load_split.cache_clear()  # pylint: disable=protected-access
