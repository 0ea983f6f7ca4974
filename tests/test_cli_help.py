"""``--help`` of every console script lists the tool's own flags.

absl lists the flags of the module that ``sys.argv[0]`` names; for a console script that is
the generated wrapper, so each test calls the entry point's function the way the wrapper
does, in a fresh interpreter.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The flags each tool's --help must show (--debug comes from errors.run_app).
KEY_FLAGS = {
    "lut-pretrain": ["--config", "--workdir", "--distributed", "--adopt_checkpoint", "--debug"],
    "lut-eval": ["--config", "--workdir", "--distributed", "--debug"],
    "lut-export": ["--workdir", "--step", "--out", "--timm", "--debug"],
    "lut-analyze": ["--checkpoint", "--out", "--images", "--labels", "--probe", "--debug"],
}


def _console_scripts() -> dict[str, tuple[str, str]]:
  """``{script: (module, function)}`` as setup.py declares them."""
  with open(os.path.join(ROOT, "setup.py")) as f:
    text = f.read()
  return {name: (module, fn)
          for name, module, fn in re.findall(r'"(lut-[\w-]+)=([\w.]+):(\w+)"', text)}


def test_every_console_script_is_checked():
  assert set(_console_scripts()) == set(KEY_FLAGS)


@pytest.mark.parametrize("script", sorted(KEY_FLAGS))
def test_help_lists_the_flags(script):
  module, fn = _console_scripts()[script]
  code = (f"import sys; from {module} import {fn}; sys.argv = [{script!r}, '--help']; "
          f"{fn}()")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300, check=False)
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  for flag in KEY_FLAGS[script]:
    # absl writes "  --name: help" ("  --[no]name: help" for a boolean).
    pattern = rf"^\s+--(\[no\])?{re.escape(flag[2:])}:"
    assert re.search(pattern, result.stdout, re.MULTILINE), (
        f"{script} --help does not list {flag}:\n{result.stdout[-3000:]}")
