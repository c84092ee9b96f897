"""Imports go one way: every module of the package imports only from its own layer or the layers below.

Layers, lowest first (a module belongs to the layer of its longest matching prefix):

- foundation: ``fss`` (the package, whose API ``lazy`` imports on first use), errors, constants, and
  ``validation`` (safe reading of torch files), which models and checkpoints both use;
- kernels; models (methods, encoders, the registry);
- io (``fss.io`` or a package of that name, ``fss.memory``);
- backends: encoder sessions and bundles read and run (``fss.backends``);
- checkpoint: ``fss.checkpoint``, whose ``load_model`` opens any model file, bundles included;
- export: bundle writing (``fss.export``), used by the runtime's encoder cache;
- runtime: the ``Segmenter`` and the encoder paths;
- apps: each command (``fss-run``, ``fss-export``, ``fss-serve``, ``fss-demo``, training and evaluation)
  with the shared CLI helpers; apps may use each other only without a cycle.

Function-level (lazy) imports count as much as module-level ones.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    ("foundation", ["fss", "fss.errors", "fss.constants", "fss.lazy", "fss.validation"]),
    ("kernels", ["fss.kernels"]),
    ("models", ["fss.models"]),
    ("io", ["fss.io", "fss.memory"]),
    ("backends", ["fss.backends"]),
    ("checkpoint", ["fss.checkpoint"]),
    ("export", ["fss.export"]),
    ("runtime", ["fss.runtime"]),
    ("apps", ["fss.runtime.cli", "fss.export.cli", "fss.export.triton_repo", "fss.serve", "fss.demo"]),
    ("apps", ["fss.runtime.cli_video"]),  # fss-run on a video
    ("apps", ["fss.train", "fss.command", "fss.cli", "fss.cli_args", "fss.entry"]),
]
# Apps, as the groups whose imports of each other must not form a cycle.
APPS = {
    "fss.runtime.cli": "fss-run",
    "fss.runtime.cli_video": "fss-run",
    "fss.export.cli": "fss-export",
    "fss.export.triton_repo": "fss-export",
    "fss.serve": "fss-serve",
    "fss.demo": "fss-demo",
    "fss.train": "training",
    "fss.command": "cli helpers",
    "fss.cli": "cli helpers",
    "fss.cli_args": "cli helpers",
    "fss.entry": "entry points",
}
RANK = {name: rank for rank, name in enumerate(dict.fromkeys(name for name, _ in LAYERS))}


def package_folders() -> dict[str, Path]:
    """Module prefix -> source folder, as the wheel maps them (pyproject.toml)."""
    config = (ROOT / "pyproject.toml").read_text()  # tomllib is Python 3.11+
    section = config.split("[tool.scikit-build.wheel.packages]")[1].split("\n[")[0]
    packages = re.findall(r'^"([^"]+)" = "([^"]+)"$', section, re.M)
    return {target.replace("/", "."): ROOT / source for target, source in packages}


def source_modules(folders: dict[str, Path]) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a folder mapped on its own wins over ``fss/``)."""
    modules = {}
    for prefix, folder in sorted(folders.items(), key=lambda item: len(item[0])):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def longest_prefix(name: str, prefixes) -> str | None:
    matches = [p for p in prefixes if name == p or name.startswith(p + ".")]
    return max(matches, key=len, default=None)


def layer_of(module: str) -> str | None:
    found = longest_prefix(module, [p for _, prefixes in LAYERS for p in prefixes])
    return next((name for name, prefixes in LAYERS if found in prefixes), None)


def imported_modules(module: str, path: Path, known) -> list[tuple[str, int]]:
    """``(fss module, line)`` for every import in the file, at any depth (lazy ones too)."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            for alias in node.names:  # `from fss.export import verify` imports the module fss.export.verify
                submodule = f"{base}.{alias.name}"
                found.append((submodule if submodule in known else base, node.lineno))
    return [(name, line) for name, line in found if name == "fss" or name.startswith("fss.")]


def import_graph(folders: dict[str, Path]) -> list[tuple[str, Path, str, int]]:
    """``(module, its file, fss module it imports, line)`` for every import of the package."""
    modules = source_modules(folders)
    return [
        (module, path, target, line)
        for module, path in sorted(modules.items())
        for target, line in imported_modules(module, path, modules)
    ]


def test_every_module_has_a_layer():
    unmapped = sorted(m for m in source_modules(package_folders()) if layer_of(m) is None)
    assert not unmapped, f"modules without a layer (add them to LAYERS): {', '.join(unmapped)}"


def test_no_import_goes_up_a_layer():
    upward = []
    for module, path, target, line in import_graph(package_folders()):
        here, there = layer_of(module), layer_of(target)
        if there is not None and RANK[there] > RANK[here]:
            where = f"{path.relative_to(ROOT)}:{line}"
            upward.append(f"{where} imports {target} (layer {there} above {here})")
    assert not upward, "imports going up a layer:\n" + "\n".join(upward)


def app_of(module: str) -> str | None:
    found = longest_prefix(module, APPS)
    return APPS[found] if found else None


def test_apps_import_each_other_without_a_cycle():
    uses: dict[str, dict[str, str]] = {}
    for module, path, target, line in import_graph(package_folders()):
        mine, theirs = app_of(module), app_of(target)
        if mine and theirs and mine != theirs:
            uses.setdefault(mine, {}).setdefault(theirs, f"{path.relative_to(ROOT)}:{line} imports {target}")

    def cycle_from(app, trail):
        for other in uses.get(app, {}):
            if other in trail:
                return [*trail[trail.index(other) :], other]
            if found := cycle_from(other, [*trail, other]):
                return found
        return None

    for app in uses:
        if cycle := cycle_from(app, [app]):
            links = [uses[a][b] for a, b in zip(cycle, cycle[1:], strict=False)]
            pytest.fail(f"apps import each other in a cycle ({' -> '.join(cycle)}):\n" + "\n".join(links))


def test_the_scan_finds_lazy_and_relative_imports(tmp_path):
    """The scan itself: imports inside functions and relative ones are found, with their lines."""
    folder = tmp_path / "fss"
    (folder / "models").mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "models" / "__init__.py").write_text("")
    (folder / "models" / "leaky.py").write_text(
        "def f():\n    from fss.runtime import segmenter\n\n\ndef g():\n    from . import leaky\n"
    )
    graph = import_graph({"fss": folder})
    leaky = folder / "models" / "leaky.py"
    assert graph == [
        ("fss.models.leaky", leaky, "fss.runtime", 2),
        ("fss.models.leaky", leaky, "fss.models.leaky", 6),
    ]
    assert RANK[layer_of("fss.runtime")] > RANK[layer_of("fss.models.leaky")]
