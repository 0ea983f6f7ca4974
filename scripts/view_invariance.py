r"""How much class signal survives each change the views make, in pixels and in encoders.

  python scripts/view_invariance.py \
      --checkpoint=runs/small4k/lut_s0 --checkpoint=runs/small4k/mae_s0 --labels=LUT,MAE \
      --bank_split='train{per_class=:400}' --query_split='train{per_class=400:500}' \
      --json=runs/view_invariance.json

LUT's second loss asks the visible tokens of view 1 to predict the teacher's embedding of
view 2, so the encoder learns to ignore what tells the two views apart: each view's own crop
and flip, and view 2's colour ops. Where that change destroys the class signal (a mirrored
digit is often another digit; solarize on a 28 px grey image inverts all above mid-grey),
that invariance costs accuracy. This script measures both sides on a data set of the
on-device path (``configs/fashion_mnist.py``'s input, ``--dataset`` to change it): the DINO
kNN (k 20, T 0.07) of query images against the clean bank, with the queries clean,
mirrored (``hflip``), as view 1 (crop and flip), as view 2 (the method's mix), or as view 2
with one op forced (``input.view2_ops``: grayscale, solarize, blur, none; jitter included),
on raw pixels and on each encoder's cls and mean-token features. Pixels say how much class
signal a change leaves; an encoder whose accuracy falls less under it than another's has
become more invariant to it. Views are made as pre-training makes them (no eval resize).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import fashion_mnist  # noqa: E402  pylint: disable=g-import-not-at-top
from lut_jax import metrics  # noqa: E402
from lut_jax.data import device_input, image_utils  # noqa: E402
from lut_jax.evaluation import features  # noqa: E402
from lut_jax.weights import loading  # noqa: E402

# "hflip": the clean image mirrored; "view2": the method's mix; an op's name: view 2 with
# that op forced.
CONDITIONS = ("clean", "hflip", "view1", "view2", *image_utils.STRONG_OPS)


def query_images(images: np.ndarray, channels: int, condition: str, seed: int) -> np.ndarray:
  """uint8 images -> normalised float32 queries under ``condition`` (one draw each)."""
  if condition in ("clean", "hflip"):
    images = images[:, :, ::-1] if condition == "hflip" else images
    return np.asarray(device_input.eval_images(images, channels))
  ops = image_utils.METHOD_VIEW2_OPS if condition in ("view1", "view2") else condition
  recipe = image_utils.ViewRecipe(op_choices=image_utils.view2_op_choices(ops))
  make = jax.jit(functools.partial(device_input.make_views, channels=channels, two_views=True,
                                   recipe=recipe))
  views = make(images, jax.random.split(jax.random.key(seed), len(images)))
  return np.asarray(views["view1" if condition == "view1" else "view2"])


def knn_top1(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray,
             labels: np.ndarray) -> float:
  num_classes = int(max(bank_labels.max(), labels.max())) + 1
  flat = lambda x: np.asarray(x, np.float32).reshape(len(x), -1)  # noqa: E731
  return metrics.knn_accuracy(flat(bank), bank_labels, flat(queries), labels,
                              num_classes=num_classes)["top1"]


def measure(bank: device_input.Split, queries: device_input.Split,
            encoders: dict[str, loading.Pretrained], *, channels: int, seed: int = 0,
            batch_size: int = 500) -> dict[str, dict[str, float]]:
  """``{row: {condition: kNN top-1}}``, rows ``pixels`` and ``<label> <pool>``."""
  views = {c: query_images(queries.images, channels, c, seed) for c in CONDITIONS}
  clean_bank = query_images(bank.images, channels, "clean", seed)
  table = {"pixels": {c: knn_top1(clean_bank, bank.labels, v, queries.labels)
                      for c, v in views.items()}}
  # One pass per encoder over the bank and every condition's queries, split afterwards.
  images = np.concatenate([clean_bank, *views.values()])
  batches = [{"image": images[i:i + batch_size],
              "label": np.zeros(len(images[i:i + batch_size]), np.int32)}
             for i in range(0, len(images), batch_size)]  # a list: read once per encoder
  ends = np.cumsum([len(clean_bank)] + [len(v) for v in views.values()])[:-1]
  for label, pretrained in encoders.items():
    extracted = features.extract_features(pretrained.encoder, pretrained.params, batches)
    for pool in features.POOLS:
      bank_features, *query_features = np.split(extracted[pool], ends)
      table[f"{label} {pool}"] = {
          c: knn_top1(bank_features, bank.labels, q, queries.labels)
          for c, q in zip(views, query_features)}
  return table


def markdown(table: dict[str, dict[str, float]]) -> str:
  lines = ["| features | " + " | ".join(CONDITIONS) + " |",
           "|---|" + "---:|" * len(CONDITIONS)]
  lines += [f"| {row} | " + " | ".join(f"{values[c]:.1f}" for c in CONDITIONS) + " |"
            for row, values in table.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", action="append", default=[],
                      help="a pre-training work directory or any weights lut-eval reads")
  parser.add_argument("--labels", default="", help="comma-separated names of the checkpoints")
  parser.add_argument("--dataset", default="fashion_mnist")
  parser.add_argument("--bank_split", default="train{per_class=:400}")
  parser.add_argument("--query_split", default="train{per_class=400:500}")
  parser.add_argument("--seed", type=int, default=0, help="of the query views' draws")
  parser.add_argument("--json", default="", help="also write the table here")
  args = parser.parse_args(argv)
  labels = args.labels.split(",") if args.labels else [os.path.basename(os.path.normpath(p))
                                                      for p in args.checkpoint]
  if len(labels) != len(args.checkpoint):
    parser.error(f"{len(labels)} --labels for {len(args.checkpoint)} --checkpoint")
  input_config = fashion_mnist.get_config().input.unlock()
  input_config.dataset = args.dataset
  encoders = {label: loading.load(path, encoder_only=True, label=label)
              for label, path in zip(labels, args.checkpoint)}
  channels = {p.channels for p in encoders.values()} or {input_config.channels}
  if len(channels) != 1:
    parser.error(f"the checkpoints take different channel counts: {sorted(channels)}")
  split = lambda name: device_input.load_split(input_config, name)  # noqa: E731
  table = measure(split(args.bank_split), split(args.query_split), encoders,
                  channels=channels.pop(), seed=args.seed)
  print(markdown(table))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "table": table}, f, indent=1)
  return table


if __name__ == "__main__":
  main()
