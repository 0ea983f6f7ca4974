"""kNN classifier (DINO protocol) against a hand-computed vote."""

import math

import numpy as np
import pytest

from lut_jax import metrics

# Four training features in 2-D and one query. Cosine similarities, by hand:
#   |q| = sqrt(1 + 0.04) = 1.0198039
#   bank 0 (1, 0)   label 0: 1 / 1.0198039                 = 0.98058068
#   bank 1 (0, 1)   label 1: 0.2 / 1.0198039               = 0.19611614
#   bank 2 (-1, 0)  label 2:                               = -0.98058068
#   bank 3 (3, 3)   label 1: 1.2 / (1.0198039 * 1.4142136) = 0.83205029 (scale is irrelevant)
BANK = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 3.0]], np.float32)
LABELS = np.array([0, 1, 2, 1], np.int32)
QUERY = np.array([[1.0, 0.2]], np.float32)
S0, S1, S3 = 0.98058068, 0.19611614, 0.83205029


def test_hand_computed_vote_low_temperature():
  # k = 3 keeps banks 0, 3, 1. At T = 0.07 the closest neighbour outweighs the other two:
  # class 0: exp(0.980581 / 0.07) = 1.2133e6; class 1: exp(0.832050 / 0.07) + exp(0.196116
  # / 0.07) = 1.4535e5 + 16.4; class 2: no neighbour.
  votes = metrics.knn_classify(BANK, LABELS, QUERY, num_classes=3, k=3, temperature=0.07)
  expected = [math.exp(S0 / 0.07), math.exp(S3 / 0.07) + math.exp(S1 / 0.07), 0.0]
  np.testing.assert_allclose(votes[0], expected, rtol=1e-5)
  assert np.argmax(votes[0]) == 0


def test_hand_computed_vote_high_temperature_flips_to_majority():
  # At T = 1 the weights are e^0.9806 = 2.6660 vs e^0.8321 + e^0.1961 = 2.2981 + 1.2167 =
  # 3.5147: the two class-1 neighbours win.
  votes = metrics.knn_classify(BANK, LABELS, QUERY, num_classes=3, k=3, temperature=1.0)
  np.testing.assert_allclose(votes[0], [math.exp(S0), math.exp(S3) + math.exp(S1), 0.0],
                             rtol=1e-5)
  np.testing.assert_allclose(votes[0], [2.6660, 3.5147, 0.0], atol=1e-4)
  assert np.argmax(votes[0]) == 1


def test_k_limits_the_neighbours():
  votes = metrics.knn_classify(BANK, LABELS, QUERY, num_classes=3, k=1, temperature=0.07)
  np.testing.assert_allclose(votes[0], [math.exp(S0 / 0.07), 0.0, 0.0], rtol=1e-4)
  with pytest.raises(ValueError, match="k must be"):
    metrics.knn_classify(BANK, LABELS, QUERY, num_classes=3, k=5)


def test_chunked_queries_match_and_accuracy():
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(50, 8)).astype(np.float32)
  labels = rng.integers(0, 4, size=50).astype(np.int32)
  queries = bank[:13] * 2.5 + 0.01 * rng.normal(size=(13, 8)).astype(np.float32)
  whole = metrics.knn_classify(bank, labels, queries, num_classes=4, k=5, query_batch=64)
  chunked = metrics.knn_classify(bank, labels, queries, num_classes=4, k=5, query_batch=4)
  np.testing.assert_allclose(whole, chunked, rtol=1e-5)
  # Each query is (a scaled, noisy copy of) a bank entry: with T = 0.07 its own label wins.
  acc = metrics.knn_accuracy(bank, labels, queries, labels[:13], num_classes=4, k=5)
  assert acc["top1"] == 100.0 and acc["top5"] == 100.0


def test_eval_main_knn_and_linear_probe_on_a_fashion_mnist_subset(tmp_path):
  """End to end: pre-training workdir -> eval_main (tf.data eval pipeline, feature cache,
  TensorBoard writer, results file) for kNN and the linear probe. The in-memory path's
  end to end run is tests/test_no_tensorflow.py's."""
  pytest.importorskip("tensorflow")
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from configs import knn as knn_config  # pylint: disable=g-import-not-at-top
  from configs import linear_probe as lp_config  # pylint: disable=g-import-not-at-top
  from lut_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from lut_jax.cli import evaluate as evaluate_cli
  from tests import test_export  # pylint: disable=g-import-not-at-top
  try:
    datasets.get_source("fashion_mnist", "test[:8]")
  except FileNotFoundError:
    pytest.skip("Fashion-MNIST is not on this machine")
  pretrain = str(tmp_path / "pretrain")
  test_export.make_pretraining_workdir(pretrain)
  for module, overrides in ((knn_config, {}),
                            (lp_config, {"epochs": 2, "batch_size": 128, "warmup_epochs": 1,
                                         "eval_every_epochs": 1})):
    config = module.get_config()
    config.pretrained = pretrain
    config.input.backend = "tfdata"
    config.input.train_split = "train[:256]"
    config.input.eval_split = "test[:96]"
    config.input.eval_batch_size = 64  # 96 = one full and one padded batch
    for key, value in overrides.items():
      config.linear_probe[key] = value
    workdir = str(tmp_path / config.mode)
    results = evaluate_cli.evaluate(config, workdir)
    pools = ("cls", "mean") if config.mode == "knn" else ("cls",)
    assert set(results) == {f"{p}/top{k}" for p in pools for k in (1, 5)}
    assert all(0.0 <= v <= 100.0 for v in results.values())
    with np.load(os.path.join(workdir, "features", "test_-96.npz")) as cached:
      assert cached["label"].shape == (96,) and cached["cls"].shape == (96, 32)
    saved = json.load(open(os.path.join(workdir, f"{config.mode}_results.json")))
    assert saved.pop("source")["pretrained"] == os.path.abspath(pretrain)
    assert saved == results


@pytest.mark.parametrize("where", ["queries", "one bank entry", "infinite queries"])
def test_non_finite_features_score_zero_not_hundred(where):
  # Each query is a copy of a bank entry: finite, it scores 100%. NaN compares false with
  # every vote, so a scorer that counts "no class above the true one" called it correct.
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(20, 8)).astype(np.float32)
  labels = rng.integers(0, 3, size=20).astype(np.int32)
  queries = bank[:6].copy()
  assert metrics.knn_accuracy(bank, labels, queries, labels[:6], num_classes=3,
                              k=3)["top1"] == 100
  if where == "queries":
    queries[:] = np.nan
  elif where == "one bank entry":
    bank[15] = np.nan
  else:
    queries[:, 0] = np.inf
  acc = metrics.knn_accuracy(bank, labels, queries, labels[:6], num_classes=3, k=3)
  assert acc == {"top1": 0.0, "top5": 0.0}


def test_topk_correct_counts_an_example_with_a_non_finite_logit_as_wrong():
  nan, inf = float("nan"), float("inf")
  logits = np.array([[3.0, 1.0, 0.0],    # right: top-1 and top-2
                     [nan, nan, nan],    # all NaN: wrong
                     [0.0, 5.0, nan],    # the true class is the best finite one: wrong
                     [-inf, 1.0, 0.0],   # an infinity: wrong
                     [1.0, 2.0, 0.0]],   # right at top-2 only
                    np.float32)
  labels = np.array([0, 1, 1, 1, 0], np.int32)
  out = metrics.topk_correct(logits, labels, ks=(1, 2))
  assert (float(out["top1"]), float(out["top2"])) == (1.0, 2.0)
