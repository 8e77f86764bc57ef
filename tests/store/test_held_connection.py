"""The held connection scripts are called on (``broker.store.connection.HeldConnection``): each
call gets its own reply, whatever happened to the call before it, in whichever process or thread."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytest
import redis

from broker.store.connection import HeldConnection, evalsha_command

ECHO = "return ARGV[1]"
# Answers only after spinning for ARGV[2] ms (a script may not sleep).
SLOW_ECHO = """
local start = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - start[1]) * 1000000 + (now[2] - start[2]) >= tonumber(ARGV[2]) * 1000
return ARGV[1]
"""


@pytest.fixture
def held(redis_client: redis.Redis) -> HeldConnection:
    return HeldConnection(redis_client)


def _client_id(held: HeldConnection) -> int:
    """The Redis client id of the connection ``held`` keeps."""
    held.conn.send_command("CLIENT", "ID")
    return int(held.conn.read_response())


def test_calls_go_on_one_connection_kept_for_them(redis_client: redis.Redis, held: HeldConnection) -> None:
    echo = redis_client.register_script(ECHO)
    redis_client.script_load(ECHO)
    assert [held.script(echo, [], [f"call {i}"]) for i in range(5)] == [f"call {i}".encode() for i in range(5)]
    first = _client_id(held)
    held.script(echo, [], ["once more"])
    assert _client_id(held) == first  # the same connection each time


def test_arguments_are_encoded_as_redis_py_encodes_them(redis_client: redis.Redis, held: HeldConnection) -> None:
    both = redis_client.register_script("return {ARGV[1], ARGV[2], ARGV[3], ARGV[4], KEYS[1]}")
    assert held.script(both, ["k:é"], [7, 0.25, b"\x00\xff", "é"]) == [b"7", b"0.25", b"\x00\xff", "é".encode(),
                                                                       "k:é".encode()]
    for bad in (None, True):  # what redis-py refuses, refused as redis-py refuses it
        assert evalsha_command(both.sha, [], [bad]) is None
        with pytest.raises(redis.DataError):
            held.script(both, ["k"], [bad])


def test_a_script_redis_does_not_have_is_loaded_and_run(redis_client: redis.Redis, held: HeldConnection) -> None:
    echo = redis_client.register_script(ECHO)
    assert held.script(echo, [], ["one"]) == b"one"  # never loaded: NOSCRIPT, then redis-py loads it
    redis_client.script_flush()  # as after a Redis restart
    assert held.script(echo, [], ["two"]) == b"two"
    assert held.script(echo, [], ["three"]) == b"three"


def test_a_script_error_is_raised_and_the_connection_kept(redis_client: redis.Redis, held: HeldConnection) -> None:
    fails = redis_client.register_script("return redis.error_reply('NOPE ' .. ARGV[1])")
    echo = redis_client.register_script(ECHO)
    held.script(echo, [], ["warm"])
    before = _client_id(held)
    with pytest.raises(redis.ResponseError, match="NOPE x"):
        held.script(fails, [], ["x"])
    assert held.script(echo, [], ["after"]) == b"after"
    assert _client_id(held) == before


def test_a_call_on_a_dropped_connection_is_made_on_another(redis_client: redis.Redis, held: HeldConnection) -> None:
    echo = redis_client.register_script(ECHO)
    held.script(echo, [], ["warm"])
    killed = _client_id(held)
    redis_client.client_kill_filter(_id=killed)
    assert held.script(echo, [], ["again"]) == b"again"  # the usual way, once
    assert held.script(echo, [], ["and on"]) == b"and on"  # on a new connection kept from now on
    assert _client_id(held) != killed


def test_a_call_interrupted_by_a_signal_leaves_no_reply_for_the_next(redis_client: redis.Redis,
                                                                     held: HeldConnection) -> None:
    """A task's SIGTERM handler raises while start.lua's reply is awaited: the reply that comes
    later must not be read as the next call's."""
    slow = redis_client.register_script(SLOW_ECHO)
    echo = redis_client.register_script(ECHO)
    held.script(slow, [], ["warm", 0])

    class Stop(BaseException):
        pass

    def stop(signum: int, frame: Any) -> None:
        raise Stop()

    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Stop):
            held.script(slow, [], ["late", 300])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert held.script(echo, [], ["next"]) == b"next"


def test_a_second_thread_goes_the_usual_way_meanwhile(redis_client: redis.Redis, held: HeldConnection) -> None:
    slow = redis_client.register_script(SLOW_ECHO)
    redis_client.script_load(SLOW_ECHO)
    replies: dict[str, Any] = {}
    first = threading.Thread(target=lambda: replies.update(first=held.script(slow, [], ["first", 300])))
    first.start()
    while not held.lock.locked():
        pass
    assert held.script(slow, [], ["second", 0]) == b"second"  # while the first waits for its reply
    first.join()
    assert replies == {"first": b"first"}


def test_a_forked_process_calls_on_a_connection_of_its_own(redis_client: redis.Redis, held: HeldConnection) -> None:
    echo = redis_client.register_script(ECHO)
    held.script(echo, [], ["warm"])
    pid = os.fork()
    if pid == 0:  # the child: every reply its own, on another connection than its parent's
        ok = all(held.script(echo, [], [f"child {i}"]) == f"child {i}".encode() for i in range(300))
        os._exit(0 if ok and held.pid == os.getpid() else 1)
    mine = [held.script(echo, [], [f"parent {i}"]) for i in range(300)]
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert mine == [f"parent {i}".encode() for i in range(300)]
