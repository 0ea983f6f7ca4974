"""The train step: sharding invariance, EMA, gradients, optimizer pieces, accumulation."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lut_jax.models import vit
from lut_jax.pretrain import build, losses, train_state, train_step
from lut_jax.runtime import optim, sharding
from tests import util


def _build(config, mesh, total_steps=10, warmup_steps=2):
  return build.build_training(config, mesh, total_steps=total_steps, warmup_steps=warmup_steps)


def _one_step(config, mesh, batch, step_seed=7):
  training = _build(config, mesh)
  state0 = training.init(jax.random.key(0))
  # The step donates its input state: keep a host copy of the starting point.
  before = jax.device_get(state0)
  state1, metrics = training.step(state0, batch, jax.random.key(step_seed))
  return before, jax.device_get(state1), jax.device_get(metrics)


@pytest.mark.parametrize("method", ["lut", "mae"])
@pytest.mark.parametrize("fsdp", [1, 4])
def test_sharded_step_matches_single_device(method, fsdp):
  config = util.tiny_config(method)
  batch = util.synthetic_batch(0, 16)
  _, one, m_one = _one_step(config, sharding.create_mesh(1, jax.devices()[:1]), batch)
  mesh = sharding.create_mesh(fsdp)
  assert mesh.devices.size == 8
  _, eight, m_eight = _one_step(config, mesh, batch)
  for k in m_one:  # same numbers up to the order of the reductions
    np.testing.assert_allclose(m_one[k], m_eight[k], rtol=2e-5, atol=1e-6, err_msg=k)
  chex.assert_trees_all_close(one.params, eight.params, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(one.batch_stats, eight.batch_stats, rtol=1e-4, atol=1e-6)
  if method == "lut":
    chex.assert_trees_all_close(one.target_params, eight.target_params, rtol=1e-4, atol=1e-6)
  else:
    assert one.target_params is None and eight.target_params is None


def test_fsdp_actually_shards_large_leaves():
  config = util.tiny_config(**{"model.head_hidden_dim": 1024})
  mesh = sharding.create_mesh(4)
  shardings = _build(config, mesh).state_shardings
  kernel = shardings.params["head"]["linear_0"]["kernel"]  # (32, 1024): 32k elements
  assert "fsdp" in kernel.spec
  assert shardings.params["encoder"]["cls_token"].spec == jax.sharding.PartitionSpec()


def test_ema_update_and_schedules_by_hand():
  config = util.tiny_config()
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  before, after, metrics = _one_step(config, mesh, util.synthetic_batch(0, 16))
  tau0 = config.ema.momentum  # momentum at step 0 is tau0 exactly
  assert metrics["momentum"] == pytest.approx(tau0, abs=1e-7)
  expected = jax.tree.map(lambda t, o: tau0 * t + (1 - tau0) * o,
                          before.target_params, after.params)
  chex.assert_trees_all_close(after.target_params, expected, rtol=1e-6, atol=1e-7)
  expected_bs = jax.tree.map(lambda t, o: tau0 * t + (1 - tau0) * o,
                             before.target_batch_stats, after.batch_stats)
  chex.assert_trees_all_close(after.target_batch_stats, expected_bs, rtol=1e-6, atol=1e-7)
  # The student's running statistics moved (two updates per step: one per view).
  assert not np.allclose(after.batch_stats["head"]["norm_0"]["mean"],
                         before.batch_stats["head"]["norm_0"]["mean"])


def test_teacher_outputs_get_no_gradient():
  rng = np.random.default_rng(0)
  q1, q2, z1, z2 = (jnp.asarray(rng.normal(size=(4, 8)), jnp.float32) for _ in range(4))
  gz = jax.grad(lambda a, b: losses.bc_loss(q1, q2, a, b), argnums=(0, 1))(z1, z2)
  gq = jax.grad(lambda a: losses.bc_loss(a, q2, z1, z2))(q1)
  assert all(np.all(np.asarray(g) == 0) for g in gz)
  assert np.any(np.asarray(gq) != 0)


def test_target_changes_only_by_ema():
  """Two steps: the target after each is exactly the EMA of the online weights, i.e. no
  optimizer update (no gradient) ever reaches it."""
  config = util.tiny_config()
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  training = _build(config, mesh, total_steps=10)
  momentum = optim.momentum_schedule(base_momentum=config.ema.momentum, total_steps=10)
  state = training.init(jax.random.key(0))
  for step in range(2):
    target = jax.device_get(state.target_params)
    state, _ = training.step(state, util.synthetic_batch(step, 16), jax.random.key(step))
    tau = float(momentum(step))
    expected = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, target,
                            jax.device_get(state.params))
    chex.assert_trees_all_close(jax.device_get(state.target_params), expected, rtol=1e-6,
                                atol=1e-7)


def test_weight_decay_mask_covers_exactly_weights_and_tokens():
  config = util.tiny_config()
  model = vit.build_model(config.model, image_size=16, channels=3, use_bc=True)
  params = train_state.init_variables(model, jax.random.key(0))["params"]
  mask = optim.weight_decay_mask(params)
  flat = {jax.tree_util.keystr(path): value
          for path, value in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat  # every leaf classified by its name, independently of its rank
  for name, decayed in flat.items():
    leaf = name.rsplit("'", 2)[-2]
    is_norm = "norm" in name and leaf in ("scale", "bias")
    expect = leaf in ("kernel", "cls_token", "mask_token") and not is_norm
    assert decayed == expect, name


def test_learning_rate_and_momentum_closed_forms():
  peak, warmup, total, min_lr = 2e-3, 10, 100, 1e-5
  lr = optim.learning_rate_schedule(peak_lr=peak, warmup_steps=warmup, total_steps=total,
                                    min_lr=min_lr)
  for k in (0, 3, 10, 37, 99, 100):
    if k < warmup:
      want = peak * k / warmup
    else:
      want = min_lr + (peak - min_lr) * 0.5 * (1 + np.cos(np.pi * (k - warmup) / (total - warmup)))
    assert float(lr(k)) == pytest.approx(want, rel=1e-5, abs=1e-9), k
  mom = optim.momentum_schedule(base_momentum=0.996, total_steps=total)
  for k in (0, 25, 50, 100):
    want = 1 - (1 - 0.996) * (np.cos(np.pi * k / total) + 1) / 2
    assert float(mom(k)) == pytest.approx(want, abs=1e-7), k
  assert optim.peak_learning_rate(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_accumulation_matches_large_batch():
  # Layer norm in the heads: with batch norm, statistics would be per micro-batch.
  config = util.tiny_config(**{"model.head_norm": "layer"})
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  batch = util.synthetic_batch(0, 16)
  _, big, m_big = _one_step(config, mesh, batch)
  config.optim.accum_steps = 4
  _, acc, m_acc = _one_step(config, mesh, batch)
  for k in ("loss", "rec_loss", "bc_loss", "grad_norm"):
    np.testing.assert_allclose(m_big[k], m_acc[k], rtol=1e-5, err_msg=k)
  chex.assert_trees_all_close(big.params, acc.params, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(big.target_params, acc.target_params, rtol=1e-5, atol=1e-7)


def test_micro_batches_spread_over_devices():
  x = jnp.arange(16)
  micro = train_step._micro_batches(x, 4)
  # Every device block of 4 consecutive examples contributes one example to each.
  np.testing.assert_array_equal(micro[0], [0, 4, 8, 12])
  np.testing.assert_array_equal(np.sort(np.concatenate(micro)), np.arange(16))


@pytest.mark.parametrize("overrides, message", [
    ({"input.batch_size": 12}, "not divisible"),
    ({"loss.mask_ratio": 0.4}, "mask_ratio must be >= 0.5"),
    ({"model.variant": "Q/16"}, "Unknown model variant 'Q/16'"),
    ({"method": "simclr"}, "unknown method 'simclr'"),
    ({"dtype": "float8"}, "unknown dtype"),
    ({"method": "mae"}, "method='mae'"),
])
def test_bad_configs_are_named(overrides, message):
  config = util.override(util.tiny_config(), overrides)
  with pytest.raises(ValueError, match=message):
    build.validate(config)
    sharding.check_batch_size(config.input.batch_size, sharding.create_mesh(1),
                              accum_steps=config.optim.accum_steps)


def test_unknown_config_argument():
  with pytest.raises(ValueError, match="accepted: variant=..., method=..."):
    util.fashion_mnist.get_config("varient=B/16")


def test_collapse_indicator_is_the_teachers_spread():
  # z_std must be the spread of exactly what the teacher fed the BC loss: its vectors of
  # both full views under the pre-update target weights, recomputed here with numpy.
  config = util.tiny_config()
  mesh = sharding.create_mesh(1, jax.devices()[:1])
  batch = util.synthetic_batch(0, 16)
  before, _, metrics = _one_step(config, mesh, batch)
  model = _build(config, mesh).model
  z1, z2 = model.apply({"params": before.target_params,
                        "batch_stats": before.target_batch_stats},
                       batch["view1"], batch["view2"], method=vit.LUTModel.teacher)

  def spread(v):
    v = np.asarray(v, np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return v.std(axis=0).mean()
  np.testing.assert_allclose(metrics["z_std"], (spread(z1) + spread(z2)) / 2, rtol=1e-4)
  assert 0 < metrics["q_std"] < 1
  mae = _one_step(util.tiny_config("mae"), mesh, batch)[2]
  assert mae["z_std"] == 0 and mae["q_std"] == 0


def test_teacher_bn_batch_normalises_each_view_by_its_batch_and_keeps_running_stats():
  """``model.teacher_bn="batch"``: the teacher's projector BN uses each view's (biased)
  batch statistics, recomputed here in numpy, and its running averages change only by
  the EMA, as with the reference's running-average teacher."""
  config = util.tiny_config(**{"model.teacher_bn": "batch"})
  batch = util.synthetic_batch(0, 16)
  before, after, _ = _one_step(config, sharding.create_mesh(1, jax.devices()[:1]), batch)
  training = _build(config, sharding.create_mesh(1, jax.devices()[:1]))
  variables = {"params": before.target_params, "batch_stats": before.target_batch_stats}
  z1, z2 = training.model.apply(variables, batch["view1"], batch["view2"],
                                method=vit.LUTModel.teacher)
  head = before.target_params["head"]
  for view, z in ((batch["view1"], z1), (batch["view2"], z2)):
    tokens = training.model.apply({"params": before.target_params}, view,
                                  method=vit.LUTModel.encode)
    h = np.asarray(vit.mean_patch_token(tokens)) @ np.asarray(head["linear_0"]["kernel"])
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)
    h = h * np.asarray(head["norm_0"]["scale"]) + np.asarray(head["norm_0"]["bias"])
    want = np.maximum(h, 0) @ np.asarray(head["linear_1"]["kernel"])
    np.testing.assert_allclose(np.asarray(z), want, rtol=1e-4, atol=1e-5)
  tau = float(optim.momentum_schedule(base_momentum=config.ema.momentum, total_steps=10)(0))
  want_stats = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, before.target_batch_stats,
                            after.batch_stats)
  chex.assert_trees_all_close(after.target_batch_stats, want_stats, rtol=1e-6, atol=1e-7)
