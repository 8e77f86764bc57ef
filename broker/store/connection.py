"""The one place that makes Redis connections and talks to them below redis-py's commands.

``connect`` builds every client (the user's ``Client``, dispatchers, workers); ``raw_pipeline``
and ``SentCommand`` are the two fast paths that write pre-encoded commands straight onto a
pooled connection. A Redis Cluster or Sentinel deployment changes this module (and the kombu
transport on the worker side), nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoPermissionError
from redis.retry import Retry

from broker.errors import AccessDenied, AuthenticationFailed, BrokerUnavailable
from broker.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")


class _Retry(Retry):
    """Retries a lost connection briefly, but never refused credentials (AuthenticationError
    is a ConnectionError to redis-py): no retry can fix a wrong password."""

    def call_with_retry(self, do: Callable[[], R], fail: Callable[..., Any], *args: Any, **kwargs: Any) -> R:
        def fail_fast(error: Exception, *count: int) -> None:
            fail(error, *count)  # redis-py's own clean-up (disconnect) first
            if isinstance(error, redis.AuthenticationError):
                raise error

        return super().call_with_retry(do, fail_fast, *args, **kwargs)


def connect(settings: Settings) -> redis.Redis:
    """A Redis client that retries briefly with backoff, then fails instead of hanging.

    Credentials and TLS come from the URL: ``redis://USER:PASSWORD@HOST:PORT/DB`` (an ACL
    user, see config/redis-acl.conf), ``redis://:PASSWORD@...`` (requirepass), and
    ``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem`` for TLS."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=10,
        retry=_Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def as_broker_error(exc: BaseException) -> Exception:
    """The gpubroker error that says what a Redis error (or a kombu error caused by one) means and
    what to do; ``exc`` itself when there is none."""
    found: BaseException | None = exc
    while found is not None and not isinstance(found, redis.RedisError):
        found = found.__cause__ or found.__context__
    if isinstance(found, redis.AuthenticationError):  # a ConnectionError too: test it first
        return AuthenticationFailed(
            f"Redis refused the credentials in the Redis URL ({found}); give them as "
            "redis://USER:PASSWORD@HOST:PORT/DB; nothing was changed")
    if isinstance(found, redis.ConnectionError | redis.TimeoutError):
        return BrokerUnavailable(
            f"Redis is unreachable ({found}); nothing was changed, unless the connection dropped after Redis "
            "received the call: retrying is safe (a submit retried with the same idempotency_key is not "
            "duplicated)")
    if isinstance(found, NoPermissionError):
        return AccessDenied(f"the Redis user in the Redis URL may not do this ({found}); see "
                            "config/redis-acl.conf for what each role may do")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


def unavailable_as_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Redis's connection, credential and permission errors as gpubroker errors that say what to do."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, NoPermissionError) as exc:
            raise as_broker_error(exc) from exc
    return wrapper


def bulk(data: bytes) -> bytes:
    """One bulk string of the Redis protocol (RESP)."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode_command(*args: bytes) -> bytes:
    """A command in the Redis protocol, to send as is (``raw_pipeline``, ``SentCommand``)."""
    return b"*%d\r\n" % len(args) + b"".join(map(bulk, args))


def raw_pipeline(client: redis.Redis, commands: list[bytes]) -> list[Any]:
    """Send encoded ``commands`` in one write and read their replies as parsed off the wire.

    For a thousand small reads, redis-py's Pipeline bookkeeping (per-command options,
    response callbacks, encoding each argument) costs more than the replies themselves."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([b"".join(commands)])
        return [conn.read_response() for _ in commands]
    except BaseException:  # a reply may be half read: the connection is unusable
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


class SentCommand:
    """An encoded command sent now on a pooled connection of its own, its reply read later (once).

    The dispatcher sends one reserve.lua batch and plans the next before reading the reply."""

    def __init__(self, client: redis.Redis, command: bytes) -> None:
        self.pool = client.connection_pool
        self.conn: Any = self.pool.get_connection()
        try:
            self.conn.send_packed_command([command])
        except BaseException:
            self._drop()
            raise

    def reply(self) -> Any:
        """The reply; a Redis error reply (NoScriptError included) is raised with the connection
        returned to the pool, any other failure drops the connection (its reply may be half read)."""
        try:
            reply = self.conn.read_response()
        except redis.ResponseError:
            self.pool.release(self.conn)
            raise
        except BaseException:
            self._drop()
            raise
        self.pool.release(self.conn)
        return reply

    def _drop(self) -> None:
        self.conn.disconnect()
        self.pool.release(self.conn)
