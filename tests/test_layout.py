"""The package's layering: no two subpackages import each other, and the kinds registry agrees with the
self-contained modeling file (which cannot import the package)."""

import ast
from pathlib import Path

import factorconv
from factorconv.kinds import KINDS
from factorconv.modeling import configuration_factorconv, modeling_factorconv

PACKAGE = Path(factorconv.__file__).parent


def _runtime_imports(tree: ast.AST) -> list[ast.ImportFrom]:
    """`from ... import` statements outside `if TYPE_CHECKING:` blocks (those never run)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def _subpackage_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        here = list(parts if path.name == "__init__.py" else parts[:-1])
        for node in _runtime_imports(ast.parse(path.read_text())):
            if node.level:
                target = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("factorconv."):
                target = node.module.split(".")
            else:
                continue
            if len(parts) > 1 and len(target) > 1 and target[1] != parts[1]:
                edges.setdefault(parts[1], set()).add(target[1])
    return edges


def test_no_two_subpackages_import_each_other():
    edges = _subpackage_edges()
    assert "evaluate" in edges["convert"] and "kinds" in edges["convert"]  # the walk sees real imports
    both_ways = sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets if a in edges.get(b, ())})
    assert both_ways == []


def test_every_kind_names_its_modeling_class_and_config_kind():
    assert tuple(KINDS) == configuration_factorconv.ATTENTION_KINDS
    for name, kind in KINDS.items():
        assert modeling_factorconv.ATTENTION_CLASSES[name].__name__ == kind.modeling_class
