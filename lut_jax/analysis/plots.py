"""Figures of the analyses, drawn with matplotlib's Agg backend (files only, no display)."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines and tests have no display
from matplotlib import patches as mpatches  # noqa: E402  pylint: disable=g-import-not-at-top
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

DPI = 100
COLORS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown")
MARKERS = ("o", "s", "^", "D", "v", "P")


def _save(fig: plt.Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  plt.close(fig)
  return path


def _show_image(ax: plt.Axes, image: np.ndarray) -> None:
  image = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
  else:
    ax.imshow(image)
  ax.set_xticks([])
  ax.set_yticks([])


def _overlay(ax: plt.Axes, image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.55,
             vmax: Optional[float] = None) -> None:
  """``heat`` (a patch-grid map) stretched over ``image``, bilinearly interpolated."""
  grey = np.asarray(image, np.float32).mean(axis=-1)
  size = grey.shape[0]
  ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0, extent=(0, size, size, 0))
  ax.imshow(heat, cmap="jet", alpha=alpha, interpolation="bilinear", vmin=0.0,
            vmax=vmax if vmax is not None else max(float(heat.max()), 1e-12),
            extent=(0, size, size, 0))
  ax.set_xticks([])
  ax.set_yticks([])


def attention_distance(distances: Mapping[str, np.ndarray], path: str, *,
                       title: str = "Mean attention distance") -> str:
  """One dot per head and layer, checkpoints overlaid (shifted sideways), with the mean
  over heads as a line. ``distances``: ``{label: (layers, heads) pixels}``."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  n = len(distances)
  for i, (label, d) in enumerate(distances.items()):
    d = np.asarray(d)
    layers = np.arange(1, d.shape[0] + 1)
    offset = (i - (n - 1) / 2) * 0.15
    color = COLORS[i % len(COLORS)]
    ax.scatter(np.repeat(layers + offset, d.shape[1]), d.reshape(-1), s=18, alpha=0.7,
               color=color, marker=MARKERS[i % len(MARKERS)], label=f"{label} (heads)")
    ax.plot(layers + offset, d.mean(axis=1), color=color, lw=1.2, alpha=0.9,
            label=f"{label} (mean {d.mean():.2f} px)")
  first = np.asarray(next(iter(distances.values())))
  ax.set_xticks(np.arange(1, first.shape[0] + 1))
  ax.set_xlabel("layer")
  ax.set_ylabel("mean attention distance (pixels)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def spectrum(spectra: Mapping[str, np.ndarray], path: str, *,
             effective_ranks: Optional[Mapping[str, float]] = None,
             title: str = "Singular values of patch tokens") -> str:
  """Normalised singular values (largest = 1) against their index, log scale."""
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for i, (label, s) in enumerate(spectra.items()):
    s = np.asarray(s)
    text = label
    if effective_ranks and label in effective_ranks:
      text += f" (effective rank {effective_ranks[label]:.1f})"
    # Exact zeros (rank-deficient tokens) cannot be drawn on a log axis: clip them.
    ax.plot(np.arange(1, len(s) + 1), np.maximum(s, 1e-12), color=COLORS[i % len(COLORS)],
            lw=1.5, label=text)
  ax.set_yscale("log")
  ax.set_xlabel("singular value index")
  ax.set_ylabel("normalised singular value")
  ax.set_title(title)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  return _save(fig, path)


def attention_maps(images: np.ndarray, maps: np.ndarray, path: str, *,
                   query: Optional[tuple[int, int]] = None, patch_size: int = 16,
                   title: str = "") -> str:
  """Rows: ``(N, S, S, C)`` display ``images`` in ``[0, 1]``; columns: the image (``query``
  patch ``(row, col)`` boxed; None for cls) then one overlay per head of ``maps`` ``(N,
  heads, grid, grid)``."""
  n, heads = maps.shape[:2]
  cell = 1.3
  fig, axes = plt.subplots(n, heads + 1, figsize=(cell * (heads + 1), cell * n + 0.4),
                           squeeze=False)
  for i in range(n):
    _show_image(axes[i, 0], images[i])
    if query is not None:
      r, c = query
      axes[i, 0].add_patch(mpatches.Rectangle(
          (c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size, fill=False,
          edgecolor="red", lw=1.5))
    for h in range(heads):
      _overlay(axes[i, h + 1], images[i], maps[i, h])
      if i == 0:
        axes[i, h + 1].set_title(f"head {h}", fontsize=8)
  axes[0, 0].set_title("query" if query is not None else "cls query", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def gradcam(images: np.ndarray, cams: np.ndarray, path: str, *,
            captions: Optional[Sequence[str]] = None, title: str = "") -> str:
  """Pairs of (image, Grad-CAM overlay), up to eight pairs per row; ``captions`` (e.g. the
  explained class) go above the overlays."""
  n = len(images)
  per_row = min(n, 8)
  rows = -(-n // per_row)
  cell = 1.3
  fig, axes = plt.subplots(rows, 2 * per_row, figsize=(cell * 2 * per_row, cell * rows + 0.4),
                           squeeze=False)
  for ax in axes.reshape(-1):
    ax.axis("off")
  for i in range(n):
    row, col = i // per_row, 2 * (i % per_row)
    _show_image(axes[row, col], images[i])
    _overlay(axes[row, col + 1], images[i], cams[i], vmax=1.0)
    if captions is not None:
      axes[row, col + 1].set_title(captions[i], fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def reconstructions(display: Mapping[str, np.ndarray], path: str, *, title: str = "") -> str:
  """Rows: images; columns: input, masked input, reconstruction, reconstruction with the
  visible patches pasted back (keys of :func:`lut_jax.pretrain.reconstruction.reconstruct`)."""
  columns = [("input", "input"), ("masked", "masked"), ("reconstruction", "reconstruction"),
             ("reconstruction_visible", "recon. + visible")]
  n = len(display["input"])
  cell = 1.3
  fig, axes = plt.subplots(n, len(columns), figsize=(cell * len(columns), cell * n + 0.4),
                           squeeze=False)
  for j, (key, name) in enumerate(columns):
    for i in range(n):
      _show_image(axes[i, j], display[key][i])
    axes[0, j].set_title(name, fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  return _save(fig, path)
