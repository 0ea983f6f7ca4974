r"""How much of a linear probe's spread is the probe's own seed, and which probe recipe is
stable: the same encoders, several probe seeds, one or more recipes.

  python scripts/probe_seed_spread.py runs/mae4800/mae_s0 runs/mae4800/lut_s0 --seeds=4
  python scripts/probe_seed_spread.py runs/mae4800/mae_s0 --train_split='train[:50000]' \
      --eval_split='train[50000:]' --recipe=optimizer=lars,base_lr=2.0 \
      --recipe=optimizer=lars,base_lr=0.5 --recipe=optimizer=sgd,base_lr=0.1

For each encoder (any source ``lut-eval`` reads), pooling (cls, mean) and recipe, trains
the comparison's linear probe (``scripts/compare_lut_mae.py``'s ``probe``: 90 epochs of
``configs/linear_probe.py``'s Fashion-MNIST recipe, with the ``--recipe`` overrides of its
``linear_probe`` fields) once per probe seed and prints the top-1 values. A spread across
pre-training seeds far above this one comes from the encoders. Choose a recipe on a split
held out of ``train`` (second command), not on ``test``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from absl import flags  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

import compare_lut_mae  # noqa: E402  pylint: disable=g-import-not-at-top
from lut_jax import config_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from lut_jax.data import device_input
from lut_jax.weights import loading


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("checkpoints", nargs="+", help="encoders (work directories, exports, ...)")
  p.add_argument("--seeds", type=int, default=4, help="probe seeds 0 .. seeds-1")
  p.add_argument("--train_split", default="train")
  p.add_argument("--eval_split", default="test")
  p.add_argument("--recipe", action="append", default=[],
                 help="comma-separated linear_probe overrides, e.g. optimizer=sgd,base_lr=0.1 "
                      "(repeat for several recipes; none: the default recipe)")
  p.add_argument("--json_out", default=None)
  args = p.parse_args()
  flags.FLAGS(sys.argv[:1])  # the comparison script's flag defaults (90 probe epochs)
  try:
    recipes = {text: compare_lut_mae.probe_recipe(
        **config_lib.parse_overrides(filter(None, text.split(","))))
               for text in args.recipe or [""]}
  except ValueError as e:
    sys.exit(f"probe_seed_spread.py: --recipe: {e}")
  # The splits, read the way the comparison reads them.
  input_config = compare_lut_mae.pretrain_config("lut", 0).input
  splits = {name: device_input.load_split(input_config, split)
            for name, split in (("train", args.train_split), ("eval", args.eval_split))}
  results = {}
  for path in args.checkpoints:
    encoder = loading.load(path, encoder_only=True)
    feats = {name: compare_lut_mae._features(encoder.encoder, encoder.params,  # pylint: disable=protected-access
                                             split.images, encoder.channels)
             for name, split in splits.items()}
    for pool in ("cls", "mean"):
      for text, recipe in recipes.items():
        top1 = [compare_lut_mae.probe(feats["train"][pool], splits["train"].labels,
                                      feats["eval"][pool], splits["eval"].labels, seed,
                                      recipe)["linear"]
                for seed in range(args.seeds)]
        results[f"{path}:{pool}:{text or 'default'}"] = top1
        print(f"{path} {pool} [{text or 'default'}] {np.round(top1, 2).tolist()} "
              f"mean {np.mean(top1):.2f} range {np.ptp(top1):.2f}", flush=True)
  if args.json_out:
    pathlib.Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  main()
