"""Evaluation from weights made elsewhere: a PyTorch ``.pth`` of a timm ViT, the folder timm
writes (``model.safetensors`` + ``config.json``) and ``hf-hub:`` (the download mocked: no
network here) give the features timm itself computes; a missing file, an architecture our
encoder cannot represent and a missing huggingface_hub are one-line user errors."""

import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

from lut_jax import errors
from lut_jax.cli import evaluate as evaluate_cli
from lut_jax.models import vit as vit_lib
from lut_jax.weights import convert, loading, sources
from tests.test_eval_cache import ENCODER_CONFIG, knn_config_for_tests, reads  # noqa: F401

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
IMAGE, PATCH, WIDTH = ENCODER_CONFIG["image_size"], ENCODER_CONFIG["patch_size"], 32


def tiny_timm_vit(seed: int = 0, *, fixed_pos_embed: bool = True, **kwargs):
  """A timm ViT of the tiny encoder's size, built by timm's own factory (so that
  ``save_for_hf`` records its arguments), every tensor random, with a 10-class head (which
  the loaders skip). ``fixed_pos_embed``: MAE's fixed sin-cos table instead of a learned
  one, as in the reference checkpoints."""
  torch.manual_seed(seed)
  vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=IMAGE,
                          patch_size=PATCH, embed_dim=WIDTH, depth=2, num_heads=2,
                          num_classes=10, **kwargs).eval()
  with torch.no_grad():
    for name, value in vit.named_parameters():
      if name != "pos_embed":  # LayerNorm scales around 1, everything else around 0
        value.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2)
    if fixed_pos_embed:
      grid = IMAGE // PATCH
      vit.pos_embed.copy_(torch.from_numpy(vit_lib.sincos_pos_embed_2d(WIDTH, grid)[None]))
  return vit


def save_timm_folder(vit, folder) -> None:
  """``model.safetensors`` + ``config.json`` as timm itself writes them for the Hub."""
  pytest.importorskip("huggingface_hub")  # save_for_hf asserts it is installed
  timm.models.save_for_hf(vit, str(folder), safe_serialization=True)


def timm_features(vit, images: np.ndarray) -> dict[str, np.ndarray]:
  """The independent reference: timm's tokens, pooled as lut_jax pools them."""
  with torch.no_grad():
    tokens = vit.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  return {"cls": tokens[:, 0], "mean": tokens[:, 1:].mean(axis=1)}


def evaluate_knn(pretrained: str, workdir: str) -> tuple[dict, dict]:
  """kNN through eval_main's path (validation, loading, cache, results file): the
  results and what the results file says of the source."""
  config = knn_config_for_tests()
  config.pretrained = pretrained
  results = evaluate_cli.evaluate(config, workdir)
  with open(os.path.join(workdir, "knn_results.json")) as f:
    return results, json.load(f)["source"]


def assert_features_match_timm(workdir: str, vit) -> None:
  """The cached test-split features of a kNN run are timm's on the same images."""
  from lut_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top (the fake)
  config = knn_config_for_tests()
  config.input.unlock()
  config.input.image_size, config.input.channels = IMAGE, 3
  batches = input_pipeline.create_eval_dataset(config.input, "test", batch_size=16)
  images = np.concatenate([b["image"] for b in batches])
  expected = timm_features(vit, images)
  with np.load(os.path.join(workdir, "features", "test.npz")) as cached:
    for pool in ("cls", "mean"):
      np.testing.assert_allclose(cached[pool], expected[pool], atol=1e-4, rtol=1e-4)


def in_memory(vit) -> loading.Pretrained:
  """The same weights, converted in memory: no file, no loader."""
  encoder = vit_lib.Encoder(**ENCODER_CONFIG)
  params = convert.encoder_params_from_timm_state_dict(vit.state_dict(), encoder)
  return loading.Pretrained(encoder=encoder, params=params, channels=3, source="in memory")


def test_knn_from_a_timm_pth_matches_timm(tmp_path, reads):  # noqa: F811
  vit = tiny_timm_vit()
  path = tmp_path / "vit.pth"
  torch.save(vit.state_dict(), path)
  results, source = evaluate_knn(str(path), str(tmp_path / "knn"))
  assert_features_match_timm(str(tmp_path / "knn"), vit)
  assert source["pretrained"] == str(path) and source["kind"] == "torch"
  from lut_jax.evaluation import knn  # pylint: disable=g-import-not-at-top
  expected = knn.run(knn_config_for_tests(), str(tmp_path / "memory"),
                         pretrained=in_memory(vit))
  assert results == expected
  assert source["params_sha256"] == in_memory(vit).fingerprint


def test_knn_from_a_folder_timm_wrote_matches_timm(tmp_path, reads,  # noqa: F811
                                                   monkeypatch):
  vit = tiny_timm_vit(seed=1)
  folder = tmp_path / "timm_folder"
  save_timm_folder(vit, folder)
  assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
  assert sources.locate(str(folder))[0] == "timm"
  results, source = evaluate_knn(str(folder), str(tmp_path / "knn"))
  assert_features_match_timm(str(tmp_path / "knn"), vit)
  assert source["pretrained"] == str(folder) and source["kind"] == "timm"
  # The same weights as a bare .safetensors file: the heads come from the width.
  shutil.copy(folder / "model.safetensors", tmp_path / "weights.safetensors")
  loaded = loading.load(str(tmp_path / "weights.safetensors"), encoder_only=True)
  assert loaded.kind == "safetensors" and loaded.config == ENCODER_CONFIG
  assert loaded.fingerprint == in_memory(vit).fingerprint

  # hf-hub: the same two files, "downloaded" into a fake cache by a mocked
  # huggingface_hub.hf_hub_download.
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  downloads = []

  def hf_hub_download(repo_id, filename, *, revision=None, **unused):
    del unused
    downloads.append((repo_id, filename, revision))
    snapshot = tmp_path / "hf_cache" / repo_id.replace("/", "--") / (revision or "main")
    snapshot.mkdir(parents=True, exist_ok=True)
    return shutil.copy(folder / filename, snapshot / filename)

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
  hub_results, source = evaluate_knn("hf-hub:org/tiny-vit@v1", str(tmp_path / "hub"))
  assert {(r, f) for r, f, _ in downloads} == {("org/tiny-vit", "config.json"),
                                               ("org/tiny-vit", "model.safetensors")}
  assert {rev for _, _, rev in downloads} == {"v1"}
  assert source["pretrained"] == "hf-hub:org/tiny-vit@v1" and source["kind"] == "hf-hub"
  assert hub_results == results


def test_hf_hub_without_huggingface_hub_is_one_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
  with pytest.raises(errors.UserError, match="needs the huggingface_hub package") as error:
    loading.load("hf-hub:org/name", encoder_only=True)
  assert "hf-hub:org/name" in str(error.value) and "pip install" in error.value.hint
  with pytest.raises(errors.UserError, match="no repository"):
    sources.locate("hf-hub:")


def _timm_folder(tmp_path, vit, **config_changes) -> str:
  folder = tmp_path / "folder"
  save_timm_folder(vit, folder)
  config = json.loads((folder / "config.json").read_text())
  for key, value in config_changes.items():
    if key.startswith("model_args."):
      config["model_args"][key.split(".", 1)[1]] = value
    else:
      config[key] = value
  (folder / "config.json").write_text(json.dumps(config))
  return str(folder)


@pytest.mark.parametrize("problem, match", [
    ("missing", "no such file or directory"),
    ("architecture", "unsupported architecture 'resnet50'"),
    ("register_tokens", "reg_tokens=4"),
    ("learned_pos_embed", "learned position embedding"),
    ("layer_scale", r"unexpected tensors.*ls1\.gamma"),
    ("not_safetensors", "not a safetensors file"),
])
def test_unusable_sources_are_one_user_error(tmp_path, problem, match):
  if problem == "missing":
    path = str(tmp_path / "nothing.pth")
  elif problem == "architecture":
    path = _timm_folder(tmp_path, tiny_timm_vit(), architecture="resnet50")
  elif problem == "register_tokens":
    path = _timm_folder(tmp_path, tiny_timm_vit(), **{"model_args.reg_tokens": 4})
  elif problem == "learned_pos_embed":
    path = _timm_folder(tmp_path, tiny_timm_vit(fixed_pos_embed=False))
  elif problem == "layer_scale":  # invisible in config.json: the tensors give it away
    vit = tiny_timm_vit(init_values=0.1)
    path = str(tmp_path / "vit.pth")
    torch.save(vit.state_dict(), path)
  else:
    path = str(tmp_path / "folder")
    os.makedirs(path)
    (tmp_path / "folder" / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "folder" / "config.json").write_text(json.dumps(
        {"architecture": "vit_base_patch16_224"}))
  with pytest.raises(Exception) as error:  # noqa: PT011 - classified below
    loading.load(path, encoder_only=True)
  user = errors.as_user_error(error.value)
  assert user is not None, repr(error.value)
  assert path in str(user) or problem == "missing" and "nothing.pth" in str(user)
  assert re.search(match, str(user), flags=re.S), str(user)

