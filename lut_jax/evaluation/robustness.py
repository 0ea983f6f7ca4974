"""Robustness of a fine-tuned ImageNet classifier (a checkpoint of a fine-tuning work
directory) on ImageNet-V2, -A, -R, -Sketch and -C: what is measured, and the outputs, are
in docs/downstream.md.

Labels: tfds labels all five sets with ImageNet-1k indices (the sorted WordNet IDs). An
image folder in a set's released layout (one sub-folder per WordNet ID) lists its classes
sorted too: 1000 folders are ImageNet-1k indices as they are, 200 (ImageNet-A / -R) index
the subset's sorted list; folders named otherwise (ImageNet-V2's release numbers them) are
refused rather than mislabelled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Optional, Sequence

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lut_jax import config_lib, errors, metrics
from lut_jax.data import folders
from lut_jax.evaluation import eval_config, features
from lut_jax.models import classifier as classifier_lib, variants
from lut_jax.runtime import checkpointing, sharding as sharding_lib
from lut_jax.weights import loading, sources

SETS = ("imagenet_v2", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_c")
TITLES = {"imagenet_v2": "ImageNet-V2", "imagenet_a": "ImageNet-A", "imagenet_r": "ImageNet-R",
          "imagenet_sketch": "ImageNet-Sketch", "imagenet_c": "ImageNet-C"}
NUM_IMAGENET_CLASSES = 1000

# ImageNet-C's corruptions, in the paper's order; the last four are its extra ones.
BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression")
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)

# AlexNet's top-1 error on each benchmark corruption, averaged over the five severities (so
# sum_s err_AlexNet(s, c) = 5 x this): the mCE normaliser of Hendrycks & Dietterich,
# "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations" (ICLR
# 2019), from the mCE spreadsheet linked in the README of github.com/hendrycks/robustness;
# google-research/augmix's imagenet.py (Hendrycks et al.) uses the same numbers
# (ALEXNET_ERR). No AlexNet baseline is published there for the four extra corruptions:
# they get top-1, no CE.
ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948,
    "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572, "fog": 0.819324,
    "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}

NEEDS_TENSORFLOW = "tf.data test sets"  # see protocols

# The WordNet IDs of ImageNet-A's and ImageNet-R's 200 classes, sorted: the classes that
# thousand_k_to_200 maps in github.com/hendrycks/natural-adv-examples' eval.py, and
# imagenet_r_wnids of github.com/hendrycks/imagenet-r's eval.py.
IMAGENET_A_WNIDS = tuple("""
    n01498041 n01531178 n01534433 n01558993 n01580077 n01614925 n01616318 n01631663 n01641577
    n01669191 n01677366 n01687978 n01694178 n01698640 n01735189 n01770081 n01770393 n01774750
    n01784675 n01819313 n01820546 n01833805 n01843383 n01847000 n01855672 n01882714 n01910747
    n01914609 n01924916 n01944390 n01985128 n01986214 n02007558 n02009912 n02037110 n02051845
    n02077923 n02085620 n02099601 n02106550 n02106662 n02110958 n02119022 n02123394 n02127052
    n02129165 n02133161 n02137549 n02165456 n02174001 n02177972 n02190166 n02206856 n02219486
    n02226429 n02231487 n02233338 n02236044 n02259212 n02268443 n02279972 n02280649 n02281787
    n02317335 n02325366 n02346627 n02356798 n02361337 n02410509 n02445715 n02454379 n02486410
    n02492035 n02504458 n02655020 n02669723 n02672831 n02676566 n02690373 n02701002 n02730930
    n02777292 n02782093 n02787622 n02793495 n02797295 n02802426 n02814860 n02815834 n02837789
    n02879718 n02883205 n02895154 n02906734 n02948072 n02951358 n02980441 n02992211 n02999410
    n03014705 n03026506 n03124043 n03125729 n03187595 n03196217 n03223299 n03250847 n03255030
    n03291819 n03325584 n03355925 n03384352 n03388043 n03417042 n03443371 n03444034 n03445924
    n03452741 n03483316 n03584829 n03590841 n03594945 n03617480 n03666591 n03670208 n03717622
    n03720891 n03721384 n03724870 n03775071 n03788195 n03804744 n03837869 n03840681 n03854065
    n03888257 n03891332 n03935335 n03982430 n04019541 n04033901 n04039381 n04067472 n04086273
    n04099969 n04118538 n04131690 n04133789 n04141076 n04146614 n04147183 n04179913 n04208210
    n04235860 n04252077 n04252225 n04254120 n04270147 n04275548 n04310018 n04317175 n04344873
    n04347754 n04355338 n04366367 n04376876 n04389033 n04399382 n04442312 n04456115 n04482393
    n04507155 n04509417 n04532670 n04540053 n04554684 n04562935 n04591713 n04606251 n07583066
    n07695742 n07697313 n07697537 n07714990 n07718472 n07720875 n07734744 n07749582 n07753592
    n07760859 n07768694 n07831146 n09229709 n09246464 n09472597 n09835506 n11879895 n12057211
    n12144580 n12267677
""".split())

IMAGENET_R_WNIDS = tuple("""
    n01443537 n01484850 n01494475 n01498041 n01514859 n01518878 n01531178 n01534433 n01614925
    n01616318 n01630670 n01632777 n01644373 n01677366 n01694178 n01748264 n01770393 n01774750
    n01784675 n01806143 n01820546 n01833805 n01843383 n01847000 n01855672 n01860187 n01882714
    n01910747 n01944390 n01983481 n01986214 n02007558 n02009912 n02051845 n02056570 n02066245
    n02071294 n02077923 n02085620 n02086240 n02088094 n02088238 n02088364 n02088466 n02091032
    n02091134 n02092339 n02094433 n02096585 n02097298 n02098286 n02099601 n02099712 n02102318
    n02106030 n02106166 n02106550 n02106662 n02108089 n02108915 n02109525 n02110185 n02110341
    n02110958 n02112018 n02112137 n02113023 n02113624 n02113799 n02114367 n02117135 n02119022
    n02123045 n02128385 n02128757 n02129165 n02129604 n02130308 n02134084 n02138441 n02165456
    n02190166 n02206856 n02219486 n02226429 n02233338 n02236044 n02268443 n02279972 n02317335
    n02325366 n02346627 n02356798 n02363005 n02364673 n02391049 n02395406 n02398521 n02410509
    n02423022 n02437616 n02445715 n02447366 n02480495 n02480855 n02481823 n02483362 n02486410
    n02510455 n02526121 n02607072 n02655020 n02672831 n02701002 n02749479 n02769748 n02793495
    n02797295 n02802426 n02808440 n02814860 n02823750 n02841315 n02843684 n02883205 n02906734
    n02909870 n02939185 n02948072 n02950826 n02951358 n02966193 n02980441 n02992529 n03124170
    n03272010 n03345487 n03372029 n03424325 n03452741 n03467068 n03481172 n03494278 n03495258
    n03498962 n03594945 n03602883 n03630383 n03649909 n03676483 n03710193 n03773504 n03775071
    n03888257 n03930630 n03947888 n04086273 n04118538 n04133789 n04141076 n04146614 n04147183
    n04192698 n04254680 n04266014 n04275548 n04310018 n04325704 n04347754 n04389033 n04409515
    n04465501 n04487394 n04522168 n04536866 n04552348 n04591713 n07614500 n07693725 n07695742
    n07697313 n07697537 n07714571 n07714990 n07718472 n07720875 n07734744 n07742313 n07745940
    n07749582 n07753275 n07753592 n07768694 n07873807 n07880968 n07920052 n09472597 n09835506
    n10565667 n12267677
""".split())
SUBSETS = {"imagenet_a": IMAGENET_A_WNIDS, "imagenet_r": IMAGENET_R_WNIDS}

# ImageNet-C besides tfds (which makes it from ImageNet's manual download): the authors'
# released images, the ones their numbers come from.
_IMAGENET_C_FOLDER = ("or download the released ImageNet-C and set "
                      "robustness.imagenet_c.dataset=folder:PATH")


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
  """ImageNet-1k's WordNet IDs in class-index order: tfds's ``imagenet2012`` labels, the
  sorted IDs (the order of an ImageFolder over the released class folders)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tuple(tfds.builder("imagenet2012").info.features["label"].names)


def subset_indices(wnids: Sequence[str]) -> np.ndarray:
  """The ImageNet-1k indices of ``wnids`` (int32, in their order)."""
  index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
  return np.asarray([index[wnid] for wnid in wnids], np.int32)


# ------------------------------------------------------------------------------ metrics
def restricted_predictions(logits: jax.Array,
                           class_indices: Optional[np.ndarray] = None) -> jax.Array:
  """The ImageNet-1k index of each row's highest logit among ``class_indices`` (all
  classes when None): a 200-class set's prediction is one of its own classes."""
  if class_indices is None:
    return jnp.argmax(logits, axis=-1)
  class_indices = jnp.asarray(class_indices)
  return class_indices[jnp.argmax(logits[:, class_indices], axis=-1)]


def correct_counts(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                   class_indices: Optional[np.ndarray] = None) -> dict[str, jax.Array]:
  """Correct top-1 predictions (:func:`restricted_predictions`) and examples, both over the
  unmasked rows; ``labels`` are ImageNet-1k indices."""
  correct = (restricted_predictions(logits, class_indices) == labels) & mask
  return {"correct": jnp.sum(correct.astype(jnp.float32)),
          "count": jnp.sum(mask.astype(jnp.float32))}


def corruption_metrics(top1: Mapping[tuple[str, int], float]) -> dict[str, float]:
  """ImageNet-C metrics from the top-1 (percent) of each ``(corruption, severity)``. Returns
  ``imagenet_c/<c>/<s>/top1``; ``imagenet_c/<c>/top1`` (mean over the severities);
  ``imagenet_c/<c>/ce`` = 100 x sum_s err / sum_s err_AlexNet for a benchmark corruption with
  all five severities; ``imagenet_c/mce``, the mean CE, once all 15 have one; and
  ``imagenet_c/mean_top1`` over the benchmark corruptions' evaluated severities."""
  out = {f"imagenet_c/{c}/{s}/top1": float(v) for (c, s), v in sorted(top1.items())}
  for c in dict.fromkeys(c for c, _ in sorted(top1)):
    accuracies = [top1[(c, s)] for s in SEVERITIES if (c, s) in top1]
    out[f"imagenet_c/{c}/top1"] = float(np.mean(accuracies))
    if c in ALEXNET_ERRORS and len(accuracies) == len(SEVERITIES):
      errors_sum = sum(1.0 - a / 100.0 for a in accuracies)
      out[f"imagenet_c/{c}/ce"] = 100.0 * errors_sum / (len(SEVERITIES) * ALEXNET_ERRORS[c])
  benchmark = [v for (c, _), v in top1.items() if c in ALEXNET_ERRORS]
  if benchmark:
    out["imagenet_c/mean_top1"] = float(np.mean(benchmark))
  ces = [out.get(f"imagenet_c/{c}/ce") for c in BENCHMARK_CORRUPTIONS]
  if all(ce is not None for ce in ces):
    out["imagenet_c/mce"] = float(np.mean(ces))
  return out


# ------------------------------------------------------------------------------ classifier
@dataclasses.dataclass(frozen=True)
class FinetunedClassifier:
  """A fine-tuned classifier read back from its work directory."""

  model: classifier_lib.FinetuneViT
  params: Any  # replicated on every device
  channels: int
  num_classes: int
  step: int  # of the checkpoint loaded
  top1: Optional[float]  # the eval top-1 recorded with that checkpoint, if any
  workdir: str  # absolute when local
  record: dict[str, Any]  # the fine-tuning run's resume key: its encoder and input

  @property
  def image_size(self) -> int:
    return self.model.image_size


def load_finetuned(workdir: str, checkpoint: str = "best", dtype: str = "",
                   sharding: Optional[jax.sharding.Sharding] = None) -> FinetunedClassifier:
  """The classifier of a fine-tuning work directory at ``checkpoint`` (as
  :func:`lut_jax.weights.loading.load_finetuned`); ``dtype`` ``"float32"`` or
  ``"bfloat16"``, ``""``: the fine-tuning run's (its ``config.json``), else float32.
  """
  if sharding is None:
    sharding = sharding_lib.replicated(sharding_lib.create_mesh(1))
  params, step, top1, key = loading.load_finetuned(workdir, checkpoint, sharding=sharding)
  root = checkpointing.absolute(workdir)
  if not dtype:  # eval_main saves the fine-tuning run's config in its work directory
    try:
      dtype = json.loads((root / config_lib.CONFIG_FILE).read_text()).get("dtype")
    except (FileNotFoundError, ValueError):
      dtype = None
    dtype = dtype or "float32"
  # The head's shape and the presence of fc_norm say how the run built its model.
  model = classifier_lib.build_model(
      variants.EncoderConfig(**key["encoder"]),
      num_classes=int(params["head"]["kernel"].shape[-1]),
      image_size=int(key["image_size"]), drop_path_rate=0.0,
      pool="mean" if "fc_norm" in params else "cls",
      learned_pos_embed="pos_embed" in params["encoder"],
      dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  logging.info("Fine-tuned classifier %s, step %d (eval top-1 %s), %d classes at %d px, %s",
               workdir, step, "n/a" if top1 is None else f"{top1:.2f}", model.num_classes,
               model.image_size, dtype)
  return FinetunedClassifier(model=model, params=params, channels=int(key["channels"]),
                             num_classes=model.num_classes, step=step, top1=top1,
                             workdir=os.fspath(root), record=key)


# ------------------------------------------------------------------------------ data
@dataclasses.dataclass(frozen=True)
class Part:
  """One dataset read: a set, or one corruption and severity of ImageNet-C."""

  set_name: str  # a SETS name
  key: str  # the results' key prefix: the set name, or imagenet_c/<corruption>/<severity>
  dataset: str  # a tfds name or folder:PATH
  split: str
  crop_pct: float  # the eval view's centre crop
  set_dataset: str  # the set's robustness.<set>.dataset (ImageNet-C's root)
  corruption: Optional[tuple[str, int]] = None  # (corruption, severity) for ImageNet-C


def _items(value: str) -> list[str]:
  return [item.strip() for item in value.split(",") if item.strip()]


def corruptions(value: str) -> tuple[str, ...]:
  """``robustness.imagenet_c.corruptions``: ``"benchmark"``, ``"all"`` or a comma list."""
  if value == "benchmark":
    return BENCHMARK_CORRUPTIONS
  if value == "all":
    return BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
  return tuple(_items(value))


def parts(config: ml_collections.ConfigDict) -> list[Part]:
  """Every dataset read that ``config.sets`` asks for, in order."""
  out = []
  for name in _items(config.sets):
    spec = config.robustness[name]
    crop_pct = spec.crop_pct if spec.crop_pct > 0 else config.input.crop_pct
    if name != "imagenet_c":
      out.append(Part(name, name, spec.dataset, spec.split, crop_pct, spec.dataset))
      continue
    is_folder = spec.dataset.startswith(folders.FOLDER_PREFIX)
    for corruption in corruptions(spec.corruptions):
      for severity in (int(s) for s in _items(spec.severities)):
        # The released images: <root>/<corruption>/<severity>/<wnid>/; tfds: one builder
        # config per pair.
        dataset = (f"{spec.dataset.rstrip('/')}/{corruption}/{severity}" if is_folder
                   else f"{spec.dataset}/{corruption}_{severity}")
        out.append(Part(name, f"{name}/{corruption}/{severity}", dataset, spec.split,
                        crop_pct, spec.dataset, (corruption, severity)))
  return out


def _class_folders(part: Part) -> list[str]:
  """The class folder names of a folder source, as ``lut_jax.data.datasets`` reads them."""
  root = epath.Path(part.dataset[len(folders.FOLDER_PREFIX):])
  split = part.split.split("[")[0]
  if split and (root / split).is_dir():
    root = root / split
  return sorted(p.name for p in root.iterdir() if p.is_dir())


def label_map(part: Part, num_classes: Optional[int]) -> Optional[np.ndarray]:
  """ImageNet-1k index of each of the source's labels; None when they are already that. A
  DataError when its classes are neither ImageNet-1k's nor its subset's (an image folder's
  are checked by name)."""
  subset = SUBSETS.get(part.set_name)
  expected = {NUM_IMAGENET_CLASSES: imagenet_wnids()}
  if subset is not None:
    expected[len(subset)] = subset
  if num_classes not in expected:
    raise errors.DataError(
        f"{part.dataset} has {num_classes} classes; {TITLES[part.set_name]} needs "
        f"ImageNet-1k's {NUM_IMAGENET_CLASSES}"
        + (f" or its own {len(subset)}" if subset is not None else ""))
  if part.dataset.startswith(folders.FOLDER_PREFIX):
    class_folders = _class_folders(part)
    if tuple(class_folders) != tuple(expected[num_classes]):
      raise errors.DataError(
          f"{part.dataset}: its {num_classes} class folders are not the sorted WordNet IDs "
          f"of {TITLES[part.set_name]} (e.g. {class_folders[:3]}), so their order is not "
          "ImageNet's class order",
          hint="use the released layout (one n########/ folder per class); ImageNet-V2's "
          "release numbers its folders: read it from tfds (imagenet_v2) instead")
  return subset_indices(subset) if num_classes != NUM_IMAGENET_CLASSES else None


def _find_sources(all_parts: Sequence[Part], data_dir: Optional[str]):
  """``(present, missing)``: ``[(part, source)]`` of the prepared parts, and per set the
  ``DataNotFoundError`` of its first missing part and how many parts are missing."""
  from lut_jax.data import datasets  # optional: tensorflow
  present, missing = [], {}
  for part in all_parts:
    try:
      present.append((part, datasets.get_source(part.dataset, part.split, data_dir)))
    except errors.DataNotFoundError as e:
      first, count = missing.get(part.set_name, (e, 0))
      missing[part.set_name] = (first, count + 1)
  return present, missing


def _skip_reason(name: str, error: errors.DataNotFoundError, count: int, total: int) -> str:
  """One line: the set, how much of it is missing, and the data source's own message (it
  says how to prepare the dataset)."""
  note = f"{count} of its {total} corruption / severity pairs, e.g. " if total > 1 else ""
  reason = f"{TITLES[name]}: {note}{' '.join(str(error).split())}"
  return f"{reason} ({_IMAGENET_C_FOLDER})" if name == "imagenet_c" else reason


# ------------------------------------------------------------------------------ run
def validate(config: ml_collections.ConfigDict) -> None:
  """The robustness fields (``configs/robustness.py``)."""
  fail = eval_config.fail
  if not config.finetuned:
    fail("set --config.finetuned to the work directory of an ImageNet fine-tuning "
         "(configs/finetune.py:dataset=imagenet)")
  record = (checkpointing.absolute(config.finetuned) / checkpointing.CHECKPOINT_DIR
            / sources.RESUME_KEY_FILE)
  if not record.exists():
    fail(f"finetuned={config.finetuned!r} is not a fine-tuning work directory (no "
         f"{checkpointing.CHECKPOINT_DIR}/{sources.RESUME_KEY_FILE})")
  if config.checkpoint not in ("best", "latest") and not str(config.checkpoint).isdigit():
    fail(f"checkpoint must be 'best', 'latest' or a step number, got {config.checkpoint!r}")
  if config.dtype not in ("", "float32", "bfloat16"):
    fail(f"dtype must be '', 'float32' or 'bfloat16', got {config.dtype!r}")
  names = _items(config.sets)
  unknown = [n for n in names if n not in SETS]
  if not names or unknown or len(set(names)) != len(names):
    fail(f"sets={config.sets!r}: expected a comma-separated subset of {', '.join(SETS)}")
  for name in names:
    spec = config.robustness[name]
    if not spec.dataset or not spec.split:
      fail(f"robustness.{name}.dataset and .split must be set")
    if not (spec.crop_pct == -1 or 0 < spec.crop_pct <= 1):
      fail(f"robustness.{name}.crop_pct must be in (0, 1] or -1, got {spec.crop_pct}")
  if not (config.input.crop_pct == -1 or 0 < config.input.crop_pct <= 1):
    fail(f"input.crop_pct must be in (0, 1] or -1, got {config.input.crop_pct}")
  c = config.robustness.imagenet_c
  known = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
  chosen = corruptions(c.corruptions)
  if not chosen or any(name not in known for name in chosen):
    fail(f"robustness.imagenet_c.corruptions={c.corruptions!r}: expected 'benchmark', "
         f"'all' or a comma-separated subset of {', '.join(known)}")
  severities = _items(c.severities)
  if not severities or any(s not in tuple(map(str, SEVERITIES)) for s in severities):
    fail(f"robustness.imagenet_c.severities={c.severities!r}: expected a comma-separated "
         "subset of 1, 2, 3, 4, 5")


def run(config: ml_collections.ConfigDict, workdir: str, *,
        classifier: Optional[FinetunedClassifier] = None) -> dict[str, Any]:
  """Evaluates ``config.finetuned`` on ``config.sets``; writes and returns the results
  (``{"<set>/top1": percent, "imagenet_c/...": ..., "examples", "checkpoint", "skipped"}``).
  """
  from lut_jax.data import input_pipeline  # optional: tensorflow

  all_parts = parts(config)
  present, missing = _find_sources(all_parts, config.input.data_dir)
  totals = {name: sum(p.set_name == name for p in all_parts) for name in missing}
  skipped = {name: _skip_reason(name, e, count, totals[name])
             for name, (e, count) in missing.items()}
  if missing and not config.skip_missing:
    name, (error, _) = next(iter(missing.items()))
    more = f"{_IMAGENET_C_FOLDER}; " if name == "imagenet_c" else ""
    raise errors.DataNotFoundError(f"{TITLES[name]}: {error}",
                                   hint=f"{more}or leave it out with skip_missing=True")
  if not present:
    where = config.input.data_dir or "tfds's default data_dir"
    raise errors.DataNotFoundError(
        f"none of the robustness sets ({', '.join(TITLES[n] for n in missing)}) is "
        f"prepared in {where}",
        hint="`tfds build imagenet_v2/matched-frequency imagenet_a imagenet_r "
        "imagenet_sketch --data_dir=DIR` downloads the first four, then pass "
        "--config.input.data_dir=DIR; ImageNet-C: tfds makes it from ImageNet's manual "
        "download (`tfds build imagenet2012_corrupted/<corruption>_<severity>`), "
        f"{_IMAGENET_C_FOLDER}")
  for reason in skipped.values():
    logging.warning("Skipping %s", reason)
  # Label spaces are checked before anything is computed.
  label_maps = [label_map(part, source.num_classes) for part, source in present]

  if config.input.eval_batch_size % jax.device_count():
    raise errors.ConfigError(f"input.eval_batch_size={config.input.eval_batch_size} is not "
                             f"divisible by the number of devices ({jax.device_count()})")
  mesh = sharding_lib.create_mesh(1)
  batch_sharding, replicated = (sharding_lib.batch_sharding(mesh),
                                sharding_lib.replicated(mesh))
  classifier = classifier or load_finetuned(config.finetuned, str(config.checkpoint),
                                            config.dtype, sharding=replicated)
  if classifier.num_classes != NUM_IMAGENET_CLASSES:
    raise errors.ConfigError(
        f"{classifier.workdir} is a {classifier.num_classes}-class classifier; the ImageNet "
        f"test sets need an ImageNet-1k ({NUM_IMAGENET_CLASSES}-class) one",
        hint="fine-tune with configs/finetune.py:dataset=imagenet")
  image_size = (config.input.image_size if config.input.image_size > 0
                else classifier.image_size)
  model = classifier.model
  if image_size != model.image_size:  # the sin-cos positions follow the input grid
    model = model.clone(image_size=image_size)

  steps = {}

  def eval_step_for(set_name: str, labels_to_imagenet: Optional[np.ndarray]):
    # One compiled step per label space and class restriction (whole set, A, R).
    cache_key = (set_name if set_name in SUBSETS else "", labels_to_imagenet is not None)
    if cache_key not in steps:
      classes = subset_indices(SUBSETS[set_name]) if set_name in SUBSETS else None

      def step(params, batch):
        logits = model.apply({"params": params}, batch["image"], train=False)
        labels = jnp.maximum(batch["label"], 0)  # padding carries label -1
        if labels_to_imagenet is not None:
          labels = jnp.asarray(labels_to_imagenet)[labels]
        return correct_counts(logits, labels, batch["mask"], classes)

      steps[cache_key] = jax.jit(step, in_shardings=(replicated, batch_sharding),
                                 out_shardings=replicated)
    return steps[cache_key]

  results: dict[str, Any] = {}
  examples: dict[str, int] = {}
  corrupted: dict[tuple[str, int], float] = {}
  for (part, _), labels_to_imagenet in zip(present, label_maps):
    step = eval_step_for(part.set_name, labels_to_imagenet)
    input_cfg = eval_config.input_config(config, image_size=image_size,
                                         channels=classifier.channels, dataset=part.dataset,
                                         split="")
    batches = input_pipeline.create_eval_dataset(
        input_cfg, part.split, batch_size=config.input.eval_batch_size,
        crop_pct=part.crop_pct, sharding=batch_sharding)
    sums = None
    for batch in batches:
      out = step(classifier.params, batch)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    counts = metrics.scalars(sums)
    top1 = 100.0 * counts["correct"] / max(counts["count"], 1.0)
    examples[part.key] = int(counts["count"])
    logging.info("%s (%s, %s): top-1 %.2f%% on %d images", part.key, part.dataset,
                 part.split, top1, examples[part.key])
    if part.corruption is None:
      results[f"{part.key}/top1"] = top1
    else:
      corrupted[part.corruption] = top1
  if corrupted:
    results.update(corruption_metrics(corrupted))
  results["examples"] = examples
  results["checkpoint"] = {"step": classifier.step, "top1": classifier.top1}
  results["skipped"] = skipped

  source = {"finetuned": classifier.workdir, "step": classifier.step,
            "checkpoint": str(config.checkpoint),
            "finetune_key": features.key_hash(classifier.record),
            "pretrained": classifier.record.get("pretrained"),
            "pretrained_sha256": classifier.record.get("params_sha256")}
  eval_config.write_results(workdir, "robustness", results, source=source)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "robustness_results.md").write_text(
        results_markdown(results, all_parts, classifier))
  return results


# ------------------------------------------------------------------------------ report
def _fmt(value: Optional[float]) -> str:
  return "-" if value is None else f"{value:.2f}"


def results_markdown(results: Mapping[str, Any], all_parts: Sequence[Part],
                     classifier: FinetunedClassifier) -> str:
  """The results as Markdown: one row per set, ImageNet-C per corruption and severity."""
  examples = results["examples"]
  top1 = "n/a" if classifier.top1 is None else f"{classifier.top1:.2f}"
  lines = [f"# Robustness of {classifier.workdir}", "",
           f"Checkpoint step {classifier.step} (its fine-tuning eval top-1: {top1}). Top-1 "
           "in percent; ImageNet-A / -R predict among their 200 classes only.", "",
           "| Set | Dataset | Split | Images | Top-1 |", "|---|---|---|---:|---:|"]
  by_set: dict[str, list[Part]] = {}
  for part in all_parts:
    by_set.setdefault(part.set_name, []).append(part)
  for name, set_parts in by_set.items():
    if not any(p.key in examples for p in set_parts):  # skipped as a whole
      continue
    if name != "imagenet_c":
      part = set_parts[0]
      lines.append(f"| {TITLES[name]} | {part.dataset} | {part.split} | "
                   f"{examples.get(part.key, 0)} | {_fmt(results.get(f'{name}/top1'))} |")
      continue
    images = sum(examples.get(p.key, 0) for p in set_parts)
    lines.append(f"| {TITLES[name]} (mean over benchmark corruptions x severities) | "
                 f"{set_parts[0].set_dataset} | {set_parts[0].split} | {images} | "
                 f"{_fmt(results.get('imagenet_c/mean_top1'))} |")
  if "imagenet_c/mce" in results:
    lines += ["", f"ImageNet-C mCE (AlexNet-normalised corruption error, lower is better): "
              f"**{results['imagenet_c/mce']:.2f}**"]
  names = [c for c in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
           if f"imagenet_c/{c}/top1" in results]
  if names:
    if "imagenet_c/mce" not in results:
      lines += ["", "ImageNet-C mCE: not computed (it needs all 15 benchmark corruptions at "
                "all 5 severities)."]
    lines += ["", "## ImageNet-C", "",
              "| Corruption | " + " | ".join(f"s{s}" for s in SEVERITIES)
              + " | Mean top-1 | CE |",
              "|---|" + "---:|" * (len(SEVERITIES) + 2)]
    for c in names:
      cells = [_fmt(results.get(f"imagenet_c/{c}/{s}/top1")) for s in SEVERITIES]
      lines.append(f"| {c} | " + " | ".join(cells) + f" | {_fmt(results[f'imagenet_c/{c}/top1'])}"
                   f" | {_fmt(results.get(f'imagenet_c/{c}/ce'))} |")
  if results["skipped"]:
    lines += ["", "Skipped (not prepared):", ""]
    lines += [f"* {reason}" for reason in results["skipped"].values()]
  return "\n".join(lines) + "\n"
