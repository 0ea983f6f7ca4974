"""Semantic segmentation: scores against a numpy reference and a hand-computed example, the
UperNet model's shapes, a short overfit, sliding-window inference, the synthetic task, the
folder source, the presets and the whole mode through eval_main."""

import functools
import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import segmentation as seg_config
from lut_jax import errors
from lut_jax.data import segmentation_synthetic
from lut_jax.evaluation import segmentation, segmentation_metrics
from lut_jax.models import segmenter, upernet, variants, vit
from lut_jax.pretrain import train_state
from lut_jax.runtime import optim

IGNORE = 255


# ------------------------------------------------------------------------- scores


def reference_confusion(pred: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
  """Rows = truth, columns = prediction, labelled pixels only; written with np.add.at."""
  keep = (truth != IGNORE) & (truth < k)
  confusion = np.zeros((k, k), np.int64)
  np.add.at(confusion, (truth[keep], pred[keep]), 1)
  return confusion


def reference_scores(pred: np.ndarray, truth: np.ndarray, k: int) -> dict:
  """Per-class loops over the pixels, as the metric is usually defined."""
  ious, accs, hits, total = [], [], 0, 0
  labelled = truth != IGNORE
  for c in range(k):
    inter = np.sum((pred == c) & (truth == c) & labelled)
    union = np.sum(((pred == c) | (truth == c)) & labelled)
    if union:  # classes absent from both are left out
      ious.append(inter / union)
    if np.sum((truth == c) & labelled):
      accs.append(inter / np.sum((truth == c) & labelled))
    hits += inter
  total = np.sum(labelled)
  return {"miou": 100 * np.mean(ious), "pixel_acc": 100 * hits / total,
          "mean_acc": 100 * np.mean(accs), "num_classes_scored": len(ious)}


def test_hand_computed_scores():
  # Labelled pixels (truth -> prediction): 0->0, 0->1, 1->1, 1->1, 2->0 (one ignored).
  # IoU_0 = 1 / (2 + 2 - 1) = 1/3, IoU_1 = 2 / (2 + 3 - 2) = 2/3, IoU_2 = 0 / (1 + 0 - 0);
  # class 3 appears nowhere: left out. mIoU = 1/3, pixel acc 3/5, class accs (1/2, 1, 0).
  truth = np.array([[0, 0, 1], [1, IGNORE, 2]])
  pred = np.array([[0, 1, 1], [1, 3, 0]])
  confusion = np.asarray(segmentation_metrics.confusion_matrix(pred, truth, 4))
  np.testing.assert_array_equal(confusion, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0],
                                            [0, 0, 0, 0]])
  s = segmentation_metrics.scores(confusion)
  np.testing.assert_allclose([s["miou"], s["pixel_acc"], s["mean_acc"]],
                             [100 / 3, 60.0, 50.0], rtol=1e-12)
  assert s["num_classes_scored"] == 3
  # A class predicted where it is absent from the truth counts, with IoU 0.
  pred2 = pred.copy()
  pred2[1, 2] = 3  # the class-2 pixel now predicted 3
  s2 = segmentation_metrics.scores(segmentation_metrics.confusion_matrix(pred2, truth, 4))
  # IoU_0 = 1 / (2 + 1 - 1) = 1/2, IoU_1 = 2/3, IoU_2 = 0 / 1, IoU_3 = 0 / (0 + 1 - 0).
  np.testing.assert_allclose(s2["miou"], 100 * (1 / 2 + 2 / 3 + 0 + 0) / 4)
  assert s2["num_classes_scored"] == 4


def test_scores_match_numpy_reference_over_batches():
  rng = np.random.default_rng(0)
  k = 7
  batches = []
  for _ in range(3):
    truth = rng.integers(0, k - 2, (2, 9, 11))  # classes 5, 6 never in the truth
    truth[rng.random(truth.shape) < 0.2] = IGNORE
    pred = rng.integers(0, k - 1, (2, 9, 11))  # class 6 never predicted: absent from both
    pred = np.where(rng.random(pred.shape) < 0.5, np.minimum(truth, k - 1), pred)
    batches.append((pred, truth))
  total = sum(np.asarray(segmentation_metrics.confusion_matrix(p, t, k)).astype(np.int64)
              for p, t in batches)
  all_pred = np.concatenate([p for p, _ in batches])
  all_truth = np.concatenate([t for _, t in batches])
  np.testing.assert_array_equal(total, reference_confusion(all_pred, all_truth, k))
  ours, ref = segmentation_metrics.scores(total), reference_scores(all_pred, all_truth, k)
  assert ours["num_classes_scored"] == ref["num_classes_scored"] == 6
  for name in ("miou", "pixel_acc", "mean_acc"):
    np.testing.assert_allclose(ours[name], ref[name], rtol=1e-10)
  # Averaging per-batch mIoUs would not give the split's mIoU.
  per_batch = np.mean([reference_scores(p, t, k)["miou"] for p, t in batches])
  assert abs(per_batch - ours["miou"]) > 1e-6


def test_pixel_cross_entropy_ignores_labels():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (2, 3, 4))
  labels[0, 0, :2] = IGNORE
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  keep = labels != IGNORE
  expected = -np.mean(np.take_along_axis(logp, np.where(keep, labels, 0)[..., None],
                                         -1)[..., 0][keep])
  np.testing.assert_allclose(segmentation_metrics.pixel_cross_entropy(logits, labels),
                             expected, rtol=1e-5)
  assert float(segmentation_metrics.pixel_cross_entropy(
      logits, np.full_like(labels, IGNORE))) == 0.0


# ------------------------------------------------------------------------- model

ENC = {"image_size": 16, "patch_size": 4, "width": 32, "depth": 2, "num_heads": 2,
       "mlp_ratio": 4.0}


def tiny_model(image_size=16, depth=2, **kwargs):
  kwargs = {"rescales": (4, 2, 1, 0.5), "channels": 16, "aux_channels": 8, **kwargs}
  return segmenter.build_model(variants.EncoderConfig(**dict(ENC, depth=depth)), num_classes=3,
                                        image_size=image_size, **kwargs)


@functools.lru_cache(maxsize=None)
def tiny_variables(image_size=16, depth=2):
  model = tiny_model(image_size, depth)
  encoder = vit.Encoder(**dict(ENC, depth=depth))
  pretrained = jax.jit(encoder.init)(jax.random.key(7), jnp.zeros((1, 16, 16, 3)))["params"]
  return segmenter.init_variables(model, jax.random.key(0), pretrained, 3), pretrained


def test_feature_blocks_rule():
  assert segmenter.feature_blocks(12) == (3, 5, 7, 11)  # BEiT-B's out_indices
  assert segmenter.feature_blocks(24) == (7, 11, 15, 23)  # BEiT-L's
  assert segmenter.feature_blocks(6) == (1, 2, 3, 5)
  assert segmenter.feature_blocks(2) == (0, 0, 0, 1)


@pytest.mark.parametrize("image_size,depth", [(16, 2), (32, 6)])
def test_backbone_levels_and_output_shapes(image_size, depth):
  model = tiny_model(image_size, depth)
  grid = image_size // 4
  images = jnp.zeros((2, image_size, image_size, 3))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             images)
  assert "norm" not in variables["params"]["encoder"]  # BEiT's features: no final norm
  assert f"blocks_{depth - 1}" in variables["params"]["encoder"]
  assert {"neck", "decode_head", "auxiliary_head"} <= set(variables["params"])
  encoder = vit.Encoder(image_size, 4, 32, depth, 2, final_norm=False,
                           output_blocks=segmenter.feature_blocks(depth))
  neck = upernet.MultiLevelNeck((4, 2, 1, 0.5))
  maps = jax.eval_shape(lambda x: segmenter.token_maps(
      encoder.init_with_output(jax.random.key(0), x)[0]), images)
  assert [m.shape for m in maps] == [(2, grid, grid, 32)] * 4
  levels = jax.eval_shape(
      lambda m: neck.init_with_output(jax.random.key(0), m, train=False)[0], maps)
  assert [l.shape[1:3] for l in levels] == [(4 * grid,) * 2, (2 * grid,) * 2, (grid,) * 2,
                                            (grid // 2,) * 2]
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                rngs={"dropout": jax.random.key(1)})[0],
                       variables, images)
  assert out["logits"].shape == out["aux_logits"].shape == (2, image_size, image_size, 3)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  assert set(out) == {"logits"}  # no auxiliary head at inference


def test_encoder_copies_pretrained_weights_and_matches_the_encoder():
  variables, pretrained = tiny_variables()
  flat = jax.tree_util.tree_leaves_with_path(variables["params"]["encoder"])
  assert flat and all(np.array_equal(v, _get(pretrained, p)) for p, v in flat)
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  params = {"params": variables["params"]["encoder"]}
  encoder = vit.Encoder(**ENC, final_norm=False)
  first, last = segmenter.token_maps(
      encoder.clone(output_blocks=(0, 1)).apply(params, images))
  tokens = encoder.apply(params, images)
  np.testing.assert_allclose(last, np.asarray(tokens[:, 1:]).reshape(2, 4, 4, 32),
                             rtol=1e-6, atol=1e-6)
  one_block = vit.Encoder(**{**ENC, "depth": 1}, final_norm=False).apply(
      {"params": {k: v for k, v in params["params"].items() if k != "blocks_1"}}, images)
  np.testing.assert_allclose(first, np.asarray(one_block[:, 1:]).reshape(2, 4, 4, 32),
                             rtol=1e-6, atol=1e-6)


def _get(tree, path):
  for p in path:
    tree = tree[p.key]
  return tree


def test_layer_decay_gives_the_new_head_the_full_lr():
  variables, _ = tiny_variables()
  layers = jax.tree_util.tree_map_with_path(
      lambda path, _: optim.layer_id(tuple(p.key for p in path), 2), variables["params"])
  assert layers["encoder"]["patch_embed"]["proj"]["kernel"] == 0
  assert layers["encoder"]["blocks_1"]["mlp"]["fc1"]["kernel"] == 2
  assert set(jax.tree.leaves(layers["decode_head"])) == {3}
  assert set(jax.tree.leaves(layers["neck"])) == {3}


def test_overfits_a_tiny_batch():
  model = tiny_model()
  variables, _ = tiny_variables()
  rng = np.random.default_rng(0)
  # A class per 4 x 4 patch, visible in its pixels' brightness (plus noise).
  patch_labels = rng.integers(0, 3, (8, 4, 4))
  labels = np.repeat(np.repeat(patch_labels, 4, axis=1), 4, axis=2).astype(np.int32)
  images = ((labels[..., None] - 1.0) + 0.3 * rng.normal(size=(8, 16, 16, 3))).astype(
      np.float32)
  labels[:, :2] = IGNORE
  lr = segmentation.poly_schedule(peak_lr=1e-2, warmup_steps=2, total_steps=40)
  tx = optim.create_finetune_optimizer(lr, depth=2, layer_decay_rate=0.9)
  state = train_state.ClassifierState.create(variables["params"], variables["batch_stats"],
                                             tx)
  step = jax.jit(functools.partial(segmentation.train_step, model=model, learning_rate=lr))
  history = []
  for i in range(40):
    state, metrics = step(state, {"image": images, "label": labels}, jax.random.key(i))
    history.append((float(metrics["decode_loss"]), float(metrics["pixel_acc"])))
  (loss0, acc0), (loss1, acc1) = np.mean(history[:3], 0), np.mean(history[-3:], 0)
  assert loss1 < loss0 / 10, history
  assert acc0 < 60 and acc1 > 99, history
  assert state.batch_stats and int(state.step) == 40


# ------------------------------------------------------------------------- inference


def test_slide_equals_whole_when_one_window_covers_the_image():
  model = tiny_model()
  variables, _ = tiny_variables()
  images = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype(np.float32)
  sizes = np.full((2, 2), 16, np.int32)
  predict = functools.partial(segmenter.predict_logits, model,
                              {"params": variables["params"],
                               "batch_stats": variables["batch_stats"]})
  whole = predict(images, sizes, mode="whole", stride=8)
  slide = predict(images, sizes, mode="slide", stride=8)
  np.testing.assert_allclose(slide, whole, rtol=1e-5, atol=1e-5)
  assert whole.shape == (2, 16, 16, 3)


def test_slide_averages_overlapping_windows():
  # Image 7 x 5, windows 3 x 3 at stride 2: rows start at 0, 2, 4 and columns at 0, 2.
  # The fake model answers the value of each window's top-left pixel, 10 y + x, everywhere
  # in its window, so a pixel gets the mean of the origins of the windows covering it.
  image = (10.0 * np.arange(7)[:, None] + np.arange(5)[None, :])[..., None]
  forward = lambda w: jnp.broadcast_to(w[:, :1, :1, :], w.shape)  # noqa: E731
  out = np.asarray(segmenter.slide_logits(
      forward, jnp.asarray(image, jnp.float32), jnp.array([7, 5]), crop=3, stride=2,
      num_classes=1))[..., 0]
  assert out[0, 0] == 0.0  # window (0, 0) only
  assert out[2, 2] == np.mean([0, 2, 20, 22])  # four windows overlap there
  assert out[4, 1] == np.mean([20, 40])
  assert out[6, 4] == 42.0
  expected = np.zeros((7, 5))
  for y in range(7):
    for x in range(5):
      origins = [10 * y0 + x0 for y0 in (0, 2, 4) for x0 in (0, 2)
                 if y0 <= y < y0 + 3 and x0 <= x < x0 + 3]
      expected[y, x] = np.mean(origins)
  np.testing.assert_allclose(out, expected)
  # The same image in the corner of a larger canvas: windows stay inside the image.
  canvas = np.full((10, 9, 1), 1000.0)
  canvas[:7, :5] = image
  out2 = np.asarray(segmenter.slide_logits(
      forward, jnp.asarray(canvas, jnp.float32), jnp.array([7, 5]), crop=3, stride=2,
      num_classes=1))[..., 0]
  np.testing.assert_allclose(out2[:7, :5], expected)
  assert not out2[7:].any() and not out2[:, 5:].any()


# ------------------------------------------------------------------------- data


def test_paste_by_hand():
  background = np.full((4, 5), 0.5, np.float32)
  first = np.array([[0.9, 0.1], [0.3, 0.0]], np.float32)
  second = np.array([[0.8]], np.float32)
  image, mask = segmentation_synthetic.paste(background, [(first, 2, 1, 1), (second, 7, 1, 1)],
                                             threshold=0.2)
  expected_image = np.full((4, 5), 0.5, np.float32)
  expected_image[1, 1], expected_image[2, 1], expected_image[1, 1] = 0.9, 0.3, 0.8
  expected_mask = np.zeros((4, 5), np.uint8)
  expected_mask[1, 1], expected_mask[2, 1] = 8, 3  # the later item (class 7) on top
  np.testing.assert_array_equal(image, expected_image)
  np.testing.assert_array_equal(mask, expected_mask)


def _fashion_mnist_or_skip():
  from lut_jax.data import idx  # pylint: disable=g-import-not-at-top
  pytest.importorskip("skimage")
  if idx.find_fashion_mnist(None, "test") is None:
    pytest.skip("Fashion-MNIST idx files not installed")
  return idx.load_fashion_mnist(idx.find_fashion_mnist(None, "test"), "test")


def test_synthetic_masks_match_the_pasted_items_and_are_deterministic():
  items, labels = _fashion_mnist_or_skip()
  kwargs = dict(split="test", seed=3, image_size=56, max_items=2, threshold=0.2,
                items=items, labels=labels)
  for index in range(6):
    image, mask, placements = segmentation_synthetic.make_example(index, **kwargs)
    assert 1 <= len(placements) <= 2
    expected = np.zeros_like(mask)
    for p in placements:  # later items on top
      fg = items[p.item] > 0.2 * 255
      expected[p.top:p.top + 28, p.left:p.left + 28][fg] = p.label + 1
      assert p.label == labels[p.item]
    np.testing.assert_array_equal(mask, expected)
    last = placements[-1]
    fg = items[last.item] > 0.2 * 255
    np.testing.assert_array_equal(image[last.top:last.top + 28, last.left:last.left + 28][fg],
                                  items[last.item][fg])
  a = segmentation_synthetic.make_split("test", 5, seed=3)
  b = segmentation_synthetic.make_split("test", 8, seed=3)
  c = segmentation_synthetic.make_split("test", 5, seed=4)
  np.testing.assert_array_equal(a[0], b[0][:5])
  np.testing.assert_array_equal(a[1], b[1][:5])
  assert not np.array_equal(a[0], c[0])
  assert a[1].max() <= 10 and a[0].dtype == a[1].dtype == np.uint8


def _write_folder(root, names, split="training", size=(6, 5)):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  out = {}
  for name in names:
    os.makedirs(root / "images" / split, exist_ok=True)
    os.makedirs(root / "annotations" / split, exist_ok=True)
    image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(image).save(root / "images" / split / f"{name}.png")
    Image.fromarray(labels).save(root / "annotations" / split / f"{name}.png")
    out[name] = (image, labels)
  return out


def _folder_config(root, **input_overrides):
  config = seg_config.get_config("dataset=folder")
  config.input.folder = str(root)
  config.input.eval_scale = ""
  config.input.eval_canvas_multiple = 1
  config.input.update(input_overrides)
  return config


def test_folder_reads_back_exactly_and_reports_missing_masks(tmp_path):
  pytest.importorskip("tensorflow")
  from lut_jax.data import image_utils  # pylint: disable=g-import-not-at-top
  from lut_jax.data import segmentation_data  # pylint: disable=g-import-not-at-top
  written = _write_folder(tmp_path, ["b", "a"])
  for reduce in (False, True):
    config = _folder_config(tmp_path, reduce_zero_label=reduce)
    source = segmentation_data.get_source(config.input, "training")
    batches = list(segmentation_data.create_eval_data(source, config.input, batch_size=1,
                                                      crop=4, channels=3))
    assert len(batches) == 2  # sorted by name: a, b
    for batch, name in zip(batches, ["a", "b"]):
      image, labels = written[name]
      np.testing.assert_array_equal(batch["size"][0], [5, 6])
      np.testing.assert_allclose(image_utils.denormalize(batch["image"][0], 3) * 255, image,
                                 atol=1e-3)
      expected = np.where(labels == 0, IGNORE, labels.astype(np.int32) - 1) if reduce \
          else labels
      np.testing.assert_array_equal(batch["label"][0], expected)
  # One training batch: crops of 4, labels from the file (or the padding's ignore).
  config = _folder_config(tmp_path, reduce_zero_label=False)
  train = segmentation_data.create_train_iterator(
      segmentation_data.get_source(config.input, "training"), config.input, batch_size=2,
      crop=4, channels=3, seed=0)
  batch = next(train)
  assert batch["image"].shape == (2, 4, 4, 3) and batch["label"].shape == (2, 4, 4)
  assert set(np.unique(batch["label"])) <= {0, 1, 2, 3, IGNORE}
  # Errors, one line each, before anything is read.
  os.remove(tmp_path / "annotations" / "training" / "b.png")
  with pytest.raises(errors.DataError, match=r"b\.png has no annotation") as e:
    segmentation_data.list_folder(str(tmp_path), "training")
  assert "\n" not in str(e.value)
  _write_folder(tmp_path / "sizes", ["x"])
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.zeros((2, 2), np.uint8)).save(
      tmp_path / "sizes" / "annotations" / "training" / "x.png")
  with pytest.raises(errors.DataError, match="is 6x5 but its annotation .* is 2x2"):
    segmentation_data.list_folder(str(tmp_path / "sizes"), "training")
  with pytest.raises(errors.DataNotFoundError, match="no directory"):
    segmentation_data.list_folder(str(tmp_path), "validation")


def test_presets_build_and_validate():
  for preset in seg_config.PRESETS:
    config = seg_config.get_config(f"dataset={preset}")
    if preset == "folder":
      with pytest.raises(errors.ConfigError, match="input.folder"):
        segmentation.validate(config)
      config.input.folder = "/data/somewhere"
      with pytest.raises(errors.ConfigError, match="num_classes"):
        segmentation.validate(config)
      config.num_classes = 19
    if preset == "ade20k":
      config.input.folder = "/data/ADEChallengeData2016"
      assert config.num_classes == 150 and config.input.reduce_zero_label
      assert (config.segmentation.lr, config.segmentation.layer_decay,
              config.segmentation.total_steps, config.segmentation.eval_stride,
              config.input.image_size) == (1e-4, 0.65, 160_000, 341, 512)
    segmentation.validate(config)
  config = seg_config.get_config()
  config.segmentation.rescales = "4,3"
  with pytest.raises(errors.ConfigError, match="rescale"):
    segmentation.validate(config)
  with pytest.raises(ValueError, match="accepted"):
    seg_config.get_config("datset=ade20k")


def test_poly_schedule():
  lr = segmentation.poly_schedule(peak_lr=1.0, warmup_steps=10, total_steps=110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_scene_parse150_source_reads_the_red_channel(monkeypatch):
  """tfds's builder replaced by one serving two encoded examples (no download): the class
  is the annotation's red channel, zero ignored, the rest shifted down."""
  tf = pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  from lut_jax.data import segmentation_data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
  masks = rng.integers(0, 101, (2, 5, 6, 3), dtype=np.uint8)  # R: category, G: instance

  class FakeBuilder:
    data_dir = "/nowhere"
    info = types.SimpleNamespace(version="1.0.0", splits={
        "test": types.SimpleNamespace(num_examples=2)})

    def is_prepared(self):
      return True

    def as_dataset(self, split, shuffle_files, decoders, read_config):
      del shuffle_files, read_config
      assert split == "test" and set(decoders) == {"image", "annotation"}
      return tf.data.Dataset.from_tensor_slices({
          "image": [tf.io.encode_png(x).numpy() for x in images],
          "annotation": [tf.io.encode_png(x).numpy() for x in masks],
          "tfds_id": [b"scene_parse150-test.tfrecord@0", b"scene_parse150-test.tfrecord@1"]})

  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: FakeBuilder())
  monkeypatch.setattr(tfds, "split_for_jax_process",
                      lambda split, process_index, process_count: split)
  config = seg_config.get_config("dataset=scene_parse150")
  config.input.eval_scale = ""
  source = segmentation_data.get_source(config.input, "test")
  assert source.num_classes == 100
  batches = list(segmentation_data.create_eval_data(source, config.input, batch_size=1,
                                                    crop=4, channels=3))
  assert len(batches) == 2
  for batch, mask in zip(batches, masks):
    red = mask[..., 0].astype(np.int32)
    label = batch["label"][0, :5, :6]
    np.testing.assert_array_equal(label, np.where(red == 0, IGNORE, red - 1))


# ------------------------------------------------------------------------- end to end


def test_eval_main_segmentation_writes_results_and_resumes(tmp_path):
  pytest.importorskip("tensorflow")
  _fashion_mnist_or_skip()
  from lut_jax.cli import evaluate as evaluate_cli  # pylint: disable=g-import-not-at-top
  from tests import test_export  # pylint: disable=g-import-not-at-top
  pretrain = str(tmp_path / "pretrain")
  test_export.make_pretraining_workdir(pretrain)  # mu/4 at 16 px
  config = seg_config.get_config()
  config.pretrained = pretrain
  config.input.image_size = 32
  config.synthetic.image_size = 32
  config.synthetic.train_examples, config.synthetic.eval_examples = 24, 10
  config.input.eval_batch_size = 8  # 10 = one full and one padded batch
  seg = config.segmentation
  seg.batch_size, seg.total_steps, seg.warmup_steps, seg.eval_every_steps = 8, 4, 1, 2
  seg.channels, seg.aux_channels = 8, 8
  workdir = str(tmp_path / "seg")
  results = evaluate_cli.evaluate(config, workdir)
  assert results["steps"] == 4 and 0 <= results["miou"] <= 100
  assert 0 <= results["pixel_acc"] <= 100 and results["best_step"] in (2, 4)
  saved = json.load(open(os.path.join(workdir, "segmentation_results.json")))
  assert saved.pop("source")["pretrained"] == os.path.abspath(pretrain)
  assert saved == results
  # A rerun restores the finished state and reports the same scores.
  again = evaluate_cli.evaluate(config, workdir)
  assert again == results
  # Another pre-trained encoder never resumes this state.
  other = str(tmp_path / "pretrain_mae")
  test_export.make_pretraining_workdir(other, method="mae")
  config.pretrained = other
  with pytest.raises(errors.WorkdirError, match="--workdir"):
    evaluate_cli.evaluate(config, workdir)


def test_core_modules_import_without_tensorflow():
  script = textwrap.dedent("""
      import sys
      for name in ("tensorflow", "tensorflow_datasets"):
        sys.modules[name] = None
      from lut_jax.evaluation import segmentation, segmentation_metrics  # noqa: F401
      from lut_jax.models import segmenter, upernet  # noqa: F401
      from lut_jax.data import segmentation_synthetic  # noqa: F401
      bad = [m for m, mod in sys.modules.items()
             if mod is not None and m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
      assert not bad, bad
      print("OK")
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
