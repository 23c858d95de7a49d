"""The package's one direction of dependency (docs/design.md section 4): every import of a
megatron_spd module, at module level or inside a function, points to the importer's own layer or
a lower one; nothing below ``cli`` imports argparse; ``options`` imports nothing of the package.
The checker runs on the real package and on a synthetic one with an upward import, which it must
refuse (so the rule cannot pass vacuously)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Lowest first. A module's layer is its first package part under megatron_spd.
LAYERS = [("errors", "options"), ("files",), ("parallel",), ("core",), ("data",), ("convert",),
          ("checkpoint",), ("loading",), ("inference",), ("train",), ("evaluate",), ("recipe",),
          ("bench",), ("integrations",), ("cli",), ("testing",)]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
CLI = RANK["cli"]
#: Modules below cli that use argparse for Megatron-LM's data, not for a command line of ours:
#: Megatron-LM keeps its parsed arguments (an ``argparse.Namespace``) in every checkpoint, and
#: its ``extra_args_provider`` hook receives Megatron-LM's own parser.
ARGPARSE_AS_DATA = {"checkpoint/args.py", "checkpoint/read.py", "integrations/megatron_lm.py"}


def _module_name(package_dir: Path, py: Path) -> list[str]:
    parts = list(py.relative_to(package_dir.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(package_dir: Path, py: Path):
    """(line, imported module parts) of every import in ``py``, relative ones resolved."""
    parts = _module_name(package_dir, py)
    package = parts if py.name == "__init__.py" else parts[:-1]
    for node in ast.walk(ast.parse(py.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")
        elif isinstance(node, ast.ImportFrom):
            base = (package[: len(package) - node.level + 1] if node.level else [])
            base = base + (node.module.split(".") if node.module else [])
            for a in node.names:  # "from . import x" imports the module x
                yield node.lineno, base + ([a.name] if not node.module else [])


def layer_violations(package_dir: Path) -> list[str]:
    """Every upward import (and argparse below cli) in the package at ``package_dir``."""
    top = package_dir.name
    found = []
    for py in sorted(package_dir.rglob("*.py")):
        me = _module_name(package_dir, py)
        if len(me) < 2:  # the package's own __init__: the lazy public API, above every layer
            continue
        mine = RANK[me[1]]
        for line, target in _imports(package_dir, py):
            where = f"{py.relative_to(package_dir.parent)}:{line}"
            as_data = "/".join(py.relative_to(package_dir).parts) in ARGPARSE_AS_DATA
            if target[0] == "argparse" and mine < CLI and not as_data:
                found.append(f"{where} imports argparse below cli")
            if target[0] != top or len(target) < 2 or target[1] not in RANK:
                continue
            if me[1] == "options":
                found.append(f"{where}: options must import nothing of the package")
            elif RANK[target[1]] > mine:
                found.append(f"{where}: {'.'.join(me[1:])} ({me[1]}) imports "
                             f"{'.'.join(target[1:])} ({target[1]}), a higher layer")
    return found


def test_package_imports_point_down():
    assert layer_violations(ROOT / "megatron_spd") == []


def test_every_package_module_has_a_layer():
    names = {p.name if p.is_dir() else p.stem for p in (ROOT / "megatron_spd").iterdir()
             if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert names - {"__init__"} <= set(RANK), names - set(RANK)


def test_checker_refuses_an_upward_import(tmp_path):
    pkg = tmp_path / "megatron_spd"
    (pkg / "core").mkdir(parents=True)
    (pkg / "cli").mkdir()
    for d in (pkg, pkg / "core", pkg / "cli"):
        (d / "__init__.py").write_text("")
    (pkg / "cli" / "common.py").write_text("import argparse\nfrom ..core import spec\n")
    (pkg / "core" / "spec.py").write_text("import argparse\n\n\ndef f():\n"
                                          "    from ..cli.common import parser\n")
    found = layer_violations(pkg)
    assert len(found) == 2, found
    assert "core/spec.py:1 imports argparse below cli" in found[0]
    assert "core/spec.py:5: core.spec (core) imports cli.common (cli)" in found[1]
