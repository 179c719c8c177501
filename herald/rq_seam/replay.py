"""A blocking pipeline that RQ's code wrote to, applied through the asyncio client in one script.

RQ's job writes are blocking code; the API's event loop must not wait on them. RQ writes its
commands to a redis-py `Pipeline` that is never executed, and `execute_async` replays them from
redis-py's `command_stack` (an internal list of the pipeline's queued commands).
"""

from __future__ import annotations

import hashlib
from typing import Any

from redis import asyncio as aioredis
from redis.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

from herald.exceptions import NotReplicatedError
from herald.infra import connections

REPLAY_SCRIPT = """
local i = 1
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + count))
  i = i + count + 1
end
return i
"""
"""Run the commands in ARGV, each as its word count followed by its words, in one atomic step. Its keys
are not declared, which Redis Cluster would refuse; RQ does not run on a cluster either."""
_REPLAY_SHA = hashlib.sha1(REPLAY_SCRIPT.encode()).hexdigest()


async def execute_async(recorded: Pipeline, replicas: int = 0, timeout_ms: int = 0) -> None:
    """Apply the commands written on a blocking pipeline that was never executed (RQ's code writes
    to one) through the asyncio client, as one script: all or none, like MULTI/EXEC, but one
    command and one reply instead of a transaction's, which cost a third of an enqueue request.

    With `replicas`, the script is followed by `WAIT replicas timeout_ms` on the same connection, in
    the same round trip; `NotReplicatedError` when fewer replicas confirm the write.
    """
    words: list[Any] = []
    for args, _options in recorded.command_stack:  # redis-py's queued commands, read (a private list)
        words += [len(args), *args]
    client = connections.async_redis_client()
    if replicas <= 0:
        try:
            await client.evalsha(_REPLAY_SHA, 0, *words)
        except NoScriptError:
            await client.eval(REPLAY_SCRIPT, 0, *words)
        return
    try:
        confirmed = await _replay_and_wait(client, words, replicas, timeout_ms, by_sha=True)
    except NoScriptError:
        confirmed = await _replay_and_wait(client, words, replicas, timeout_ms, by_sha=False)
    if confirmed < replicas:
        raise NotReplicatedError(confirmed, replicas)


async def _replay_and_wait(
    client: aioredis.Redis, words: list[Any], replicas: int, timeout_ms: int, by_sha: bool
) -> int:
    async with client.pipeline(transaction=False) as pipeline:
        if by_sha:
            pipeline.evalsha(_REPLAY_SHA, 0, *words)
        else:
            pipeline.eval(REPLAY_SCRIPT, 0, *words)
        pipeline.execute_command("WAIT", replicas, timeout_ms)
        try:
            return int((await pipeline.execute())[1])
        except NoScriptError:
            raise
        except RedisError:  # the script ran, or may have: the job may exist
            return 0
