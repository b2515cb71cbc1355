"""The import graph of prelock/: kernel interfaces stay below policy, and only native.py loads the C core.

Every module under prelock/ is parsed with ast, not imported, so a forbidden import
inside a function body is found as well as one at the top.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "prelock"

# Modules that wrap one kernel interface or a shared primitive. They are what policy
# builds on, so they must not depend on it.
KERNEL_INTERFACE_MODULES = ("procfs", "pagemap", "pagecache", "sysmem", "cgroupfs", "native", "files", "privilege",
                            "units", "errors")

# Policy, commands and their helpers, as globs on the first name below prelock.
POLICY_MODULES = ("plan", "scan", "targets", "locker", "daemon", "cli", "doctor*", "cache*", "bench*", "metrics",
                  "snapshot")

NATIVE_EXTENSION = "prelock._native"
NATIVE_WRAPPER = "native.py"


def module_name(path: Path) -> str:
    """Return the dotted name of a file under PACKAGE_DIR, such as prelock.cli.doctor."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> set[str]:
    """Return the dotted names that the module source imports, at any depth in its body.

    `from prelock import x` yields prelock.x, because x may be a submodule, and relative
    imports are resolved against the package of the module called name.
    """
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def policy_imports(imported: set[str]) -> list[str]:
    """Return the imported prelock modules whose first name below prelock matches POLICY_MODULES."""
    hits = []
    for dotted in sorted(imported):
        parts = dotted.split(".")
        if len(parts) < 2 or parts[0] != "prelock":
            continue
        if any(fnmatch.fnmatchcase(parts[1], pattern) for pattern in POLICY_MODULES):
            hits.append(dotted)
    return hits


def package_modules() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    return imported_modules(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


@pytest.mark.parametrize("name", KERNEL_INTERFACE_MODULES)
def test_kernel_interface_imports_no_policy(name):
    path = PACKAGE_DIR / f"{name}.py"
    assert path.is_file(), f"{path} is missing: update KERNEL_INTERFACE_MODULES if it was renamed"

    assert policy_imports(imports_of(path)) == [], f"prelock.{name} imports policy modules"


def test_only_native_py_imports_extension():
    importers = [str(path.relative_to(PACKAGE_DIR)) for path in package_modules()
                 if any(dotted == NATIVE_EXTENSION or dotted.startswith(NATIVE_EXTENSION + ".")
                        for dotted in imports_of(path))]

    assert importers == [NATIVE_WRAPPER]


def test_every_module_parses():
    paths = package_modules()

    assert len(paths) > len(KERNEL_INTERFACE_MODULES)
    for path in paths:
        imports_of(path)  # raises SyntaxError on a module ast cannot parse


# The checker itself, on literal sources, so the tests above can fail.

CHECKER_CASES = [
    pytest.param("from prelock import plan\n", ["prelock.plan"], id="from-package"),
    pytest.param("from prelock.daemon import run\n", ["prelock.daemon", "prelock.daemon.run"], id="from-module"),
    pytest.param("import prelock.cli.render\n", ["prelock.cli.render"], id="import-dotted"),
    pytest.param("from . import doctor_node\n", ["prelock.doctor_node"], id="relative"),
    pytest.param("from .cache_render import printable\n", ["prelock.cache_render", "prelock.cache_render.printable"],
                 id="relative-module"),
    pytest.param("def f():\n    from prelock.bench import thrash\n", ["prelock.bench", "prelock.bench.thrash"],
                 id="inside-function"),
    pytest.param("from prelock import snapshot as saved\n", ["prelock.snapshot"], id="alias"),
    pytest.param("from prelock import pagecache, sysmem, units\nimport os\n", [], id="allowed"),
    pytest.param("from prelock import doctor_snapshot_extra\n", ["prelock.doctor_snapshot_extra"], id="glob"),
    pytest.param("import planner\nfrom prelockd import plan\n", [], id="other-packages"),
]


@pytest.mark.parametrize("source, expected", CHECKER_CASES)
def test_checker_finds_policy_imports(source, expected):
    assert policy_imports(imported_modules(source, "prelock.procfs")) == expected


def test_checker_relative_import_in_subpackage():
    imported = imported_modules("from .. import _native\nfrom .render import print_table\n", "prelock.cli.status")

    assert NATIVE_EXTENSION in imported
    assert "prelock.cli.render" in imported


def test_checker_relative_import_in_package_init():
    imported = imported_modules("from .doctor import doctor\n", "prelock.cli", is_package=True)

    assert "prelock.cli.doctor" in imported


def test_module_name_of_files():
    assert module_name(PACKAGE_DIR / "cli" / "__init__.py") == "prelock.cli"
    assert module_name(PACKAGE_DIR / "cli" / "doctor.py") == "prelock.cli.doctor"
