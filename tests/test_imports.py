"""The package's import rules, read from the source with `ast`: nothing is imported (Triton modules can't be, on a
CPU), so every file is checked on every machine.

- No cycle among module-level imports (an import inside a function, or under `if TYPE_CHECKING:`, runs later and
  makes none).
- kernels/ is a leaf: it imports nothing of the package outside kernels/, not even inside a function.
- model/ is the model alone: it imports neither cluster/ nor deployments/ (nor bench/, k8s/), not even lazily.
- Triton stays off every CPU path: a module that imports triton at module level is a kernels/ module, and only such
  modules import one at module level; everything else reaches the kernels lazily (kernels/dispatch.py).
- Every TritonOp names a kernel that exists, so a typo cannot wait for the first GPU to show up.

The checks are functions of an import list, so they are also tested on small made-up packages below: each rule can
fail.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gptoss_serve"
FOLDERS = ("model", "cluster", "deployments", "kernels", "k8s", "bench")  # each installs as gptoss_serve.<folder>
# folder -> the package's folders it must not import from, at any level
FORBIDDEN = {
    "kernels": ("model", "cluster", "deployments", "k8s", "bench"),
    "model": ("cluster", "deployments", "k8s", "bench"),
}


@dataclass(frozen=True)
class Source:
    module: str  # gptoss_serve.cluster.sampler
    path: str  # cluster/sampler.py, for messages
    tree: ast.Module
    is_package: bool  # an __init__.py: relative imports start from the module itself


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # absolute: the module imported where it is one, else the module or package it is imported from
    where: str  # path:line
    runtime: bool  # runs when the importer is imported: at module level, outside `if TYPE_CHECKING:`


# ---- reading the source -------------------------------------------------------------------------------------------

def module_name(relative: Path) -> str:
    """cluster/expert_parallel/exchange.py -> gptoss_serve.cluster.expert_parallel.exchange (an __init__.py names its
    package)."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join((PACKAGE, *parts))


def read_package(root: Path = ROOT) -> dict[str, Source]:
    sources = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root)
            module = module_name(relative)
            sources[module] = Source(module, str(relative), ast.parse(path.read_text(), filename=str(relative)),
                                     is_package=path.name == "__init__.py")
    return sources


def sources_from_text(files: dict[str, str]) -> dict[str, Source]:
    """A made-up package: {"kernels/a.py": source, ...} -> its Sources, as read_package reads files."""
    return {module_name(Path(path)): Source(module_name(Path(path)), path, ast.parse(text),
                                            is_package=path.endswith("__init__.py"))
            for path, text in files.items()}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportStatements(ast.NodeVisitor):
    """Every import statement of a module, each with whether it runs when the module is imported."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self._deferred = 0  # depth of enclosing functions and `if TYPE_CHECKING:` blocks

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._deferred += 1
        self.generic_visit(node)
        self._deferred -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._deferred += 1
        for child in node.body:
            self.visit(child)
        self._deferred -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        self.found.append((node, self._deferred == 0))

    visit_ImportFrom = visit_Import


def imports_of(source: Source, modules: set[str]) -> list[Import]:
    """The module's imports, relative ones resolved; `from package import name` imports the module package.name where
    there is one (from gptoss_serve.model import mxfp4 imports gptoss_serve.model.mxfp4)."""
    statements = _ImportStatements()
    statements.visit(source.tree)
    found = []
    for node, runtime in statements.found:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = source.module if source.is_package else source.module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in dict.fromkeys(targets):
            found.append(Import(source.module, target, f"{source.path}:{node.lineno}", runtime))
    return found


def all_imports(sources: dict[str, Source]) -> list[Import]:
    modules = set(sources)
    return [i for source in sources.values() for i in imports_of(source, modules)]


# ---- the rules ----------------------------------------------------------------------------------------------------

def folder_of(module: str) -> str | None:
    """gptoss_serve.cluster.sampler -> cluster; None for anything outside the package."""
    parts = module.split(".")
    return parts[1] if parts[0] == PACKAGE and len(parts) > 1 else None


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle of the graph (module -> the modules it imports), as the path around it: [a, b, c, a]. One cycle per
    strongly connected component of more than one module (or a module importing itself), found by Tarjan's
    algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_path_around(graph, set(component), component[0]) for component in components]


def _path_around(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path from start back to itself inside its component (breadth first): [start, ..., start]."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph.get(node, set()) & component):
                if nxt == start:  # node closes the cycle: walk back to start
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is on no cycle")


def cycle_problems(imports: list[Import], modules: set[str]) -> list[str]:
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for i in imports:
        if i.runtime and i.target in modules:
            graph[i.importer].add(i.target)
    return [" -> ".join(cycle) for cycle in import_cycles(graph)]


def layer_problems(imports: list[Import]) -> list[str]:
    """Imports, at any level, of a folder the importer's folder must not import (FORBIDDEN)."""
    return [f"{i.where}: {i.importer} imports {i.target} ({folder_of(i.importer)}/ must not import "
            f"{folder_of(i.target)}/)"
            for i in imports if folder_of(i.target) in FORBIDDEN.get(folder_of(i.importer) or "", ())]


def _is_triton(target: str) -> bool:
    return target == "triton" or target.startswith("triton.")


def triton_modules(imports: list[Import]) -> set[str]:
    """The modules whose import imports Triton: those with `import triton` at module level."""
    return {i.importer for i in imports if i.runtime and _is_triton(i.target)}


def triton_problems(imports: list[Import]) -> list[str]:
    """Triton imported at module level outside kernels/, or a module that doesn't import Triton itself importing one
    that does at module level (importing it would import Triton: a CPU path could)."""
    users = triton_modules(imports)
    problems = [f"{i.where}: {i.importer} imports {i.target} at module level outside kernels/"
                for i in imports if i.runtime and _is_triton(i.target) and folder_of(i.importer) != "kernels"]
    problems += [f"{i.where}: {i.importer} imports the Triton module {i.target} at module level (import it where a GPU "
                 f"is: inside a function, or through kernels/dispatch.py's TritonOp)"
                 for i in imports if i.runtime and i.target in users and i.importer not in users]
    return problems


def triton_op_problems(sources: dict[str, Source], imports: list[Import]) -> list[str]:
    """Each TritonOp("module.function", ...) must name a function defined at the top of a Triton module in kernels/."""
    users = triton_modules(imports)
    problems = []
    for source in sources.values():
        for node in ast.walk(source.tree):
            if not (isinstance(node, ast.Call) and _called_name(node.func) == "TritonOp"):
                continue
            where = f"{source.path}:{node.lineno}"
            name = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "kernel"), None)
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                problems.append(f"{where}: TritonOp's kernel is not a literal 'module.function'")
                continue
            module_part, _, function = name.value.rpartition(".")
            module = f"{PACKAGE}.kernels.{module_part}"
            if module not in sources:
                problems.append(f"{where}: TritonOp names {name.value!r}, but there is no module {module}")
            elif function not in _top_level_names(sources[module].tree):
                problems.append(f"{where}: TritonOp names {name.value!r}, but {module} defines no {function}")
            elif module not in users:
                problems.append(f"{where}: TritonOp names {name.value!r}, but {module} does not import Triton")
    return problems


def _called_name(func: ast.expr) -> str | None:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


# ---- the package -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def package() -> tuple[dict[str, Source], list[Import]]:
    sources = read_package()
    return sources, all_imports(sources)


def test_the_package_is_read_whole(package):
    sources, imports = package
    assert all((ROOT / folder).is_dir() for folder in FOLDERS)
    for module in ("gptoss_serve.kernels.dispatch", "gptoss_serve.cluster.expert_parallel",
                   "gptoss_serve.bench.loadtest.cli", "gptoss_serve.deployments.responses.api"):
        assert module in sources
    # the resolution the rules rely on: `from gptoss_serve.model import mxfp4` imports the module mxfp4
    assert any(i.importer == "gptoss_serve.model.checkpoint" and i.target == "gptoss_serve.model.mxfp4"
               for i in imports)


def test_no_import_cycle_at_module_level(package):
    sources, imports = package
    assert cycle_problems(imports, set(sources)) == []


def test_kernels_and_model_import_nothing_above_them(package):
    _, imports = package
    assert layer_problems(imports) == []


def test_triton_stays_off_cpu_paths(package):
    _, imports = package
    users = triton_modules(imports)
    assert "gptoss_serve.kernels.rms_norm" in users and "gptoss_serve.kernels.dispatch" not in users
    assert triton_problems(imports) == []


def test_every_triton_op_names_a_kernel(package):
    sources, imports = package
    assert triton_op_problems(sources, imports) == []


# ---- the rules on made-up packages: each can fail ----------------------------------------------------------------

def check(files: dict[str, str]) -> dict[str, list[str]]:
    sources = sources_from_text(files)
    imports = all_imports(sources)
    return {"cycles": cycle_problems(imports, set(sources)), "layers": layer_problems(imports),
            "triton": triton_problems(imports), "ops": triton_op_problems(sources, imports)}


def test_a_module_level_cycle_is_reported_with_its_modules():
    found = check({
        "cluster/a.py": "from gptoss_serve.cluster.b import x\n",
        "cluster/b.py": "from gptoss_serve.cluster import c\n",  # `from package import module`
        "cluster/c.py": "import gptoss_serve.cluster.a\n",
        "cluster/d.py": "from gptoss_serve.cluster.a import y\n",  # into the cycle, not on it
    })
    assert found["cycles"] == ["gptoss_serve.cluster.a -> gptoss_serve.cluster.b -> gptoss_serve.cluster.c -> "
                               "gptoss_serve.cluster.a"]


def test_an_import_cycle_through_a_relative_import_is_found():
    found = check({
        "bench/tool/__init__.py": "from .runner import run\n",
        "bench/tool/runner.py": "from . import config\n",
        "bench/tool/config.py": "from .. import tool\n",
    })
    assert found["cycles"] == ["gptoss_serve.bench.tool -> gptoss_serve.bench.tool.runner -> "
                               "gptoss_serve.bench.tool.config -> gptoss_serve.bench.tool"]


def test_a_deferred_import_makes_no_cycle():
    found = check({
        "deployments/a.py": "from gptoss_serve.deployments.b import x\n",
        "deployments/b.py": "def late():\n    from gptoss_serve.deployments.a import y\n",
        "deployments/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                            "    from gptoss_serve.deployments.a import z\n",
        "deployments/__init__.py": "from gptoss_serve.deployments.c import w\n",
    })
    assert found["cycles"] == []


@pytest.mark.parametrize("importer, line", [
    ("kernels/k.py", "from gptoss_serve.model import mxfp4"),
    ("kernels/k.py", "def f():\n    from gptoss_serve.cluster.sampler import Sampler"),  # lazily: still a leaf
    ("kernels/k.py", "from ..deployments import protocol"),  # relative, out of kernels/
    ("kernels/k.py", "import gptoss_serve.bench.moe_kernel"),
    ("model/m.py", "class A:\n    def f(self):\n        import gptoss_serve.cluster.sampling_params"),
    ("model/m.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gptoss_serve.deployments import x"),
])
def test_an_import_above_the_importer_is_reported(importer, line):
    found = check({importer: line + "\n", "model/mxfp4.py": "", "cluster/sampler.py": "", "deployments/protocol.py": "",
                   "bench/moe_kernel.py": "", "cluster/sampling_params.py": ""})
    assert len(found["layers"]) == 1 and found["layers"][0].startswith(importer + ":"), found["layers"]


def test_imports_that_respect_the_layers_pass():
    found = check({"model/m.py": "from gptoss_serve.kernels.k import f\nfrom gptoss_serve.model import n\n",
                   "kernels/k.py": "from .r import ref\n", "kernels/r.py": "", "model/n.py": "",
                   "cluster/c.py": "from gptoss_serve.model.m import g\n"})
    assert found == {"cycles": [], "layers": [], "triton": [], "ops": []}


def test_a_cpu_path_importing_a_triton_module_is_reported():
    kernel = "import triton\n\ndef add(x):\n    return x\n"
    found = check({
        "kernels/add.py": kernel,
        "kernels/add_reference.py": "from gptoss_serve.kernels.add import add\n",  # a reference reaching Triton
        "model/m.py": "from gptoss_serve.kernels.add import add\n",
        "model/ok.py": "def f():\n    from gptoss_serve.kernels.add import add\n",  # lazily: fine
        "kernels/add_fused.py": "import triton\nfrom gptoss_serve.kernels.add import add\n",  # Triton to Triton: fine
        "bench/b.py": "import triton.language as tl\n",
    })
    assert [p.split(":")[0] for p in found["triton"]] == ["bench/b.py", "kernels/add_reference.py", "model/m.py"]


def test_a_triton_op_naming_no_kernel_is_reported():
    found = check({
        "kernels/add.py": "import triton\n\ndef add(x):\n    return x\n",
        "kernels/add_reference.py": "def add_reference(x):\n    return x\n",
        "model/m.py": "from gptoss_serve.kernels.dispatch import TritonOp\n"
                      "ok = TritonOp('add.add', reference=None)\n"
                      "no_function = TritonOp('add.sub', reference=None)\n"
                      "no_module = TritonOp('sub.add', reference=None)\n"
                      "no_triton = TritonOp('add_reference.add_reference', reference=None)\n",
        "kernels/dispatch.py": "",
    })
    assert [p.split(": ")[0] for p in found["ops"]] == ["model/m.py:3", "model/m.py:4", "model/m.py:5"]
