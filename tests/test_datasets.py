"""Tests of the data sources' guarantees: image folders with symbolic links (loops, second
copies, folders linked in from elsewhere), the summary line, errors as one ``DataError``,
and files that go bad after the source was built.

Every PNG written here carries its identity in its first pixel (red: class code, green:
index), so a test can tell from an example's bytes alone which file it came from and check
the label it was given.
"""

import gzip
import logging
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from lut_jax import config_lib, errors
from lut_jax.data import datasets, folders, idx, input_pipeline

# Class codes (the red channel); a class's label is its rank among the sorted folder names.
CODES = {"birds": 10, "cats": 20, "dogs": 30, "fish": 40}


def _input_config(root, **overrides) -> ml_collections.ConfigDict:
  config = config_lib.base_config().input
  config.update(dict(
      dataset=f"folder:{root}", split="train", image_size=16, channels=3, batch_size=4,
      shuffle_buffer=16))
  config.update(overrides)
  return config.lock()


def _write_pngs(folder, cls: str, count: int, start: int = 0) -> list[str]:
  """``count`` 8x8 PNGs of class ``cls`` in ``folder``; pixel (0, 0) = (code, index, 0)."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(start, start + count):
    pixels = np.full((8, 8, 3), 128, np.uint8)
    pixels[0, 0] = (CODES[cls], i, 0)
    path = os.path.join(folder, f"{cls}_{i:02d}.png")
    Image.fromarray(pixels).save(path)
    paths.append(path)
  return paths


def _tree(root, per_class: int = 4, classes=("cats", "dogs")) -> str:
  for cls in classes:
    _write_pngs(os.path.join(root, cls), cls, per_class)
  return str(root)


def _examples(source: datasets.DataSource) -> list[tuple[int, int, int]]:
  """``(class code, index, label)`` of every example of the source, from its pixels."""
  share = source.share(0, 1)
  out = []
  for position in range(share.num_examples):
    element = share.read(tf.constant(position, tf.int64))
    pixel = element["image"].numpy()[0, 0]  # folder files come decoded
    out.append((int(pixel[0]), int(pixel[1]), int(element["label"])))
  return out


def _check_labels(source: datasets.DataSource, classes: list[str]) -> list[tuple[int, int]]:
  """Asserts each example has its own class folder's label and no file is read twice;
  returns the ``(code, index)`` identities."""
  examples = _examples(source)
  label_of_code = {CODES[c]: i for i, c in enumerate(classes)}
  for code, index, label in examples:
    assert label == label_of_code[code], (code, index, label)
  identities = [(code, index) for code, index, _ in examples]
  assert len(set(identities)) == len(identities), "a file was read twice"
  return identities


# ----------------------------------------------------------------------------- splits


def _split_tree(root) -> str:
  """train/{birds,cats,dogs} and val/{birds,dogs}: val lacks a class."""
  for cls in ("birds", "cats", "dogs"):
    _write_pngs(os.path.join(root, "train", cls), cls, 2)
  for cls in ("birds", "dogs"):
    _write_pngs(os.path.join(root, "val", cls), cls, 2, start=10)
  return str(root)


@pytest.mark.parametrize("backend", ["tfdata", "device"])
def test_every_split_of_a_folder_is_labelled_by_the_train_classes(tmp_path, backend):
  """val/dogs is class 2 as train/dogs is, although it is val's second folder."""
  root = _split_tree(tmp_path / "data")
  if backend == "tfdata":
    source = datasets.get_source(f"folder:{root}", "val")
    assert source.num_classes == 3
    _check_labels(source, ["birds", "cats", "dogs"])
  else:
    from lut_jax.data import device_input  # pylint: disable=g-import-not-at-top
    split = device_input.load_split(
        _input_config(root, split="val", backend="device", image_size=8))  # no resize
    assert sorted(split.labels.tolist()) == [0, 0, 2, 2]
    assert split.images[split.labels == 2][:, 0, 0, 0].tolist() == [CODES["dogs"]] * 2
  os.makedirs(os.path.join(root, "val", "eels"))
  _write_pngs(os.path.join(root, "val", "eels"), "fish", 1)
  with pytest.raises(errors.DataError, match=r"class folders the train split does not have: "
                                             r"\['eels'\]"):
    if backend == "tfdata":  # another split string: sources are cached by it
      datasets.get_source(f"folder:{root}", "val[:5]")
    else:
      device_input.load_split(_input_config(root, split="val[:5]", backend="device"))


def test_two_split_names_that_both_read_the_whole_folder_are_refused(tmp_path):
  """Classes directly under the folder: every split is the whole folder (a released
  evaluation set's layout), so a run that fits on `train` and scores on `test` would score
  its own images; slices of one split are the user's hold-out."""
  flat = _tree(tmp_path / "flat")
  assert datasets.get_source(f"folder:{flat}", "test").num_examples == 8  # one split: fine
  with pytest.raises(errors.DataError, match=r"input.train_split='train' and "
                                             r"input.eval_split='test\[:4\]' of folder:.* "
                                             r"are the same images"):
    folders.check_distinct_splits(f"folder:{flat}", {"input.train_split": "train",
                                                      "input.eval_split": "test[:4]"})
  folders.check_distinct_splits(f"folder:{flat}", {"bank": "train[:50%]",
                                                    "queries": "train[50%:]"})
  split_root = _split_tree(tmp_path / "split")  # train/ and val/: two sets of images
  folders.check_distinct_splits(f"folder:{split_root}", {"train": "train", "eval": "val"})


# ----------------------------------------------------------------------------- symlinks


@pytest.mark.parametrize("link, target", [
    ("cats/loop", "."),             # a class sub-folder linking back to the data folder
    ("cats/again", "cats"),         # a folder linking to itself
    ("cats/deep/up", "cats"),       # a loop two levels down
    ("cats/to_dogs", "dogs"),       # a second copy of another class, under the wrong label
    ("everything", "."),            # a "class" folder that is the data folder itself
    ("kitty", "cats"),              # a class folder that is an alias of another one
])
def test_folder_links_into_the_tree_are_skipped_with_a_warning(tmp_path, caplog, link,
                                                                target):
  root = _tree(tmp_path / "data")
  os.makedirs(os.path.dirname(os.path.join(root, link)), exist_ok=True)
  os.symlink(os.path.join(root, target), os.path.join(root, link),
             target_is_directory=True)
  with caplog.at_level(logging.WARNING):
    source = datasets.get_source(f"folder:{root}", "train")
  assert source.num_examples == 8 and source.num_classes == 2
  assert sorted(_check_labels(source, ["cats", "dogs"])) == (
      [(20, i) for i in range(4)] + [(30, i) for i in range(4)])
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("1 directory link" in w and os.path.join(root, link) in w for w in warnings), (
      warnings)


def test_class_folders_linked_in_from_elsewhere_are_followed(tmp_path, caplog):
  # The common layout: class folders of a big data set linked into a training folder.
  root = _tree(tmp_path / "data")
  _write_pngs(tmp_path / "elsewhere" / "birds", "birds", 3)
  os.symlink(tmp_path / "elsewhere" / "birds", os.path.join(root, "birds"))
  # A loop inside the linked-in tree is not followed either.
  os.symlink(tmp_path / "elsewhere" / "birds", tmp_path / "elsewhere" / "birds" / "self")
  with caplog.at_level(logging.WARNING):
    source = datasets.get_source(f"folder:{root}", "train")
  assert source.num_examples == 11 and source.num_classes == 3
  ids = _check_labels(source, ["birds", "cats", "dogs"])
  assert sorted(ids)[:3] == [(10, 0), (10, 1), (10, 2)]
  assert "birds/self" in caplog.text


def test_two_class_folders_linked_to_the_same_folder_read_it_once(tmp_path):
  root = _tree(tmp_path / "data")
  _write_pngs(tmp_path / "elsewhere" / "birds", "birds", 3)
  os.symlink(tmp_path / "elsewhere" / "birds", os.path.join(root, "birds"))
  os.symlink(tmp_path / "elsewhere" / "birds", os.path.join(root, "fish"))
  source = datasets.get_source(f"folder:{root}", "train")
  assert source.num_examples == 11 and source.num_classes == 3
  _check_labels(source, ["birds", "cats", "dogs"])


def test_file_links_are_read_once_and_the_real_file_keeps_its_label(tmp_path, caplog):
  root = _tree(tmp_path / "data")
  # "cats/a_..." sorts before the real file's listing (dogs/): the real file still wins.
  os.symlink(os.path.join(root, "dogs", "dogs_00.png"),
             os.path.join(root, "cats", "a_copy_of_a_dog.png"))
  os.symlink(os.path.join(root, "cats", "cats_01.png"),
             os.path.join(root, "cats", "z_same_class.png"))
  # A file linked in from outside the tree is an example like any other.
  (extra,) = _write_pngs(tmp_path / "elsewhere", "cats", 1, start=9)
  os.symlink(extra, os.path.join(root, "cats", "linked_in.png"))
  with caplog.at_level(logging.WARNING):
    source = datasets.get_source(f"folder:{root}", "train")
  assert source.num_examples == 9 and source.num_skipped == 2
  ids = _check_labels(source, ["cats", "dogs"])
  assert (20, 9) in ids
  assert "2 files listed twice" in caplog.text and "a_copy_of_a_dog.png" in caplog.text


def test_a_folder_without_links_is_listed_in_the_same_order_as_through_gfile(tmp_path):
  # Example ids are positions in this order: a resumed run relies on it staying put.
  root = _tree(tmp_path / "data", per_class=2, classes=("cats", "dogs", "fish"))
  for sub in ("a", "a-b", "a/b", "a/b/c", "A", "z"):
    _write_pngs(os.path.join(root, "cats", sub), "cats", 1, start=len(sub))
  _write_pngs(os.path.join(root, "dogs", "x", "y"), "dogs", 2, start=5)
  (tmp_path / "data" / "fish" / "readme.txt").write_text("not an image")
  local, gfile = folders.list_local_folder(root), datasets._list_folder(root)
  assert (local.classes, local.files, local.labels) == (
      gfile.classes, gfile.files, gfile.labels)
  assert len(local.files) == 6 + 6 + 2
  assert not (local.links or local.duplicates or local.unreadable)


def test_a_loop_never_multiplies_the_examples_with_split_sub_folders(tmp_path):
  _tree(tmp_path / "data" / "train")
  os.symlink(tmp_path / "data", tmp_path / "data" / "train" / "dogs" / "up")
  source = datasets.get_source(f"folder:{tmp_path / 'data'}", "train")
  assert source.num_examples == 8
  _check_labels(source, ["cats", "dogs"])


# ----------------------------------------------------------------------------- summary line


def test_one_summary_line_when_a_source_is_built(tmp_path, caplog):
  root = _tree(tmp_path / "data")
  (tmp_path / "data" / "dogs" / "broken.png").write_bytes(b"not a png" * 10)
  os.symlink(os.path.join(root, "cats"), os.path.join(root, "dogs", "loop"))
  with caplog.at_level(logging.INFO, logger="absl"):  # other tests may quiet absl
    datasets.get_source(f"folder:{root}", "train[:75%]")
    # The same source however it is asked for: built (and checked, and logged) once.
    datasets.source_for(_input_config(root, split="train[:75%]"))
  lines = [r.getMessage() for r in caplog.records
           if r.levelno == logging.INFO and r.getMessage().startswith("Data set ")]
  assert len(lines) == 1, lines
  line = lines[0]
  for part in (f"folder:{root}", "split 'train[:75%]'", "2 classes", "6 examples",
               "1 undecodable", "1 directory link"):
    assert part in line, line


# ----------------------------------------------------------------------------- errors


def test_data_errors_are_one_data_error(tmp_path, monkeypatch):
  cases = {
      "not a directory": lambda: datasets.get_source(f"folder:{tmp_path}/missing", "train"),
      "no images": lambda: datasets.get_source(f"folder:{tmp_path}", "train"),
      "unknown dataset": lambda: datasets.get_source("no_such_dataset", "train"),
  }
  for match, build in cases.items():
    with pytest.raises(errors.DataError, match=match) as info:
      build()
    assert "\n" not in str(info.value)
  # Missing data stays a FileNotFoundError too, for callers that catch that.
  with pytest.raises(FileNotFoundError):
    datasets.get_source(f"folder:{tmp_path}/missing", "train")

  bad = tmp_path / "bad"
  os.makedirs(bad / "cats")
  (bad / "cats" / "x.png").write_bytes(b"garbage")
  with pytest.raises(errors.DataError, match="could be decoded"):
    datasets.get_source(f"folder:{bad}", "train")

  good = _tree(tmp_path / "good")
  with pytest.raises(errors.DataError, match="bad split"):
    datasets.get_source(f"folder:{good}", "train[:half]")
  with pytest.raises(errors.DataError, match="selects no examples"):
    datasets.get_source(f"folder:{good}", "train[:0]")

  monkeypatch.setattr(idx, "FASHION_MNIST_DIR", str(tmp_path / "none"))
  monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
  with pytest.raises(errors.DataError, match="Fashion-MNIST not found") as info:
    datasets.get_source("fashion_mnist", "train", str(tmp_path / "tfds"))
  assert info.value.hint and isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("content, match", [
    (None, "bad idx magic"),             # a valid gzip of the wrong idx file
    (b"not gzip at all", "not a valid gzip"),
])
def test_bad_fashion_mnist_idx_files_are_a_data_error(tmp_path, monkeypatch, content, match):
  idx = tmp_path / "idx"
  os.makedirs(idx)
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
    data = content if content is not None else gzip.compress(
        (2049).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"\0")
    (idx / name).write_bytes(data)
  monkeypatch.setenv("FASHION_MNIST_DIR", str(idx))
  with pytest.raises(errors.DataError, match=match) as info:
    datasets.get_source("fashion_mnist", "train", str(tmp_path / "tfds"))
  assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_a_folder_smaller_than_one_batch_is_a_data_error(tmp_path):
  root = _tree(tmp_path / "data", per_class=3)  # 6 images
  with pytest.raises(errors.DataError, match="6 examples.*one batch of 8") as info:
    input_pipeline.create_pretrain_iterator(_input_config(root, batch_size=8), seed=0)
  assert f"folder:{root}" in str(info.value) and info.value.hint


def test_an_empty_eval_split_is_a_data_error(tmp_path):
  root = _tree(tmp_path / "data")
  with pytest.raises(errors.DataError, match="selects no examples"):
    input_pipeline.create_eval_dataset(_input_config(root), "train[8:]", batch_size=4)


# ----------------------------------------------------------------------------- files gone bad


def _spoil(path: str, how: str) -> None:
  if how == "deleted":
    os.remove(path)
  else:
    with open(path, "wb") as f:
      f.write(b"this is no longer a PNG" * 4)


@pytest.mark.parametrize("how", ["deleted", "corrupted"])
def test_a_file_gone_bad_mid_run_is_named(tmp_path, how):
  root = _tree(tmp_path / "data")
  config = _input_config(root)
  it = input_pipeline.create_pretrain_iterator(config, seed=0)
  next(it)
  victim = os.path.join(root, "dogs", "dogs_02.png")
  _spoil(victim, how)
  # A fresh iterator on the cached source: the source was checked before the file went bad.
  it = input_pipeline.create_pretrain_iterator(config, seed=0)
  with pytest.raises(errors.DataError, match="dogs_02.png") as info:
    for _ in range(2 * it.steps_per_epoch):  # every file is read in an epoch
      next(it)
  assert "\n" not in str(info.value) and info.value.hint


@pytest.mark.parametrize("how", ["deleted", "corrupted"])
def test_a_file_gone_bad_during_evaluation_is_named(tmp_path, how):
  root = _tree(tmp_path / "data")
  ev = input_pipeline.create_eval_dataset(_input_config(root), "train", batch_size=4)
  _spoil(os.path.join(root, "cats", "cats_03.png"), how)
  with pytest.raises(errors.DataError, match="cats_03.png"):
    list(ev)
