"""Shared pieces of the config files: argument parsing and the base pre-training config."""

from __future__ import annotations

import difflib
import json
from typing import Any, Iterable

import ml_collections
from ml_collections import config_dict

from lut_jax import errors

METHODS = ("lut", "mae")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"variant=B/16,method=mae"`` (the text after the config file's colon).

  Unknown keys raise ``ValueError`` naming the accepted ones.
  """
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
  and returns ``config``.

  A key the config does not have raises ``ValueError`` naming the nearest existing key: an
  unlocked ConfigDict would otherwise grow a new field that nothing reads (an ablation of
  ``w_bc=1.0`` silently ran the default ``loss.w_bc``).
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
  """``["loss.w_bc=1", "model.teacher_bn=batch"]`` -> ``{key: value}`` for :func:`override`.

  Values are JSON where they parse (numbers, ``true``, ``null``, ``"quoted"``, lists);
  ``True``/``False`` are booleans; anything else is the string itself.
  """
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

  Untyped, because a typed ``int`` field cannot be set to None on the command line
  (``--config.total_steps=None``); :func:`validate` checks the value instead.
  """
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


ConfigError = errors.ConfigError  # raised by validate(); re-exported for config users


DTYPES = ("float32", "bfloat16")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a pre-training config; raises :class:`ConfigError` naming the bad field."""
  # local: avoid importing jax for plain config files
  from lut_jax.data import device_input
  from lut_jax.pretrain import masking
  from lut_jax.models import vit
  from lut_jax.runtime import optim

  def fail(msg, hint=""):
    raise ConfigError(msg, hint)

  if config.method not in METHODS:
    fail(f"unknown method {config.method!r}; expected one of {METHODS}")
  if config.loss.w_bc < 0 or config.loss.w_mae < 0:
    fail(f"loss weights must be >= 0, got w_mae={config.loss.w_mae}, w_bc={config.loss.w_bc}")
  # `method` alone decides whether the BC branch exists (uses_bc): a weight contradicting
  # it would train one method and record the other.
  if config.method == "lut" and config.loss.w_bc <= 0:
    fail(f"method='lut' trains the BC loss: loss.w_bc must be > 0, got {config.loss.w_bc}",
         hint="use method=mae for the baseline")
  if config.method == "mae" and config.loss.w_bc != 0:
    fail(f"method='mae' is the baseline without the BC loss; got loss.w_bc={config.loss.w_bc}")
  if config.dtype not in DTYPES:
    fail(f"unknown dtype {config.dtype!r}; expected one of {DTYPES}")
  if config.input.batch_size <= 0:
    fail(f"input.batch_size must be positive, got {config.input.batch_size}")
  # Exactly one of each steps / epochs pair, the other None: were both set, one would
  # silently win while config.json recorded both.
  for name, steps, epochs in (
      ("total", config.total_steps, config.total_epochs),
      ("optim.warmup", config.optim.warmup_steps, config.optim.warmup_epochs)):
    if steps is not None and epochs is not None:
      fail(f"{name}_steps={steps} and {name}_epochs={epochs} are both set; set exactly one",
           hint=f"add --config.{name}_steps=None to count in epochs, or "
                f"--config.{name}_epochs=None to count in steps")
    if steps is None and epochs is None:
      fail(f"set one of {name}_steps and {name}_epochs; both are None")
    least = 1 if name == "total" else 0  # a run needs a step; a warmup may be empty
    if steps is not None and not (type(steps) is int and steps >= least):
      fail(f"{name}_steps must be an integer >= {least}, got {steps!r}")
    if epochs is not None and not (type(epochs) in (int, float)
                                   and (epochs > 0 if least else epochs >= 0)):
      fail(f"{name}_epochs must be a number {'> 0' if least else '>= 0'}, got {epochs!r}")
  for name in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
               "image_summary_every_steps"):
    if config[name] <= 0:
      fail(f"{name} must be positive, got {config[name]}")
  if config.keep_checkpoint_every_steps < 0:
    fail("keep_checkpoint_every_steps must be >= 0 (0: only the newest keep_checkpoints), "
         f"got {config.keep_checkpoint_every_steps}")
  if config.optim.accum_steps < 1:
    fail(f"optim.accum_steps must be >= 1, got {config.optim.accum_steps}")
  group = config.model.head_bn_group_size
  micro = config.input.batch_size // config.optim.accum_steps
  if group < 0 or 0 < group < micro and micro % group:
    fail(f"model.head_bn_group_size must be 0 or divide the (micro-)batch of {micro}, got "
         f"{group}")
  o = config.optim
  if not o.base_lr > 0:
    fail(f"optim.base_lr must be > 0, got {o.base_lr}")
  peak_lr = optim.peak_learning_rate(o.base_lr, config.input.batch_size)
  if not 0 <= o.min_lr <= peak_lr:
    fail(f"optim.min_lr must be in [0, peak lr {peak_lr:g}], got {o.min_lr}")
  if not o.weight_decay >= 0:
    fail(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
  for name in ("b1", "b2"):
    if not 0 <= o[name] < 1:
      fail(f"optim.{name} must be in [0, 1), got {o[name]}")
  if not o.grad_clip_norm >= 0:
    fail(f"optim.grad_clip_norm must be >= 0 (0 disables clipping), got {o.grad_clip_norm}")
  if not 0 <= config.ema.momentum <= 1:
    fail(f"ema.momentum must be in [0, 1], got {config.ema.momentum}")
  try:
    # Checked without building the model: build.build_training builds it, once.
    spec = vit.check_model_config(config.model, image_size=config.input.image_size,
                                     dtype=config.dtype)
    masking.check_mask_ratio(config.loss.mask_ratio,
                             (config.input.image_size // spec.patch_size) ** 2,
                             two_views=uses_bc(config))
  except ValueError as e:
    fail(str(e))
  if config.input.channels not in (1, 3):
    fail(f"input.channels must be 1 or 3, got {config.input.channels}")
  device_input.check_backend(config.input)
  if config.monitor.every_steps < 0:
    fail(f"monitor.every_steps must be >= 0 (0 = off), got {config.monitor.every_steps}")


CONFIG_FILE = "config.json"


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in ``WORKDIR/config.json`` (see :func:`save_config`).

  Fields the package gained after the run was saved read as their defaults: a new field's
  default keeps what earlier versions did, so the run's meaning is unchanged.
  """
  import json  # local: only this function needs it
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
  ``loss.w_bc`` only weighs it (:func:`validate` keeps the two consistent)."""
  return config.method == "lut"
