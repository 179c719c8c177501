"""Unit tests of the notification templates: parts, fallbacks, and every way a render is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from herald.exceptions import ServiceError, TemplateError
from herald.notify import rendering


def make_template(folder: Path, name: str, **parts: str) -> Path:
    """Write template `name` under `folder`; keyword `email_subject_txt` becomes `email_subject.txt`."""
    directory = folder / name
    directory.mkdir(parents=True)
    files = {"title_txt": "T", "body_txt": "B", **parts}
    for key, text in files.items():
        stem, _, extension = key.rpartition("_")
        (directory / f"{stem}.{extension}").write_text(text, encoding="utf-8")
    return folder


def test_shipped_templates_are_listed() -> None:
    assert rendering.template_names() == ["digest", "order_shipped", "welcome"]


def test_welcome_renders_every_part_with_overrides_and_fallbacks() -> None:
    out = rendering.render("welcome", {"name": "Ann"})
    assert out.title == "Welcome, Ann!"
    assert out.body.startswith("Hi Ann,")
    assert out.email_subject == "Welcome aboard, Ann"
    assert out.email_body == out.body
    assert out.email_html is not None and "<p>Hi Ann,</p>" in out.email_html
    assert (out.in_app_title, out.in_app_body) == (out.title, out.body)
    assert out.webhook_payload == {"event": "user.welcome", "name": "Ann"}


def test_order_shipped_optional_tracking_url() -> None:
    without = rendering.render("order_shipped", {"order_id": "A-1", "carrier": "DHL"})
    assert without.body == "Your order A-1 is on its way with DHL."
    assert without.email_subject == without.title == "Order A-1 has shipped"
    assert without.webhook_payload["tracking_url"] is None

    url = "https://track.example/A-1"
    with_url = rendering.render("order_shipped", {"order_id": "A-1", "carrier": "DHL", "tracking_url": url})
    assert with_url.body.endswith(f"Track it here: {url}")
    assert with_url.webhook_payload == {
        "event": "order.shipped",
        "order_id": "A-1",
        "carrier": "DHL",
        "tracking_url": url,
    }


def test_every_override_is_used_and_no_payload_means_empty(tmp_path: Path) -> None:
    folder = make_template(
        tmp_path,
        "full",
        email_subject_txt="S {{ x }}",
        email_body_txt="EB {{ x }}",
        in_app_title_txt="IT {{ x }}",
        in_app_body_txt="IB {{ x }}",
    )
    out = rendering.render("full", {"x": 1}, folder=folder)
    assert (out.title, out.body) == ("T", "B")
    assert (out.email_subject, out.email_body, out.in_app_title, out.in_app_body) == ("S 1", "EB 1", "IT 1", "IB 1")
    assert out.webhook_payload == {}


def test_text_is_not_html_escaped() -> None:
    out = rendering.render("welcome", {"name": "Tom & <Jerry>"})
    assert out.title == "Welcome, Tom & <Jerry>!"
    assert out.webhook_payload["name"] == "Tom & <Jerry>"


def test_the_html_part_is_autoescaped_and_the_text_parts_are_not(tmp_path: Path) -> None:
    folder = make_template(
        tmp_path, "page", title_txt="{{ x }}", email_body_txt="{{ x }}", email_body_html="<p>{{ x }}</p>\n\n"
    )
    x = "<script>alert('x')</script> & co"
    out = rendering.render("page", {"x": x}, folder=folder)
    assert out.email_html == "<p>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co</p>"
    assert (out.title, out.email_body) == (x, x)


def test_without_an_html_part_there_is_no_html(tmp_path: Path) -> None:
    folder = make_template(tmp_path, "plain", email_body_txt="text")
    assert rendering.render("plain", {}, folder=folder).email_html is None


def test_the_sandbox_also_guards_the_html_part(tmp_path: Path) -> None:
    folder = make_template(tmp_path, "evil", email_body_html="{{ ''.__class__.__mro__ }}")
    with pytest.raises(TemplateError, match=r"part 'email_body\.html' was refused by the sandbox"):
        rendering.render("evil", {}, folder=folder)


def test_json_payload_encodes_values_that_look_like_json() -> None:
    sneaky = 'x", "admin": true, "y": "'
    assert rendering.render("welcome", {"name": sneaky}).webhook_payload == {"event": "user.welcome", "name": sneaky}


def test_missing_variable_is_named() -> None:
    with pytest.raises(TemplateError, match=r"missing variable: 'carrier' is undefined"):
        rendering.render("order_shipped", {"order_id": "A-1"})


def test_unknown_template_lists_the_known_ones() -> None:
    with pytest.raises(
        TemplateError, match=r"unknown template 'nope'; known templates: digest, order_shipped, welcome"
    ):
        rendering.render("nope", {})


@pytest.mark.parametrize("name", ["../settings", "welcome/../x", "WELCOME", "welcome\n", "", "/etc/passwd", "a" * 65])
def test_names_outside_the_pattern_are_refused(name: str) -> None:
    with pytest.raises(TemplateError, match="invalid template name"):
        rendering.render(name, {"name": "Ann"})


def test_a_folder_without_the_required_parts_is_not_a_template(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "title.txt").write_text("T")
    make_template(tmp_path, "whole")
    assert rendering.template_names(tmp_path) == ["whole"]
    with pytest.raises(TemplateError, match="unknown template 'half'; known templates: whole"):
        rendering.render("half", {}, folder=tmp_path)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ x.__class__ }}",
    ],
)
def test_sandbox_escapes_are_refused(tmp_path: Path, source: str) -> None:
    folder = make_template(tmp_path, "evil", body_txt=source)
    with pytest.raises(
        TemplateError, match=r"refused by the sandbox: access to attribute '__\w+__' of '\w+' object is unsafe"
    ):
        rendering.render("evil", {"x": "y"}, folder=folder)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ('{"a": {{ x|tojson }}', "not valid JSON"),
        ("[{{ x|tojson }}]", "must be a JSON object, not list"),
        ('{"a": NaN}', "not valid JSON"),
        ('{"a": "{{ x }}"}', r"must pass every value through \|tojson"),
    ],
)
def test_bad_json_payloads_are_refused(tmp_path: Path, payload: str, message: str) -> None:
    folder = make_template(tmp_path, "hook", webhook_payload_json=payload)
    with pytest.raises(TemplateError, match=message):
        rendering.render("hook", {"x": 1}, folder=folder)


@pytest.mark.parametrize("value", ["Hi\r\nBcc: eve@example.com", "Hi\nthere", "Hi\rthere"])
def test_line_breaks_in_the_email_subject_are_refused(tmp_path: Path, value: str) -> None:
    folder = make_template(tmp_path, "inject", email_subject_txt="{{ subject }}")
    with pytest.raises(TemplateError, match="single line"):
        rendering.render("inject", {"subject": value}, folder=folder)


def test_a_title_with_line_breaks_is_refused_as_the_email_subject() -> None:
    with pytest.raises(TemplateError, match="single line"):
        rendering.render("order_shipped", {"order_id": "1\r\nBcc: eve@example.com", "carrier": "DHL"})


def test_surrounding_whitespace_and_the_final_newline_are_dropped(tmp_path: Path) -> None:
    folder = make_template(tmp_path, "ws", title_txt="  T\n\n", email_subject_txt="S\n", body_txt="B\n\n")
    out = rendering.render("ws", {}, folder=folder)
    assert (out.title, out.email_subject, out.body) == ("T", "S", "B")


def test_oversized_output_is_refused(tmp_path: Path) -> None:
    folder = make_template(tmp_path, "big", body_txt="{% for _ in range(2000) %}{{ x }}{% endfor %}")
    assert len(rendering.render("big", {"x": "a" * 50}, folder=folder).body) == 100_000
    with pytest.raises(TemplateError, match="more than 100000 bytes"):
        rendering.render("big", {"x": "a" * 51}, folder=folder)


def test_syntax_errors_bad_includes_and_type_errors_become_template_errors(tmp_path: Path) -> None:
    make_template(tmp_path, "broken", body_txt="{% if %}")
    make_template(tmp_path, "climb", body_txt="{% include '../settings.py' %}")
    make_template(tmp_path, "typed", body_txt="{{ x + 1 }}")
    with pytest.raises(TemplateError, match=r"'broken', part 'body\.txt' is broken: line 1"):
        rendering.render("broken", {}, folder=tmp_path)
    with pytest.raises(TemplateError, match=r"includes a missing template '\.\./settings\.py'"):
        rendering.render("climb", {}, folder=tmp_path)
    with pytest.raises(TemplateError, match=r"failed on the given values \(TypeError\)"):
        rendering.render("typed", {"x": "a"}, folder=tmp_path)


def test_template_error_is_a_service_error() -> None:
    assert issubclass(TemplateError, ServiceError)


def test_the_default_environment_is_cached() -> None:
    assert rendering._default_environment() is rendering._default_environment()
    assert rendering._default_environment().auto_reload is False
