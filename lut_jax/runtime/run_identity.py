"""What makes a rerun in the same work directory "the same run", in one place.

A resumed pre-training run continues the run only when everything that decides its steps
is unchanged: the config outside :data:`RESUME_MAY_CHANGE` (``config.json``, and each
checkpoint's own copy), and a record of the input that the config does not fix
(``input_record.json``). A supervised evaluation run's settings are those outside
:data:`TRAINING_MAY_CHANGE` (:func:`training_settings`). Comparisons name every differing
field as ``field: before -> now`` (:func:`differences`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from absl import logging
from etils import epath
import jax
import ml_collections

from lut_jax import config_lib, errors

# Fields a resumed pre-training run may change: how it logs, saves and lays out the
# computation, never what it computes. Every other field must equal the saved config.json,
# else the resumed run would silently be a different run.
RESUME_MAY_CHANGE = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                     "keep_checkpoint_every_steps",
                     "image_summary_every_steps", "profile_steps", "monitor", "input.data_dir",
                     "input.prefetch", "input.num_parallel_calls", "mesh", "model.remat",
                     "model.remat_policy", "model.attention_impl")

# Fields of a probe / fine-tuning / segmentation block that say how often to evaluate, or
# what to recompute in the backward pass, never what is trained: a resumed supervised run
# may change them (:func:`training_settings`).
TRAINING_MAY_CHANGE = ("eval_every_epochs", "eval_every_steps", "eval_mode", "eval_stride",
                       "remat")

INPUT_RECORD_FILE = "input_record.json"


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{"a.b": leaf}`` of a nested dict, in insertion order."""
  out = {}
  for key, value in (tree or {}).items():
    if isinstance(value, dict):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def differences(before: Mapping[str, Any], now: Mapping[str, Any],
                may_change: Sequence[str] = ()) -> list[str]:
  """``["a.b: before -> now", ...]``: the dotted fields where two nested dicts differ (a
  field one lacks reads as None), except those in ``may_change`` or under one of them;
  ``now``'s fields first, in their order."""
  now, before = flat(now), flat(before)
  may = lambda k: any(k == f or k.startswith(f + ".") for f in may_change)  # noqa: E731
  return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in {**now, **before}
          if not may(k) and now.get(k) != before.get(k)]


def config_changes(saved: ml_collections.ConfigDict,
                   config: ml_collections.ConfigDict) -> list[str]:
  """Where ``config`` differs from a run's ``saved`` config outside
  :data:`RESUME_MAY_CHANGE` (empty: it continues that run)."""
  return differences(json.loads(saved.to_json_best_effort()),
                     json.loads(config.to_json_best_effort()), RESUME_MAY_CHANGE)


def training_settings(config: ml_collections.ConfigDict, *blocks: str) -> dict[str, Any]:
  """The fields of ``config``'s ``blocks`` (e.g. ``"finetune", "augment"``) that decide
  what a supervised run trains, as ``{"block.field": value}``: all but
  :data:`TRAINING_MAY_CHANGE`. Part of the key a resumed run must match, so that a rerun
  with another learning rate or schedule in the same work directory is refused."""
  return {f"{block}.{k}": v for block in blocks for k, v in config[block].to_dict().items()
          if k not in TRAINING_MAY_CHANGE}


def check_resume_config(config: ml_collections.ConfigDict, workdir: str, *,
                        adopt: bool = False) -> None:
  """Raises ``ConfigError`` when a resumed run's config differs from the saved one outside
  ``RESUME_MAY_CHANGE``, or ``WorkdirError`` when there is no saved config (unless
  ``adopt``)."""
  try:
    saved = config_lib.load_config(workdir)
  except FileNotFoundError:
    if adopt:
      logging.warning("%s has checkpoints but no config.json: adopting them with this "
                      "config (--adopt_checkpoint).", workdir)
      return
    raise errors.WorkdirError(
        f"{workdir} holds checkpoints but no {config_lib.CONFIG_FILE}, so this config cannot "
        "be checked against the one they were trained with",
        hint="pass --adopt_checkpoint if this config is the checkpoints' own (it is then "
             "saved), or use a new --workdir") from None
  changed = config_changes(saved, config)
  if changed:
    raise errors.ConfigError(
        f"{workdir} holds a run with a different config ({'; '.join(changed)}); resuming "
        "would not continue that run",
        hint="use a new --workdir, or restore the saved values (see its config.json)")


def check_input_record(workdir: str, record: Mapping[str, Any], *, resuming: bool) -> None:
  """Records in ``workdir`` what the run's input is read from (``record``: JSON-able), or, on
  resume, raises ``WorkdirError`` when it differs from the recorded one. A resumed step must
  see the examples the uninterrupted run would have seen, and the config alone does not fix
  them: the data behind a path can change, and so can the process count that splits each epoch
  (``lut_jax.pretrain.train.input_record`` says what pre-training records). A run from before
  this record existed records it now."""
  path = epath.Path(workdir) / INPUT_RECORD_FILE
  if resuming and path.exists():
    changed = differences(json.loads(path.read_text()), record)
    if changed:
      raise errors.WorkdirError(
          f"{workdir} was trained on other input ({'; '.join(changed)}); resuming would "
          "not give its steps the examples of the uninterrupted run",
          hint="resume on the same data and process count, or start a new --workdir")
    return
  if jax.process_index() == 0:
    path.write_text(json.dumps(dict(record), indent=1) + "\n")
