r"""Analyses of pre-trained encoders, as in the LUT paper: attention distance, token
spectrum, attention / Grad-CAM maps and MAE reconstructions.

  lut-analyze --checkpoint runs/fmnist_lut --checkpoint runs/fmnist_mae \
      --labels LUT,MAE --images fashion_mnist --num_images 64 --out runs/analysis

``--checkpoint`` takes a pre-training workdir (latest checkpoint; or a
``WORKDIR/checkpoints/<step>`` directory), an exported encoder directory or a PyTorch
``.pth`` (reference / MAE / timm). Writes to ``--out``:

* ``attention_distance.png``: mean attention distance per layer, one dot per head, all
  checkpoints overlaid;
* ``spectrum.png``: normalised singular values of the output patch tokens (log scale);
* ``attention_maps_<label>_<query>.png``: attention of a query patch (or cls) per head in
  the chosen layer, for the first ``--num_show`` images;
* ``reconstructions_<label>.png``: input / masked / reconstruction (checkpoints with a
  decoder);
* ``gradcam_<label>.png``: only with ``--probe`` (a linear-probe workdir of
  ``lut_jax.evaluation`` or a ``.npz``, one per checkpoint in order; see
  :mod:`lut_jax.analysis.loading`);
* ``metrics.json``: attention distances per layer/head, spectra and effective ranks.

Bad input (a checkpoint that cannot be read, a wrong option) ends as one line,
``lut-analyze: error: ...``, with exit status 2; ``--debug`` shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lut_jax import errors
from lut_jax.analysis import (attention_distance, images as images_lib, loading, maps, plots,
                              reconstruction, spectrum)


PROG = "lut-analyze"
IMAGE_SOURCES = ("fashion_mnist", "skimage")


def _say(message: str) -> None:
  print(f"analyze: {message}", flush=True)


def _file_label(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG,
                              description=__doc__.split("\n\n")[0].strip(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", action="append", required=True,
                 help="workdir, exported encoder dir or .pth file; repeat to compare")
  p.add_argument("--labels", default="",
                 help="comma-separated names, one per --checkpoint (default: file names)")
  p.add_argument("--images", default="fashion_mnist",
                 help="'fashion_mnist' (test split), 'skimage' (bundled photos) or a directory")
  p.add_argument("--num_images", type=int, default=64,
                 help="images for the attention distance and the spectrum")
  p.add_argument("--num_show", type=int, default=4,
                 help="images drawn in the map and reconstruction figures")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--which", default="params", choices=("params", "target_params"),
                 help="workdirs: the online network or the EMA teacher")
  p.add_argument("--queries", default="center;cls",
                 help="attention-map queries: 'cls', 'center' or 'row,col', ';'-separated")
  p.add_argument("--attention_layer", type=int, default=-1,
                 help="block whose attention is drawn (negative: from the end)")
  p.add_argument("--probe", action="append", default=[],
                 help="linear probe (workdir or .npz) for Grad-CAM, one per --checkpoint in "
                      "order")
  p.add_argument("--probe_pool", default=None, choices=("cls", "mean"),
                 help="override the probe's feature pooling")
  p.add_argument("--gradcam_block", type=int, default=None,
                 help="encoder block whose output Grad-CAM uses (default: the last for "
                      "mean-pooled probes, the one before for cls-pooled ones)")
  p.add_argument("--mask_ratio", type=float, default=None,
                 help="reconstruction mask ratio (default: the checkpoint's)")
  p.add_argument("--seed", type=int, default=0, help="seed of the reconstruction masks")
  p.add_argument("--batch_size", type=int, default=16, help="images per forward pass")
  p.add_argument("--torch_key", default=None,
                 help=".pth: checkpoint entry to read (e.g. model_ema)")
  p.add_argument("--num_heads", type=int, default=None,
                 help=".pth: encoder heads (default: the standard ViT of that width)")
  p.add_argument("--decoder_num_heads", type=int, default=16, help=".pth: decoder heads")
  p.add_argument("--image_size", type=int, default=None,
                 help=".pth: input image size (default: from the size of pos_embed)")
  p.add_argument("--debug", action="store_true",
                 help="show the traceback of input errors too (also LUT_JAX_DEBUG=1)")
  args = p.parse_args(argv)
  if args.num_images < 1 or args.num_show < 1 or args.batch_size < 1:
    p.error("--num_images, --num_show and --batch_size must be positive")
  for name in ("num_heads", "decoder_num_heads", "image_size"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      p.error(f"--{name} must be positive")
  if args.mask_ratio is not None and not 0.0 <= args.mask_ratio < 1.0:
    p.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio:g}")
  if args.images not in IMAGE_SOURCES and not os.path.isdir(args.images):
    p.error(f"--images {args.images!r}: expected {' or '.join(IMAGE_SOURCES)} or a "
            "directory of images")
  labels = [s.strip() for s in args.labels.split(",")] if args.labels else []
  if labels and len(labels) != len(args.checkpoint):
    p.error(f"--labels has {len(labels)} names for {len(args.checkpoint)} checkpoints")
  if len(args.probe) > len(args.checkpoint):
    p.error("more --probe files than --checkpoint")
  args.labels = labels
  return args


def _unique(labels: list[str]) -> list[str]:
  out: list[str] = []
  for label in labels:
    name, i = label, 2
    while name in out:
      name, i = f"{label}_{i}", i + 1
    out.append(name)
  return out


def _batched(fn, params: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
  """``fn(params, x)`` in chunks (one compiled shape), concatenated on the host."""
  return np.concatenate([np.asarray(fn(params, jnp.asarray(chunk)))[:n]
                         for chunk, n in images_lib.batches(x, batch_size)])


def analyze_model(m: loading.LoadedModel, raw: list[np.ndarray],
                  true_labels: Optional[np.ndarray], args: argparse.Namespace,
                  class_names: Optional[Sequence[str]],
                  probe: Optional[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
  """Every analysis of one model; writes its per-model figures, returns its metrics.

  ``probe`` is ``(path, loading.load_probe(path))`` for Grad-CAM, or None.
  """
  name = _file_label(m.label)
  x, display = images_lib.prepare(raw, m.image_size, m.channels)
  num_show = min(args.num_show, len(x))
  out: dict[str, Any] = {"model": m.describe()}

  # Attention of every block: one compiled function serves the distances and the maps.
  attn_fn = jax.jit(lambda p, im: attention_distance.collect_attention(m.encoder, p, im))
  distances = attention_distance.attention_distance_per_layer(
      m.encoder, m.encoder_params, x, batch_size=args.batch_size, apply_fn=attn_fn)
  out["attention_distance"] = attention_distance.summarize(distances)

  encode = jax.jit(lambda p, im: m.encoder.apply({"params": p}, im)[:, 1:])
  tokens = _batched(encode, m.encoder_params, x, args.batch_size)
  out["spectrum"] = spectrum.summarize(tokens)

  layer = args.attention_layer % m.encoder.depth
  probs = attn_fn(m.encoder_params, jnp.asarray(x[:num_show]))[layer]
  figures = []
  for query in _queries(args, m):
    amap = maps.attention_maps(probs, query)
    figures.append(plots.attention_maps(
        display[:num_show], amap,
        os.path.join(args.out, f"attention_maps_{name}_{maps.query_name(query)}.png"),
        query=None if query == "cls" else query, patch_size=m.patch_size,
        title=f"{m.label}: attention of the {maps.query_name(query)} query, layer {layer + 1}"))

  if m.has_decoder:
    ratio = m.mask_ratio if args.mask_ratio is None else args.mask_ratio
    recon = reconstruction.reconstruct(m.model, m.params, x[:num_show],
                                       jax.random.key(args.seed), mask_ratio=ratio,
                                       norm_pix=m.norm_pix)
    figures.append(plots.reconstructions(
        reconstruction.display_images(recon, m.channels),
        os.path.join(args.out, f"reconstructions_{name}.png"),
        title=f"{m.label}: mask ratio {ratio:g}"))
  else:
    _say(f"{m.label}: no decoder in this checkpoint; skipping reconstructions")

  if probe:
    probe_path, probe = probe
    block = args.gradcam_block
    if block is None:
      # After the last block, patch tokens no longer reach the cls token: a cls-pooled
      # probe has zero gradient there, so its maps come from the block before.
      block = -2 if probe["pool"] == "cls" and m.encoder.depth > 1 else -1
    cams, targets = maps.gradcam(loading.probe_logits_fn(m.encoder, probe), m.encoder_params,
                                 x[:num_show], block_index=block)
    out["gradcam"] = {"probe": os.path.abspath(probe_path), "pool": probe["pool"],
                      "block": block % m.encoder.depth + 1}
    def name_of(c: int) -> str:
      return class_names[c] if class_names and 0 <= c < len(class_names) else str(int(c))

    captions = []
    for i, t in enumerate(targets):
      text = name_of(t)
      if true_labels is not None and 0 <= true_labels[i] != t:
        text += f" (true: {name_of(true_labels[i])})"
      captions.append(text)
    figures.append(plots.gradcam(display[:num_show], cams,
                                 os.path.join(args.out, f"gradcam_{name}.png"),
                                 captions=captions, title=f"{m.label}: Grad-CAM"))
  out["figures"] = [os.path.basename(f) for f in figures]
  return out


def _queries(args: argparse.Namespace, m: loading.LoadedModel) -> list[maps.Query]:
  try:
    return maps.parse_queries(args.queries, m.grid_size)
  except ValueError as e:  # parse_queries raises it for the text alone
    raise errors.ConfigError(f"--queries: {e} (in {m.label})") from e


def _check_options(args: argparse.Namespace, m: loading.LoadedModel) -> None:
  """Options that depend on the model, checked before any analysis runs (a mistake in
  them would otherwise surface after minutes, or as a shape error deep in JAX)."""
  _queries(args, m)
  depth = m.encoder.depth
  for flag in ("attention_layer", "gradcam_block"):
    block = getattr(args, flag)
    if block is not None and not -depth <= block < depth:
      raise errors.ConfigError(f"--{flag} {block}: {m.label} has {depth} blocks "
                               f"(0..{depth - 1}, or -{depth}..-1 from the end)")


def _load_probe(path: str, args: argparse.Namespace,
                m: loading.LoadedModel) -> tuple[str, dict[str, Any]]:
  probe = loading.load_probe(path, pool=args.probe_pool)
  kernel, bias = np.shape(probe["kernel"]), np.shape(probe["bias"])
  if len(kernel) != 2 or kernel[0] != m.encoder.width or bias != kernel[1:]:
    raise errors.DataError(
        f"{path}: a probe for {m.label} needs kernel ({m.encoder.width}, classes) and bias "
        f"(classes,); it has kernel {kernel} and bias {bias}")
  return path, probe


def _make_output_dir(out: str) -> None:
  try:
    os.makedirs(out, exist_ok=True)
  except FileExistsError as e:  # exist_ok covers directories only
    raise errors.UserError(f"--out {out}: not a directory (a file is in the way)") from e


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Loads every checkpoint, analyses it and writes the figures and ``metrics.json``.

  Everything the user gave (output directory, checkpoints, probes, model-dependent
  options) is checked before the first analysis, so bad input fails at once.
  """
  start = time.time()
  _make_output_dir(args.out)
  labels = args.labels or [None] * len(args.checkpoint)
  loaded = [loading.load(path, label=label, which=args.which, key=args.torch_key,
                         num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads,
                         image_size=args.image_size)
            for path, label in zip(args.checkpoint, labels)]
  for m, label in zip(loaded, _unique([m.label for m in loaded])):
    m.label = label
  for m in loaded:
    _check_options(args, m)
  probes = [_load_probe(path, args, m) for path, m in zip(args.probe, loaded)]
  if len({(m.image_size, m.patch_size) for m in loaded}) > 1:
    _say("warning: the checkpoints differ in image or patch size; distances are in pixels "
         "of each model's own input")
  if not args.probe:
    _say("no --probe given; skipping Grad-CAM")
  raw, true_labels = images_lib.load(args.images, args.num_images)
  class_names = images_lib.FASHION_MNIST_CLASSES if args.images == "fashion_mnist" else None

  results: dict[str, Any] = {}
  for i, m in enumerate(loaded):
    _say(f"{m.label}: {m.kind} {m.source} ({m.encoder.depth} blocks, "
         f"{m.encoder.num_heads} heads, {m.image_size}px/{m.patch_size})")
    probe = probes[i] if i < len(probes) else None
    results[m.label] = analyze_model(m, raw, true_labels, args, class_names, probe)

  plots.attention_distance(
      {k: np.asarray(v["attention_distance"]["per_layer_head"]) for k, v in results.items()},
      os.path.join(args.out, "attention_distance.png"))
  plots.spectrum({k: np.asarray(v["spectrum"]["spectrum"]) for k, v in results.items()},
                 os.path.join(args.out, "spectrum.png"),
                 effective_ranks={k: v["spectrum"]["effective_rank"] for k, v in results.items()})
  metrics = {"images": {"source": args.images, "num_images": len(raw)},
             "attention_distance_definition": (
                 "pixels; cls excluded as query and key, attention renormalised over patch "
                 "keys; mean over query patches and images"),
             "spectrum_definition": (
                 "per image, output patch tokens centred over tokens; singular values / the "
                 "largest, mean over images; effective rank = exp(entropy of s / sum s), "
                 "mean over images"),
             "models": results}
  with open(os.path.join(args.out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1)
  for label, r in results.items():
    _say(f"{label}: mean attention distance {r['attention_distance']['mean']:.2f} px, "
         f"effective rank {r['spectrum']['effective_rank']:.2f}")
  _say(f"wrote {args.out} in {time.time() - start:.1f} s")
  return metrics


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Console-script entry point (``lut-analyze``)."""
  args = parse_args(argv)
  # Only user errors (lut_jax.errors, and OS errors such as a missing file) become one line
  # with status 2; anything else is a bug and keeps its traceback.
  errors.reporting_user_errors(lambda: run(args), prog=PROG,
                               argv=["--debug"] if args.debug else [])


if __name__ == "__main__":
  main()
