"""The smallest FastAPI app, served by the same uvicorn command: the benchmark's memory baseline for the API."""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI()


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}
