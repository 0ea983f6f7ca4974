r"""How much the cls token is used, per encoder: a diagnostic for LUT vs MAE comparisons.

  python scripts/cls_token_diagnostics.py runs/compare2400/lut_s0 runs/compare2400/mae_s0 \
      [--num_images=512] [--json_out=cls_tokens.json]

For each encoder (any source ``lut-eval`` reads) on the first Fashion-MNIST test images,
unmasked:

* ``patch_to_cls``: per block, the mean attention weight that patch queries put on the
  cls key (1 / tokens if attention were uniform: 0.02 for 49 patches + cls);
* ``cls_to_cls``: per block, the weight the cls query puts on itself;
* ``cos_cls_mean``: the mean cosine between the final cls token and the mean patch token.

Neither pre-training loss reads the cls token (MAE's reconstruction drops it; LUT's BC
branch pools visible patch tokens), so these say whether a method routes image-level
information through it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from lut_jax.analysis import (attention_distance, images as images_lib)  # noqa: E402  pylint: disable=g-import-not-at-top
from lut_jax.models import vit
from lut_jax.weights import loading


def diagnose(path: str, raw_images: list[np.ndarray], batch_size: int = 128) -> dict:
  m = loading.load(path)
  x, _ = images_lib.prepare(raw_images, m.encoder.image_size, m.channels)
  attention = jax.jit(lambda p, im: attention_distance.collect_attention(m.encoder, p, im))
  tokens = jax.jit(lambda p, im: m.encoder.apply({"params": p}, im))
  to_cls, self_cls, cosines = 0.0, 0.0, []
  for chunk, n in images_lib.batches(x, batch_size):
    probs = np.stack([np.asarray(p[:n]) for p in attention(m.params, chunk)])
    to_cls = to_cls + probs[:, :, :, 1:, 0].mean(axis=(2, 3)).sum(axis=1)  # (blocks,)
    self_cls = self_cls + probs[:, :, :, 0, 0].mean(axis=2).sum(axis=1)
    out = tokens(m.params, chunk)
    cls, mean = np.asarray(out[:n, 0]), np.asarray(vit.mean_patch_token(out[:n]))
    cosines.append((cls * mean).sum(-1) / np.linalg.norm(cls, axis=-1)
                   / np.linalg.norm(mean, axis=-1))
  count = len(x)
  per_block = lambda total: [round(float(v) / count, 4) for v in total]  # noqa: E731
  return {"patch_to_cls": per_block(to_cls), "cls_to_cls": per_block(self_cls),
          "cos_cls_mean": round(float(np.concatenate(cosines).mean()), 4)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("checkpoints", nargs="+", help="encoders (work directories, exports, ...)")
  p.add_argument("--num_images", type=int, default=512)
  p.add_argument("--json_out", default=None)
  args = p.parse_args()
  raw, _ = images_lib.fashion_mnist(args.num_images)
  results = {}
  for path in args.checkpoints:
    results[path] = diagnose(path, raw)
    print(path, json.dumps(results[path]), flush=True)
  if args.json_out:
    pathlib.Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  main()
