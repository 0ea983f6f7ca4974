"""Tests of the data sources and input pipelines on real images.

Fashion-MNIST comes from Debian's idx files (skipped when absent), colour photos from
scikit-image, re-encoded as JPEGs into temporary folders, and a tiny tfds dataset built here
from the same photos exercises the tfds path offline.
"""

import logging
import os

import jax
import ml_collections
import numpy as np
import pytest
import skimage.data
import skimage.transform
import tensorflow as tf
import tensorflow_datasets as tfds

from lut_jax import config_lib
from lut_jax.data import augment, datasets, idx, image_utils, input_pipeline

FMNIST_DIR = idx.FASHION_MNIST_DIR
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST idx files absent (apt-get install dataset-fashion-mnist)")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera")
MEAN, STD = image_utils.IMAGENET_MEAN, image_utils.IMAGENET_STD


def _input_config(**overrides) -> ml_collections.ConfigDict:
  """A ``config.input`` with the fields of lut_jax.config_lib's, small and locked."""
  config = config_lib.base_config().input
  config.update(dict(
      dataset="fashion_mnist", split="train[:64]", image_size=28, channels=3,
      batch_size=8, shuffle_buffer=64))
  config.update(overrides)
  return config.lock()


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _photo_variants(count: int):
  """``count`` real RGB images of varied sizes: crops/rescales of scikit-image photos."""
  rng = np.random.default_rng(0)
  for i in range(count):
    image = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image = image[y:y + ch, x:x + cw]
    scale = rng.uniform(0.3, 0.8)
    image = skimage.transform.rescale(image, scale, channel_axis=-1, anti_aliasing=True)
    yield (image * 255).round().astype(np.uint8)


def _write_folder(root, per_class: int = 5, classes=("cats", "dogs")):
  i = 0
  for cls in classes:
    os.makedirs(os.path.join(root, cls), exist_ok=True)
  for image in _photo_variants(per_class * len(classes)):
    cls = classes[i % len(classes)]
    tf.io.write_file(os.path.join(root, cls, f"img_{i:03d}.jpg"),
                     tf.io.encode_jpeg(tf.constant(image), quality=90))
    i += 1
  return root


# ----------------------------------------------------------------------------- tiny tfds set


class LutTinyImages(tfds.core.GeneratorBasedBuilder):
  """24 real photos (varied sizes, 3 classes): the tfds path, offline."""

  VERSION = tfds.core.Version("1.0.0")
  # No download checksums to look up. (tfds would find them next to the builder's code via
  # etils.epath, which imports importlib_resources: not installed by tfds on Python 3.11.)
  url_infos = None

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(24), "test": self._generate_examples(7)}

  def _generate_examples(self, n):
    for i, image in enumerate(_photo_variants(n)):
      yield i, {"image": image, "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  LutTinyImages(data_dir=data_dir).download_and_prepare()
  return data_dir


# ----------------------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
def test_pretrain_batches_shapes_ranges_and_grey_channels():
  it = input_pipeline.create_pretrain_iterator(_input_config(), seed=0)
  assert it.num_examples == 64 and it.steps_per_epoch == 8 and it.num_skipped == 0
  batch = next(it)
  assert set(batch) == {"view1", "view2"}
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  for view in batch.values():
    assert view.shape == (8, 28, 28, 3) and view.dtype == np.float32
    assert np.all(view >= lo - 1e-5) and np.all(view <= hi + 1e-5)
    raw = view * STD + MEAN  # grey source replicated to RGB: channels stay equal
    np.testing.assert_allclose(raw[..., 0], raw[..., 1], atol=1e-5)
    np.testing.assert_allclose(raw[..., 1], raw[..., 2], atol=1e-5)
  assert not np.allclose(batch["view1"], batch["view2"])


@needs_fmnist
def test_one_channel_output():
  it = input_pipeline.create_pretrain_iterator(_input_config(channels=1), seed=0)
  batch = next(it)
  mean, std = image_utils.normalization_constants(1)
  for view in batch.values():
    assert view.shape == (8, 28, 28, 1)
    raw = view * std[0] + mean[0]
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5


@needs_fmnist
def test_views_are_reproducible_for_a_seed():
  config = _input_config()
  a = _take(input_pipeline.create_pretrain_iterator(config, seed=3), 3)
  b = _take(input_pipeline.create_pretrain_iterator(config, seed=3), 3)
  c = _take(input_pipeline.create_pretrain_iterator(config, seed=4), 3)
  for x, y, z in zip(a, b, c):
    for k in ("view1", "view2"):
      np.testing.assert_array_equal(x[k], y[k])
      assert not np.array_equal(x[k], z[k])


@needs_fmnist
@pytest.mark.parametrize("device_augment", [False, True])
def test_one_view_stream_is_view1_of_the_two_view_stream(device_augment):
  config = _input_config(device_augment=device_augment)
  one = _take(input_pipeline.create_pretrain_iterator(config, seed=3, two_views=False), 2)
  two = _take(input_pipeline.create_pretrain_iterator(config, seed=3), 2)
  for a, b in zip(one, two):
    assert len(a) == 1  # the MAE baseline gets (and transfers) view 1 only
    key = next(iter(a))
    np.testing.assert_array_equal(a[key], b[key])


def test_epochs_cover_each_example_once_in_new_orders():
  config = _input_config(split="train[:40]")  # 5 steps of 8 per epoch
  it = input_pipeline.create_pretrain_iterator(config, seed=0, with_ids=True)
  ids = np.stack([b["id"] for b in _take(it, 10)]).reshape(2, 40)
  for epoch in ids:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(40))
  assert not np.array_equal(ids[0], ids[1])


@needs_fmnist
@pytest.mark.parametrize("split", ["train[:40]", "train[:43]"])  # 43: remainder dropped
def test_resume_reproduces_the_uninterrupted_batches(split):
  config = _input_config(split=split)
  full = _take(input_pipeline.create_pretrain_iterator(config, seed=7, with_ids=True), 13)
  for start in (3, 5, 11):  # mid-epoch, an epoch boundary, a later epoch
    it = input_pipeline.create_pretrain_iterator(config, seed=7, start_step=start,
                                                 with_ids=True)
    assert it.step == start
    for expected in full[start:start + 2]:
      got = next(it)
      for k in ("id", "view1", "view2"):
        np.testing.assert_array_equal(got[k], expected[k])


@needs_fmnist
def test_two_processes_get_disjoint_covering_shares():
  config = _input_config(split="train[:43]")  # shares of 22 and 21
  source = datasets.source_for(config)
  shares = [source.share(p, 2) for p in range(2)]
  assert [s.num_examples for s in shares] == [22, 21]
  ids = [{int(shares[p].read(tf.constant(i))["id"]) for i in range(shares[p].num_examples)}
         for p in range(2)]
  assert not ids[0] & ids[1] and ids[0] | ids[1] == set(range(43))

  # Pipelines: global batch 8 = 4 per process; both have (43 // 2) // 4 = 5 steps/epoch.
  iters = [input_pipeline.create_pretrain_iterator(
      config, seed=0, process_index=p, process_count=2, with_ids=True) for p in range(2)]
  assert [it.steps_per_epoch for it in iters] == [5, 5]
  epoch = [np.concatenate([b["id"] for b in _take(it, 5)]) for it in iters]
  assert all(len(set(e)) == 20 for e in epoch)
  assert not set(epoch[0]) & set(epoch[1])
  assert set(epoch[0]) <= ids[0] and set(epoch[1]) <= ids[1]


@needs_fmnist
def test_a_step_holds_other_examples_on_another_process_count():
  """Why a tf.data run must resume on its own process count (run_identity.check_input_record):
  the global batch of the same step is made of other examples."""
  config = _input_config(split="train[:48]")
  one = _take(input_pipeline.create_pretrain_iterator(config, seed=0, with_ids=True), 4)
  two = [_take(input_pipeline.create_pretrain_iterator(
      config, seed=0, process_index=p, process_count=2, with_ids=True), 4) for p in range(2)]
  for step in range(4):
    global_two = np.concatenate([two[0][step]["id"], two[1][step]["id"]])
    assert set(one[step]["id"]) != set(global_two)


@needs_fmnist
def test_sharded_global_batches_match_numpy():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  config = _input_config(batch_size=16)
  sharded = _take(input_pipeline.create_pretrain_iterator(config, seed=1, sharding=sharding),
                  2)
  local = _take(input_pipeline.create_pretrain_iterator(config, seed=1), 2)
  for s, l in zip(sharded, local):
    for k in ("view1", "view2"):
      assert isinstance(s[k], jax.Array) and s[k].shape == (16, 28, 28, 3)
      assert s[k].sharding == sharding
      np.testing.assert_array_equal(np.asarray(s[k]), l[k])


@needs_fmnist
def test_eval_dataset_labels_padding_and_mask():
  images, labels = idx.load_fashion_mnist(FMNIST_DIR, "test")
  ev = input_pipeline.create_eval_dataset(_input_config(), "test[:50]", batch_size=16,
                                          crop_pct=1.0)
  batches = list(ev)
  assert len(batches) == len(ev) == 4 and ev.num_examples == 50 and ev.num_classes == 10
  image = np.concatenate([b["image"] for b in batches])
  label = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert image.shape == (64, 28, 28, 3) and image.dtype == np.float32
  assert label.dtype == np.int32 and mask.dtype == bool
  assert mask.sum() == 50 and not mask[50:].any()
  np.testing.assert_array_equal(label[:50], labels[:50])
  assert (label[50:] == -1).all()
  # crop_pct 1 at the native 28 px: the image itself, normalised.
  np.testing.assert_allclose(image[:50] * STD + MEAN,
                             np.repeat(images[:50, ..., None], 3, -1) / 255.0, atol=1e-5)
  assert len(list(ev)) == 4  # re-iterable


def test_eval_view_crops_by_size_as_the_reference(tmp_path):
  """The default eval crop (-1) is the reference's: shorter side to S / 0.875 and a centre
  crop up to 224 px, the whole image (shorter side to S) above, e.g. at 384 px."""
  from lut_jax.evaluation import eval_config  # pylint: disable=g-import-not-at-top
  assert {p.crop_pct for n, p in eval_config.PRESETS.items() if n != "fashion_mnist"} == {-1}
  for size, expected in ((28, 224 / 256), (224, 224 / 256), (240, 1.0), (384, 1.0)):
    assert image_utils.eval_crop_pct(size) == image_utils.eval_crop_pct(size, -1) == expected
  assert image_utils.eval_crop_pct(384, 0.9) == 0.9  # a given crop wins
  photo = skimage.data.astronaut()[:300, :260]  # 300 x 260: the shorter side is 260
  os.makedirs(tmp_path / "a")
  tf.io.write_file(str(tmp_path / "a" / "x.png"), tf.io.encode_png(photo))
  config = _input_config(dataset=f"folder:{tmp_path}", image_size=240)
  got = next(iter(input_pipeline.create_eval_dataset(config, "train", batch_size=1,
                                                     crop_pct=-1)))["image"][0]
  image = tf.image.convert_image_dtype(tf.constant(photo), tf.float32)
  for crop_pct, same in ((1.0, True), (224 / 256, False)):
    expected = augment.eval_view(image, 240, crop_pct).numpy()
    assert np.allclose(got, expected, atol=1e-6) == same


@needs_fmnist
def test_eval_two_processes_same_batch_count_covering():
  ev = [input_pipeline.create_eval_dataset(_input_config(), "test[:45]", batch_size=16,
                                           process_index=p, process_count=2)
        for p in range(2)]
  assert ev[0].num_batches == ev[1].num_batches == 3  # ceil(ceil(45 / 2) / 8)
  counts = [sum(int(b["mask"].sum()) for b in e) for e in ev]
  assert counts == [23, 22]
  for e in ev:
    assert all(b["image"].shape == (8, 28, 28, 3) for b in e)


@needs_fmnist
def test_num_examples_and_steps_per_epoch():
  config = _input_config(split="train", batch_size=128)
  assert datasets.num_examples(config) == 60_000
  source = datasets.source_for(config)
  assert input_pipeline.epoch_steps(source, 1, 128) == 468
  assert input_pipeline.epoch_steps(source, 2, 64) == 468
  assert datasets.num_examples(_input_config(split="test[:10%]")) == 1000


# ----------------------------------------------------------------------------- errors


def test_clear_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="divisible by the number of processes"):
    input_pipeline.create_pretrain_iterator(_input_config(batch_size=10), seed=0,
                                            process_index=0, process_count=4)
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
    input_pipeline.create_pretrain_iterator(_input_config(dataset="no_such_dataset"), seed=0)
  for size in (0, 7):
    with pytest.raises(ValueError, match="image_size"):
      input_pipeline.create_pretrain_iterator(_input_config(image_size=size), seed=0)
  with pytest.raises(ValueError, match="channels"):
    input_pipeline.create_pretrain_iterator(_input_config(channels=2), seed=0)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    datasets.get_source(f"folder:{tmp_path}/missing", "train")
  with pytest.raises(FileNotFoundError, match="no images"):
    datasets.get_source(f"folder:{tmp_path}", "train")
  with pytest.raises(FileNotFoundError, match="manual download"):
    datasets.get_source("imagenet2012", "train", str(tmp_path))
  # Fashion-MNIST absent everywhere: the message says how to get it.
  monkeypatch.setattr(idx, "FASHION_MNIST_DIR", str(tmp_path / "none"))
  monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    datasets.get_source("fashion_mnist", "train", str(tmp_path / "tfds"))


@needs_fmnist
def test_dataset_smaller_than_a_batch():
  with pytest.raises(ValueError, match="fewer than one batch"):
    input_pipeline.create_pretrain_iterator(_input_config(split="train[:5]"), seed=0)
  with pytest.raises(ValueError, match="bad split"):
    datasets.get_source("fashion_mnist", "validation")


# ----------------------------------------------------------------------------- folders


def test_folder_with_corrupt_jpeg_skips_and_counts(tmp_path, caplog):
  root = _write_folder(str(tmp_path / "photos"))
  good = tf.io.read_file(os.path.join(root, "cats", "img_000.jpg")).numpy()
  (tmp_path / "photos" / "dogs" / "broken.jpg").write_bytes(b"not a jpeg at all" * 10)
  (tmp_path / "photos" / "cats" / "truncated.jpg").write_bytes(good[:len(good) // 3])
  (tmp_path / "photos" / "cats" / "notes.txt").write_text("ignored: not an image name")
  config = _input_config(dataset=f"folder:{root}", split="train", image_size=224,
                         batch_size=4)
  with caplog.at_level(logging.WARNING):
    it = input_pipeline.create_pretrain_iterator(config, seed=0, with_ids=True)
  assert it.num_skipped == 2 and it.num_examples == 10
  assert "skipping 2 of 12 files" in caplog.text
  assert it.source.num_classes == 2
  batches = _take(it, 6)  # more than an epoch (2 steps): crosses an epoch boundary
  for b in batches:
    assert b["view1"].shape == (4, 224, 224, 3) and b["view2"].shape == (4, 224, 224, 3)
    assert np.isfinite(b["view2"]).all()
  assert set(np.concatenate([b["id"] for b in batches[:2]])) <= set(range(10))

  ev = input_pipeline.create_eval_dataset(config, "train", batch_size=4)
  labels = np.concatenate([b["label"][b["mask"]] for b in ev])
  np.testing.assert_array_equal(labels, [0] * 5 + [1] * 5)  # sorted: cats, then dogs


def test_folder_with_split_subfolders(tmp_path):
  _write_folder(str(tmp_path / "data" / "train"), per_class=3)
  _write_folder(str(tmp_path / "data" / "val"), per_class=2)
  train = datasets.get_source(f"folder:{tmp_path}/data", "train")
  val = datasets.get_source(f"folder:{tmp_path}/data", "val")
  assert (train.num_examples, val.num_examples) == (6, 4)
  assert datasets.get_source(f"folder:{tmp_path}/data", "train[:50%]").num_examples == 3


# ----------------------------------------------------------------------------- tfds


def test_tfds_source_pipeline_resume_and_shares(tfds_dir):
  config = _input_config(dataset="lut_tiny_images", split="train", data_dir=tfds_dir,
                         image_size=32, batch_size=4, shuffle_buffer=8)
  source = datasets.source_for(config)
  assert source.num_examples == 24 and source.num_classes == 3
  # Shares of two processes: read every record of each; ids disjoint, 24 in all.
  share_ids = [{int(e["id"]) for e in source.share(p, 2).read().as_numpy_iterator()}
               for p in range(2)]
  assert len(share_ids[0]) == len(share_ids[1]) == 12
  assert not share_ids[0] & share_ids[1]

  full = _take(input_pipeline.create_pretrain_iterator(config, seed=5, with_ids=True), 9)
  assert full[0]["view1"].shape == (4, 32, 32, 3)
  epoch0 = np.concatenate([b["id"] for b in full[:6]])
  assert set(epoch0) == share_ids[0] | share_ids[1]  # 6 steps of 4: the whole split
  epoch1 = np.concatenate([b["id"] for b in full[6:9]])
  assert not np.array_equal(epoch1, epoch0[:12])  # each epoch has its own shuffle
  resumed = input_pipeline.create_pretrain_iterator(config, seed=5, start_step=4,
                                                    with_ids=True)
  for expected in full[4:9]:
    got = next(resumed)
    for k in ("id", "view1", "view2"):
      np.testing.assert_array_equal(got[k], expected[k])

  ev = input_pipeline.create_eval_dataset(config, "test", batch_size=4)
  labels = np.concatenate([b["label"][b["mask"]] for b in ev])
  assert len(ev) == 2 and sorted(labels.tolist()) == sorted([i % 3 for i in range(7)])
