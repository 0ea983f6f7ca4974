"""scripts/compare_lut_mae.py: a preempted pre-training is resumed, never probed as finished;
a finished run is reused only by a comparison with its own settings, and probed again
(without pre-training) only when asked."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from configs import linear_probe as lp_config
from lut_jax.data import idx
from tests import util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The comparison in a child process whose pre-training gets a preemption notice before its
# first step when PREEMPT=1 (as after a SIGTERM): it saves and stops at step 1.
_SCRIPT = textwrap.dedent("""
    import os, runpy, sys
    from lut_jax.runtime import loop
    if os.environ.get("PREEMPT") == "1":
      enter = loop.PreemptionGuard.__enter__
      def preempted(self):
        guard = enter(self)
        guard.requested = True
        return guard
      loop.PreemptionGuard.__enter__ = preempted
    sys.argv = ["compare_lut_mae.py"] + sys.argv[1:]
    runpy.run_path("scripts/compare_lut_mae.py", run_name="__main__")
""")


def test_a_preempted_run_stops_the_comparison_and_the_rerun_finishes_it_and_no_other(tmp_path):
  if idx.find_fashion_mnist() is None:
    pytest.skip("Fashion-MNIST idx files not installed")
  args = [f"--workdir={tmp_path}", "--methods=mae", "--seeds=0", "--total_steps=3",
          "--batch_size=16", "--variant=mu/4", "--monitor_every=0", "--lp_epochs=1",
          "--probe_train_split=train[:64]", "--probe_eval_split=test[:32]"]

  def compare(preempt: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _SCRIPT, *args, *extra], capture_output=True,
                          text=True, cwd=REPO, env=util.one_device_env(PREEMPT=preempt),
                          timeout=600)

  run_dir = tmp_path / "mae_s0"
  first = compare("1")
  assert first.returncode == 1, first.stderr[-3000:]
  assert first.stderr.strip().splitlines()[-1] == (
      "compare_lut_mae.py: mae seed 0 stopped at step 1 of 3 (preempted); rerun the same "
      "command to resume.")
  assert not (run_dir / "probe_results.json").exists()  # nothing recorded as finished
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["1"]

  second = compare("0")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "start step 1" in second.stderr  # resumed, not restarted
  assert "3" in os.listdir(run_dir / "checkpoints")
  with open(tmp_path / "compare_results.json") as f:
    results = json.load(f)["results"]
  assert [r["method"] for r in results] == ["pixels", "mae", "random"]

  # Another budget or probe in the same workdir: refused, not answered with these results.
  for extra, expected in ((["--total_steps=4"], "total_steps: 3 -> 4"),
                          (["--lp_epochs=2"], "'lp_epochs': 1, 'lp_recipe': {")):
    other = compare("0", *extra)
    assert other.returncode == 1, other.stderr[-3000:]
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith(f"compare_lut_mae.py: {run_dir} was finished by another "
                           "comparison: ") and expected in last, last

  # Another probe with --reprobe: probed again, pre-training and its record kept.
  with open(run_dir / "probe_results.json") as f:
    before = json.load(f)
  checkpoints = sorted(os.listdir(run_dir / "checkpoints"))
  again = compare("0", "--lp_epochs=2", "--reprobe")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "probing again" in again.stderr and "start step" not in again.stderr
  with open(run_dir / "probe_results.json") as f:
    after = json.load(f)
  assert after["settings"] == {**before["settings"], "lp_epochs": 2}
  lp = lp_config.get_config().linear_probe  # the recorded recipe is the config's
  assert after["settings"]["lp_recipe"] == {
      k: lp[k] for k in ("optimizer", "base_lr", "batch_size", "warmup_epochs",
                         "weight_decay", "momentum")}
  assert (after["pretrain_seconds"], after["monitor"]) == (
      before["pretrain_seconds"], before["monitor"])
  assert sorted(os.listdir(run_dir / "checkpoints")) == checkpoints
  # ... and another budget is still refused with --reprobe.
  other = compare("0", "--total_steps=4", "--reprobe")
  assert other.returncode == 1 and "total_steps: 3 -> 4" in other.stderr, other.stderr[-3000:]


def test_compute_matched_plot_reads_the_sections_and_counts_flops(tmp_path, monkeypatch):
  """scripts/plot_compute_matched.py: the summary rows of a tagged section, and each run's
  model FLOPs = batch x steps x scripts/flops.py's per-image count of its method."""
  monkeypatch.syspath_prepend(os.path.join(REPO, "scripts"))
  import flops  # pylint: disable=g-import-not-at-top (scripts/)
  import plot_compute_matched as plot  # pylint: disable=g-import-not-at-top
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  results = tmp_path / "results.md"
  results.write_text(textwrap.dedent("""\
      <!-- compare_lut_mae t600: begin -->
      * Pre-training: `configs/fashion_mnist.py`, ViT `nano/4`, batch 128, 600 steps, warmup 60
      | encoder | kNN cls | kNN mean | linear cls | linear mean | pre-train s/run |
      |---|---:|---:|---:|---:|---:|
      | LUT (3 seeds) | 77.36 ± 0.57 | 77.81 ± 0.26 | 79.42 ± 0.47 | 79.58 ± 0.39 | 834 |
      | MAE (1 seeds) | 77.53 | 78.91 | 79.64 | 79.94 | 489 |
      | untrained encoder | 68.33 | 64.86 | 74.00 | 73.53 | 0 |
      <!-- compare_lut_mae t600: end -->
      """))
  points = plot.read_points(results.read_text(), "t600")
  assert [p["method"] for p in points] == ["LUT", "MAE"]
  lut, mae = points
  assert lut["seeds"] == 3 and lut["seconds"] == 834
  assert lut["kNN cls"] == (77.36, 0.57) and lut["linear mean"] == (79.58, 0.39)
  assert mae["kNN mean"] == (78.91, 0.0)
  shape = flops.shape_from_config(fashion_mnist.get_config().to_dict())
  for p in points:
    per_image = flops.step_flops(shape, p["method"].lower())["model_total"]
    assert p["tflops"] == pytest.approx(128 * 600 * per_image / 1e12)
  with pytest.raises(SystemExit, match="no section 'other'"):
    plot.read_points(results.read_text(), "other")


def test_view_invariance_measures_each_op_against_the_clean_bank(monkeypatch):
  """scripts/view_invariance.py: clean queries that are the bank find themselves (100% on
  pixels); on grey images "grayscale" is the same view as "none" (so the same accuracy,
  for pixels and encoders); solarize leaves no pixel above mid-grey."""
  monkeypatch.syspath_prepend(os.path.join(REPO, "scripts"))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import view_invariance  # pylint: disable=g-import-not-at-top
  from lut_jax.data import device_input, image_utils  # pylint: disable=g-import-not-at-top
  from lut_jax.models import vit  # pylint: disable=g-import-not-at-top
  from lut_jax.weights import loading  # pylint: disable=g-import-not-at-top

  images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)
  split = device_input.Split(images, np.arange(40, dtype=np.int32) % 4, "random")
  views = {c: view_invariance.query_images(images, 3, c, seed=1)
           for c in ("grayscale", "none", "solarize", "view2")}
  np.testing.assert_allclose(views["grayscale"], views["none"], atol=1e-6)
  assert image_utils.denormalize(views["solarize"], 3).max() <= 0.5 + 1e-5
  assert image_utils.denormalize(views["view2"], 3).max() > 0.6
  encoder = vit.Encoder(image_size=16, patch_size=4, width=32, depth=1, num_heads=2)
  params = encoder.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  table = view_invariance.measure(
      split, split, {"E": loading.Pretrained(encoder=encoder, params=params, channels=3)},
      channels=3, seed=1)
  assert set(table) == {"pixels", "E cls", "E mean"}
  assert table["pixels"]["clean"] == 100.0
  for row in table.values():
    assert set(row) == set(view_invariance.CONDITIONS)
    assert row["grayscale"] == pytest.approx(row["none"])
    assert all(0.0 <= v <= 100.0 for v in row.values())
  assert "| pixels | 100.0 |" in view_invariance.markdown(table)


def test_digits_folder_writes_a_class_folder_data_set_from_the_wheel(tmp_path, monkeypatch):
  """scripts/digits_folder.py: the digits CSV read from a scikit-learn wheel, per class the
  first N in file order to train/, the rest to test/, 8x8 levels 0..16 -> 0..255 at 28 px."""
  monkeypatch.syspath_prepend(os.path.join(REPO, "scripts"))
  import gzip  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import digits_folder  # pylint: disable=g-import-not-at-top

  rows = [[16.0 * (i % 2)] * 64 + [i % 10] for i in range(30)]  # 3 per class
  csv = "\n".join(",".join(f"{v:g}" for v in row) for row in rows).encode()
  wheel = tmp_path / "scikit_learn-0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr("sklearn/datasets/data/digits.csv.gz", gzip.compress(csv))
  out = tmp_path / "digits"
  digits_folder.main([f"--out={out}", f"--sklearn_wheel={tmp_path}/scikit_learn-*.whl",
                      "--train_per_class=2"])
  for split, per_class in (("train", 2), ("test", 1)):
    assert sorted(os.listdir(out / split)) == [str(d) for d in range(10)]
    for digit in range(10):
      assert len(os.listdir(out / split / str(digit))) == per_class
  # Row 1 (digit 1, all 16s) is the first 1 in file order: train, white; row 0 is black.
  white = np.asarray(Image.open(out / "train" / "1" / "0001.png"))
  black = np.asarray(Image.open(out / "train" / "0" / "0000.png"))
  assert white.shape == (28, 28) and white.min() == 255 and black.max() == 0
  with pytest.raises(SystemExit, match="not empty"):
    digits_folder.main([f"--out={out}", f"--sklearn_wheel={wheel}"])
