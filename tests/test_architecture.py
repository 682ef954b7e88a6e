"""Imports run one way: cli -> engine / runs / integrations -> analysis -> methods -> losses /
prototypes / models / data / diagnostics -> config -> utils. Every import statement of the package is read (those
inside functions too), so a lazy import cannot hide an import that runs back up."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "nocollapse"

# A top-level module or sub-package may import only those of a lower rank (or itself).
RANKS = {
    "utils": 0, "version": 0,
    "config": 1,
    "data": 2, "models": 2, "losses": 2, "prototypes": 2, "diagnostics": 2,
    "evaluation": 3,
    "methods": 4,
    "analysis": 5,
    "engine": 6, "runs": 6, "integrations": 6,
    "cli": 7,
}
# The package's __init__ is the public facade: it imports the built-in plugins to register them.
FACADE = PACKAGE / "__init__.py"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, package_dir: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module) of every nocollapse import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path, package_dir).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "nocollapse"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "nocollapse":
                continue
            if node.module is None or target.count(".") == 0:   # `from . import x` / `from .. import y`
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _files(package: Path = PACKAGE):
    return sorted(p for p in package.rglob("*.py") if p != package / "__init__.py")


def upward_imports(package: Path = PACKAGE) -> list[str]:
    wrong = []
    for path in _files(package):
        src = _unit(_module_name(path, package))
        for line, target in _imports(path, package):
            dst = _unit(target)
            where = path.relative_to(package).as_posix()
            if dst is None:
                wrong.append(f"{where}:{line} imports the package facade ({target})")
            elif dst != src and RANKS.get(dst, 99) >= RANKS.get(src, -1):
                wrong.append(f"{where}:{line} imports {target} ({src} rank {RANKS.get(src)} -> "
                             f"{dst} rank {RANKS.get(dst)})")
    return wrong


def test_every_unit_has_a_rank():
    units = {_unit(_module_name(p)) for p in _files()}
    assert units <= set(RANKS), f"give these a rank: {sorted(units - set(RANKS))}"


def test_imports_run_one_way():
    wrong = upward_imports()
    assert not wrong, "imports that run back up:\n" + "\n".join(wrong)


def test_no_module_import_cycle():
    modules = {_module_name(p): p for p in [*_files(), FACADE]}

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]    # `from pkg.mod import name`: the module
        return target or None

    graph = {m: {r for _, t in _imports(p) if (r := resolve(t)) and r != m and r != "nocollapse"}
             for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_import_that_runs_back_up(tmp_path):
    """The test above can fail: a lazy import of the engine inside a loss function is found."""
    fake = tmp_path / "nocollapse"
    for unit in ("losses", "engine"):
        (fake / unit).mkdir(parents=True)
        (fake / unit / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "losses" / "bad.py").write_text("def f():\n    from ..engine import trainer\n    return trainer\n")
    (fake / "engine" / "fine.py").write_text("from ..losses import bad\n")
    assert upward_imports(fake) == ["losses/bad.py:2 imports nocollapse.engine "
                                    "(losses rank 2 -> engine rank 6)"]
