"""The pre-training monitor: effective rank against numpy, kNN and collapse indicators
against a separate extraction and a numpy kNN."""

import jax
import numpy as np
import pytest

from lut_jax.data import device_input, idx
from lut_jax.evaluation import features
from lut_jax.pretrain import build, monitor
from lut_jax.runtime import sharding
from tests import util


def _numpy_effective_rank(x):
  s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
  p = s / s.sum() + 1e-7
  return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_against_numpy_and_limits():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 16)) * np.linspace(0.1, 3, 16)
  assert float(monitor.effective_rank(x)) == pytest.approx(_numpy_effective_rank(x), rel=1e-4)
  # d equal singular values -> d; one direction -> 1.
  equal = np.concatenate([np.eye(8), -np.eye(8)]) * 5.0
  assert float(monitor.effective_rank(equal)) == pytest.approx(8.0, rel=1e-4)
  line = rng.normal(size=(200, 1)) * rng.normal(size=(1, 16))
  assert float(monitor.effective_rank(line)) == pytest.approx(1.0, abs=1e-3)


def _numpy_knn_top1(bank, bank_labels, queries, labels, k=20, t=0.07, classes=10):
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  sims = queries @ bank.T
  top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  votes = np.zeros((len(queries), classes))
  for i, row in enumerate(top):
    np.add.at(votes[i], bank_labels[row], np.exp(sims[i, row] / t))
  return 100.0 * np.mean(votes.argmax(axis=1) == labels)


@pytest.mark.skipif(idx.find_fashion_mnist() is None, reason="Fashion-MNIST not installed")
def test_monitor_matches_a_separate_extraction():
  config = util.tiny_config(**{"monitor.every_steps": 1, "monitor.bank_split": "train[:300]",
                               "monitor.query_split": "test[:100]"})
  training = build.build_training(config, sharding.create_mesh(1), total_steps=4,
                                  warmup_steps=1)
  state = training.init(jax.random.key(0))
  got = monitor.Monitor(config)(training.model, state)

  bank = device_input.load_split(config.input, "train[:300]")
  queries = device_input.load_split(config.input, "test[:100]")
  encoder = training.model.bind({"params": state.params}).encoder.clone(parent=None)
  extract = features.make_feature_fn(encoder)
  view = lambda split: np.asarray(device_input.eval_images(split.images, 3))  # noqa: E731
  f_bank = jax.device_get(extract(state.params["encoder"], view(bank)))
  f_query = jax.device_get(extract(state.params["encoder"], view(queries)))
  for pool in ("cls", "mean"):
    want = _numpy_knn_top1(f_bank[pool], bank.labels, f_query[pool], queries.labels)
    assert got[f"knn_{pool}"] == pytest.approx(want, abs=1.01)  # a tie may flip one query
  assert got["feature_rank"] == pytest.approx(_numpy_effective_rank(f_query["mean"]), rel=1e-3)
  # The teacher's projector on whole images, recomputed with the model's own teacher call.
  z, _ = training.model.apply({"params": state.target_params,
                               "batch_stats": state.target_batch_stats},
                              view(queries), view(queries), method=type(training.model).teacher)
  z = np.asarray(z) / np.linalg.norm(np.asarray(z), axis=1, keepdims=True)
  assert got["z_std"] == pytest.approx(float(z.std(axis=0).mean()), rel=1e-4)
  assert got["z_rank"] == pytest.approx(_numpy_effective_rank(z), rel=1e-3)


def test_queries_from_the_bank_s_own_images_are_refused_naming_the_monitor_fields(tmp_path):
  """A class folder has only a train split: the default query split `test[...]` would
  otherwise have been the training images, so kNN on the bank's own images."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from lut_jax import errors  # pylint: disable=g-import-not-at-top
  for cls in ("a", "b"):
    (tmp_path / cls).mkdir()
    for i in range(4):
      Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
  config = util.tiny_config(**{"input.dataset": f"folder:{tmp_path}", "input.image_size": 8,
                               "monitor.every_steps": 1, "monitor.bank_split": "train[:4]",
                               "monitor.query_split": "test[:4]", "monitor.knn_k": 2})
  with pytest.raises(errors.DataError,
                     match=r"^monitor.bank_split='train\[:4\]' and monitor.query_split="
                           r"'test\[:4\]' of folder:.* are the same images") as e:
    monitor.Monitor(config)
  assert "train[90%:]" in e.value.hint
  config = util.tiny_config(**{"input.dataset": f"folder:{tmp_path}", "input.image_size": 8,
                               "monitor.every_steps": 1, "monitor.bank_split": "train[:6]",
                               "monitor.query_split": "train[6:]", "monitor.knn_k": 2})
  assert monitor.Monitor(config).every_steps == 1
