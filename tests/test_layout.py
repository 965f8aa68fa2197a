"""The module layout: no import circle among veil's modules, and the library below the CLI.

Every import counts, also those inside functions (a lazy import hides a circle, it does not
remove it), except those under ``if TYPE_CHECKING:``, which never run. An import of ``veil.a.b`` is an edge to that module only, not to the package
``veil.a``: a package's ``__init__`` that imports its own submodules is not a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import veil

SRC = Path(veil.__file__).resolve().parent
CLI_MODULES = {"veil.cli", "veil.__main__", "veil.sweep_cli", "veil.defenses.cli"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = ["veil", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return {m for m in found if m in mods and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_typing_only_imports_are_not_edges(tmp_path):
    code = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from veil.b import X\nimport veil.c\n"
    (tmp_path / "a.py").write_text(code)
    assert _imports("veil.a", tmp_path / "a.py", {"veil.a": tmp_path, "veil.b": tmp_path, "veil.c": tmp_path}) == {"veil.c"}


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = _graph()
    assert "veil.experiment" in graph["veil.cli"]  # a module-level import
    assert "veil.models.loading" in graph["veil.attacks.reference"]  # an import inside a function
    assert len(graph) > 40


def test_no_import_circle_among_veil_modules():
    assert _circles(_graph()) == []


def test_no_file_under_attacks_is_much_over_500_lines():
    sizes = {p.relative_to(SRC).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in (SRC / "attacks").rglob("*.py")}
    assert {k: n for k, n in sizes.items() if n > 600} == {}


def test_library_modules_do_not_import_the_command_line():
    graph = _graph()
    offenders = {m: sorted(graph[m] & CLI_MODULES) for m in graph if m not in CLI_MODULES and graph[m] & CLI_MODULES}
    assert offenders == {}


def test_defenses_and_attacks_read_runs_through_the_loading_modules():
    graph = _graph()
    readers = [m for m in graph if m.startswith(("veil.defenses", "veil.attacks", "veil.report"))]
    assert readers
    offenders = {m: "veil.experiment" for m in readers if "veil.experiment" in graph[m]}
    assert offenders == {}


def test_training_hooks_see_a_step_context_not_the_trainer():
    """Every ``TrainHook`` in the library gets a ``StepContext``: no module that defines a hook
    names ``Trainer``, nor a private attribute of it (``_forward``, ``use_amp``, ...)."""
    hook_modules = [p for p in SRC.rglob("*.py") if "(TrainHook)" in p.read_text(encoding="utf-8")]
    assert len(hook_modules) >= 2  # the multinomial attack and the compression augmentation
    for path in hook_modules:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert "Trainer" not in names, path
        trainer_only = {"_forward", "use_amp", "global_step", "checkpoint_path", "scheduler"}
        assert not attrs & trainer_only, (path, attrs & trainer_only)
