"""Security basics against real redis-servers: a password, the ACL roles of config/redis-acl.conf, TLS.

Every server here is a real redis-server started by the test with the options an
operator would use (``--requirepass``, ``--aclfile config/redis-acl.conf``,
``--tls-port`` with a throwaway CA). Nothing is mocked: each role connects with its
own credentials in the URL, exactly as ``GPUBROKER_REDIS_URL`` carries them.

What the ACL roles can and cannot enforce is pinned here too (see README "Security"):
Redis checks key patterns on the KEYS declared to EVALSHA (which need read *and*
write) and again on every command a script runs, with the caller's permissions.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from broker import Client, Resources
from broker.celery_conf import TRANSPORT, broker_use_ssl, monitor_app
from broker.dispatcher import Dispatcher
from broker.errors import AccessDenied, AuthenticationFailed, BrokerUnavailable
from broker.models import SubmitRequest, TaskState
from broker.scheduling.model import Placement
from broker.settings import Settings, redacted_url
from broker.store.keys import PoolKeys
from broker.store.scripts import FinishCode, RegisterCode, Scripts, StartCode
from tests.support import ROOT, Processes, RedisServer, free_port, wait_until

ACL_FILE = ROOT / "config" / "redis-acl.conf"
ROLES = ("producer", "dispatcher", "worker", "monitor", "flower")
PROBE = "workers.tasks.probe"
FAST_LEASES = {"GPUBROKER_LEASE_S": "4", "GPUBROKER_HEARTBEAT_S": "0.5", "GPUBROKER_REAP_INTERVAL_S": "0.5"}


def acl_passwords(path: Path = ACL_FILE) -> dict[str, str]:
    """user -> its (placeholder) password, read from the ACL file itself."""
    users = {}
    for line in path.read_text().splitlines():
        words = line.split()
        if words and words[0] == "user":
            users[words[1]] = next((w[1:] for w in words[2:] if w.startswith(">")), "")
    return users


class SecureRedis(RedisServer):
    """A RedisServer that needs credentials and/or TLS: its readiness ping uses them too."""

    def __init__(self, workdir: Path, *extra: str, scheme: str = "redis", query: str = "",
                 admin: tuple[str | None, str] | None = None) -> None:
        super().__init__(workdir, *extra)
        self.scheme, self.query, self.admin = scheme, query, admin

    def url_as(self, user: str | None = None, password: str | None = None, query: str | None = None) -> str:
        creds = f"{quote(user or '', safe='')}:{quote(password, safe='')}@" if password is not None else ""
        return f"{self.scheme}://{creds}127.0.0.1:{self.port}/0{self.query if query is None else query}"

    def admin_client(self) -> redis.Redis:
        user, password = self.admin if self.admin else (None, None)
        return redis.Redis.from_url(self.url_as(user, password), socket_connect_timeout=0.5)

    def _pings(self, client: redis.Redis) -> bool:  # type: ignore[override]
        """Ready when an admin ping answers; a server that exited says why instead of timing out."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = (self.workdir / "redis.log").read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError("redis-server exited: " + " | ".join(tail))
        try:
            with self.admin_client() as admin:
                return bool(admin.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False


def fresh_pool() -> str:
    return f"sec-{uuid.uuid4().hex[:8]}"


class Clock:
    def __init__(self) -> None:
        self.now_ms = int(time.time() * 1000)

    def __call__(self) -> int:
        return self.now_ms


# ---- a password (requirepass) ----------------------------------------------------


@pytest.fixture(scope="module")
def password_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    server = SecureRedis(tmp_path_factory.mktemp("redis-pass"), "--requirepass", "s3cret/pw", admin=(None, "s3cret/pw"))
    server.start()
    yield server
    server.stop()


def test_password_in_the_url_submits_and_reads(password_server: SecureRedis) -> None:
    pool = fresh_pool()
    with Client(password_server.url_as(None, "s3cret/pw"), pool=pool) as client:
        handle = client.submit(PROBE, kwargs={"seconds": 0}, priority=3)
        status = client.status(handle.id)
        assert status.state is TaskState.PENDING and status.priority == 3
        assert [e.id for e in client.queue()] == [handle.id]


@pytest.mark.parametrize("password", ["wrong", None], ids=["wrong-password", "no-password"])
def test_wrong_or_missing_password_is_a_clear_error(password_server: SecureRedis, password: str | None) -> None:
    pool = fresh_pool()
    with password_server.admin_client() as admin:
        before = admin.dbsize()
    with Client(password_server.url_as(None, password), pool=pool) as client:
        with pytest.raises(AuthenticationFailed) as refused:
            client.submit(PROBE)
        with pytest.raises(AuthenticationFailed):
            client.status("no-such-task")
    message = str(refused.value)
    assert isinstance(refused.value, BrokerUnavailable), "callers catching BrokerUnavailable still catch it"
    assert "refused the credentials" in message and "redis://USER:PASSWORD@" in message
    assert "unreachable" not in message and "wrong" not in message, "names the problem, never echoes the password"
    with password_server.admin_client() as admin:
        assert admin.dbsize() == before, "nothing was written"


def test_logged_urls_hide_the_password() -> None:
    assert redacted_url("redis://producer:p%40ss@h:6379/0") == "redis://producer:***@h:6379/0"
    assert redacted_url("rediss://:pw@h:6380/0?ssl_cert_reqs=required") == "rediss://:***@h:6380/0?ssl_cert_reqs=required"
    assert redacted_url("redis://h:6379/0") == "redis://h:6379/0"


# ---- ACL users: config/redis-acl.conf --------------------------------------------


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    passwords = acl_passwords()
    server = SecureRedis(tmp_path_factory.mktemp("redis-acl"), "--aclfile", str(ACL_FILE),
                         admin=("admin", passwords["admin"]))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def admin(acl_server: SecureRedis) -> Iterator[redis.Redis]:
    client = acl_server.admin_client()
    client.acl_log_reset()
    yield client
    client.close()


def url(server: SecureRedis, role: str) -> str:
    return server.url_as(role, acl_passwords()[role])


def as_role(server: SecureRedis, role: str) -> redis.Redis:
    return redis.Redis.from_url(url(server, role))


def acl_denials(admin: redis.Redis) -> list[tuple[str, str, str]]:
    """(user, reason, object) of every ACL refusal since the fixture reset the log."""
    return [(e["username"], e["reason"], e["object"]) for e in admin.acl_log(count=1000)]


def register_node(server: SecureRedis, keys: PoolKeys, node: str = "n1", gpus: int = 2, lease_ms: int = 60_000,
                  clock: Clock | None = None, incarnation: str = "inc-1") -> Scripts:
    """Register a node as the worker role does, and return the worker's scripts."""
    worker = Scripts(as_role(server, "worker"), keys, clock or Clock())
    code, _ = worker.register(node, incarnation, lease_ms, gpus, 40960, 8000, 65536, 4, {"gpu_model": "A100"})
    assert code in (RegisterCode.CREATED, RegisterCode.REPLACED)
    return worker


def test_the_acl_file_loads_and_has_no_default_user(acl_server: SecureRedis, admin: redis.Redis) -> None:
    users = {entry.split()[1] for entry in admin.acl_list()}
    assert set(ROLES) | {"admin", "default"} <= users
    assert "off" in admin.acl_getuser("default")["flags"]
    with Client(acl_server.url_as(), pool=fresh_pool()) as anonymous:
        with pytest.raises(AuthenticationFailed):
            anonymous.nodes()
    for role, password in acl_passwords().items():
        if role != "default":
            assert password.startswith("CHANGE-ME"), f"{role}: ship placeholders, never a real password"


# role -> key -> "rw" | "r" | "-" (what ACL DRYRUN must say). The keys are every key of broker/keys.py.
KEY_ACCESS: dict[str, dict[str, str]] = {
    #                 producer dispatcher worker monitor flower
    # Scripts that finalize a task (cancel) get the prefix as a key: it names no data of its own.
    "prefix":        dict(zip(ROLES, ["rw", "rw", "rw", "r", "r"], strict=True)),
    # The dispatcher forgets nodes down for node_forget_after_s (forget.lua).
    "nodes":         dict(zip(ROLES, ["r", "rw", "rw", "r", "r"], strict=True)),
    "node":          dict(zip(ROLES, ["r", "rw", "rw", "r", "r"], strict=True)),
    "node_tasks":    dict(zip(ROLES, ["r", "rw", "rw", "r", "r"], strict=True)),
    "leases":        dict(zip(ROLES, ["r", "rw", "rw", "r", "r"], strict=True)),
    "queue":         dict(zip(ROLES, ["-", "rw", "rw", "r", "r"], strict=True)),
    "unacked":       dict(zip(ROLES, ["-", "rw", "rw", "r", "r"], strict=True)),
    "unacked_index": dict(zip(ROLES, ["-", "rw", "rw", "r", "r"], strict=True)),
    "unacked_mutex": dict(zip(ROLES, ["-", "rw", "rw", "r", "r"], strict=True)),
    "task":          dict(zip(ROLES, ["rw", "rw", "rw", "r", "r"], strict=True)),
    "pending":       dict(zip(ROLES, ["rw", "rw", "rw", "r", "r"], strict=True)),
    "requests":      dict(zip(ROLES, ["rw", "rw", "rw", "r", "r"], strict=True)),
    # A final transition (finish, cancel, expire, reap) expires the record's idempotency key.
    "idempotency":   dict(zip(ROLES, ["rw", "rw", "rw", "r", "r"], strict=True)),
    "delayed":       dict(zip(ROLES, ["rw", "rw", "rw", "r", "r"], strict=True)),
    "expiring":      dict(zip(ROLES, ["rw", "rw", "rw", "r", "r"], strict=True)),
    "tasks":         dict(zip(ROLES, ["r", "rw", "rw", "r", "r"], strict=True)),
    "ratelimit":     dict(zip(ROLES, ["-", "rw", "r", "r", "r"], strict=True)),
    "celery":        dict(zip(ROLES, ["rw", "rw", "rw", "r", "r"], strict=True)),
    # The dispatcher reads it to tell whether tasks came since a cycle that placed nothing (scan_gate).
    "seq":           dict(zip(ROLES, ["rw", "r", "-", "r", "r"], strict=True)),
    # The dispatcher exports the counts (gpubroker_rejected_messages_total).
    "rejected":      dict(zip(ROLES, ["-", "r", "rw", "r", "r"], strict=True)),
    "wake":          dict(zip(ROLES, ["rw", "rw", "rw", "r", "r"], strict=True)),
    "mix":           dict(zip(ROLES, ["rw", "r", "-", "r", "r"], strict=True)),
    "runtimes":      dict(zip(ROLES, ["-", "r", "rw", "r", "r"], strict=True)),
    "preempting":    dict(zip(ROLES, ["-", "rw", "-", "r", "r"], strict=True)),
    "gangs":         dict(zip(ROLES, ["-", "rw", "-", "r", "r"], strict=True)),
    "changes":       dict(zip(ROLES, ["-", "rw", "rw", "r", "r"], strict=True)),
    "queueinfo":     dict(zip(ROLES, ["r", "rw", "-", "r", "r"], strict=True)),
    "scheduling":    dict(zip(ROLES, ["r", "rw", "-", "r", "r"], strict=True)),
    # The dispatcher says whether finish.lua may pass an ended attempt's place on (_handoff.lua).
    "handoff":       dict(zip(ROLES, ["-", "rw", "r", "r", "r"], strict=True)),
    # quarantine.lua (dispatcher) drops a queue entry it cannot end FAILED there.
    "deadletter":    dict(zip(ROLES, ["-", "rw", "-", "r", "r"], strict=True)),
    # Every final transition counts its outcome there (_release.lua), whoever runs it.
    "outcomes":      dict(zip(ROLES, ["rw", "rw", "rw", "r", "r"], strict=True)),
    # ... and enters the history index (conclude); the dispatcher trims it.
    "finished":      dict(zip(ROLES, ["rw", "rw", "rw", "r", "r"], strict=True)),
    # Workers publish their warm processes and warm hits; forget (dispatcher, worker) removes a node's.
    "warm":          dict(zip(ROLES, ["r", "rw", "rw", "r", "r"], strict=True)),
    "warmstarts":    dict(zip(ROLES, ["r", "rw", "rw", "r", "r"], strict=True)),
    # The dispatcher's last cycle, for `gpubroker health dispatcher` (run with its credentials).
    "cycle":         dict(zip(ROLES, ["-", "rw", "-", "r", "r"], strict=True)),
}


def pool_key_names(keys: PoolKeys) -> dict[str, str]:
    """Every key name PoolKeys can build (properties, and methods called with an id)."""
    names = {}
    for attr in dir(keys):
        if attr.startswith("_") or attr == "pool":
            continue
        value = getattr(keys, attr)
        names[attr] = value("n1") if callable(value) else value
    return names


def dryrun(admin: redis.Redis, role: str, *command: str) -> bool:
    try:
        return admin.execute_command("ACL", "DRYRUN", role, *command) == b"OK"
    except redis.ResponseError:
        return False


def test_every_key_has_the_documented_access_per_role(admin: redis.Redis) -> None:
    names = pool_key_names(PoolKeys("pool-x"))
    unlisted = set(names) - set(KEY_ACCESS)
    assert not unlisted, (f"broker/keys.py has keys {sorted(unlisted)} that no role was decided for: add them to "
                          "config/redis-acl.conf and KEY_ACCESS here")
    wrong = []
    for key_name, key in names.items():
        for role in ROLES:
            reads = dryrun(admin, role, "HGET", key, "f") or dryrun(admin, role, "LLEN", key)
            writes = dryrun(admin, role, "HDEL", key, "f")
            got = "rw" if reads and writes else "r" if reads else "w!" if writes else "-"
            if got != KEY_ACCESS[key_name][role]:
                wrong.append(f"{role} on {key_name} ({key}): {got}, documented {KEY_ACCESS[key_name][role]}")
    assert not wrong, "\n".join(wrong)


ADMIN_COMMANDS = [
    ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("CONFIG", "SET", "appendonly", "no"), ("KEYS", "*"),
    ("SCAN", "0"), ("RANDOMKEY",), ("DEBUG", "SLEEP", "0"), ("SCRIPT", "FLUSH"), ("EVAL", "return 1", "0"),
    ("FUNCTION", "FLUSH"), ("SHUTDOWN",), ("ACL", "LIST"), ("MONITOR",), ("CLIENT", "LIST"), ("SAVE",),
    ("REPLICAOF", "NO", "ONE"), ("MODULE", "LIST"), ("SWAPDB", "0", "1"), ("MIGRATE", "h", "1", "k", "0", "1"),
]


@pytest.mark.parametrize("role", ROLES)
def test_no_role_may_run_administrative_or_keyspace_wide_commands(admin: redis.Redis, role: str) -> None:
    allowed = [" ".join(cmd) for cmd in ADMIN_COMMANDS if dryrun(admin, role, *cmd)]
    assert not allowed, f"{role} may run {allowed}"


# channel -> roles that may PUBLISH on it (Redis 7.0 cannot grant SUBSCRIBE without PUBLISH).
PUBLISH_ACCESS = {
    "gpb:{p}:wake": {"producer", "dispatcher", "worker"},
    "/0.celeryev/task.sent": {"producer", "worker", "flower"},
    "/0.celery.pidbox": {"worker", "flower"},  # worker control (revoke, shutdown, ...)
    "other": set(),
}


def test_who_may_publish_on_which_channel(admin: redis.Redis) -> None:
    for channel, expected in PUBLISH_ACCESS.items():
        allowed = {role for role in ROLES if dryrun(admin, role, "PUBLISH", channel, "x")}
        assert allowed == expected, channel
    # The monitor has no PUBLISH at all; it may only subscribe to the events channel.
    assert dryrun(admin, "monitor", "PSUBSCRIBE", "/0.celeryev/*")
    assert not dryrun(admin, "monitor", "PSUBSCRIBE", "/0.celery.pidbox")


def test_producer_submits_reads_and_cancels_with_the_task_sent_event(
        acl_server: SecureRedis, admin: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    keys = PoolKeys(fresh_pool())
    register_node(acl_server, keys)
    events = as_role(acl_server, "monitor").pubsub()
    events.psubscribe("/0.celeryev/*")
    assert events.get_message(timeout=2)["type"] == "psubscribe"

    with Client(url(acl_server, "producer"), pool=keys.pool) as producer, caplog.at_level(logging.WARNING):
        handle = producer.submit(PROBE, kwargs={"seconds": 1}, resources=Resources(gpus=1), tenant="vision",
                                 idempotency_key="run-1")
        assert producer.submit(PROBE, idempotency_key="run-1").id == handle.id
        assert producer.status(handle.id).state is TaskState.PENDING
        assert [e.id for e in producer.queue()] == [handle.id]
        assert [(n.id, len(n.gpus)) for n in producer.nodes()] == [("n1", 2)]
        assert producer.cancel(handle.id).state is TaskState.CANCELLED
        assert producer.queue() == []
    assert not [r for r in caplog.records if "task-sent" in r.getMessage()], "the task-sent event was emitted"

    message = wait_until(lambda: events.get_message(timeout=0.5), 5, what="the task-sent event")
    assert message["channel"] == b"/0.celeryev/task.sent"
    body = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
    assert (body["type"], body["uuid"]) == ("task-sent", handle.id)
    events.close()
    assert acl_denials(admin) == []


def test_producer_cannot_write_node_state_or_run_other_scripts(acl_server: SecureRedis, admin: redis.Redis) -> None:
    keys = PoolKeys(fresh_pool())
    register_node(acl_server, keys)
    node_state = (keys.node("n1"), keys.node_tasks("n1"), keys.nodes, keys.leases, keys.queue("n1"), keys.rejected)
    before = [admin.dump(key) for key in node_state]
    raw = as_role(acl_server, "producer")

    for write in (lambda: raw.hset(keys.node("n1"), "free_slots", 99),
                  lambda: raw.hincrby(keys.node("n1"), "g0_milli", 1), lambda: raw.delete(keys.node("n1")),
                  lambda: raw.zadd(keys.leases, {"n1": 1}),
                  lambda: raw.sadd(keys.nodes, "ghost"), lambda: raw.lpush(keys.queue("n1"), "{}"),
                  lambda: raw.hset(keys.rejected, "n1", 1)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            write()
    for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCRIPT", "FLUSH"),
                    ("EVAL", "return 1", "0"), ("ACL", "SETUSER", "producer", "+@all")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            raw.execute_command(*command)
    # DEBUG is refused to everyone by redis-server's default (enable-debug-command no); the ACL refuses it too.
    assert not dryrun(admin, "producer", "DEBUG", "SLEEP", "0")

    with Client(url(acl_server, "producer"), pool=keys.pool) as producer:
        task_id = producer.submit(PROBE, resources=Resources(gpus=1)).id
    assert [admin.dump(key) for key in node_state] == before, "no node state changed"
    scripts = Scripts(raw, keys)
    for node_script in (lambda: scripts.register("n1", "evil", 60_000, 8, 81920, 64000, 1 << 20, 64, {}),
                        lambda: scripts.heartbeat("n1", "inc-1", 60_000),
                        lambda: scripts.reserve([Placement(task_id, "n1", (0,))]),
                        lambda: scripts.finish(task_id, "n1", f"{task_id}.1", "succeeded", "{}"),
                        scripts.reap):
        with pytest.raises(redis.exceptions.NoPermissionError):
            node_script()

    # A reserved task holds node capacity: the producer may not release it, so it asks, changing no
    # node state, and the dispatcher (which may write node state) releases it on its next cycle.
    dispatcher = Dispatcher(Settings(redis_url=url(acl_server, "dispatcher"), pool=keys.pool))
    assert dispatcher.run_cycle().placed == 1
    before = [admin.dump(key) for key in node_state]
    with Client(url(acl_server, "producer"), pool=keys.pool) as producer:
        assert producer.cancel(task_id).state is TaskState.RESERVED
        assert [admin.dump(key) for key in node_state] == before, "no node state changed"
        assert dispatcher.run_cycle().expired == [task_id]
        assert (producer.status(task_id).state, producer.status(task_id).error) == (TaskState.CANCELLED, "cancelled")
        (node,) = producer.nodes()
        assert node.tasks == 0 and all(g.free_milli == 1000 for g in node.gpus), "capacity is whole again"
    assert {user for user, _reason, _object in acl_denials(admin)} == {"producer"}


def test_each_role_runs_its_own_part_of_the_state_machine(acl_server: SecureRedis, admin: redis.Redis) -> None:
    """submit (producer) -> reserve (dispatcher) -> start/finish (worker) -> reap and reclaim."""
    keys = PoolKeys(fresh_pool())
    clock = Clock()
    worker = register_node(acl_server, keys, lease_ms=10_000, clock=clock)
    settings = Settings(redis_url=url(acl_server, "dispatcher"), pool=keys.pool)
    dispatcher = Dispatcher(settings, clock=clock)

    with Client(url(acl_server, "producer"), pool=keys.pool, clock=clock) as producer:
        first = producer.submit(PROBE, resources=Resources(gpus=1)).id
        second = producer.submit(PROBE, resources=Resources(gpus=0.5, cpus=1)).id
        assert dispatcher.run_cycle().placed == 2

        tag = f"{first}.1"
        code, gpus = worker.start(first, "n1", tag)
        assert code is StartCode.OK and gpus in ("0", "1")
        assert worker.finish(first, "n1", tag, "succeeded", json.dumps({"ok": True})) == (FinishCode.OK, "SUCCEEDED")
        assert producer.status(first).result == {"ok": True}

        # The node's lease runs out: the dispatcher's reaper takes back what it held (keys built in Lua).
        assert worker.start(second, "n1", f"{second}.1")[0] is StartCode.OK
        clock.now_ms += 11_000
        report = dispatcher.run_cycle()
        assert report.reaped == ["n1"]
        assert producer.status(second).state is TaskState.PENDING

        # A new incarnation of the node registers (reclaim path) and the task is placed again.
        register_node(acl_server, keys, clock=clock, incarnation="inc-2")
        assert dispatcher.run_cycle().placed == 1
        assert worker.start(second, "n1", f"{second}.2")[0] is StartCode.OK
        register_node(acl_server, keys, clock=clock, incarnation="inc-3")  # reclaims a RUNNING task
        assert producer.status(second).state is TaskState.PENDING

    with pytest.raises(redis.exceptions.NoPermissionError):  # neither the worker nor the dispatcher submits
        Scripts(as_role(acl_server, "worker"), keys).submit("t", SubmitRequest(task_name=PROBE), "{}")
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_role(acl_server, "dispatcher").set(keys.seq, 1)
    assert sorted(acl_denials(admin)) == [("dispatcher", "key", keys.seq), ("worker", "key", keys.seq)]


def test_monitor_reads_but_cannot_write(acl_server: SecureRedis, admin: redis.Redis) -> None:
    keys = PoolKeys(fresh_pool())
    register_node(acl_server, keys)
    with Client(url(acl_server, "producer"), pool=keys.pool) as producer:
        task_id = producer.submit(PROBE).id

    with Client(url(acl_server, "monitor"), pool=keys.pool) as monitor:
        assert monitor.status(task_id).state is TaskState.PENDING
        assert [e.id for e in monitor.queue()] == [task_id]
        assert [n.id for n in monitor.nodes()] == ["n1"]
        with pytest.raises(AccessDenied, match=r"config/redis-acl\.conf"):
            monitor.submit(PROBE)
        with pytest.raises(AccessDenied):
            monitor.cancel(task_id)
    raw = as_role(acl_server, "monitor")
    assert raw.llen(keys.queue("n1")) == 0
    for write in (lambda: raw.hset(keys.task(task_id), "state", "SUCCEEDED"), lambda: raw.delete(keys.pending),
                  lambda: raw.publish("/0.celery.pidbox", "{}"), lambda: Scripts(raw, keys).heartbeat("n1", "i", 1)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            write()
    assert admin.hget(keys.task(task_id), "state") == b"PENDING"


def test_documented_limit_a_producer_may_rewrite_any_task_record(acl_server: SecureRedis, admin: redis.Redis) -> None:
    """Key patterns cannot tell a producer's own tasks from others', nor submit.lua's writes from
    any other write to a task hash. README "Security" says so; this keeps that statement true."""
    keys = PoolKeys(fresh_pool())
    register_node(acl_server, keys)
    with Client(url(acl_server, "producer"), pool=keys.pool) as producer:
        task_id = producer.submit(PROBE, tenant="someone-else").id
    Dispatcher(Settings(redis_url=url(acl_server, "dispatcher"), pool=keys.pool)).run_cycle()
    raw = as_role(acl_server, "producer")
    raw.hset(keys.task(task_id), "tenant", "mine")  # any field of any task
    assert admin.hget(keys.task(task_id), "tenant") == b"mine"
    # ...but not run a task: start.lua also takes the node's key, which a producer may only read.
    with pytest.raises(redis.exceptions.NoPermissionError):
        Scripts(raw, keys).start(task_id, "n1", f"{task_id}.1")
    assert admin.hget(keys.task(task_id), "state") == b"RESERVED"
    assert acl_denials(admin) == [("producer", "key", keys.node("n1"))]


def test_a_record_a_producer_poisoned_is_quarantined_by_the_dispatcher_role(acl_server: SecureRedis,
                                                                           admin: redis.Redis) -> None:
    """What the documented limit above allows, the dispatcher survives on its own ACL role: the task
    ends FAILED, a queue entry with no task is dead-lettered, nothing is refused for permissions."""
    keys = PoolKeys(fresh_pool())
    register_node(acl_server, keys)
    with Client(url(acl_server, "producer"), pool=keys.pool) as producer:
        task_id = producer.submit(PROBE).id
        raw = as_role(acl_server, "producer")
        raw.hset(keys.task(task_id), "req", "{}")
        raw.hset(keys.requests, mapping={task_id: "{}", "ghost": "{}"})
        raw.zadd(keys.pending, {"ghost": 0})
        report = Dispatcher(Settings(redis_url=url(acl_server, "dispatcher"), pool=keys.pool)).run_cycle()
        assert sorted(report.quarantined) == sorted([task_id, "ghost"])
        assert producer.status(task_id).state is TaskState.FAILED
    assert admin.hexists(keys.deadletter, "ghost") and acl_denials(admin) == []


# ---- every process on its own role, end to end ------------------------------------


class Flower:
    def __init__(self, procs: Processes, redis_url: str) -> None:
        self.port = free_port()
        self.auth = "Basic " + base64.b64encode(b"u:p").decode()
        log = (procs.logdir / "flower.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "broker.celery_conf:app", "flower", f"--port={self.port}",
             "--address=127.0.0.1", "--basic-auth=u:p"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**procs.env, "GPUBROKER_REDIS_URL": redis_url},
            start_new_session=True)
        procs.procs.append(proc)

    def get(self, path: str) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": self.auth})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read() or b"null")
        except (urllib.error.URLError, OSError, ValueError):
            return None


@pytest.fixture
def role_procs(tmp_path: Path, acl_server: SecureRedis) -> Iterator[Processes]:
    procs = Processes(tmp_path, url(acl_server, "monitor"), fresh_pool(), env=FAST_LEASES)
    yield procs
    procs.stop_all()


@pytest.mark.e2e
def test_every_process_on_its_own_acl_role_end_to_end(acl_server: SecureRedis, admin: redis.Redis,
                                                      role_procs: Processes) -> None:
    pool = role_procs.env["GPUBROKER_POOL"]
    role_procs.spawn("dispatcher", "dispatcher", "--log-level", "INFO",
                     env={"GPUBROKER_REDIS_URL": url(acl_server, "dispatcher")})
    role_procs.spawn("worker-n1", "worker", "--node", "n1", "--gpus", "1", "--slots", "2",
                     env={"GPUBROKER_REDIS_URL": url(acl_server, "worker")})
    flower = Flower(role_procs, url(acl_server, "flower"))

    with Client(url(acl_server, "producer"), pool=pool) as producer:
        wait_until(lambda: [n.id for n in producer.nodes() if n.state == "up"] == ["n1"], 30, what="n1 to register")
        # Flower heard from the worker through events: its event receiver is live from here on.
        wait_until(lambda: any(w.startswith("n1@") and alive
                               for w, alive in (flower.get("/api/workers?status=true") or {}).items()),
                   30, interval=0.2, what="Flower to see n1 through events")
        # Workers send task events once a monitor asks (Flower's enable_events, every 5 s), as
        # Celery's do: probes run until Flower (its own role) shows one SUCCESS on n1 through events.
        def flower_saw_a_probe() -> bool:
            done = producer.wait(producer.submit(PROBE, kwargs={"seconds": 0.2}, resources=Resources(gpus=1)).id, 60)
            assert (done.state, done.node, done.error) == (TaskState.SUCCEEDED, "n1", None)
            assert done.result["cuda_visible_devices"] == "0"

            def shown() -> bool:
                task = (flower.get("/api/tasks") or {}).get(done.id) or {}
                return task.get("state") == "SUCCESS" and str(task.get("worker", "")).startswith("n1@")
            try:
                wait_until(shown, 3, interval=0.2, what="Flower to show the probe")
            except AssertionError:
                return False
            return True
        wait_until(flower_saw_a_probe, 60, interval=0.1, what="Flower to show a task SUCCESS on n1")
        # Flower's inspect broadcasts reach the worker, and its queue view reads the node's queue.
        wait_until(lambda: any(w.startswith("n1@") for w in flower.get("/api/workers?refresh=true") or {}), 20,
                   interval=0.5, what="Flower to inspect n1")
        queues = (flower.get("/api/queues/length") or {}).get("active_queues")
        assert queues == [{"name": PoolKeys(pool).queue("n1"), "messages": 0}]

        # A running task: the producer cancels it (a mark on the task); its worker, whose role may
        # write node state, stops the process and releases the capacity.
        running = producer.submit(PROBE, kwargs={"seconds": 30}, resources=Resources(gpus=1)).id
        wait_until(lambda: producer.status(running).state is TaskState.RUNNING, 30, what="the task to run")
        assert producer.cancel(running).state is TaskState.RUNNING
        assert producer.wait(running, 15).state is TaskState.CANCELLED
        wait_until(lambda: producer.nodes()[0].free_slots == 2 and producer.nodes()[0].tasks == 0, 10,
                   what="the cancelled task's capacity back")

    assert acl_denials(admin) == []
    for name in ("dispatcher", "worker-n1", "flower"):
        log = role_procs.log(name)
        assert "NOPERM" not in log and "no permissions" not in log, name
        for role in ROLES:
            assert acl_passwords()[role] not in log, f"{name}'s log shows a password"


# ---- TLS ------------------------------------------------------------------------


def make_tls_material(directory: Path, name: str) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {part: directory / f"{name}-{part}" for part in ("ca.key", "ca.crt", "server.key", "server.csr",
                                                            "server.crt", "ext.cnf")}
    paths["ext.cnf"].write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name} test CA",
            "-keyout", str(paths["ca.key"]), "-out", str(paths["ca.crt"]))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(paths["server.key"]), "-out", str(paths["server.csr"]))
    openssl("x509", "-req", "-days", "2", "-in", str(paths["server.csr"]), "-CA", str(paths["ca.crt"]),
            "-CAkey", str(paths["ca.key"]), "-CAcreateserial", "-extfile", str(paths["ext.cnf"]),
            "-out", str(paths["server.crt"]))
    return paths


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a throwaway CA for the TLS tests")
    return tmp_path_factory.mktemp("tls")


@pytest.fixture(scope="module")
def tls_server(tls_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    pem = make_tls_material(tls_dir, "good")
    query = f"?ssl_cert_reqs=required&ssl_ca_certs={quote(str(pem['ca.crt']), safe='/')}"
    server = SecureRedis(tmp_path_factory.mktemp("redis-tls"), scheme="rediss", query=query, admin=(None, "tls-pw"))
    # TLS only: the plain port is closed (the later --port wins over RedisServer's own).
    server.extra = ["--port", "0", "--tls-port", str(server.port), "--tls-cert-file", str(pem["server.crt"]),
                    "--tls-key-file", str(pem["server.key"]), "--tls-ca-cert-file", str(pem["ca.crt"]),
                    "--tls-auth-clients", "no", "--requirepass", "tls-pw"]
    try:
        server.start()
    except (RuntimeError, AssertionError) as exc:
        server.kill()
        if "TLS" in str(exc) or "tls" in str(exc):
            pytest.skip(f"this redis-server cannot serve TLS: {exc}")
        raise
    yield server
    server.stop()


def test_celery_tls_options_follow_the_url() -> None:
    assert broker_use_ssl("redis://h:6379/0") is None
    assert broker_use_ssl("rediss://h:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}, "verify unless told not to"
    assert broker_use_ssl("rediss://h:6380/0?ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem") == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem", "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem"}
    assert broker_use_ssl("rediss://h:6380/0?ssl_cert_reqs=none")["ssl_cert_reqs"] == ssl.CERT_NONE


def test_tls_client_submits_and_reads_with_a_verified_server(
        tls_server: SecureRedis, caplog: pytest.LogCaptureFixture) -> None:
    tls_url = tls_server.url_as(None, "tls-pw")
    with Client(tls_url, pool=fresh_pool()) as client, caplog.at_level(logging.WARNING):
        handle = client.submit(PROBE, kwargs={"seconds": 0})
        assert client.status(handle.id).state is TaskState.PENDING
        assert [e.id for e in client.queue()] == [handle.id]
    assert not [r for r in caplog.records if "task-sent" in r.getMessage() or "insecure" in r.getMessage()]
    with monitor_app(Settings(redis_url=tls_url)).connection_for_write() as conn:
        assert conn.transport_cls == TRANSPORT  # the broker's transport, over TLS: the submit above went through it
        assert conn.ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED and conn.ssl["ssl_ca_certs"].endswith("good-ca.crt")


def test_tls_refuses_an_unknown_server_and_plain_connections(tls_server: SecureRedis, tls_dir: Path) -> None:
    other_ca = make_tls_material(tls_dir / "other", "other")["ca.crt"]
    impostor_check = tls_server.url_as(None, "tls-pw", query=f"?ssl_cert_reqs=required&ssl_ca_certs={other_ca}")
    with Client(impostor_check, pool=fresh_pool(), settings=Settings(socket_timeout_s=2)) as client:
        with pytest.raises(BrokerUnavailable, match="certificate verify failed"):
            client.nodes()
    plain = tls_server.url_as(None, "tls-pw", query="").replace("rediss://", "redis://")
    with Client(plain, pool=fresh_pool(), settings=Settings(socket_timeout_s=2)) as client:
        with pytest.raises(BrokerUnavailable):
            client.nodes()


@pytest.mark.e2e
def test_tls_round_trip_through_dispatcher_and_worker(tls_server: SecureRedis, tmp_path: Path) -> None:
    tls_url = tls_server.url_as(None, "tls-pw")
    procs = Processes(tmp_path, tls_url, fresh_pool(), env=FAST_LEASES)
    try:
        procs.dispatcher()
        procs.worker("tls-1", "--gpus", "2")
        with Client(tls_url, pool=procs.env["GPUBROKER_POOL"]) as client:
            wait_until(lambda: [n.id for n in client.nodes() if n.state == "up"] == ["tls-1"], 30, what="tls-1")
            done = client.wait(client.submit(PROBE, resources=Resources(gpus=2)).id, 60)
        assert (done.state, done.node, done.result["cuda_visible_devices"]) == (TaskState.SUCCEEDED, "tls-1", "0,1")
        for name in ("dispatcher", "worker-tls-1"):
            log = procs.log(name)
            assert "tls-pw" not in log and "insecure" not in log.lower(), name
    finally:
        procs.stop_all()

