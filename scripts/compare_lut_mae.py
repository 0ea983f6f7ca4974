r"""LUT vs MAE on Fashion-MNIST: same model, budget and seed; kNN and linear probe of both.

  python scripts/compare_lut_mae.py --total_steps=300 --workdir=runs/compare \
      --results=docs/results.md

For each method (``configs/fashion_mnist.py:method=lut`` and ``:method=mae``) it pre-trains
(or resumes) in ``<workdir>/<method>``, extracts the *online* encoder's frozen features of
the probe splits once (cls token and mean patch token, centre crops, cached), then runs the
DINO kNN classifier (k = 20, T = 0.07) and the MAE linear probe (BatchNorm without affine +
linear, LARS) on both feature kinds. Timings and numbers go to
``<workdir>/compare_results.json`` and a Markdown table in ``--results``.

Everything the run does is resumable: rerunning the command skips finished pre-training
and reuses cached features.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import sys
import time

from absl import app, flags, logging
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import fashion_mnist  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import linear_probe as lp_config  # noqa: E402
from lut_jax import models, train, train_state  # noqa: E402
from lut_jax.evaluation import eval_config, features, knn, linear_probe  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Base directory of the runs.")
_RESULTS = flags.DEFINE_string("results", "docs/results.md", "Markdown file to write.")
_METHODS = flags.DEFINE_list("methods", ["lut", "mae"], "Pre-training methods to compare.")
_TOTAL_STEPS = flags.DEFINE_integer("total_steps", 300, "Pre-training steps per method.")
_WARMUP = flags.DEFINE_integer("warmup_steps", -1, "Warmup steps; -1: 10% of total_steps.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Pre-training batch size.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of pre-training and probing.")
_VARIANT = flags.DEFINE_string("variant", "nano/4", "Encoder variant (both methods).")
_PROBE_TRAIN = flags.DEFINE_string("probe_train_split", "train",
                                   "Split the kNN bank / linear probe trains on.")
_PROBE_EVAL = flags.DEFINE_string("probe_eval_split", "test", "Split they are evaluated on.")
_LP_EPOCHS = flags.DEFINE_integer("lp_epochs", 90, "Linear-probe epochs.")
_LP_BATCH = flags.DEFINE_integer("lp_batch_size", -1, "Linear-probe batch; -1: config's.")
_LP_LR = flags.DEFINE_float("lp_base_lr", -1.0, "Linear-probe base lr; -1: config's.")
_LP_OPT = flags.DEFINE_string("lp_optimizer", "", "lars or sgd; empty: config's.")
_POOLS = flags.DEFINE_list("pools", ["cls", "mean"], "Feature kinds to probe.")
_RANDOM = flags.DEFINE_bool("random_baseline", True,
                            "Also probe an untrained encoder (same model and seed): the floor "
                            "that pre-training has to beat.")


def pretrain_config(method: str):
  config = fashion_mnist.get_config(f"variant={_VARIANT.value},method={method}")
  config.unlock()
  config.seed = _SEED.value
  config.input.batch_size = _BATCH.value
  config.total_steps = _TOTAL_STEPS.value
  config.optim.warmup_steps = (_WARMUP.value if _WARMUP.value >= 0
                               else max(1, _TOTAL_STEPS.value // 10))
  config.log_every_steps = max(1, min(50, _TOTAL_STEPS.value // 6))
  config.checkpoint_every_steps = max(1, _TOTAL_STEPS.value // 3)
  config.image_summary_every_steps = _TOTAL_STEPS.value
  return config.lock()


def probe_config():
  config = lp_config.get_config()
  config.unlock()
  config.seed = _SEED.value
  config.input.train_split = _PROBE_TRAIN.value
  config.input.eval_split = _PROBE_EVAL.value
  lp = config.linear_probe
  lp.epochs = _LP_EPOCHS.value
  lp.warmup_epochs = min(lp.warmup_epochs, _LP_EPOCHS.value)
  lp.eval_every_epochs = _LP_EPOCHS.value
  if _LP_BATCH.value > 0:
    lp.batch_size = _LP_BATCH.value
  if _LP_LR.value > 0:
    lp.base_lr = _LP_LR.value
  if _LP_OPT.value:
    lp.optimizer = _LP_OPT.value
  return config


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  devices = jax.devices()
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"{cpu}, {os.cpu_count()} cores visible, {len(devices)} {devices[0].platform} "
          f"device(s), JAX {jax.__version__}; load average at the end {load:.1f} "
          "(machine shared with other jobs)")


def random_encoder(config) -> features.PretrainedEncoder:
  """The encoder of ``config`` at initialisation (pre-training's init key for its seed)."""
  model = models.build_model(config.model, image_size=config.input.image_size,
                             channels=config.input.channels, use_bc=False)
  init_key = jax.random.split(jax.random.key(config.seed), 3)[0]
  params = jax.jit(functools.partial(train_state.init_variables, model))(init_key)
  encoder_config = features.encoder_config(config.to_dict())
  return features.PretrainedEncoder(
      encoder=models.Encoder(**encoder_config), params=params["params"]["encoder"],
      config=encoder_config, channels=config.input.channels, source="random init")


def run_method(method: str, workdir: str, probe) -> dict:
  """Pre-trains ``method`` (resuming) and probes its online encoder; ``"random"`` probes
  the untrained encoder."""
  out: dict = {"method": method}
  config = pretrain_config("mae" if method == "random" else method)
  run_dir = os.path.join(workdir, method)
  # Pre-training wall time is recorded when it runs, so a rerun (which finds the run
  # finished) still reports it; a resumed run reports the time of its last leg only.
  timing = os.path.join(run_dir, "pretrain_wall_seconds.json")
  done = (os.path.exists(timing) and
          json.load(open(timing)).get("total_steps") == config.total_steps)
  if method == "random":
    out["pretrain_seconds"] = 0.0
  elif done:
    out["pretrain_seconds"] = json.load(open(timing))["seconds"]
  else:
    t0 = time.time()
    train.pretrain(config, run_dir)
    out["pretrain_seconds"] = time.time() - t0
    with open(timing, "w") as f:
      json.dump({"seconds": out["pretrain_seconds"], "total_steps": config.total_steps}, f)
  out["pretrain_config"] = {"variant": config.model.variant, "batch_size": config.input.batch_size,
                            "total_steps": config.total_steps,
                            "warmup_steps": config.optim.warmup_steps,
                            "base_lr": config.optim.base_lr, "w_bc": config.loss.w_bc,
                            "mask_ratio": config.loss.mask_ratio, "seed": config.seed}

  if method == "random":
    out["pretrain_config"]["total_steps"] = 0
    pretrained = random_encoder(config)
  else:
    pretrained = features.load_pretrained(run_dir)
  input_config = eval_config.input_config(probe, pretrained)
  cache = os.path.join(run_dir, "eval_features")
  feature_timing = os.path.join(cache, "extract_wall_seconds.json")
  cached_seconds = (json.load(open(feature_timing)).get("seconds")
                    if os.path.exists(feature_timing) else None)
  t0 = time.time()
  kwargs = dict(batch_size=probe.input.eval_batch_size, pools=tuple(_POOLS.value),
                cache_dir=cache, crop_pct=probe.input.crop_pct)
  train_feats = features.dataset_features(pretrained, input_config, probe.input.train_split,
                                          **kwargs)
  test_feats = features.dataset_features(pretrained, input_config, probe.input.eval_split,
                                         **kwargs)
  out["feature_seconds"] = time.time() - t0
  if cached_seconds is not None:  # features came from the cache: report the extraction
    out["feature_seconds"] = cached_seconds
  else:
    with open(feature_timing, "w") as f:
      json.dump({"seconds": out["feature_seconds"]}, f)
  out["num_train"], out["num_test"] = len(train_feats["label"]), len(test_feats["label"])
  num_classes = int(max(train_feats["label"].max(), test_feats["label"].max())) + 1

  lp = probe.linear_probe
  for pool in _POOLS.value:
    t0 = time.time()
    acc = knn.knn_accuracy(train_feats[pool], train_feats["label"], test_feats[pool],
                           test_feats["label"], num_classes=num_classes, k=20,
                           temperature=0.07)
    out[f"knn/{pool}"] = acc
    out[f"knn/{pool}/seconds"] = time.time() - t0
    t0 = time.time()
    _, acc = linear_probe.train_linear_probe(
        train_feats[pool], train_feats["label"], test_feats[pool], test_feats["label"],
        num_classes=num_classes, epochs=lp.epochs, batch_size=lp.batch_size,
        base_lr=lp.base_lr, warmup_epochs=lp.warmup_epochs, weight_decay=lp.weight_decay,
        optimizer=lp.optimizer, momentum=lp.momentum, seed=probe.seed,
        eval_every_epochs=lp.eval_every_epochs)
    out[f"linear_probe/{pool}"] = acc
    out[f"linear_probe/{pool}/seconds"] = time.time() - t0
    logging.info("%s %s: kNN %s, linear probe %s", method, pool, out[f"knn/{pool}"], acc)
  out["linear_probe_recipe"] = {"optimizer": lp.optimizer, "batch_size": lp.batch_size,
                                "base_lr": lp.base_lr, "epochs": lp.epochs,
                                "warmup_epochs": lp.warmup_epochs,
                                "weight_decay": lp.weight_decay}
  return out


def markdown(results: list[dict], wall_seconds: float, machine_text: str) -> str:
  first = results[0]
  pc, lp = first["pretrain_config"], first["linear_probe_recipe"]
  pools = _POOLS.value
  lines = [
      "## LUT vs MAE on Fashion-MNIST (CPU, short budget)",
      "",
      f"Written by `scripts/compare_lut_mae.py` on {datetime.date.today().isoformat()}.",
      "",
      f"* Command: `python scripts/compare_lut_mae.py {' '.join(sys.argv[1:])}`",
      f"* Machine: {machine_text}.",
      f"* Pre-training (both methods): `configs/fashion_mnist.py`, ViT `{pc['variant']}` on "
      f"28 px (49 patches), batch {pc['batch_size']}, {pc['total_steps']} steps "
      f"({pc['total_steps'] * pc['batch_size'] / 60000:.2f} epochs of the 60k training "
      f"images), warmup {pc['warmup_steps']}, base lr {pc['base_lr']:g}, mask ratio "
      f"{pc['mask_ratio']}, seed {pc['seed']}; LUT: w_bc 0.25 (MAE: 0).",
      f"* Probes on the online encoder's frozen features (centre crops), trained on "
      f"`{_PROBE_TRAIN.value}` ({first['num_train']} images), evaluated on "
      f"`{_PROBE_EVAL.value}` ({first['num_test']} images): kNN k=20, T=0.07 (cosine); "
      f"linear probe BatchNorm(no affine) + linear, {lp['optimizer'].upper()}, batch "
      f"{lp['batch_size']}, base lr {lp['base_lr']:g} (peak x batch/256), "
      f"{lp['epochs']} epochs, warmup {lp['warmup_epochs']}, wd {lp['weight_decay']:g}, "
      f"seed {pc['seed']}.",
      f"* Total wall time {wall_seconds / 60:.1f} min (pre-training, feature extraction "
      "and probes of every row; extraction of cached features and finished pre-training "
      "count with their recorded times).",
      "",
      "| method | pre-train wall (s) | features (s) | "
      + " | ".join(f"kNN {p} top-1" for p in pools) + " | "
      + " | ".join(f"linear {p} top-1" for p in pools) + " | "
      + " | ".join(f"linear {p} top-5" for p in pools) + " |",
      "|---|---:|---:|" + "---:|" * (3 * len(pools)),
  ]
  for r in results:
    name = "untrained encoder (same init)" if r["method"] == "random" else r["method"].upper()
    wall = "-" if r["method"] == "random" else f"{r['pretrain_seconds']:.0f}"
    row = [name, wall, f"{r['feature_seconds']:.0f}"]
    row += [f"{r[f'knn/{p}']['top1']:.2f}" for p in pools]
    row += [f"{r[f'linear_probe/{p}']['top1']:.2f}" for p in pools]
    row += [f"{r[f'linear_probe/{p}']['top5']:.2f}" for p in pools]
    lines.append("| " + " | ".join(row) + " |")
  lines += [
      "",
      "Pre-training wall times include compilation, checkpointing and the tf.data pipeline; "
      "on a shared machine they measure throughput only roughly. One seed per method: "
      "differences of a fraction of a point are within run-to-run noise at this budget.",
      "",
  ]
  return "\n".join(lines)


BEGIN, END = "<!-- compare_lut_mae: begin -->", "<!-- compare_lut_mae: end -->"


def write_section(path: str, text: str) -> None:
  """Replaces the generated section of ``path`` (between the markers), keeping the rest;
  a new file gets a title and the section."""
  section = f"{BEGIN}\n{text}{END}\n"
  old = open(path).read() if os.path.exists(path) else "# Results\n\n"
  if BEGIN in old and END in old:
    head, rest = old.split(BEGIN, 1)
    new = head + section + rest.split(END, 1)[1].lstrip("\n")
  else:
    new = old.rstrip("\n") + "\n\n" + section
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(new)


def main(argv: list[str]) -> None:
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  probe = probe_config()
  methods = list(_METHODS.value) + (["random"] if _RANDOM.value else [])
  results = [run_method(m, _WORKDIR.value, probe) for m in methods]
  wall = sum(r["pretrain_seconds"] + r["feature_seconds"]
             + sum(v for k, v in r.items() if k.endswith("/seconds")) for r in results)
  machine_text = machine()
  with open(os.path.join(_WORKDIR.value, "compare_results.json"), "w") as f:
    json.dump({"results": results, "wall_seconds": wall, "machine": machine_text,
               "argv": sys.argv[1:]}, f, indent=2, default=float)
  text = markdown(results, wall, machine_text)
  if _RESULTS.value:
    write_section(_RESULTS.value, text)
  print(text)


if __name__ == "__main__":
  app.run(main)
