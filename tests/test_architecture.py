"""The floors of docs/architecture.md, checked from the source: imports point down, and there is no cycle.

Read with `ast` (nothing is imported), so the check is instant and names the offending import.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "phds_jax"

# docs/architecture.md's table: a module may import its own floor or lower ones.
FLOORS = {
    "paths": 0, "shapes": 0, "sharding": 0, "errors": 0, "console": 0, "timing": 0,
    "kernels": 1,
    "models": 2, "kplan": 2,
    "hf": 3, "checkpoint": 3, "data": 3,
    "training": 4, "evaluation": 4, "serve": 4,
    "experiments": 5,
    "cli": 6, "train": 6, "eval": 6, "convert": 6, "dial_k": 6,
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
  """Module -> the phds_jax modules it imports (a `from pkg import name` counts as pkg.name if that is a
  module, else as pkg)."""
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  out = {}
  for name, path in files.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "phds_jax":
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          deps.add(full if full in files else node.module)
      elif isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name.split(".")[0] == "phds_jax"}
    out[name] = {d for d in deps if d in files and d != name}
  return out


def _floor(module: str) -> int | None:
  parts = module.split(".")
  return FLOORS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_floor():
  unplaced = sorted({m.split(".")[1] for m in _imports() if "." in m and _floor(m) is None})
  assert not unplaced, f"add {unplaced} to docs/architecture.md's floors and to FLOORS here"


def test_imports_point_down():
  up = [f"{m} -> {d}" for m, deps in _imports().items() for d in deps
        if _floor(m) is not None and _floor(d) is not None and _floor(d) > _floor(m)]
  assert not up, "imports from a higher floor:\n" + "\n".join(sorted(up))


def test_no_import_cycle():
  graph = _imports()
  # A package's __init__ re-exporting its own modules is not a cycle: drop package -> submodule edges.
  graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done

  def visit(m: str, path: list[str]) -> None:
    state[m] = 1
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
      if d not in state:
        visit(d, path + [d])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
