"""scripts/benchmark_torch.py runs the config it is given and names what it cannot run.

The reference step reads a fixed set of config fields; an override of any other field (a
JAX-only speed lever) must show in its record, so a ratio against it is never read as the
reference running that lever.
"""

import argparse
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import benchmark_torch  # noqa: E402  pylint: disable=g-import-not-at-top


def _args(*overrides: str) -> argparse.Namespace:
  return argparse.Namespace(config="configs/fashion_mnist.py", variant="mu/4", image_size=None,
                            batch=4, override=list(overrides), device="cpu", dtype="float32",
                            compile=False, steps=1, warmup=1, repeats=1)


@pytest.mark.parametrize("config_file", ["configs/pretrain.py", "configs/fashion_mnist.py"])
def test_every_field_the_reference_reads_exists(config_file):
  config = benchmark_torch.load_config(argparse.Namespace(
      config=config_file, variant=None, image_size=None, batch=8, override=[]), "lut")
  for key in benchmark_torch.READS:
    node = config
    for part in key.split("."):
      assert part in node, f"{key} is not a field of {config_file}"
      node = node[part]


def test_overrides_the_reference_does_not_run_are_recorded():
  base = benchmark_torch.run(_args(), "lut")
  assert base["overrides_ignored"] == []
  rec = benchmark_torch.run(_args("model.decoder_depth=3", "model.remat=true",
                                  "model.gelu_approximate=true"), "lut")
  assert rec["overrides_ignored"] == ["model.remat=true", "model.gelu_approximate=true"]
  # A field it reads does change the reference's model: one more decoder block.
  assert rec["num_params"] > base["num_params"]


def test_cpu_time_is_recorded_per_window_and_summarised_as_ours():
  """The reference's record has the fields ours has, with the same median, so
  scripts/benchmark.py's per-CPU-second ratio compares like with like."""
  args = _args()
  args.repeats = 3
  rec = benchmark_torch.run(args, "mae")
  assert len(rec["window_cpu_ms_per_step"]) == len(rec["window_minor_faults_per_step"]) == 3
  assert min(rec["window_cpu_ms_per_step"]) > 0
  assert rec["cpu_ms_per_step"] == sorted(rec["window_cpu_ms_per_step"])[1]
  assert rec["ms_per_step"] == sorted(rec["window_ms_per_step"])[1]
