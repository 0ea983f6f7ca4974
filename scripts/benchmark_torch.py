r"""Throughput of the same LUT / MAE step in PyTorch (the reference of tests/torch_reference.py).

  python scripts/benchmark_torch.py --config=configs/fashion_mnist.py --batch=128
  python scripts/benchmark_torch.py --variant=B/16 --batch=256 --dtype=bfloat16   # GPU

The comparison point for ``scripts/benchmark.py`` (which runs this in a child process with
``--framework=both``). Same shapes as our step (read from the same config), the same work
per step, eager PyTorch as the reference code runs it:

* masking from uniform noise (view 1 keeps the first ``keep`` of the permutation, view 2
  the next ``keep``);
* LUT: teacher (a deep copy in eval mode, no grad) on both full views; student on both
  masked views (``forward_student``), reconstruction + 0.25 x BC loss; MAE: ``forward_mae``
  and the reconstruction loss;
* ``backward``, AdamW (b 0.9/0.95, wd 0.05 on weights of rank >= 2, PyTorch's default
  multi-tensor implementation), the per-step learning rate set by hand as the reference does;
* LUT: EMA of the teacher's parameters and BatchNorm buffers (``torch._foreach_*``, one
  fused call per list rather than the reference's Python loop, which only helps PyTorch).

float32 on CPU, bf16 autocast (parameters float32, as the reference's AMP) with
``--dtype=bfloat16`` on CUDA. Synthetic views live on the device from the start; timed
windows end with one ``torch.cuda.synchronize()``. Prints one JSON line last (the record).
Needs torch and timm (for ``tests/torch_reference.py``) and ml_collections for the config.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # bench_common
import bench_common  # noqa: E402  pylint: disable=g-import-not-at-top

import torch  # noqa: E402  pylint: disable=g-import-not-at-top

import flops  # noqa: E402  pylint: disable=g-import-not-at-top
from lut_jax.models import variants  # noqa: E402  pylint: disable=g-import-not-at-top
from tests import torch_reference as ref  # noqa: E402  pylint: disable=g-import-not-at-top


# The config fields this step reads. An override of any other field (a JAX-only speed lever
# such as model.remat, or math the reference does not have such as model.gelu_approximate)
# leaves this step as it is: the record lists those overrides, so a row is never read as
# the reference running a lever it did not run.
READS = ("model.variant", "model.decoder_width", "model.decoder_depth",
         "model.decoder_num_heads", "model.head_depth", "model.pred_depth",
         "model.head_hidden_dim", "model.head_norm", "model.head_activation", "optim.base_lr",
         "optim.weight_decay", "optim.b1", "optim.b2", "ema.momentum", "loss.w_mae",
         "loss.w_bc", "loss.norm_pix", "loss.mask_ratio", "input.image_size",
         "input.channels", "input.batch_size")


def ignored_overrides(overrides: list[str]) -> list[str]:
  """The ``key=value`` overrides whose key this step does not read (see ``READS``)."""
  return [o for o in overrides if o.partition("=")[0] not in READS]


def load_config(args: argparse.Namespace, method: str):
  """The same config ``scripts/benchmark.py`` builds (no JAX import: no validation here)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = args.config if os.path.isabs(args.config) else str(ROOT / args.config)
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"method={method}" + (f",variant={args.variant}"
                                                    if args.variant else ""))
  config.unlock()
  if args.image_size:
    config.input.image_size = args.image_size
  config.input.batch_size = args.batch
  return bench_common.apply_overrides(config, args.override)


def make_masks(noise: torch.Tensor, mask_ratio: float, two_views: bool):
  """``(keep1, keep2, ids_restore, mask1)`` on ``noise``'s device (the reference's
  ``masks_from_noise`` builds its masks on the CPU)."""
  n, length = noise.shape
  keep = int(length * (1 - mask_ratio))
  ids_shuffle = torch.argsort(noise, dim=1)
  ids_restore = torch.argsort(ids_shuffle, dim=1)
  keep1 = ids_shuffle[:, :keep]
  keep2 = ids_shuffle[:, keep:2 * keep] if two_views else None
  mask1 = torch.ones(n, length, device=noise.device)
  mask1.scatter_(1, keep1, 0.0)
  return keep1, keep2, ids_restore, mask1


def run(args: argparse.Namespace, method: str) -> dict[str, Any]:
  config = load_config(args, method)
  use_bc = config.loss.w_bc > 0
  device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
  amp = args.dtype == "bfloat16" and device.type == "cuda"
  spec = variants.parse_variant(config.model.variant)
  m = config.model
  size, channels, batch = config.input.image_size, config.input.channels, config.input.batch_size
  torch.manual_seed(0)
  student = ref.TorchLUT(size, spec.patch_size, channels, spec.width, spec.depth, spec.num_heads,
                         m.decoder_width, m.decoder_depth, m.decoder_num_heads, use_bc=use_bc,
                         head_depth=m.head_depth, pred_depth=m.pred_depth,
                         head_hidden_dim=m.head_hidden_dim, head_norm=m.head_norm,
                         head_activation=m.head_activation).to(device)
  student.train()
  teacher = None
  if use_bc:
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
  decay = [p for p in student.parameters() if p.ndim > 1]
  no_decay = [p for p in student.parameters() if p.ndim <= 1]
  peak_lr = config.optim.base_lr * batch / 256
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.optim.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=peak_lr, betas=(config.optim.b1, config.optim.b2))
  ema_pairs = []
  if use_bc:
    s_state, t_state = student.state_dict(), teacher.state_dict()
    ema_pairs = [(t_state[k], s_state[k]) for k in t_state if t_state[k].is_floating_point()]
  t_list = [t for t, _ in ema_pairs]
  s_list = [s for _, s in ema_pairs]

  gen = torch.Generator(device=device).manual_seed(1)
  shape = (batch, channels, size, size)
  view1 = torch.randn(shape, generator=gen, device=device)
  view2 = torch.randn(shape, generator=gen, device=device) if use_bc else None
  num_patches = (size // spec.patch_size) ** 2
  total_steps, warmup_steps, tau0 = 100_000, 1_000, config.ema.momentum

  def forward_loss(keep1, keep2, ids_restore, mask1) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
      if use_bc:
        z1, z2 = teacher.forward_teacher(view1, view2)
        out = student.forward_student(view1, view2, keep1, keep2, ids_restore)
        pred = out["pred"]
      else:
        pred = student.forward_mae(view1, keep1, ids_restore)
    loss = config.loss.w_mae * ref.reconstruction_loss(pred.float(), view1, mask1,
                                                       spec.patch_size, config.loss.norm_pix)
    if use_bc:
      loss = loss + config.loss.w_bc * ref.bc_loss(out["q1"].float(), out["q2"].float(),
                                                   z1.float(), z2.float())
    return loss

  if args.compile:
    # What a PyTorch user would run for speed: the forward and the losses compiled (their
    # backward through AOTAutograd); the optimizer and the EMA stay PyTorch's foreach ops.
    forward_loss = torch.compile(forward_loss)

  def step(i: int) -> torch.Tensor:
    lr = peak_lr * (i / warmup_steps if i < warmup_steps else
                    0.5 * (1 + math.cos(math.pi * (i - warmup_steps) /
                                        (total_steps - warmup_steps))))
    for group in opt.param_groups:
      group["lr"] = lr
    noise = torch.rand(batch, num_patches, device=device)
    keep1, keep2, ids_restore, mask1 = make_masks(noise, config.loss.mask_ratio, use_bc)
    loss = forward_loss(keep1, keep2, ids_restore, mask1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if use_bc:
      tau = 1 - (1 - tau0) * (math.cos(math.pi * i / total_steps) + 1) / 2
      with torch.no_grad():
        torch._foreach_mul_(t_list, tau)  # pylint: disable=protected-access
        torch._foreach_add_(t_list, s_list, alpha=1 - tau)  # pylint: disable=protected-access
    return loss

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  rec: dict[str, Any] = {
      "framework": "torch-compile" if args.compile else "torch", "method": method,
      "config": args.config,
      "variant": config.model.variant, "image_size": size, "batch": batch,
      "dtype": "bfloat16-autocast" if amp else "float32", "device": str(device),
      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
      "threads": torch.get_num_threads(), "torch": torch.__version__,
      "num_params": sum(p.numel() for p in student.parameters()),
      "loadavg_start": os.getloadavg()[0],
      "overrides_ignored": ignored_overrides(args.override),
  }
  if rec["overrides_ignored"]:
    print(f"[{rec['framework']}] {method}: the reference step does not implement "
          f"{', '.join(rec['overrides_ignored'])}; it runs without them", file=sys.stderr,
          flush=True)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  start = time.perf_counter()
  for i in range(args.warmup):
    loss = step(i)
  sync()
  rec["warmup_s"] = time.perf_counter() - start
  windows, cpu_windows, faults, i = [], [], [], args.warmup
  for _ in range(args.repeats):
    start, cpu_start = time.perf_counter(), time.process_time()  # CPU: all threads
    faults_start = bench_common.minor_page_faults()
    for _ in range(args.steps):
      loss = step(i)
      i += 1
    sync()
    windows.append(time.perf_counter() - start)
    cpu_windows.append((time.process_time() - cpu_start) / args.steps * 1e3)
    faults.append((bench_common.minor_page_faults() - faults_start) / args.steps)
  # The same fields as scripts/benchmark.py records for ours.
  step_s = bench_common.record_windows(rec, windows, cpu_windows, faults, steps=args.steps,
                                       batch=batch)
  rec["loss_last"] = float(loss.detach())
  shape_ = flops.shape_from_config(config)
  analytic = flops.step_flops(shape_, "lut" if use_bc else "mae")
  rec["analytic_gflop_per_image"] = analytic["model_total"] / 1e9
  rec["model_tflops"] = analytic["model_total"] * batch / step_s / 1e12
  rec["memory"] = ({"peak_bytes_in_use": torch.cuda.max_memory_allocated(device)}
                   if device.type == "cuda" else {})
  rec["loadavg_end"] = os.getloadavg()[0]
  return rec


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/pretrain.py")
  p.add_argument("--variant", default=None)
  p.add_argument("--image_size", type=int, default=None)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--method", choices=("lut", "mae", "both"), default="both")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32",
                 help="bfloat16 = autocast on CUDA; the CPU always runs float32")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=None,
                 help="torch.set_num_threads (default: the usable cores, as XLA's CPU pool)")
  p.add_argument("--device", choices=("auto", "cpu"), default="auto")
  p.add_argument("--compile", action="store_true",
                 help="torch.compile the forward and losses (the warmup steps compile)")
  p.add_argument("--override", action="append", default=[])
  p.add_argument("--json_out", default=None, help="file, or '-' for a last stdout line")
  args = p.parse_args(argv)
  torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
  methods = ("lut", "mae") if args.method == "both" else (args.method,)
  records = []
  for method in methods:
    rec = run(args, method)
    rec["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    rec["host"] = platform.node()
    records.append(rec)
    print(f"[{rec['framework']}] {method}: {rec['images_per_s']:.1f} images/s, "
          f"{rec['ms_per_step']:.2f} ms/step, {rec['threads']} threads", file=sys.stderr,
          flush=True)
    if args.json_out and args.json_out != "-":  # after every method, as benchmark.py does
      with open(args.json_out, "w") as f:
        json.dump(records, f, indent=2)
  if args.json_out == "-":
    print(json.dumps(records[0] if len(records) == 1 else records))


if __name__ == "__main__":
  main()
