"""The API docs work without internet: /docs (Swagger UI) and /redoc load their scripts from the service.

A real uvicorn process of the app, with API keys set, on the test Redis; a headless Chromium in which
no host name resolves clicks "Authorize" and "Try it out" as a person would.
"""

from __future__ import annotations

import json
import re

import pytest
from pydantic import SecretStr
from redis import Redis
from rq import Queue

from settings import Settings
from tests.cdp import Browser
from tests.conftest import MakeClient

API_KEY = "docs-test-key"

SWAGGER_PATHS = "[...document.querySelectorAll('.opblock-summary-path')].map(e => e.textContent.trim())"
SEND_EMAIL = "[...document.querySelectorAll('.opblock-post')].find(b => b.querySelector('.opblock-summary-path')?.textContent.trim() === '/send-email')"  # noqa: E501
RESPONSE_STATUS = f"{SEND_EMAIL}?.querySelector('.live-responses-table tbody .response-col_status')?.textContent.trim()"


@pytest.fixture
def api_env() -> dict[str, str]:
    """`api_url`'s API with an API key set."""
    return {"API_KEY": API_KEY}


def _click(browser: Browser, selector: str, within: str = "document") -> None:
    browser.wait_for(f"!!{within}?.querySelector({json.dumps(selector)})", f"{selector} to show")
    browser.run(f"{within}.querySelector({json.dumps(selector)}).click()")


def _authorize(browser: Browser, key: str) -> None:
    """Swagger UI's "Authorize" dialog: type the key into the first scheme's field, authorize, close."""
    _click(browser, ".auth-wrapper .authorize")
    browser.wait_for("!!document.querySelector('.modal-ux input')", "the Authorize dialog")
    browser.run("document.querySelector('.modal-ux input').focus()")
    browser.type(key)
    _click(browser, ".modal-ux .auth-btn-wrapper .authorize")
    _click(browser, ".modal-ux .btn-done")


def test_swagger_ui_works_offline_and_try_it_out_queues_an_email(api_url: str, browser: Browser, redis: Redis) -> None:
    browser.open(f"{api_url}/docs")
    paths = browser.wait_for(f"{SWAGGER_PATHS}.length && {SWAGGER_PATHS}", "the operations list")
    assert {"/send-email", "/notifications", "/job/{job_id}"} <= set(paths)
    _authorize(browser, API_KEY)
    _click(browser, ".opblock-summary-control", within=SEND_EMAIL)
    _click(browser, ".try-out__btn", within=SEND_EMAIL)
    _click(browser, ".execute", within=SEND_EMAIL)
    assert browser.wait_for(RESPONSE_STATUS, "the answer to Execute") == "202"
    [job_id] = Queue("default", connection=redis).job_ids
    job = Queue("default", connection=redis).fetch_job(job_id)
    assert job is not None and job.kwargs["to"] == "ann@example.com"
    _assert_only_the_service_was_asked(browser, api_url)


def test_redoc_works_offline(api_url: str, browser: Browser) -> None:
    browser.open(f"{api_url}/redoc")
    script = "[...document.querySelectorAll('.api-content h2')].map(e => e.textContent.trim())"
    titles = browser.wait_for(f"{script}.length && {script}", "ReDoc to render the operations")
    assert "Send Email" in titles and "Create Notification" in titles
    _assert_only_the_service_was_asked(browser, api_url)


def _assert_only_the_service_was_asked(browser: Browser, api_url: str) -> None:
    elsewhere = [url for url in browser.requested if not url.startswith((api_url, "data:", "blob:", "about:"))]
    assert not elsewhere, f"the page asked outside the service: {elsewhere}"


def test_docs_and_their_assets_need_no_key(make_client: MakeClient) -> None:
    client = make_client(Settings(api_keys=[SecretStr(API_KEY)]))
    pages = {path: client.get(path) for path in ("/docs", "/redoc")}
    assert all(page.status_code == 200 for page in pages.values())
    assets = {src for page in pages.values() for src in _local_assets(page.text)}
    assert any(src.endswith(".js") for src in assets) and any(src.endswith(".css") for src in assets)
    for src in assets:
        assert client.get(src).status_code == 200, src
    assert client.post("/send-email", json={}).status_code == 401


def _local_assets(page: str) -> list[str]:
    """The scripts and styles a docs page loads; every one must come from the service itself."""
    sources = re.findall(r"""(?:src|href)=["']([^"']+\.(?:js|css|png))["']""", page)
    assert all(source.startswith("/") for source in sources), sources
    return sources
