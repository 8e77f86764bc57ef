"""The one place that makes Redis connections and talks to them below redis-py's commands.

``connect`` builds every client (the user's ``Client``, dispatchers, workers); ``raw_pipeline``,
``SentCommand`` and ``HeldConnection`` are the fast paths that write pre-encoded commands straight
onto a pooled connection. A Sentinel URL (``broker.redis_urls``) gives a client that follows the
master: every new connection asks the sentinels where it is, and a connection still open to a
demoted master is dropped on its first READONLY reply (redis-py's ``SentinelManagedConnection``)
and the call retried on the new one. Scripts are reloaded where the new master lacks them
(redis-py's ``Script`` and ``PreparedReserve`` on NOSCRIPT). ``wait_replicas`` is the durable
acknowledgement (``min_replicas_ack``).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import NoPermissionError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

from broker.errors import AccessDenied, AuthenticationFailed, BrokerUnavailable, RedisOutOfMemory, ReplicasNotConfirmed
from broker.redis_urls import SentinelTarget, is_sentinel, parse_sentinel
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


#: redis-py names itself to the server (CLIENT SETINFO) with its version, which it looks up in
#: the package metadata for every new connection: 0.8 ms each, 3 ms the first time in a process
#: (a fifth of a fresh pool process's start.lua). Looked up once here, before the worker forks.
DRIVER = DriverInfo()


def connect(settings: Settings) -> redis.Redis:
    """A Redis client for the settings' pool (``Settings.url``) that retries briefly with backoff,
    then fails instead of hanging.

    Credentials and TLS come from the URL: ``redis://USER:PASSWORD@HOST:PORT/DB`` (an ACL
    user, see config/redis-acl.conf), ``redis://:PASSWORD@...`` (requirepass),
    ``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem`` for TLS, and
    ``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``: the master
    the sentinels name, followed through failovers."""
    options: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "health_check_interval": 10,
        # A failover takes a few seconds: enough tries to outlast a short one.
        "retry": _Retry(ExponentialBackoff(cap=1.0, base=0.05), 8 if is_sentinel(settings.url) else 3),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "driver_info": DRIVER,
    }
    if is_sentinel(settings.url):
        client = sentinel_master(parse_sentinel(settings.url), options)
    else:
        client = redis.Redis.from_url(settings.url, **options)
    client.replicas_ack = (settings.min_replicas_ack, int(settings.replicas_ack_timeout_s * 1000))  # type: ignore[attr-defined]
    return client


class FollowMasterConnection(SentinelManagedConnection):
    """redis-py's Sentinel connection, asking the sentinels where the master is on *every* connect.

    redis-py 8 looks the master up only when a pooled connection is first connected; a connection
    that drops and reconnects inside a call's retries (``send_packed_command`` ->
    ``connect_check_health``) goes back to the address it had. After a failover that is the old
    master: refused at once when it died, but when it is cut off by a partition each retry waits
    a whole socket timeout on it (measured: 50 s of retries against the old master, 5 s each)."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self._sock is None and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class FollowMasterSSLConnection(FollowMasterConnection, SentinelManagedSSLConnection):
    """``FollowMasterConnection`` over TLS."""


_SSL_REQS = {"none": "none", "optional": "optional", "required": "required"}


def sentinel_master(target: SentinelTarget, options: dict[str, Any]) -> redis.Redis:
    """A client of the master ``target`` names, found through its sentinels."""
    tls: dict[str, Any] = {}
    if target.tls:
        tls = {"ssl": True, "ssl_cert_reqs": _SSL_REQS.get(target.ssl.get("ssl_cert_reqs", "required"), "required"),
               **{k: v for k, v in target.ssl.items() if k != "ssl_cert_reqs"}}
    sentinel = Sentinel(
        list(target.sentinels),
        sentinel_kwargs={"socket_timeout": options["socket_timeout"],
                         "socket_connect_timeout": options["socket_connect_timeout"], **tls},
        **tls)
    connection_class = FollowMasterSSLConnection if target.tls else FollowMasterConnection
    client: redis.Redis = sentinel.master_for(target.service, redis_class=redis.Redis, db=target.db,
                                              username=target.username, password=target.password,
                                              connection_class=connection_class, **options)
    return client


#: Error replies that pass by themselves, with what each means and what to do. A script refused
#: with one of them wrote nothing: Redis checks memory, role and state before a script's first
#: write, and a script never writes partly (its other errors are bugs, never retried).
TRANSIENT_REPLIES = {
    "OOM": "Redis is out of memory (maxmemory reached): nothing was written; retry later or raise maxmemory",
    "READONLY": "Redis is a read-only replica (after a failover?): nothing was written; point the Redis URL at "
                "the master, or use redis+sentinel://",
    "LOADING": "Redis is loading its data set (it just started): nothing was changed; retry in a moment",
    "BUSY": "Redis is busy running a long script: nothing was changed; retry in a moment",
    "MASTERDOWN": "Redis (a replica) has lost contact with its master: nothing was changed; retry once it is back",
    "NOREPLICAS": "Redis has fewer replicas than min-replicas-to-write: nothing was written; retry later",
    "CLUSTERDOWN": "the Redis cluster is down: nothing was changed; retry once it is back",
    "TRYAGAIN": "the Redis cluster is moving the pool's slot: nothing was changed; retry in a moment",
}


class NotReplicated(redis.RedisError):
    """A write was applied on the master, but fewer replicas than ``min_replicas_ack`` confirmed it
    in time (WAIT): it would be lost if the master failed now."""

    def __init__(self, acked: int, wanted: int, timeout_ms: int) -> None:
        self.acked, self.wanted, self.timeout_ms = acked, wanted, timeout_ms
        super().__init__(f"{acked} of {wanted} replicas confirmed the write within {timeout_ms} ms")


def wait_replicas(acked: Any, wanted: int, timeout_ms: int) -> None:
    """Raise NotReplicated unless WAIT's reply ``acked`` is at least ``wanted``."""
    if int(acked) < wanted:
        raise NotReplicated(int(acked), wanted, timeout_ms)


def durable_call(client: redis.Redis, script: Any, keys: list[Any], args: list[Any]) -> Any:
    """Run a registered ``script`` followed by WAIT for ``min_replicas_ack`` replicas; its reply.
    WAIT counts the writes of its own connection: both go on one (a pipeline)."""
    wanted, timeout_ms = replicas_ack(client)
    for last in (False, True):
        try:
            with client.pipeline(transaction=False) as pipe:
                script(keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", wanted, timeout_ms)
                reply, acked = pipe.execute()
            break
        except redis.exceptions.NoScriptError:
            # The pipeline loads its scripts before it sends, on the connection it has then; a
            # failover in between sends it again (redis-py's retry) to a new master that has
            # none. Nothing ran: load it there and send once more. (Seen in test_failover: a
            # task's finish failed with NoScriptError in its pool process after its code ran.)
            if last:
                raise
            client.script_load(script.script)
    wait_replicas(acked, wanted, timeout_ms)
    return reply


def wait_command(client: Any) -> bytes | None:
    """The encoded ``WAIT`` a durable write is followed by on its connection, or None (0 replicas)."""
    wanted, timeout_ms = replicas_ack(client)
    return encode_command(b"WAIT", b"%d" % wanted, b"%d" % timeout_ms) if wanted else None


def replicas_ack(client: Any) -> tuple[int, int]:
    """(min_replicas_ack, timeout in ms) of a client ``connect`` made; (0, 0) for any other."""
    return getattr(client, "replicas_ack", (0, 0))


def _redis_error(exc: BaseException) -> redis.RedisError | None:
    """The Redis error behind ``exc`` (itself, or the cause of a kombu or gpubroker error)."""
    found: BaseException | None = exc
    while found is not None and not isinstance(found, redis.RedisError):
        found = found.__cause__ or found.__context__
    return found


def _reply_code(error: redis.RedisError) -> str:
    """The code of an error reply (OOM, READONLY, BUSY...), whether redis-py parsed it or not."""
    code = getattr(error, "status_code", None)
    if code:
        return str(code)
    head = str(error).split(" ", 1)[0]
    return head if head.isalpha() and head.isupper() else ""


def transient(exc: BaseException) -> bool:
    """Does this Redis error (or a kombu or gpubroker error caused by one) pass by itself, so that
    retrying with backoff is right: a lost connection, a timeout, or a refusal in
    ``TRANSIENT_REPLIES``. Refused credentials or permissions (configuration) and a script's own
    error (a bug) are not: retrying cannot fix them."""
    found = _redis_error(exc)
    if found is None or isinstance(found, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return False
    if isinstance(found, redis.ConnectionError | redis.TimeoutError | NotReplicated):
        return True
    return _reply_code(found) in TRANSIENT_REPLIES


def as_broker_error(exc: BaseException) -> Exception:
    """The gpubroker error that says what a Redis error (or a kombu error caused by one) means and
    what to do; ``exc`` itself when there is none."""
    found = _redis_error(exc)
    if isinstance(found, redis.AuthenticationError):  # a ConnectionError too: test it first
        return AuthenticationFailed(
            f"Redis refused the credentials in the Redis URL ({found}); give them as "
            "redis://USER:PASSWORD@HOST:PORT/DB; nothing was changed")
    if isinstance(found, NoPermissionError):
        return AccessDenied(f"the Redis user in the Redis URL may not do this ({found}); see "
                            "config/redis-acl.conf for what each role may do")
    if isinstance(found, NotReplicated):
        return ReplicasNotConfirmed(
            f"the write was applied on the Redis master, but {found} (GPUBROKER_MIN_REPLICAS_ACK="
            f"{found.wanted}, GPUBROKER_REPLICAS_ACK_TIMEOUT_S): it could be lost if the master failed now. "
            "Retrying is safe (a submit retried with the same idempotency_key is not duplicated); if it keeps "
            "failing, check the replicas (INFO replication)")
    code = _reply_code(found) if found is not None else ""
    if found is not None and code in TRANSIENT_REPLIES:
        reply = str(found) if str(found).startswith(code) else f"{code} {found}"
        kind = RedisOutOfMemory if code == "OOM" else BrokerUnavailable
        return kind(f"{TRANSIENT_REPLIES[code]} ({reply})")
    if isinstance(found, redis.ConnectionError | redis.TimeoutError):
        return BrokerUnavailable(
            f"Redis is unreachable ({found}); nothing was changed, unless the connection dropped after Redis "
            "received the call: retrying is safe (a submit retried with the same idempotency_key is not "
            "duplicated)")
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


def unavailable_as_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Redis errors that have a meaning (``as_broker_error``) as gpubroker errors that say what to do."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            error = as_broker_error(exc)
            if error is exc:
                raise
            raise error from exc
    return wrapper


def bulk(data: bytes) -> bytes:
    """One bulk string of the Redis protocol (RESP)."""
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode_command(*args: bytes) -> bytes:
    """A command in the Redis protocol, to send as is (``raw_pipeline``, ``SentCommand``)."""
    return b"*%d\r\n" % len(args) + b"".join(map(bulk, args))


def _argument(value: Any) -> bytes:
    """One argument as redis-py encodes it (UTF-8 text, a number's repr); TypeError for any other."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError(type(value).__name__)


def evalsha_command(sha: str, keys: Sequence[Any], args: Sequence[Any]) -> bytes | None:
    """``EVALSHA sha len(keys) *keys *args``, encoded; None when an argument is of a type only
    redis-py's own encoder may judge (it raises DataError for those)."""
    try:
        return encode_command(b"EVALSHA", sha.encode(), b"%d" % len(keys), *map(_argument, (*keys, *args)))
    except TypeError:
        return None


class HeldConnection:
    """The fast path for calls a process makes one after another (a pool process's start.lua and
    finish.lua for every task): one pooled connection kept for them, the encoded command written
    and its reply read, nothing more. Taking a pooled connection per call (redis-py polls it for
    unread data each time) and redis-py's per-argument packing cost more CPU than the round trip
    itself (a script call: 85 µs against 40 µs on a 2-core VM).

    Whatever is off that path goes the usual way (``usual``, redis-py's call): a call from a second
    thread while one is in flight, a script Redis does not have (NOSCRIPT: redis-py loads it), a
    lost connection (redis-py reconnects, through the sentinels where the URL names them, and
    retries: as after its own retries, a script sent again is one whose repeat its fence refuses)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client, self.pool = client, client.connection_pool
        self.lock = threading.Lock()
        self.conn: Any = None
        self.pid = 0  # the process ``conn`` belongs to: a forked child takes its own

    def script(self, script: Any, keys: Sequence[Any], args: Sequence[Any], durable: bool = False) -> Any:
        """Run redis-py ``Script`` ``script``; ``durable``: followed by WAIT for ``min_replicas_ack``
        replicas where that is set (``durable_call``, on a connection of its own)."""
        if durable and replicas_ack(self.client)[0]:
            return durable_call(self.client, script, list(keys), list(args))
        return self.call(evalsha_command(script.sha, keys, args), lambda: script(keys=list(keys), args=list(args)))

    def call(self, command: bytes | None, usual: Callable[[], R]) -> R | Any:
        if command is None or not self.lock.acquire(blocking=False):
            return usual()
        try:
            if self.conn is None or self.pid != os.getpid():
                self.conn, self.pid = self.pool.get_connection(), os.getpid()
            try:
                self.conn.send_packed_command([command])
                return self.conn.read_response()
            except redis.exceptions.NoScriptError:
                pass  # its reply was read: the connection is fine
            except redis.ResponseError:
                raise
            except (redis.ConnectionError, redis.TimeoutError):
                self._drop()
            except BaseException:  # a signal's exception mid-call: a reply may be half read
                self._drop()
                raise
        finally:
            self.lock.release()
        return usual()

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        conn.disconnect()
        self.pool.release(conn)


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
    """An encoded command, or ``count`` of them (and, when given, a ``then`` command right behind
    on the same connection: a WAIT), sent now on a pooled connection of its own, their replies
    read later (once).

    The dispatcher sends one reserve.lua batch and plans the next before reading the reply; a
    batch submit sends one chunk of submit.lua calls and encodes the next."""

    def __init__(self, client: redis.Redis, command: bytes, then: bytes | None = None, count: int = 1) -> None:
        self.pool = client.connection_pool
        self.count = count + (1 if then else 0)
        self.done = False  # the connection went back to the pool (replies read, or dropped)
        self.conn: Any = self.pool.get_connection()
        try:
            self.conn.send_packed_command([command + (then or b"")])
        except BaseException:
            self._drop()
            raise

    def reply(self) -> Any:
        """The reply of the command (``replies`` for both)."""
        return self.replies()[0]

    def replies(self) -> list[Any]:
        """Every reply, in order; a Redis error reply (NoScriptError included) is raised once all are
        read, with the connection returned to the pool; any other failure drops the connection
        (a reply may be half read)."""
        replies: list[Any] = []
        try:
            for _ in range(self.count):
                try:
                    replies.append(self.conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            self._drop()
            raise
        self.done = True
        self.pool.release(self.conn)
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply
        return replies

    def discard(self) -> None:
        """Give the connection up if its replies are still unread (they are lost with it): after a
        failure elsewhere. Once ``replies`` has run the connection is back in the pool: nothing to do."""
        if not self.done:
            self._drop()

    def _drop(self) -> None:
        self.done = True
        self.conn.disconnect()
        self.pool.release(self.conn)
