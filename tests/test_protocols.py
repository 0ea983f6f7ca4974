"""lut-eval dispatches every mode through the protocol registry: a protocol is a module with
``validate(config)`` and ``run(config, workdir)``, added with one registry line."""

import types

import ml_collections
import pytest

from lut_jax.cli import evaluate as evaluate_cli
from lut_jax.evaluation import eval_config, protocols


def test_every_protocol_has_the_interface():
  assert list(protocols.PROTOCOLS) == ["knn", "linear_probe", "finetune", "robustness",
                                       "segmentation"]
  for protocol in protocols.PROTOCOLS.values():
    assert callable(protocol.validate) and callable(protocol.run)


def test_a_registered_protocol_is_validated_and_run_and_an_unknown_mode_lists_them(
    tmp_path, monkeypatch):
  calls = []
  fake = types.SimpleNamespace(
      validate=lambda config: calls.append(("validate", config.mode)),
      run=lambda config, workdir: calls.append(("run", workdir)) or {"score": 1.0})
  monkeypatch.setitem(protocols.PROTOCOLS, "fake", fake)
  config = ml_collections.ConfigDict({"mode": "fake", "seed": 0,
                                      "input": {"eval_batch_size": 8}})
  workdir = str(tmp_path / "fake")
  assert evaluate_cli.evaluate(config, workdir) == {"score": 1.0}
  assert calls == [("validate", "fake"), ("run", workdir)]
  config.mode = "fak"
  with pytest.raises(eval_config.EvalConfigError) as e:
    evaluate_cli.evaluate(config, workdir)
  assert str(e.value) == ("unknown mode 'fak'; expected one of knn, linear_probe, finetune, "
                          "robustness, segmentation, fake")
