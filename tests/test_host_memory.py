"""The command-line tools' restart with huge-page malloc (lut_jax/host_memory.py)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lut_jax import host_memory

# Whether a restart helps on this machine, by the module's own rule.
HELPS = host_memory.environment_with_huge_pages(
    {}, host_memory.transparent_huge_page_mode(), host_memory.glibc_version()) is not None


@pytest.mark.parametrize("thp, glibc, environ, expected", [
    ("madvise", (2, 36), {}, "glibc.malloc.hugetlb=1"),
    # Other tunables are kept, ours appended.
    ("madvise", (2, 36), {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    # The user's own value (the opt-out) wins.
    ("madvise", (2, 36), {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, None),
    ("madvise", (2, 36), {host_memory.RESTARTED_ENV: "1"}, None),  # restarted already
    ("always", (2, 36), {}, None),  # huge pages without asking
    ("never", (2, 36), {}, None),  # none to ask for
    (None, (2, 36), {}, None),  # no such setting (not Linux, a container hiding it)
    ("madvise", (2, 31), {}, None),  # the tunable is new in glibc 2.35
    ("madvise", None, {}, None),  # musl and other C libraries
])
def test_when_the_tools_restart(thp, glibc, environ, expected):
  env = host_memory.environment_with_huge_pages({"PATH": "/bin", **environ}, thp, glibc)
  if expected is None:
    assert env is None
  else:
    assert env["GLIBC_TUNABLES"] == expected
    assert env["PATH"] == "/bin" and env[host_memory.RESTARTED_ENV] == "1"


@pytest.fixture
def machine_where_it_helps(monkeypatch):
  """Linux, glibc 2.36, transparent huge pages on madvise, started without the tunable."""
  monkeypatch.setattr(host_memory, "transparent_huge_page_mode", lambda: "madvise")
  monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv(host_memory.RESTARTED_ENV, raising=False)


@pytest.mark.usefixtures("machine_where_it_helps")
def test_the_restart_replaces_the_process_with_the_same_command(monkeypatch):
  monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "utf8", "/bin/lut-pretrain", "--a=b"])
  calls = []
  monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
  host_memory.restart_with_huge_page_malloc()
  (path, argv, env), = calls
  assert path == sys.executable
  assert argv == [sys.executable, "-X", "utf8", "/bin/lut-pretrain", "--a=b"]
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.usefixtures("machine_where_it_helps")
def test_a_failed_restart_goes_on_without_it(monkeypatch, capsys):
  def refuse(*_):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(os, "execve", refuse)
  host_memory.restart_with_huge_page_malloc()  # returns instead of raising
  assert "could not restart with glibc.malloc.hugetlb=1" in capsys.readouterr().err


@pytest.mark.usefixtures("machine_where_it_helps")
def test_a_process_started_without_the_tunable_is_told_how_to_get_it(monkeypatch):
  assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in host_memory.missing_huge_pages_note()
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  assert host_memory.missing_huge_pages_note() is None
  monkeypatch.setattr(host_memory, "transparent_huge_page_mode", lambda: "always")
  monkeypatch.delenv("GLIBC_TUNABLES")
  assert host_memory.missing_huge_pages_note() is None


CHILD = textwrap.dedent("""
    import json, os, sys
    from lut_jax import host_memory
    print("started", os.getpid(), flush=True)
    host_memory.restart_with_huge_page_malloc()
    print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:],
                      "prefix": sys.prefix, "pid": os.getpid()}))
""")


def test_the_restart_keeps_arguments_interpreter_and_pid(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_memory.RESTARTED_ENV)}
  out = subprocess.run([sys.executable, str(script), "--config=x y", "-v"], env=env,
                       capture_output=True, text=True, check=True, timeout=60).stdout
  lines = out.splitlines()
  record = json.loads(lines[-1])
  started = [line for line in lines if line.startswith("started ")]
  assert {int(line.split()[1]) for line in started} == {record["pid"]}  # the same process
  assert record["argv"] == ["--config=x y", "-v"]
  assert record["prefix"] == sys.prefix  # the same (virtual) environment
  if HELPS:
    assert len(started) == 2  # it ran once more, in the same process
    assert record["tunables"] == "glibc.malloc.hugetlb=1"
  else:
    assert len(started) == 1 and record["tunables"] is None


PAGE_FAULTS = textwrap.dedent("""
    import resource, jax, jax.numpy as jnp
    double = jax.jit(lambda x: x * 2)
    x = jnp.ones((16 * 1024 * 1024,), jnp.float32)  # a 64 MiB result, allocated per call
    for _ in range(2):
      double(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      double(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


@pytest.mark.skipif(not HELPS, reason="needs glibc >= 2.35 and transparent huge pages on "
                                      "madvise")
def test_huge_page_malloc_removes_most_page_faults_of_xla_buffers():
  """What the restart is for: XLA's per-call buffers stop costing a fault per 4 KiB."""
  faults = {}
  for value in (0, 1):
    env = {**os.environ, "GLIBC_TUNABLES": f"glibc.malloc.hugetlb={value}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS], env=env, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    faults[value] = float(out.split()[-1])
  assert faults[0] > 0.5 * 64 * 1024 // 4  # about one per 4 KiB page of the result
  assert faults[1] < faults[0] / 4, faults
