"""scripts/benchmark.py: the compiled step's timing modes (not the speeds: those belong in
docs/benchmarks.md)."""

import json
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import benchmark  # noqa: E402  pylint: disable=g-import-not-at-top

TINY = ["--config=configs/fashion_mnist.py", "--variant=mu/4", "--image_size=16", "--batch=8",
        "--method=mae", "--dtype=float32", "--steps=2", "--warmup=1", "--repeats=3",
        "--no-measure_peak"]


def test_a_plain_run_records_every_window_and_their_medians():
  (rec,) = benchmark.main(TINY)["results"]
  windows = len(rec["window_ms_per_step"])
  assert windows == 3
  assert len(rec["window_cpu_ms_per_step"]) == len(rec["window_minor_faults_per_step"]) == 3
  # Wall and CPU time per step are the median windows (one window with a one-off cost does
  # not move them); faults per step are the mean, so a one-off growth of the heap shows.
  assert rec["ms_per_step"] == sorted(rec["window_ms_per_step"])[1]
  assert rec["cpu_ms_per_step"] == sorted(rec["window_cpu_ms_per_step"])[1]
  assert rec["minor_faults_per_step"] == pytest.approx(
      sum(rec["window_minor_faults_per_step"]) / windows)
  assert min(rec["window_cpu_ms_per_step"]) > 0


def test_both_frameworks_are_compared_per_image_and_per_cpu_second():
  pytest.importorskip("torch")
  ours, reference = benchmark.main(TINY + ["--framework=both", "--torch_threads=1"])["results"]
  assert (ours["framework"], reference["framework"]) == ("jax", "torch")
  assert ours["ratio_vs_torch"] == pytest.approx(
      ours["images_per_s"] / reference["images_per_s"])
  assert ours["cpu_ratio_vs_torch"] == pytest.approx(
      reference["cpu_ms_per_step"] / ours["cpu_ms_per_step"])


def test_alternate_times_baseline_and_variants_in_paired_rounds(tmp_path):
  path = tmp_path / "alt.json"
  out = benchmark.main(TINY + ["--alternate=model.decoder_depth=1",
                               "--alternate=model.gelu_approximate=true,model.decoder_depth=1",
                               f"--json_out={path}"])
  base, shallow, both = out["results"]
  assert [r["alternate"] for r in out["results"]] == [
      "baseline", "model.decoder_depth=1", "model.gelu_approximate=true,model.decoder_depth=1"]
  # Each variant is its own compiled config: the override reached the model.
  assert base["overrides"] == [] and both["overrides"] == [
      "model.gelu_approximate=true", "model.decoder_depth=1"]
  assert shallow["num_params"] == both["num_params"] < base["num_params"]
  for rec in out["results"]:
    assert len(rec["window_ms_per_step"]) == len(rec["window_cpu_ms_per_step"]) == 3
    assert min(rec["window_ms_per_step"]) > 0
    assert rec["ms_per_step"] == sorted(rec["window_ms_per_step"])[1]
  assert base["speedup_wall"] == base["speedup_cpu"] == 1.0
  # A variant's speed-up is the median of its per-round ratios to the baseline's window.
  paired = sorted(b / v for b, v in zip(base["window_ms_per_step"],
                                        shallow["window_ms_per_step"]))
  assert shallow["speedup_wall"] == pytest.approx(paired[1])
  assert json.loads(path.read_text())["results"][2]["alternate"] == both["alternate"]


def test_alternate_env_runs_each_environment_in_its_own_process(tmp_path):
  """Each variant's variable reaches its own child's program: an XLA flag that makes every
  program dump its HLO into a folder, a different folder for each variant."""
  dumps = [tmp_path / "a", tmp_path / "b"]
  out = benchmark.main(TINY + [f"--alternate_env=XLA_FLAGS=--xla_dump_to={d}" for d in dumps])
  base, *variants = out["results"]
  assert [r["alternate"] for r in out["results"]] == [
      "baseline", *(f"XLA_FLAGS=--xla_dump_to={d}" for d in dumps)]
  assert all(any(d.iterdir()) for d in dumps)
  for rec in out["results"]:
    assert len(rec["window_ms_per_step"]) == 3 and rec["minor_faults_per_step"] >= 0
    assert rec["num_params"] == base["num_params"]  # the same config in every child
  assert base["speedup_wall"] == 1.0
  paired = sorted(b / v for b, v in zip(base["window_ms_per_step"],
                                        variants[0]["window_ms_per_step"]))
  assert variants[0]["speedup_wall"] == pytest.approx(paired[1])


def _children_of_this_process() -> list[str]:
  found = []
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:  # exited meanwhile
      continue
    if int(fields[1]) == os.getpid() and fields[0] != "Z":  # parent, state
      found.append(stat.parent.name)
  return found


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="needs /proc")
def test_alternate_env_reports_a_child_that_fails_and_leaves_none_behind():
  """The second child dies at start (an XLA flag that does not exist): the run stops with
  one error, and the first child, already compiled and waiting, is closed too."""
  with pytest.raises(RuntimeError, match="benchmark child process exited with"):
    benchmark.main(TINY + ["--alternate_env=XLA_FLAGS=--xla_no_such_flag_for_this_test=1"])
  assert _children_of_this_process() == []


def test_alternate_env_children_share_the_accelerator_memory():
  base, flags = benchmark.child_environments(
      ["XLA_FLAGS=--a=1 --b"], {"PATH": "/bin", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"})
  assert base["PATH"] == flags["PATH"] == "/bin" and "XLA_FLAGS" not in base
  assert flags["XLA_FLAGS"] == "--a=1 --b"  # split at the first "=" only
  fraction = "XLA_PYTHON_CLIENT_MEM_FRACTION"
  assert base[fraction] == flags[fraction] == "0.450"
  assert base["LUT_JAX_MALLOC_TUNED"] == "1"  # no malloc restart inside a child


@pytest.mark.parametrize("bad, message", [
    (["--alternate_env=NOVALUE"], "expected NAME=VALUE"),
    (["--alternate_env==x"], "expected NAME=VALUE"),
    (["--alternate_env=A=1", "--alternate=model.decoder_depth=1"], "choose one"),
])
def test_alternate_env_refuses_malformed_variants(bad, message, capsys):
  with pytest.raises(SystemExit):
    benchmark.parse_args(TINY + bad)
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("other", ["--framework=both", "--find_max_batch", "--profile_dir=x"])
def test_alternate_refuses_the_modes_it_does_not_run(other, capsys):
  with pytest.raises(SystemExit):
    benchmark.parse_args(TINY + ["--alternate=model.decoder_depth=1", other])
  assert "time our step only" in capsys.readouterr().err
