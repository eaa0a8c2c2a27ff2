"""The import rules of docs/ARCHITECTURE.md, read from the source with ``ast`` (nothing is imported).

- ``lora_core`` imports nothing from ``sweeps`` or ``dashboards``;
- ``dashboards`` imports no CLI (``sweeps.cli``), and reads a study through the read-only module,
  never through the sweep loop or the trainer;
- nothing in ``sweeps`` outside ``sweeps.cli`` and ``sweeps.api`` (the command line, and the Python API it is
  built on) imports ``dashboards``; ``dashboards`` does not import ``sweeps.api``; ``sweeps.api`` does not
  import ``sweeps.cli``;
- ``sweeps.config`` (what a sweep is) imports only the shared leaf modules, not what runs a sweep;
- no import cycles between modules, inside one package too: lazy imports inside functions count, and so do
  ``if TYPE_CHECKING:`` ones (two modules that need each other's types are one module, or share a third),
  and so does a module's import of names from its own package's ``__init__`` (which runs that
  ``__init__``, a cycle when the ``__init__`` imports the module);
- no ``from x import _private`` across modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_core", "sweeps", "dashboards")
LEAVES = ("sweeps.names", "sweeps.text", "sweeps.secrets", "sweeps.stats", "sweeps.journal")
FRONT_DOORS = ("sweeps.cli", "sweeps.api")  # the command line and the Python API: they may import dashboards
LOOP = ("sweeps.engine.loop", "sweeps.engine.trial", "sweeps.engine.workers", "sweeps.engine.recovery",
        "sweeps.engine.parent", "sweeps.engine.liveness", "sweeps.training")


@dataclass(frozen=True)
class Import:
    source: str         # the importing module
    target: str         # the imported module (for ``from m import n``: m.n when that is a module, else m)
    names: tuple[str, ...]
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules(root: Path = REPO) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` (``if TYPE_CHECKING:`` bodies included)."""
    for child in ast.iter_child_nodes(node):
        yield child
        yield from _walk(child)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(name, a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = tuple(a.name for a in node.names)
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            out += [Import(name, m, (), node.lineno) for m in submodules]
            rest = tuple(n for n in names if f"{base}.{n}" not in modules)
            if rest or not submodules:
                out.append(Import(name, base, rest, node.lineno))
    return out


def project_imports(root: Path = REPO) -> list[Import]:
    modules = all_modules(root)
    return [i for name, path in modules.items() for i in imports_of(name, path, modules)
            if i.target.split(".")[0] in PACKAGES]


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(imports: list[Import], modules: dict[str, Path]) -> list[str]:
    bad = []
    for i in imports:
        where = f"{i.source}:{i.line} imports {i.target}"
        if within(i.source, "lora_core") and not within(i.target, "lora_core"):
            bad.append(f"{where}: lora_core stands alone")
        if within(i.source, "dashboards") and within(i.target, "sweeps.cli"):
            bad.append(f"{where}: dashboards must not import a CLI")
        if within(i.source, "dashboards") and any(within(i.target, m) for m in LOOP):
            bad.append(f"{where}: dashboards read studies with sweeps.engine.readonly, not the loop")
        if within(i.source, "sweeps") and not any(within(i.source, m) for m in FRONT_DOORS) \
                and within(i.target, "dashboards"):
            bad.append(f"{where}: only sweeps.cli and sweeps.api may import dashboards")
        if within(i.source, "dashboards") and within(i.target, "sweeps.api"):
            bad.append(f"{where}: dashboards must not import the Python API")
        if within(i.source, "sweeps.api") and within(i.target, "sweeps.cli"):
            bad.append(f"{where}: the Python API must not import the CLI (the CLI is built on it)")
        if within(i.source, "sweeps.config") and within(i.target, "sweeps") and \
                not within(i.target, "sweeps.config") and i.target not in LEAVES:
            bad.append(f"{where}: sweeps.config imports only the leaf modules {', '.join(LEAVES)}")
        private = [n for n in i.names if n.startswith("_") and not n.startswith("__")]
        if private and i.target != i.source:
            bad.append(f"{where}: private name(s) {', '.join(private)} across modules")
    return bad + [f"import cycle: {' -> '.join(c)}" for c in cycles(imports, modules)]


def cycles(imports: list[Import], modules: dict[str, Path]) -> list[list[str]]:
    """One cycle per strongly connected component of the module graph with more than one module."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        target = i.target
        while target and target not in modules:  # an attribute of a module: its module
            target = target.rpartition(".")[0]
        if target and target != i.source:  # (an edge to its own package: ``from package import name``)
            graph[i.source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_rules_hold() -> None:
    modules = all_modules()
    assert "sweeps.engine.readonly" in modules and "lora_core.io" in modules  # the walk found the tree
    assert violations(project_imports(), modules) == []


# ----------------------------------------------------------------------------- the checker catches faults


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"lora_core/__init__.py": "", "sweeps/__init__.py": "", "dashboards/__init__.py": "",
                      **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "expected"), [
    pytest.param({"lora_core/io.py": "from sweeps.names import KIND_TAG\n", "sweeps/names.py": ""},
                 "lora_core stands alone", id="lora_core-imports-sweeps"),
    pytest.param({"sweeps/cli/__init__.py": "", "sweeps/cli/report.py": "",
                  "dashboards/report.py": "def f():\n    from sweeps.cli import report\n"},
                 "dashboards must not import a CLI", id="dashboards-imports-cli"),
    pytest.param({"sweeps/engine/__init__.py": "", "sweeps/engine/loop.py": "",
                  "dashboards/collect.py": "from sweeps.engine.loop import run_sweep\n"},
                 "not the loop", id="dashboards-reads-through-the-loop"),
    pytest.param({"sweeps/engine/__init__.py": "", "sweeps/engine/loop.py": "import dashboards.report\n",
                  "dashboards/report.py": ""},
                 "only sweeps.cli and sweeps.api may import dashboards", id="engine-imports-dashboards"),
    pytest.param({"sweeps/api/__init__.py": "", "sweeps/api/verbs.py": "",
                  "dashboards/report.py": "def f():\n    from sweeps.api import verbs\n"},
                 "dashboards must not import the Python API", id="dashboards-imports-api"),
    pytest.param({"sweeps/cli/__init__.py": "", "sweeps/cli/sweep.py": "", "sweeps/api/__init__.py": "",
                  "sweeps/api/running.py": "from sweeps.cli.sweep import run\n"},
                 "the Python API must not import the CLI", id="api-imports-cli"),
    pytest.param({"sweeps/config/__init__.py": "", "sweeps/training/__init__.py": "",
                  "sweeps/config/sweep.py": "from sweeps.training.evaluate import objective_of\n",
                  "sweeps/training/evaluate.py": ""},
                 "sweeps.config imports only", id="config-imports-training"),
    pytest.param({"sweeps/models/__init__.py": "",
                  "sweeps/models/load.py": "from sweeps.models.builtin import BUILTIN\n",
                  "sweeps/models/builtin.py": "def f():\n    from sweeps.models.load import dtype_kwarg\n"},
                 "import cycle: sweeps.models.builtin -> sweeps.models.load", id="lazy-cycle"),
    pytest.param({"lora_core/model.py": "", "lora_core/io.py": "from lora_core.model import _check_name\n"},
                 "private name(s) _check_name", id="private-import"),
])
def test_each_rule_catches_its_fault(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    root = _tree(tmp_path, files)
    modules = all_modules(root)
    found = violations(project_imports(root), modules)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize("files", [
    pytest.param({"sweeps/a.py": "from sweeps.b import B\n",
                  "sweeps/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sweeps.a import A\n"},
                 id="type-checking-import"),
    pytest.param({"sweeps/export/__init__.py": "from sweeps.export.exporter import export_trial\n",
                  "sweeps/export/exporter.py": "from sweeps.export import Echo\n"},
                 id="through-the-package-init"),
    pytest.param({"sweeps/export/__init__.py": "", "sweeps/export/a.py": "from sweeps.export.b import f\n",
                  "sweeps/export/b.py": "from sweeps.export.c import g\n",
                  "sweeps/export/c.py": "def g():\n    import sweeps.export.a\n"},
                 id="three-modules-one-lazy"),
])
def test_a_cycle_inside_one_package_is_caught(tmp_path: Path, files: dict[str, str]) -> None:
    root = _tree(tmp_path, files)
    found = violations(project_imports(root), all_modules(root))
    assert [v for v in found if v.startswith("import cycle:")], found


def test_a_package_init_importing_its_modules_is_no_cycle(tmp_path: Path) -> None:
    """``lora_core/__init__.py`` re-exports its modules' names: not a cycle while none imports the package."""
    root = _tree(tmp_path, {"lora_core/__init__.py": "from lora_core.io import load\nfrom lora_core.model import m\n",
                            "lora_core/io.py": "from lora_core.model import m\n", "lora_core/model.py": ""})
    assert violations(project_imports(root), all_modules(root)) == []


def test_a_cycle_added_to_the_real_tree_is_caught(tmp_path: Path) -> None:
    """The project's own tree, copied, with one lazy import added inside ``sweeps.export`` that closes a cycle
    (the exporter imports the card): the check fails on it, and passes on the copy without it."""
    import shutil

    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(project_imports(tmp_path), all_modules(tmp_path)) == []
    card = tmp_path / "sweeps" / "export" / "card.py"
    card.write_text(card.read_text() + "\n\ndef _scratch() -> None:\n    from sweeps.export.exporter import export_trial\n")
    found = violations(project_imports(tmp_path), all_modules(tmp_path))
    assert found == ["import cycle: sweeps.export.card -> sweeps.export.exporter"], found
