"""The layers of the code, checked by walking every import with ``ast`` (function-level ones too).

    ui                      the Streamlit client: talks to the core service's API only
    appliance (application) wiring, service, api, cli, doctor, backup, model_routes: the only
                            modules that import ingest and finetune
    appliance (the rest)    answering, verification, audit, ...: import the ground and each other
    ingest, finetune        import the ground only (and themselves)
    appliance.core          the ground: imports no other package of ours

Plus: no import cycles among the project's modules, and no module reaches into another's
private names (``service._as_admin``); a class reads ``self._x`` only where its module, or
the module of a project base class it derives from, defines ``_x``, and never reads such an
inherited ``_x`` on another object (a wrapper calls its inner model's public methods).
``KNOWN_*`` list what the code still does against the rules; they may only shrink (a listed
edge that is gone fails too, so the lists stay true).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("appliance", "ingest", "finetune", "ui")
APPLICATION = frozenset(
    {
        "appliance.wiring",
        "appliance.service",
        "appliance.api",
        "appliance.cli",
        "appliance.doctor",
        "appliance.backup",
        "appliance.model_routes",
        "appliance.run_tools",
        "appliance.appliance",
        "appliance.local",
        "appliance.remote",
        "appliance.__main__",
    }
)
"""The application layer of ``appliance``: it drives ``ingest`` and ``finetune``."""

KNOWN_LAYER_BREACHES: frozenset[tuple[str, str]] = frozenset()
"""(importer, imported) pairs still against the layer rules; the list may only shrink."""

KNOWN_CYCLE_MODULES: frozenset[str] = frozenset()
"""Modules still in an import cycle."""


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "vendor" not in path.parts:
                found[module_name(path)] = path
    return found


def type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The nodes inside ``if TYPE_CHECKING:`` blocks: imports for annotations, never run."""
    inside: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:
                inside.update(ast.walk(statement))
    return inside


def imports(modules: dict[str, Path], *, typing: bool = True) -> Iterator[Import]:
    """Every import of a project module by a project module (function-level ones too; those
    under ``if TYPE_CHECKING:`` unless ``typing`` is False), resolved to the module itself
    (``from appliance.core import errors`` imports ``appliance.core.errors``)."""
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = set() if typing else type_checking_only(tree)
        for node in ast.walk(tree):
            if node in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in modules else base)
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    yield Import(name, target, node.lineno)


def layer(module: str) -> str:
    if module == "appliance.core" or module.startswith("appliance.core."):
        return "core"
    if module in APPLICATION or module.startswith("appliance.commands"):
        return "application"
    return module.split(".")[0]


ALLOWED = {
    "core": {"core"},
    "ingest": {"core", "ingest"},
    "finetune": {"core", "finetune"},
    "appliance": {"core", "appliance"},
    "application": {"core", "appliance", "application", "ingest", "finetune"},
    "ui": {"core", "ui"},
}
UI_MAY_IMPORT = frozenset({"appliance.api"})
"""The UI's one door into the appliance: the API client."""


def breaches() -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for edge in imports(project_modules()):
        source, target = layer(edge.importer), layer(edge.imported)
        if target in ALLOWED[source]:
            continue
        if source == "ui" and edge.imported in UI_MAY_IMPORT:
            continue
        found.setdefault((edge.importer, edge.imported), edge.line)
    return found


def test_each_layer_imports_only_the_layers_below_it() -> None:
    found = breaches()
    new = sorted(
        f"{a} -> {b} (line {line})"
        for (a, b), line in found.items()
        if (a, b) not in KNOWN_LAYER_BREACHES
    )
    assert not new, "imports against the layers (see this module's docstring)"
    gone = KNOWN_LAYER_BREACHES - set(found)
    assert not gone, f"fixed, so remove them from KNOWN_LAYER_BREACHES: {sorted(gone)}"


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), over the imports
    that run (annotation-only imports under ``TYPE_CHECKING`` cannot loop at run time)."""
    graph: dict[str, set[str]] = {m: set() for m in project_modules()}
    for edge in imports(project_modules(), typing=False):
        graph[edge.importer].add(edge.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    in_cycles = {m for component in cycles() for m in component}
    assert not sorted(in_cycles - KNOWN_CYCLE_MODULES), cycles()
    gone = KNOWN_CYCLE_MODULES - in_cycles
    assert not gone, f"out of every cycle now, so remove them from KNOWN_CYCLE_MODULES: {gone}"


def private_names(tree: ast.Module) -> set[str]:
    """Names with one leading underscore that a module defines (functions, classes, module
    and class attributes, ``self._x`` attributes)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


LIBRARY_PRIVATES = frozenset({("appliance.chat.llamacpp", "_model")})
"""(module, name): a library object's private attribute that a project module also happens to
define. llama_cpp.Llama offers no public handle on its model (``Llama._model``): only
``appliance.chat.llamacpp`` reads it, and hands it on (``llama_model``) to the batching engine."""


def base_modules(tree: ast.Module, modules: dict[str, Path]) -> dict[str, set[str]]:
    """Per class of the module, the project modules its bases were imported from (a base
    defined in the module itself adds nothing: its names are the module's own)."""
    origin: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in modules:
            for alias in node.names:
                origin[alias.asname or alias.name] = node.module
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            found[node.name] = {
                origin[base.id]
                for base in node.bases
                if isinstance(base, ast.Name) and base.id in origin
            }
    return found


def attribute_reads(tree: ast.Module) -> Iterator[tuple[str, ast.Attribute]]:
    """Attribute reads inside classes, each with the class whose body makes it."""
    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef):
            for node in ast.walk(cls):
                if isinstance(node, ast.Attribute):
                    yield cls.name, node


def _is_self_or_super(value: ast.expr) -> bool:
    return (isinstance(value, ast.Name) and value.id in ("self", "cls")) or (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id == "super"
    )


def self_reads(tree: ast.Module) -> Iterator[tuple[str, ast.Attribute]]:
    """``self._x`` reads, each with the class whose method makes it."""
    for cls, node in attribute_reads(tree):
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            yield cls, node


def test_no_module_reaches_into_another_modules_private_names() -> None:
    modules = project_modules()
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in modules.items()}
    defined = {name: private_names(tree) for name, tree in trees.items()}
    everywhere = set().union(*defined.values())
    found = []
    for name, tree in trees.items():
        own = defined[name]
        # ``self._x`` of a subclass: the base's own attribute, allowed only when the class
        # derives from a class of the module that defines ``_x``.
        bases = base_modules(tree, modules)
        inherited = {
            id(node)
            for cls, node in self_reads(tree)
            if any(node.attr in defined[module] for module in bases.get(cls, ()))
        }
        # ``other._x`` inside such a subclass, where ``_x`` is the project base's: the class
        # defines ``_x`` too (an override), but the object read is another model's, not itself.
        found += [
            f"{name}:{node.lineno} reads ._{node.attr.lstrip('_')} of another object"
            for cls, node in attribute_reads(tree)
            if node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not _is_self_or_super(node.value)
            and any(node.attr in defined[module] for module in bases.get(cls, ()))
        ]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module != name:
                found += [
                    f"{name}:{node.lineno} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in own
                and node.attr in everywhere  # a project's private name, not a library's
                and id(node) not in inherited
                and (name, node.attr) not in LIBRARY_PRIVATES
            ):
                found.append(f"{name}:{node.lineno} reads ._{node.attr.lstrip('_')}")
    assert not found, found
