"""The MCP server: FastMCP's own client, in process and over streamable HTTP, against a real Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient
from fastmcp import Client
from fastmcp.client.transports import StreamableHttpTransport
from fastmcp.exceptions import ToolError
from redis import Redis

from herald.api import mcp_server
from herald.infra.patterns import JOB_ID_PATTERN
from herald.mailsink import MailSink, free_port
from herald.schemas import JobAccepted, JobPage, JobView, NotificationAccepted
from settings import Settings
from tests.conftest import StartProcess
from tests.helpers import wait_for_http, wait_until

T = TypeVar("T")
TOOLS = {"create_task", "get_task", "complete_task", "trigger_notification", "list_failed", "requeue"}
EMAIL = {"to": "ann@example.com", "subject": "Hi", "body": "Welcome"}
NOTE = {"user_id": "u42", "title": "Order shipped", "body": "On its way"}


def run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        return await coroutine

    return asyncio.run(main())


async def call(tool: str, arguments: dict[str, Any], client: Client[Any] | None = None) -> dict[str, Any]:
    """Call a tool (in process unless a connected client is given); its structured answer."""
    if client is None:
        async with Client(mcp_server.build(Settings())) as local:
            return await call(tool, arguments, local)
    result = await client.call_tool(tool, arguments)
    assert result.structured_content is not None, result
    return result.structured_content


def tool_error(tool: str, arguments: dict[str, Any]) -> str:
    with pytest.raises(ToolError) as raised:
        run(call(tool, arguments))
    return str(raised.value)


def test_all_tools_are_listed_with_input_and_output_schemas() -> None:
    async def listed() -> dict[str, Any]:
        async with Client(mcp_server.build(Settings())) as client:
            return {tool.name: tool for tool in await client.list_tools()}

    tools = run(listed())
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and tool.input_schema["type"] == "object" and tool.output_schema
    request = tools["create_task"].input_schema["properties"]["request"]
    assert {"task", "kwargs", "priority", "delay_seconds"} <= set(request["properties"])
    assert tools["get_task"].input_schema["properties"]["job_id"]["pattern"] == JOB_ID_PATTERN
    assert "channels" in tools["trigger_notification"].input_schema["properties"]["request"]["properties"]
    assert set(tools["list_failed"].input_schema["properties"]) == {"queue", "offset", "limit"}
    assert tools["get_task"].annotations is not None and tools["get_task"].annotations.read_only_hint


def test_create_and_get_task_answer_as_the_rest_routes(client: TestClient, redis: Redis) -> None:
    accepted = JobAccepted.model_validate(
        run(call("create_task", {"request": {"task": "send_email", "kwargs": EMAIL}}))
    )
    assert (accepted.status, accepted.queue, accepted.status_url) == ("queued", "default", f"/job/{accepted.job_id}")
    view = run(call("get_task", {"job_id": accepted.job_id}))
    assert view == client.get(accepted.status_url).json()
    assert (view["task"], view["status"], view["retries_left"]) == ("send_email", "queued", 4)
    later = {"task": "noop", "priority": "low", "delay_seconds": 60}
    scheduled = run(call("create_task", {"request": later}))
    assert (scheduled["status"], scheduled["queue"]) == ("scheduled", "low") and scheduled["scheduled_for"]
    page = JobPage.model_validate(run(call("list_failed", {})))
    assert (page.total, page.jobs) == (0, [])


def test_trigger_notification_email_is_sent_by_a_real_worker(
    client: TestClient, smtp: MailSink, worker: object
) -> None:
    request = {**NOTE, "channels": ["email"], "to": "ann@example.com"}
    answer = NotificationAccepted.model_validate(run(call("trigger_notification", {"request": request})))
    [delivery] = answer.deliveries
    assert (delivery.channel, delivery.status, len(answer.correlation_id)) == ("email", "pending", 32)
    [mail] = smtp.wait_for(1)
    assert (mail["To"], mail["Subject"]) == ("ann@example.com", "Order shipped")
    finished = wait_until(
        lambda: (view := run(call("get_task", {"job_id": delivery.job_id})))["status"] == "finished" and view,
        what="the delivery job to finish",
    )
    assert finished["result"] == {"status": "delivered"} and finished["task"] == "deliver_email"
    assert client.get(answer.status_url).json()["deliveries"][0]["status"] == "delivered"


def test_failed_job_is_listed_and_requeued(client: TestClient, smtp: MailSink, worker: object) -> None:
    smtp.fail_next(1, "550 5.1.1 No such user")
    job_id = run(call("create_task", {"request": {"task": "send_email", "kwargs": EMAIL}}))["job_id"]

    def failed() -> bool:
        return bool(run(call("get_task", {"job_id": job_id}))["status"] == "failed")

    wait_until(failed, what="the job to fail")
    page = run(call("list_failed", {"queue": "default"}))
    assert page["total"] == 1 and page["jobs"][0]["id"] == job_id and page["jobs"][0]["error"]["message"]
    assert run(call("requeue", {"job_id": job_id}))["status"] == "queued"
    smtp.wait_for(1)
    assert "only failed jobs can be requeued" in tool_error("requeue", {"job_id": job_id})


def test_bad_input_is_a_clear_tool_error_and_writes_nothing(redis: Redis) -> None:
    create = [
        ({"task": "rm_rf"}, "unknown task 'rm_rf'; known tasks: await_completion, noop, purge_expired, send_email"),
        ({"task": "send_email", "kwargs": {**EMAIL, "to": "nobody"}}, "invalid kwargs: to:"),
        ({"task": "noop", "delay_seconds": -1}, "delay_seconds"),
        ({"task": "await_completion", "kwargs": {"description": "x"}, "delay_seconds": 5}, "takes no delay_seconds"),
    ]
    for request, message in create:
        assert message in tool_error("create_task", {"request": request}), request
    notify = [
        ({**NOTE, "channels": ["email"]}, "no email address (`to`) in the request and none stored for user 'u42'"),
        ({"user_id": "u1", "channels": ["in_app"], "template": "nope"}, "unknown template"),
        ({"user_id": "u1", "channels": ["in_app"], "template": "welcome"}, "name"),
        ({**NOTE, "channels": ["webhook"], "webhook_url": "http://169.254.169.254/x"}, "webhook_url refused"),
    ]
    for request, message in notify:
        assert message in tool_error("trigger_notification", {"request": request}), request
    assert "String should match pattern" in tool_error("get_task", {"job_id": "../etc/passwd"})
    for tool in ("get_task", "complete_task", "requeue"):
        assert "no job with id 'f00d'" in tool_error(tool, {"job_id": "f00d"})
    assert redis.keys("rq:job:*") == [] and redis.keys("notification:*") == []


def test_redis_unavailable_is_a_tool_error(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert tool_error("get_task", {"job_id": "f00d"}) == "Redis is unavailable; try again shortly"


def test_complete_task_finishes_only_waiting_jobs(client: TestClient, processes: StartProcess) -> None:
    waiting = {"task": "await_completion", "kwargs": {"description": "Approve refund R-17"}, "priority": "high"}
    accepted = run(call("create_task", {"request": waiting}))
    job_id = accepted["job_id"]
    assert accepted["status"] == "waiting"
    assert processes("worker.py", "--burst").wait(timeout=30) == 0  # no worker takes it
    view = JobView.model_validate(run(call("get_task", {"job_id": job_id})))
    assert (view.status, view.task, view.queue, view.result) == ("waiting", "await_completion", "high", None)
    assert client.get(f"/job/{job_id}").json()["status"] == "waiting"

    done = run(call("complete_task", {"job_id": job_id, "result": {"approved": True, "by": "ann"}}))
    assert (done["status"], done["result"]) == ("finished", {"approved": True, "by": "ann"}) and done["ended_at"]
    assert run(call("get_task", {"job_id": job_id})) == done == client.get(f"/job/{job_id}").json()
    assert "is finished; only a waiting job can be completed" in tool_error("complete_task", {"job_id": job_id})

    normal = run(call("create_task", {"request": {"task": "noop"}}))["job_id"]
    message = tool_error("complete_task", {"job_id": normal, "result": 1})
    assert message == f"job {normal} is a noop job; only await_completion jobs can be completed"
    assert run(call("get_task", {"job_id": normal}))["status"] == "queued"

    canceled = run(call("create_task", {"request": waiting}))["job_id"]
    assert client.delete(f"/job/{canceled}").json()["status"] == "canceled"
    assert "is canceled" in tool_error("complete_task", {"job_id": canceled})


def test_served_over_streamable_http_by_the_api_behind_its_key(
    processes: StartProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_KEYS", "mcp-test-key")
    port = free_port()
    processes("uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port), "--no-access-log")
    api, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer mcp-test-key"}

    wait_for_http(f"{api}/healthz")
    assert httpx.post(f"{api}/mcp/", json={"jsonrpc": "2.0", "id": 1, "method": "ping"}).status_code == 401

    async def session() -> tuple[set[str], dict[str, Any], dict[str, Any], dict[str, Any]]:
        transport = StreamableHttpTransport(f"{api}/mcp/", headers={**auth, "X-Request-ID": "agent-7"})
        async with Client(transport) as client:
            names = {tool.name for tool in await client.list_tools()}
            accepted = await call("create_task", {"request": {"task": "noop"}}, client)
            view = await call("get_task", {"job_id": accepted["job_id"]}, client)
            note = await call("trigger_notification", {"request": {**NOTE, "channels": ["in_app"]}}, client)
            return names, accepted, view, note

    names, accepted, view, note = run(session())
    assert names == TOOLS
    assert view == httpx.get(f"{api}{accepted['status_url']}", headers=auth).json()
    assert (view["id"], view["task"], view["status"]) == (accepted["job_id"], "noop", "queued")
    assert note["correlation_id"] == "agent-7"


LAZY_CHECK = """
import json, sys
from fastapi.testclient import TestClient
import app
HEAVY = ("mcp", "fastmcp", "flask", "rq_dashboard")
def loaded():
    return sorted(name for name in HEAVY if name in sys.modules)
seen = {"at start": loaded()}
with TestClient(app.app) as client:
    seen["after /send-email"] = [client.post("/send-email", json=%(email)r).status_code, loaded()]
    seen["after /rq/"] = [client.get("/rq/", auth=("admin", "pw-lazy")).status_code, loaded()]
    ping = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18",
            "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    answer = client.post("/mcp/", json=ping, headers=accept)
    seen["after /mcp/"] = [answer.status_code, "serverInfo" in answer.text, loaded()]
print(json.dumps(seen))
"""


def test_the_mcp_server_and_the_dashboard_are_imported_on_their_first_request(
    env: dict[str, str], redis: Redis
) -> None:
    """Their libraries are most of the API's memory: a process that never serves them never holds them."""
    environment = {**os.environ, "DASHBOARD_USERNAME": "admin", "DASHBOARD_PASSWORD": "pw-lazy", "LOG_LEVEL": "warning"}
    command = [sys.executable, "-c", LAZY_CHECK % {"email": EMAIL}]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["at start"] == []
    assert seen["after /send-email"] == [202, []]
    assert seen["after /rq/"] == [200, ["flask", "rq_dashboard"]]
    assert seen["after /mcp/"] == [200, True, ["fastmcp", "flask", "mcp", "rq_dashboard"]]
