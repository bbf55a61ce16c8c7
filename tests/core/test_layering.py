"""The package's shape (DESIGN §7): the core never imports a role or the CLI, roles import the core, only
the backends' registry reaches a backend, no import cycle, and the demo lives in demo/ (cli/ has its command).

An import counts wherever it stands (in a function, under TYPE_CHECKING): a deferred import is still a
dependency, and deferring one would hide a cycle from the interpreter, not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "swarmtune"
# cli and demo know every role; the three roles know only the core.
ROLES = ("swarmtune.coordinator", "swarmtune.worker", "swarmtune.client", "swarmtune.cli", "swarmtune.demo")


def is_within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """What a file imports: `from a import b` names the module a.b when there is one, else a;
    relative imports are resolved against the file's package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            anchor = parts[: len(parts) + 1 - node.level] if node.level else []
            base = ".".join([*anchor, node.module] if node.module else anchor)
            names.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names)
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


def test_only_the_backends_import_a_backend() -> None:
    """The HF backend (generation, hooks, tokenization) is reached through the registry, by name."""
    backends = PACKAGE / "backends"
    offenders = {
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if backends not in path.parents and "swarmtune.backends.hf" in imported_modules(path)
    }
    assert offenders == set()
    assert "swarmtune.backends.hf" not in imported_modules(backends / "registry.py")  # imported by name, on use


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (its modules, the first again at the end), or [] when the graph has none."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> list[str]:
        visiting.append(module)
        for imported in sorted(graph[module]):
            if imported in visiting:
                return visiting[visiting.index(imported) :] + [imported]
            if imported not in done and (cycle := visit(imported)):
                return cycle
        done.add(visiting.pop())
        return []

    for module in sorted(graph):
        if module not in done and (cycle := visit(module)):
            return cycle
    return []


def test_no_import_cycle() -> None:
    graph = {name: imported_modules(path) & (MODULES.keys() - {name}) for name, path in MODULES.items()}
    assert "swarmtune.backends.perturbation" in graph["swarmtune.backends.hf"]  # `from a import b` resolved
    assert "swarmtune.wire.ledger_pb2" in graph["swarmtune.wire.service_pb2"]  # relative imports resolved
    assert find_cycle(graph) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_the_demo_is_one_command_in_the_cli() -> None:
    assert sorted(path.name for path in (PACKAGE / "cli").glob("demo_*")) == ["demo_cmd.py"]
