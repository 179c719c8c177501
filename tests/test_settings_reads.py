"""The settings are read at the entry points only; the library (`herald/`) is given them.

An entry point is what a process or RQ starts from: the top-level modules (`app.py`, `tasks.py`,
`worker.py`, `scheduler.py`, `rqconfig.py`), `herald/serve.py`, `herald/mailsink.py`, and the handler
uvicorn's supervisor builds from `uvicorn_logging.json`. Anywhere else in `herald/`, a call of
`get_settings()` or `settings_or_exit()` would read settings that the app or worker was not built with.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READERS = {"get_settings", "settings_or_exit"}
ENTRY_MODULES = {"herald/serve.py", "herald/mailsink.py"}
ENTRY_FUNCTIONS = {("herald/infra/logs.py", "uvicorn_handler")}


def reads_outside_entry_points(relative: str, source: str) -> list[str]:
    """`file:line in function` of each use of a settings reader in the module `relative` (a path from
    the project's root) whose code is `source`, outside an entry point."""
    if relative in ENTRY_MODULES:
        return []
    found: list[str] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            name = child.id if isinstance(child, ast.Name) else child.attr if isinstance(child, ast.Attribute) else ""
            if name in READERS and (relative, function) not in ENTRY_FUNCTIONS:
                assert isinstance(child, ast.expr)
                found.append(f"{relative}:{child.lineno} in {function or 'the module'}")
            visit(child, inner)

    visit(ast.parse(source, relative), "")
    return found


def test_the_library_reads_no_settings_of_its_own() -> None:
    paths = sorted((ROOT / "herald").rglob("*.py"))
    found = [place for path in paths for place in reads_outside_entry_points(_relative(path), path.read_text())]
    assert found == [], "pass the settings in instead:\n" + "\n".join(found)


def test_the_check_finds_a_read_in_a_library_function_and_allows_the_entry_points() -> None:
    code = "import settings\nfrom settings import get_settings\n\n"
    code += (
        "def limit() -> int:\n    return get_settings().inbox_size\n\nSIZE = settings.settings_or_exit().inbox_size\n"
    )
    found = reads_outside_entry_points("herald/notify/example.py", code)
    assert found == ["herald/notify/example.py:5 in limit", "herald/notify/example.py:7 in the module"]
    assert reads_outside_entry_points("herald/serve.py", code) == []
    handler = "from settings import get_settings\n\ndef uvicorn_handler() -> object:\n    return get_settings()\n"
    assert reads_outside_entry_points("herald/infra/logs.py", handler) == []
    assert reads_outside_entry_points("herald/infra/connections.py", handler) == [
        "herald/infra/connections.py:4 in uvicorn_handler"
    ]


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()
