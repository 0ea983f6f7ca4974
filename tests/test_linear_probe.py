"""Linear probe: the MAE head, LARS, separable data, resumption, the non-finite guard and
preemption (the loop fine-tuning and segmentation share)."""

import os
import signal

import jax
import numpy as np
import pytest

from lut_jax import errors
from lut_jax.evaluation import linear_probe
from lut_jax.runtime import checkpointing

# 4 epochs of 4 steps (256 examples, batch 64), evaluated and saved every 2 epochs.
RECIPE = dict(num_classes=4, epochs=4, batch_size=64, base_lr=1.0, warmup_epochs=1,
              optimizer="lars", eval_every_epochs=2, seed=3)


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


def test_sigterm_saves_and_a_rerun_finishes_as_an_uninterrupted_run(tmp_path):
  x, y = _separable(1, 256)
  whole, whole_results = linear_probe.train_linear_probe(x, y, x, y, **RECIPE)

  def sigterm_after_first_epoch(step, scalars):
    del scalars
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  ckpt = str(tmp_path / "ckpt")
  stopped, _ = linear_probe.train_linear_probe(x, y, x, y, checkpoint_dir=ckpt,
                                               log_fn=sigterm_after_first_epoch, **RECIPE)
  assert int(stopped.step) == 5 and "5" in os.listdir(ckpt)  # saved at the next step
  resumed, results = linear_probe.train_linear_probe(x, y, x, y, checkpoint_dir=ckpt,
                                                     **RECIPE)
  assert int(resumed.step) == 16 and results == whole_results
  for a, b in zip(jax.tree.leaves((whole.params, whole.batch_stats)),
                  jax.tree.leaves((resumed.params, resumed.batch_stats))):
    np.testing.assert_array_equal(a, b)


def test_multi_host_preemption_notice_saves_and_stops(tmp_path, monkeypatch):
  # Orbax answers reached_preemption identically on every host once any got a notice.
  monkeypatch.setattr(checkpointing.Checkpointer, "reached_preemption",
                      lambda self, step: step >= 3)
  x, y = _separable(1, 256)
  ckpt = str(tmp_path / "ckpt")
  stopped, _ = linear_probe.train_linear_probe(x, y, x, y, checkpoint_dir=ckpt, **RECIPE)
  assert int(stopped.step) == 3 and "3" in os.listdir(ckpt)


def test_a_nan_stops_the_probe_before_it_is_saved(tmp_path):
  x, y = _separable(1, 256)
  ckpt = str(tmp_path / "ckpt")
  linear_probe.train_linear_probe(x, y, x, y, checkpoint_dir=ckpt, **{**RECIPE, "epochs": 2})
  # Continued for four epochs on features that have turned NaN: the first step is NaN.
  with pytest.raises(errors.NonFiniteError,
                     match="at step 9 .*between steps 9 and 12.*Last good checkpoint: step 8"):
    linear_probe.train_linear_probe(np.full_like(x, np.nan), y, x, y, checkpoint_dir=ckpt,
                                    **RECIPE)
  saved = checkpointing.Checkpointer(ckpt)
  assert saved.all_steps() == [8]  # the NaN state (step 16's save) never written
  restored = saved.manager.restore(8)
  saved.close()
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored))
