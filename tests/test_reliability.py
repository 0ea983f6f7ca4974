"""Bad luck during pre-training: a diverging run, damaged checkpoints, a shared workdir, a
changed config on resume, a full disk. Each test failed before its fix."""

import errno
import json
import logging
import os
import re
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from lut_jax import config_lib, errors
from lut_jax.pretrain import train
from lut_jax.runtime import checkpointing, loop, run_identity, workdir_lock
from tests import util


def _run(config, workdir, **kwargs):
  return train.pretrain(config, str(workdir),
                         data_fn=util.synthetic_data_fn(config.input.batch_size),
                         **kwargs)


def _raw_steps(workdir):
  """``{step: raw restored pytree}`` of every checkpoint in ``workdir``."""
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  try:
    return {step: ckpt.manager.restore(step) for step in ckpt.all_steps()}
  finally:
    ckpt.close()


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


# ---------------------------------------------------------------- 1: no poisoned checkpoint


def test_all_finite_sees_every_leaf():
  tree = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2)), "step": jnp.int32(4)}}
  assert bool(loop.all_finite(tree))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    poisoned = {**tree, "b": {**tree["b"], "c": tree["b"]["c"].at[1, 0].set(bad)}}
    assert not bool(loop.all_finite(poisoned))


def test_diverging_run_never_saves_a_non_finite_state(tmp_path):
  # The user's reproduction: a huge learning rate, a checkpoint every step. The loss is
  # computed before the update, so it is still finite at the step that poisons the state.
  config = util.tiny_config(total_steps=12, checkpoint_every_steps=1, log_every_steps=1,
                            **{"optim.base_lr": 1e6, "optim.warmup_steps": 1})
  with pytest.raises(errors.NonFiniteError, match=r"at step (\d+)") as info:
    _run(config, tmp_path)
  steps = _raw_steps(tmp_path)
  assert steps, "the steps before the divergence were saved"
  assert all(_finite(tree) for tree in steps.values())
  last_good = max(steps)
  assert f"Last good checkpoint: step {last_good}" in str(info.value)
  # A rerun resumes from that good step (and, deterministic, diverges at the same step).
  with pytest.raises(errors.NonFiniteError, match=str(info.value).split(" (")[0]):
    _run(config, tmp_path)
  assert all(_finite(tree) for tree in _raw_steps(tmp_path).values())


# ------------------------------------------------------------------ 5: the resume check


@pytest.mark.parametrize("field,value", [("optim.weight_decay", 0.1), ("optim.b1", 0.8),
                                         ("optim.b2", 0.999), ("dtype", "bfloat16"),
                                         ("input.shuffle_buffer", 7),
                                         ("optim.grad_clip_norm", 1.0)])
def test_resume_refuses_any_change_outside_the_allow_list(tmp_path, field, value):
  config = util.tiny_config(total_steps=3)
  config_lib.save_config(config, str(tmp_path))
  util.override(config, {field: value})
  with pytest.raises(errors.ConfigError, match=field.replace(".", r"\.") + ": "):
    run_identity.check_resume_config(config, str(tmp_path))


def _image_folder(root, shade: int = 128):
  for cls in ("a", "b"):
    os.makedirs(root / cls)
    for i in range(4):
      Image.fromarray(np.full((16, 16, 3), shade + i, np.uint8)).save(root / cls / f"{i}.png")
  return f"folder:{root}"


@pytest.mark.parametrize("backend", ["tfdata", "device"])
def test_resume_on_other_input_is_refused(tmp_path, monkeypatch, backend):
  """What the config does not fix: the data behind a path, and (tf.data) the process count,
  which decides each step's examples (tests/test_input_pipeline.py shows it)."""
  config = util.tiny_config(total_steps=3, **{"input.backend": backend, "input.split": "train",
                                              "input.dataset": _image_folder(tmp_path / "a")})
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  check = lambda resuming: run_identity.check_input_record(  # noqa: E731
      workdir, train.input_record(config), resuming=resuming)
  check(False)  # a fresh run records its input
  record = json.loads((tmp_path / "run" / run_identity.INPUT_RECORD_FILE).read_text())
  assert record["backend"] == backend and record["num_examples"] == 8
  check(True)  # the same input: resumes
  if backend == "tfdata":
    assert (record["reader"], record["process_count"]) == ("folder", 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(errors.WorkdirError, match="process_count: 1 -> 2"):
      check(True)
  else:  # other pixels under the same layout: another fingerprint
    util.override(config, {"input.dataset": _image_folder(tmp_path / "b", shade=64)})
    with pytest.raises(errors.WorkdirError, match="data_sha256"):
      check(True)


def test_restart_rewrites_config_json_with_allowed_changes(tmp_path):
  config = util.tiny_config(total_steps=3)
  _run(config, tmp_path)
  config.total_steps = 3
  config.log_every_steps = 3  # allowed to change
  _run(config, tmp_path)  # nothing left to train; the start still records the config
  assert json.loads((tmp_path / "config.json").read_text())["log_every_steps"] == 3


def test_checkpoints_without_config_json_need_adoption(tmp_path):
  config = util.tiny_config(total_steps=3)
  _run(config, tmp_path)
  (tmp_path / "config.json").unlink()
  with pytest.raises(errors.WorkdirError, match="no config.json"):
    _run(config, tmp_path)
  state = _run(config, tmp_path, adopt_checkpoint=True)
  assert int(state.step) == 3
  assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 3


# ------------------------------------------------------- 6: damaged newest checkpoint


def _largest_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
           if f != checkpointing.MANIFEST]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_bit(step_dir):
  path = _largest_file(step_dir)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(path, "wb").write(bytes(data))


def _empty_metadata(step_dir):
  for d, _, fs in os.walk(step_dir):
    for f in fs:
      if f == "_METADATA":
        open(os.path.join(d, f), "w").close()


def _remove_item(step_dir):
  import shutil
  shutil.rmtree(os.path.join(step_dir, "default"))


@pytest.mark.parametrize("damage", [_truncate, _flip_bit, _empty_metadata, _remove_item])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
  config = util.tiny_config(total_steps=6, checkpoint_every_steps=3)
  reference = jax.device_get(_run(config, tmp_path / "ref"))
  _run(config, tmp_path / "run")
  step_dir = tmp_path / "run" / "checkpoints" / "6"
  assert (step_dir / checkpointing.MANIFEST).exists()
  damage(str(step_dir))
  resumed = jax.device_get(_run(config, tmp_path / "run"))  # resumes at 3, retrains 4..6
  np.testing.assert_array_equal(jax.tree.leaves(resumed.params)[0],
                                jax.tree.leaves(reference.params)[0])
  names = os.listdir(tmp_path / "run" / "checkpoints")
  assert any(n.startswith("damaged_6") for n in names), names  # moved aside, not deleted
  assert "6" in names  # and step 6 saved again


def test_no_intact_checkpoint_is_one_error(tmp_path):
  config = util.tiny_config(total_steps=3, checkpoint_every_steps=3)
  _run(config, tmp_path)
  _remove_item(str(tmp_path / "checkpoints" / "3"))
  with pytest.raises(errors.WorkdirError, match="no checkpoint .* restores: step 3"):
    _run(config, tmp_path)


# ------------------------------------------------------------------ 4: the workdir lock


def test_a_live_run_locks_its_workdir(tmp_path):
  config = util.tiny_config(total_steps=3)
  with workdir_lock.WorkdirLock(str(tmp_path), "the other run"):
    with pytest.raises(errors.WorkdirError, match="in use by another run.*the other run"):
      _run(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()
  _run(config, tmp_path)  # released: now it runs
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_a_dead_runs_lock_is_taken_over(tmp_path):
  import socket
  import subprocess
  exited = subprocess.Popen(["true"])
  exited.wait()
  pid = exited.pid  # a pid whose process is gone
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": pid, "command": "old", "started": "then"}))
  _run(util.tiny_config(total_steps=3), tmp_path)
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_a_lock_from_another_host_is_respected(tmp_path):
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "command": "remote run", "started": "then"}))
  with pytest.raises(errors.WorkdirError, match="pid 1 on elsewhere"):
    _run(util.tiny_config(total_steps=3), tmp_path)


# -------------------------------------------------------------------- 7: a full disk


def test_a_failed_save_is_one_error_naming_the_step_and_leaves_no_temp_dir(tmp_path,
                                                                           monkeypatch):
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  tmp_dir = tmp_path / "5.orbax-checkpoint-tmp-123"

  def full_disk(step, args, metrics, force):  # noqa: ARG001
    tmp_dir.mkdir()
    raise RuntimeError("save failed") from OSError(errno.ENOSPC, "No space left on device",
                                                   str(tmp_dir / "x"))
  monkeypatch.setattr(ckpt.manager, "save", full_disk)
  with pytest.raises(errors.WorkdirError, match="saving checkpoint step 5 .* no space left"):
    ckpt.save(5, {"a": np.ones(2)})
  assert not tmp_dir.exists()
  ckpt.close()


# How a full disk reaches an Orbax save: TensorStore's status error (a ValueError, as seen on
# a full tmpfs), or a plain OSError from a Python-side write.
_FULL_DISK = {
    "tensorstore": lambda path: ValueError(
        f'RESOURCE_EXHAUSTED: Error writing local file "{path}": Failed to write 66506 '
        "bytes to file 5: No space left on device [os_error_code='28']"),
    "oserror": lambda path: OSError(errno.ENOSPC, "No space left on device", path),
}


@pytest.mark.parametrize("kind", sorted(_FULL_DISK))
def test_a_full_disk_at_a_background_save_is_one_line_and_a_rerun_resumes(tmp_path,
                                                                          monkeypatch, kind):
  # Every array write of step 3 fails inside Orbax's background save, as on a full disk.
  from orbax.checkpoint._src.serialization import serialization
  write = serialization.async_serialize_from_host

  async def full_disk(rslices, tensorstore_spec, **kwargs):
    if "/3.orbax-checkpoint-tmp" in json.dumps(tensorstore_spec, default=str):
      raise _FULL_DISK[kind](str(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp" / "x"))
    return await write(rslices, tensorstore_spec, **kwargs)

  monkeypatch.setattr(serialization, "async_serialize_from_host", full_disk)
  # What the command line prints: its log filter must drop the tracebacks Orbax logs from
  # each of its threads (and asyncio for each failed write).
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  handler.addFilter(errors._quiet_orbax)  # pylint: disable=protected-access
  logging.getLogger().addHandler(handler)
  config = util.tiny_config(total_steps=4, checkpoint_every_steps=1)
  try:
    with pytest.raises(errors.WorkdirError) as info:
      _run(config, tmp_path)
  finally:
    logging.getLogger().removeHandler(handler)
  message = str(info.value)
  assert "\n" not in message
  assert re.fullmatch(r"saving checkpoint step 3 in \S+ failed: no space left on device.*"
                      r" \(\d+\.\d MB free\)", message), message
  assert f"in {tmp_path / 'checkpoints'} failed" in message
  assert "last saved step (2)" in info.value.hint
  assert not [r for r in records if r.exc_info or "RESOURCE_EXHAUSTED" in r.getMessage()]
  assert not list((tmp_path / "checkpoints").glob("*orbax-checkpoint-tmp*"))
  assert sorted(_raw_steps(tmp_path)) == [1, 2]
  for step in (1, 2):  # intact: their manifests verify
    checkpointing.verify_checksums(checkpointing.absolute(tmp_path / "checkpoints" / str(step)))

  monkeypatch.undo()  # space freed: the same command resumes from step 2
  starts = []
  data_fn = util.synthetic_data_fn(config.input.batch_size)
  state = train.pretrain(config, str(tmp_path), data_fn=lambda s: starts.append(s) or data_fn(s))
  assert starts == [2] and int(state.step) == 4
  assert sorted(_raw_steps(tmp_path)) == [2, 3, 4]


def test_writes_completing_after_a_failed_save_are_not_reported(monkeypatch):
  # Orbax closes a save's event loop at its first failed write; a TensorStore write still in
  # flight then completes into the closed loop, which Python reports as unraisable.
  import asyncio
  import tensorstore as ts
  reported = []
  monkeypatch.setattr(sys, "unraisablehook",
                      errors._quiet_closed_loop(reported.append))  # pylint: disable=protected-access
  promise, write = ts.Promise.new()

  async def wait_for_write():
    await write

  async def save():
    asyncio.ensure_future(wait_for_write())
    await asyncio.sleep(0.01)

  loop = asyncio.new_event_loop()
  loop.set_exception_handler(lambda *_: None)  # not "Task was destroyed but it is pending"
  loop.run_until_complete(save())
  loop.close()
  promise.set_result(None)  # the write completes
  assert not reported
  sys.unraisablehook(types.SimpleNamespace(exc_value=ValueError("other")))  # still shown
  assert len(reported) == 1


def test_evaluation_refuses_a_damaged_checkpoint_step(tmp_path):
  # Loading weights for evaluation verifies the same manifest a resume does.
  config = util.tiny_config(total_steps=3, checkpoint_every_steps=3)
  _run(config, tmp_path)
  subtrees, step = checkpointing.restore_subtrees(str(tmp_path / "checkpoints"),
                                                  ["params/encoder"])
  assert step == 3 and subtrees["params/encoder"]
  _flip_bit(str(tmp_path / "checkpoints" / "3"))
  with pytest.raises(errors.WorkdirError, match="step 3 .* is damaged: .* checksums") as info:
    checkpointing.restore_subtrees(str(tmp_path / "checkpoints"), ["params/encoder"])
  assert "--config.pretrained_step" in info.value.hint  # how to pick another, in lut-eval


# ----------------- issue 29: NaN weights, runs of another kind, foreign and config-less steps


def _nan_patch_kernel(tree):
  """``tree`` with a NaN in every patch-embedding kernel (a diverged or damaged encoder)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(x).at[0, 0, 0, 0].set(jnp.nan)
      if jax.tree_util.keystr(path).endswith("['patch_embed']['proj']['kernel']") else x, tree)


def _run_with_nan_newest_step(path):
  """A pre-training workdir whose newest step holds NaN in the online encoder; saved (and
  hashed) normally, as by a run killed before its manifest and then damaged."""
  from tests import test_export  # pylint: disable=g-import-not-at-top
  state = test_export.make_pretraining_workdir(path)
  ckpt = checkpointing.Checkpointer(os.path.join(path, "checkpoints"), async_save=False,
                                    run_config=config_lib.config_json(config_lib.load_config(path)))
  ckpt.save(test_export.STEP + 1, state.replace(params=_nan_patch_kernel(state.params)),
            force=True)
  ckpt.close()
  return state


@pytest.mark.parametrize("source", ["workdir", "exported encoder", "timm folder"])
def test_loading_non_finite_weights_is_refused(tmp_path, source):
  from lut_jax.models import variants  # pylint: disable=g-import-not-at-top
  from lut_jax.weights import export, loading, sources  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / "run")
  state = _run_with_nan_newest_step(run)
  path = run
  if source != "workdir":  # the same NaN encoder, exported / converted
    params = _nan_patch_kernel(jax.device_get(state.params["encoder"]))
    encoder_config = variants.EncoderConfig.of(loading.run_model(config_lib.load_config(run)))
    path = str(tmp_path / "weights")
    if source == "exported encoder":
      sources.write_export(path, params, encoder_config)
    else:
      os.makedirs(path)
      export.write_timm_folder(path, params, encoder_config)
  with pytest.raises(errors.NonFiniteError, match=r"NaN or infinite values in 1 of \d+ "
                     r"arrays: .*\['patch_embed'\]\['proj'\]\['kernel'\]"):
    loading.load(path, encoder_only=True)
  if source == "workdir":  # the step before is intact
    assert loading.load(run, 5, encoder_only=True).step == 5


def test_knn_of_a_run_whose_newest_step_holds_nan_is_refused(tmp_path):
  # The reproduction: it scored 100% on every pool and wrote knn_results.json.
  from configs import knn as knn_config  # pylint: disable=g-import-not-at-top
  from lut_jax.cli import evaluate as evaluate_cli  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / "run")
  _run_with_nan_newest_step(run)
  config = knn_config.get_config()
  config.pretrained = run
  with pytest.raises(errors.NonFiniteError, match=r"step 6 in .* holds NaN") as info:
    evaluate_cli.evaluate(config, str(tmp_path / "knn"))
  assert "--config.pretrained_step" in info.value.hint
  assert not (tmp_path / "knn" / "knn_results.json").exists()


def _files(root):
  return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_evaluation_never_writes_into_a_pretraining_run_nor_the_reverse(tmp_path):
  from configs import knn as knn_config  # pylint: disable=g-import-not-at-top
  from lut_jax.cli import evaluate as evaluate_cli  # pylint: disable=g-import-not-at-top
  from tests import test_export  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  test_export.make_pretraining_workdir(str(run))
  before = _files(run)
  config = knn_config.get_config()
  config.pretrained = str(run)
  with pytest.raises(errors.WorkdirError, match=r"another kind \(pre-training\)"):
    evaluate_cli.evaluate(config, str(run))  # it saved its config.json over the run's
  assert _files(run) == before
  # Without its top-level config.json, the steps' copies still say what the run is.
  (run / "config.json").unlink()
  with pytest.raises(errors.WorkdirError, match=r"another kind \(pre-training\)"):
    evaluate_cli.evaluate(config, str(run))
  evaluation = tmp_path / "knn"
  config_lib.save_config(config, str(evaluation))
  before = _files(evaluation)
  with pytest.raises(errors.WorkdirError, match=r"another kind \(evaluation\)"):
    _run(util.tiny_config(total_steps=3), evaluation)
  assert _files(evaluation) == before


def test_a_foreign_step_is_set_aside_and_not_trained_on(tmp_path):
  config = util.tiny_config(total_steps=6, checkpoint_every_steps=3)
  state = _run(config, tmp_path)
  reference = jax.device_get(state.params)
  # As if stopped after step 3, and another run's step 6 (another seed, other weights)
  # copied in: it was resumed as this run's, finished.
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  other = util.override(util.tiny_config(total_steps=6, checkpoint_every_steps=3), {"seed": 7})
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False,
                                    run_config=config_lib.config_json(other))
  ckpt.save(6, state.replace(params=jax.tree.map(lambda x: x + 1.0, state.params)))
  ckpt.close()
  resumed = jax.device_get(_run(config, tmp_path).params)  # from step 3
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(x, y)
  names = os.listdir(tmp_path / "checkpoints")
  assert any(n.startswith("foreign_6_") for n in names), names  # moved aside, not deleted
  assert "6" in names  # saved again, by this run


def test_a_step_that_lost_only_its_config_json_restores(tmp_path, caplog):
  config = util.tiny_config(total_steps=3, checkpoint_every_steps=3)
  _run(config, tmp_path)
  step_dir = tmp_path / "checkpoints" / "3"
  (step_dir / config_lib.CONFIG_FILE).unlink()  # its arrays still verify
  _, step = checkpointing.restore_subtrees(str(tmp_path / "checkpoints"), ["params/encoder"])
  assert step == 3
  state = _run(config, tmp_path)  # resumes at 3: nothing left to train, nothing set aside
  assert int(state.step) == 3
  assert os.listdir(tmp_path / "checkpoints") == ["3"]
  assert "lost its config.json" in caplog.text
