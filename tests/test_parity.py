"""Numerical parity of lut_jax against PyTorch: timm's ViT and an independent reference.

Weights are random (biases, norms, tokens and BatchNorm statistics included), converted
with lut_jax.weights.convert, and both sides get the same images and masking noise. float32 with
`highest` matmul precision (tests/conftest.py); every output, and the gradient of the
loss with respect to every parameter, must agree to a relative error below 1e-5. Two whole
train steps (AdamW, learning-rate and momentum schedules, EMA of the target) are checked
against the reference's iteration to float32 resolution of the updated parameters.
"""

import copy
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from lut_jax.models import vit  # noqa: E402
from lut_jax.pretrain import build, losses, masking, train_state
from lut_jax.runtime import sharding
from lut_jax.weights import convert
from tests import util  # noqa: E402
from tests import torch_reference as ref  # noqa: E402

IMAGE, BATCH, MASK_RATIO = util.IMAGE_SIZE, 8, 0.75
W_MAE, W_BC = 1.0, 0.25
RTOL = 1e-5


def rel_err(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|."""
  ours = np.asarray(ours, np.float64)
  theirs = np.asarray(theirs.detach().numpy() if hasattr(theirs, "detach") else theirs,
                      np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def assert_close(ours, theirs, what: str):
  err = rel_err(ours, theirs)
  assert err < RTOL, f"{what}: relative error {err:.2e}"


def reference_for(model: vit.LUTModel) -> ref.TorchLUT:
  return ref.TorchLUT(IMAGE, model.patch_size, model.channels, model.width, model.depth,
                      model.num_heads, model.decoder_width, model.decoder_depth,
                      model.decoder_num_heads, use_bc=model.use_bc, head_depth=model.head_depth,
                      pred_depth=model.pred_depth, head_hidden_dim=model.head_hidden_dim,
                      head_norm=model.head_norm, head_activation=model.head_activation)


def nhwc(images: "torch.Tensor") -> jax.Array:
  return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


@pytest.fixture(name="data")
def fixture_data():
  gen = torch.Generator().manual_seed(1)
  view1 = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)
  view2 = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)
  num_patches = (IMAGE // 4) ** 2
  noise = torch.rand(BATCH, num_patches, generator=gen)
  return view1, view2, noise


def timm_vit(width, depth, heads, patch):
  return VisionTransformer(img_size=IMAGE, patch_size=patch, embed_dim=width, depth=depth,
                           num_heads=heads, qkv_bias=True, class_token=True, global_pool="",
                           num_classes=0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


def test_encoder_matches_timm(data):
  view1, _, _ = data
  model = util.tiny_model()
  timm_model = timm_vit(model.width, model.depth, model.num_heads, model.patch_size).eval()
  ref.randomize_(timm_model, torch.Generator().manual_seed(2))
  with torch.no_grad():  # timm learns pos_embed; ours is the fixed table
    timm_model.pos_embed.copy_(torch.from_numpy(ref.sincos_table(model.width, IMAGE // 4))[None])
    expected = timm_model.forward_features(view1)
  encoder_params = convert.encoder_params_from_timm_state_dict(timm_model.state_dict(), model)
  encoder = vit.Encoder(IMAGE, model.patch_size, model.width, model.depth, model.num_heads)
  ours = encoder.apply({"params": encoder_params}, nhwc(view1))
  assert_close(ours, expected, "encoder tokens vs timm")


def test_exported_encoder_runs_in_timm(data):
  view1, _, _ = data
  model = util.tiny_model()
  encoder = vit.Encoder(IMAGE, model.patch_size, model.width, model.depth, model.num_heads)
  # Random values everywhere (Xavier init would leave biases at 0 and norms at 1).
  shapes = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), nhwc(view1))["params"]
  rng = np.random.default_rng(3)
  params = jax.tree.map(
      lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0])).astype(np.float32), shapes)
  timm_model = timm_vit(model.width, model.depth, model.num_heads, model.patch_size).eval()
  timm_sd = convert.encoder_to_timm_state_dict(params, image_size=IMAGE)
  timm_model.load_state_dict(convert.torch_tensors(timm_sd), strict=True)
  with torch.no_grad():
    expected = timm_model.forward_features(view1)
  assert_close(encoder.apply({"params": params}, nhwc(view1)), expected, "exported encoder")


def test_lut_forward_matches_reference(data):
  view1, view2, noise = data
  model = util.tiny_model()
  student = reference_for(model).train()
  ref.randomize_(student, torch.Generator().manual_seed(5))
  teacher = copy.deepcopy(student)
  ref.randomize_(teacher, torch.Generator().manual_seed(6))  # an EMA copy that has drifted
  teacher.eval()
  params, stats = convert.params_from_torch_state_dict(student.state_dict(), model)
  t_params, t_stats = convert.params_from_torch_state_dict(teacher.state_dict(), model)

  # Reference side: masking from the same noise; student BN in train mode (updates stats).
  keep1, keep2, ids_restore, mask1, _ = ref.masks_from_noise(noise, MASK_RATIO)
  with torch.no_grad():
    out = student.forward_student(view1, view2, keep1, keep2, ids_restore)
  z1, z2 = teacher.forward_teacher(view1, view2)
  rec = ref.reconstruction_loss(out["pred"], view1, mask1, model.patch_size)
  bc = ref.bc_loss(out["q1"], out["q2"], z1, z2)
  total = W_MAE * rec + W_BC * bc

  # Our side.
  masks = masking.masks_from_noise(jnp.asarray(noise.numpy()), MASK_RATIO)
  np.testing.assert_array_equal(np.asarray(masks.keep1), keep1.numpy())
  np.testing.assert_array_equal(np.asarray(masks.mask1), mask1.numpy())
  v1, v2 = nhwc(view1), nhwc(view2)
  ours, updated = model.apply({"params": params, "batch_stats": stats}, v1, v2, masks.keep1,
                              masks.keep2, masks.ids_restore, method="student",
                              mutable=["batch_stats"])
  oz1, oz2 = model.apply({"params": t_params, "batch_stats": t_stats}, v1, v2,
                         method="teacher")
  o_rec = losses.reconstruction_loss(ours["pred"], v1, masks.mask1,
                                     patch_size=model.patch_size)
  o_bc = losses.bc_loss(ours["q1"], ours["q2"], oz1, oz2)
  o_total = losses.total_loss(o_rec, o_bc, w_mae=W_MAE, w_bc=W_BC)

  assert_close(ours["pred"], out["pred"], "reconstruction pred")
  assert_close(ours["q1"], out["q1"], "student q1")
  assert_close(ours["q2"], out["q2"], "student q2")
  assert_close(oz1, z1, "teacher z1")
  assert_close(oz2, z2, "teacher z2")
  assert_close(o_rec, rec, "reconstruction loss")
  assert_close(o_bc, bc, "BC loss")
  assert_close(o_total, total, "total loss")
  # Running statistics after two train-mode passes (view 1 then view 2) per BatchNorm.
  _, new_stats = convert.params_from_torch_state_dict(student.state_dict(), model)
  for head in ("head", "predictor"):
    for stat in ("mean", "var"):
      assert_close(updated["batch_stats"][head]["norm_0"][stat],
                   new_stats[head]["norm_0"][stat], f"{head} running {stat}")
    assert not np.allclose(new_stats[head]["norm_0"]["mean"], stats[head]["norm_0"]["mean"])
  assert int(student.head[1].num_batches_tracked) == 7 + 2


def test_mae_forward_matches_reference(data):
  view1, _, noise = data
  model = util.tiny_model(use_bc=False)
  mae = reference_for(model).train()
  ref.randomize_(mae, torch.Generator().manual_seed(7))
  assert not any(k.startswith(("head", "predictor")) for k in mae.state_dict())
  params, stats = convert.params_from_torch_state_dict(mae.state_dict(), model)
  assert stats == {}
  keep1, _, ids_restore, mask1, _ = ref.masks_from_noise(noise, MASK_RATIO)
  with torch.no_grad():
    pred = mae.forward_mae(view1, keep1, ids_restore)
  rec = ref.reconstruction_loss(pred, view1, mask1, model.patch_size)
  masks = masking.masks_from_noise(jnp.asarray(noise.numpy()), MASK_RATIO)
  ours = model.apply({"params": params}, nhwc(view1), masks.keep1, masks.ids_restore,
                     method="mae")
  o_rec = losses.reconstruction_loss(ours, nhwc(view1), masks.mask1, patch_size=model.patch_size)
  assert_close(ours, pred, "MAE pred")
  assert_close(o_rec, rec, "MAE reconstruction loss")
  # Without norm-pix too (the MAE default).
  assert_close(losses.reconstruction_loss(ours, nhwc(view1), masks.mask1,
                                          patch_size=model.patch_size, norm_pix=False),
               ref.reconstruction_loss(pred, view1, mask1, model.patch_size, norm_pix=False),
               "MAE loss without norm-pix")


@pytest.mark.parametrize("group_size", [4, 0, 12, 32])
def test_grouped_batch_norm_is_torch_batch_norm_per_micro_batch(group_size):
  """``BatchNorm(group_size=g)`` on a batch of 12 equals torch's BatchNorm1d in train mode
  fed the batch as consecutive micro-batches of g (outputs, running mean and variance);
  0, or a group at least the batch, is one batch."""
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(12, 5)) * 3 + 1).astype(np.float32)
  scale, bias = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
  torch_bn = torch.nn.BatchNorm1d(5, eps=1e-5, momentum=0.1).train()
  with torch.no_grad():
    torch_bn.weight.copy_(torch.from_numpy(scale))
    torch_bn.bias.copy_(torch.from_numpy(bias))
  micro = group_size if 0 < group_size < len(x) else len(x)
  with torch.no_grad():
    expected = torch.cat([torch_bn(torch.from_numpy(x[i:i + micro]))
                          for i in range(0, len(x), micro)])
  bn = vit.BatchNorm(group_size=group_size)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": variables["batch_stats"]}
  y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert_close(y, expected, "outputs")
  assert_close(updates["batch_stats"]["mean"], torch_bn.running_mean, "running mean")
  assert_close(updates["batch_stats"]["var"], torch_bn.running_var, "running variance")
  with pytest.raises(ValueError, match="does not divide"):
    vit.BatchNorm(group_size=5).init(jax.random.key(0), x, use_running_average=False)


def grads_as_ours(module: "torch.nn.Module", model: vit.LUTModel) -> dict:
  """The ``.grad`` of every parameter of ``module``, converted to our parameter tree (the
  same converter as the weights: layouts transposed, names mapped)."""
  state = module.state_dict()
  named = dict(module.named_parameters())
  as_state = {k: (named[k].grad if k in named else v) for k, v in state.items()}
  assert all(as_state[k] is not None for k in named), "a parameter got no gradient"
  grads, _ = convert.params_from_torch_state_dict(as_state, model, check_pos_embed=False)
  return grads


def assert_grads_close(ours, theirs, what: str):
  """Leaf by leaf: every parameter's gradient agrees to RTOL of its own scale."""
  flat_ours = dict(jax.tree_util.tree_flatten_with_path(ours)[0])
  flat_theirs = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
  assert flat_ours.keys() == flat_theirs.keys()
  worst = max((rel_err(flat_ours[k], flat_theirs[k]), jax.tree_util.keystr(k))
              for k in flat_ours)
  assert worst[0] < RTOL, f"{what}: gradient of {worst[1]}: relative error {worst[0]:.2e}"


def test_lut_gradients_match_reference(data):
  """d(total loss)/d(every student parameter) equals PyTorch autograd on the reference:
  the reconstruction and BC losses, through the visible tokens, both views' heads and
  train-mode batch norm; the teacher gets no gradient."""
  view1, view2, noise = data
  model = util.tiny_model()
  student = reference_for(model).train()
  ref.randomize_(student, torch.Generator().manual_seed(8))
  teacher = copy.deepcopy(student)
  ref.randomize_(teacher, torch.Generator().manual_seed(9))
  teacher.eval()
  params, stats = convert.params_from_torch_state_dict(student.state_dict(), model)
  t_params, t_stats = convert.params_from_torch_state_dict(teacher.state_dict(), model)
  keep1, keep2, ids_restore, mask1, _ = ref.masks_from_noise(noise, MASK_RATIO)
  with torch.no_grad():
    z1, z2 = teacher.forward_teacher(view1, view2)
  out = student.forward_student(view1, view2, keep1, keep2, ids_restore)
  total = (W_MAE * ref.reconstruction_loss(out["pred"], view1, mask1, model.patch_size)
           + W_BC * ref.bc_loss(out["q1"], out["q2"], z1, z2))
  total.backward()

  masks = masking.masks_from_noise(jnp.asarray(noise.numpy()), MASK_RATIO)
  v1, v2 = nhwc(view1), nhwc(view2)
  oz1, oz2 = model.apply({"params": t_params, "batch_stats": t_stats}, v1, v2,
                         method="teacher")

  def loss_fn(p):
    o, _ = model.apply({"params": p, "batch_stats": stats}, v1, v2, masks.keep1, masks.keep2,
                       masks.ids_restore, method="student", mutable=["batch_stats"])
    rec = losses.reconstruction_loss(o["pred"], v1, masks.mask1, patch_size=model.patch_size)
    return losses.total_loss(rec, losses.bc_loss(o["q1"], o["q2"], oz1, oz2),
                             w_mae=W_MAE, w_bc=W_BC)

  o_total, grads = jax.value_and_grad(loss_fn)(params)
  assert_close(o_total, total, "total loss")
  assert_grads_close(grads, grads_as_ours(student, model), "LUT")


def test_mae_gradients_match_reference(data):
  view1, _, noise = data
  model = util.tiny_model(use_bc=False)
  mae = reference_for(model).train()
  ref.randomize_(mae, torch.Generator().manual_seed(10))
  params, _ = convert.params_from_torch_state_dict(mae.state_dict(), model)
  keep1, _, ids_restore, mask1, _ = ref.masks_from_noise(noise, MASK_RATIO)
  ref.reconstruction_loss(mae.forward_mae(view1, keep1, ids_restore), view1, mask1,
                          model.patch_size).backward()
  masks = masking.masks_from_noise(jnp.asarray(noise.numpy()), MASK_RATIO)
  v1 = nhwc(view1)
  grads = jax.grad(lambda p: losses.reconstruction_loss(
      model.apply({"params": p}, v1, masks.keep1, masks.ids_restore, method="mae"), v1,
      masks.mask1, patch_size=model.patch_size))(params)
  assert_grads_close(grads, grads_as_ours(mae, model), "MAE")


def assert_updates_close(ours, theirs, old, what: str, *, steps: int = 1):
  """Parameters after ``steps`` updates, leaf by leaf: equal to within 2 float32 spacings
  of the parameter per update (the precision each update is stored at, rounded on both
  sides; an update of ~1e-4 is resolved to ~1e-3 of itself) plus 1e-4 of the change (from
  the second update on, Adam's ratio of moments carries the gradients' own float32
  differences, measured up to ~1.5e-5); and the change is not zero."""
  for (path, o), t, p in zip(jax.tree_util.tree_flatten_with_path(ours)[0],
                             jax.tree.leaves(theirs), jax.tree.leaves(old)):
    o, t, p = (np.asarray(a, np.float32) for a in (o, t, p))
    allowed = (2 * steps * np.spacing(np.maximum(np.abs(t), np.abs(p)))
               + 1e-4 * np.abs(t - p))
    worst = float(np.max(np.abs(o - t) / allowed))
    assert worst <= 1, f"{what}: {jax.tree_util.keystr(path)} off by {worst:.1f}x the tolerance"
  moved = [np.mean(np.asarray(t) != np.asarray(p))
           for t, p in zip(jax.tree.leaves(theirs), jax.tree.leaves(old))]
  assert np.mean(moved) > 0.5, f"{what}: the reference update left most parameters unchanged"


@pytest.mark.parametrize("method", ["lut", "mae"])
def test_train_steps_match_reference_engine(method):
  """Two jitted steps against the reference's training iteration written out in PyTorch:
  the losses' gradient; AdamW with weight decay on rank >= 2 parameters only (the second
  step exercises both moments' decay rates); the learning rate of each step (warmup-free
  cosine: peak, then peak * (1 + cos(pi / K)) / 2); then the EMA of the teacher's weights
  and batch-norm buffers with each step's momentum (1 - (1 - tau0) * (cos(pi k / K) + 1) /
  2). Compared after both steps: every parameter, the running statistics, the target."""
  config = util.tiny_config(method)
  total, batch_size = 10, 16
  training = build.build_training(config, sharding.create_mesh(1, jax.devices()[:1]),
                                  total_steps=total, warmup_steps=0)
  model = training.model
  student = reference_for(model).train()
  ref.randomize_(student, torch.Generator().manual_seed(11))
  # Copies: converted arrays may share memory with the tensors the PyTorch step updates.
  snapshot = lambda module: jax.tree.map(  # noqa: E731
      np.array, convert.params_from_torch_state_dict(module.state_dict(), model))
  params, stats = snapshot(student)
  state = train_state.create_train_state(model, training.abstract_state.tx, None,
                                         {"params": params, "batch_stats": stats})
  use_bc = method == "lut"
  if use_bc:
    teacher = copy.deepcopy(student)
    ref.randomize_(teacher, torch.Generator().manual_seed(12))  # a target that has drifted
    teacher.eval()
    t_params, t_stats = snapshot(teacher)
    state = state.replace(target_params=t_params, target_batch_stats=t_stats)
  state = jax.device_put(state, training.state_shardings)

  peak = config.optim.base_lr * batch_size / 256  # our linear rule (docs/method.md)
  decay = [p for p in student.parameters() if p.ndim > 1]
  no_decay = [p for p in student.parameters() if p.ndim <= 1]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.optim.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=peak,
                          betas=(config.optim.b1, config.optim.b2), eps=1e-8)
  w_mae, w_bc, norm_pix = config.loss.w_mae, config.loss.w_bc, config.loss.norm_pix
  well_conditioned = None
  for step in range(2):
    batch, key = util.synthetic_batch(step, batch_size), jax.random.key(3 + step)
    state, metrics = training.step(state, batch, key)
    metrics = jax.device_get(metrics)

    # The reference's iteration on the same masks (the step draws them from its key).
    masks = masking.random_masks(key, batch_size, model.num_patches, config.loss.mask_ratio,
                                 two_views=use_bc)
    keep1, keep2, ids_restore, mask1 = (
        None if a is None else torch.tensor(np.asarray(a))
        for a in (masks.keep1, masks.keep2, masks.ids_restore, masks.mask1))
    view1, view2 = (torch.from_numpy(batch[k]).permute(0, 3, 1, 2) for k in ("view1", "view2"))
    lr = peak * 0.5 * (1 + np.cos(np.pi * step / total))
    for group in opt.param_groups:
      group["lr"] = lr
    if use_bc:
      with torch.no_grad():
        z1, z2 = teacher.forward_teacher(view1, view2)
      out = student.forward_student(view1, view2, keep1, keep2, ids_restore)
      loss = (w_mae * ref.reconstruction_loss(out["pred"], view1, mask1, model.patch_size,
                                              norm_pix)
              + w_bc * ref.bc_loss(out["q1"], out["q2"], z1, z2))
    else:
      loss = w_mae * ref.reconstruction_loss(student.forward_mae(view1, keep1, ids_restore),
                                             view1, mask1, model.patch_size, norm_pix)
    opt.zero_grad()
    loss.backward()
    # Adam turns g into about g / (|g| + eps): where |g| is near eps it amplifies float32
    # noise in g (the key bias of attention has a zero gradient in exact arithmetic, so both
    # libraries update it by noise). Compared where |g| > 1000 eps at every step; the other
    # elements are held at their first value on both sides.
    large = jax.tree.map(lambda g: np.abs(g) > 1e-5, grads_as_ours(student, model))
    well_conditioned = large if well_conditioned is None else jax.tree.map(
        np.logical_and, well_conditioned, large)
    opt.step()
    assert_close(metrics["loss"], loss, f"loss at step {step}")
    assert metrics["lr"] == pytest.approx(lr, rel=1e-6)
    if use_bc:
      tau = 1 - (1 - config.ema.momentum) * (np.cos(np.pi * step / total) + 1) / 2
      assert metrics["momentum"] == pytest.approx(tau, abs=1e-7)
      with torch.no_grad():
        online = student.state_dict()
        for name, value in teacher.state_dict().items():
          if value.is_floating_point():
            value.mul_(tau).add_(online[name], alpha=1 - tau)

  after = jax.device_get(state)
  assert np.mean([np.mean(m) for m in jax.tree.leaves(well_conditioned)]) > 0.9
  keep_first = lambda new, old: jax.tree.map(np.where, well_conditioned, new, old)  # noqa: E731
  new_params, new_stats = convert.params_from_torch_state_dict(student.state_dict(), model)
  assert_updates_close(keep_first(after.params, params), keep_first(new_params, params), params,
                       f"{method} parameters after two steps", steps=2)
  if not use_bc:
    return
  assert_grads_close(after.batch_stats, new_stats, "student running statistics")
  new_t_params, new_t_stats = convert.params_from_torch_state_dict(teacher.state_dict(), model)
  assert_updates_close(keep_first(after.target_params, t_params),
                       keep_first(new_t_params, t_params), t_params, "target parameters",
                       steps=2)
  assert_grads_close(after.target_batch_stats, new_t_stats, "target running statistics")
