"""``gpubroker tasks`` and ``usage`` (history, like squeue/sacct) and ``health`` (liveness checks
for container healthchecks: exit 0 only while the process does its job)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Annotated

import redis
import typer
from rich.markup import escape
from rich.table import Table

from broker.cli.common import (
    NODE_HELP,
    AsJson,
    Pool,
    RedisUrl,
    app,
    client_for,
    console,
    err,
    host_node_id,
    run_cli,
    settings_for,
)
from broker.store import health as checks
from broker.store import history
from broker.store.connection import as_broker_error, connect
from broker.store.history import TaskRow, UsageRow
from broker.store.keys import PoolKeys

State = Annotated[list[str] | None, typer.Option(
    "--state", help="pending, running, finished (succeeded), failed or cancelled; repeatable (default: all)")]
Since = Annotated[str | None, typer.Option(help="Only final tasks that ended within this long: 90s, 15m, 1h, 2d, 1w")]


def _when(at: float | None) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def tasks_table(rows: Sequence[TaskRow]) -> Table:
    table = Table(title=f"Tasks ({len(rows)})", expand=False)
    for column in ("id", "name", "state", "tenant", "node", "GPUs", "submitted", "wait s", "run s", "ended"):
        table.add_column(column, no_wrap=column in ("id", "state"))  # never cut what identifies a row
    for r in rows:
        gpus = ",".join(map(str, r.gpus)) if r.gpus else (f"{r.gpu_share:g}" if r.gpu_share else "-")
        table.add_row(escape(r.id), escape(r.name), r.state.value, escape(r.tenant), escape(r.node or "-"), gpus,
                      _when(r.submitted_at), _secs(r.wait_s), _secs(r.run_s), _when(r.finished_at))
    return table


def usage_table(rows: Sequence[UsageRow], by: str) -> Table:
    table = Table(title=f"Usage by {by}", expand=False)
    for column in (by, "tasks", "succeeded", "failed", "cancelled", "GPU-hours", "CPU-hours", "wait p50 s",
                   "wait p95 s"):
        table.add_column(column, justify="left" if column == by else "right")
    for u in rows:
        table.add_row(escape(u.key), str(u.tasks), str(u.succeeded), str(u.failed), str(u.cancelled),
                      f"{u.gpu_hours:.3f}", f"{u.cpu_hours:.3f}", _secs(u.wait_p50_s), _secs(u.wait_p95_s))
    return table


@app.command()
def tasks(state: State = None, tenant: Annotated[str | None, typer.Option()] = None,
          node: Annotated[str | None, typer.Option()] = None, since: Since = None,
          limit: Annotated[int | None, typer.Option(help="At most this many rows")] = None,
          redis_url: RedisUrl = None, pool: Pool = None, as_json: AsJson = False) -> None:
    """List tasks like squeue/sacct: pending, running, then final ones newest first (kept as long
    as their records, GPUBROKER_RESULT_EXPIRES_S)."""

    def go() -> None:
        # Checked here first so that the message names the option.
        history.parse_states(state, "--state")
        history.parse_since(since, 0, "--since")
        history.parse_limit(limit, "--limit")
        with client_for(redis_url, pool) as client:
            rows = client.tasks(state=state, tenant=tenant, node=node, since=since, limit=limit)
        if as_json:
            console.print_json(json.dumps(history.as_dicts(rows)))
        else:
            console.print(tasks_table(rows))

    run_cli(go)


@app.command()
def usage(since: Annotated[str, typer.Option(help="Tasks that ended within this long: 90s, 15m, 1h, 2d, 1w")] = "24h",
          by: Annotated[str, typer.Option(help="Group by tenant, node or task")] = "tenant",
          redis_url: RedisUrl = None, pool: Pool = None, as_json: AsJson = False) -> None:
    """GPU-hours, CPU-hours, task counts and wait p50/p95 of the tasks that ended (like sacct)."""

    def go() -> None:
        history.parse_since(since, 0, "--since")
        history.parse_by(by, "--by")
        with client_for(redis_url, pool) as client:
            rows = client.usage(since=since, by=by)
        if as_json:
            console.print_json(json.dumps(history.as_dicts(rows)))
        else:
            console.print(usage_table(rows, by))

    run_cli(go)


health_app = typer.Typer(help="Exit 0 only while a dispatcher cycles / a node's worker heartbeats (healthchecks).",
                         no_args_is_help=True)
app.add_typer(health_app, name="health")
MaxAge = Annotated[float | None, typer.Option(
    "--max-age", min=0, help="Seconds since the last cycle or heartbeat that still count as alive")]


def _check(redis_url: str | None, pool: str | None, probe: str, node: str | None, max_age: float | None) -> None:
    settings = settings_for(redis_url, pool)
    keys, now = PoolKeys(settings.pool), int(time.time() * 1000)
    try:
        client = connect(settings)
        if probe == "dispatcher":
            # A dispatcher cycles at least every reap_interval_s, and records it at most once a second.
            age = max_age if max_age is not None else 2 * settings.reap_interval_s + 2
            ok, why = checks.dispatcher_health(client, keys, now, age)
        else:
            age = max_age if max_age is not None else 2 * settings.heartbeat_s + 1
            ok, why = checks.worker_health(client, keys, node or "", now, age)
        client.close()
    except redis.RedisError as exc:
        ok, why = False, f"Redis: {as_broker_error(exc)}"
    (console if ok else err).print(("healthy: " if ok else "unhealthy: ") + escape(why))
    raise typer.Exit(0 if ok else 1)


@health_app.command("dispatcher")
def health_dispatcher(max_age: MaxAge = None, redis_url: RedisUrl = None, pool: Pool = None) -> None:
    """Healthy while a dispatcher has cycled within --max-age (default 2 x GPUBROKER_REAP_INTERVAL_S + 2)."""
    _check(redis_url, pool, "dispatcher", None, max_age)


@health_app.command("worker")
def health_worker(node: Annotated[str | None, typer.Option("--node", help=NODE_HELP)] = None,
                  max_age: MaxAge = None, redis_url: RedisUrl = None, pool: Pool = None) -> None:
    """Healthy while NODE is up and heartbeated within --max-age (default 2 x GPUBROKER_HEARTBEAT_S + 1)."""
    _check(redis_url, pool, "worker", node if node is not None else host_node_id(), max_age)
