"""``gpubroker tasks``, ``usage`` and ``health`` through Typer's runner against a real Redis; the
dispatcher's cycle record and history trim. Exact GPU-hours: tests/store/test_history.py; with
real processes: tests/e2e/test_history.py."""

from __future__ import annotations

import json
import time

import pytest
import redis
from typer.testing import CliRunner

from broker.dispatcher import Dispatcher
from broker.settings import Settings
from broker.store.keys import PoolKeys
from broker.store.scripts import Scripts, wall_clock_ms
from tests.invariants import register_node, submit_raw
from workers.cli import app

runner = CliRunner()


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return {"GPUBROKER_REDIS_URL": settings.redis_url, "GPUBROKER_POOL": settings.pool}


@pytest.fixture
def live(redis_client: redis.Redis, keys: PoolKeys) -> Scripts:
    """Scripts on the wall clock: the CLI reads time.time()."""
    return Scripts(redis_client, keys, wall_clock_ms)


def test_tasks_and_usage_list_what_ended(env: dict[str, str], live: Scripts) -> None:
    cancelled = submit_raw(live, "t-cancelled", tenant="alpha")[1]
    pending = submit_raw(live, "t-pending", tenant="beta")[1]
    live.cancel(cancelled, None)

    shown = runner.invoke(app, ["tasks", "--state", "cancelled", "--json"], env=env)
    assert shown.exit_code == 0, shown.output
    assert [(r["id"], r["state"], r["tenant"]) for r in json.loads(shown.output)] == [(cancelled, "CANCELLED", "alpha")]
    both = runner.invoke(app, ["tasks", "--state", "pending", "--state", "cancelled", "--since", "1h", "--json"],
                         env=env)
    assert [r["id"] for r in json.loads(both.output)] == [pending, cancelled]
    assert json.loads(runner.invoke(app, ["tasks", "--tenant", "beta", "--json"], env=env).output)[0]["id"] == pending
    table = runner.invoke(app, ["tasks"], env=env, terminal_width=200)
    assert table.exit_code == 0 and cancelled in table.output and "CANCELLED" in table.output

    used = runner.invoke(app, ["usage", "--since", "1h", "--by", "tenant", "--json"], env=env)
    assert used.exit_code == 0, used.output
    assert [(u["key"], u["tasks"], u["cancelled"], u["gpu_hours"]) for u in json.loads(used.output)] == [
        ("alpha", 1, 1, 0.0)]
    shown_usage = runner.invoke(app, ["usage"], env=env).output
    assert "Usage by tenant" in shown_usage and "alpha" in shown_usage


@pytest.mark.parametrize(("args", "message"), [
    (["tasks", "--since", "5x"], "--since: '5x' is not a duration"),
    (["tasks", "--state", "done"], "--state: 'done' is not a state"),
    (["tasks", "--limit", "0"], "--limit: must be 1 or more"),
    (["usage", "--by", "color"], "--by: 'color' is not a grouping"),
    (["usage", "--since", "yesterday"], "--since: 'yesterday' is not a duration"),
])
def test_bad_options_are_named_with_exit_code_2(env: dict[str, str], args: list[str], message: str) -> None:
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_health_dispatcher_reads_the_last_cycle(env: dict[str, str], redis_client: redis.Redis,
                                               keys: PoolKeys) -> None:
    missing = runner.invoke(app, ["health", "dispatcher"], env=env)
    assert missing.exit_code == 1 and "no dispatcher has cycled" in missing.output
    redis_client.set(keys.cycle, wall_clock_ms())
    healthy = runner.invoke(app, ["health", "dispatcher", "--max-age", "3"], env=env)
    assert healthy.exit_code == 0, healthy.output
    redis_client.set(keys.cycle, wall_clock_ms() - 10_000)
    stale = runner.invoke(app, ["health", "dispatcher", "--max-age", "3"], env=env)
    assert stale.exit_code == 1 and "last dispatcher cycle 10" in stale.output
    assert len(stale.output.strip().splitlines()) == 1


def test_health_worker_reads_the_heartbeat(env: dict[str, str], live: Scripts, redis_client: redis.Redis,
                                          keys: PoolKeys) -> None:
    unknown = runner.invoke(app, ["health", "worker", "--node", "n1"], env=env)
    assert unknown.exit_code == 1 and "not registered" in unknown.output
    register_node(live, "n1")
    assert runner.invoke(app, ["health", "worker", "--node", "n1", "--max-age", "3"], env=env).exit_code == 0
    redis_client.hset(keys.node("n1"), "heartbeat_at", wall_clock_ms() - 10_000)
    stale = runner.invoke(app, ["health", "worker", "--node", "n1", "--max-age", "3"], env=env)
    assert stale.exit_code == 1 and "last heartbeat 10" in stale.output
    redis_client.hset(keys.node("n1"), mapping={"heartbeat_at": wall_clock_ms(), "state": "down"})
    down = runner.invoke(app, ["health", "worker", "--node", "n1"], env=env)
    assert down.exit_code == 1 and "n1 is down" in down.output


def test_health_without_redis_is_unhealthy_in_one_line() -> None:
    result = runner.invoke(app, ["health", "dispatcher"], env={"GPUBROKER_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 1 and result.output.startswith("unhealthy: Redis")


def test_a_dispatcher_cycle_records_its_time_and_trims_the_history(settings: Settings, redis_client: redis.Redis,
                                                                   keys: PoolKeys, live: Scripts) -> None:
    gone = submit_raw(live, "short", result_ttl_ms=100)[1]
    live.cancel(gone, None)
    time.sleep(0.2)
    before = wall_clock_ms()
    Dispatcher(settings).run_cycle()
    assert int(redis_client.get(keys.cycle) or 0) >= before
    assert redis_client.zcard(keys.finished) == 0
