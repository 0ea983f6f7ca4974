"""docs/demo.ipynb runs: its code cells, in order, on a tiny pre-training work directory.

The cells are executed in one namespace, as a kernel would run them top to bottom, with the
``parameters`` cell replaced (papermill's convention), so the test needs no Jupyter.
"""

import json
import os

import matplotlib
import numpy as np
import pytest

from tests import test_export

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                        "demo.ipynb")


def _code_cells(notebook: dict) -> list[tuple[list[str], str]]:
  return [(c.get("metadata", {}).get("tags", []), "".join(c["source"]))
          for c in notebook["cells"] if c["cell_type"] == "code"]


def test_demo_notebook_runs_on_a_tiny_pretraining(tmp_path, monkeypatch):
  pytest.importorskip("skimage")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  notebook = json.load(open(NOTEBOOK))
  assert notebook["nbformat"] == 4
  cells = _code_cells(notebook)
  assert [tags for tags, _ in cells].count(["parameters"]) == 1
  assert all(not c.get("outputs") for c in notebook["cells"] if c["cell_type"] == "code"), \
      "commit the notebook without outputs"
  workdir = tmp_path / "run"
  test_export.make_pretraining_workdir(str(workdir))
  shown = []
  monkeypatch.setattr(plt, "show", lambda: shown.append(plt.gcf()))
  namespace: dict = {}
  for tags, source in cells:
    if "parameters" in tags:
      source = (f"CHECKPOINT = {str(workdir)!r}\nIMAGES = 'skimage'\nNUM_IMAGES = 2\n"
                "ATTENTION_LAYER = -1\nSEED = 0\n")
    exec(compile(source, NOTEBOOK, "exec"), namespace)  # pylint: disable=exec-used
  model, recon, amap = namespace["model"], namespace["recon"], namespace["amap"]
  grid = model.grid_size
  assert recon is not None and recon["reconstruction"].shape == namespace["x"].shape
  # Visible patches pasted back: equal to the input wherever the mask keeps the patch.
  from lut_jax.pretrain import losses  # pylint: disable=g-import-not-at-top
  visible = np.asarray(recon["mask"]) == 0
  pasted = np.asarray(losses.patchify(recon["reconstruction_visible"], model.patch_size))
  given = np.asarray(losses.patchify(recon["input"], model.patch_size))
  assert 0 < visible.sum() < visible.size
  np.testing.assert_allclose(pasted[visible], given[visible], atol=1e-6)
  assert amap.shape == (2, model.encoder.num_heads, grid, grid)
  np.testing.assert_allclose(amap.sum(axis=(2, 3)), 1.0, rtol=1e-5)
  assert len(shown) == 2  # the reconstruction grid and the attention maps
  plt.close("all")
