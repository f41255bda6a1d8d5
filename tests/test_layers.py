"""The package's imports read as its layers: no circle between modules, and no import from a lower layer to
a higher one but the one written below. Read from the source (deferred imports inside functions
included), so a shortcut taken in a function body counts as much as one at the top of a file."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import tensorsplit

PACKAGE = Path(tensorsplit.__file__).parent

# bottom first: a module may import from its own layer and from the layers before it
LAYERS = ["errors", "messages", "models", "devices", "kernels", "model", "spec", "comm", "plan", "coordinator", "worker",
          "launcher", "report", "server", "api", "cli", "__init__", "__main__"]
# lower -> higher imports allowed, each with its reason
UPWARD = {
    ("worker.__main__", "cli"): "under plain torchrun the worker entry point parses the same command line as "
                                "`tensorsplit` (README: Under torchrun)",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name or "__init__"] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports (names relative to the package: "worker.main")."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1] if node.level > 1 else package
                    base = base + (node.module.split(".") if node.module else [])
                elif node.module and node.module.startswith("tensorsplit"):
                    base = node.module.split(".")[1:]
                else:
                    continue
                subs = [".".join(base + [a.name]) for a in node.names if ".".join(base + [a.name]) in modules]
                targets = subs or [".".join(base) or "__init__"]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("tensorsplit.")]
            for t in targets:
                while t not in modules and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != name:
                    edges[name].add(t)
    return edges


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_every_module_is_in_a_layer():
    assert sorted({m.split(".")[0] for m in _modules()} - set(LAYERS)) == []


def test_no_import_goes_up_a_layer_but_the_ones_written_here():
    edges = _imports(_modules())
    upward = sorted((a, b) for a, targets in edges.items() for b in targets if _layer(b) > _layer(a))
    assert [(a, b.split(".")[0]) for a, b in upward] == sorted(UPWARD), upward


def test_no_circle_between_modules():
    """Modules and the packages above them excluded (a package's __init__ re-exporting its modules is
    not a circle)."""
    assert _circles(_imports(_modules())) == []


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    def is_package_link(a: str, b: str) -> bool:
        return a == "__init__" or b == "__init__" or a.startswith(b + ".") or b.startswith(a + ".")
    graph = {a: {b for b in targets if not is_package_link(a, b)} for a, targets in edges.items()}
    seen, on_path, circles = set(), [], []

    def visit(m: str) -> None:
        if m in on_path:
            circles.append(on_path[on_path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        on_path.append(m)
        for n in sorted(graph.get(m, ())):
            visit(n)
        on_path.pop()
    for m in sorted(graph):
        visit(m)
    return circles


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The reader itself: a module of a copy of the package that imports upward is caught."""
    import shutil
    copy = tmp_path / "tensorsplit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "csrc"))
    (copy / "devices.py").write_text((copy / "devices.py").read_text() + "\n\ndef _x():\n    from .plan import world\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", copy)
    edges = _imports(_modules())
    assert "plan.world" in edges["devices"]
    assert _layer("plan.world") > _layer("devices")
    assert any(c[0] == "devices" or "devices" in c for c in _circles(edges))     # plan.world imports devices
