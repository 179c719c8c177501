"""The app's settings for its routes: `create_app` keeps them on `app.state`, routes take `AppSettings`."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends
from starlette.requests import HTTPConnection

from settings import Settings


async def app_settings(connection: HTTPConnection) -> Settings:
    """The settings the app was built with (async: FastAPI runs it on the event loop, not in a thread)."""
    return cast(Settings, connection.app.state.settings)


AppSettings = Annotated[Settings, Depends(app_settings)]
