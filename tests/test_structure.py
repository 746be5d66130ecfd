"""The package's static import graph (function-level imports and ``importlib.import_module`` of
a constant name included): no import cycles, and the config package imports nothing of the model."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "sparsejax"


def _module(path: pathlib.Path, package: pathlib.Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _lazy_name(node) -> str | None:
    """The module of ``importlib.import_module("a.b")`` / ``import_module("a.b")``."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if called == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
        return node.args[0].value
    return None


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    files = {_module(p, package): p for p in package.rglob("*.py")}
    top = package.name
    graph = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                bases = [a.name for a in node.names]
            elif isinstance(node, ast.Call) and _lazy_name(node):
                bases = [_lazy_name(node)]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[:len(name.split(".")) - node.level + is_pkg]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import sub`` imports the submodule; ``from pkg import name`` the
                # package (its __init__ re-exporting its own submodules is not a cycle).
                bases = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                         for a in node.names]
            else:
                continue
            for target in bases:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target not in (name, top):
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("import importlib\n\n\ndef __getattr__(name):\n"
                              "    return importlib.import_module('pkg.a')\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "sparsejax.model" in graph["sparsejax.ffn"] | graph["sparsejax.step"]
    assert cycles(graph) == []


def test_the_config_package_imports_no_model():
    graph = import_graph()
    config = [m for m in graph if m == "sparsejax.config" or m.startswith("sparsejax.config.")]
    assert len(config) == 5
    for module in config:
        outside = {t for t in graph[module] if not t.startswith("sparsejax.config")}
        assert outside <= {"sparsejax.schedules"}, (module, outside)
