"""The frozen features of a pre-trained encoder.

Every downstream evaluation starts from the *online* (student) encoder, ``params["encoder"]``
of the pre-training ``TrainState`` — not the EMA teacher — as the reference does, loaded by
:func:`lut_jax.weights.loading.load` from any source it reads.

Features are float32 vectors per image from one forward pass: ``"cls"``, the cls token after
the final LayerNorm (MAE's linear-probe feature), and ``"mean"``, the mean of the normalised
patch tokens (the vector LUT's BC loss trains). The centre crops come from
:func:`eval_batches`: in memory without TensorFlow or through tf.data
(:func:`lut_jax.data.eval_input.backend` picks), equal to float tolerance.

Cached features and resumable evaluation checkpoints are keyed by :func:`features_key`, so a
work directory reused for another encoder or input never reports stale numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence
import zipfile

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lut_jax import errors, metrics
from lut_jax.data import eval_input
from lut_jax.models import vit
from lut_jax.runtime import checkpointing, run_identity
from lut_jax.weights import loading, sources

POOLS = ("cls", "mean")
CACHE_KEY = "cache_key"  # the .npz entry holding the features' key (a JSON string)


def pool_tokens(tokens: jax.Array, pool: str) -> jax.Array:
  """``(batch, 1 + patches, width)`` encoder tokens -> ``(batch, width)`` float32 feature."""
  if pool == "cls":
    return tokens[:, 0].astype(jnp.float32)
  if pool == "mean":
    return vit.mean_patch_token(tokens)
  raise ValueError(f"unknown pool {pool!r}; expected one of {POOLS}")


def make_feature_fn(encoder: vit.Encoder, pools: Sequence[str] = POOLS):
  """A jitted ``(params, images) -> {pool: (batch, width)}``: one encoder pass, every pool."""
  for pool in pools:
    if pool not in POOLS:
      raise ValueError(f"unknown pool {pool!r}; expected one of {POOLS}")

  @jax.jit
  def feature_fn(params, images):
    tokens = encoder.apply({"params": params}, images, forward_only=True)
    return {pool: pool_tokens(tokens, pool) for pool in pools}

  return feature_fn


def extract_features(encoder: vit.Encoder, params: Any,
                     batches: Iterable[Mapping[str, Any]], *,
                     pools: Sequence[str] = POOLS) -> dict[str, np.ndarray]:
  """Frozen features of every (unpadded) example of ``batches`` (dicts with ``image``
  ``(B, S, S, C)`` normalised, ``label`` and optionally ``mask``, False on padding; numpy or
  global jax arrays): ``{pool: float32 (N, width), "label": int32 (N,)}`` on the host, in
  the order of ``batches`` (on several processes: process 0's examples first).
  """
  feature_fn = make_feature_fn(encoder, pools)
  out: dict[str, list[np.ndarray]] = {name: [] for name in (*pools, "label", "mask")}
  pending = None
  for batch in batches:
    feats = feature_fn(params, batch["image"])  # dispatched asynchronously
    mask = batch.get("mask")
    if mask is None:
      mask = np.ones(batch["label"].shape[0], bool)
    if pending is not None:  # fetch the previous batch while this one computes
      _append(out, pending)
    pending = {**feats, "label": batch["label"], "mask": mask}
  if pending is not None:
    _append(out, pending)
  if not out["label"]:
    raise ValueError("no batches to extract features from")
  arrays = {k: np.concatenate(v) for k, v in out.items()}
  keep = arrays.pop("mask").astype(bool)
  result = {k: v[keep] for k, v in arrays.items()}
  result["label"] = result["label"].astype(np.int32)
  return result


def _append(out: dict[str, list[np.ndarray]], batch: Mapping[str, Any]) -> None:
  host = metrics.to_host(dict(batch))
  for k, v in host.items():
    out[k].append(np.asarray(v))


def features_key(pretrained: loading.Pretrained, input_config: ml_collections.ConfigDict,
                 split: str, *, pools: Sequence[str] = (), crop_pct: Optional[float] = None,
                 backend: Optional[str] = None) -> dict[str, Any]:
  """Everything that determines what ``pretrained`` computes on ``split`` (JSON-able): the
  key of the cached features and of the checkpoints trained on them (:func:`check_resume_key`).

  ``input_config`` is the resolved eval input (``eval_config.input_config``); ``crop_pct``
  None is the pipeline's default for the size. ``backend``, the path that computed the
  images (:func:`eval_backend`; the two agree to float tolerance, not bit for bit), is left
  out when None: the other protocols' images are always tf.data's.
  """
  data_dir = input_config.data_dir
  if data_dir and not checkpointing.is_url(data_dir):  # local: the same data from any cwd
    data_dir = os.path.abspath(data_dir)
  return {"pretrained": pretrained.path, "step": pretrained.step,
          "params_sha256": pretrained.fingerprint, "encoder": dict(pretrained.config),
          "encoder_channels": pretrained.channels, "dataset": input_config.dataset,
          "data_dir": data_dir, "split": split, "image_size": int(input_config.image_size),
          "channels": int(input_config.channels), "crop_pct": crop_pct, "pools": list(pools),
          **({"backend": backend} if backend else {})}


def key_hash(key: Mapping[str, Any]) -> str:
  """A short stable hash of a key, for results files and logs."""
  return hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]


def describe_source(pretrained: loading.Pretrained,
                    keys: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """What a results file records of the encoder and input that produced its numbers:
  path (or ``hf-hub:org/name``), its kind, step, weights hash and the hash of each split's
  key."""
  return {"pretrained": pretrained.path or pretrained.source,
          "kind": pretrained.kind or None, "step": pretrained.step,
          "params_sha256": pretrained.fingerprint,
          "keys": {key["split"]: key_hash(key) for key in keys}}


def _canonical(key: Any) -> str:
  return json.dumps(key, sort_keys=True)


def _differences(stored: Any, key: Mapping[str, Any]) -> str:
  """The fields where ``stored`` (a decoded key) differs from ``key``, for messages."""
  if not isinstance(stored, dict):
    return "an unreadable key"
  expected = json.loads(_canonical(key))
  fields = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
  return "a different " + ", ".join(fields)


def _load_cache(path: str, key: Mapping[str, Any]) -> tuple[Optional[dict[str, np.ndarray]],
                                                             str]:
  """``(features, "")`` of the cache at ``path`` when saved under ``key``, else
  ``(None, why not)``."""
  try:
    with epath.Path(path).open("rb") as f, np.load(f) as data:
      if CACHE_KEY not in data.files:
        return None, "it has no key (an older format)"
      stored = str(data[CACHE_KEY])
      if stored != _canonical(key):
        return None, f"it was computed with {_differences(json.loads(stored), key)}"
      return {k: data[k] for k in data.files if k != CACHE_KEY}, ""
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    return None, f"it cannot be read ({type(e).__name__}: {e})"


def cached_features(path: Optional[str], key: Mapping[str, Any],
                    compute) -> dict[str, np.ndarray]:
  """Features from the ``.npz`` at ``path`` when it was saved under ``key``, else
  ``compute()`` (saved there with ``key`` by process 0, atomically).

  Extraction is the expensive part of kNN and linear probing; caching makes reruns and
  resumed runs cheap. A cache of another key, without one or unreadable is recomputed
  (and replaced), never trusted: it may hold another encoder's features.
  """
  if path and epath.Path(path).exists():
    cached, why = _load_cache(path, key)
    if cached is not None:
      return cached
    logging.info("Recomputing the features of %s: %s.", path, why)
  features = compute()
  if path and jax.process_index() == 0:
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / (target.name + ".tmp.npz")
    with tmp.open("wb") as f:
      np.savez(f, **features, **{CACHE_KEY: np.asarray(_canonical(key))})
    tmp.replace(target)
  return features


def training_key(config: ml_collections.ConfigDict, *blocks: str) -> dict[str, Any]:
  """The settings of ``config``'s ``blocks`` that decide the trained state
  (:func:`lut_jax.runtime.run_identity.training_settings`), with the seed and compute dtype:
  part of the resume key."""
  return {"seed": config.seed, "dtype": config.dtype,
          **run_identity.training_settings(config, *blocks)}


def check_resume_key(directory: str, mode: str, key: Mapping[str, Any]) -> None:
  """Lets a probe or fine-tuning run resume from ``directory`` only with the same key: the
  first run records ``mode`` and ``key`` beside its checkpoints; a later run finding them
  under another record, or none, raises ``WorkdirError`` rather than resuming them (a state
  trained on other features) or starting over in their place (losing them)."""
  record = {"mode": mode, "key": key}
  root = epath.Path(directory)
  path = root / sources.RESUME_KEY_FILE
  try:
    stored = json.loads(path.read_text())
  except FileNotFoundError:
    stored = None
  except (OSError, ValueError):
    stored = "unreadable"
  if stored == json.loads(_canonical(record)):
    return
  if root.is_dir() and any(p.name.isdigit() for p in root.iterdir()):
    if stored is None:
      why = "have no record of the encoder and input they were trained on"
    elif not isinstance(stored, dict):
      why = f"have an unreadable record ({path})"
    elif stored.get("mode") != mode:
      why = f"belong to a {stored.get('mode')} run"
    else:
      why = f"were trained with {_differences(stored.get('key'), key)}"
    raise errors.WorkdirError(
        f"the checkpoints in {directory} {why}; use a new --workdir for this {mode} run",
        hint=f"or delete {directory} to start this {mode} run over in the same work directory")
  if jax.process_index() == 0:  # no checkpoints yet: this run's record
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (sources.RESUME_KEY_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    tmp.replace(path)


def eval_backend(config: ml_collections.ConfigDict) -> str:
  """Which path computes the images of kNN and linear-probe features
  (``eval_input.backend``'s rule on ``config.input``): ``"device"`` or ``"tfdata"``."""
  return eval_input.backend(config.input.dataset, config.input.backend, config.input.data_dir)


def eval_batches(input_config: ml_collections.ConfigDict, split: str, backend: str, *,
                 batch_size: int, crop_pct: Optional[float],
                 sharding: jax.sharding.Sharding) -> Iterable[Mapping[str, Any]]:
  """Centre-crop batches of ``split`` from ``backend``'s path: without TensorFlow
  (``eval_input.eval_batches``) or through tf.data (``input_pipeline.create_eval_dataset``)."""
  if backend == "device":
    return eval_input.eval_batches(input_config, split, batch_size=batch_size,
                                   crop_pct=crop_pct, sharding=sharding)
  errors.require("tensorflow", purpose="input.backend='tfdata' (tf.data evaluation images)",
                 extra="data")
  from lut_jax.data import input_pipeline  # optional: tensorflow
  return input_pipeline.create_eval_dataset(input_config, split, batch_size=batch_size,
                                            crop_pct=crop_pct, sharding=sharding)


def dataset_features(pretrained: loading.Pretrained, input_config: ml_collections.ConfigDict,
                     split: str, *, batch_size: int, backend: str,
                     pools: Sequence[str] = POOLS, cache_dir: Optional[str] = None,
                     crop_pct: Optional[float] = None) -> dict[str, np.ndarray]:
  """Features of a whole split's centre crops (:func:`eval_batches` from ``backend``),
  cached as ``cache_dir/<split>.npz`` under :func:`features_key` when ``cache_dir`` is
  given."""

  def compute():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    if batch_size % jax.device_count():
      raise ValueError(f"feature batch size {batch_size} is not divisible by the "
                       f"{jax.device_count()} devices")
    batches = eval_batches(input_config, split, backend, batch_size=batch_size,
                           crop_pct=crop_pct, sharding=sharding)
    return extract_features(pretrained.encoder, pretrained.params, batches, pools=pools)

  name = split.replace("/", "_").replace("[", "_").replace("]", "").replace(":", "-")
  path = os.path.join(cache_dir, f"{name}.npz") if cache_dir else None
  key = features_key(pretrained, input_config, split, pools=pools, crop_pct=crop_pct,
                     backend=backend)
  return cached_features(path, key, compute)


def train_and_eval_features(config: ml_collections.ConfigDict, workdir: str,
                            pretrained: loading.Pretrained,
                            input_config: ml_collections.ConfigDict, pools: Sequence[str]):
  """kNN's and the linear probe's :func:`dataset_features` of ``config.input``'s train and
  eval splits (cached in ``workdir/features`` if ``config.cache_features``), and what their
  results file records of them (:func:`describe_source`)."""
  backend, crop_pct = eval_backend(config), config.input.crop_pct
  cache = os.path.join(workdir, "features") if config.cache_features else None
  split_names = (config.input.train_split, config.input.eval_split)
  train, test = (dataset_features(pretrained, input_config, split, backend=backend,
                                  batch_size=config.input.eval_batch_size, pools=pools,
                                  cache_dir=cache, crop_pct=crop_pct) for split in split_names)
  keys = [features_key(pretrained, input_config, split, pools=pools, crop_pct=crop_pct,
                       backend=backend) for split in split_names]
  return train, test, describe_source(pretrained, keys)
