"""A blocking pipeline that RQ's code wrote to, applied through the asyncio client in one script.

RQ's job writes are blocking code; the API's event loop must not wait on them. RQ writes its
commands to a redis-py `Pipeline` that is never executed, and `execute_async` replays them from
redis-py's `command_stack` (an internal list of the pipeline's queued commands).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from redis import asyncio as aioredis
from redis.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

from herald.exceptions import NotReplicatedError


def replay_loop(first_argv: int) -> str:
    """Lua that runs the commands in ARGV from ARGV[first_argv] on, each as its word count followed by
    its words; a script's arguments of its own come before them."""
    return f"""
local i = {first_argv}
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + count))
  i = i + count + 1
end
"""


REPLAY_SCRIPT = replay_loop(1) + "return i\n"
"""Run the commands in ARGV in one atomic step. Their keys are not declared, which Redis Cluster would
refuse; RQ does not run on a cluster either."""
_REPLAY_SHA = hashlib.sha1(REPLAY_SCRIPT.encode()).hexdigest()


class Replay(NamedTuple):
    """A script that applies recorded commands: its text, its SHA1, and the words before the commands'
    (`numkeys`, keys, arguments of its own). `limits` appends RQ's slot script to the replay."""

    script: str
    sha: str
    leading: tuple[Any, ...]


REPLAY = Replay(REPLAY_SCRIPT, _REPLAY_SHA, (0,))


async def execute_async(
    client: aioredis.Redis, recorded: Pipeline, replicas: int = 0, timeout_ms: int = 0, replay: Replay = REPLAY
) -> Any:
    """Apply the commands written on a blocking pipeline that was never executed (RQ's code writes
    to one) through the asyncio `client`, as one script: all or none, like MULTI/EXEC, but one
    command and one reply instead of a transaction's, which cost a third of an enqueue request.
    The script's reply is returned.

    With `replicas`, the script is followed by `WAIT replicas timeout_ms` on the same connection, in
    the same round trip; `NotReplicatedError` when fewer replicas confirm the write.
    """
    words: list[Any] = [*replay.leading]
    for args, _options in recorded.command_stack:  # redis-py's queued commands, read (a private list)
        words += [len(args), *args]
    if replicas <= 0:
        try:
            return await client.evalsha(replay.sha, *words)
        except NoScriptError:
            return await client.eval(replay.script, *words)
    try:
        reply, confirmed = await _replay_and_wait(client, replay, words, replicas, timeout_ms, by_sha=True)
    except NoScriptError:
        reply, confirmed = await _replay_and_wait(client, replay, words, replicas, timeout_ms, by_sha=False)
    if confirmed < replicas:
        raise NotReplicatedError(confirmed, replicas)
    return reply


async def _replay_and_wait(
    client: aioredis.Redis, replay: Replay, words: list[Any], replicas: int, timeout_ms: int, by_sha: bool
) -> tuple[Any, int]:
    async with client.pipeline(transaction=False) as pipeline:
        if by_sha:
            pipeline.evalsha(replay.sha, *words)
        else:
            pipeline.eval(replay.script, *words)
        pipeline.execute_command("WAIT", replicas, timeout_ms)
        try:
            reply, confirmed = await pipeline.execute()
            return reply, int(confirmed)
        except NoScriptError:
            raise
        except RedisError:  # the script ran, or may have: the job may exist
            return None, 0
