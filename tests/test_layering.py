"""The shape of the code: which module may import which, read from the source (nothing is imported to find out).

The layers, bottom up: ``model`` (imports nothing of ours but itself and the leaf helpers), ``engine`` (the model,
voices and the leaf helpers), the shared front-end parts (audio, frames, vad, the realtime protocol and its
client, voices), and the front ends (``server``, ``webrtc``, ``worker``, the LiveKit plugin), which import the
engine and the shared parts but never each other. ``cli`` starts the front ends and sits above them all. There is
no import cycle anywhere, not even through a function-level import, and no private name crosses from one
package to another.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"chroma_agent": REPO / "chroma_agent", "livekit.plugins.chroma": REPO / "plugin/livekit/plugins/chroma"}
PLUGIN = "livekit.plugins.chroma"
# The leaf helpers: they import nothing of ours but each other.
LEAVES = {"chroma_agent.audio", "chroma_agent.frames", "chroma_agent.lazy", "chroma_agent.playout"}
TOP = "chroma_agent"  # the public API package; front ends take only __version__ from it


def module_files() -> dict[str, Path]:
    modules = {}
    for root, folder in ROOTS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([root, *parts])] = path
    return modules


MODULES = module_files()


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that runs (module level or inside functions), minus ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _lazy_exports(package: str) -> dict[str, str]:
    """A lazy package's name -> defining module (its ``_EXPORTS``), read from the package itself."""
    return dict(getattr(importlib.import_module(package), "_EXPORTS", {}))


def imports_of(module: str) -> list[tuple[str, str | None]]:
    """(imported module of ours, the name taken from it or None) for each runtime import of `module`."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, None) if sub in MODULES else (base, alias.name))
    ours = []
    for target, name in out:
        if target not in MODULES:
            continue
        if name is not None and target != module:
            lazy = _lazy_exports(target) if MODULES[target].name == "__init__.py" else {}
            target = lazy.get(name, target)
        ours.append((target, name))
    return ours


def graph() -> dict[str, set[str]]:
    edges = {m: {t for t, _ in imports_of(m) if t != m} for m in MODULES}
    for package, path in MODULES.items():  # a lazy package imports what it exports, when asked
        if path.name == "__init__.py":
            edges[package] |= set(_lazy_exports(package).values())
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> str:
    if module.startswith(PLUGIN):
        return "plugin"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "chroma_agent"


EDGES = graph()


def test_there_is_no_import_cycle():
    assert cycles(EDGES) == []


def test_the_graph_sees_function_level_and_lazy_imports():
    # guards the test itself: a function-level import and a name taken from a lazy package are edges
    assert "chroma_agent.engine.engine" in EDGES["chroma_agent.config"]  # inside load_engine
    assert "chroma_agent.voices.profile" in EDGES["chroma_agent.engine.engine"]
    assert "chroma_agent.engine.engine" in EDGES["chroma_agent"]


ALLOWED = {
    # layer: the layers it may import (besides itself and the leaves)
    "model": set(),
    "voices": {"model"},
    "engine": {"model", "voices"},
    "vad": set(),
    "realtime_protocol": {"engine"},  # engine.params only: the sampling rule (checked below)
    "realtime_client": {"realtime_protocol", "engine"},  # engine.events: replies as the engine's events
    "audio_encode": set(),
    "server": {"engine", "model", "voices", "realtime_protocol", "vad", "config", "audio_encode", TOP},
    "webrtc": {"engine", "model", "voices", "vad", "config"},
    # the packaged LiveKit worker is made of the plugin: the one front end another one builds on
    "worker": {"engine", "voices", "config", "worker_config", "plugin"},
    "worker_config": {"voices", "config", "engine"},  # engine.params only: the sampling rule
    "plugin": {"engine", "voices", "realtime_client", "realtime_protocol", TOP},
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_layer_imports_only_what_is_below_it(module):
    mine = layer(module)
    if module in LEAVES:
        assert EDGES[module] <= LEAVES, f"{module} is a leaf helper: it imports nothing of ours but the others"
        return
    if mine not in ALLOWED:  # cli, config, the top package: above the front ends, or not yet layered
        return
    allowed = ALLOWED[mine] | {mine}
    bad = sorted(t for t in EDGES[module] if t not in LEAVES and layer(t) not in allowed)
    assert bad == [], f"{module} ({mine}) must not import {bad}"


def test_the_protocol_and_the_model_import_nothing_heavy_of_ours():
    protocol = {t for m in MODULES if layer(m) == "realtime_protocol" for t in EDGES[m]}
    assert {t for t in protocol if layer(t) == "engine"} == {"chroma_agent.engine.params"}
    model = {t for m in MODULES if layer(m) == "model" for t in EDGES[m]}
    assert not {t for t in model if layer(t) in ("engine", "server", "webrtc", "plugin", "worker", "voices")}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_packages(module):
    def unit(m: str) -> str:
        return PLUGIN if m.startswith(PLUGIN) else ".".join(m.split(".")[:2])

    crossing = [f"{target}.{name}" for target, name in imports_of(module)
                if name is not None and name.startswith("_") and not name.startswith("__")
                and unit(target) != unit(module)]
    assert crossing == []


def test_modules_stay_small_or_say_why():
    long = []
    for module, path in MODULES.items():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > 600 and "lines" not in doc:
            long.append(f"{module}: {lines} lines")
    assert long == [], "split these, or say in the docstring why they are long (mention 'lines')"


LAZY_PACKAGES = sorted(m for m, path in MODULES.items() if path.name == "__init__.py" and _lazy_exports(m))


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_what_type_checkers_see_is_what_the_package_exports(package):
    """A lazy package lists its names twice: `_EXPORTS` (resolved at run time) and the `if TYPE_CHECKING:`
    re-exports (for type checkers and editors). Both must name the same things from the same modules."""
    tree = ast.parse(MODULES[package].read_text())
    seen = {}
    for node in tree.body:
        if isinstance(node, ast.If) and _type_checking(node):
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom), ast.dump(imp)
                for alias in imp.names:
                    assert alias.asname == alias.name, f"{alias.name}: re-export it as `{alias.name} as {alias.name}`"
                    seen[alias.name] = imp.module
    assert seen == _lazy_exports(package)
