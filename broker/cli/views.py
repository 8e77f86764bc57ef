"""Rich renderings of pool state for the CLI and the demo."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from broker.models import MILLI, NodeView, QueueEntry, Resources, TaskState, TaskStatus
from broker.store.warm_map import hit_rate


def describe(resources: Resources) -> str:
    parts = []
    if resources.whole_gpus:
        least = f"{resources.min_gpus}-" if resources.min_gpus else ""  # elastic: from min_gpus to gpus
        parts.append(f"{least}{resources.whole_gpus} GPU")
    elif resources.gpu_milli:
        parts.append(f"{resources.gpus:g} GPU")
    if resources.gpu_memory_mb:
        parts.append(f"{resources.gpu_memory_mb} MiB/GPU")
    if resources.cpus:
        parts.append(f"{resources.cpus:g} CPU")
    if resources.memory_mb:
        parts.append(f"{resources.memory_mb} MiB")
    parts += [f"{k}={v if isinstance(v, str) else '|'.join(v)}" for k, v in resources.labels.items()]
    return ", ".join(parts) or "nothing"


def _bar(used_fraction: float, width: int = 10) -> Text:
    filled = round(used_fraction * width)
    colour = "green" if used_fraction < 0.5 else "yellow" if used_fraction < 1 else "red"
    return Text("█" * filled, style=colour) + Text("░" * (width - filled), style="dim")


def nodes_table(nodes: Sequence[NodeView]) -> Table:
    table = Table(title="Nodes", expand=False)
    for column in ("node", "state", "GPUs in use (per index)", "CPU free", "RAM free MiB", "slots free", "warm hits",
                   "labels"):
        table.add_column(column)
    for node in nodes:
        gpus = Text(" ").join(
            Text(f"{g.index}:") + _bar(1 - g.free_milli / MILLI, 4) for g in node.gpus) if node.gpus else Text("-")
        state = "draining" if node.draining and node.state == "up" else node.state
        table.add_row(
            node.id, Text(state, style={"up": "green", "draining": "yellow"}.get(state, "red")), gpus,
            f"{node.free_cpus:g}/{node.cpus:g}", f"{node.free_memory_mb}/{node.memory_mb}",
            f"{node.free_slots}/{node.slots}", hit_rate(*node.warm_starts),
            ",".join(f"{k}={v}" for k, v in node.labels.items()))
    return table


def queue_table(entries: Sequence[QueueEntry], limit: int = 20, now: float | None = None) -> Table:
    now = now or time.time()
    table = Table(title=f"Pending ({len(entries)})")
    for column in ("#", "task", "name", "tenant", "prio", "asks", "waiting", "est. start", "reason"):
        table.add_column(column)
    for entry in entries[:limit]:
        table.add_row(str(entry.position), entry.id[:8], entry.name, entry.tenant, str(entry.priority),
                      describe(entry.resources), f"{now - entry.submitted_at:.1f}s",
                      _eta(entry.estimated_start_at, now), Text(entry.reason or ""))
    if len(entries) > limit:
        table.add_row("…", f"{len(entries) - limit} more", "", "", "", "", "", "", "")
    return table


def _eta(at: float | None, now: float) -> str:
    """An estimated start as 'in 5m 3s' ('now' when due); '-' when unknown."""
    if at is None:
        return "-"
    left = int(at - now)
    if left <= 0:
        return "now"
    hours, rest = divmod(left, 3600)
    minutes, seconds = divmod(rest, 60)
    return "in " + (f"{hours}h {minutes}m" if hours else f"{minutes}m {seconds}s" if minutes else f"{seconds}s")


def status_table(status: TaskStatus) -> Table:
    table = Table(show_header=False, title=f"Task {status.id}")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = {
        "name": status.name, "state": status.state.value, "tenant": status.tenant,
        "priority": str(status.priority), "asks": describe(status.resources), "node": status.node or "-",
        "gpus": ",".join(map(str, status.gpus)) or "-", "attempts": str(status.attempts),
    }
    if status.preemptions:
        rows["preempted"] = f"{status.preemptions} times"
    if status.position is not None:
        rows["position"] = str(status.position)
    if status.reason:
        rows["waiting for"] = status.reason
    now = time.time()
    if status.retried or status.retry_reason:  # a Celery retry, or a gang's attempt requeued whole
        rows["retrying"] = status.retry_reason or "the task asked Celery to retry"
    if status.replaced_by:
        rows["replaced by"] = status.replaced_by
    if status.not_before is not None and status.state is TaskState.PENDING and status.not_before > now:
        rows["not before"] = _eta(status.not_before, now)
    if status.expires_at is not None and not status.state.is_final:
        rows["expires"] = _eta(status.expires_at, now)
    if status.state is TaskState.PENDING:
        rows["est. start"] = _eta(status.estimated_start_at, now)
    if status.progress_state is not None and not status.state.is_final:
        progress = "" if status.progress is None else f" {json.dumps(status.progress, default=str)}"
        rows["progress"] = f"{status.progress_state}{progress}"
    if status.result is not None:
        rows["result"] = repr(status.result)
    if status.error:
        rows["error"] = status.error
    for attempt, file in sorted(status.log_files.items()):
        rows[f"log (attempt {attempt})"] = file
    for field, value in rows.items():
        table.add_row(field, Text(value))  # results and errors are user text: never Rich markup
    return table
