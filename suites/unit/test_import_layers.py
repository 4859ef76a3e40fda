"""The runtime's import graph points down only: every module has a layer, no edge climbs, no cycle.

The graph is read from the source with :mod:`ast` (every ``import`` and ``from ... import``, at
module level or inside a function, ``if TYPE_CHECKING`` included), so a function-level import that
climbs a layer counts as much as a top-level one. Importing ``a.b.c`` also runs ``a.b``'s
``__init__``, so that package counts as a target too (unless it encloses the importer).

The layers, lowest first (a module may import its own layer and the ones below):

- ``base``: errors, retry, processes, private_dir, state, config, grammar and record modules;
- ``hostcheck``: host probes and their parsers (:mod:`agentbox_runtime.hostcheck`);
- ``vmm``: the VMM drivers and the choice between them;
- ``podman``: the one Podman runner and what only runs through it (live disks, reset, resize);
- ``containers``: images, the OCI runtime, container mode, task argv;
- ``microvm``: the microVM session, reaper, maintenance;
- ``backends``: each backend assembled from the layers below (:mod:`agentbox_runtime.backends`) and
  the workspace's persistent disks (:mod:`agentbox_runtime.workspace_disk`);
- ``doctor``: the host report on top of every backend;
- ``commands``: the CLI subcommands and ``cli``.
"""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNTIME = "agentbox_runtime"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("agentbox_runtime", "agentbox_runtime.errors", "agentbox_runtime.retry", "agentbox_runtime.processes",
              "agentbox_runtime.private_dir", "agentbox_runtime.beneath", "agentbox_runtime.state",
              "agentbox_runtime.config", "agentbox_runtime.size_grammar", "agentbox_runtime.guest_resources",
              "agentbox_runtime.disks", "agentbox_runtime.rootfs_paths", "agentbox_runtime.backend_caps",
              "agentbox_runtime.channel", "agentbox_runtime.guest_registry", "agentbox_runtime.evidence",
              "agentbox_runtime.evidence_verify", "agentbox_runtime.credential_patterns")),
    ("hostcheck", ("agentbox_runtime.hostcheck",)),
    ("vmm", ("agentbox_runtime.vmm",)),
    ("podman", ("agentbox_runtime.podman", "agentbox_runtime.container.podman_api", "agentbox_runtime.live_disks",
                "agentbox_runtime.reset", "agentbox_runtime.resize")),
    ("containers", ("agentbox_runtime.images", "agentbox_runtime.oci", "agentbox_runtime.container",
                    "agentbox_runtime.tasks")),
    ("microvm", ("agentbox_runtime.microvm",)),
    ("backends", ("agentbox_runtime.backends", "agentbox_runtime.workspace_disk")),
    ("doctor", ("agentbox_runtime.doctor",)),
    ("commands", ("agentbox_runtime.commands", "agentbox_runtime.cli")),
)
"""Layer name and the modules it holds, lowest first. A name holds that module and, for a package,
everything under it unless a longer name places it elsewhere."""
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


def modules(package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``package``."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_names(name: str, path: Path) -> Iterator[str]:
    """Every dotted name that ``path`` (module ``name``) imports: ``import a.b`` gives ``a.b``;
    ``from a import b`` gives ``a.b`` (a submodule) or else ``a``; relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def resolve(target: str, known: dict[str, Path]) -> str | None:
    """The module of ``known`` that ``target`` names (the longest known prefix), or None."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports. Importing a submodule runs its packages'
    ``__init__``, so a package whose ``__init__`` imports anything counts as imported too (not the
    importer's own packages)."""
    known = modules(package)
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target in imported_names(name, path):
            module = resolve(target, known)
            if module is not None and module != name:
                edges[name].add(module)
    for name, targets in edges.items():
        for module in list(targets):
            parent = module.rpartition(".")[0]
            while parent and not (name == parent or name.startswith(parent + ".")):
                if edges.get(parent):
                    targets.add(parent)
                parent = parent.rpartition(".")[0]
    return edges


def layer_of(module: str) -> str | None:
    """The layer whose longest listed name is ``module`` or a package enclosing it."""
    matches = [(len(listed), layer) for layer, names in LAYERS for listed in names
               if module == listed or (module.startswith(listed + ".") and listed != RUNTIME)]
    return max(matches)[1] if matches else None


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    """``importer (layer) -> imported (higher layer)`` for every edge that climbs."""
    out = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            low, high = layer_of(source), layer_of(target)
            if low is not None and high is not None and RANK[high] > RANK[low]:
                out.append(f"{source} ({low}) -> {target} ({high})")
    return out


def cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as ``[a, b, ..., a]`` (``a`` imports ``b``), or ``[]`` when the graph has none."""
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as exc:
        return list(reversed(exc.args[1]))  # graphlib lists each node's predecessor: the imported one first
    return []


def foreign_imports(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """``module -> name`` for every import in ``package`` of a name under ``forbidden``."""
    out = []
    for name, path in modules(package).items():
        for target in imported_names(name, path):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                out.append(f"{name} -> {target}")
    return sorted(set(out))


def test_every_runtime_module_has_a_layer() -> None:
    unplaced = [m for m in modules(RUNTIME) if layer_of(m) is None]
    assert not unplaced, f"modules with no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_no_runtime_import_points_up() -> None:
    up = upward_edges(graph(RUNTIME))
    assert not up, "imports from a lower layer to a higher one:\n  " + "\n  ".join(up)


def test_runtime_import_graph_has_no_cycle() -> None:
    found = cycle(graph(RUNTIME))
    assert not found, "import cycle: " + " -> ".join(found)


@pytest.mark.parametrize(("package", "forbidden"), [
    ("agentbox_guest_init", ("agentbox_runtime", "agentbox_harness", "pytest", "_pytest")),
    ("agentbox_runtime", ("agentbox_harness", "pytest", "_pytest")),
])
def test_package_imports_nothing_above_it(package: str, forbidden: tuple[str, ...]) -> None:
    bad = foreign_imports(package, forbidden)
    assert not bad, f"{package} must not import {', '.join(forbidden)}:\n  " + "\n  ".join(bad)


def test_the_checker_sees_a_function_level_upward_import(tmp_path: Path) -> None:
    """The graph reader counts an import inside a function and the layer check names the edge."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from agentbox_runtime.doctor import run_checks\n    return run_checks\n")
    names = set(imported_names("agentbox_runtime.hostcheck.mod", source))
    assert "agentbox_runtime.doctor.run_checks" in names
    edges = {"agentbox_runtime.hostcheck.check": {"agentbox_runtime.doctor"}}
    assert upward_edges(edges) == ["agentbox_runtime.hostcheck.check (hostcheck) -> agentbox_runtime.doctor (doctor)"]
    assert cycle({"a": {"b"}, "b": {"a"}, "c": {"a"}}) in (["a", "b", "a"], ["b", "a", "b"])
    found = cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert all(found[i + 1] in {"a": {"b"}, "b": {"c"}, "c": {"a"}}[found[i]] for i in range(len(found) - 1))
    assert cycle({"a": {"b"}, "b": set()}) == []
