"""What every ``gpubroker`` command shares: the Typer app, consoles, option types, parsers,
and ``run_cli`` (gpubroker errors as a message and an exit code, never a traceback)."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import redis
import typer
from pydantic import BaseModel, TypeAdapter
from rich.console import Console
from rich.markup import escape

from broker.client import Client
from broker.errors import ConfigError, GpuBrokerError, InvalidRequest
from broker.settings import Settings
from broker.store.connection import as_broker_error

app = typer.Typer(help="gpubroker: a GPU-aware task broker on Redis and Celery.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # a message is one line, however long

RedisUrl = Annotated[str | None, typer.Option("--redis-url", help="Redis URL [env GPUBROKER_REDIS_URL]")]
Pool = Annotated[str | None, typer.Option("--pool", help="Pool name [env GPUBROKER_POOL]")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]
NODE_HELP = "Node id (also the Celery worker name); default: this host's name, as a node id"


def host_node_id(hostname: str | None = None) -> str:
    """This host's name as a node id (characters a node id may not have become ``-``; at most 64):
    the default of ``worker --node`` and ``health worker --node``. Two workers on one host need a
    ``--node`` each, else the second takes the first one's place (as a restarted worker does)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", hostname if hostname is not None else socket.gethostname())
    return name.strip(".-")[:64].rstrip(".-") or "node"


def print_models(models: Sequence[BaseModel]) -> None:
    """Print ``models`` as an indented JSON list, serialised by pydantic-core: rich's print_json
    (json.dumps with an indent runs in pure Python, then highlighting) took 12 s for a
    10,000-row queue (issue 14)."""
    sys.stdout.buffer.write(_ANY_LIST.dump_json(list(models), indent=2) + b"\n")
    sys.stdout.flush()


_ANY_LIST = TypeAdapter(list[Any])


def start_logging(level: str) -> None:
    """Log at ``level`` (``--log-level``), refusing a name that is not one."""
    if level.upper() not in logging.getLevelNamesMapping():
        raise typer.BadParameter(f"{level!r} is not a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL)",
                                 param_hint="--log-level")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def settings_for(redis_url: str | None, pool: str | None, **overrides: Any) -> Settings:
    values = {"redis_url": redis_url, "pool": pool, **overrides}
    try:
        return Settings(**{k: v for k, v in values.items() if v is not None})
    except ValueError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None


def parse_labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidRequest({"label": f"{pair!r} is not key=value"})
        labels[key] = value
    return labels


def parse_selector(pairs: list[str]) -> dict[str, str | list[str]]:
    """A task's labels: key=value, or key=a|b for a if possible, else b."""
    return {k: v.split("|") if "|" in v else v for k, v in parse_labels(pairs).items()}


def parse_json(text: str | None, field: str, kind: type) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest({field: f"not valid JSON ({exc.msg} at {exc.pos})"}) from None
    if not isinstance(value, kind):
        raise InvalidRequest({field: f"must be a JSON {'array' if kind is list else 'object'}"})
    return value


def run_cli(fn: Any) -> Any:
    """Turn gpubroker errors, and Redis errors that have a meaning, into a one-line message and an
    exit code instead of a traceback."""
    try:
        return fn()
    except InvalidRequest as exc:
        err.print(f"[red]refused:[/] {escape(str(exc))}")  # user text: never markup
        raise typer.Exit(2) from None
    except ConfigError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    except GpuBrokerError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(3) from None
    except redis.RedisError as exc:  # one that means something (credentials, memory...): no traceback
        error = as_broker_error(exc)
        if error is exc:
            raise
        err.print(f"[red]error:[/] {escape(str(error))}")
        raise typer.Exit(3) from None


def client_for(redis_url: str | None, pool: str | None) -> Client:
    return Client(settings=settings_for(redis_url, pool))
