r"""LUT vs MAE at equal budget, several seeds each: kNN and linear probe, curves, floors.

  python scripts/compare_lut_mae.py --workdir=runs/compare --total_steps=600 \
      --seeds=0,1,2 --results=docs/results.md --plots=docs/images/compare
  # The small-data regime: a fixed class-balanced 4,000-image subset, probes on it.
  python scripts/compare_lut_mae.py --workdir=runs/small4k --total_steps=2400 \
      --set='input.split=train{per_class=:400}' \
      --set='monitor.bank_split=train{per_class=:400}' \
      --probe_train_split='train{per_class=:400}' --tag=small4k_2400

Pre-trains every (method, seed) with ``configs/fashion_mnist.py`` on the on-device input
path (no TensorFlow needed), with the run monitor on (kNN top-1 of the online encoder and,
for LUT, the BC branch's collapse indicators, every ``--monitor_every`` steps). Then, on
the final online encoder's frozen features of whole images (cls token and mean patch
token), the DINO kNN classifier (k 20, T 0.07) and the linear probe of
``configs/linear_probe.py``, trained on ``--probe_train_split`` and evaluated on
``--probe_eval_split``. Two floors a learned encoder should beat, with the same probes: raw
pixels, and the untrained encoder (seed 0's initialisation).

The section title, table and JSON name the pre-training data set and split, and epochs
count its examples. Writes ``<workdir>/compare_results.json``, a Markdown section (mean +- sample std over the
seeds, and every run) into ``--results`` between this script's markers for ``--tag``, and,
with matplotlib, ``<plots>_knn.png`` (monitor kNN vs epoch) and ``<plots>_collapse.png``.
Everything is resumable: a rerun resumes unfinished pre-training (a preempted run stops the
script; rerun it) and reuses finished runs' probe results, but only with the same settings
(another budget, ablation or probe in the same ``--workdir`` is refused: use a new one).
``--reprobe`` probes finished runs again where only the probe differs (e.g. after a change
of ``configs/linear_probe.py``'s recipe), keeping their pre-training and its monitor.
``--set=key.sub=value`` applies config overrides to every run (ablations); a key the config
does not have is refused.
Size a GPU run by timing a short one first (``--total_steps=50``): the JSON records each
run's pre-training wall time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

from absl import app, flags, logging
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import fashion_mnist  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import linear_probe as lp_config  # noqa: E402
from lut_jax import config_lib, errors, metrics  # noqa: E402
from lut_jax.data import device_input
from lut_jax.evaluation import features, linear_probe
from lut_jax.pretrain import build, monitor, train
from lut_jax.runtime import host_memory, run_identity, sharding
from lut_jax.weights import loading

_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Base directory of the runs.")
_RESULTS = flags.DEFINE_string("results", "", "Markdown file for the results section.")
_PLOTS = flags.DEFINE_string("plots", "", "Path prefix of the PNG curves (needs matplotlib).")
_TAG = flags.DEFINE_string("tag", "default", "Name of this comparison (section markers).")
_METHODS = flags.DEFINE_list("methods", ["lut", "mae"], "Pre-training methods.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of each method.")
_TOTAL_STEPS = flags.DEFINE_integer("total_steps", 600, "Pre-training steps per run.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Pre-training batch size.")
_VARIANT = flags.DEFINE_string("variant", "nano/4", "Encoder variant (all runs).")
_MONITOR_EVERY = flags.DEFINE_integer("monitor_every", 100, "Monitor interval (steps).")
_SET = flags.DEFINE_multi_string("set", [], "key=value config override for every run.")
_PROBE_TRAIN = flags.DEFINE_string("probe_train_split", "train", "Probe training split.")
_PROBE_EVAL = flags.DEFINE_string("probe_eval_split", "test", "Probe evaluation split.")
_LP_EPOCHS = flags.DEFINE_integer("lp_epochs", 90, "Linear-probe epochs.")
_REPROBE = flags.DEFINE_bool("reprobe", False, "Probe finished runs again when their saved "
                             "probe settings differ from this command's (pre-training is "
                             "still checked and kept).")
_EPOCHS = flags.DEFINE_float("epochs", 0, "If > 0: pre-training length in epochs of the "
                             "pre-training split (overrides --total_steps).")
_DEADLINE = flags.DEFINE_float("deadline_s", 0, "If > 0: runs not started this many seconds "
                               "after the start are skipped (and reported so).")
_FROM_JSON = flags.DEFINE_string("from_json", "", "Only render --results / --plots from a "
                                 "compare_results.json (e.g. one a GPU machine wrote).")
_POOLS = ("cls", "mean")


def pretrain_config(method: str, seed: int):
  config = fashion_mnist.get_config(f"variant={_VARIANT.value},method={method}").unlock()
  config.seed = seed
  config.input.batch_size = _BATCH.value
  config.total_steps = _TOTAL_STEPS.value
  config.optim.warmup_steps = max(1, _TOTAL_STEPS.value // 10)
  config.log_every_steps = max(1, min(100, _TOTAL_STEPS.value // 10))
  config.checkpoint_every_steps = max(1, _TOTAL_STEPS.value // 4)
  config.image_summary_every_steps = _TOTAL_STEPS.value
  config.monitor.every_steps = _MONITOR_EVERY.value
  return config_lib.override(config, config_lib.parse_overrides(_SET.value)).lock()


def pretrain_data(config) -> dict:
  """What the runs pre-train on: the data set, its split and its number of examples (what
  an epoch is)."""
  split = device_input.load_split(config.input)
  return {"dataset": config.input.dataset, "split": config.input.split,
          "examples": split.num_examples}


def _data_text(data: dict) -> str:
  return f"`{data['dataset']}` `{data['split']}` ({data['examples']:,} images)"


def _features(encoder, params, images, channels) -> dict[str, np.ndarray]:
  extract = features.make_feature_fn(encoder, _POOLS)
  chunks = [jax.device_get(extract(params, device_input.eval_images(images[i:i + 1000],
                                                                    channels)))
            for i in range(0, len(images), 1000)]
  return {pool: np.concatenate([c[pool] for c in chunks]) for pool in _POOLS}


def probe_recipe(**overrides) -> dict:
  """The linear probe's recipe: ``configs/linear_probe.py``'s Fashion-MNIST one (the one
  home of its defaults), with ``overrides`` of its ``linear_probe`` fields."""
  lp = config_lib.override(lp_config.get_config().unlock().linear_probe, overrides)
  return {key: lp[key] for key in ("optimizer", "base_lr", "batch_size", "warmup_epochs",
                                   "weight_decay", "momentum")}


def probe(train_feats, train_labels, test_feats, test_labels, seed: int,
          recipe: dict | None = None) -> dict:
  """kNN and linear-probe top-1 of one feature kind (linear probe: ``recipe``, default
  :func:`probe_recipe`, for ``--lp_epochs``)."""
  recipe = recipe or probe_recipe()
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  out = {"knn": metrics.knn_accuracy(train_feats, train_labels, test_feats, test_labels,
                                     num_classes=num_classes)["top1"]}
  _, acc = linear_probe.train_linear_probe(
      train_feats, train_labels, test_feats, test_labels, num_classes=num_classes,
      epochs=_LP_EPOCHS.value, seed=seed, eval_every_epochs=_LP_EPOCHS.value,
      **{**recipe, "warmup_epochs": min(recipe["warmup_epochs"], _LP_EPOCHS.value)})
  out["linear"] = acc["top1"]
  return out


def _finished(method: str, run_dir: str, done_file: str, config, settings: dict) -> dict:
  """A finished run's saved results, if they are this command's: same pre-training config
  (the resume rule) and probe settings. Otherwise a one-line exit: reusing them would put
  another budget's or ablation's numbers in this comparison's table. With ``--reprobe``,
  saved results whose probe settings differ are returned for probing again."""
  with open(done_file) as f:
    saved = json.load(f)
  try:
    if method != "random":
      run_identity.check_resume_config(config, run_dir)
    if saved.get("settings") != settings:  # older files have none: not this recipe's
      if _REPROBE.value:
        logging.info("%s: probed with %s; probing again with %s.", run_dir,
                     saved.get("settings", "unrecorded settings"), settings)
        return saved
      raise ValueError(f"probed with {saved.get('settings', 'unrecorded settings')}, this "
                       f"command asks for {settings}")
  except (ValueError, errors.UserError) as e:
    sys.exit(f"compare_lut_mae.py: {run_dir} was finished by another comparison: {e}. Use a "
             "new --workdir, the same settings, or --reprobe to probe it again.")
  return saved


def run(method: str, seed: int, splits) -> dict:
  """Pre-trains (resuming) and probes one run; ``method == "random"``: the untrained
  encoder of ``seed``."""
  config = pretrain_config("mae" if method == "random" else method, seed)
  run_dir = os.path.join(_WORKDIR.value, f"{method}_s{seed}")
  done_file = os.path.join(run_dir, "probe_results.json")
  settings = {"variant": config.model.variant, "train_split": _PROBE_TRAIN.value,
              "eval_split": _PROBE_EVAL.value, "lp_epochs": _LP_EPOCHS.value,
              "lp_recipe": probe_recipe()}
  out = {"method": method, "seed": seed, "pretrain_seconds": 0.0, "settings": settings}
  reprobe = os.path.exists(done_file)
  if reprobe:
    saved = _finished(method, run_dir, done_file, config, settings)
    if saved.get("settings") == settings:
      return saved
    out.update({k: saved[k] for k in ("pretrain_seconds", "monitor") if k in saved},
               reprobed=True)
  if method == "random":
    training = build.build_training(config, sharding.create_mesh(config.mesh.fsdp),
                                    total_steps=1, warmup_steps=0)
    init_key = jax.random.split(jax.random.key(seed), 3)[0]  # pre-training's init key
    encoder = training.model.bind({"params": {}}).encoder.clone(parent=None)
    params = training.init(init_key).params["encoder"]
  elif not reprobe:
    t0, cpu0 = time.time(), time.process_time()
    done = int(jax.device_get(train.pretrain(config, run_dir).step))
    if done < config.total_steps:  # preempted: probing it would record an unfinished run
      sys.exit(f"compare_lut_mae.py: {method} seed {seed} stopped at step {done} of "
               f"{config.total_steps} (preempted); rerun the same command to resume.")
    out["pretrain_seconds"] = time.time() - t0
    out["pretrain_cpu_seconds"] = time.process_time() - cpu0  # all threads of this process
    out["monitor"] = monitor.read_history(run_dir)
  if method != "random":
    pretrained = loading.load(run_dir, encoder_only=True)
    encoder, params = pretrained.encoder, pretrained.params
  (train_images, train_labels), (test_images, test_labels) = splits
  train_f = _features(encoder, params, train_images, config.input.channels)
  test_f = _features(encoder, params, test_images, config.input.channels)
  for pool in _POOLS:
    out[pool] = probe(train_f[pool], train_labels, test_f[pool], test_labels, seed)
  logging.info("%s seed %d: %s", method, seed, {p: out[p] for p in _POOLS})
  os.makedirs(run_dir, exist_ok=True)
  with open(done_file, "w") as f:
    json.dump(out, f)
  return out


def raw_pixels(splits) -> dict:
  (train_images, train_labels), (test_images, test_labels) = splits
  flat = lambda x: np.asarray(x, np.float32).reshape(len(x), -1) / 255.0  # noqa: E731
  return {"method": "pixels", "seed": 0, "settings": {"lp_recipe": probe_recipe()},
          "pixels": probe(flat(train_images), train_labels, flat(test_images), test_labels, 0)}


def _mean_std(values) -> str:
  values = np.asarray(values, float)
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def _recipe_text(results: list[dict]) -> str:
  """The linear probe's recipe the runs were probed with (older files did not record it)."""
  recipes = {json.dumps(r["settings"]["lp_recipe"], sort_keys=True) for r in results
             if "lp_recipe" in r.get("settings", {})}
  if len(recipes) != 1:
    return "recipe not recorded" if not recipes else "MIXED recipes: rerun with --reprobe"
  recipe = json.loads(recipes.pop())
  return (f"{recipe['optimizer'].upper()} base lr {recipe['base_lr']:g}, batch "
          f"{recipe['batch_size']}, warmup {recipe['warmup_epochs']:g} epochs")


def markdown(results: list[dict], machine: str, wall: float, argv: list[str],
             data: dict) -> str:
  config = pretrain_config("lut", 0)
  reprobed = sum(bool(r.get("reprobed")) for r in results)
  epochs = _TOTAL_STEPS.value * _BATCH.value / data["examples"]
  lines = [
      f"## {' vs '.join(m.upper() for m in _METHODS.value)}, {data['dataset']} "
      f"{data['split']} ({data['examples']:,} images), "
      f"{_TOTAL_STEPS.value} steps ({epochs:.1f} epochs), "
      f"{len(_SEEDS.value)} seeds [{_TAG.value}]", "",
      f"Written by `scripts/compare_lut_mae.py` on {datetime.date.today().isoformat()}.", "",
      f"* Command: `python scripts/compare_lut_mae.py {' '.join(argv)}`",
      f"* Machine: {machine}; total wall time {wall / 60:.1f} min"
      + (f" (probes only for {reprobed} runs probed again with `--reprobe`; their pre-training "
         "seconds are their first run's)" if reprobed else "") + ".",
      f"* Pre-training on {_data_text(data)}: `configs/fashion_mnist.py` (device input "
      f"path), ViT "
      f"`{_VARIANT.value}`, batch {_BATCH.value}, {_TOTAL_STEPS.value} steps, warmup "
      f"{config.optim.warmup_steps}, base lr {config.optim.base_lr:g}, EMA "
      f"{config.ema.momentum} -> 1, w_bc {config.loss.w_bc} (MAE 0)"
      + (f", overrides {_SET.value}" if _SET.value else "") + f"; seeds {_SEEDS.value}.",
      f"* Probes of the final online encoder on whole images: trained on "
      f"`{_PROBE_TRAIN.value}`, evaluated on `{_PROBE_EVAL.value}`; kNN k=20, T=0.07; linear "
      f"probe as `configs/linear_probe.py` ({_recipe_text(results)}, {_LP_EPOCHS.value} "
      "epochs). Mean ± sample std "
      "over seeds.", "",
      "| encoder | kNN cls | kNN mean | linear cls | linear mean | pre-train s/run |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for name in [*_METHODS.value, "random"]:
    rows = [r for r in results if r["method"] == name]
    if not rows:
      continue
    cells = [_mean_std([r[p][kind] for r in rows]) for kind in ("knn", "linear")
             for p in _POOLS]
    label = "untrained encoder" if name == "random" else f"{name.upper()} ({len(rows)} seeds)"
    lines.append(f"| {label} | " + " | ".join(cells)
                 + f" | {np.mean([r['pretrain_seconds'] for r in rows]):.0f} |")
  pixels = [r for r in results if r["method"] == "pixels"]
  if pixels:
    p = pixels[0]["pixels"]
    lines.append(f"| raw pixels | {p['knn']:.2f} | | {p['linear']:.2f} | | |")
  lines += ["", "Per run (kNN cls / linear cls; final monitor z_std, z_rank for LUT):", ""]
  for r in results:
    if r["method"] in _METHODS.value:
      last = (r.get("monitor") or [{}])[-1]
      extra = (f"; z_std {last['z_std']:.3f}, z_rank {last['z_rank']:.1f}"
               if "z_std" in last else "")
      lines.append(f"* {r['method']} seed {r['seed']}: {r['cls']['knn']:.2f} / "
                   f"{r['cls']['linear']:.2f}{extra}")
  return "\n".join(lines) + "\n"


def plot(results: list[dict], prefix: str, data: dict) -> None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("matplotlib not installed: no curves (the JSON has the data).")
    return
  steps_per_epoch = data["examples"] / _BATCH.value
  for name, keys in (("knn", ("knn_cls",)), ("collapse", ("z_std", "z_rank"))):
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
      for method, colour in (("lut", "tab:red"), ("mae", "tab:blue")):
        for r in (r for r in results if r["method"] == method and r.get("monitor")):
          hist = [h for h in r["monitor"] if key in h]
          if hist:
            ax.plot([h["step"] / steps_per_epoch for h in hist], [h[key] for h in hist],
                    color=colour, alpha=0.7, label=f"{method.upper()} seed {r['seed']}")
      ax.set_xlabel("epoch")
      ax.set_ylabel({"knn_cls": "monitor kNN top-1 (cls), %", "z_std": "teacher z std",
                     "z_rank": "teacher z effective rank"}[key])
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    fig.savefig(f"{prefix}_{name}.png", dpi=110)
    plt.close(fig)


def write_section(path: str, tag: str, text: str) -> None:
  """Replaces this tag's generated section of ``path``, keeping the rest."""
  begin, end = f"<!-- compare_lut_mae {tag}: begin -->", f"<!-- compare_lut_mae {tag}: end -->"
  section = f"{begin}\n{text}{end}\n"
  old = open(path).read() if os.path.exists(path) else "# Results\n\n"
  if begin in old and end in old:
    head, rest = old.split(begin, 1)
    new = head + section + "\n" + rest.split(end, 1)[1].lstrip("\n")
  else:
    new = old.rstrip("\n") + "\n\n" + section
  with open(path, "w") as f:
    f.write(new)


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  device = jax.devices()[0]
  return (f"{cpu}, {os.cpu_count()} cores; {jax.device_count()} {device.platform} device(s) "
          f"({device.device_kind}); JAX {jax.__version__}")


def main(argv: list[str]) -> None:
  del argv
  if _FROM_JSON.value:
    saved = json.load(open(_FROM_JSON.value))
    outputs = {f.name: f.value for f in (_RESULTS, _PLOTS, _TAG)}
    flags.FLAGS(["compare"] + saved["argv"], known_only=True)  # the run's own settings,
    for name, value in outputs.items():  # written where this command says
      setattr(flags.FLAGS, name, value)
    # Files written before the data set was recorded all came from Fashion-MNIST's train.
    data = saved.get("data", {"dataset": "fashion_mnist", "split": "train",
                              "examples": 60_000})
    text = markdown(saved["results"], saved["machine"], saved["wall_seconds"], saved["argv"],
                    data)
    if _RESULTS.value:
      write_section(_RESULTS.value, _TAG.value, text)
    if _PLOTS.value:
      plot(saved["results"], _PLOTS.value, data)
    print(text)
    return
  t0 = time.time()
  for method in _METHODS.value:  # a bad --set fails here, in one line, before any run
    try:
      build.validate(pretrain_config(method, 0))
    except (ValueError, TypeError) as e:
      sys.exit(f"compare_lut_mae.py: {method} config: {e}")
  config = pretrain_config("lut", 0)
  data = pretrain_data(config)
  if _EPOCHS.value > 0:  # configs are made on demand: every run sees the new step count
    flags.FLAGS.total_steps = max(1, round(_EPOCHS.value * data["examples"] / _BATCH.value))
  splits = [(s.images, s.labels) for s in (
      device_input.load_split(config.input, split)
      for split in (_PROBE_TRAIN.value, _PROBE_EVAL.value))]
  machine_text = machine()
  results = []

  def add(result: dict) -> None:  # saved after every run: a killed job keeps what it did
    results.append(result)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "compare_results.json"), "w") as f:
      json.dump({"results": results, "machine": machine_text, "argv": sys.argv[1:],
                 "data": data, "wall_seconds": time.time() - t0}, f, indent=1)

  add(raw_pixels(splits))
  for seed in map(int, _SEEDS.value):
    for method in _METHODS.value:
      if _DEADLINE.value and time.time() - t0 > _DEADLINE.value:
        logging.warning("Deadline passed: %s seed %d not run.", method, seed)
        continue
      add(run(method, seed, splits))
  add(run("random", int(_SEEDS.value[0]), splits))
  wall = time.time() - t0
  text = markdown(results, machine_text, wall, sys.argv[1:], data)
  if _RESULTS.value:
    write_section(_RESULTS.value, _TAG.value, text)
  if _PLOTS.value:
    plot(results, _PLOTS.value, data)
  print(text)


if __name__ == "__main__":
  host_memory.restart_with_tuned_malloc()  # what lut-pretrain runs with
  app.run(main)
