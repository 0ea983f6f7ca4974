"""The architecture contract (docs/architecture.md): the layers of ``lut_jax`` only import
downwards and no modules import each other in a cycle (``.importlinter``, checked with
import-linter), and ``lut_jax`` modules are imported inside functions only to guard an
optional dependency."""

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# The packages of the optional extras (setup.py): a function may import the lut_jax module
# that needs one of them, so that the rest works where it is not installed.
OPTIONAL = ("tensorflow", "tensorflow_datasets", "tensorboard", "torch", "timm", "matplotlib",
            "huggingface_hub", "skimage")
_GUARD = re.compile(r"#\s*optional:\s*(\w+)")
# Imports of lut_jax modules inside functions that guard no optional dependency:
# {(file, imported module): why}. At most 5; each hides a dependency from the file's header.
ALLOWED_LOCAL_IMPORTS: dict[tuple[str, str], str] = {}


def _lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
  """import-linter on the ``lut_jax`` under ``root`` with ``root/.importlinter``."""
  script = ("import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports("
            "config_filename='.importlinter', no_cache=True, no_logo=True))")
  return subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})


def test_layers_only_import_downwards_and_no_cycles():
  pytest.importorskip("importlinter")
  result = _lint_imports(REPO)
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_contract_refuses_an_upward_import_and_a_cycle(tmp_path):
  """The contract is not vacuous: on a copy of the package, the model layer importing
  pre-training, and two data modules importing each other, each break it."""
  pytest.importorskip("importlinter")
  shutil.copytree(REPO / "lut_jax", tmp_path / "lut_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(REPO / ".importlinter", tmp_path)
  for module, imported in (("models/vit.py", "lut_jax.pretrain.train"),
                           ("data/idx.py", "lut_jax.data.device_input")):
    with open(tmp_path / "lut_jax" / module, "a") as f:
      f.write(f"\nimport {imported}  # deliberately wrong\n")
  result = _lint_imports(tmp_path)
  assert result.returncode != 0
  assert "lut_jax.models is not allowed to import lut_jax.pretrain" in result.stdout
  assert "No cycles are allowed in lut_jax.data" in result.stdout


def _module_file(module: str) -> pathlib.Path | None:
  base = REPO / module.replace(".", "/")
  for path in (base.with_suffix(".py"), base / "__init__.py"):
    if path.is_file():
      return path
  return None


def _imported_modules(node: ast.AST, package: str) -> list[str]:
  """The lut_jax modules an import statement imports (``from a import b``: ``a.b`` when it
  is a module, else ``a``); relative imports are resolved against ``package``."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name.split(".")[0] == "lut_jax"]
  base = node.module or ""
  if node.level:
    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
    base = ".".join(parent + ([base] if base else []))
  if base.split(".")[0] != "lut_jax":
    return []
  return [f"{base}.{a.name}" if _module_file(f"{base}.{a.name}") else base for a in node.names]


def _parse(path: pathlib.Path) -> tuple[ast.Module, str]:
  module = ".".join(path.relative_to(REPO).with_suffix("").parts)
  package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module[:-9]
  return ast.parse(path.read_text(), str(path)), package


def _top_level_imports(module: str) -> set[str]:
  """Top-level package names ``module`` imports outside functions (lut_jax ones in full)."""
  path = _module_file(module)
  if path is None:
    return set()
  tree, package = _parse(path)
  inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)}
  out = set()
  for node in ast.walk(tree):
    if id(node) in inside or not isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    out.update(_imported_modules(node, package))
    if isinstance(node, ast.Import):
      out.update(a.name.split(".")[0] for a in node.names)
    elif not node.level and node.module:
      out.add(node.module.split(".")[0])
  return out


def _needs(module: str, package: str, seen: set[str] | None = None) -> bool:
  """Whether importing ``module`` imports ``package``, through lut_jax modules' headers."""
  seen = set() if seen is None else seen
  if module in seen:
    return False
  seen.add(module)
  imports = _top_level_imports(module)
  return package in imports or any(_needs(m, package, seen) for m in imports
                                   if m.startswith("lut_jax."))


def _local_imports():
  """``(file, line, imported module, comment)`` of every lut_jax import inside a function;
  the comment is the text after ``#`` on the import's lines or on a comment line above."""
  for path in sorted((REPO / "lut_jax").rglob("*.py")):
    tree, package = _parse(path)
    lines = path.read_text().splitlines()
    seen = set()
    for function in ast.walk(tree):
      if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(function):
        if id(node) in seen or not isinstance(node, (ast.Import, ast.ImportFrom)):
          continue
        seen.add(id(node))
        above = lines[node.lineno - 2].strip()
        text = lines[node.lineno - 1:node.end_lineno] + ([above] if above[:1] == "#" else [])
        comment = " ".join(line.partition("#")[2] for line in text)
        for module in _imported_modules(node, package):
          yield str(path.relative_to(REPO)), node.lineno, module, "#" + comment


def test_imports_inside_functions_only_guard_optional_dependencies():
  assert len(ALLOWED_LOCAL_IMPORTS) <= 5
  bad, used = [], set()
  for path, line, module, comment in _local_imports():
    guard = _GUARD.search(comment)
    if guard and guard[1] in OPTIONAL and _needs(module, guard[1]):
      continue
    if (path, module) in ALLOWED_LOCAL_IMPORTS:
      used.add((path, module))
      continue
    why = (f"{module} does not import {guard[1]}" if guard and guard[1] in OPTIONAL
           else "no '# optional: PACKAGE' comment")
    bad.append(f"{path}:{line}: {module}: {why}")
  assert not bad, ("imports of lut_jax modules inside functions: move them to the file's "
                   "header, or say which optional dependency they guard (PACKAGE one of "
                   f"{', '.join(OPTIONAL)}):\n" + "\n".join(bad))
  assert used == set(ALLOWED_LOCAL_IMPORTS), (
      f"no longer imported inside a function: {set(ALLOWED_LOCAL_IMPORTS) - used}")
