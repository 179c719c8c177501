"""The webhook channel against a real HTTP receiver on 127.0.0.1: signing, outcomes, SSRF guard.

No test sends traffic beyond loopback: public addresses only go through `check_url`, with every
socket connection of the process refused (`no_connections`), and host names come from a fake resolver.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from herald.exceptions import PermanentError, TransientError
from herald.notify.channels import webhook
from herald.notify.channels.base import Message
from settings import Settings
from tests.receiver import Receiver, verify_signature

SECRET = "whsec_" + base64.b64encode(b"test-only webhook signing key").decode()
TIMEOUT = 0.5
MESSAGE = Message(
    delivery_id="dlv_1",
    notification_id="ntf_1",
    user_id="usr_1",
    title="Invoice paid",
    body="Your invoice INV-7 was paid.",
    target="",
    payload={"invoice_id": "INV-7", "amount": {"value": 1250, "currency": "EUR"}},
    created_at="2026-01-05T10:00:00Z",
    correlation_id="req-42",
)

_connect_attempts: list[object] = []
_forbid_connections = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect" and _forbid_connections:
        _connect_attempts.append(args[1])
        raise RuntimeError(f"test made a connection attempt to {args[1]!r}")


sys.addaudithook(_audit)


@contextmanager
def no_connections() -> Iterator[list[object]]:
    """Make every socket connection attempt in the process fail the test; yields the attempts."""
    global _forbid_connections
    _connect_attempts.clear()
    _forbid_connections = True
    try:
        yield _connect_attempts
    finally:
        _forbid_connections = False


@pytest.fixture(autouse=True)
def webhook_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Test secret, loopback targets allowed, a short timeout."""
    monkeypatch.setenv("ENVIRONMENT", "local")
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("WEBHOOK_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("WEBHOOK_TIMEOUT_SECONDS", str(TIMEOUT))
    yield


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def allow_private(monkeypatch: pytest.MonkeyPatch, allowed: bool) -> None:
    monkeypatch.setenv("WEBHOOK_ALLOW_PRIVATE", str(allowed).lower())


def to(url: str, message: Message = MESSAGE) -> Message:
    return Message(**{**message.__dict__, "target": url})


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> list[str]:
    """Resolve the names in `answers` to those addresses (others as usual); returns the names looked up."""
    real = socket.getaddrinfo
    lookups: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        if not answers[host]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in answers[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Delivery


def test_delivers_signed_json_with_the_documented_body(receiver: Receiver) -> None:
    before = time.time()
    webhook.send(Settings(), to(f"{receiver.url}/hooks/in?src=notifications"))

    [request] = receiver.wait_for(1)
    assert (request.method, request.path) == ("POST", "/hooks/in?src=notifications")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == webhook.USER_AGENT
    assert request.headers["x-request-id"] == "req-42"
    assert request.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert request.headers["webhook-id"] == "dlv_1"
    assert before - 1 <= int(request.headers["webhook-timestamp"]) <= time.time()
    assert request.headers["webhook-signature"].startswith("v1,")
    assert verify_signature(SECRET, request.headers, request.body)
    assert json.loads(request.body) == {
        "type": "notification",
        "timestamp": "2026-01-05T10:00:00Z",
        "data": {
            "notification_id": "ntf_1",
            "delivery_id": "dlv_1",
            "user_id": "usr_1",
            "title": "Invoice paid",
            "body": "Your invoice INV-7 was paid.",
            "created_at": "2026-01-05T10:00:00Z",
            "correlation_id": "req-42",
            "invoice_id": "INV-7",
            "amount": {"value": 1250, "currency": "EUR"},
        },
    }


def test_signature_fails_with_another_secret_a_changed_body_or_an_old_timestamp(receiver: Receiver) -> None:
    webhook.send(Settings(), to(receiver.url))
    [request] = receiver.wait_for(1)
    other_secret = "whsec_" + base64.b64encode(b"another key").decode()
    assert not verify_signature(other_secret, request.headers, request.body)
    assert not verify_signature(SECRET, request.headers, request.body + b" ")
    assert not verify_signature(SECRET, request.headers, request.body, now=time.time() + 6 * 60)


def test_payload_cannot_replace_standard_fields_and_optional_ones_are_null(receiver: Receiver) -> None:
    message = Message(
        delivery_id="dlv_2", notification_id="ntf_2", user_id="usr_2", title="t", body="b", payload={"user_id": "x"}
    )
    webhook.send(Settings(), to(receiver.url, message))
    [request] = receiver.wait_for(1)
    document = json.loads(request.body)
    assert document["data"]["user_id"] == "usr_2"
    assert document["data"]["created_at"] is None
    assert document["data"]["correlation_id"] is None
    assert document["timestamp"].endswith("Z")
    assert "x-request-id" not in request.headers


def test_a_retry_sends_the_same_id_and_body(receiver: Receiver) -> None:
    receiver.fail_next(1, 503)
    with pytest.raises(TransientError):
        webhook.send(Settings(), to(receiver.url))
    webhook.send(Settings(), to(receiver.url))
    first, second = receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "dlv_1"
    assert first.body == second.body
    assert verify_signature(SECRET, second.headers, second.body)


# Outcomes


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_retryable_statuses_are_transient(receiver: Receiver, status: int) -> None:
    receiver.fail_next(1, status)
    with pytest.raises(TransientError, match=f"answered {status}"):
        webhook.send(Settings(), to(receiver.url))


@pytest.mark.parametrize("status", [400, 404, 410])
def test_other_client_errors_are_permanent(receiver: Receiver, status: int) -> None:
    receiver.fail_next(1, status, body=b"missing field: user")
    with pytest.raises(PermanentError, match=f"answered {status} .*: missing field: user"):
        webhook.send(Settings(), to(receiver.url))


def test_a_redirect_is_permanent_and_not_followed(receiver: Receiver) -> None:
    receiver.fail_next(1, 302, headers={"location": f"{receiver.url}/elsewhere"})
    with pytest.raises(PermanentError, match=r"302 Found .*redirects are not followed"):
        webhook.send(Settings(), to(f"{receiver.url}/hook"))
    assert [request.path for request in receiver.requests] == ["/hook"]


def test_error_messages_hold_neither_the_secret_nor_the_signature(receiver: Receiver) -> None:
    echo = lambda request: request.headers["webhook-signature"].encode() + SECRET.encode()  # noqa: E731
    receiver.fail_next(1, 400, body=echo)
    with pytest.raises(PermanentError) as raised:
        webhook.send(Settings(), to(receiver.url))
    signature = receiver.requests[0].headers["webhook-signature"]
    assert signature.partition(",")[2] not in str(raised.value)
    assert SECRET not in str(raised.value)
    assert SECRET.removeprefix("whsec_") not in str(raised.value)


def test_connection_refused_is_transient() -> None:
    with pytest.raises(TransientError, match="unreachable"):
        webhook.send(Settings(), to(f"http://127.0.0.1:{free_port()}/"))


def test_a_slow_receiver_times_out_as_transient(receiver: Receiver) -> None:
    """How soon the timeout ends the request is measured by `python -m bench` (bench.outage)."""
    receiver.delay = 5 * TIMEOUT
    started = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        webhook.send(Settings(), to(receiver.url))
    assert time.monotonic() - started >= TIMEOUT
    assert len(receiver.requests) == 1


@pytest.mark.parametrize(
    ("secret", "valid"), [("whsec_!!!", False), ("whsec_", False), (base64.b64encode(b"k").decode(), True)]
)
def test_the_secret_must_be_base64(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver, secret: str, valid: bool
) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", secret)
    if valid:
        webhook.send(Settings(), to(receiver.url))
        assert verify_signature(secret, receiver.requests[0].headers, receiver.requests[0].body)
    else:
        with pytest.raises(PermanentError, match="WEBHOOK_SECRET") as raised:
            webhook.send(Settings(), to(receiver.url))
        assert "!!!" not in str(raised.value)
        assert receiver.requests == []


def test_no_target_is_permanent() -> None:
    with pytest.raises(PermanentError, match="no webhook URL"):
        webhook.send(Settings(), MESSAGE)


# SSRF guard


def refused_urls(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/",
        "http://10.0.0.1/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",
        "http://169.254.169.254/latest",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        f"http://[::1]:{port}/",
        f"http://[::ffff:127.0.0.1]:{port}/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[fe80::1]/",
        "http://[fd00::1]/",
        "http://[64:ff9b::a00:1]/",
        "http://[2002:7f00:1::]/",
        f"http://localhost:{port}/",
        f"http://2130706433:{port}/",
        f"http://127.1:{port}/",
        "ftp://x",
        "file:///etc/passwd",
        "http:///nohost",
        f"http://user:pw@127.0.0.1:{port}/",
        "http://user:pw@example.com/",
        "http://example.com:99999/",
        "http://example.com/ a",
    ]


def test_the_connection_guard_catches_a_connection(receiver: Receiver) -> None:
    with socket.socket() as sock, no_connections() as attempts, pytest.raises(RuntimeError, match="connection attempt"):
        sock.connect(("127.0.0.1", receiver.port))
    assert attempts == [("127.0.0.1", receiver.port)]


def test_unsafe_urls_are_refused_without_any_connection(receiver: Receiver) -> None:
    with no_connections() as attempts:
        for url in refused_urls(receiver.port):
            with pytest.raises(webhook.UnsafeURLError):
                webhook.check_url(url, allow_private=False)
    assert attempts == []
    assert receiver.requests == []


def test_send_refuses_unsafe_urls_without_any_connection(monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    allow_private(monkeypatch, False)
    with no_connections() as attempts:
        for url in refused_urls(receiver.port):
            with pytest.raises(PermanentError):
                webhook.send(Settings(), to(url))
    assert attempts == []
    assert receiver.requests == []


def test_the_refusal_is_a_value_error_for_the_api() -> None:
    with pytest.raises(ValueError, match="non-public address"):
        webhook.check_url("http://10.0.0.1/", allow_private=False)


@pytest.mark.parametrize("url", ["http://93.184.216.34/", "https://93.184.216.34:8443/x", "http://[2606:4700::1]/"])
def test_public_addresses_pass_the_check(url: str) -> None:
    with no_connections() as attempts:
        webhook.check_url(url, allow_private=False)
    assert attempts == []


def test_private_targets_pass_when_allowed() -> None:
    with no_connections():
        webhook.check_url("http://127.0.0.1:8080/", allow_private=True)
        webhook.check_url("http://10.0.0.1/", allow_private=True)
    with pytest.raises(webhook.UnsafeURLError):
        webhook.check_url("ftp://127.0.0.1/", allow_private=True)


def test_a_host_is_refused_when_any_of_its_addresses_is_private(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"mixed.example.test": ["93.184.216.34", "10.0.0.1"]})
    with no_connections() as attempts, pytest.raises(webhook.UnsafeURLError, match=r"10\.0\.0\.1"):
        webhook.check_url("http://mixed.example.test/", allow_private=False)
    assert attempts == []


def test_a_host_that_does_not_resolve_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"gone.example.test": []})
    with pytest.raises(webhook.UnresolvableHostError) as raised:
        webhook.check_url("http://gone.example.test/", allow_private=False)
    assert isinstance(raised.value, TransientError)
    assert isinstance(raised.value, ValueError)
    with pytest.raises(TransientError, match="does not resolve"):
        webhook.send(Settings(), to("http://gone.example.test/"))


def test_send_resolves_once_and_connects_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    """Against DNS rebinding: no second lookup between the check and the connection."""
    lookups = fake_dns(monkeypatch, {"hooks.example.test": ["127.0.0.1"]})
    webhook.send(Settings(), to(f"http://hooks.example.test:{receiver.port}/in"))
    [request] = receiver.wait_for(1)
    assert request.headers["host"] == f"hooks.example.test:{receiver.port}"
    assert lookups == ["hooks.example.test"]


# HTTPS: SNI and certificate verification use the URL's host while connecting to the checked address


def make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    key_options = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key)]
    subject = ["-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"]
    subprocess.run(
        ["openssl", "req", "-x509", "-days", "1", *key_options, "-out", str(cert), *subject],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """An https receiver whose self-signed certificate (for hooks.example.test) the client trusts."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command")
    cert, key = make_certificate(tmp_path, "hooks.example.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    server = Receiver(tls=context).start()
    yield server
    server.stop()


def test_https_verifies_the_url_host_while_connecting_to_the_checked_address(
    monkeypatch: pytest.MonkeyPatch, tls_receiver: Receiver
) -> None:
    fake_dns(monkeypatch, {"hooks.example.test": ["127.0.0.1"], "other.example.test": ["127.0.0.1"]})
    webhook.send(Settings(), to(f"https://hooks.example.test:{tls_receiver.port}/in"))
    [request] = tls_receiver.wait_for(1)
    assert verify_signature(SECRET, request.headers, request.body)

    with pytest.raises(TransientError, match=r"CERTIFICATE_VERIFY_FAILED"):
        webhook.send(Settings(), to(f"https://other.example.test:{tls_receiver.port}/in"))
    assert len(tls_receiver.requests) == 1
