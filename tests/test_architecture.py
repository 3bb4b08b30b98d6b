"""The package's shape: no import circle inside onetrick, every module imports first, no
source file over 400 lines."""
import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "onetrick"
MAX_LINES = 400


def modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    found = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement, in functions too, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse
        stack.extend(children)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports (relative imports resolved;
    ``from pkg import mod`` counts as importing ``pkg.mod`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:  # onetrick.models.alexnet.x -> onetrick.models.alexnet
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    found = modules(src, package)
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_the_cycle_finder_finds_a_cycle_and_resolves_relative_imports(tmp_path):
    """The check itself can fail: a planted circle is reported, TYPE_CHECKING imports are not edges."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # a package whose circle runs through a relative import inside a function
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "top.py").write_text("from .sub import leaf\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..top import g\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) == ["pkg.sub.leaf", "pkg.top", "pkg.sub.leaf"]
    graph = import_graph()
    assert "onetrick.distributed.runtime" in graph["onetrick.run.train"]             # from .distributed.runtime import
    assert "onetrick.distributed.hogwild" in graph["onetrick.run.train"]             # inside a function
    assert "onetrick.config" in graph["onetrick.distributed.strategy"]           # from ..config import
    assert "onetrick.models" not in graph["onetrick.distributed"]                # only under TYPE_CHECKING
    assert "onetrick.run.checkpoint" in graph["onetrick.run.train"]                      # from . import checkpoint


def test_no_import_circle_inside_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_module_imports_first_in_a_fresh_interpreter():
    """One subprocess; before each module, every onetrick module is dropped from
    sys.modules, so each is imported first, as `python -c 'import onetrick.x'` would."""
    script = (
        "import sys, importlib\n"
        f"for name in {sorted(modules())!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'onetrick' or m.startswith('onetrick.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        print(f'{name}: {type(err).__name__}: {err}')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr[-2000:]


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(SRC.parent)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
