"""One-click unsubscribe (RFC 8058): signed tokens, the headers of a real email, the open routes, and
the confirmation page clicked in headless Chromium against a real API process."""

from __future__ import annotations

import base64
import json
from email.message import EmailMessage
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from herald.mailsink import MailSink
from herald.notify import unsubscribe
from herald.notify.unsubscribe import Subscription, make_token, read_token
from settings import get_settings
from tests.cdp import Browser
from tests.test_preferences import _notify, _put, _wait_status

SECRET = "a-secret-of-our-own"
ANN = Subscription("ann", "marketing", "email")
API_KEY = "unsubscribe-test-key"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# Tokens


def test_a_token_names_its_user_topic_and_channel() -> None:
    token = make_token(SECRET, ANN)
    assert read_token(SECRET, token) == ANN
    assert make_token(SECRET, ANN) == token  # links in several emails of one topic are the same


def test_a_token_from_another_secret_is_refused() -> None:
    assert read_token(SECRET, make_token("another-secret", ANN)) is None


def test_every_changed_character_of_the_signature_is_refused() -> None:
    token = make_token(SECRET, ANN)
    payload, mac = token.split(".")
    for index, character in enumerate(mac):
        for replacement in {"A", "B", "-", "_"} - {character}:
            altered = mac[:index] + replacement + mac[index + 1 :]
            assert read_token(SECRET, f"{payload}.{altered}") is None, (index, replacement)


@pytest.mark.parametrize(
    "fields",
    [["bob", "marketing", "email"], ["ann", "general", "email"], ["ann", "*", "email"], ["ann", "marketing", "in_app"]],
)
def test_a_payload_changed_to_another_user_topic_or_channel_is_refused(fields: list[str]) -> None:
    """Forged or widened: the genuine signature of Ann's marketing email over another payload."""
    mac = make_token(SECRET, ANN).split(".")[1]
    forged = f"{_b64(json.dumps(fields, separators=(',', ':')).encode())}.{mac}"
    assert read_token(SECRET, forged) is None


@pytest.mark.parametrize(
    "token",
    ["", ".", "abc", "a.b.c", "x" * 2000, f"{'!' * 10}.{'A' * 43}", f"{_b64(b'[1,2,3]')}.{'A' * 43}"],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    assert read_token(SECRET, token) is None


def test_a_signed_payload_that_is_not_a_subscription_is_refused() -> None:
    """Even correctly signed, a payload must name a valid user, topic and channel."""
    for fields in (["ann", "marketing"], ["a b", "marketing", "email"], ["ann", "marketing", "sms"], {"u": 1}):
        payload = _b64(json.dumps(fields).encode())
        token = f"{payload}.{unsubscribe._mac(SECRET, payload)}"
        assert read_token(SECRET, token) is None, fields


# Email headers, the routes without an API key


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch, redis: Redis) -> None:
    """An API key is required everywhere else; the links name a public base URL."""
    for name, value in {"API_KEY": API_KEY, "PUBLIC_BASE_URL": "https://notify.example.com/"}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _link(mail: EmailMessage) -> str:
    """The URL as written on the wire: one `<...>` on one line, never folded into RFC 2047 encoded words
    (which parsers decode, but mail readers do not take for a URL)."""
    [raw] = [value for name, value in mail.raw_items() if name == "List-Unsubscribe"]
    assert raw.startswith("<") and raw.endswith(">") and "\n" not in raw and "=?" not in raw, raw
    return str(raw[1:-1])


def test_email_carries_one_click_headers_and_the_link_unsubscribes_without_a_key(
    keyed: None, client: TestClient, smtp: MailSink, worker: object
) -> None:
    client.headers.update(AUTH)
    answer = _notify(client, channels=["email"], topic="marketing")
    _wait_status(client, answer["notification_id"], "email", "delivered")
    [mail] = smtp.wait_for(1)
    link = _link(mail)
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert link.startswith("https://notify.example.com/unsubscribe/")
    path = urlsplit(link).path
    assert read_token(get_settings().unsubscribe_secret.get_secret_value(), path.rpartition("/")[2]) == ANN
    one_click = {"Content-Type": "application/x-www-form-urlencoded"}  # as mail readers send it (RFC 8058)
    response = client.post(path, content="List-Unsubscribe=One-Click", headers={**one_click, "Authorization": ""})
    assert response.status_code == 200, response.text
    assert response.json() == {"user_id": "ann", "topic": "marketing", "channel": "email", "subscribed": False}
    assert client.get("/users/ann/preferences").json()["topics"] == {"marketing": {"email": False}}
    [skipped] = _notify(client, channels=["email"], topic="marketing")["deliveries"]
    assert (skipped["status"], skipped["skip_reason"]) == ("skipped", "opted_out")


def test_unsubscribing_keeps_the_other_preferences(client: TestClient, redis: Redis) -> None:
    stored = {"channels": {"email": True, "webhook": False, "in_app": True}, "topics": {"news": {"in_app": False}}}
    _put(client, "ann", stored)
    token = make_token(get_settings().unsubscribe_secret.get_secret_value(), ANN)
    assert client.post(f"/unsubscribe/{token}").status_code == 200
    assert client.post(f"/unsubscribe/{token}").status_code == 200  # twice: the same
    topics = client.get("/users/ann/preferences").json()["topics"]
    assert topics == {"news": {"in_app": False}, "marketing": {"email": False}}


def test_a_bad_or_tampered_token_is_400_and_changes_nothing(keyed: None, client: TestClient, redis: Redis) -> None:
    token = make_token(get_settings().unsubscribe_secret.get_secret_value(), ANN)
    payload, mac = token.split(".")
    tampered = [
        f"{_b64(json.dumps(['bob', 'marketing', 'email']).encode())}.{mac}",
        f"{payload}.{mac[:-1]}{'B' if mac[-1] != 'B' else 'C'}",
        make_token("not-the-secret", ANN),
        "nonsense",
    ]
    for bad in tampered:
        response = client.post(f"/unsubscribe/{bad}")
        assert response.status_code == 400, bad
        assert response.json() == {"detail": "invalid unsubscribe token"}
    assert redis.keys("preferences:*") == []


def test_opening_the_link_shows_a_button_and_changes_nothing(keyed: None, client: TestClient, redis: Redis) -> None:
    token = make_token(get_settings().unsubscribe_secret.get_secret_value(), ANN)
    page = client.get(f"/unsubscribe/{token}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<form method="post">' in page.text and "<button" in page.text and "marketing" in page.text
    assert "form-action 'self'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    assert redis.keys("preferences:*") == []
    bad = client.get("/unsubscribe/nonsense")
    assert bad.status_code == 400 and "<form" not in bad.text and "not valid" in bad.text


def test_other_routes_still_need_the_key(keyed: None, client: TestClient) -> None:
    assert client.get("/users/ann/preferences").status_code == 401
    assert client.get("/users/ann/preferences", headers=AUTH).status_code == 200


def test_the_schema_marks_the_unsubscribe_routes_open(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert paths["/unsubscribe/{token}"]["post"]["security"] == []
    assert paths["/unsubscribe/{token}"]["get"]["security"] == []
    assert "security" not in paths["/users/{user_id}/preferences"]["put"]


# A person clicks the button in a browser


@pytest.fixture
def api_env() -> dict[str, str]:
    """`api_url`'s API with an API key set."""
    return {"API_KEY": API_KEY}


def test_the_page_button_unsubscribes_in_a_browser(api_url: str, browser: Browser, redis: Redis) -> None:
    token = make_token(get_settings().unsubscribe_secret.get_secret_value(), ANN)
    browser.open(f"{api_url}/unsubscribe/{token}")
    browser.wait_for("!!document.querySelector('form button')", "the Unsubscribe button")
    assert redis.keys("preferences:*") == []  # the page is shown: nothing changed yet
    browser.run("document.querySelector('form button').click()")
    done = browser.wait_for("document.querySelector('#done')?.textContent", "the confirmation")
    assert "marketing" in done
    assert redis.hget("preferences:ann", "topic:marketing:email") == b"false"
    assert browser.run("location.pathname") == f"/unsubscribe/{token}"


def test_unsubscribing_from_more_topics_than_one_put_may_send_still_reads_back(
    client: TestClient, redis: Redis
) -> None:
    secret = get_settings().unsubscribe_secret.get_secret_value()
    for number in range(101):
        assert (
            client.post(f"/unsubscribe/{make_token(secret, Subscription('ann', f't{number}', 'email'))}").status_code
            == 200
        )
    topics = client.get("/users/ann/preferences").json()["topics"]
    assert len(topics) == 101 and topics["t100"] == {"email": False}
