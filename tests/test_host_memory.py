"""The command-line tools' restart with tuned malloc (lut_jax/runtime/host_memory.py)."""

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from lut_jax.runtime import host_memory

KEEP_MAPPED = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
               "glibc.malloc.trim_threshold=1099511627776")
TUNED = KEEP_MAPPED + ":glibc.malloc.hugetlb=1"
# The machine of most rows: glibc 2.36, huge pages on madvise, no accelerator plug-in.
MACHINE = dict(thp_mode="madvise", glibc=(2, 36), accelerator_plugin=False)


@pytest.mark.parametrize("machine, environ, expected", [
    (MACHINE, {}, TUNED),
    # Other tunables are kept, ours appended; a value the user chose wins.
    (MACHINE, {"GLIBC_TUNABLES": "glibc.rtld.x=2"}, "glibc.rtld.x=2:" + TUNED),
    (MACHINE, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
     "glibc.malloc.hugetlb=0:" + KEEP_MAPPED),
    (MACHINE, {"GLIBC_TUNABLES": TUNED.replace("arena_max=1", "arena_max=4")}, None),  # all chosen
    # glibc's older spellings are the user's choice too; a stray ":" is dropped.
    (MACHINE, {"MALLOC_ARENA_MAX": "4", "MALLOC_TRIM_THRESHOLD_": "0", "GLIBC_TUNABLES": "a=1:"},
     "a=1:glibc.malloc.mmap_max=0:glibc.malloc.hugetlb=1"),
    # Restarted already, or opted out (only "0" opts out).
    (MACHINE, {host_memory.TUNED_ENV: "1"}, None),
    (MACHINE, {host_memory.OPT_OUT_ENV: "0"}, None),
    (MACHINE, {host_memory.OPT_OUT_ENV: "1"}, TUNED),
    # Huge pages only where malloc has to ask for them and can.
    ({**MACHINE, "thp_mode": "always"}, {}, KEEP_MAPPED),
    ({**MACHINE, "thp_mode": "never"}, {}, KEEP_MAPPED),
    ({**MACHINE, "thp_mode": None}, {}, KEEP_MAPPED),  # setting unreadable
    ({**MACHINE, "glibc": (2, 31)}, {}, KEEP_MAPPED),  # hugetlb: 2.35
    ({**MACHINE, "glibc": (2, 17)}, {}, None),  # tunables: 2.26
    ({**MACHINE, "glibc": None}, {}, None),  # musl and others
    # Runs on an accelerator: glibc's defaults.
    ({**MACHINE, "accelerator_plugin": True}, {}, None),
    ({**MACHINE, "accelerator_plugin": True}, {"JAX_PLATFORMS": "cpu"}, TUNED),
    (MACHINE, {"JAX_PLATFORMS": "cuda,cpu"}, None),
    # Plug-ins JAX loads from a path in the environment.
    (MACHINE, {"PJRT_NAMES_AND_LIBRARY_PATHS": "cuda:/opt/pjrt_cuda.so"}, None),
    (MACHINE, {"TPU_LIBRARY_PATH": "/lib/libtpu.so"}, None),
])
def test_when_the_tools_restart(machine, environ, expected):
  env = host_memory.tuned_environment({"PATH": "/bin", **environ}, **machine)
  if expected is None:
    assert env is None
  else:
    assert env["GLIBC_TUNABLES"] == expected
    assert env["PATH"] == "/bin" and env[host_memory.TUNED_ENV] == "1"


def test_the_restarted_process_says_it_is_tuned(monkeypatch):
  monkeypatch.delenv(host_memory.TUNED_ENV, raising=False)
  assert host_memory.applied_tuning_note() is None
  monkeypatch.setenv(host_memory.TUNED_ENV, "1")
  monkeypatch.setenv("GLIBC_TUNABLES", TUNED)
  note = host_memory.applied_tuning_note()
  assert TUNED in note and f"{host_memory.OPT_OUT_ENV}=0" in note


def test_accelerator_plugins_are_found_where_jax_looks(tmp_path, monkeypatch):
  if host_memory.accelerator_plugin_installed():
    pytest.skip("this machine has an accelerator plug-in installed")
  plugin = tmp_path / "jax_plugins" / "xla_someaccelerator"
  plugin.mkdir(parents=True)
  monkeypatch.syspath_prepend(str(tmp_path))
  assert not host_memory.accelerator_plugin_installed()  # a folder, not yet a module
  (plugin / "__init__.py").write_text("")  # a namespace-package plug-in, as JAX's CUDA one
  importlib.invalidate_caches()
  assert host_memory.accelerator_plugin_installed()


def test_tpu_and_entry_point_plugins_count_as_accelerators(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name: object() if name == "libtpu" else real_find_spec(name))
  assert host_memory.accelerator_plugin_installed()
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name: None if name in ("libtpu", "jax_plugins") else
                      real_find_spec(name))
  monkeypatch.setattr(importlib.metadata, "entry_points",
                      lambda group: ["xla_cuda"] if group == "jax_plugins" else [])
  assert host_memory.accelerator_plugin_installed()
  monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
  assert not host_memory.accelerator_plugin_installed()


@pytest.fixture
def machine_where_it_helps(monkeypatch):
  """Linux, glibc 2.36, transparent huge pages on madvise, no accelerator plug-in, started
  with glibc's defaults."""
  monkeypatch.setattr(host_memory, "transparent_huge_page_mode", lambda: "madvise")
  monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
  monkeypatch.setattr(host_memory, "accelerator_plugin_installed", lambda: False)
  monkeypatch.setattr(sys, "platform", "linux")
  for name in ("GLIBC_TUNABLES", host_memory.TUNED_ENV, host_memory.OPT_OUT_ENV, "JAX_PLATFORMS",
               *host_memory.ACCELERATOR_ENV, *host_memory.ALIASES.values()):
    monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("machine_where_it_helps")
def test_the_restart_replaces_the_process_with_the_same_command(monkeypatch):
  monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "utf8", "/bin/lut-pretrain", "--a=b"])
  calls = []
  monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
  host_memory.restart_with_tuned_malloc()
  (path, argv, env), = calls
  assert path == sys.executable
  assert argv == [sys.executable, "-X", "utf8", "/bin/lut-pretrain", "--a=b"]
  assert env["GLIBC_TUNABLES"] == TUNED


@pytest.mark.usefixtures("machine_where_it_helps")
def test_a_failed_restart_goes_on_without_it(monkeypatch, capsys):
  def refuse(*_):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(os, "execve", refuse)
  host_memory.restart_with_tuned_malloc()  # returns instead of raising
  assert f"could not restart with GLIBC_TUNABLES={TUNED}" in capsys.readouterr().err


@pytest.mark.usefixtures("machine_where_it_helps")
def test_a_process_started_without_the_tuning_is_told_how_to_get_it(monkeypatch):
  assert f"GLIBC_TUNABLES={TUNED} " in host_memory.missing_tuning_note()
  monkeypatch.setenv("GLIBC_TUNABLES", TUNED)
  assert host_memory.missing_tuning_note() is None
  monkeypatch.setattr(host_memory, "accelerator_plugin_installed", lambda: True)
  monkeypatch.delenv("GLIBC_TUNABLES")
  assert host_memory.missing_tuning_note() is None


CHILD = textwrap.dedent("""
    import json, os, sys
    from lut_jax.runtime import host_memory
    print("started", os.getpid(), flush=True)
    host_memory.restart_with_tuned_malloc()
    print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:],
                      "prefix": sys.prefix, "pid": os.getpid()}))
""")


def test_the_restart_keeps_arguments_interpreter_and_pid(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_memory.TUNED_ENV, *host_memory.ALIASES.values())}
  # On Linux with glibc >= 2.26, no accelerator in sight and no opt-out, it restarts.
  glibc = host_memory.glibc_version()
  restarts = (sys.platform.startswith("linux") and glibc is not None and glibc >= (2, 26)
              and not host_memory.accelerator_plugin_installed()
              and env.get("JAX_PLATFORMS", "cpu").startswith("cpu")
              and not any(env.get(name) for name in host_memory.ACCELERATOR_ENV)
              and env.get(host_memory.OPT_OUT_ENV) != "0")
  out = subprocess.run([sys.executable, str(script), "--config=x y", "-v"], env=env,
                       capture_output=True, text=True, check=True, timeout=60).stdout
  lines = out.splitlines()
  record = json.loads(lines[-1])
  started = [line for line in lines if line.startswith("started ")]
  assert {int(line.split()[1]) for line in started} == {record["pid"]}  # the same process
  assert record["argv"] == ["--config=x y", "-v"]
  assert record["prefix"] == sys.prefix  # the same (virtual) environment
  if restarts:
    assert len(started) == 2  # it ran once more, in the same process
    assert "glibc.malloc.arena_max=1" in record["tunables"]
  else:
    assert len(started) == 1 and record["tunables"] is None


PAGE_FAULTS = textwrap.dedent("""
    import resource, jax, jax.numpy as jnp
    double = jax.jit(lambda x: x * 2)
    x = jnp.ones((16 * 1024 * 1024,), jnp.float32)  # a 64 MiB result, allocated per call
    for _ in range(20):  # with the heap kept, until it holds every result still in flight
      double(x).block_until_ready()
    per_call = []
    for _ in range(10):  # windows of 5 calls; the quietest one counts (other load can
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # delay frees)
      for _ in range(5):
        double(x).block_until_ready()
      per_call.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
    print(min(per_call))
""")


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and (host_memory.glibc_version() or (0, 0)) >= (2, 26)),
    reason="needs Linux with glibc >= 2.26")
def test_tuned_malloc_keeps_xla_buffers_mapped_between_calls():
  """What the restart is for: XLA's per-call buffers stop costing a page fault per page."""
  faults = {}
  for name, tunables in (("default", ""), ("kept mapped", KEEP_MAPPED)):
    env = {**os.environ, "GLIBC_TUNABLES": tunables, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    faults[name] = float(out.split()[-1])
  # glibc's defaults: the result is mapped afresh per call, a fault per page (4 KiB, or
  # 2 MiB where transparent huge pages are "always").
  assert faults["default"] >= 64 * 1024 // 2048, faults
  assert faults["kept mapped"] < 2, faults  # the heap's pages are reused
