"""The in-app inbox over HTTP, and a WebSocket that pushes each new in-app notification live.

Items are stored by `channels.in_app` (in a worker); every API process relays them from Redis
pub/sub to its own WebSocket clients, so a client gets its items whichever process it reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, WebSocket, WebSocketDisconnect, status
from pydantic import BaseModel
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from herald.api.state import AppSettings
from herald.infra import connections
from herald.infra.patterns import ID_PATTERN
from herald.notify.channels import in_app
from herald.schemas import Problem

log = logging.getLogger("inbox")

router = APIRouter(tags=["inbox"])

UserId = Annotated[str, Path(pattern=ID_PATTERN, description="The user whose inbox it is.")]
NotificationId = Annotated[str, Path(min_length=1, max_length=128)]


class InboxItem(BaseModel):
    id: str
    delivery_id: str
    title: str
    body: str
    created_at: str
    read: bool
    data: dict[str, Any]


class InboxPage(BaseModel):
    total: int
    """How many items the filter matches (all, or only the unread ones): for paging."""
    unread: int
    offset: int
    limit: int
    items: list[InboxItem]


@router.get("/users/{user_id}/notifications", response_model=InboxPage)
def list_notifications(
    settings: AppSettings,
    user_id: UserId,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    unread: bool = False,
) -> InboxPage:
    """The user's in-app notifications, newest first; `unread=true` lists only the unread ones."""
    client = connections.redis_client(settings)
    total, items = in_app.list_items(client, user_id, offset, limit, unread_only=unread)
    unread_count = total if unread else in_app.unread_count(client, user_id)
    page = [InboxItem.model_validate(item) for item in items]
    return InboxPage(total=total, unread=unread_count, offset=offset, limit=limit, items=page)


@router.post(
    "/users/{user_id}/notifications/{notification_id}/read",
    response_model=InboxItem,
    responses={404: {"model": Problem}},
)
def mark_notification_read(settings: AppSettings, user_id: UserId, notification_id: NotificationId) -> InboxItem:
    """Mark one notification read (again is fine); 404 when the inbox has no such notification."""
    client = connections.redis_client(settings)
    item = (
        in_app.get_item(client, user_id, notification_id)
        if in_app.mark_read(client, user_id, notification_id)
        else None
    )
    if item is None:
        raise HTTPException(404, f"user {user_id!r} has no notification {notification_id!r}")
    return InboxItem.model_validate(item)


@router.websocket("/ws/users/{user_id}")
async def notification_stream(websocket: WebSocket, user_id: str, settings: AppSettings) -> None:
    """Each new in-app notification of the user as a JSON text frame, until the client leaves.

    The subscription is in place before the handshake completes: nothing published after the
    connection is open is missed. Invalid user id: close code 1008; Redis unavailable: 1013.
    """
    if not in_app.valid_user_id(user_id):
        await _refuse(websocket, status.WS_1008_POLICY_VIOLATION, "invalid user id")
        return
    async with connections.async_redis_client(settings).pubsub(ignore_subscribe_messages=True) as pubsub:
        try:
            await pubsub.subscribe(in_app.channel_name(user_id))
        except RedisError as exc:
            log.warning("inbox subscription failed: %s", type(exc).__name__)
            await _refuse(websocket, status.WS_1013_TRY_AGAIN_LATER, "Redis is unavailable")
            return
        await websocket.accept()
        await _relay(pubsub, websocket)


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    """Accept, then close with `code`: a close code reaches the client only after the handshake."""
    await websocket.accept()
    await websocket.close(code=code, reason=reason)


async def _relay(pubsub: PubSub, websocket: WebSocket) -> None:
    """Forward published items until the client disconnects (or Redis fails: close 1013)."""
    forward = asyncio.create_task(_forward(pubsub, websocket))
    disconnected = asyncio.create_task(_until_disconnect(websocket))
    try:
        await asyncio.wait({forward, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        forward.cancel()
        disconnected.cancel()
        error, _ = await asyncio.gather(forward, disconnected, return_exceptions=True)
    if isinstance(error, RedisError):
        log.warning("inbox subscription lost: %s", type(error).__name__)
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await websocket.close(code=status.WS_1013_TRY_AGAIN_LATER, reason="Redis is unavailable")
    elif isinstance(error, Exception) and not isinstance(error, WebSocketDisconnect):
        raise error


async def _forward(pubsub: PubSub, websocket: WebSocket) -> None:
    async for message in pubsub.listen():
        if message["type"] == "message":
            await websocket.send_text(message["data"].decode())


async def _until_disconnect(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, until it disconnects."""
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass
