"""The package's import graph has no circle, counting imports made inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlora_jax"


def _module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str) -> bool:
  base = PACKAGE.parent.joinpath(*name.split("."))
  return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
  """``{module: modules of the package it imports}``, from the source (nothing is imported)."""
  graph = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    me, edges = _module_name(path), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        edges |= {a.name for a in node.names if a.name.startswith("vlora_jax")}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vlora_jax"):
        for a in node.names:  # `from pkg import submodule` imports the submodule's file
          sub = f"{node.module}.{a.name}"
          edges.add(sub if _exists(sub) else node.module)
    graph[me] = {e for e in edges if e != me and _exists(e)}
  return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
  """One circle of the graph as a path ``[a, b, ..., a]``, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_the_finder_finds_a_circle():
  assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_imports_inside_functions():
  graph = import_graph()
  assert "vlora_jax.core.stack" in graph["vlora_jax.models"]
  assert "vlora_jax.models.vit" in graph["vlora_jax.models"]


def test_no_import_circle_in_the_package():
  circle = find_circle(import_graph())
  assert circle is None, "import circle: " + " -> ".join(circle)
