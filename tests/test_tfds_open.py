"""Both input paths open tfds names alike: never downloading, one line when the data set is
not prepared (how to prepare it) or does not exist (which names are close)."""

import time

import ml_collections
import pytest

from lut_jax import errors
from lut_jax.data import device_input

tfds = pytest.importorskip("tensorflow_datasets")


def _open(backend: str, name: str, data_dir: str) -> None:
  if backend == "device":
    device_input.load_split(ml_collections.ConfigDict(dict(
        dataset=name, split="train", data_dir=data_dir, image_size=32, channels=3)))
  else:
    from lut_jax.data import datasets  # pylint: disable=g-import-not-at-top
    datasets.get_source(name, "train", data_dir)


def _line(error: errors.UserError) -> str:
  """What the command-line tools print."""
  return f"{error}; hint: {error.hint}" if error.hint else str(error)


@pytest.mark.parametrize("backend", ["device", "tfdata"])
def test_an_unprepared_tfds_data_set_is_one_line_and_nothing_is_downloaded(
    tmp_path, monkeypatch, backend):
  def offline(*args, **kwargs):
    # Offline, tfds retries a download for minutes before it fails: fail at once, so that
    # a download attempt shows as an error here rather than as a slow test.
    raise ConnectionError("this test allows no download")
  for method in ("download", "download_and_extract", "download_kaggle_data"):
    monkeypatch.setattr(tfds.download.DownloadManager, method, offline)
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  start = time.time()
  with pytest.raises(errors.DataNotFoundError) as info:
    _open(backend, "cifar10", str(data_dir))
  assert time.time() - start < 10
  line = _line(info.value)
  assert "\n" not in line and "'cifar10' is not prepared" in line, line
  assert "`tfds build cifar10 --data_dir=<data_dir>" in line, line
  assert ("--file_format=array_record" in line) == (backend == "device"), line
  assert not list(data_dir.iterdir())  # no incomplete.* folder, no *.tmp.* download


@pytest.mark.parametrize("backend", ["device", "tfdata"])
def test_an_unknown_tfds_name_says_so_and_names_close_ones(tmp_path, backend):
  with pytest.raises(errors.DataError) as info:
    _open(backend, "cifar1O", str(tmp_path))
  line = _line(info.value)
  assert "\n" not in line and "unknown dataset 'cifar1O'" in line, line
  assert "did you mean 'cifar10'" in line and "array_record" not in line, line
  assert not list(tmp_path.iterdir())
