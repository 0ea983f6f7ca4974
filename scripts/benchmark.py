r"""Throughput of the compiled LUT / MAE train step on synthetic, device-resident batches.

  python scripts/benchmark.py --variant=B/16 --batch=256 --method=both --dtype=bfloat16
  python scripts/benchmark.py --variant=L/16 --batch=128 --remat --find_max_batch
  python scripts/benchmark.py --config=configs/fashion_mnist.py --batch=128 --dtype=float32 \
      --framework=both          # ours and the PyTorch reference step, and their ratio

What is timed is the real step: the state, shardings and ``jax.jit`` (donated state) are
built by :func:`lut_jax.pretrain.build.build_training`, the function the training loop uses (it is
TensorFlow-free, so this runs on the GPU machine, which lacks TensorFlow). One synthetic batch
is created on the device once; the loop only dispatches steps and blocks once at the end
of each timed window, so no host synchronisation sits inside it. Compilation is timed
separately (lower + compile), then ``--warmup`` steps run untimed.

Reported per method: images/s, ms/step, analytic model TFLOP/s (``scripts/flops.py``), MFU
against the chip's dense peak (table below) and against a measured matmul of the same
dtype, XLA's cost-analysis FLOPs and the StableHLO matmul FLOPs as cross-checks, peak
device memory, and the versions. Needs only jax, flax, optax, orbax-checkpoint and
ml_collections (no TensorFlow, no CLU).

``--framework=torch|both`` runs ``scripts/benchmark_torch.py`` (the PyTorch reference step,
``tests/torch_reference.py``) in a child process with the same shapes and reports the ratio
ours / PyTorch in images/s.

``--alternate=model.gelu_approximate=true`` (repeatable) compiles the baseline and each
variant in one process and alternates their timed windows, reporting each variant's paired
speed-up over the baseline: on a machine whose speed drifts between runs (shared CPUs), the
way to measure a lever of a few percent. ``--alternate_env=GLIBC_TUNABLES=`` does the same
for an environment variable that only a process's start reads: the baseline and each
variant then run in child processes of their own, alive side by side, timed in turn.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any, Mapping, NamedTuple, Optional, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # bench_common
import bench_common  # noqa: E402  pylint: disable=g-import-not-at-top
from lut_jax.runtime import host_memory  # noqa: E402  pylint: disable=g-import-not-at-top

# Dense peak FLOP/s per chip, from the vendors' data sheets: (device-kind substring, dtype).
# float32 on NVIDIA means TF32 tensor cores (JAX's default matmul precision on GPU).
# The first matching row wins, so the more specific names come first.
PEAK_FLOPS: list[tuple[str, str, float]] = [
    ("H100 PCIe", "bfloat16", 756e12), ("H100 PCIe", "float32", 378e12),
    ("H100", "bfloat16", 989e12), ("H100", "float32", 494.5e12),
    ("H200", "bfloat16", 989e12), ("H200", "float32", 494.5e12),
    ("GH200", "bfloat16", 989e12), ("GH200", "float32", 494.5e12),
    ("A100", "bfloat16", 312e12), ("A100", "float32", 156e12),
]
ATTENTION = {"xla": "xla", "cudnn": "cudnn", "auto": ""}  # "" = models.default_attention_impl


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections",
               "numpy"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = "not installed"
  return out


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  for name, dt, peak in PEAK_FLOPS:
    if name.lower() in device_kind.lower() and dt == dtype:
      return peak
  return None


def load_config_module(path: str):
  """Imports a ``configs/*.py`` file by path (as ml_collections' config_flags does)."""
  path = str(ROOT / path) if not os.path.isabs(path) else path
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def make_config(args: argparse.Namespace, method: str, batch: int, extra: Sequence[str] = ()):
  """The pre-training config of ``args.config`` with the benchmark's overrides applied
  (``--override``, then ``extra``)."""
  from lut_jax.pretrain import build  # pylint: disable=g-import-not-at-top

  module = load_config_module(args.config)
  arg = f"method={method}" + (f",variant={args.variant}" if args.variant else "")
  config = module.get_config(arg)
  config.unlock()
  if args.image_size:
    config.input.image_size = args.image_size
  config.input.batch_size = batch
  config.dtype = args.dtype
  config.model.attention_impl = ATTENTION[args.attention]
  if args.remat is not None:
    config.model.remat = args.remat
  if args.fsdp is not None:
    config.mesh.fsdp = args.fsdp
  # The schedules' values do not change the step's cost; fixed lengths keep them defined
  # without the data set's size.
  config.total_steps, config.total_epochs = 100_000, None
  config.optim.warmup_steps, config.optim.warmup_epochs = 1_000, None
  bench_common.apply_overrides(config, list(args.override) + list(extra))
  build.validate(config)
  return config.lock()


def synthetic_batch(config, mesh, key) -> dict[str, Any]:
  """Normalised-image-like N(0, 1) views, generated on the devices, already sharded."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lut_jax import config_lib  # pylint: disable=g-import-not-at-top
  from lut_jax.runtime import sharding

  shape = (config.input.batch_size, config.input.image_size, config.input.image_size,
           config.input.channels)
  names = ("view1", "view2") if config_lib.uses_bc(config) else ("view1",)

  def make(key):
    return {n: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
            for i, n in enumerate(names)}
  return jax.jit(make, out_shardings=sharding.batch_sharding(mesh))(key)


def measure_matmul_peak(dtype: str, size: int, reps: int) -> float:
  """FLOP/s of a square ``size`` matmul in ``dtype`` on device 0 (a practical peak)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  a = jax.random.normal(jax.random.key(1), (size, size), dt)
  b = jax.random.normal(jax.random.key(2), (size, size), dt)

  @jax.jit
  def chain(a, b):  # reps products in one program: no dispatch gaps between them
    def body(_, c):
      return (c @ b) * (1.0 / size ** 0.5)
    return jax.lax.fori_loop(0, reps, body, a)
  jax.block_until_ready(chain(a, b))
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(chain(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 * reps / best


def is_oom(err: BaseException) -> bool:
  text = str(err)
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OOM", "Resource exhausted"))


def device_memory() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    stats = None
  if not stats:
    return {}
  return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
          if k in stats}


class Window(NamedTuple):
  """One timed window: wall seconds, process CPU seconds (all threads), minor page faults."""
  wall: float
  cpu: float
  minor_faults: int


class Stepper:
  """A compiled step with its own state, batch and keys; ``window(n)`` runs ``n`` steps and
  blocks once at the end, returning its :class:`Window`."""

  def __init__(self, compiled, state, batch_arrays, keys):
    self.compiled, self.state, self.batch, self.keys = compiled, state, batch_arrays, keys
    self.metrics, self.index = None, 0

  def window(self, steps: int) -> Window:
    import jax  # pylint: disable=g-import-not-at-top

    faults = bench_common.minor_page_faults()
    start, cpu_start = time.perf_counter(), time.process_time()  # CPU: all threads
    for _ in range(steps):
      self.state, self.metrics = self.compiled(self.state, self.batch,
                                               self.keys[self.index % len(self.keys)])
      self.index += 1
    jax.block_until_ready((self.state, self.metrics))  # the only sync: end of the window
    return Window(time.perf_counter() - start, time.process_time() - cpu_start,
                  bench_common.minor_page_faults() - faults)


class ChildStepper:
  """A :class:`Stepper` in a child process with its own environment (``--alternate_env``):
  for what only a process's start reads (``GLIBC_TUNABLES``, ``XLA_FLAGS``). The child
  compiles and warms up, then runs one window per request on its stdin. Its other output
  is passed on to stderr."""

  def __init__(self, args: argparse.Namespace, method: str, env: dict[str, str]):
    spec = json.dumps({**vars(args), "method": method})
    self.proc = subprocess.Popen(
        [sys.executable, str(pathlib.Path(__file__).resolve()), f"--serve_windows={spec}"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
      self.rec = json.loads(self._reply("READY "))
    except BaseException:
      self.close()
      raise

  def _reply(self, prefix: str) -> str:
    for line in self.proc.stdout:
      before, found, reply = line.partition(prefix)  # native output may precede it
      sys.stderr.write(before if found else line)
      if found:
        return reply
    raise self._exited()

  def _exited(self) -> RuntimeError:
    return RuntimeError(f"benchmark child process exited with {self.proc.wait()} "
                        "(its error is above)")

  def window(self, steps: int) -> Window:
    try:
      self.proc.stdin.write(f"{steps}\n")
      self.proc.stdin.flush()
    except BrokenPipeError:
      raise self._exited() from None
    return Window(*json.loads(self._reply("WINDOW ")))

  def close(self) -> None:
    try:
      self.proc.stdin.close()
    except BrokenPipeError:
      pass  # it exited already
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()


def serve_windows(spec: str) -> None:
  """The child side of :class:`ChildStepper`."""
  args = argparse.Namespace(**json.loads(spec))
  rec, stepper = prepare(args, args.method, args.batch, warmup=args.warmup)
  print("READY " + json.dumps(rec, default=str), flush=True)
  for line in sys.stdin:
    print("WINDOW " + json.dumps(stepper.window(int(line))), flush=True)


def prepare(args: argparse.Namespace, method: str, batch: int, *, warmup: int,
            extra: Sequence[str] = ()) -> tuple[dict[str, Any], Stepper]:
  """Builds and compiles one configuration and runs its warmup; returns its record (so far)
  and its :class:`Stepper`."""
  import jax  # pylint: disable=g-import-not-at-top
  from lut_jax.pretrain import build, train_step  # pylint: disable=g-import-not-at-top
  import flops  # pylint: disable=g-import-not-at-top (scripts/, beside this file)
  from lut_jax.runtime import sharding

  config = make_config(args, method, batch, extra)
  mesh = sharding.create_mesh(config.mesh.fsdp)
  sharding.check_batch_size(batch, mesh, accum_steps=config.optim.accum_steps)
  total_steps, warmup_steps = build.run_length(config)
  training = build.build_training(config, mesh, total_steps=total_steps,
                                  warmup_steps=warmup_steps)
  rec: dict[str, Any] = {
      "framework": "jax", "method": method, "config": args.config,
      "variant": config.model.variant, "image_size": config.input.image_size,
      "batch": batch, "dtype": config.dtype,
      "attention": training.model.attention_impl or "xla", "remat": bool(config.model.remat),
      "remat_policy": config.model.remat_policy,
      "fsdp": int(config.mesh.fsdp), "mesh": dict(mesh.shape),
      "overrides": list(args.override) + list(extra),
      "num_params": int(sum(x.size for x in jax.tree.leaves(training.abstract_state.params))),
      "loadavg_start": os.getloadavg()[0],
  }

  state = training.init(jax.random.key(0))
  batch_arrays = synthetic_batch(config, mesh, jax.random.key(1))
  base_key = jax.random.key(2)
  # Keys made ahead of time, so the timed loop dispatches nothing but steps.
  keys = [train_step.step_key(base_key, i) for i in range(64)]
  jax.block_until_ready((state, batch_arrays, keys))
  start = time.perf_counter()
  lowered = training.step.lower(state, batch_arrays, keys[0])
  rec["lower_s"] = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  rec["compile_s"] = time.perf_counter() - start

  shape = flops.shape_from_model(training.model, config.loss.mask_ratio)
  # The analytic recompute is a full block forward: what remat runs with no policy or with
  # nothing_saveable; the dot-saving policies re-run (almost) no matmul FLOPs.
  full_remat = config.model.remat and config.model.remat_policy in ("", "nothing_saveable")
  analytic = flops.step_flops(shape, config.method, remat=bool(full_remat))
  rec["analytic_gflop_per_image"] = analytic["model_total"] / 1e9
  rec["analytic_executed_gflop_per_image"] = analytic["executed_total"] / 1e9
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # SPMD-partitioned programs report one device's share: scale to the global batch.
    rec["xla_gflop_per_image"] = cost["flops"] * mesh.devices.size / batch / 1e9
  except Exception as e:  # pylint: disable=broad-except
    rec["xla_gflop_per_image"] = None
    rec["xla_cost_error"] = repr(e)[:200]
  hlo = flops.matmul_flops_from_stablehlo(lowered.as_text())
  rec["stablehlo_matmul_gflop_per_image"] = hlo["flops"] / batch / 1e9
  rec["stablehlo_custom_calls"] = hlo["custom_call"]
  try:
    mem = compiled.memory_analysis()
    rec["xla_memory_gib"] = {
        k: getattr(mem, f"{k}_size_in_bytes") / 2 ** 30
        for k in ("argument", "output", "temp", "alias", "generated_code")
        if hasattr(mem, f"{k}_size_in_bytes")}
  except Exception:  # pylint: disable=broad-except
    pass

  stepper = Stepper(compiled, state, batch_arrays, keys)
  if warmup:
    rec["first_step_s"] = stepper.window(1).wall
    rec["warmup_s"] = rec["first_step_s"] + stepper.window(warmup - 1).wall
  return rec, stepper


def run_one(args: argparse.Namespace, method: str, batch: int, *, steps: int, warmup: int,
            repeats: int) -> dict[str, Any]:
  """Builds, compiles and times one configuration; returns its result record."""
  import jax  # pylint: disable=g-import-not-at-top

  rec, stepper = prepare(args, method, batch, warmup=warmup)
  timed = [stepper.window(steps) for _ in range(repeats)]
  # CPU time per step: with a host backend it hardly depends on what else runs (unlike
  # wall time on a shared machine); spin-waiting threads inflate it, though. A window that
  # pays a one-off cost (the heap growing to its final size: first-touch faults of new
  # pages, several ms per 2 MB page in a virtual machine's kernel; docs/benchmarks.md)
  # shows in the per-window fields and not in the medians.
  step_s = bench_common.record_windows(
      rec, [w.wall for w in timed], [w.cpu / steps * 1e3 for w in timed],
      [w.minor_faults / steps for w in timed], steps=steps, batch=batch)
  rec["loss_last"] = float(stepper.metrics["loss"]) if stepper.metrics is not None else None
  rec["model_tflops"] = rec["analytic_gflop_per_image"] * 1e9 * batch / step_s / 1e12
  rec["memory"] = device_memory()
  rec["loadavg_end"] = os.getloadavg()[0]
  if args.profile_dir:  # after the timed windows, so tracing never slows those
    profile_dir = os.path.join(args.profile_dir, f"{method}_b{batch}")
    with jax.profiler.trace(profile_dir):
      stepper.window(args.profile_steps)
    # The optimised HLO names the fusions that the trace's kernels come from.
    with open(os.path.join(profile_dir, "optimized_hlo.txt"), "w") as f:
      f.write(stepper.compiled.as_text())
    rec["profile_dir"] = profile_dir
  del stepper
  gc.collect()
  return rec


def child_environments(variants: Sequence[str],
                       environ: Mapping[str, str]) -> list[dict[str, str]]:
  """The baseline's and each ``NAME=VALUE`` variant's environment for ``--alternate_env``.

  The malloc marker keeps each child in exactly the environment given (no restart), and
  the children, alive at the same time, split the accelerator memory JAX would give one
  process (``XLA_PYTHON_CLIENT_MEM_FRACTION``, default 0.75); a CPU ignores it.
  """
  share = float(environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")) / (len(variants) + 1)
  base = {**environ, host_memory.TUNED_ENV: "1",
          "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{share:.3f}"}
  return [base] + [{**base, name: value}
                   for name, _, value in (v.partition("=") for v in variants)]


def run_alternating(args: argparse.Namespace, method: str) -> list[dict[str, Any]]:
  """The baseline and each variant timed in rounds of one window each, the order reversed
  every other round: whatever drifts on the machine (other load, clock, thermal state) hits
  every variant alike. Each variant's ratios to the baseline are medians of the per-round
  ratios. Config variants (``--alternate``) are compiled in this process; environment
  variants (``--alternate_env``) each run in a child process, and so does the baseline."""
  children: list[ChildStepper] = []
  try:
    if args.alternate_env:
      labels = ["baseline"] + list(args.alternate_env)
      for env in child_environments(args.alternate_env, os.environ):
        children.append(ChildStepper(args, method, env))
      prepared = [(child.rec, child) for child in children]
    else:
      labels = ["baseline"] + list(args.alternate)
      prepared = [prepare(args, method, args.batch, warmup=args.warmup,
                          extra=[] if label == "baseline" else label.split(","))
                  for label in labels]
    timed: list[list[Window]] = [[] for _ in labels]
    for r in range(args.repeats):
      order = range(len(labels)) if r % 2 == 0 else reversed(range(len(labels)))
      for i in order:
        timed[i].append(prepared[i][1].window(args.steps))
  finally:
    for child in children:
      child.close()
  median = bench_common.median
  records = []
  for label, (rec, _), windows in zip(labels, prepared, timed):
    wall = median([w.wall for w in windows]) / args.steps
    rec.update(
        alternate=label, ms_per_step=wall * 1e3, images_per_s=args.batch / wall,
        cpu_ms_per_step=median([w.cpu for w in windows]) / args.steps * 1e3,
        minor_faults_per_step=median([w.minor_faults for w in windows]) / args.steps,
        window_ms_per_step=[w.wall / args.steps * 1e3 for w in windows],
        window_cpu_ms_per_step=[w.cpu / args.steps * 1e3 for w in windows],
        # > 1: the variant is faster than the baseline, paired round by round.
        speedup_wall=median([b.wall / w.wall for b, w in zip(timed[0], windows)]),
        speedup_cpu=median([b.cpu / w.cpu for b, w in zip(timed[0], windows)]),
        loadavg_end=os.getloadavg()[0])
    records.append(rec)
    print(f"[jax] {method} {label}: {rec['images_per_s']:.1f} images/s, "
          f"{rec['ms_per_step']:.2f} ms/step, {rec['cpu_ms_per_step']:.1f} CPU ms/step, "
          f"{rec['minor_faults_per_step']:.0f} page faults/step; vs baseline "
          f"x{rec['speedup_wall']:.3f} wall, x{rec['speedup_cpu']:.3f} CPU "
          f"(medians of {args.repeats} paired windows)", flush=True)
  del prepared
  gc.collect()
  return records


def add_mfu(rec: dict[str, Any], env: dict[str, Any]) -> None:
  peak = env.get("peak_flops", {}).get(rec["dtype"])
  measured = env.get("measured_matmul_flops", {}).get(rec["dtype"])
  rec["mfu"] = rec["model_tflops"] * 1e12 / peak if peak else None
  rec["mfu_vs_measured_matmul"] = rec["model_tflops"] * 1e12 / measured if measured else None


def describe(rec: dict[str, Any]) -> str:
  def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)
  mem = rec.get("memory", {}).get("peak_bytes_in_use")
  lines = [
      f"[{rec['framework']}] {rec['method']} {rec['variant']} @{rec['image_size']}px "
      f"batch {rec['batch']} {rec['dtype']} attention={rec.get('attention')} "
      f"remat={rec.get('remat')}",
      f"  {rec['images_per_s']:.1f} images/s, {rec['ms_per_step']:.2f} ms/step median "
      f"(best window {rec['best_images_per_s']:.1f} images/s; windows: "
      f"{', '.join(f'{w:.2f}' for w in rec['window_ms_per_step'])} ms/step)",
  ]
  if rec["framework"] == "jax":
    lines += [
        f"  compile {rec['compile_s']:.1f} s (lower {rec['lower_s']:.1f} s), first step "
        f"{rec.get('first_step_s', 0):.2f} s",
        f"  model {rec['analytic_gflop_per_image']:.3f} GFLOP/image -> "
        f"{rec['model_tflops']:.3f} TFLOP/s, MFU {fmt(rec.get('mfu'), '.1%')} "
        f"(vs measured matmul {fmt(rec.get('mfu_vs_measured_matmul'), '.1%')})",
        f"  cross-check: XLA cost analysis {fmt(rec['xla_gflop_per_image'], '.3f')}, "
        f"StableHLO matmuls {rec['stablehlo_matmul_gflop_per_image']:.3f} "
        f"(custom calls {rec['stablehlo_custom_calls']}), analytic executed "
        f"{rec['analytic_executed_gflop_per_image']:.3f} GFLOP/image",
        f"  memory: peak {fmt(mem and mem / 2 ** 30, '.2f')} GiB on device (process so far); "
        f"XLA temp "
        f"{fmt(rec.get('xla_memory_gib', {}).get('temp'), '.2f')} GiB, args "
        f"{fmt(rec.get('xla_memory_gib', {}).get('argument'), '.2f')} GiB",
    ]
  lines.append(f"  load average {rec['loadavg_start']:.2f} -> {rec['loadavg_end']:.2f}")
  return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  env = {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "platform": dev.platform, "device_kind": dev.device_kind,
      "num_devices": jax.device_count(), "cpu_model": bench_common.cpu_model(),
      "cpu_cores": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
      "hostname": platform.node(), "versions": versions(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }
  env["peak_flops"] = {dt: peak_flops(dev.device_kind, dt) for dt in ("bfloat16", "float32")}
  if args.measure_peak or (args.measure_peak is None and dev.platform == "cpu"):
    size = 8192 if dev.platform == "gpu" else 1024
    reps = 20 if dev.platform == "gpu" else 4
    env["measured_matmul_flops"] = {args.dtype: measure_matmul_peak(args.dtype, size, reps)}
    env["measured_matmul_size"] = size
  return env


def run_torch(args: argparse.Namespace, method: str, batch: int) -> dict[str, Any]:
  """The PyTorch reference step in a child process (its own threads and memory)."""
  cmd = [sys.executable, str(ROOT / "scripts" / "benchmark_torch.py"), f"--config={args.config}",
         f"--method={method}", f"--batch={batch}", f"--dtype={args.dtype}",
         f"--steps={args.steps}", f"--warmup={args.warmup}", f"--repeats={args.repeats}",
         "--json_out=-"]
  if args.variant:
    cmd.append(f"--variant={args.variant}")
  if args.image_size:
    cmd.append(f"--image_size={args.image_size}")
  if args.torch_threads:
    cmd.append(f"--threads={args.torch_threads}")
  cmd += [f"--override={o}" for o in args.override]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"benchmark_torch.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  sys.stderr.write(proc.stderr)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def find_max_batch(args: argparse.Namespace, method: str) -> dict[str, Any]:
  """Doubles the batch from ``--batch`` until a step runs out of memory (or the limit)."""
  batch, best, trials = args.batch, None, []
  while batch <= args.max_batch:
    try:
      rec = run_one(args, method, batch, steps=2, warmup=1, repeats=1)
      trials.append({"batch": batch, "fits": True, "images_per_s": rec["images_per_s"],
                     "peak_bytes_in_use": rec["memory"].get("peak_bytes_in_use")})
      print(f"  batch {batch}: fits, {rec['images_per_s']:.1f} images/s", flush=True)
      best = batch
      batch *= 2
    except Exception as e:  # pylint: disable=broad-except
      if not is_oom(e):
        raise
      trials.append({"batch": batch, "fits": False, "error": str(e).splitlines()[0][:300]})
      print(f"  batch {batch}: out of memory", flush=True)
      break
    finally:
      gc.collect()
  return {"method": method, "largest_fitting_batch": best, "limit": args.max_batch,
          "hit_limit": batch > args.max_batch, "trials": trials}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/pretrain.py",
                 help="config file (relative to the repository or absolute)")
  p.add_argument("--variant", default=None, help="e.g. Ti/16, S/16, B/16, L/16, nano/4 "
                 "(default: the config's)")
  p.add_argument("--image_size", type=int, default=None, help="default: the config's")
  p.add_argument("--batch", type=int, default=256, help="global batch")
  p.add_argument("--method", choices=("lut", "mae", "both"), default="both")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  p.add_argument("--steps", type=int, default=20, help="timed steps per window")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
  p.add_argument("--repeats", type=int, default=3, help="timed windows; the median counts")
  p.add_argument("--attention", choices=tuple(ATTENTION), default="auto")
  p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                 help="rematerialise blocks (default: the config's)")
  p.add_argument("--fsdp", type=int, default=None, help="mesh.fsdp (default: the config's)")
  p.add_argument("--override", action="append", default=[],
                 help="extra config override key=value (repeatable), e.g. model.decoder_depth=4")
  p.add_argument("--alternate", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                 help="a variant to compare with the baseline (--override alone) in this "
                      "process, windows alternating (repeatable; comma-separated overrides): "
                      "for effects of a few percent on a shared or noisy machine. Holds "
                      "every variant's state in memory at once")
  p.add_argument("--alternate_env", action="append", default=[], metavar="NAME=VALUE",
                 help="like --alternate, for an environment variable read when a process "
                      "starts (GLIBC_TUNABLES, XLA_FLAGS; an empty VALUE sets it empty): "
                      "the baseline (this environment) and each variant run in child "
                      "processes of their own, windows alternating; on an accelerator they "
                      "split its memory")
  p.add_argument("--serve_windows", default=None, help=argparse.SUPPRESS)  # a child's spec
  p.add_argument("--find_max_batch", action="store_true",
                 help="double the batch from --batch until out of memory; report the largest")
  p.add_argument("--max_batch", type=int, default=65536, help="upper limit of that search")
  p.add_argument("--measure_peak", action=argparse.BooleanOptionalAction, default=None,
                 help="time a square matmul for a practical peak (default: on CPU only)")
  p.add_argument("--framework", choices=("jax", "torch", "both"), default="jax")
  p.add_argument("--torch_threads", type=int, default=None,
                 help="torch.set_num_threads for the PyTorch run (default: usable cores)")
  p.add_argument("--profile_dir", default=None,
                 help="after timing, trace --profile_steps steps with jax.profiler into "
                      "DIR/<method>_b<batch> (summarise with scripts/trace_summary.py)")
  p.add_argument("--profile_steps", type=int, default=3)
  p.add_argument("--json_out", default=None, help="write all results here as JSON")
  args = p.parse_args(argv)
  if args.alternate and args.alternate_env:
    p.error("--alternate and --alternate_env: choose one (config variants are compiled in "
            "one process, environment variants each need their own)")
  if (args.alternate or args.alternate_env) and (
      args.framework != "jax" or args.find_max_batch or args.profile_dir):
    p.error("--alternate and --alternate_env time our step only: drop --framework=torch/both, "
            "--find_max_batch and --profile_dir (run those separately)")
  for variant in args.alternate_env:
    if not variant.partition("=")[0] or "=" not in variant:
      p.error(f"--alternate_env={variant}: expected NAME=VALUE")
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.serve_windows:
    serve_windows(args.serve_windows)
    return {}
  # MAE first: a device's peak-memory counter covers the whole process, and the LUT step
  # needs more, so each method's reported peak is then its own.
  methods = ("mae", "lut") if args.method == "both" else (args.method,)
  env = environment(args) if args.framework != "torch" else {
      "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu_model": bench_common.cpu_model(),
      "cpu_cores": os.cpu_count()}
  print(json.dumps({k: v for k, v in env.items() if k != "versions"}, default=str), flush=True)
  print(json.dumps(env.get("versions", {})), flush=True)
  results: list[dict[str, Any]] = []
  out: dict[str, Any] = {"env": env, "args": vars(args), "results": results}
  for method in methods:
    if args.find_max_batch:
      search = find_max_batch(args, method)
      out.setdefault("max_batch", []).append(search)
      print(f"[jax] {method}: largest fitting batch {search['largest_fitting_batch']}"
            + (" (search limit reached)" if search["hit_limit"] else ""), flush=True)
      save(out, args.json_out)
      continue
    if args.alternate or args.alternate_env:
      results.extend(run_alternating(args, method))
      save(out, args.json_out)
      continue
    jax_rec = None
    if args.framework in ("jax", "both"):
      jax_rec = run_one(args, method, args.batch, steps=args.steps, warmup=args.warmup,
                        repeats=args.repeats)
      add_mfu(jax_rec, env)
      results.append(jax_rec)
      print(describe(jax_rec), flush=True)
    if args.framework in ("torch", "both"):
      try:
        torch_rec = run_torch(args, method, args.batch)
      except (RuntimeError, ValueError, OSError) as e:  # keep our numbers if PyTorch fails
        results.append({"framework": "torch", "method": method, "error": str(e)[-2000:]})
        print(f"[torch] {method} failed: {e}", flush=True)
        save(out, args.json_out)
        continue
      results.append(torch_rec)
      print(describe(torch_rec), flush=True)
      if jax_rec is not None:
        jax_rec["ratio_vs_torch"] = jax_rec["images_per_s"] / torch_rec["images_per_s"]
        jax_rec["cpu_ratio_vs_torch"] = torch_rec["cpu_ms_per_step"] / jax_rec["cpu_ms_per_step"]
        jax_rec["best_ratio_vs_torch"] = (jax_rec["best_images_per_s"]
                                          / torch_rec["best_images_per_s"])
        print(f"  ours / PyTorch ({method}): {jax_rec['ratio_vs_torch']:.2f}x images/s "
              f"(medians), {jax_rec['best_ratio_vs_torch']:.2f}x (best windows), "
              f"{jax_rec['cpu_ratio_vs_torch']:.2f}x per CPU-second (medians)", flush=True)
    save(out, args.json_out)  # after every method: a later crash or timeout loses nothing
  save(out, args.json_out)
  return out


def save(out: dict[str, Any], path: Optional[str]) -> None:
  if path:
    with open(path, "w") as f:
      json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
  host_memory.restart_with_tuned_malloc()  # what lut-pretrain runs with
  main()
