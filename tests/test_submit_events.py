"""Client.submit writes the task and its task-sent event in one submit.lua call (issue 14): the
event must still be Celery's own as Flower reads it (a real ``app.events.Receiver`` on a real
Redis), come only for a task the call created, and Celery's publish signals must still fire."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import signals

from broker import Client, Resources
from broker.celery_conf import monitor_app
from broker.settings import Settings
from broker.store.scripts import Scripts
from tests.conftest import Clock
from tests.support import wait_until
from tests.test_client import two_nodes  # noqa: F401  (fixture)


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings=settings) as c:
        yield c


def receive(settings: Settings, got: list[dict[str, Any]], ready: threading.Event, stop: threading.Event) -> None:
    """Celery's event receiver (what Flower runs), collecting task-sent events until ``stop``."""
    app = monitor_app(settings)
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"task-sent": got.append})
        receiver.on_consume_ready = lambda *args, **kwargs: ready.set()  # type: ignore[method-assign]
        threading.Thread(target=lambda: (stop.wait(), setattr(receiver, "should_stop", True)), daemon=True).start()
        receiver.capture(limit=None, timeout=None, wakeup=False)


@contextlib.contextmanager
def receiving(settings: Settings, client: Client) -> Iterator[list[dict[str, Any]]]:
    """The task-sent events Celery's receiver gets while the block runs (it is subscribed first)."""
    got: list[dict[str, Any]] = []
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=receive, args=(settings, got, ready, stop), daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        channel = "/0.celeryev/task.sent"  # the receiver subscribes once it first drains
        wait_until(lambda: client.redis.pubsub_numpat() or client.redis.pubsub_numsub(channel)[0][1], 10,
                   what="the receiver's subscription")
        yield got
    finally:
        stop.set()
        thread.join(5)


def test_the_sent_event_is_celerys_and_only_for_a_task_created(settings: Settings, client: Client,
                                                               two_nodes: None, scripts: Scripts,  # noqa: F811
                                                               clock: Clock) -> None:
    with receiving(settings, client) as got:
        first = client.submit("workers.tasks.probe", args=[1], kwargs={"x": "y"}, resources=Resources(gpus=1),
                              idempotency_key="once")
        again = client.submit("workers.tasks.probe", args=[1], kwargs={"x": "y"}, idempotency_key="once")
        gang = client.submit("workers.tasks.probe", resources=Resources(gpus=4), replicas=2)
        single = client.submit("workers.tasks.probe")
        wait_until(lambda: len(got) >= 2, 10, what=f"the task-sent events (got {got})")
        assert again.id == first.id and not again.created
        time.sleep(0.5)  # the duplicate's event would have come by now
    # One event per task created; none for the duplicate, nor for a gang's job id (its members
    # are what runs, and Flower lists them from the workers' events under root_id = the job).
    assert [e["uuid"] for e in got] == [first.id, single.id], (gang.id, got)
    event = got[0]
    assert (event["type"], event["name"], event["args"], event["kwargs"]) == (
        "task-sent", "workers.tasks.probe", "[1]", "{'x': 'y'}")
    assert event["root_id"] == first.id and event["parent_id"] is None and event["retries"] == 0
    assert event["queue"] == "celery" and event["hostname"].startswith("gen")  # a producer's anon_nodename


def test_publish_signals_fire_and_a_header_added_before_publish_is_stored(client: Client,
                                                                          two_nodes: None) -> None:  # noqa: F811
    """Tracing libraries add their context in ``before_task_publish``: it must reach the task."""
    seen: list[tuple[str, str]] = []

    def before(sender: str, headers: dict[str, Any], **_: Any) -> None:
        headers["traceparent"] = "00-abc-def-01"
        seen.append(("before", sender))

    def after(sender: str, headers: dict[str, Any], **_: Any) -> None:
        seen.append(("after", headers["id"]))

    signals.before_task_publish.connect(before)
    signals.after_task_publish.connect(after)
    try:
        handle = client.submit("workers.tasks.probe")
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)
    assert seen == [("before", "workers.tasks.probe"), ("after", handle.id)]
    message = client.redis.hget(client.keys.task(handle.id), "message")
    assert message is not None and b'"traceparent":"00-abc-def-01"' in message


def test_a_batch_fires_before_publish_for_each_task_and_stores_its_header_but_no_after_publish(
        client: Client, two_nodes: None) -> None:  # noqa: F811
    """As the README says of submit_many: the header a ``before_task_publish`` receiver adds is
    stored with every task of a batch; nothing is published, so ``after_task_publish`` never fires."""
    from broker.client import Submit

    seen: list[str] = []

    def before(sender: str, headers: dict[str, Any], **_: Any) -> None:
        headers["traceparent"] = f"00-{headers['id']}-01"
        seen.append("before")

    def after(**_: Any) -> None:
        seen.append("after")

    signals.before_task_publish.connect(before)
    signals.after_task_publish.connect(after)
    try:
        handles = client.submit_many([Submit(task_name="workers.tasks.probe") for _ in range(3)])
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)
    assert seen == ["before"] * 3
    for handle in handles:
        message = client.redis.hget(client.keys.task(handle.id), "message")
        assert message is not None and f'"traceparent":"00-{handle.id}-01"'.encode() in message


def test_celerys_own_calls_send_the_event_inside_the_submit_in_one_round_trip(
        settings: Settings, client: Client, two_nodes: None) -> None:  # noqa: F811
    """``delay`` and a group on a gpubroker app: Celery's task-sent event, which kombu would
    publish in a round trip of its own, rides in the task's submit.lua call (transport.SubmitBatch)
    and still reaches Celery's receiver, once per task created."""
    from celery import group

    from broker.celery_conf import celery_settings
    from broker.native.app import GpuCelery

    app = GpuCelery("evented", set_as_current=False)
    app.conf.update(celery_settings(settings))
    task = app.task(name="workers.tasks.probe")(_probe)
    try:
        with receiving(settings, client) as got:
            task.delay(0)  # the catalogue and the nodes read, as by any first call
            reads = int(client.redis.info("stats")["total_reads_processed"])
            one = task.delay(1)
            spent = int(client.redis.info("stats")["total_reads_processed"]) - reads - 1  # less this INFO
            members = group(task.s(i) for i in range(3)).apply_async()
            wait_until(lambda: len(got) >= 5, 10, what=f"the task-sent events (got {got})")
    finally:
        app.close()
    assert spent == 1, f"delay took {spent} round trips"
    sent = [e["uuid"] for e in got]
    assert sent[1:] == [one.id, *(r.id for r in members.results)]
    assert all(e["type"] == "task-sent" and e["name"] == "workers.tasks.probe" for e in got)


def _probe(seconds: float = 0) -> None:
    return None
