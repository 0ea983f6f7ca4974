"""One process of the 2-process test (tests/test_multiprocess.py); not a test itself.

usage: python -m tests.multiprocess_worker PROCESS_ID NUM_PROCESSES PORT OUT_JSON STEPS
With NUM_PROCESSES == 1 it is the single-process reference run.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def main(process_id: int, num_processes: int, port: int, out: str, steps: int) -> None:
  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id)
  import numpy as np  # noqa: PLC0415
  from lut_jax.pretrain import build, train_step  # noqa: PLC0415
  from lut_jax.runtime import sharding
  from tests import util  # noqa: PLC0415

  config = util.tiny_config()
  mesh = sharding.create_mesh(1)
  training = build.build_training(config, mesh, total_steps=10, warmup_steps=2)
  state = training.init(jax.random.key(0))
  batch_sharding = sharding.batch_sharding(mesh)
  per_process = config.input.batch_size // jax.process_count()
  lo = jax.process_index() * per_process
  def global_batch(step):
    full = util.synthetic_batch(step, config.input.batch_size)
    # Each process feeds only its own slice of the global batch.
    return {k: jax.make_array_from_process_local_data(batch_sharding, v[lo:lo + per_process])
            for k, v in full.items()}

  key = lambda step: train_step.step_key(jax.random.key(1), step)  # noqa: E731
  # Compiled first, then every process waits at the coordination service's barrier: gloo
  # gives the first collective 30 s to find all peers, less than one process may still
  # spend compiling on a loaded 2-core machine while the other is already waiting.
  step_fn = training.step.lower(state, global_batch(0), key(0)).compile()
  if num_processes > 1:
    from jax._src import distributed  # noqa: PLC0415  (the barrier has no public API)
    distributed.global_state.client.wait_at_barrier("step_compiled", 600_000)
  losses = []
  for step in range(steps):
    state, metrics = step_fn(state, global_batch(step), key(step))
    losses.append({k: float(v) for k, v in metrics.items()})
  if jax.process_index() == 0:
    with open(out, "w") as f:
      json.dump({"devices": jax.device_count(), "losses": losses,
                 "cls_token": np.asarray(jax.device_get(
                     state.params["encoder"]["cls_token"])).ravel().tolist()}, f)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
