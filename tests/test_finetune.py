"""Fine-tuning: model, layer-wise lr decay, weight-decay mask, mixup/cutmix, the loop."""

import dataclasses
import functools
import json
import os
import signal
import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import finetune as finetune_config
from lut_jax import errors
from lut_jax.evaluation import finetune
from lut_jax.models import classifier, vit
from lut_jax.runtime import checkpointing, optim
from lut_jax.weights import loading

DEPTH, WIDTH, IMAGE, PATCH = 2, 32, 16, 4


def tiny_model(**overrides) -> classifier.FinetuneViT:
  kwargs = dict(num_classes=5, image_size=IMAGE, patch_size=PATCH, width=WIDTH, depth=DEPTH,
                num_heads=2, drop_path_rate=0.1)
  kwargs.update(overrides)
  return classifier.FinetuneViT(**kwargs)


@functools.lru_cache(maxsize=None)
def tiny_params():
  images = jnp.zeros((1, IMAGE, IMAGE, 3))
  return jax.jit(lambda k: tiny_model().init(k, images, train=False))(
      jax.random.key(0))["params"]


def test_head_layout_and_final_norm():
  encoder = vit.Encoder(IMAGE, PATCH, WIDTH, DEPTH, 2)
  images = np.random.default_rng(0).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
  params = jax.jit(encoder.init)(jax.random.key(1), images)["params"]
  # Without the final norm, the tokens are the pre-norm tokens of the same encoder.
  no_norm = vit.Encoder(IMAGE, PATCH, WIDTH, DEPTH, 2, final_norm=False)
  raw = no_norm.apply({"params": {k: v for k, v in params.items() if k != "norm"}}, images)
  normed = encoder.apply({"params": params}, images)
  ln = flax.linen.LayerNorm(epsilon=1e-6).apply({"params": params["norm"]}, raw)
  np.testing.assert_allclose(ln, normed, rtol=1e-6, atol=1e-6)
  # Global pool (MAE): no final norm in the encoder; fc_norm + head after the pooling.
  params = tiny_params()
  assert "norm" not in params["encoder"] and set(params) == {"encoder", "fc_norm", "head"}
  cls_params = jax.eval_shape(
      functools.partial(tiny_model(pool="cls").init, train=False), jax.random.key(0), images[:1])
  assert "norm" in cls_params["params"]["encoder"]


def test_init_params_copies_the_pretrained_encoder_and_drops_its_norm():
  encoder = vit.Encoder(IMAGE, PATCH, WIDTH, DEPTH, 2)
  pretrained = jax.jit(encoder.init)(jax.random.key(7), jnp.zeros((1, IMAGE, IMAGE, 3)))
  pretrained = pretrained["params"]
  params = classifier.init_params(tiny_model(), jax.random.key(0), pretrained, channels=3)
  flat, src = (traverse_util.flatten_dict(params["encoder"]),
               traverse_util.flatten_dict(pretrained))
  assert set(src) - set(flat) == {("norm", "scale"), ("norm", "bias")}
  assert set(flat) - set(src) == {("pos_embed",)}  # the reference trains the position table
  for k, v in flat.items():
    np.testing.assert_array_equal(
        v, vit.sincos_pos_embed_2d(WIDTH, IMAGE // PATCH)[None] if k == ("pos_embed",)
        else src[k])
  with pytest.raises(ValueError, match="does not fit"):
    classifier.init_params(tiny_model(width=64, num_heads=2), jax.random.key(0), pretrained, 3)


def test_the_position_table_starts_fixed_and_is_trained():
  """As the reference's timm ViT: ``pos_embed`` starts at the sin-cos table pre-training
  used (so the first forward equals the fixed-table model's) and then gets gradients."""
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, IMAGE, IMAGE, 3)), jnp.float32)
  learned, fixed = tiny_model(drop_path_rate=0.0), tiny_model(drop_path_rate=0.0,
                                                               learned_pos_embed=False)
  params = tiny_params()
  without = {**params, "encoder": {k: v for k, v in params["encoder"].items()
                                   if k != "pos_embed"}}
  np.testing.assert_array_equal(learned.apply({"params": params}, images, train=False),
                                fixed.apply({"params": without}, images, train=False))
  grads = jax.grad(lambda p: learned.apply({"params": p}, images, train=False).sum())(params)
  assert np.abs(grads["encoder"]["pos_embed"]).max() > 0
  assert "pos_embed" not in jax.eval_shape(
      functools.partial(fixed.init, train=False), jax.random.key(0), images)["params"]["encoder"]


def _mae_get_layer_id_for_vit(name: str, num_layers: int) -> int:
  """Verbatim logic of MAE's util/lr_decay.py, on timm/PyTorch parameter names."""
  if name in ["cls_token", "pos_embed"]:
    return 0
  elif name.startswith("patch_embed"):
    return 0
  elif name.startswith("blocks"):
    return int(name.split(".")[1]) + 1
  else:
    return num_layers


def _torch_name(path: tuple[str, ...]) -> str:
  """Our path -> the name the PyTorch model (MAE's VisionTransformer) gives the tensor."""
  parts = [p for p in path if p != "encoder"]
  name = ".".join(parts)
  name = re.sub(r"blocks_(\d+)", r"blocks.\1", name)
  return re.sub(r"\.(kernel|scale)$", ".weight", name)


def test_layer_decay_scales_every_parameter_as_mae():
  params = tiny_params()
  decay, num_layers = 0.75, DEPTH + 1
  # Adam's first step with lr 1 and no decay is -g / (|g| + eps) = -1 for g = 1: the update
  # is minus the per-parameter lr scale.
  tx = optim.create_finetune_optimizer(1.0, depth=DEPTH, layer_decay_rate=decay,
                                       weight_decay=0.0)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  flat = traverse_util.flatten_dict(updates)
  seen_layers = set()
  for path, update in flat.items():
    layer = _mae_get_layer_id_for_vit(_torch_name(path), num_layers)
    seen_layers.add(layer)
    expected = decay ** (num_layers - layer)
    # (rtol: Adam's bias correction 1 - 0.999 is inexact in float32)
    np.testing.assert_allclose(np.asarray(update), -expected, rtol=2e-5, err_msg=str(path))
  assert seen_layers == set(range(DEPTH + 2))
  # Spot checks, by hand: patch embedding 0.75^3, block 1 0.75, head 1.
  assert np.isclose(flat[("encoder", "patch_embed", "proj", "kernel")].max(), -0.421875)
  assert np.isclose(flat[("encoder", "blocks_1", "mlp", "fc1", "kernel")].max(), -0.75)
  assert np.isclose(flat[("head", "kernel")].max(), -1.0)


def test_weight_decay_mask_matches_mae_no_weight_decay():
  params = tiny_params()
  mask = traverse_util.flatten_dict(
      optim.weight_decay_mask(params, skip=optim.FINETUNE_NO_DECAY))
  for path, decayed in mask.items():
    name = _torch_name(path)
    leaf = traverse_util.flatten_dict(params)[path]
    # MAE: no decay for 1-D tensors (biases, norms) and for no_weight_decay() = cls_token.
    assert decayed == (leaf.ndim > 1 and name not in ("cls_token", "pos_embed")), name
  # Decoupled decay is scaled by the layer's lr scale too (zero gradients: decay alone).
  tx = optim.create_finetune_optimizer(1.0, depth=DEPTH, layer_decay_rate=0.5,
                                       weight_decay=0.1)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  qkv = ("encoder", "blocks_0", "attn", "qkv", "kernel")
  np.testing.assert_allclose(traverse_util.flatten_dict(updates)[qkv],
                             -0.1 * 0.25 * traverse_util.flatten_dict(params)[qkv], rtol=1e-6)
  assert not np.any(updates["encoder"]["cls_token"])


def _labelled_images(batch: int = 8, size: int = 12):
  # Example i is the constant image i + 1, so every pixel says where it came from.
  images = jnp.broadcast_to(jnp.arange(1.0, batch + 1)[:, None, None, None],
                            (batch, size, size, 3))
  return images, jnp.arange(batch) % 5


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_area_matches_lambda_and_targets_sum_to_one(seed):
  images, labels = _labelled_images()
  spec = finetune.MixupSpec(num_classes=5, mixup_alpha=0.0, cutmix_alpha=1.0,
                            label_smoothing=0.1)
  mix = jax.jit(functools.partial(finetune.mix_batch, spec=spec))
  mixed, targets, info = mix(jax.random.key(seed), images, labels)
  assert float(info["cutmix"]) == 1.0
  lam = float(info["lam"])
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  for i in range(images.shape[0]):
    partner = images.shape[0] - 1 - i
    from_partner = np.mean(np.asarray(mixed[i]) == partner + 1)
    from_self = np.mean(np.asarray(mixed[i]) == i + 1)
    np.testing.assert_allclose(from_partner, 1.0 - lam, atol=1e-6)
    np.testing.assert_allclose(from_self, lam, atol=1e-6)
  # Targets: lam on the own label, 1 - lam on the partner's, smoothed (0.1 / 5 = 0.02 off).
  y = np.full((8, 5), 0.02)
  y[np.arange(8), np.asarray(labels)] += 0.9
  np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_mixup_blends_images_and_targets(seed):
  images, labels = _labelled_images()
  spec = finetune.MixupSpec(num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0,
                            label_smoothing=0.0)
  mix = jax.jit(functools.partial(finetune.mix_batch, spec=spec))
  mixed, targets, info = mix(jax.random.key(seed), images, labels)
  lam = float(info["lam"])
  assert float(info["cutmix"]) == 0.0 and 0.0 <= lam <= 1.0
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_both_modes_switch_and_always_sum_to_one():
  images, labels = _labelled_images()
  spec = finetune.MixupSpec(num_classes=5)  # mixup 0.8, cutmix 1.0, switch 0.5, ls 0.1
  fn = jax.jit(functools.partial(finetune.mix_batch, spec=spec))
  modes = []
  for seed in range(16):
    _, targets, info = fn(jax.random.key(seed), images, labels)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    modes.append(float(info["cutmix"]))
  assert 0 < sum(modes) < len(modes)  # both happen


def test_label_smoothing_is_timms():
  # timm's Mixup targets: off = s / C, on = 1 - s + s / C (they sum to one).
  s, num_classes = 0.1, 5
  labels = jnp.array([0, 3, 4])
  spec = finetune.MixupSpec(num_classes=num_classes, prob=0.0, label_smoothing=s)
  _, targets, info = finetune.mix_batch(jax.random.key(0), jnp.zeros((3, 4, 4, 3)), labels,
                                        spec)  # no mixing: the smoothed labels alone
  expected = np.full((3, num_classes), s / num_classes, np.float32)
  expected[np.arange(3), np.asarray(labels)] = 1.0 - s + s / num_classes
  assert float(info["lam"]) == 1.0
  np.testing.assert_allclose(targets, expected, rtol=1e-6)


def _tiny_finetuning():
  """``(config, pretrained, train_data_fn, eval_batches)`` of a 6-step run (2 steps per
  epoch with ``num_train_examples=32``) on three classes told apart by the image's mean
  brightness: learnable in a few steps."""
  encoder_config = {"image_size": IMAGE, "patch_size": PATCH, "width": WIDTH, "depth": DEPTH,
                    "num_heads": 2, "mlp_ratio": 4.0}
  encoder = vit.Encoder(**encoder_config)
  params = jax.jit(encoder.init)(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))["params"]
  pretrained = loading.Pretrained(encoder=encoder, params=params, channels=3, source="test")
  config = finetune_config.get_config()
  config.unlock()
  config.num_classes = 3
  config.log_every_steps = 2
  config.finetune.batch_size = 16
  config.finetune.epochs = 3
  config.finetune.warmup_epochs = 1

  def batch(n, seed):
    r = np.random.default_rng(seed)
    labels = r.integers(0, 3, n).astype(np.int32)
    images = (labels[:, None, None, None] - 1.0) + 0.1 * r.normal(size=(n, IMAGE, IMAGE, 3))
    return {"image": images.astype(np.float32), "label": labels}

  def train_data_fn(start_step):
    step = start_step
    while True:
      yield batch(16, 100 + step)
      step += 1

  return config, pretrained, train_data_fn, [dict(batch(16, 1), mask=np.ones(16, bool))]


def test_finetune_loop_runs_keeps_best_and_latest_and_resumes(tmp_path):
  config, pretrained, train_data_fn, eval_batches = _tiny_finetuning()
  params = pretrained.params
  workdir = str(tmp_path / "ft")
  run = functools.partial(finetune.run, config, workdir, pretrained=pretrained,
                          train_data_fn=train_data_fn, eval_data=eval_batches,
                          num_train_examples=32)  # 2 steps per epoch, 6 steps
  results = run()
  assert results["steps"] == 6 and 0 <= results["top1"] <= 100
  assert results["best_top1"] >= results["top1"]
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                 if s.isdigit())
  assert 6 in steps and results["best_step"] in steps and len(steps) <= 2
  saved = json.load(open(os.path.join(workdir, "finetune_results.json")))
  assert saved["top1"] == results["top1"]
  # Rerunning after the end restores the last state and reports the same numbers.
  again = run()
  assert again["top1"] == results["top1"] and again["best_step"] == results["best_step"]
  assert saved["source"]["params_sha256"] == pretrained.fingerprint
  # Another encoder never resumes this state, which stays.
  other = dataclasses.replace(pretrained, params=jax.tree.map(lambda x: x + 1.0, params))
  with pytest.raises(errors.WorkdirError, match="--workdir"):
    finetune.run(config, workdir, pretrained=other, train_data_fn=train_data_fn,
                      eval_data=eval_batches, num_train_examples=32)
  assert 6 in [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]

  # Preemption: SIGTERM while step 2 is fed -> evaluate, save step 2, stop; a rerun
  # finishes the remaining steps.
  def preempted_data_fn(start_step):
    for step, b in enumerate(train_data_fn(start_step), start=start_step):
      if step == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      yield b
  workdir2 = str(tmp_path / "ft_preempted")
  stopped = finetune.run(config, workdir2, pretrained=pretrained,
                              train_data_fn=preempted_data_fn, eval_data=eval_batches,
                              num_train_examples=32)
  assert stopped["steps"] == 2
  assert "2" in os.listdir(os.path.join(workdir2, "checkpoints"))
  finished = finetune.run(config, workdir2, pretrained=pretrained,
                               train_data_fn=train_data_fn, eval_data=eval_batches,
                               num_train_examples=32)
  assert finished["steps"] == 6


def test_multi_host_preemption_notice_saves_and_stops(tmp_path, monkeypatch):
  # Orbax answers reached_preemption identically on every host once any got a notice.
  monkeypatch.setattr(checkpointing.Checkpointer, "reached_preemption",
                      lambda self, step: step >= 3)
  config, pretrained, train_data_fn, eval_batches = _tiny_finetuning()
  workdir = str(tmp_path / "ft")
  stopped = finetune.run(config, workdir, pretrained=pretrained,
                              train_data_fn=train_data_fn, eval_data=eval_batches,
                              num_train_examples=32)
  assert stopped["steps"] == 3
  assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))


def test_non_finite_finetuning_stops_before_saving(tmp_path):
  config, pretrained, train_data_fn, eval_batches = _tiny_finetuning()

  def poisoned_data_fn(start_step):
    for step, b in enumerate(train_data_fn(start_step), start=start_step):
      if step == 2:  # the 3rd step sees a corrupted batch
        b = dict(b, image=np.full_like(b["image"], np.nan))
      yield b
  workdir = tmp_path / "ft"
  with pytest.raises(errors.NonFiniteError,
                     match="at step 3 .*between steps 3 and 4.*Last good checkpoint: step 2"):
    finetune.run(config, str(workdir), pretrained=pretrained,
                      train_data_fn=poisoned_data_fn, eval_data=eval_batches,
                      num_train_examples=32)
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  assert ckpt.all_steps() == [2]  # the poisoned state (step 4's save) never written
  restored = ckpt.manager.restore(2)
  ckpt.close()
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored))


def test_train_view_ops_are_deterministic_and_shaped():
  tf = pytest.importorskip("tensorflow")
  from lut_jax.data import augment_ft  # pylint: disable=g-import-not-at-top
  image = tf.random.stateless_uniform([20, 24, 3], [1, 2])
  for op in range(len(augment_ft.RANDAUG_OPS)):
    for sign in (-1.0, 1.0):
      out = augment_ft.apply_randaug_op(image, tf.constant(op), tf.constant(9.0),
                                        tf.constant(sign))
      assert out.shape == image.shape and np.all(np.isfinite(out.numpy())), op
      assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0
  aug = ml_collections.ConfigDict(dict(crop_scale_min=0.08, hflip=0.5, randaug_num_ops=2,
                                       randaug_magnitude=9.0, randaug_magnitude_std=0.5,
                                       randaug_prob=0.5, reprob=1.0))
  seed = tf.constant([3, 4], tf.int64)
  a = augment_ft.train_view(image, seed, 16, aug).numpy()
  b = augment_ft.train_view(image, seed, 16, aug).numpy()
  assert a.shape == (16, 16, 3) and np.array_equal(a, b)
  # PIL's equalize: a two-level image goes to the extremes (lut 0 and (1 + 800) // 3,
  # clipped to 255); with fewer than 255 pixels below the top level it is unchanged.
  two = tf.concat([tf.fill([20, 40, 1], 0.25), tf.fill([20, 40, 1], 0.5)], axis=0)
  eq = augment_ft.equalize(tf.tile(two, [1, 1, 3])).numpy()
  assert set(np.unique(np.round(eq * 255))) == {0.0, 255.0}
  small = tf.tile(two[18:22], [1, 1, 3])
  np.testing.assert_allclose(augment_ft.equalize(small).numpy() * 255,
                             np.round(small.numpy() * 255))
