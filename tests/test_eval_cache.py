"""Cached features and resumable eval checkpoints never outlive the encoder or input they
were computed for: a rerun in the same workdir with another encoder recomputes (kNN) or
refuses to resume (linear probe), an unchanged rerun reuses."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import knn as knn_config
from configs import linear_probe as lp_config
from lut_jax import errors
from lut_jax.evaluation import eval_config, features, knn, linear_probe
from lut_jax.models import vit
from lut_jax.weights import loading, sources

IMAGE, PATCH, WIDTH, DEPTH = 16, 4, 32, 2
ENCODER_CONFIG = {"image_size": IMAGE, "patch_size": PATCH, "width": WIDTH, "depth": DEPTH,
                  "num_heads": 2, "mlp_ratio": 4.0}
SIZES = {"train": 48, "test": 32}  # multiples of the batch: no padding


def tiny_encoder(seed: int) -> loading.Pretrained:
  encoder = vit.Encoder(**ENCODER_CONFIG)
  params = jax.jit(encoder.init)(jax.random.key(seed),
                                 jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
  return loading.Pretrained(encoder=encoder, params=params, channels=3,
                            source=f"random encoder {seed}")


@pytest.fixture
def reads(monkeypatch):
  """Replaces the eval images (both paths, and the tf.data pipeline itself) with a small
  synthetic split (a faint brightness offset per class: random encoders separate it, each
  to its own accuracy); returns the list of splits read, one entry per read."""
  from lut_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  calls = []

  def create_eval_dataset(input_config, split, *, batch_size, crop_pct=None, sharding=None):
    del crop_pct, sharding
    calls.append(split)
    rng = np.random.default_rng(0 if split == "train" else 1)
    n, size = SIZES[split], input_config.image_size
    labels = rng.integers(0, 3, n).astype(np.int32)
    images = (0.03 * (labels[:, None, None, None] - 1.0)
              + rng.normal(size=(n, size, size, input_config.channels))).astype(np.float32)
    return [{"image": images[i:i + batch_size], "label": labels[i:i + batch_size],
             "mask": np.ones(batch_size, bool)} for i in range(0, n, batch_size)]

  monkeypatch.setattr(input_pipeline, "create_eval_dataset", create_eval_dataset)
  monkeypatch.setattr(features, "eval_batches",
                      lambda input_config, split, backend, **kwargs: create_eval_dataset(
                          input_config, split, **kwargs))
  return calls


def knn_config_for_tests():
  config = knn_config.get_config()
  config.num_classes = 3
  config.knn.k = 5
  config.input.eval_batch_size = 16
  return config


def cached(workdir: str, split: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(workdir, "features", f"{split}.npz")) as data:
    return {k: data[k] for k in data.files}


def test_knn_in_a_reused_workdir_reports_the_new_encoder(tmp_path, reads):
  config = knn_config_for_tests()
  a, b = tiny_encoder(0), tiny_encoder(1)
  reused, fresh = str(tmp_path / "reused"), str(tmp_path / "fresh")
  first = knn.run(config, reused, pretrained=a)
  second = knn.run(config, reused, pretrained=b)
  expected = knn.run(config, fresh, pretrained=b)
  assert first != expected  # else this test could not tell the encoders apart
  assert second == expected
  for split in ("train", "test"):
    np.testing.assert_array_equal(cached(reused, split)["cls"], cached(fresh, split)["cls"])
  # The results name the encoder that produced them.
  saved = json.load(open(os.path.join(reused, "knn_results.json")))
  assert saved["source"]["params_sha256"] == b.fingerprint != a.fingerprint
  assert {k: v for k, v in saved.items() if k != "source"} == expected


def test_unchanged_rerun_reuses_the_cache_and_a_changed_input_recomputes(tmp_path, reads):
  config = knn_config_for_tests()
  a = tiny_encoder(0)
  workdir = str(tmp_path / "knn")
  first = knn.run(config, workdir, pretrained=a)
  assert reads == ["train", "test"]
  path = os.path.join(workdir, "features", "test.npz")
  mtime = os.stat(path).st_mtime_ns
  assert knn.run(config, workdir, pretrained=a) == first
  assert reads == ["train", "test"] and os.stat(path).st_mtime_ns == mtime
  # Any field that changes the features invalidates the cache.
  for field, value in (("crop_pct", 0.5), ("data_dir", str(tmp_path / "data"))):
    config.input[field] = value
    del reads[:]
    knn.run(config, workdir, pretrained=a)
    assert reads == ["train", "test"], field
  config.knn.pools = "cls"
  del reads[:]
  knn.run(config, workdir, pretrained=a)
  assert reads == ["train", "test"]


def test_features_of_the_other_path_are_recomputed_and_a_probe_on_them_not_resumed(
    tmp_path, reads):
  """The in-memory and tf.data paths agree to float tolerance, not bit for bit: a cache or
  a probe of one is not taken for the other's (nor is one from before the key named it)."""
  a = tiny_encoder(0)
  config = knn_config_for_tests()
  config.input.backend = "tfdata"
  workdir = str(tmp_path / "knn")
  knn.run(config, workdir, pretrained=a)
  config.input.backend = "device"
  del reads[:]
  knn.run(config, workdir, pretrained=a)
  assert reads == ["train", "test"]
  key = features.features_key(a, eval_config.input_config(config, a), "test",
                              pools=("cls", "mean"), crop_pct=1.0, backend="device")
  with np.load(os.path.join(workdir, "features", "test.npz")) as data:
    assert json.loads(str(data[features.CACHE_KEY])) == key
  probe = _tiny_probe_config()
  probe.input.backend = "tfdata"
  linear_probe.run(probe, str(tmp_path / "lp"), pretrained=a)
  probe.input.backend = "device"
  with pytest.raises(errors.WorkdirError, match="a different backend"):
    linear_probe.run(probe, str(tmp_path / "lp"), pretrained=a)


@pytest.mark.parametrize("content", ["old_format", "garbage"])
def test_a_cache_without_a_valid_key_is_recomputed(tmp_path, reads, content):
  config = knn_config_for_tests()
  a = tiny_encoder(0)
  expected = knn.run(config, str(tmp_path / "fresh"), pretrained=a)
  workdir = str(tmp_path / "knn")
  os.makedirs(os.path.join(workdir, "features"))
  for split, n in SIZES.items():
    path = os.path.join(workdir, "features", f"{split}.npz")
    if content == "old_format":  # what the cache held before it had a key
      np.savez(path, cls=np.zeros((n, WIDTH), np.float32),
               mean=np.zeros((n, WIDTH), np.float32), label=np.zeros(n, np.int32))
    else:
      with open(path, "wb") as f:
        f.write(b"not an npz")
  del reads[:]
  assert knn.run(config, workdir, pretrained=a) == expected
  assert reads == ["train", "test"]


def test_features_key_names_the_checkpoint_step(tmp_path):
  from tests import test_export  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / "run")
  test_export.make_pretraining_workdir(run)
  pretrained = loading.load(run, encoder_only=True)
  assert pretrained.path == os.path.abspath(run) and pretrained.step == test_export.STEP
  input_config = eval_config.input_config(knn_config_for_tests(), pretrained)
  key = features.features_key(pretrained, input_config, "test", pools=("cls",), crop_pct=1.0)
  assert key["pretrained"] == pretrained.path and key["step"] == test_export.STEP
  assert key["params_sha256"] == pretrained.fingerprint
  assert key["encoder"] == pretrained.config and key["split"] == "test"
  other_step = features.features_key(
      dataclasses.replace(pretrained, step=test_export.STEP + 1),
      input_config, "test", pools=("cls",), crop_pct=1.0)
  assert features.key_hash(other_step) != features.key_hash(key)


def _tiny_probe_config():
  """A 2-epoch linear probe of the 3-class synthetic split, one eval per epoch."""
  config = lp_config.get_config()
  config.num_classes = 3
  config.input.eval_batch_size = 16
  lp = config.linear_probe
  lp.epochs, lp.batch_size, lp.warmup_epochs, lp.eval_every_epochs = 2, 16, 1, 1
  return config


def test_linear_probe_refuses_to_resume_against_another_encoder(tmp_path, reads):
  config = _tiny_probe_config()
  a, b = tiny_encoder(0), tiny_encoder(1)
  workdir = str(tmp_path / "lp")
  first = linear_probe.run(config, workdir, pretrained=a)
  cache = os.path.join(workdir, "features", "train.npz")
  mtime = os.stat(cache).st_mtime_ns
  with pytest.raises(errors.WorkdirError, match="--workdir"):
    linear_probe.run(config, workdir, pretrained=b)
  # Nothing of the first run was lost: its checkpoint, features and results stay.
  assert os.stat(cache).st_mtime_ns == mtime
  assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))
  saved = json.load(open(os.path.join(workdir, "linear_probe_results.json")))
  assert saved["source"]["params_sha256"] == a.fingerprint
  # The same encoder resumes (after the last epoch: the same numbers).
  assert linear_probe.run(config, workdir, pretrained=a) == first
  # Checkpoints without a record (an older workdir) are not trusted either.
  os.remove(os.path.join(workdir, "checkpoints", sources.RESUME_KEY_FILE))
  with pytest.raises(errors.WorkdirError, match="no record"):
    linear_probe.run(config, workdir, pretrained=a)


def test_linear_probe_refuses_to_resume_under_another_recipe(tmp_path, reads):
  """An lr sweep in one workdir must not re-report the first run's finished state."""
  config = _tiny_probe_config()
  lp = config.linear_probe
  a = tiny_encoder(0)
  workdir = str(tmp_path / "lp")
  first = linear_probe.run(config, workdir, pretrained=a)
  for field, value in (("base_lr", 10 * lp.base_lr), ("epochs", 3)):
    other = config.copy_and_resolve_references()
    other.linear_probe[field] = value
    with pytest.raises(errors.WorkdirError, match=f"a different linear_probe.{field}"):
      linear_probe.run(other, workdir, pretrained=a)
  seeded = config.copy_and_resolve_references()
  seeded.seed = 1
  with pytest.raises(errors.WorkdirError, match="a different seed"):
    linear_probe.run(seeded, workdir, pretrained=a)
  # How often it evaluates is not part of the recipe: that rerun resumes the finished run.
  resumed = config.copy_and_resolve_references()
  resumed.linear_probe.eval_every_epochs = 2
  assert linear_probe.run(resumed, workdir, pretrained=a) == first
  # In a new workdir the other lr trains its own probe.
  other = config.copy_and_resolve_references()
  other.linear_probe.base_lr = 10 * lp.base_lr
  assert linear_probe.run(other, str(tmp_path / "lp2"), pretrained=a) != first
