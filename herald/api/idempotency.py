"""`Idempotency-Key`: the same key within 24 h answers the first answer and creates nothing new.

A key is claimed atomically (SET NX) with a hash of the request body before any work is done, so
two concurrent requests with one key cannot both create; the answer is stored once the work is done.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from redis import Redis

from herald.exceptions import IdempotencyConflict
from herald.infra import keys

TTL_SECONDS = 24 * 3600


def body_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def claim(connection: Redis, scope: str, key: str, digest: str) -> dict[str, Any] | None:
    """None when the key is new (now claimed); else the first answer. Raises `IdempotencyConflict`."""
    redis_key = keys.idempotency(scope, key)
    if connection.set(redis_key, json.dumps({"hash": digest}), nx=True, ex=TTL_SECONDS):
        return None
    stored = json.loads(connection.get(redis_key) or "{}")
    if stored.get("hash") != digest:
        raise IdempotencyConflict("this Idempotency-Key was used with a different request body")
    if "answer" not in stored:
        raise IdempotencyConflict("the first request with this Idempotency-Key is still being processed")
    answer: dict[str, Any] = stored["answer"]
    return answer


def store(connection: Redis, scope: str, key: str, digest: str, answer: dict[str, Any]) -> None:
    connection.set(keys.idempotency(scope, key), json.dumps({"hash": digest, "answer": answer}), xx=True, keepttl=True)


def release(connection: Redis, scope: str, key: str) -> None:
    """Free a claimed key whose request failed, so that the client can retry it."""
    connection.delete(keys.idempotency(scope, key))
