"""The training loop: resume after a crash, preemption, non-finite loss, outputs."""

import glob
import importlib
import json
import os
import signal

import chex
import jax
import numpy as np
import pytest

from lut_jax import config_lib, errors
from lut_jax.pretrain import train
from lut_jax.runtime import checkpointing, run_identity
from tests import util


def _run(config, workdir, data_fn=None):
  return jax.device_get(train.pretrain(
      config, str(workdir), data_fn=data_fn or util.synthetic_data_fn(config.input.batch_size)))


def _crashing_data_fn(batch_size, crash_at):
  base = util.synthetic_data_fn(batch_size)

  def data_fn(start_step):
    for step, batch in enumerate(base(start_step), start=start_step):
      if step == crash_at:
        raise RuntimeError("simulated crash")
      yield batch
  return data_fn


def test_resume_after_crash_is_exact(tmp_path):
  config = util.tiny_config()
  uninterrupted = _run(config, tmp_path / "a")
  with pytest.raises(RuntimeError, match="simulated crash"):
    _run(config, tmp_path / "b", _crashing_data_fn(config.input.batch_size, crash_at=4))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "b" / "checkpoints"))
  assert ckpt.latest_step() == 3
  ckpt.close()
  resumed = _run(config, tmp_path / "b")  # the same command again: resumes at step 3
  assert int(resumed.step) == config.total_steps
  # Bit-identical on CPU: same data, same per-step keys, same restored state.
  chex.assert_trees_all_equal(uninterrupted.params, resumed.params)
  chex.assert_trees_all_equal(uninterrupted.target_params, resumed.target_params)
  chex.assert_trees_all_equal(uninterrupted.opt_state, resumed.opt_state)
  # Outputs of a run: its config, TensorBoard events, checkpoints.
  saved = json.loads((tmp_path / "a" / "config.json").read_text())
  assert saved["model"]["variant"] == "mu/4" and saved["loss"]["w_bc"] == 0.25
  assert glob.glob(str(tmp_path / "a" / "events.out.tfevents.*"))
  assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["3", "6"]


def test_sigterm_saves_and_stops(tmp_path):
  config = util.tiny_config(total_steps=20, checkpoint_every_steps=100)
  base = util.synthetic_data_fn(config.input.batch_size)

  def data_fn(start_step):
    for step, batch in enumerate(base(start_step), start=start_step):
      if step == 2:  # a preemption notice arrives while step 3 is being fed
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  state = _run(config, tmp_path, data_fn)
  assert int(state.step) == 3  # stopped early, cleanly
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.latest_step() == 3
  ckpt.close()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = util.tiny_config(checkpoint_every_steps=2, log_every_steps=2)
  base = util.synthetic_data_fn(config.input.batch_size)

  def data_fn(start_step):
    for step, batch in enumerate(base(start_step), start=start_step):
      if step == 4:  # the 5th step sees a corrupted batch
        batch = {k: np.full_like(v, np.nan) for k, v in batch.items()}
      yield batch
  with pytest.raises(errors.NonFiniteError, match="between steps 5 and 6"):
    _run(config, tmp_path, data_fn)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.latest_step() == 4
  restored = ckpt.manager.restore(4)  # raw pytree: the last good state is intact
  ckpt.close()
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored))


def test_resume_refuses_a_changed_run_config(tmp_path):
  config = util.tiny_config()
  config_lib.save_config(config, str(tmp_path))
  config.log_every_steps = 5  # logging and checkpoint intervals may change on resume
  config.checkpoint_every_steps = 7
  run_identity.check_resume_config(config, str(tmp_path))
  config.input.batch_size = 32
  config.seed = 1
  with pytest.raises(errors.ConfigError, match="seed: 0 -> 1; input.batch_size: 16 -> 32"):
    run_identity.check_resume_config(config, str(tmp_path))


@pytest.mark.parametrize("config_module,blocks", [("finetune", ("finetune", "augment")),
                                                  ("linear_probe", ("linear_probe",)),
                                                  ("segmentation", ("segmentation",))])
def test_training_settings_are_the_evaluation_resume_key(config_module, blocks):
  """run_identity.training_settings is what a supervised evaluation's resume key records
  besides the seed and dtype (so keys written by earlier runs still match), without the
  fields a resume may change."""
  from lut_jax.evaluation import features  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{config_module}").get_config()
  settings = run_identity.training_settings(config, *blocks)
  key = features.training_key(config, *blocks)
  assert settings == {k: v for k, v in key.items() if k not in ("seed", "dtype")}
  may_change = [k for k in config[blocks[0]] if k in run_identity.TRAINING_MAY_CHANGE]
  assert may_change and not {f"{blocks[0]}.{k}" for k in may_change} & set(settings)
  assert f"{blocks[0]}.base_lr" in settings or f"{blocks[0]}.lr" in settings


def test_keep_checkpoint_every_steps_keeps_a_history(tmp_path):
  """The newest ``keep_checkpoints`` steps plus every multiple of
  ``keep_checkpoint_every_steps`` survive; the rest is deleted."""
  config = util.tiny_config(total_steps=7, checkpoint_every_steps=1, keep_checkpoints=2,
                            keep_checkpoint_every_steps=3)
  _run(config, tmp_path / "run")
  kept = sorted(int(n) for n in os.listdir(tmp_path / "run" / "checkpoints") if n.isdigit())
  assert kept == [3, 6, 7]
