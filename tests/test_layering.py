"""The core never imports a role or the CLI (DESIGN §7): roles import the core, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "swarmtune"
# cli and demo know every role; the three roles know only the core.
ROLES = ("swarmtune.coordinator", "swarmtune.worker", "swarmtune.client", "swarmtune.cli", "swarmtune.demo")


def is_within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def core_files() -> list[Path]:
    role_dirs = {PACKAGE / role.split(".")[1] for role in ROLES}
    entry_point = PACKAGE / "__main__.py"  # `python -m swarmtune` is the CLI's, not the core's
    return [p for p in PACKAGE.rglob("*.py") if p != entry_point and not any(d in p.parents for d in role_dirs)]


def test_core_does_not_import_roles() -> None:
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(m for m in imported_modules(path) if is_within(m, ROLES))
        for path in core_files()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_roles_do_not_import_each_other() -> None:
    for role in ROLES[:3]:
        folder = PACKAGE / role.split(".")[1]
        others = tuple(r for r in ROLES if r != role)
        for path in folder.rglob("*.py"):
            bad = sorted(m for m in imported_modules(path) if is_within(m, others))
            assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"
