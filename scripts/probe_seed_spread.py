r"""How much of a linear probe's spread is the probe's own seed: the same encoder, several
probe seeds.

  python scripts/probe_seed_spread.py runs/mae4800/mae_s0 runs/mae4800/lut_s0 --seeds=4

For each encoder (any source ``lut-eval`` reads) and each pooling (cls, mean), trains the
comparison's linear probe (``scripts/compare_lut_mae.py``'s ``probe``: Fashion-MNIST train
-> test, ``configs/linear_probe.py``, 90 epochs) once per probe seed and prints the top-1
values. A spread across pre-training seeds far above this one comes from the encoders.
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

import compare_lut_mae  # noqa: E402  pylint: disable=g-import-not-at-top
from lut_jax import device_input  # noqa: E402  pylint: disable=g-import-not-at-top
from lut_jax.evaluation import features  # noqa: E402  pylint: disable=g-import-not-at-top


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("checkpoints", nargs="+", help="encoders (work directories, exports, ...)")
  p.add_argument("--seeds", type=int, default=4, help="probe seeds 0 .. seeds-1")
  p.add_argument("--json_out", default=None)
  args = p.parse_args()
  flags.FLAGS(sys.argv[:1])  # the comparison script's flag defaults (90 probe epochs)
  # The splits the comparison probes, read the way it reads them.
  input_config = compare_lut_mae.pretrain_config("lut", 0).input
  splits = {name: device_input.load_split(input_config, name) for name in ("train", "test")}
  results = {}
  for path in args.checkpoints:
    encoder = features.load_pretrained(path)
    feats = {name: compare_lut_mae._features(encoder.encoder, encoder.params,  # pylint: disable=protected-access
                                             split.images, encoder.channels)
             for name, split in splits.items()}
    for pool in ("cls", "mean"):
      top1 = [compare_lut_mae.probe(feats["train"][pool], splits["train"].labels,
                                    feats["test"][pool], splits["test"].labels, seed)["linear"]
              for seed in range(args.seeds)]
      results[f"{path}:{pool}"] = top1
      print(path, pool, top1, flush=True)
  if args.json_out:
    pathlib.Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  main()
