"""The evaluation protocols by name (``config.mode``), which ``lut-eval`` dispatches through.

A protocol is a module with ``validate(config)`` (its own fields; raises
``eval_config.EvalConfigError``), ``run(config, workdir)`` (writes and returns its results)
and ``NEEDS_TENSORFLOW``: what of it needs TensorFlow, in words, or ``""`` (``lut-eval``
checks it first); adding one: docs/architecture.md.
"""

from __future__ import annotations

import types

import ml_collections

from lut_jax.evaluation import eval_config, finetune, knn, linear_probe, robustness, segmentation
from lut_jax.weights import sources

PROTOCOLS: dict[str, types.ModuleType] = {
    "knn": knn,
    "linear_probe": linear_probe,
    "finetune": finetune,
    "robustness": robustness,
    "segmentation": segmentation,
}


def get(mode: str) -> types.ModuleType:
  """The protocol named ``mode``; an unknown name is an :class:`EvalConfigError`."""
  if mode not in PROTOCOLS:
    eval_config.fail(f"unknown mode {mode!r}; expected one of {', '.join(PROTOCOLS)}")
  return PROTOCOLS[mode]


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks an evaluation config before anything is read or written: the fields every mode
  has, the pre-trained weights it names (a missing path or one that is no known kind of
  weights fails here, before the work directory is touched), then its protocol's."""
  protocol = get(config.mode)
  eval_config.validate(config)
  if "pretrained" in config:
    sources.locate(config.pretrained)
  protocol.validate(config)
