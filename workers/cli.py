"""Entry point of ``gpubroker``: the broker's commands plus ``worker`` (which needs task code)."""

from __future__ import annotations

from typing import Annotated

import typer

from broker.cli import app
from broker.cli.common import (
    NODE_HELP,
    Pool,
    RedisUrl,
    host_node_id,
    parse_labels,
    run_cli,
    settings_for,
    start_logging,
)
from broker.models import NodeSpec


@app.command()
def worker(
    node: Annotated[str | None, typer.Option("--node", help=NODE_HELP)] = None,
    gpus: Annotated[str, typer.Option(help="GPU count, or 'auto' to read them through NVML")] = "0",
    gpu_memory_mb: Annotated[int | None, typer.Option(help="MiB per GPU (auto: from NVML)")] = None,
    cpus: Annotated[float, typer.Option()] = 1,
    memory_mb: Annotated[int, typer.Option()] = 0,
    slots: Annotated[int, typer.Option(help="Tasks that may run at once")] = 1,
    label: Annotated[list[str] | None, typer.Option(help="Node label key=value (repeatable)")] = None,
    tasks: Annotated[list[str] | None, typer.Option(help="Module with your tasks (repeatable)")] = None,
    address: Annotated[str | None, typer.Option(help="Address gang members on other nodes reach this node at "
                                                     "(MASTER_ADDR); default: this host's")] = None,
    metrics_port: Annotated[int, typer.Option(min=0, max=65535, help="Serve this worker's /metrics on this port "
                                                                     "(0: none)")] = 0,
    redis_url: RedisUrl = None, pool: Pool = None,
    log_level: Annotated[str, typer.Option(help="Log level, Celery's -l: INFO logs every task received and "
                                                "done; WARNING (Celery's default) only what goes wrong")] = "INFO",
) -> None:
    """Run a Celery worker pinned to one node; it runs only what was reserved for it."""
    from workers.agent import run_worker

    def go() -> None:
        labels = parse_labels(label or [])
        if gpus == "auto":
            from workers.gpus import detect

            found = detect()
            count, memory = found.count, gpu_memory_mb or found.memory_mb
            if found.model:
                labels.setdefault("gpu_model", found.model.replace(" ", "-"))
        else:
            try:
                count = int(gpus)
            except ValueError:
                raise typer.BadParameter(f"{gpus!r} is not a whole number or 'auto'", param_hint="--gpus") from None
            memory = gpu_memory_mb if gpu_memory_mb is not None else (80 * 1024 if count else 0)
        spec = NodeSpec(node_id=node if node is not None else host_node_id(), gpus=count, gpu_memory_mb=memory,
                        cpus=cpus, memory_mb=memory_mb, slots=slots, labels=labels)
        start_logging(log_level)
        run_worker(settings_for(redis_url, pool), spec, tasks or [], address, metrics_port, log_level)

    run_cli(go)


def main() -> None:
    app()
