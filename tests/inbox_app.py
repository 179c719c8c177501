"""Only the inbox routes as an ASGI app, for tests that run it under uvicorn or a TestClient."""

from fastapi import FastAPI

from herald.api import inbox
from settings import Settings


def create(settings: Settings) -> FastAPI:
    """The inbox routes of an app with `settings` (which they read from `app.state`, as in `create_app`)."""
    app = FastAPI()
    app.state.settings = settings
    app.include_router(inbox.router)
    return app


app = create(Settings())
"""What `uvicorn tests.inbox_app:app` serves, with the settings of its environment."""
