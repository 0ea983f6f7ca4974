"""The core, the fine-tuning / probe maths, and the commands a pre-training run's summary
prints (kNN, linear probe, export) run without TensorFlow: checked in subprocesses where
importing it fails."""

import json
import pathlib
import shlex
import subprocess
import sys
import textwrap

from tests import util

CORE_MODULES = ["lut_jax", "lut_jax.models.vit", "lut_jax.pretrain.masking", "lut_jax.pretrain.losses",
                "lut_jax.weights.convert", "lut_jax.runtime.optim", "lut_jax.pretrain.train_state", "lut_jax.pretrain.train_step",
                "lut_jax.runtime.sharding", "lut_jax.runtime.checkpointing", "lut_jax.config_lib",
                "lut_jax.models.variants", "lut_jax.runtime.loop", "lut_jax.evaluation.finetune",
                "lut_jax.evaluation.linear_probe", "lut_jax.evaluation.knn", "lut_jax.data.eval_input"]


def test_core_imports_and_steps_without_tensorflow(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      # A None entry makes `import` fail and importlib.util.find_spec report "not
      # installed", as on a machine without these packages (the GPU machine).
      for name in ("tensorflow", "tensorflow_datasets", "tensorboard"):
        sys.modules[name] = None
      import importlib
      for m in {CORE_MODULES!r}:
        importlib.import_module(m)
      import jax, numpy as np
      from lut_jax.runtime import checkpointing, optim
      from lut_jax import config_lib
      from lut_jax.pretrain import train_state, train_step
      from lut_jax.models import vit
      cfg = config_lib.base_config()
      cfg.model.update(dict(variant="mu/4", decoder_width=32, decoder_depth=1,
                            decoder_num_heads=2, head_hidden_dim=64))
      model = vit.build_model(cfg.model, image_size=16, channels=3, use_bc=True)
      lr = optim.learning_rate_schedule(peak_lr=1e-3, warmup_steps=1, total_steps=4)
      tx = optim.create_optimizer(learning_rate=lr, weight_decay=0.05)
      state = train_state.create_train_state(model, tx, jax.random.key(0))
      step = jax.jit(train_step.make_train_step(
          model=model, loss_config=train_step.LossConfig(**cfg.loss), learning_rate=lr,
          momentum=optim.momentum_schedule(base_momentum=0.996, total_steps=4)))
      x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
      state, metrics = step(state, {{"view1": x, "view2": x[::-1]}}, jax.random.key(1))
      ckpt = checkpointing.Checkpointer({str(tmp_path / "ckpt")!r}, async_save=False)
      ckpt.save(1, state)
      ckpt.close()
      assert np.isfinite(float(metrics["loss"]))
      # A fine-tuning step (model, layer-decay AdamW, mixup, the non-finite metric).
      import functools
      from lut_jax.runtime import loop
      from lut_jax.evaluation import finetune
      from lut_jax.models import classifier
      ft_model = classifier.FinetuneViT(num_classes=3, image_size=16, patch_size=4, width=32,
                                        depth=2, num_heads=2)
      ft_params = ft_model.init(jax.random.key(0), x[:1], train=False)["params"]
      ft_state = train_state.ClassifierState.create(
          ft_params, {{}}, optim.create_finetune_optimizer(lr, depth=2))
      ft_step = jax.jit(functools.partial(finetune.train_step, model=ft_model,
                                          mixup=finetune.MixupSpec(num_classes=3),
                                          learning_rate=lr))
      ft_state, ft_metrics = ft_step(ft_state, {{"image": x, "label": np.arange(4) % 3}},
                                     jax.random.key(2))
      assert int(ft_state.step) == 1 and np.isfinite(float(ft_metrics["loss"]))
      assert int(ft_metrics["first_nonfinite_step"]) == int(loop.ALL_FINITE)
      bad = [m for m, mod in sys.modules.items()
             if mod is not None and m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
      assert not bad, bad
      print("OK")
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout


# Runs a command-line tool in a subprocess where TensorFlow and tfds are not installed, and
# prints the TensorFlow modules imported all the same (none, if it holds).
_WITHOUT_TENSORFLOW = textwrap.dedent("""
    import json, runpy, sys
    for name in ("tensorflow", "tensorflow_datasets"):
      sys.modules[name] = None
    module, sys.argv = sys.argv[1], json.loads(sys.argv[2])
    try:
      runpy.run_module(module, run_name="__main__")
    finally:
      bad = [m for m, mod in sys.modules.items()
             if mod is not None and m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
      print("TF MODULES", bad)
""")
# The console scripts the pre-training summary names.
_TOOLS = {"lut-eval": "lut_jax.cli.evaluate", "lut-export": "lut_jax.weights.export"}


def _run_without_tensorflow(module: str, argv: list[str],
                            returncode: int = 0) -> subprocess.CompletedProcess:
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW, module, json.dumps(argv)],
                          capture_output=True, text=True, timeout=600, cwd=root,
                          env=util.one_device_env())
  assert result.returncode == returncode, (argv, result.stderr[-3000:])
  assert "TF MODULES []" in result.stdout, result.stdout[-2000:]
  return result


def test_pretraining_command_runs_without_tensorflow(tmp_path):
  """``lut-pretrain`` on the device input path, with TensorFlow and tfds not installed:
  trains, logs TensorBoard files through tensorboardX, runs the monitor, checkpoints, and
  restores (exact resume on this path: tests/test_device_input.py); then the kNN,
  linear-probe and export commands its summary prints run too. Skipped where
  Fashion-MNIST's idx files are absent."""
  from lut_jax.data import idx
  if idx.find_fashion_mnist() is None:
    import pytest
    pytest.skip("Fashion-MNIST idx files not installed")
  workdir = tmp_path / "run"
  argv = ["lut-pretrain", "--config=configs/fashion_mnist.py:variant=mu/4",
          f"--workdir={workdir}", "--config.input.image_size=16",
          "--config.input.batch_size=16", "--config.total_steps=4",
          "--config.optim.warmup_steps=1", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=2", "--config.image_summary_every_steps=2",
          "--config.monitor.every_steps=2", "--config.monitor.bank_split=train[:64]",
          "--config.monitor.query_split=test[:32]", "--config.model.decoder_width=32",
          "--config.model.decoder_depth=1", "--config.model.decoder_num_heads=2",
          "--config.model.head_hidden_dim=64"]
  # The second command finds the run finished and resumes it.
  results = [_run_without_tensorflow("lut_jax.cli.pretrain", argv) for _ in range(2)]
  result = results[-1]
  assert "Resuming from" in result.stderr
  records = [json.loads(line) for line in (workdir / "monitor.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4]
  assert all(0 <= r["knn_cls"] <= 100 and r["z_rank"] >= 1 for r in records)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == \
      ["2", "4"]
  events = list(workdir.glob("events.out.tfevents.*"))
  assert events, list(workdir.iterdir())
  # The event files hold the scalars, read back with TensorBoard's own reader (no TF).
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(workdir))
  acc.Reload()
  assert {"train/loss", "train/time_share/input", "monitor/knn_cls",
          "monitor/z_std"} <= set(acc.Tags()["scalars"])
  assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
  # One image per example: view 1 | masked | reconstruction | view 2 (16 px each).
  assert acc.Tags()["images"] == ["examples"]
  assert acc.Images("examples")[-1].width >= 4 * 16
  # The console: no hyperparameter line; a line per checkpoint save; a closing summary.
  first_log = results[0].stderr
  assert "hparams" not in first_log and "Checkpoint step 2:" in first_log
  assert f"Checkpoint: {workdir}/checkpoints/4." in first_log and "lut-eval" in first_log
  assert "already finished" in result.stderr
  assert "encoder/patch_embed/proj/kernel" in (workdir / "parameters.txt").read_text()
  _check_next_commands(first_log, workdir)
  # Every checkpoint carries the run's config, covered by its checksum manifest.
  saved = json.loads((workdir / "config.json").read_text())
  for step in ("2", "4"):
    assert json.loads((workdir / "checkpoints" / step / "config.json").read_text()) == saved
    assert "config.json" in json.loads(
        (workdir / "checkpoints" / step / "sha256.json").read_text())


def _check_next_commands(log: str, workdir: pathlib.Path) -> None:
  """Runs exactly the kNN, linear-probe and export commands the run's summary printed,
  still without TensorFlow, and checks what they wrote."""
  commands = [shlex.split(line, comments=True) for line in log.splitlines()
              if line.strip().split(" ")[0] in _TOOLS]
  assert [c[0] for c in commands] == ["lut-eval", "lut-eval", "lut-export"], log[-2000:]
  assert "pip install 'lut_jax[data]'" in log  # fine-tuning's install line instead
  for argv in commands:
    if argv[0] == "lut-eval":
      # The printed commands read all 70,000 images; these slices keep the test fast.
      argv += ["--config.input.train_split=train[:512]", "--config.input.eval_split=test[:256]"]
    _run_without_tensorflow(_TOOLS[argv[0]], argv)
  for mode, suffix in (("knn", "knn"), ("linear_probe", "probe")):
    results = json.loads((workdir.parent / f"{workdir.name}_{suffix}" /
                          f"{mode}_results.json").read_text())
    scores = {k: v for k, v in results.items() if k != "source"}
    assert scores and all(0 <= v <= 100 for v in scores.values()), results
    assert results["source"]["pretrained"] == str(workdir)
  assert {"encoder_config.json", "params", "model.safetensors", "config.json"} <= {
      p.name for p in (workdir / "encoder").iterdir()}
  # Fine-tuning's input is tf.data's: one line says what to install.
  result = _run_without_tensorflow("lut_jax.cli.evaluate", [
      "lut-eval", "--config=configs/finetune.py", f"--workdir={workdir}_finetune",
      f"--config.pretrained={workdir}"], returncode=2)
  assert result.stderr.strip().splitlines()[-1] == (
      "lut-eval: error: lut-eval finetune (RandAugment tf.data pipeline) needs tensorflow, "
      "which is not installed; hint: pip install 'lut_jax[data]'")
