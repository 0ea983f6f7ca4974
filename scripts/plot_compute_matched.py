r"""Probe accuracy against pre-training compute, LUT and MAE, from the comparison sections.

  python scripts/plot_compute_matched.py --results=docs/results.md \
      --tags=600steps,2400steps,4800steps,9600steps \
      --out=docs/images/compute_matched.png

Reads the summary rows (``| LUT (3 seeds) | kNN cls | kNN mean | linear cls | linear mean |
pre-train s/run |``) of the sections that ``scripts/compare_lut_mae.py --tag=...`` wrote
into ``--results``, and plots each method's mean (error bar: the seed std) against the run's pre-training
model FLOPs (``scripts/flops.py`` per image of ``configs/fashion_mnist.py``, times batch
and steps, both read from the section): the same numbers as the per-epoch tables, per unit
of compute. FLOPs, not the recorded wall seconds, because those depend on what else the
machine ran (the printout lists them beside).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]  # the repository (configs/) and scripts/
from configs import fashion_mnist  # noqa: E402  pylint: disable=g-import-not-at-top
import flops  # noqa: E402  pylint: disable=g-import-not-at-top

COLUMNS = ("kNN cls", "kNN mean", "linear cls", "linear mean")
_ROW = re.compile(r"^\| (LUT|MAE) \((\d+) seeds\) \|(.*)\| (\d+) \|$")
_BUDGET = re.compile(r"batch (\d+), (\d+) steps")


def read_points(text: str, tag: str) -> list[dict]:
  """``[{method, seeds, seconds, "kNN cls": (mean, std), ...}]`` of one tagged section."""
  begin = f"<!-- compare_lut_mae {tag}: begin -->"
  if begin not in text:
    raise SystemExit(f"plot_compute_matched.py: no section {tag!r} (compare_lut_mae --tag)")
  section = text.split(begin, 1)[1].split(f"<!-- compare_lut_mae {tag}: end -->", 1)[0]
  budget = _BUDGET.search(section)
  if not budget:
    raise SystemExit(f"plot_compute_matched.py: section {tag!r} names no 'batch B, N steps'")
  images = int(budget.group(1)) * int(budget.group(2))
  shape = flops.shape_from_config(fashion_mnist.get_config().to_dict())
  points = []
  for line in section.splitlines():
    if not (m := _ROW.match(line.strip())):
      continue
    cells = [c.strip() for c in m.group(3).split("|")]
    method = m.group(1)
    point = {"method": method, "seeds": int(m.group(2)), "seconds": int(m.group(4)),
             "tag": tag,
             "tflops": images * flops.step_flops(shape, method.lower())["model_total"] / 1e12}
    for name, cell in zip(COLUMNS, cells):
      mean, _, std = cell.partition("±")
      point[name] = (float(mean), float(std) if std.strip() else 0.0)
    points.append(point)
  return points


def main() -> None:
  # argparse, not absl flags: tests import this module beside lut_jax's command lines,
  # whose absl flags (--out) would clash in one process.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", default="docs/results.md", help="Markdown file to read.")
  parser.add_argument("--tags", default="600steps,2400steps,4800steps,9600steps",
                      help="comma-separated sections (compare_lut_mae --tag) to plot")
  parser.add_argument("--out", default="docs/images/compute_matched.png", help="PNG to write.")
  args = parser.parse_args()
  with open(args.results) as f:
    text = f.read()
  points = [p for tag in args.tags.split(",") for p in read_points(text, tag)]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, column in zip(axes, ("kNN cls", "linear cls")):
    for method, color in (("LUT", "tab:red"), ("MAE", "tab:blue")):
      own = sorted((p for p in points if p["method"] == method), key=lambda p: p["tflops"])
      ax.errorbar([p["tflops"] for p in own], [p[column][0] for p in own],
                  yerr=[p[column][1] for p in own], marker="o", color=color, label=method,
                  capsize=3)
      for p in own:
        ax.annotate(p["tag"], (p["tflops"], p[column][0]), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    ax.set(xscale="log", xlabel="pre-training model TFLOPs per run",
           title=f"{column} top-1 (%)")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  for p in points:
    print(p["tag"], p["method"], f"{p['tflops']:.0f} TFLOPs", f"{p['seconds']} s",
          *(p[c][0] for c in COLUMNS))


if __name__ == "__main__":
  main()
