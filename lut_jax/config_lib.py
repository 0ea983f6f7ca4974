"""Shared pieces of the config files: argument parsing and the base pre-training config."""

from __future__ import annotations

import difflib
import json
from typing import Any, Iterable

import ml_collections
from ml_collections import config_dict

METHODS = ("lut", "mae")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"variant=B/16,method=mae"`` (the text after the config file's colon); an
  unknown key is a ``ValueError`` naming the accepted ones."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"bad config argument {item!r}; accepted: "
                       + ", ".join(f"{k}=..." for k in defaults))
    out[key] = value
  return ml_collections.ConfigDict(out)


# The repository's configs/ folder, installed as this package so that a plain
# ``pip install`` (no source tree) still has every config file (setup.py's package_dir).
PACKAGED_CONFIGS = "lut_jax.configs"


def resolve_config_file(value: str) -> str:
  """A ``--config`` value (``PATH[:args]``) with ``PATH`` found: as given when it exists
  (or is a URL), else the packaged config of that name, so ``configs/knn.py``, ``knn.py``
  and ``knn`` all work after a plain install. Any other missing path (``my_exps/knn.py``) and
  unknown names are returned unchanged: the flag then reports the missing file, where a
  fallback would silently run the stock config in place of the user's own."""
  import importlib.resources  # local: only the command lines need it
  import os

  path, sep, args = value.partition(":")
  if not path or "://" in value or os.path.exists(path):
    return value
  folder, name = os.path.split(path)
  if os.path.normpath(folder) not in (".", "configs"):
    return value
  packaged = importlib.resources.files(PACKAGED_CONFIGS) / (
      name if name.endswith(".py") else f"{name}.py")
  return f"{packaged}{sep}{args}" if packaged.is_file() else value


def resolve_config_args(argv: list[str]) -> list[str]:
  """``argv`` with each ``--config=VALUE`` / ``--config VALUE`` passed through
  :func:`resolve_config_file`."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + resolve_config_file(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config_file(out[i + 1])
  return out


def _dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for name, value in config.items():
    keys.append(prefix + name)
    if isinstance(value, ml_collections.ConfigDict):
      keys += _dotted_keys(value, prefix + name + ".")
  return keys


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets existing dotted keys (``{"model.head_norm": "layer"}``) as ``--config.x=y`` does,
  and returns ``config``. A key the config does not have is a ``ValueError`` naming the
  nearest one: an unlocked ConfigDict would otherwise grow a field that nothing reads (an
  ablation of ``w_bc=1.0`` silently ran the default ``loss.w_bc``).
  """
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for name in parents:
      node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      known = _dotted_keys(config)
      near = ([k for k in known if k.rsplit(".", 1)[-1] == leaf]
              or difflib.get_close_matches(key, known, n=1))
      raise ValueError(f"unknown config key {key!r}"
                       + (f"; did you mean {near[0]!r}?" if near else ""))
    node[leaf] = value
  return config


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
  """``["loss.w_bc=1", "model.teacher_bn=batch"]`` -> ``{key: value}`` for :func:`override`:
  JSON where it parses, ``True``/``False`` booleans, else the string itself."""
  out = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ValueError(f"bad config override {item!r}; expected key.sub=value")
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      value = {"true": True, "false": False}.get(text.lower(), text)
    out[key] = value
  return out


def _steps_or_epochs(value: float | None = None) -> config_dict.FieldReference:
  """A field of a steps / epochs pair: a number, or None when the other one is set.
  Untyped: a typed ``int`` field cannot be set to None on the command line
  (``--config.total_steps=None``); ``pretrain.build.validate`` checks the value instead."""
  return config_dict.FieldReference(value, field_type=object)


def base_config(method: str = "lut") -> ml_collections.ConfigDict:
  """Every pre-training field with its value in the documented LUT recipe; configs and
  code read these fields without fallbacks."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  # Length of the run: exactly one of total_steps / total_epochs (passes over the train
  # split), the other None; the same for optim.warmup_steps / optim.warmup_epochs.
  c.total_steps = _steps_or_epochs()
  c.total_epochs = _steps_or_epochs(1600.0)

  c.input = ml_collections.ConfigDict()
  # "tfdata": tf.data on the host (any size of data set; needs TensorFlow). "device": the
  # split in accelerator memory, views made on the device (lut_jax/data/device_input.py;
  # Fashion-MNIST-sized data; no TensorFlow).
  c.input.backend = "tfdata"
  c.input.dataset = "imagenet2012"  # any tfds image dataset, or "folder:/path/to/images"
  c.input.split = "train"
  c.input.data_dir = ml_collections.config_dict.placeholder(str)
  c.input.image_size = 224
  c.input.channels = 3
  c.input.batch_size = 4096  # global batch, over all devices and processes
  c.input.shuffle_buffer = 10_000
  c.input.prefetch = 2
  c.input.num_parallel_calls = -1  # tf.data.AUTOTUNE
  # View 2's colour ops and the normalisation on the accelerator (lut_jax/data/device_augment.py);
  # the host then yields uint8 crops. Same recipe, same draws; less host CPU per image.
  c.input.device_augment = False
  # View 2's strong op, one per image drawn uniformly from these (image_utils.STRONG_OPS;
  # "none" = the jittered view as is). The method's three; others are for ablations.
  c.input.view2_ops = "grayscale,solarize,blur"
  # Random horizontal flips of both views (the method's). Off for data whose classes a
  # mirror image changes (digits, text): LUT's second loss would teach flip invariance.
  c.input.random_flip = True

  c.model = ml_collections.ConfigDict()
  c.model.variant = "B/16"
  c.model.decoder_width = 512
  c.model.decoder_depth = 8
  c.model.decoder_num_heads = 16
  c.model.head_depth = 2
  c.model.pred_depth = 2
  c.model.head_hidden_dim = 4096
  c.model.head_norm = "batch"
  c.model.head_activation = "relu"
  # The teacher's projector batch norm: "running" averages (the reference's eval-mode EMA
  # model) or each view's "batch" statistics (BYOL's target; not the reference). Short runs
  # leave the running averages near their initial values; docs/results.md measures both.
  c.model.teacher_bn = "running"
  # Examples per batch-norm statistics group in the heads (0: the whole batch, or micro-batch
  # with optim.accum_steps). The reference computes them per micro-batch of its command:
  # configs/pretrain.py sets its 1024 (8 GPUs x 128).
  c.model.head_bn_group_size = 0
  c.model.remat = False
  # What a rematerialised block keeps (a jax.checkpoint_policies name; "" = nothing).
  c.model.remat_policy = ""
  # Speed levers that change the computed function slightly, off by default (the reference
  # uses neither): the tanh GELU in the transformer MLPs, and the teacher's residual stream
  # in the compute dtype (bf16) instead of float32.
  c.model.gelu_approximate = False
  c.model.teacher_residual_in_compute_dtype = False
  # "" = cuDNN flash attention on NVIDIA GPUs in bf16, else XLA's; or "xla" / "cudnn".
  c.model.attention_impl = ""

  c.loss = ml_collections.ConfigDict()
  c.loss.mask_ratio = 0.75
  c.loss.norm_pix = True
  c.loss.w_mae = 1.0
  c.loss.w_bc = 0.25 if method == "lut" else 0.0  # `method` decides whether it exists

  c.ema = ml_collections.ConfigDict()
  c.ema.momentum = 0.996  # tau0; cosine schedule to 1 over the run

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 1.5e-4  # peak lr = base_lr * batch_size / 256
  c.optim.min_lr = 0.0
  c.optim.warmup_steps = _steps_or_epochs()
  c.optim.warmup_epochs = _steps_or_epochs(40.0)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.grad_clip_norm = 0.0  # 0 disables clipping
  c.optim.accum_steps = 1  # micro-batches per optimizer step

  # Measurements of the encoder during the run (lut_jax/pretrain/monitor.py): kNN top-1 on held-out
  # images and the BC branch's collapse indicators. Reads its splits through the device
  # input path's loader, so only data sets that path reads.
  c.monitor = ml_collections.ConfigDict()
  c.monitor.every_steps = 0  # 0: off
  c.monitor.bank_split = "train[:10000]"
  c.monitor.query_split = "test[:2000]"
  c.monitor.knn_k = 20
  c.monitor.knn_temperature = 0.07

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1  # devices sharding params/optimizer state; -1 = all; rest is data

  c.dtype = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3  # the newest ones
  c.keep_checkpoint_every_steps = 0  # > 0: also keep every step that is a multiple of it
  c.image_summary_every_steps = 5000
  c.profile_steps = 0  # > 0: trace this many steps after the first log interval
  return c


DTYPES = ("float32", "bfloat16")
CONFIG_FILE = "config.json"


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in ``WORKDIR/config.json``. Fields the package gained after
  the run was saved read as their defaults: a new field's default keeps what earlier
  versions did, so the run's meaning is unchanged."""
  from etils import epath  # local: file systems beyond local disk (gs://, ...)

  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir!r} the work directory of a "
                            "lut_jax run? Every run writes its config.json there.")
  saved = json.loads(path.read_text())
  method = saved.get("method", "lut")
  defaults = json.loads(base_config(method if method in METHODS else "lut").to_json_best_effort())

  def fill(into: dict, base: dict) -> dict:
    for key, value in base.items():
      if key not in into:
        into[key] = value
      elif isinstance(value, dict) and isinstance(into[key], dict):
        fill(into[key], value)
    return into

  return ml_collections.ConfigDict(fill(saved, defaults))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``config`` as ``WORKDIR/config.json`` (process 0 only): every run keeps the
  exact configuration it ran with, and later tools read the model from it."""
  import jax  # local: config files import this module and need no jax

  from etils import epath  # local: file systems beyond local disk (gs://, ...)

  if jax.process_index() != 0:
    return
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(config_json(config))


def config_json(config: ml_collections.ConfigDict) -> str:
  """The text of a ``config.json``: what :func:`save_config` writes and checkpoints carry."""
  return config.to_json_best_effort(indent=2, sort_keys=True)


def uses_bc(config: ml_collections.ConfigDict) -> bool:
  """Whether the run has the BC branch (second view, teacher, heads): ``method`` decides;
  ``loss.w_bc`` only weighs it (:func:`lut_jax.pretrain.build.validate` keeps the two
  consistent)."""
  return config.method == "lut"
