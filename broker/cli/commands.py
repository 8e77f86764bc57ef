"""The operational ``gpubroker`` commands: dispatcher, submit, status, logs, queue, nodes (and nodes
remove), drain, undrain, cancel, demo."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from broker.cli import views
from broker.cli.common import (
    AsJson,
    Pool,
    RedisUrl,
    app,
    client_for,
    console,
    err,
    parse_json,
    parse_selector,
    print_models,
    run_cli,
    settings_for,
    start_logging,
)
from broker.errors import InvalidRequest
from broker.models import Resources
from broker.scheduling.config import SchedulingConfig
from broker.settings import redacted_url


@app.command()
def dispatcher(redis_url: RedisUrl = None, pool: Pool = None,
               scheduling: Annotated[Path | None, typer.Option(
                   help="Scheduling policy file, TOML or JSON (see docs/scheduling.md); "
                        "default: GPUBROKER_SCHEDULING or priority order, best fit")] = None,
               metrics_port: Annotated[int | None, typer.Option(
                   help="Serve Prometheus metrics on this port, 0: not at all; default: GPUBROKER_METRICS_PORT "
                        "or 9808")] = None,
               log_level: Annotated[str, typer.Option(help="Python log level")] = "INFO") -> None:
    """Run a dispatcher: order pending tasks and reserve capacity for them."""
    from broker.dispatcher import Dispatcher  # keep other commands light

    start_logging(log_level)
    settings = settings_for(redis_url, pool)
    if scheduling is not None:
        try:
            settings = settings.model_copy(update={"scheduling": SchedulingConfig.load(scheduling)})
        except (InvalidRequest, OSError) as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None
    from broker.metrics import serve

    serve(settings.metrics_port if metrics_port is None else metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger(__name__).info("dispatcher on pool %s at %s", settings.pool, redacted_url(settings.url))
    # Transient Redis errors are retried inside; refused credentials end it here, in one line.
    run_cli(lambda: Dispatcher(settings).run_forever(stop))


@app.command()
def submit(
    task_name: Annotated[str, typer.Argument(help="Celery task name, e.g. workers.tasks.probe")],
    args: Annotated[str | None, typer.Option(help="JSON array of positional arguments")] = None,
    kwargs: Annotated[str | None, typer.Option(help="JSON object of keyword arguments")] = None,
    gpus: Annotated[float | None, typer.Option(help="Whole GPUs (>= 1) or a share of one (0 < g < 1)")] = None,
    gpu_memory_mb: Annotated[int | None, typer.Option(help="MiB of GPU memory per GPU")] = None,
    min_gpus: Annotated[int | None, typer.Option(
        help="Elastic: run with any whole number of GPUs from this to --gpus (the pool's rule grants)")] = None,
    cpus: Annotated[float | None, typer.Option()] = None,
    memory_mb: Annotated[int | None, typer.Option()] = None,
    label: Annotated[list[str] | None, typer.Option(
        help="Node label to require, key=value; key=a|b accepts a or b, preferring a")] = None,
    priority: Annotated[int | None, typer.Option()] = None,
    tenant: Annotated[str | None, typer.Option()] = None,
    estimated_runtime_s: Annotated[float | None, typer.Option("--estimate")] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    preemptible: Annotated[bool | None, typer.Option(
        "--preemptible/--not-preemptible", help="May be stopped and requeued for a more urgent task")] = None,
    countdown: Annotated[float | None, typer.Option(help="Not placed before this many seconds from now")] = None,
    expires: Annotated[float | None, typer.Option(help="Cancelled if not started within this many seconds")] = None,
    wait: Annotated[float | None, typer.Option(help="Wait up to this many seconds for the result")] = None,
    redis_url: RedisUrl = None, pool: Pool = None, as_json: AsJson = False,
) -> None:
    """Submit a task; prints its id (or its final status with --wait). Options left out are the
    task's declared defaults (its decorator's), else none: no GPU, priority 0, tenant default."""

    def go() -> None:
        # Any resource option given: the request is these (unset ones none); none given: the task's.
        asked = (gpus, gpu_memory_mb, cpus, memory_mb, label, min_gpus)
        resources = None if all(v is None for v in asked) else Resources(
            gpus=gpus or 0, gpu_memory_mb=gpu_memory_mb, cpus=cpus or 0, memory_mb=memory_mb or 0,
            labels=parse_selector(label or []), min_gpus=min_gpus)
        with client_for(redis_url, pool) as client:
            handle = client.submit(task_name, args=parse_json(args, "args", list),
                                   kwargs=parse_json(kwargs, "kwargs", dict), resources=resources,
                                   priority=priority, tenant=tenant, estimated_runtime_s=estimated_runtime_s,
                                   idempotency_key=idempotency_key, preemptible=preemptible,
                                   countdown=countdown, expires=expires)
            if wait is None:
                console.print(json.dumps({"id": handle.id}) if as_json else handle.id)
                return
            _show_status(client.wait(handle.id, wait), as_json)

    run_cli(go)


def _show_status(status: Any, as_json: bool) -> None:
    if as_json:
        console.print_json(status.model_dump_json())
    else:
        console.print(views.status_table(status))


@app.command()
def status(task_id: str, redis_url: RedisUrl = None, pool: Pool = None, as_json: AsJson = False) -> None:
    """Show a task's state, node, GPUs and result."""

    def go() -> None:
        with client_for(redis_url, pool) as client:
            _show_status(client.status(task_id), as_json)

    run_cli(go)


@app.command()
def logs(task_id: str, redis_url: RedisUrl = None, pool: Pool = None,
         attempt: Annotated[int | None, typer.Option(help="Which attempt (default: the latest)")] = None,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep showing it until the task ends")] = False,
         interval: Annotated[float, typer.Option(help="Seconds between polls with --follow")] = 1.0) -> None:
    """Show the last part of a task's output (stdout and stderr, kept with it as each attempt runs)."""

    def go() -> None:
        shown, current = 0, None
        with client_for(redis_url, pool) as client:
            while True:
                got = client.logs(task_id, attempt)
                if got.attempt != current:
                    if current is not None:
                        err.print(f"[dim]--- attempt {got.attempt} ---[/dim]")
                    shown, current = 0, got.attempt
                start = got.size - len(got.tail)
                if start > shown:  # the kept part no longer reaches back to what was shown
                    err.print(f"[dim]... {start - shown} bytes not kept (the whole log: {got.file})[/dim]")
                if got.size > shown:
                    sys.stdout.write(got.tail[max(0, shown - start):].decode(errors="replace"))
                    sys.stdout.flush()
                    shown = got.size
                if not follow or got.final:
                    return
                time.sleep(interval)

    run_cli(go)


@app.command()
def queue(redis_url: RedisUrl = None, pool: Pool = None, as_json: AsJson = False,
          limit: Annotated[int, typer.Option(help="Rows to show")] = 50) -> None:
    """Pending tasks in dispatch order."""

    def go() -> None:
        with client_for(redis_url, pool) as client:
            entries = client.queue()
        if as_json:
            print_models(entries)
        else:
            console.print(views.queue_table(entries, limit))

    run_cli(go)


nodes_app = typer.Typer(help="Nodes with their capacity and what is in use, per GPU; `nodes remove NODE`.")
app.add_typer(nodes_app, name="nodes")


@nodes_app.callback(invoke_without_command=True)
def nodes(ctx: typer.Context, redis_url: RedisUrl = None, pool: Pool = None, as_json: AsJson = False) -> None:
    """Nodes with their capacity and what is in use, per GPU (state up, draining or down)."""
    if ctx.invoked_subcommand is not None:
        return

    def go() -> None:
        with client_for(redis_url, pool) as client:
            found = client.nodes()
        if as_json:
            print_models(found)
        else:
            console.print(views.nodes_table(found))

    run_cli(go)


@nodes_app.command("remove")
def remove_node(node: Annotated[str, typer.Argument(help="Id of a node that is down")],
                redis_url: RedisUrl = None, pool: Pool = None) -> None:
    """Forget a node that is down (refused for a node that is up). Down nodes are also forgotten
    by themselves after GPUBROKER_NODE_FORGET_AFTER_S."""

    def go() -> None:
        with client_for(redis_url, pool) as client:
            client.remove_node(node)
        console.print(f"node {escape(node)} removed")

    run_cli(go)


@app.command()
def drain(node: Annotated[str, typer.Argument(help="Node id")], redis_url: RedisUrl = None, pool: Pool = None,
          as_json: AsJson = False) -> None:
    """Place nothing new on NODE; its running tasks finish. Lasts until `gpubroker undrain NODE`."""
    _drain(node, redis_url, pool, as_json, True)


@app.command()
def undrain(node: Annotated[str, typer.Argument(help="Node id")], redis_url: RedisUrl = None, pool: Pool = None,
            as_json: AsJson = False) -> None:
    """Place tasks on NODE again."""
    _drain(node, redis_url, pool, as_json, False)


def _drain(node: str, redis_url: str | None, pool: str | None, as_json: bool, on: bool) -> None:
    def go() -> None:
        with client_for(redis_url, pool) as client:
            view = client.drain(node) if on else client.undrain(node)
        console.print_json(view.model_dump_json()) if as_json else console.print(views.nodes_table([view]))

    run_cli(go)


@app.command()
def cancel(task_id: str, redis_url: RedisUrl = None, pool: Pool = None, as_json: AsJson = False) -> None:
    """Cancel a task; a running one is terminated. Harmless on a finished task."""

    def go() -> None:
        with client_for(redis_url, pool) as client:
            _show_status(client.cancel(task_id), as_json)

    run_cli(go)


@app.command()
def demo(
    redis_url: Annotated[str | None, typer.Option(help="Use this Redis instead of starting a private one")] = None,
    tasks: Annotated[int, typer.Option(help="How many tasks to submit")] = 60,
    flower: Annotated[bool, typer.Option(help="Start Flower")] = True,
    live: Annotated[bool, typer.Option(help="Live view (off: print a line per second)")] = True,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 300,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the cluster and Flower up after the summary, "
                                                      "until Ctrl-C")] = False,
) -> None:
    """Run a local demo cluster: Redis, dispatcher, three simulated nodes, Flower, a mixed workload."""
    from broker.cli.demo import run_demo  # starts processes: imported only when asked

    # A live view needs a terminal; piped or in CI, print a progress line per second instead.
    sys.exit(run_demo(redis_url=redis_url, n_tasks=tasks, with_flower=flower, live=live and console.is_terminal,
                      timeout=timeout, keep=keep))
