"""The package's shape: its layers import one way only (:data:`LAYERS`), no import circle
inside onetrick, only the CLI reads argparse, no two sibling modules named as variants of
one another, every module imports first, no source file over 400 lines."""
import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "onetrick"
MAX_LINES = 400

#: the package's layers, lowest first: a module may import modules of its own layer or of a
#: lower one, never of a higher one (imports under ``if TYPE_CHECKING:`` do not count). A
#: module belongs to the layer of the longest name here that is it or a package above it;
#: ``onetrick/__init__.py`` is above them all, and a package's ``__init__`` may import its
#: own package's modules (it re-exports them).
LAYERS: list[tuple[str, ...]] = [
    ("onetrick.config", "onetrick.version"),    # 1: the run's settings, the release
    ("onetrick.recipe", "onetrick.models"),     # 2: the training recipe, the networks
    ("onetrick.data",),                         # 3: datasets
    ("onetrick.distributed",),                  # 4: the strategies and their runtime
    ("onetrick.perf.predict",),                 # 5: the cost model (pure)
    ("onetrick.perf.measure",),                 # 6: probes and measurements of this machine
    ("onetrick.perf.planner",),                 # 7: the planner
    ("onetrick.perf.bench",),                   # 8: onetrick bench's runner and reports
    ("onetrick.run",),                          # 9: one training run
    ("onetrick.api", "onetrick.cli"),           # 10: the Python API and the command line
]


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


def _import_nodes(tree: ast.AST, type_checking: bool = False):
    """Every import statement, in functions too; under ``if TYPE_CHECKING:`` only with
    ``type_checking``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
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
    """``{module: the package's modules it imports}`` (see :func:`imports_of`)."""
    found = modules(src, package)
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def layer_of(module: str, layers: list[tuple[str, ...]] = LAYERS, package: str = PACKAGE) -> int | None:
    """The 1-based layer of ``module`` (the longest layer name that is it or a package above
    it); the package itself is above every layer; None where no layer names it."""
    if module == package:
        return len(layers) + 1
    named = [(len(name), i) for i, names in enumerate(layers, 1) for name in names
             if module == name or module.startswith(name + ".")]
    return max(named)[1] if named else None


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, ...]] = LAYERS,
                   package: str = PACKAGE) -> list[str]:
    """Every import edge that goes to a higher layer, or from or to a module no layer
    names, as ``a -> b (layer i -> layer j)``; a package's ``__init__`` importing its own
    modules is not one."""
    out = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            if b.startswith(a + "."):
                continue
            la, lb = layer_of(a, layers, package), layer_of(b, layers, package)
            if la is None or lb is None or lb > la:
                out.append(f"{a} -> {b} (layer {la} -> layer {lb})")
    return out


def modules_importing(top: str, src: Path = SRC, package: str = PACKAGE) -> set[str]:
    """The package's modules that import ``top`` (a top-level module: ``argparse``) or a
    submodule of it anywhere, under ``if TYPE_CHECKING:`` too."""
    found = set()
    for name, path in modules(src, package).items():
        for node in _import_nodes(ast.parse(path.read_text(), str(path)), type_checking=True):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if not node.level else [])
            if any(n == top or n.startswith(top + ".") for n in names):
                found.add(name)
    return found


def variant_siblings(src: Path = SRC, package: str = PACKAGE) -> list[str]:
    """Sibling modules or packages whose names differ only by a ``_``-separated prefix or
    suffix (``memory.py`` beside ``memory_model.py``), as ``dir/a beside dir/b``: two
    names for one thing, where each should say what it holds."""
    out = []
    for folder in sorted(p for p in (src / package).rglob("*") if p.is_dir() and (p / "__init__.py").exists()):
        names = sorted({p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
                       | {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()})
        rel = folder.relative_to(src)
        out += [f"{rel}/{a} beside {rel}/{b}" for a in names for b in names
                if a != b and (b.startswith(a + "_") or b.endswith("_" + a))]
    return out


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
    (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import top\n")
    assert import_graph(tmp_path, "pkg")["pkg.typed"] == set()                   # only under TYPE_CHECKING
    graph = import_graph()
    assert "onetrick.distributed.runtime" in graph["onetrick.run.train"]         # from onetrick.distributed.runtime import
    assert "onetrick.run.auto" in graph["onetrick.run.train"]                    # inside a function
    assert "onetrick.config" in graph["onetrick.distributed.strategy"]           # from onetrick.config import
    assert "onetrick.run.checkpoint" in graph["onetrick.run.train"]              # from onetrick.run import checkpoint


def test_the_layer_check_fails_on_an_upward_import(tmp_path):
    """The check itself can fail: a planted import of a higher layer, inside a function, is
    reported; downward, same-layer, TYPE_CHECKING and ``__init__`` re-export imports are not."""
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import high\n")
    (pkg / "low" / "__init__.py").write_text("from pkg.low import base\n")
    (pkg / "low" / "base.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import high\n")
    (pkg / "low" / "leaf.py").write_text("from pkg.low import base\ndef f():\n    from pkg import high\n")
    (pkg / "high.py").write_text("from pkg.low import leaf\n")
    layers = [("pkg.low",), ("pkg.high",)]
    graph = import_graph(tmp_path, "pkg")
    assert upward_imports(graph, layers, "pkg") == ["pkg.low.leaf -> pkg.high (layer 1 -> layer 2)"]
    assert layer_of("pkg", layers, "pkg") == 3 and layer_of("pkg.other", layers, "pkg") is None


def test_every_import_goes_to_the_same_or_a_lower_layer():
    """:data:`LAYERS`: nothing imports upward (imports inside functions count too)."""
    upward = upward_imports(import_graph())
    assert not upward, "imports against the layers (a module may import its own layer or lower):\n  " + \
        "\n  ".join(upward)


def test_only_the_cli_imports_argparse():
    """The library takes typed values; reading the command line is the CLI's alone."""
    outside = sorted(m for m in modules_importing("argparse") if not (m + ".").startswith(PACKAGE + ".cli."))
    assert not outside, f"argparse imported outside {PACKAGE}.cli: {outside}"


def test_no_two_sibling_modules_are_named_as_variants_of_one_another():
    """``memory.py`` beside ``memory_model.py`` says neither what either holds."""
    found = variant_siblings()
    assert not found, "sibling names that differ only by a prefix or suffix: " + "; ".join(found)


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
