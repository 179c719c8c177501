"""One-click unsubscribe links (RFC 8058): signed tokens naming a user, a topic and a channel.

A token is `<payload>.<mac>`: the payload is the base64url of the JSON list `[user, topic, channel]`,
the mac the base64url of HMAC-SHA256 over the payload, keyed with `UNSUBSCRIBE_SECRET`. Nothing in it
can be changed (another user, another topic, "everything") without the secret. Tokens do not expire:
an old email's unsubscribe link must keep working (RFC 8058 asks that it work for a long time).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from html import escape
from typing import NamedTuple, get_args

from herald.infra.patterns import ID_PATTERN, TOPIC_PATTERN, UNSUBSCRIBE_TOKEN_PATTERN
from herald.schemas import ChannelName
from settings import Settings

CHANNELS = get_args(ChannelName)
_TOKEN = re.compile(UNSUBSCRIBE_TOKEN_PATTERN)
_PURPOSE = b"unsubscribe.v1."
"""Signed before the payload, so that this key's MACs mean "unsubscribe" and nothing else."""


class Subscription(NamedTuple):
    user_id: str
    topic: str
    channel: str


def make_token(secret: str, subscription: Subscription) -> str:
    payload = _encode(json.dumps(list(subscription), separators=(",", ":")).encode())
    return f"{payload}.{_mac(secret, payload)}"


def read_token(secret: str, token: str) -> Subscription | None:
    """The subscription a genuine token names; None for anything else (malformed, tampered, other key).

    The MAC is compared as text in constant time: comparing decoded bytes would let a token whose
    last base64 character differs in its unused bits pass as the same token.
    """
    if not _TOKEN.fullmatch(token):
        return None
    payload, mac = token.split(".")
    if not hmac.compare_digest(_mac(secret, payload), mac):
        return None
    return _subscription(payload)


def link(settings: Settings, subscription: Subscription) -> str:
    """The unsubscribe URL that an email names in its `List-Unsubscribe` header."""
    token = make_token(settings.unsubscribe_secret.get_secret_value(), subscription)
    return f"{settings.public_base_url}/unsubscribe/{token}"


def _mac(secret: str, payload: str) -> str:
    return _encode(hmac.new(secret.encode(), _PURPOSE + payload.encode(), hashlib.sha256).digest())


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _subscription(payload: str) -> Subscription | None:
    """The signed payload's fields, checked again: a token signed by a buggy older version is refused too."""
    try:
        fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    if not (isinstance(fields, list) and len(fields) == 3 and all(isinstance(field, str) for field in fields)):
        return None
    user_id, topic, channel = fields
    valid = re.fullmatch(ID_PATTERN, user_id) and re.fullmatch(TOPIC_PATTERN, topic) and channel in CHANNELS
    return Subscription(user_id, topic, channel) if valid else None


PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}}
button{{font-size:1rem;padding:.6rem 1.2rem;cursor:pointer}}</style></head>
<body><h1>{title}</h1>
{content}
</body></html>
"""
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
"""No scripts, no framing, and the token in the URL is never sent on as a referrer."""


def confirm_page(subscription: Subscription) -> str:
    """The page a GET of the link shows: one button that POSTs to the same URL (the form has no action)."""
    what = f"{_label(subscription.channel)} about &ldquo;{escape(subscription.topic)}&rdquo;"
    content = f'<p>Stop receiving {what}?</p>\n<form method="post"><button type="submit">Unsubscribe</button></form>'
    return PAGE.format(title="Unsubscribe", content=content)


def done_page(subscription: Subscription) -> str:
    what = f"{_label(subscription.channel)} about &ldquo;{escape(subscription.topic)}&rdquo;"
    return PAGE.format(title="Unsubscribed", content=f'<p id="done">You will receive no more {what}.</p>')


def invalid_page() -> str:
    content = "<p>This unsubscribe link is not valid. Copy the whole link from the email, or contact us.</p>"
    return PAGE.format(title="Invalid link", content=content)


def _label(channel: str) -> str:
    return {"email": "emails", "webhook": "webhook calls", "in_app": "in-app notifications"}[channel]
