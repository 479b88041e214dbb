"""The package's layering, checked statically on the source (no module is imported).

The import graph is built from the AST of every ``sr3d_plugin/**/*.py``. Its rules:

* **Arrows.** Every ``import`` / ``from … import`` statement is an arrow, wherever it stands: module
  level (eager) or inside a function (lazy). So is ``importlib.import_module("<literal>")``. Imports
  inside ``if TYPE_CHECKING:`` (annotations only) are not arrows. Names handed to the plugin registry
  as strings (``builtin_plugins._lazy("sr3d_plugin.x", "Y")``) are not arrows either: they are looked
  up through :mod:`sr3d_plugin.plugins` when a component is created, like any third-party entry point.
* **Targets.** ``import a.b.c`` and ``from a.b import c`` (``c`` a submodule) point at the module
  ``a.b.c`` only; the parent packages Python initialises on the way are not arrows. ``from a.b import
  name`` (``name`` not a submodule) points at the package ``a.b`` — its ``__init__``.
* **Lazy packages (PEP 562).** A package whose ``__init__`` defines ``__getattr__`` declares the
  origin of each lazily served name in its ``if TYPE_CHECKING:`` block (both such packages do; the
  test checks that every lazy name of ``__all__`` is declared there). ``from pkg import Name`` of such
  a name points at the module that really serves it (resolved through nested lazy packages), and the
  package gets an arrow to every module its ``__getattr__`` may load.
* **Packages and cycles.** So a submodule that imports a name from its own package's ``__init__`` is
  a cycle exactly when that ``__init__`` imports the submodule back, eagerly or lazily — e.g.
  ``sources/video.py`` doing ``from sr3d_plugin.sources import FrameSet`` while ``sources/__init__``
  imports ``sources.video``: that works only by import order, and is reported.

Checks: (a) no cycle among ``sr3d_plugin`` modules (each strongly connected component is reported
with one shortest chain and the file:line of every arrow in it); (b) nothing in the lower layers
(``geometry``, ``tiling``, ``sources``, ``regions``, ``modeling``, ``synthetic``, and ``masks`` /
``visual_inputs`` once they exist) imports ``training``, ``evaluation``, ``inference``, ``cli``,
``testing`` (direct arrows, lazy ones included); (c) no production module imports
``sr3d_plugin.testing``; (d) no CLI flag (``--word``) in the string constants of an error message —
a ``raise`` statement or a call of an ``…Error``/``…Exception`` class — outside ``sr3d_plugin/cli/``:
library errors name Python parameters (rules of the house, 3).
"""

from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sr3d_plugin"
PACKAGE = "sr3d_plugin"

#: the lower layers and what they must never import (prefixes of module names)
LOWER_LAYERS = ("geometry", "tiling", "sources", "regions", "modeling", "synthetic", "masks", "visual_inputs")
UPPER_LAYERS = ("training", "evaluation", "inference", "cli", "testing")

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
#: a command quoted in backticks: a shell line to run, not a flag standing for a Python parameter
BACKTICKED = re.compile(r"`[^`]*`")


@dataclass(frozen=True)
class Arrow:
    src: str
    dst: str
    line: int
    lazy: bool

    def where(self) -> str:
        return f"{module_path(self.src)}:{self.line}{' (lazy)' if self.lazy else ''}"


@cache
def modules() -> dict[str, Path]:
    """Module name → file, for every ``.py`` under ``sr3d_plugin/`` (packages by their ``__init__``)."""
    out: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def module_path(name: str) -> str:
    return str(modules()[name].relative_to(ROOT.parent))


def is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(modules()[name].read_text(encoding="utf-8"), filename=str(modules()[name]))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, lazy: bool = False):
    """Yield ``(node, lazy)`` for every node below ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other, lazy
                yield from _walk(other, lazy)
            continue
        inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield child, inner
        yield from _walk(child, inner)


def _absolute(name: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package(name) else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _bound_at_top(name: str) -> set[str]:
    """Names the module binds at module level (outside ``if TYPE_CHECKING:``)."""
    bound: set[str] = set()
    for node in tree(name).body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            continue
        for sub in [node, *ast.walk(node)] if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                bound |= {(a.asname or a.name).split(".")[0] for a in sub.names}
            elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(sub.name)
            elif isinstance(sub, (ast.Assign, ast.AnnAssign)):
                targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
                bound |= {t.id for t in targets if isinstance(t, ast.Name)}
    return bound


def _has_lazy_getattr(name: str) -> bool:
    return is_package(name) and any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree(name).body)


@cache
def lazy_exports(name: str) -> dict[str, tuple[str, str]]:
    """For a PEP 562 package: lazily served name → ``(module, attribute)`` from its TYPE_CHECKING block."""
    if not _has_lazy_getattr(name):
        return {}
    out: dict[str, tuple[str, str]] = {}
    for node in tree(name).body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    for alias in sub.names:
                        out[alias.asname or alias.name] = (_absolute(name, sub), alias.name)
    return out


def _resolve_from(package: str, attr: str, seen: frozenset[str] = frozenset()) -> str:
    """The module ``from package import attr`` really depends on."""
    sub = f"{package}.{attr}"
    if sub in modules():
        return sub
    if package in modules() and attr in lazy_exports(package) and attr not in _bound_at_top(package):
        target, real = lazy_exports(package)[attr]
        if target in modules() and target not in seen:
            return _resolve_from(target, real, seen | {package})
    return package


def _known(dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is an ``sr3d_plugin`` module."""
    parts = dotted.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules():
            return cand
        parts.pop()
    return None


@cache
def arrows_from(name: str) -> tuple[Arrow, ...]:
    found: list[Arrow] = []

    def add(dst: str | None, node: ast.AST, lazy: bool) -> None:
        arrow = Arrow(name, dst or "", node.lineno, lazy)
        if dst is not None and dst != name and arrow not in found:
            found.append(arrow)

    for node, lazy in _walk(tree(name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(_known(alias.name), node, lazy)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, node)
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                add(_resolve_from(base, alias.name) if alias.name != "*" else _known(base), node, lazy)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.startswith(PACKAGE)
        ):
            add(_known(node.args[0].value), node, lazy)
    if _has_lazy_getattr(name):  # what __getattr__ may load
        getattr_fn = next(n for n in tree(name).body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__")
        for target, _ in lazy_exports(name).values():
            if target in modules():
                found.append(Arrow(name, target, getattr_fn.lineno, True))
    return tuple(found)


@cache
def graph() -> dict[str, dict[str, list[Arrow]]]:
    out: dict[str, dict[str, list[Arrow]]] = {m: {} for m in modules()}
    for m in modules():
        for arrow in arrows_from(m):
            out[m].setdefault(arrow.dst, []).append(arrow)
    return out


def strongly_connected() -> list[list[str]]:
    """Tarjan's components with more than one module (a module never points at itself here)."""
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(comps)


def shortest_cycle(comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as ``[m0, m1, …, m0]``."""
    g, members, start = graph(), set(comp), comp[0]
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(g[v]):
            if w not in members:
                continue
            if w == start:
                chain = [v]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [start, *reversed(chain[:-1]), start] if len(chain) > 1 else [start, v, start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {comp}")  # pragma: no cover


def describe_component(comp: list[str]) -> str:
    """One shortest cycle as a chain, then every arrow between the component's modules with its sites."""
    members = set(comp)
    arrows = [
        f"    {a} -> {b}   [{', '.join(x.where() for x in graph()[a][b])}]"
        for a in comp
        for b in sorted(graph()[a])
        if b in members
    ]
    return f"{len(comp)} modules; e.g. " + " -> ".join(shortest_cycle(comp)) + "\n" + "\n".join(arrows)


def in_layer(name: str, layers: tuple[str, ...]) -> bool:
    return any(name == f"{PACKAGE}.{p}" or name.startswith(f"{PACKAGE}.{p}.") for p in layers)


# ----------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------


def test_graph_sees_the_package() -> None:
    """The walker finds the modules and the known arrows (so the other checks can fail)."""
    mods = modules()
    assert {f"{PACKAGE}.geometry", f"{PACKAGE}.plugins", f"{PACKAGE}.modeling", f"{PACKAGE}.sources.base"} <= set(mods)
    # an eager import, a lazy one (inside a function) and a lazy PEP 562 export
    g = graph()
    assert f"{PACKAGE}.errors" in g[f"{PACKAGE}.geometry"]
    assert any(a.lazy for a in g[f"{PACKAGE}.plugins"][f"{PACKAGE}.builtin_plugins"])
    assert f"{PACKAGE}.modeling.inputs" in g[f"{PACKAGE}.modeling"]
    # the root package serves Region lazily from sr3d_plugin.modeling, itself lazy: the arrow ends at inputs
    assert lazy_exports(PACKAGE)["Region"] == (f"{PACKAGE}.modeling", "Region")
    assert _resolve_from(PACKAGE, "Region") == f"{PACKAGE}.modeling.inputs"


def test_lazy_packages_declare_their_lazy_names() -> None:
    """Every name of ``__all__`` a PEP 562 package serves lazily is declared in its TYPE_CHECKING block."""
    problems = []
    for name in modules():
        if not _has_lazy_getattr(name):
            continue
        declared = set(lazy_exports(name)) | _bound_at_top(name)
        for node in tree(name).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                names = {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
                missing = sorted(names - declared - {"__version__"})
                if missing:
                    problems.append(f"{module_path(name)}: {missing}")
    assert not problems, "lazy names without a TYPE_CHECKING declaration:\n" + "\n".join(problems)


def test_no_import_cycles() -> None:
    comps = strongly_connected()
    report = [describe_component(c) for c in comps]
    assert not comps, "import cycles among sr3d_plugin modules:\n" + "\n".join(report)


def test_lower_layers_do_not_import_upper_layers() -> None:
    bad = [
        f"{a.src} -> {a.dst}   [{a.where()}]"
        for m in modules()
        if in_layer(m, LOWER_LAYERS)
        for a in arrows_from(m)
        if in_layer(a.dst, UPPER_LAYERS)
    ]
    assert not bad, f"{'/'.join(LOWER_LAYERS)} must not import {'/'.join(UPPER_LAYERS)}:\n" + "\n".join(sorted(bad))


def test_production_code_never_imports_testing() -> None:
    bad = [
        f"{a.src} -> {a.dst}   [{a.where()}]"
        for m in modules()
        if not in_layer(m, ("testing",))
        for a in arrows_from(m)
        if in_layer(a.dst, ("testing",))
    ]
    assert not bad, "production code imports sr3d_plugin.testing (fixture writers only):\n" + "\n".join(sorted(bad))


def _error_message_texts(node: ast.AST) -> list[str]:
    """The string literals of an error expression; an f-string is one text with ``{}`` for each field."""
    texts, inside = [], set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.JoinedStr):
            parts = [v.value if isinstance(v, ast.Constant) else "{}" for v in sub.values]
            texts.append("".join(str(x) for x in parts))
            inside |= {id(v) for v in sub.values}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and id(sub) not in inside:
            texts.append(sub.value)
    return texts


def flags_in(text: str) -> list[str]:
    """CLI flags in a message, leaving out commands written in backticks (`hf download … --local-dir DIR`)."""
    return FLAG.findall(BACKTICKED.sub("", text))


def _is_error_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return name.endswith(("Error", "Exception"))


def cli_flags_in_errors() -> list[str]:
    found = []
    for name, path in modules().items():
        if in_layer(name, ("cli",)):
            continue
        seen: set[int] = set()
        for node, _ in _walk(tree(name)):
            if isinstance(node, ast.Raise) or _is_error_call(node):
                target = node.exc if isinstance(node, ast.Raise) else node
                if target is None or id(target) in seen:
                    continue
                seen.add(id(target))
                seen |= {id(s) for s in ast.walk(target)}
                flags = sorted({f for s in _error_message_texts(target) for f in flags_in(s)})
                if flags:
                    found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {', '.join(flags)}")
    return found


def test_flag_pattern() -> None:
    assert FLAG.findall("pass depth (--depth, with --intrinsics) or --no-cache") == [
        "--depth",
        "--intrinsics",
        "--no-cache",
    ]
    assert FLAG.findall("a -- b, x--y, ---, 1--2, --5") == []
    assert flags_in("run `sr3d prepare --raw DIR` first, or pass --skip-missing") == ["--skip-missing"]
    assert flags_in("(--model_args pretrained=PATH)") == ["--model_args"]


def test_no_cli_flags_in_library_errors() -> None:
    found = cli_flags_in_errors()
    assert not found, "library errors speak in CLI flags (name the Python parameter instead):\n" + "\n".join(found)


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_layer_names_exist_or_are_planned(layer: str) -> None:
    """Each lower layer is a module today, or one of the two the redesign adds (masks, visual_inputs)."""
    assert any(in_layer(m, (layer,)) for m in modules()) or layer in ("masks", "visual_inputs")
