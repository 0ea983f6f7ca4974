"""Pre-training config rules: method decides the BC branch, run length by steps or epochs."""

import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from configs import fashion_mnist, pretrain
from lut_jax import config_lib, errors
from lut_jax.pretrain import build
from tests import util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _validate(**overrides):
  build.validate(util.override(fashion_mnist.get_config().unlock(), overrides))


@pytest.mark.parametrize("overrides,expected", [
    ({"total_epochs": 5}, "total_steps=600 and total_epochs=5 are both set"),
    ({"total_steps": None}, "set one of total_steps and total_epochs"),
    ({"optim.warmup_epochs": 1.0}, "optim.warmup_steps=60 and optim.warmup_epochs=1.0"),
    ({"total_steps": 0}, "total_steps must be an integer >= 1"),
    ({"total_steps": None, "total_epochs": 0}, "total_epochs must be a number > 0"),
    ({"loss.w_bc": 0.0}, "method='lut' trains the BC loss"),
])
def test_contradictory_or_missing_fields_are_refused(overrides, expected):
  with pytest.raises(errors.ConfigError, match=expected):
    _validate(**overrides)


def test_mae_refuses_a_bc_weight_and_method_decides_the_branch():
  with pytest.raises(errors.ConfigError, match="method='mae'"):
    build.validate(util.override(fashion_mnist.get_config("method=mae").unlock(),
                                 {"loss.w_bc": 0.25}))
  assert config_lib.uses_bc(fashion_mnist.get_config())
  assert not config_lib.uses_bc(fashion_mnist.get_config("method=mae"))


def test_run_length_counts_steps_or_epochs():
  assert build.run_length(fashion_mnist.get_config()) == (600, 60)
  imagenet = pretrain.get_config()  # 1600 epochs, 40 of warmup, batch 4096
  assert build.run_length(imagenet, num_examples=4096 * 10) == (16000, 400)
  with pytest.raises(errors.ConfigError, match="total_epochs needs the data set size"):
    build.run_length(imagenet)


def test_command_line_switches_a_steps_config_to_epochs():
  argv = ["prog", f"--config={fashion_mnist.__file__}", "--config.total_steps=None",
          "--config.total_epochs=0.5"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  build.validate(config)
  assert build.run_length(config, num_examples=60_000) == (234, 60)


def test_config_files_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
  """A plain install has no source tree: ``--config=fashion_mnist`` (or the repository's
  ``configs/...`` spelling) finds the packaged copy, arguments kept; an existing path wins."""
  import os  # pylint: disable=g-import-not-at-top
  repo_configs = os.path.dirname(os.path.abspath(fashion_mnist.__file__))
  monkeypatch.chdir(tmp_path)  # no configs/ here
  packaged = config_lib.resolve_config_file("fashion_mnist")
  assert os.path.samefile(packaged, os.path.join(repo_configs, "fashion_mnist.py"))
  assert config_lib.resolve_config_file("configs/finetune.py:dataset=imagenet") == \
      config_lib.resolve_config_file("finetune") + ":dataset=imagenet"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "knn.py").write_text("# the user's own\n")
  assert config_lib.resolve_config_file("configs/knn.py") == "configs/knn.py"
  assert config_lib.resolve_config_file("no_such_config") == "no_such_config"
  # A mistyped path to the user's own file is reported missing, never replaced by the
  # packaged config of the same name.
  for own in ("my_exps/knn.py", "/home/me/finetune.py:dataset=cub", "./configs2/knn.py"):
    assert config_lib.resolve_config_file(own) == own
  assert config_lib.resolve_config_file("./knn.py") == config_lib.resolve_config_file("knn")
  assert config_lib.resolve_config_args(["prog", "--config", "knn.py", "--workdir=x"])[2] == \
      config_lib.resolve_config_file("knn")
  loaded = config_flags.config_flags._LoadConfigModule(  # what the --config flag does
      "packaged", config_lib.resolve_config_file("fashion_mnist")).get_config()
  assert loaded.model.variant == fashion_mnist.get_config().model.variant


def test_an_override_of_a_key_the_config_lacks_is_refused_with_the_nearest_key():
  config = fashion_mnist.get_config().unlock()
  # The leaf name alone: the dotted key that ends in it is suggested.
  with pytest.raises(ValueError, match=r"unknown config key 'w_bc'; did you mean 'loss.w_bc'"):
    config_lib.override(config, {"w_bc": 1.0})
  with pytest.raises(ValueError, match=r"'model.teacher_bm'; did you mean 'model.teacher_bn'"):
    config_lib.override(config, {"model.teacher_bm": "batch"})
  with pytest.raises(ValueError, match=r"unknown config key 'nothing.here'$"):
    config_lib.override(config, {"nothing.here": 1})
  assert "w_bc" not in config and config.loss.w_bc == 0.25  # nothing was added or changed
  config_lib.override(config, {"loss.w_bc": 1.0, "model.teacher_bn": "batch"})
  assert (config.loss.w_bc, config.model.teacher_bn) == (1.0, "batch")


def test_override_strings_parse_as_json_then_booleans_then_text():
  assert config_lib.parse_overrides(
      ["loss.w_bc=1", "ema.momentum=0.97", "model.teacher_bn=batch", 'dtype="bfloat16"',
       "model.remat=True", "total_epochs=null", "a.b=x=y"]) == {
           "loss.w_bc": 1, "ema.momentum": 0.97, "model.teacher_bn": "batch",
           "dtype": "bfloat16", "model.remat": True, "total_epochs": None, "a.b": "x=y"}
  with pytest.raises(ValueError, match="bad config override 'loss.w_bc'"):
    config_lib.parse_overrides(["loss.w_bc"])


def test_the_comparison_script_refuses_a_misspelt_ablation_before_any_run(tmp_path):
  result = subprocess.run(
      [sys.executable, "scripts/compare_lut_mae.py", f"--workdir={tmp_path}", "--methods=lut",
       "--set=w_bc=1.0"], capture_output=True, text=True, cwd=REPO, env=util.one_device_env(), timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "compare_lut_mae.py: lut config: unknown config key 'w_bc'; did you mean 'loss.w_bc'?")
  assert not any(tmp_path.iterdir())  # nothing pre-trained or written
