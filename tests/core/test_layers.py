"""The layering rules that import-linter cannot see (see ARCHITECTURE.md).

import-linter (``./dev.sh test`` runs ``lint-imports``) checks which module may
import which. This checks what it cannot: no module outside the MQTT adapter (the
package ``agent.runtime.mqtt``) reads or writes another object's private attributes,
where a library's internals would hide.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "agent" / "runtime" / "mqtt"  # a package: every module in it is the adapter
SOURCES = sorted(p for d in ("agent", "simulator") for p in (ROOT / d).rglob("*.py"))


def private_reach(tree: ast.AST) -> list[str]:
    """``x._name`` where ``x`` is not ``self`` or ``cls``: another object's internals."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        found.append(f"line {node.lineno}: .{name}")
    return found


@pytest.mark.parametrize(
    "path", [p for p in SOURCES if ADAPTER not in p.parents], ids=lambda p: p.name
)
def test_no_private_attributes_outside_the_adapter(path: Path) -> None:
    assert private_reach(ast.parse(path.read_text(encoding="utf-8"))) == [], path


def test_the_check_sees_a_reach_into_a_library() -> None:
    tree = ast.parse("client._out_packet.clear()\nself._mine = 1\n")
    assert private_reach(tree) == ["line 1: ._out_packet"]


def test_the_adapter_is_where_internals_are_named() -> None:
    modules = sorted(ADAPTER.glob("*.py"))
    assert any(private_reach(ast.parse(p.read_text(encoding="utf-8"))) for p in modules)
