"""The Python client against a real Redis: submit, queue, status, cancel, refusals."""

from __future__ import annotations

import pytest
import redis

from broker import BrokerUnavailable, Client, InvalidRequest, Resources, TaskNotFound, TaskState, Unsatisfiable
from broker.settings import Settings
from broker.store.scripts import Scripts, wall_clock_ms
from tests.conftest import Clock
from tests.support import free_port


def dump(client: redis.Redis) -> dict[bytes, bytes]:
    """Every key with its serialised value: equal dumps mean Redis is unchanged."""
    return {key: client.dump(key) for key in client.scan_iter(count=1000)}


@pytest.fixture
def client(settings: Settings) -> Client:
    with Client(settings=settings) as c:
        yield c


@pytest.fixture
def two_nodes(scripts: Scripts, clock: Clock) -> None:
    clock.now_ms = wall_clock_ms()  # the client runs on wall time: keep the leases valid for it
    scripts.register("a100", "inc-a", 3_600_000, 4, 40 * 1024, 16_000, 128 * 1024, 8, {"gpu_model": "A100"})
    scripts.register("h100", "inc-h", 3_600_000, 8, 80 * 1024, 64_000, 512 * 1024, 8, {"gpu_model": "H100"})


@pytest.mark.parametrize(
    ("resources", "field", "text"),
    [
        (Resources(gpus=16), "resources.gpus", "asks 16 GPUs on one node; the largest node has 8"),
        (Resources(gpus=1, gpu_memory_mb=100 * 1024), "resources.gpus", "asks 1 GPUs"),
        (Resources(gpus=0.5, gpu_memory_mb=100 * 1024), "resources.gpu_memory_mb", "the largest GPU has 81920 MiB"),
        (Resources(cpus=65), "resources.cpus", "asks 65 CPUs; the largest node has 64"),
        (Resources(memory_mb=600 * 1024), "resources.memory_mb", "the largest node has 524288 MiB"),
        (Resources(gpus=8, labels={"gpu_model": "A100"}), "resources.gpus", "the largest node has 4"),
        (Resources(gpus=1, labels={"gpu_model": "B200"}), "resources.labels", "no registered node has labels"),
    ],
)
def test_unsatisfiable_request_is_refused_and_nothing_is_written(
        client: Client, redis_client: redis.Redis, two_nodes: None, resources: Resources, field: str,
        text: str) -> None:
    before = dump(redis_client)
    with pytest.raises(Unsatisfiable) as caught:
        client.submit("workers.tasks.probe", resources=resources)
    assert field in caught.value.problems
    assert text in caught.value.problems[field]
    assert dump(redis_client) == before


def test_resources_that_fit_only_on_different_nodes_are_refused(client: Client, two_nodes: None) -> None:
    with pytest.raises(Unsatisfiable) as caught:
        client.submit("workers.tasks.probe", resources=Resources(gpus=8, memory_mb=0,
                                                                   labels={"gpu_model": "H100"}, cpus=65))
    assert "resources.cpus" in caught.value.problems


@pytest.mark.parametrize(
    "kwargs",
    [
        {"task_name": "not a name"},
        {"task_name": "workers.tasks.probe", "args": [object()]},
        {"task_name": "workers.tasks.probe", "tenant": "a{b}"},
        {"task_name": "workers.tasks.probe", "priority": 2**40},
        {"task_name": "workers.tasks.probe", "kwargs": {"blob": "x" * (2 << 20)}},
    ],
)
def test_invalid_input_writes_nothing(client: Client, redis_client: redis.Redis, two_nodes: None,
                                      kwargs: dict) -> None:
    before = dump(redis_client)
    with pytest.raises(InvalidRequest):
        client.submit(**kwargs)
    assert dump(redis_client) == before


def test_queue_lists_pending_in_dispatch_order_with_positions(client: Client, two_nodes: None) -> None:
    low = client.submit("workers.tasks.probe", priority=0).id
    high = client.submit("workers.tasks.probe", priority=9, tenant="team-b").id
    low2 = client.submit("workers.tasks.probe", priority=0, resources=Resources(gpus=0.5)).id
    entries = client.queue()
    assert [(e.position, e.id) for e in entries] == [(1, high), (2, low), (3, low2)]
    assert entries[0].tenant == "team-b" and entries[0].priority == 9
    assert entries[2].resources.gpus == 0.5


def test_idempotency_key_returns_the_same_task(client: Client, redis_client: redis.Redis,
                                               two_nodes: None) -> None:
    first = client.submit("workers.tasks.probe", idempotency_key="run-42")
    again = client.submit("workers.tasks.probe", idempotency_key="run-42")
    assert again.id == first.id
    assert (first.created, again.created) == (True, False)
    assert len(client.queue()) == 1


def test_status_of_a_pending_task(client: Client, two_nodes: None) -> None:
    handle = client.submit("workers.tasks.probe", kwargs={"seconds": 1}, priority=3,
                           resources=Resources(gpus=2, cpus=1.5, memory_mb=100, labels={"gpu_model": "H100"}))
    status = client.status(handle.id)
    assert status.state is TaskState.PENDING
    assert status.resources == Resources(gpus=2, cpus=1.5, memory_mb=100, labels={"gpu_model": "H100"})
    assert (status.node, status.gpus, status.priority) == (None, [], 3)


def test_cancel_pending_then_again_is_harmless(client: Client, two_nodes: None) -> None:
    handle = client.submit("workers.tasks.probe")
    assert client.cancel(handle.id).state is TaskState.CANCELLED
    assert client.cancel(handle.id).state is TaskState.CANCELLED
    assert client.queue() == []


def test_unknown_task_id(client: Client) -> None:
    with pytest.raises(TaskNotFound):
        client.status("no-such-task")
    with pytest.raises(TaskNotFound):
        client.cancel("no-such-task")


def test_submit_without_any_node_is_accepted(client: Client) -> None:
    # Nothing to judge against yet: workers may register after producers start.
    assert client.status(client.submit("workers.tasks.probe", resources=Resources(gpus=64)).id).state == "PENDING"


def test_unreachable_redis_is_a_clear_error_not_a_hang() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5)
    with Client(settings=settings) as client, pytest.raises(BrokerUnavailable, match="nothing was changed"):
        client.submit("workers.tasks.probe")


def test_a_submit_that_redis_py_sent_twice_is_one_task(client: Client, redis_client: redis.Redis,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply to submit.lua was lost (connection dropped, socket timeout) and redis-py's
    retry ran the script again: the caller gets its task, which exists once."""
    run = client.scripts._run

    def run_twice(name: str, keys: list[str], args: list[object]) -> object:
        if name == "submit":
            run(name, keys, args)
        return run(name, keys, args)

    monkeypatch.setattr(client.scripts, "_run", run_twice)
    handle = client.submit("workers.tasks.probe")
    assert handle.created and client.status(handle.id).state is TaskState.PENDING
    assert [m.decode() for m in redis_client.zrange(client.keys.pending, 0, -1)] == [handle.id]
