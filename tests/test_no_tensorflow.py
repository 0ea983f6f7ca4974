"""The core runs without TensorFlow: checked in a subprocess where importing it fails."""

import subprocess
import sys
import textwrap

CORE_MODULES = ["lut_jax", "lut_jax.models", "lut_jax.masking", "lut_jax.losses",
                "lut_jax.convert", "lut_jax.optim", "lut_jax.train_state", "lut_jax.train_step",
                "lut_jax.sharding", "lut_jax.checkpointing", "lut_jax.config_lib",
                "lut_jax.variants"]


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
      from lut_jax import checkpointing, optim, train_state, train_step, models
      import ml_collections
      cfg = ml_collections.ConfigDict(dict(variant="mu/4", decoder_width=32, decoder_depth=1,
                                           decoder_num_heads=2, head_hidden_dim=64))
      model = models.build_model(cfg, image_size=16, channels=3, use_bc=True)
      lr = optim.learning_rate_schedule(peak_lr=1e-3, warmup_steps=1, total_steps=4)
      tx = optim.create_optimizer(learning_rate=lr, weight_decay=0.05)
      state = train_state.create_train_state(model, tx, jax.random.key(0))
      step = jax.jit(train_step.make_train_step(
          model=model, loss_config=train_step.LossConfig(), learning_rate=lr,
          momentum=optim.momentum_schedule(base_momentum=0.996, total_steps=4)))
      x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
      state, metrics = step(state, {{"view1": x, "view2": x[::-1]}}, jax.random.key(1))
      ckpt = checkpointing.Checkpointer({str(tmp_path / "ckpt")!r}, async_save=False)
      ckpt.save(1, state)
      ckpt.close()
      assert np.isfinite(float(metrics["loss"]))
      bad = [m for m, mod in sys.modules.items()
             if mod is not None and m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
      assert not bad, bad
      print("OK")
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "OK" in result.stdout
