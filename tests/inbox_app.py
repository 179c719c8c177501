"""Only the inbox routes as an ASGI app, for tests that run it under uvicorn or a TestClient."""

from fastapi import FastAPI

from herald.api import inbox

app = FastAPI()
app.include_router(inbox.router)
