"""Webhook channel: a signed JSON POST to the user's URL, following the Standard Webhooks convention.

The request body (UTF-8 JSON, compact, exactly the bytes that are signed)::

    {
      "type": "notification",
      "timestamp": "<created_at, or the send time when created_at is empty; ISO-8601>",
      "data": {
        "notification_id": "...",
        "delivery_id": "...",
        "user_id": "...",
        "title": "...",
        "body": "...",
        "created_at": "<ISO-8601>" | null,
        "correlation_id": "..." | null,
        ...message.payload
      }
    }

`message.payload` keys are merged into `data` after the standard fields; a payload key that would
replace a standard field is dropped (with a warning), so receivers can rely on those seven fields.
When `created_at` is set the body is identical on every retry of a delivery.

Headers (https://www.standardwebhooks.com): `webhook-id` is the delivery id, the same on every retry,
so receivers can drop duplicates; `webhook-timestamp` the send time in unix seconds; `webhook-signature`
`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` keyed with the base64 part of `WEBHOOK_SECRET`
(`whsec_...`). Also `content-type`, `user-agent`, and `x-request-id` (the correlation id) when there is one.

Outcome: 2xx is delivered; 408, 429, 5xx, timeouts, connection and TLS errors and a host that does
not resolve raise `TransientError`; 3xx (redirects are never followed) and other 4xx `PermanentError`.

Server-side request forgery: `check_url` refuses anything but http(s) URLs with a host and without
credentials, and hosts for which any resolved address is private, loopback, link-local, multicast,
reserved or unspecified (unless `WEBHOOK_ALLOW_PRIVATE`). `send` resolves the host once, checks every
address, and connects only to those addresses (the URL's host still goes in the `Host` header and, for
https, in SNI and certificate verification), so a DNS answer that changes between check and connect
(DNS rebinding) cannot redirect the request. `settings.webhook_timeout_seconds` bounds the connection
and each read or write; name resolution uses the system resolver and its own timeouts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from herald.exceptions import PermanentError, TransientError
from herald.notify.channels.base import Message
from settings import Settings

logger = logging.getLogger(__name__)

USER_AGENT = "notification-service-webhooks/1.0"
SECRET_PREFIX = "whsec_"
_RESPONSE_SNIPPET_BYTES = 200
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SockAddr = tuple[Any, ...]


class UnsafeURLError(PermanentError, ValueError):
    """The URL is not one the service may call; the message is safe to show a client (API: 422)."""


class UnresolvableHostError(TransientError, ValueError):
    """The URL's host did not resolve: retried at send time, refused with a 422 by the API."""


@dataclass(frozen=True)
class Target:
    """A checked webhook URL, with the addresses it resolved to: the only ones `send` connects to."""

    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[tuple[int, SockAddr], ...]
    """(address family, socket address) pairs from one resolution, in resolver order."""


def check_url(url: str, allow_private: bool) -> None:
    """Refuse a webhook URL the service must not call; see the module docstring for the rules.

    Raises `UnsafeURLError` (a `PermanentError` and a `ValueError`) or, when the host does not
    resolve, `UnresolvableHostError` (a `TransientError` and a `ValueError`). Blocks on DNS.
    """
    resolve_target(url, allow_private)


def resolve_target(url: str, allow_private: bool) -> Target:
    """Parse and check `url`, resolve its host once and check every address."""
    scheme, host, port, path = _parse(url)
    addresses = _resolve(host, port)
    if not addresses:
        raise UnresolvableHostError(f"webhook host {host!r} has no address")
    if not allow_private:
        for _, sockaddr in addresses:
            if not is_public(_ip_of(sockaddr)):
                raise UnsafeURLError(f"webhook host {host!r} resolves to a non-public address ({sockaddr[0]})")
    return Target(scheme, host, port, path, tuple(addresses))


def _parse(url: str) -> tuple[str, str, int, str]:
    if any(char.isspace() or not char.isprintable() for char in url):
        raise UnsafeURLError("webhook URL contains whitespace or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeURLError("webhook URL must use http or https")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURLError("webhook URL must not contain credentials")
    if not parts.hostname:
        raise UnsafeURLError("webhook URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise UnsafeURLError("webhook URL has an invalid port") from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, parts.hostname, port, path


def _resolve(host: str, port: int) -> list[tuple[int, SockAddr]]:
    """The host's TCP addresses, without duplicates; `UnresolvableHostError` when it has none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise UnresolvableHostError(f"webhook host {host!r} does not resolve: {exc}") from None
    addresses: list[tuple[int, SockAddr]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in addresses:
            addresses.append((family, tuple(sockaddr)))
    return addresses


def _ip_of(sockaddr: SockAddr) -> IPAddress:
    return ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])


def is_public(ip: IPAddress) -> bool:
    """Whether `ip` is a globally routable unicast address, also for IPv4 embedded in IPv6."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_public(embedded)
        if ip.is_site_local:
            return False
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv4-mapped, 6to4, Teredo or NAT64 address leads to, if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def send(settings: Settings, message: Message) -> None:
    """The webhook channel: POST the signed notification to `message.target`."""
    if not message.target:
        raise PermanentError("no webhook URL for this user")
    key = _signing_key(settings.webhook_secret.get_secret_value())
    target = resolve_target(message.target, settings.webhook_allow_private)
    body = build_body(message)
    timestamp = int(time.time())
    signature = sign(key, message.delivery_id, timestamp, body)
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message.delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }
    if message.correlation_id and _is_header_safe(message.correlation_id):
        headers["x-request-id"] = message.correlation_id
    status, location, snippet = _post(target, headers, body, settings.webhook_timeout_seconds)
    secrets = (signature.partition(",")[2], settings.webhook_secret.get_secret_value(), base64.b64encode(key).decode())
    _raise_for_status(status, location, snippet, secrets)


def build_body(message: Message, now: datetime | None = None) -> bytes:
    """The JSON body documented in the module docstring, as the exact bytes to sign and send."""
    data: dict[str, Any] = {
        "notification_id": message.notification_id,
        "delivery_id": message.delivery_id,
        "user_id": message.user_id,
        "title": message.title,
        "body": message.body,
        "created_at": message.created_at or None,
        "correlation_id": message.correlation_id or None,
    }
    for name, value in message.payload.items():
        if name in data:
            logger.warning("webhook payload key %r ignored: it would replace a standard field", name)
        else:
            data[name] = value
    timestamp = message.created_at or (now or datetime.now(UTC)).isoformat().replace("+00:00", "Z")
    document = {"type": "notification", "timestamp": timestamp, "data": data}
    try:
        text = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"webhook payload is not JSON-serializable: {exc}") from None
    return text.encode()


def _signing_key(secret: str) -> bytes:
    """The HMAC key: the base64 part of a `whsec_...` secret (the prefix is optional, as in the reference libraries)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise PermanentError("WEBHOOK_SECRET is not a valid whsec_<base64> secret")
    return key


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _is_header_safe(value: str) -> bool:
    return value.isascii() and value.isprintable()


def _post(target: Target, headers: dict[str, str], body: bytes, timeout: float) -> tuple[int, str, str]:
    """POST to one of the target's checked addresses; the status, `Location` and a body snippet."""
    connection = _connection(target, timeout)
    try:
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        snippet = response.read(_RESPONSE_SNIPPET_BYTES).decode(errors="replace")
        return response.status, response.getheader("location") or "", snippet
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, TLS, malformed answer
        raise TransientError(f"webhook {target.host!r} unreachable: {type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # http.client refuses an invalid path or header
        raise PermanentError(f"webhook request invalid: {exc}") from None
    finally:
        connection.close()


def _connection(target: Target, timeout: float) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _PinnedHTTPSConnection(target.host, target.port, target.addresses, timeout)
    return _PinnedHTTPConnection(target.host, target.port, target.addresses, timeout)


def _open_socket(addresses: tuple[tuple[int, SockAddr], ...], timeout: float) -> socket.socket:
    """Connect to the first checked address that answers (like `socket.create_connection`, no DNS)."""
    error: OSError = OSError("no address to connect to")
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to the already checked addresses; `host` is used only for the Host header."""

    def __init__(self, host: str, port: int, addresses: tuple[tuple[int, SockAddr], ...], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses
        self._timeout = timeout

    def connect(self) -> None:
        self.sock = _open_socket(self._addresses, self._timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the already checked addresses; `host` goes in SNI and is verified against the certificate."""

    def __init__(self, host: str, port: int, addresses: tuple[tuple[int, SockAddr], ...], timeout: float) -> None:
        self._tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._addresses = addresses
        self._timeout = timeout

    def connect(self) -> None:
        sock = _open_socket(self._addresses, self._timeout)
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _raise_for_status(status: int, location: str, snippet: str, secrets: tuple[str, ...]) -> None:
    """Return on 2xx, else raise the error for `status`; `secrets` are removed from the receiver's text."""
    if 200 <= status < 300:
        return
    text = f"webhook answered {status} {_phrase(status)}"
    if 300 <= status < 400:
        raise PermanentError(f"{text} to {_redact(location, secrets) or '(no location)'}; redirects are not followed")
    detail = _redact(snippet, secrets)
    if detail:
        text = f"{text}: {detail}"
    if status in (408, 429) or 500 <= status < 600:
        raise TransientError(text)
    raise PermanentError(text)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "(unknown status)"


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    """Receiver-supplied text for an error message: one line, short, without our signature or secret.

    Receivers know the secret too (they verify with it), so an error page may well echo it.
    """
    cleaned = " ".join(text.split())
    for secret in secrets:
        if secret:
            cleaned = cleaned.replace(secret, "[redacted]")
    return cleaned[:_RESPONSE_SNIPPET_BYTES]
