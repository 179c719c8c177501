"""Named notification templates, rendered with Jinja2's sandbox into each channel's parts.

Layout: `templates/<name>/title.txt` and `body.txt` (required), and optional overrides
`email_subject.txt`, `email_body.txt`, `in_app_title.txt`, `in_app_body.txt` (missing ones fall back to
the title or body), `email_body.html` (the email's HTML alternative; no fallback: without it the email is
plain text) and `webhook_payload.json` (a Jinja template that must render to a JSON object; every
`{{ … }}` in it must go through `|tojson`, so a value can never change the JSON's structure).

Only `.html` parts are autoescaped: text parts keep `<` and `&` as they are, which is right for plain text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from herald.exceptions import PartTooLargeError, TemplateError
from herald.infra.patterns import TEMPLATE_NAME_PATTERN

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
NAME_PATTERN = re.compile(TEMPLATE_NAME_PATTERN)
MAX_PART_BYTES = 100_000
"""Upper bound of each rendered part, in UTF-8 bytes (the same bound as an email body)."""
REQUIRED_PARTS = ("title.txt", "body.txt")
PAYLOAD_PART = "webhook_payload.json"
HTML_PART = "email_body.html"


@dataclass(frozen=True)
class Rendered:
    """One template's output for every channel; `title` and `body` are the defaults."""

    title: str
    body: str
    email_subject: str
    email_body: str
    in_app_title: str
    in_app_body: str
    webhook_payload: dict[str, Any]
    email_html: str | None = None
    """The HTML alternative of `email_body`, when the template has `email_body.html`."""


def make_environment(folder: Path) -> SandboxedEnvironment:
    """A sandboxed environment on `folder`; tests use their own, the service the cached default."""
    return SandboxedEnvironment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False, default=False),
        auto_reload=False,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_json_values_only_through_tojson,
    )


@lru_cache(maxsize=1)
def _default_environment() -> SandboxedEnvironment:
    return make_environment(TEMPLATES_DIR)


@jinja2.pass_context
def _json_values_only_through_tojson(context: Context, value: Any) -> Any:
    """In a `.json` part, refuse any `{{ value }}` not encoded by `|tojson` (it could break the JSON).

    `tojson` returns markup (an object with `__html__`); context values are plain JSON types, never markup.
    """
    if (context.name or "").endswith(".json") and not hasattr(value, "__html__"):
        raise TemplateError(f"template part {context.name!r} must pass every value through |tojson")
    return value


def template_names(folder: Path | None = None) -> list[str]:
    """The names of the templates in `folder` (default: the shipped ones), sorted."""
    folder = folder or TEMPLATES_DIR
    if not folder.is_dir():
        return []
    return sorted(path.name for path in folder.iterdir() if _is_template(folder, path.name))


def _is_template(folder: Path, name: str) -> bool:
    return bool(NAME_PATTERN.fullmatch(name)) and all((folder / name / part).is_file() for part in REQUIRED_PARTS)


def render(name: str, context: dict[str, Any], *, folder: Path | None = None) -> Rendered:
    """Render template `name` with `context`; raise `TemplateError` with a client-safe message.

    Titles and the subject lose surrounding whitespace, bodies trailing whitespace.
    `folder` is for tests: the default is the shipped `templates/`, with a cached environment.
    """
    environment = _default_environment() if folder is None else make_environment(folder)
    _check_known(name, folder or TEMPLATES_DIR)

    def part(filename: str) -> str | None:
        return _render_part(environment, name, filename, context)

    title = _required(name, "title.txt", part("title.txt")).strip()
    body = _required(name, "body.txt", part("body.txt")).rstrip()
    return Rendered(
        title=title,
        body=body,
        email_subject=_single_line(name, (part("email_subject.txt") or title).strip()),
        email_body=(part("email_body.txt") or body).rstrip(),
        in_app_title=(part("in_app_title.txt") or title).strip(),
        in_app_body=(part("in_app_body.txt") or body).rstrip(),
        webhook_payload=_parse_payload(name, part(PAYLOAD_PART)),
        email_html=_stripped(part(HTML_PART)),
    )


def _check_known(name: str, folder: Path) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise TemplateError(f"invalid template name {name[:100]!r}; known templates: {_known(folder)}")
    if not _is_template(folder, name):
        raise TemplateError(f"unknown template {name!r}; known templates: {_known(folder)}")


def _known(folder: Path) -> str:
    return ", ".join(template_names(folder)) or "(none)"


def _render_part(environment: SandboxedEnvironment, name: str, part: str, context: dict[str, Any]) -> str | None:
    """The rendered part, or None when the template has no such file (an optional override)."""
    where = f"template {name!r}, part {part!r}"
    try:
        template = environment.get_template(f"{name}/{part}")
    except jinja2.TemplateNotFound:
        return None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{where} is broken: line {exc.lineno}: {exc.message}") from exc
    try:
        return _bounded_join(where, template.generate(context))
    except SecurityError as exc:
        raise TemplateError(f"{where} was refused by the sandbox: {exc}") from exc
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"{where} has a missing variable: {exc.message}") from exc
    except jinja2.TemplateNotFound as exc:
        raise TemplateError(f"{where} includes a missing template {exc.name!r}") from exc
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{where} failed: {exc.message}") from exc
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateError(f"{where} failed on the given values ({type(exc).__name__})") from exc


def _required(name: str, part: str, text: str | None) -> str:
    if text is None:
        raise TemplateError(f"template {name!r} has no {part}")
    return text


def _bounded_join(where: str, chunks: Iterable[str]) -> str:
    """Join rendered chunks, stopping as soon as they exceed `MAX_PART_BYTES`."""
    parts: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk.encode())
        if size > MAX_PART_BYTES:
            raise PartTooLargeError(f"{where} rendered to more than {MAX_PART_BYTES} bytes")
        parts.append(chunk)
    return "".join(parts)


def _stripped(text: str | None) -> str | None:
    return None if text is None else text.rstrip()


def _single_line(name: str, subject: str) -> str:
    if "\r" in subject or "\n" in subject:
        raise TemplateError(f"template {name!r}: the email subject must be a single line")
    return subject


def _parse_payload(name: str, text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        payload = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else exc
        raise TemplateError(f"template {name!r}: {PAYLOAD_PART} is not valid JSON ({detail})") from exc
    if not isinstance(payload, dict):
        raise TemplateError(f"template {name!r}: {PAYLOAD_PART} must be a JSON object, not {type(payload).__name__}")
    return payload


def _refuse_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")
