"""Fail when code outside `herald/rq_seam` uses a private name of rq, rq_scheduler or redis-py.

`python scripts/check_private_names.py [FILE ...]` (default: every .py of the project but the seam)
reports, one per line, and exits 1 on any of:
- an import of a private name or module of those packages (`from rq.utils import _x`, `redis._parsers`);
- an attribute whose name is private in those packages (`job._status`), or an internal list of theirs
  (`pipeline.command_stack`), read or written on anything but `self`/`cls`;
- `getattr`/`setattr`/`hasattr` with such a name as a string (`"__rq_redis_server_version"`);
- a class that subclasses a class of rq or rq_scheduler.
The private names are read from the installed packages' own source.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rq", "rq_scheduler", "redis")
SUBCLASSED = ("rq", "rq_scheduler")
"""Whose classes are subclassed only in the seam (redis-py's connection classes may be, in `infra`)."""
SEAM = ROOT / "herald" / "rq_seam"
SKIPPED = {".venv", "var", ".git", "node_modules"}
INTERNAL = {"command_stack"}
"""Public-looking names that are the packages' internals all the same."""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _their_module(module: str | None, packages: tuple[str, ...] = PACKAGES) -> bool:
    return bool(module) and module.split(".")[0] in packages  # type: ignore[union-attr]


def private_names() -> set[str]:
    """Every private name defined in the installed packages: functions, methods, class and module
    names, and attributes they set on `self`."""
    names = set(INTERNAL)
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec and spec.submodule_search_locations, package
        for path in Path(next(iter(spec.submodule_search_locations))).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(node.name)
                elif isinstance(node, ast.Attribute | ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.attr if isinstance(node, ast.Attribute) else node.id)
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("__rq"):
                    names.add(node.value)
    return {name for name in names if _is_private(name) or name in INTERNAL}


def _imported_classes(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names bound to objects of rq and rq_scheduler (`from rq import Worker`), and to their modules."""
    objects, modules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _their_module(node.module, SUBCLASSED):
            objects |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            their = [alias for alias in node.names if _their_module(alias.name, SUBCLASSED)]
            modules |= {alias.asname or alias.name.split(".")[0] for alias in their}
    return objects, modules


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def findings(path: Path, private: set[str]) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    objects, modules = _imported_classes(tree)
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and _their_module(node.module):
            if any(_is_private(part) for part in node.module.split(".")):  # type: ignore[union-attr]
                yield f"{where}: import from private module {node.module}"
            yield from (f"{where}: import of private {alias.name}" for alias in node.names if _is_private(alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _their_module(alias.name) and any(_is_private(part) for part in alias.name.split(".")):
                    yield f"{where}: import of private module {alias.name}"
        elif isinstance(node, ast.Attribute) and node.attr in private:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                yield f"{where}: private attribute {node.attr}"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1:
                name = node.args[1]
                if isinstance(name, ast.Constant) and name.value in private:
                    yield f"{where}: private attribute {name.value} by name"
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                root = _root_name(base)
                if (isinstance(base, ast.Name) and base.id in objects) or (
                    isinstance(base, ast.Attribute) and root in modules | objects
                ):
                    yield f"{where}: class {node.name} subclasses {ast.unparse(base)} (subclasses live in the seam)"


def project_files() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if not SKIPPED & set(relative.parts) and not path.is_relative_to(SEAM):
            yield path


def main(argv: list[str]) -> int:
    private = private_names()
    paths = [Path(arg) for arg in argv] or list(project_files())
    found = [finding for path in paths for finding in findings(path, private)]
    print("\n".join(found) if found else f"no private name of {', '.join(PACKAGES)} outside herald/rq_seam")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
