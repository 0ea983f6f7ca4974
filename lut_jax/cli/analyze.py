r"""Analyses of pre-trained encoders, as in the LUT paper: attention distance, token
spectrum, attention / Grad-CAM maps and MAE reconstructions.

  lut-analyze --checkpoint runs/fmnist_lut --checkpoint runs/fmnist_mae \
      --labels LUT,MAE --images fashion_mnist --num_images 64 --out runs/analysis

``--checkpoint`` takes a pre-training workdir (latest checkpoint; or a
``WORKDIR/checkpoints/<step>`` directory), an exported encoder directory, a PyTorch
``.pth`` (reference / MAE / timm), a ``.safetensors`` file, a timm folder
(``model.safetensors`` + ``config.json``) or ``hf-hub:org/name``. Writes to ``--out``:

* ``attention_distance.png``: mean attention distance per layer, one dot per head, all
  checkpoints overlaid;
* ``spectrum.png``: normalised singular values of the output patch tokens (log scale);
* ``attention_maps_<label>_<query>.png``: attention of a query patch (or cls) per head in
  the chosen layer, for the first ``--num_show`` images;
* ``reconstructions_<label>.png``: input / masked / reconstruction (checkpoints with a
  decoder);
* ``gradcam_<label>.png``: only with ``--probe`` (a linear-probe workdir of
  ``lut_jax.evaluation`` or a ``.npz``, one per checkpoint in order; see
  :mod:`lut_jax.weights.loading`);
* ``metrics.json``: attention distances per layer/head, spectra and effective ranks.

Bad input (a checkpoint that cannot be read, a wrong option) ends as one line,
``lut-analyze: error: ...``, with exit status 2; ``--debug`` shows its traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from lut_jax import errors
from lut_jax.analysis import attention_distance, images as images_lib, maps, plots, spectrum
from lut_jax.data import idx, image_utils
from lut_jax.pretrain import reconstruction
from lut_jax.runtime import checkpointing
from lut_jax.weights import loading


PROG = "lut-analyze"
IMAGE_SOURCES = ("fashion_mnist", "skimage")


def _say(message: str) -> None:
  print(f"analyze: {message}", flush=True)


def _file_label(label: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


flags.DEFINE_multi_string(
    "checkpoint", None, "workdir, exported encoder dir, .pth or .safetensors file, timm "
    "folder or hf-hub:org/name; repeat to compare")
flags.DEFINE_list("labels", [], "comma-separated names, one per --checkpoint (default: file "
                  "names)")
flags.DEFINE_string("images", "fashion_mnist",
                    "'fashion_mnist' (test split), 'skimage' (bundled photos) or a directory")
flags.DEFINE_integer("num_images", 64, "images for the attention distance and the spectrum",
                     lower_bound=1)
flags.DEFINE_integer("num_show", 4, "images drawn in the map and reconstruction figures",
                     lower_bound=1)
flags.DEFINE_string("out", None, "output directory")
flags.DEFINE_enum("which", "params", ["params", "target_params"],
                  "workdirs: the online network or the EMA teacher")
flags.DEFINE_string("queries", "center;cls",
                    "attention-map queries: 'cls', 'center' or 'row,col', ';'-separated")
flags.DEFINE_integer("attention_layer", -1,
                     "block whose attention is drawn (negative: from the end)")
flags.DEFINE_multi_string("probe", [], "linear probe (workdir or .npz) for Grad-CAM, one per "
                          "--checkpoint in order")
flags.DEFINE_enum("probe_pool", None, ["cls", "mean"], "override the probe's feature pooling")
flags.DEFINE_integer("gradcam_block", None,
                     "encoder block whose output Grad-CAM uses (default: the last for "
                     "mean-pooled probes, the one before for cls-pooled ones)")
flags.DEFINE_float("mask_ratio", None, "reconstruction mask ratio (default: the checkpoint's)")
flags.DEFINE_integer("seed", 0, "seed of the reconstruction masks")
flags.DEFINE_integer("batch_size", 16, "images per forward pass", lower_bound=1)
flags.DEFINE_string("torch_key", None, ".pth: checkpoint entry to read (e.g. model_ema)")
flags.DEFINE_integer("num_heads", None,
                     ".pth: encoder heads (default: the standard ViT of that width)",
                     lower_bound=1)
flags.DEFINE_integer("decoder_num_heads", 16, ".pth: decoder heads", lower_bound=1)
flags.DEFINE_integer("image_size", None,
                     ".pth: input image size (default: from the size of pos_embed)",
                     lower_bound=1)
flags.mark_flags_as_required(["checkpoint", "out"])


def parse_args(argv: Sequence[str]) -> flags.FlagValues:
  """The flags with ``argv`` (the arguments, without the program name) parsed, for callers
  in the same process; the command line itself goes through ``errors.run_app``."""
  # Only this tool's flags: parsing the global FLAGS would also run the checks of every
  # other program imported in the process (lut_jax.cli.pretrain's required --config, ...).
  own = flags.FlagValues()
  for flag in flags.FLAGS.get_flags_for_module(__name__):
    own[flag.name] = flag
  own.unparse_flags()  # parsing again would add to the values of the repeated flags
  own([PROG, *argv])
  return own


def _check_flags(args: flags.FlagValues) -> None:
  """What absl's per-flag checks cannot say: ranges with an open end, files, counts."""
  if args.mask_ratio is not None and not 0.0 <= args.mask_ratio < 1.0:
    raise errors.ConfigError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio:g}")
  if args.images not in IMAGE_SOURCES and not os.path.isdir(args.images):
    raise errors.ConfigError(f"--images {args.images!r}: expected "
                             f"{' or '.join(IMAGE_SOURCES)} or a directory of images")
  if args.labels and len(args.labels) != len(args.checkpoint):
    raise errors.ConfigError(f"--labels has {len(args.labels)} names for "
                             f"{len(args.checkpoint)} checkpoints")
  if len(args.probe) > len(args.checkpoint):
    raise errors.ConfigError("more --probe files than --checkpoint")


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


def analyze_model(m: loading.Pretrained, raw: list[np.ndarray],
                  true_labels: Optional[np.ndarray], args: flags.FlagValues,
                  class_names: Optional[Sequence[str]],
                  probe: Optional[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
  """Every analysis of one model; writes its per-model figures, returns its metrics. ``probe``
  is ``(path, loading.load_probe(path))`` for Grad-CAM, or None."""
  name = _file_label(m.label)
  x, display = images_lib.prepare(raw, m.image_size, m.channels)
  num_show = min(args.num_show, len(x))
  out: dict[str, Any] = {"model": m.describe()}

  # Attention of every block: one compiled function serves the distances and the maps.
  attn_fn = jax.jit(lambda p, im: attention_distance.collect_attention(m.encoder, p, im))
  distances = attention_distance.attention_distance_per_layer(
      m.encoder, m.params, x, batch_size=args.batch_size, apply_fn=attn_fn)
  out["attention_distance"] = attention_distance.summarize(distances)

  encode = jax.jit(lambda p, im: m.encoder.apply({"params": p}, im, forward_only=True)[:, 1:])
  tokens = _batched(encode, m.params, x, args.batch_size)
  out["spectrum"] = spectrum.summarize(tokens)

  layer = args.attention_layer % m.encoder.depth
  probs = attn_fn(m.params, jnp.asarray(x[:num_show]))[layer]
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
    recon = reconstruction.reconstruct(m.model, m.model_params, x[:num_show],
                                       jax.random.key(args.seed), mask_ratio=ratio,
                                       norm_pix=m.norm_pix)
    figures.append(plots.reconstructions(
        {k: image_utils.denormalize(v, m.channels) for k, v in recon.items() if k != "mask"},
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
    cams, targets = maps.gradcam(loading.probe_logits_fn(m.encoder, probe), m.params,
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


def _queries(args: flags.FlagValues, m: loading.Pretrained) -> list[maps.Query]:
  try:
    return maps.parse_queries(args.queries, m.grid_size)
  except ValueError as e:  # parse_queries raises it for the text alone
    raise errors.ConfigError(f"--queries: {e} (in {m.label})") from e


def _check_options(args: flags.FlagValues, m: loading.Pretrained) -> None:
  """Options that depend on the model, checked before any analysis runs (a mistake in
  them would otherwise surface after minutes, or as a shape error deep in JAX)."""
  _queries(args, m)
  depth = m.encoder.depth
  for flag in ("attention_layer", "gradcam_block"):
    block = getattr(args, flag)
    if block is not None and not -depth <= block < depth:
      raise errors.ConfigError(f"--{flag} {block}: {m.label} has {depth} blocks "
                               f"(0..{depth - 1}, or -{depth}..-1 from the end)")


def _load_probe(path: str, args: flags.FlagValues,
                m: loading.Pretrained) -> tuple[str, dict[str, Any]]:
  probe = loading.load_probe(path, pool=args.probe_pool)
  kernel, bias = np.shape(probe["kernel"]), np.shape(probe["bias"])
  if len(kernel) != 2 or kernel[0] != m.encoder.width or bias != kernel[1:]:
    raise errors.DataError(
        f"{path}: a probe for {m.label} needs kernel ({m.encoder.width}, classes) and bias "
        f"(classes,); it has kernel {kernel} and bias {bias}")
  return path, probe


def _make_output_dir(out: str) -> None:
  if checkpointing.is_url(out):  # matplotlib and json write local files
    raise errors.UserError(f"--out {out}: lut-analyze writes its figures to a local "
                           "directory", hint="write them locally, then copy the directory")
  try:
    os.makedirs(out, exist_ok=True)
  except FileExistsError as e:  # exist_ok covers directories only
    raise errors.UserError(f"--out {out}: not a directory (a file is in the way)") from e


def analyze(args: flags.FlagValues) -> dict[str, Any]:
  """Loads every checkpoint, analyses it and writes the figures and ``metrics.json``.
  Everything the user gave (output directory, checkpoints, probes, model-dependent options) is
  checked before the first analysis, so bad input fails at once."""
  start = time.time()
  _check_flags(args)
  _make_output_dir(args.out)
  labels = args.labels or [None] * len(args.checkpoint)
  loaded = [loading.load(path, label=label, which=args.which, key=args.torch_key,
                         num_heads=args.num_heads, decoder_num_heads=args.decoder_num_heads,
                         image_size=args.image_size)
            for path, label in zip(args.checkpoint, labels)]
  loaded = [dataclasses.replace(m, label=label)
            for m, label in zip(loaded, _unique([m.label for m in loaded]))]
  for m in loaded:
    _check_options(args, m)
  probes = [_load_probe(path, args, m) for path, m in zip(args.probe, loaded)]
  if len({(m.image_size, m.patch_size) for m in loaded}) > 1:
    _say("warning: the checkpoints differ in image or patch size; distances are in pixels "
         "of each model's own input")
  if not args.probe:
    _say("no --probe given; skipping Grad-CAM")
  raw, true_labels = images_lib.load(args.images, args.num_images)
  class_names = idx.FASHION_MNIST_CLASSES if args.images == "fashion_mnist" else None

  results: dict[str, Any] = {}
  for i, m in enumerate(loaded):
    _say(f"{m.label}: {m.kind} {m.path} ({m.encoder.depth} blocks, "
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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {' '.join(argv[1:])}",
                           hint="every option is a --flag=value; see --help")
  analyze(flags.FLAGS)


def run() -> None:
  """Console-script entry point (``lut-analyze``)."""
  errors.run_app(main, prog=PROG)


if __name__ == "__main__":
  run()
