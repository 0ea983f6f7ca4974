"""Linear probe: the MAE head, LARS, separable data, resumption."""

import jax
import numpy as np
import pytest

from lut_jax.evaluation import linear_probe


def _separable(seed: int, n: int, num_classes: int = 4, dim: int = 16):
  """Gaussian clusters around well-separated means, offset so BatchNorm has work to do."""
  rng = np.random.default_rng(0)
  means = rng.normal(size=(num_classes, dim)).astype(np.float32) * 3
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  return means[labels] + rng.normal(size=(n, dim)).astype(np.float32) + 5.0, labels


def test_head_is_non_affine_batchnorm_then_linear():
  model = linear_probe.LinearProbe(num_classes=3)
  variables = model.init(jax.random.key(0), np.zeros((2, 8), np.float32), train=False)
  assert set(variables["params"]) == {"head"}  # BatchNorm has no scale / bias
  assert set(variables["batch_stats"]["bn"]) == {"mean", "var"}
  assert variables["params"]["head"]["kernel"].shape == (8, 3)


@pytest.mark.parametrize("optimizer,base_lr", [("lars", 20.0), ("sgd", 0.1)])
def test_reaches_full_accuracy_on_separable_features(optimizer, base_lr):
  x, y = _separable(1, 1024)
  xt, yt = _separable(2, 256)
  _, results = linear_probe.train_linear_probe(
      x, y, xt, yt, num_classes=4, epochs=40, batch_size=256, base_lr=base_lr,
      warmup_epochs=2, optimizer=optimizer, eval_every_epochs=40)
  assert results["top1"] >= 99.5, results
  assert results["top5"] == 100.0


def test_resumed_run_equals_uninterrupted(tmp_path):
  x, y = _separable(1, 256)
  kwargs = dict(num_classes=4, epochs=4, batch_size=64, base_lr=1.0, warmup_epochs=1,
                optimizer="lars", eval_every_epochs=2, seed=3)
  whole, _ = linear_probe.train_linear_probe(x, y, x, y, **kwargs)

  class Preempted(Exception):
    pass

  def stop_after_second_epoch(step, scalars):
    del scalars
    if step == 2 * 4:
      raise Preempted()

  ckpt = str(tmp_path / "ckpt")
  with pytest.raises(Preempted):
    linear_probe.train_linear_probe(x, y, x, y, checkpoint_dir=ckpt,
                                    log_fn=stop_after_second_epoch, **kwargs)
  resumed, _ = linear_probe.train_linear_probe(x, y, x, y, checkpoint_dir=ckpt, **kwargs)
  assert int(resumed.step) == int(whole.step) == 16
  for a, b in zip(jax.tree.leaves((whole.params, whole.batch_stats)),
                  jax.tree.leaves((resumed.params, resumed.batch_stats))):
    np.testing.assert_array_equal(a, b)


def test_non_finite_eval_features_score_zero():
  # A diverged encoder's NaN features: the probe's logits are NaN, which must not count as
  # correct (they did: no logit is greater than a NaN true one).
  x, y = _separable(1, 256)
  xt, yt = _separable(2, 64)
  _, results = linear_probe.train_linear_probe(
      x, y, np.full_like(xt, np.nan), yt, num_classes=4, epochs=1, batch_size=64,
      base_lr=0.1, warmup_epochs=0, optimizer="sgd", eval_every_epochs=1)
  assert results["top1"] == 0.0 and results["top5"] == 0.0, results
