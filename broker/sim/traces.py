"""Workload traces and cluster descriptions for the simulator, read and checked row by row.

Readers:

- ``philly_jobs``: the Philly job list (Pollux artifact CSV: ``timestamp, duration, num_gpus,
  gpu_time, cluster``). The VC (``cluster``) is the tenant; there is no CPU or RAM column.
- ``openb_pods`` / ``openb_nodes``: Alibaba's cluster-trace-gpu-v2023 pod and node lists. A
  pod's ``gpu_spec`` (``V100M16|V100M32``) becomes the label selector ``gpu`` (one model, or
  the acceptable models in order of preference); each node carries ``gpu=<model>``.
- ``plain_jobs`` / ``plain_nodes``: the format for users' own traces and clusters, CSV or JSON
  (documented in docs/evaluation.md).

Every reader refuses a bad row with a ``TraceError`` naming the file, the line (or JSON item),
the field and the reason. Times are seconds from the trace's first submit.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from broker.errors import InvalidRequest
from broker.models import MILLI, NodeSpec
from broker.sim.trace_rows import (
    ClusterNode,
    CsvRows,
    Selector,
    TraceError,
    TraceJob,
    cell,
    check_resources,
    flag_in,
    labels_in,
    name_in,
    number_in,
    records_of,
    sorted_by_submit,
    text_of,
    whole_in,
)

__all__ = ["ClusterNode", "TraceError", "TraceJob", "load_cluster", "load_trace", "openb_nodes", "openb_pods",
           "parse_shape", "philly_jobs", "plain_jobs", "plain_nodes", "trace_format", "uniform_cluster"]

# ---- Philly ------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1)


def philly_jobs(path: str | Path, limit: int | None = None) -> list[TraceJob]:
    """The Philly job list, in submit order (the file is not sorted); ``limit`` keeps the first jobs."""
    path = Path(path)
    jobs = []
    for where, row in CsvRows(path, ("timestamp", "duration", "num_gpus", "cluster")):
        try:
            submitted = (datetime.fromisoformat(row["timestamp"]) - _EPOCH).total_seconds()
        except ValueError:
            raise TraceError(path, where, "timestamp", f"{row['timestamp'][:40]!r} is not a time like "
                             "'2017-10-09 07:01:55'") from None
        vc = name_in(path, where, "cluster", row["cluster"])
        jobs.append(TraceJob(
            id=f"philly-{where.removeprefix('line ')}", submit_s=submitted,
            duration_s=number_in(path, where, "duration", row["duration"]),
            gpus=whole_in(path, where, "num_gpus", row["num_gpus"], minimum=1),
            tenant=vc, name="philly.vc_" + re.sub(r"\W", "_", vc)))
    jobs = sorted_by_submit(jobs)
    return jobs[:limit] if limit is not None else jobs


# ---- Alibaba openb -----------------------------------------------------------------------

# GPU memory per model (MiB). The node list has none; G1-G3 are undisclosed. A share of a
# GPU reserves the same fraction of its memory, so the value only matters for tasks that
# ask for GPU memory explicitly, which openb pods never do.
OPENB_GPU_MEMORY_MB = {"T4": 15_360, "P100": 16_384, "V100M16": 16_384, "V100M32": 32_768, "A10": 24_576}
OPENB_DEFAULT_GPU_MEMORY_MB = 32_768
OPENB_SLOTS = 256  # pods per node: the FGD simulator sets no pod-count limit


def _nan(text: str) -> bool:
    return text == "" or text.lower() == "nan"


def openb_pods(path: str | Path, static: bool | None = None, limit: int | None = None) -> list[TraceJob]:
    """An openb pod list.

    Replayed (the default when the file has times): a pod arrives at ``creation_time`` and runs
    for ``deletion_time - scheduled_time`` (``- creation_time`` for a pod never scheduled).
    ``static`` (the FGD experiments, and the only choice for the ``multigpu`` files, which have
    no times): pods arrive one per second in file order and never finish. The tenant is the QoS
    class (``default`` without one)."""
    path = Path(path)
    rows = CsvRows(path, ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli"))
    timed = {"creation_time", "deletion_time"} <= set(rows.columns)
    if static is None:
        static = not timed
    if not static and not timed:
        raise TraceError(path, "line 1", "header", "has no creation_time/deletion_time columns to replay; "
                         "read it as a static trace")
    jobs, seen = [], set()
    for index, (where, row) in enumerate(rows):
        gpus = _openb_gpus(path, where, row)
        spec = list(dict.fromkeys(m for m in row.get("gpu_spec", "").split("|") if m))  # some name a model twice
        for model in spec:
            name_in(path, where, "gpu_spec", model)
        labels: Selector = {} if not spec else {"gpu": spec[0] if len(spec) == 1 else tuple(spec)}
        if static:
            submitted, duration = float(index), None
        else:
            submitted, duration = _openb_times(path, where, row)
        name = name_in(path, where, "name", row["name"])
        job_id = name if name not in seen else f"{name}.{where.removeprefix('line ')}"  # variant files repeat names
        seen.add(job_id)
        qos = row.get("qos") or "default"
        jobs.append(check_resources(path, where, TraceJob(
            id=job_id, submit_s=submitted, duration_s=duration, gpus=gpus,
            cpus=whole_in(path, where, "cpu_milli", row["cpu_milli"]) / MILLI,
            memory_mb=whole_in(path, where, "memory_mib", row["memory_mib"]),
            tenant=name_in(path, where, "qos", qos), name="openb.pod", labels=labels)))
        if limit is not None and static and len(jobs) >= limit:
            break
    jobs = sorted_by_submit(jobs)
    return jobs[:limit] if limit is not None else jobs


def _openb_gpus(path: Path, where: str, row: dict[str, str]) -> float:
    count = whole_in(path, where, "num_gpu", row["num_gpu"])
    milli = whole_in(path, where, "gpu_milli", row["gpu_milli"])
    if count == 0:
        if milli:
            raise TraceError(path, where, "gpu_milli", f"is {milli} for a pod with num_gpu 0")
        return 0.0
    if not 0 < milli <= MILLI:
        raise TraceError(path, where, "gpu_milli", f"is {milli}; it must be 1..1000 for a GPU pod")
    if count > 1 and milli != MILLI:
        raise TraceError(path, where, "gpu_milli", f"is {milli} for a {count}-GPU pod; only 1-GPU pods share a GPU")
    return float(count) if milli == MILLI else milli / MILLI


def _openb_times(path: Path, where: str, row: dict[str, str]) -> tuple[float, float]:
    created = number_in(path, where, "creation_time", row["creation_time"])
    deleted = number_in(path, where, "deletion_time", row["deletion_time"])
    scheduled_text = row.get("scheduled_time", "")
    began = created if _nan(scheduled_text) else number_in(path, where, "scheduled_time", scheduled_text)
    if deleted < began:
        raise TraceError(path, where, "deletion_time", f"{deleted:g} is before the pod started ({began:g})")
    return created, deleted - began


def openb_nodes(path: str | Path, slots: int = OPENB_SLOTS) -> list[ClusterNode]:
    """An openb node list: ``sn, cpu_milli, memory_mib, gpu, model``; a GPU node gets label ``gpu=<model>``."""
    path = Path(path)
    nodes = []
    for where, row in CsvRows(path, ("sn", "cpu_milli", "memory_mib", "gpu", "model")):
        gpus = whole_in(path, where, "gpu", row["gpu"])
        model = row["model"]
        if gpus and not model:
            raise TraceError(path, where, "model", f"is empty for a node with {gpus} GPUs")
        labels = {"gpu": name_in(path, where, "model", model)} if model else {}
        nodes.append(_check_node(path, where, ClusterNode(
            id=name_in(path, where, "sn", row["sn"]), gpus=gpus,
            gpu_memory_mb=OPENB_GPU_MEMORY_MB.get(model, OPENB_DEFAULT_GPU_MEMORY_MB) if gpus else 0,
            cpus=whole_in(path, where, "cpu_milli", row["cpu_milli"], minimum=1) / MILLI,
            memory_mb=whole_in(path, where, "memory_mib", row["memory_mib"]), slots=slots, labels=labels)))
    return _unique(path, nodes)


def _check_node(path: Path, where: str, node: ClusterNode) -> ClusterNode:
    try:
        NodeSpec(node_id=node.id, gpus=node.gpus, gpu_memory_mb=node.gpu_memory_mb, cpus=node.cpus,
                 memory_mb=node.memory_mb, slots=node.slots, labels=node.labels)
    except InvalidRequest as exc:
        field_name, reason = next(iter(exc.problems.items()))
        raise TraceError(path, where, field_name, reason) from None
    return node


def _unique(path: Path, nodes: list[ClusterNode]) -> list[ClusterNode]:
    seen: set[str] = set()
    for node in nodes:
        if node.id in seen:
            raise TraceError(path, "", "id", f"node {node.id!r} is listed twice")
        seen.add(node.id)
    if not nodes:
        raise TraceError(path, "", "", "lists no nodes")
    return nodes


# ---- plain CSV / JSON --------------------------------------------------------------------


def plain_jobs(path: str | Path, limit: int | None = None) -> list[TraceJob]:
    """Users' own traces: CSV with a header, or JSON (a list of objects, or ``{"jobs": [...]}``).

    Fields: ``submit_s`` and ``gpus`` (required); ``duration_s`` (empty: runs until the end);
    ``id``, ``cpus``, ``memory_mb``, ``gpu_memory_mb``, ``tenant``, ``priority``, ``name``
    (a dotted task name), ``labels`` and ``preemptible`` (optional)."""
    path = Path(path)
    jobs, seen = [], set()
    for where, row in records_of(path, ("submit_s", "gpus"), "jobs"):
        job_id = cell(row, "id") or where.replace("line ", "job-").replace("jobs[", "job-").rstrip("]")
        if job_id in seen:
            raise TraceError(path, where, "id", f"{job_id!r} is used twice")
        seen.add(job_id)
        duration = cell(row, "duration_s")
        gpu_memory = cell(row, "gpu_memory_mb")
        name = cell(row, "name") or "trace.job"
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name, re.ASCII):
            raise TraceError(path, where, "name", f"{name[:80]!r} is not a dotted Python name like 'trace.job'")
        jobs.append(check_resources(path, where, TraceJob(
            id=job_id, submit_s=number_in(path, where, "submit_s", text_of(row["submit_s"])),
            duration_s=None if duration == "" else number_in(path, where, "duration_s", duration),
            gpus=number_in(path, where, "gpus", text_of(row["gpus"])),
            cpus=number_in(path, where, "cpus", cell(row, "cpus") or "0"),
            memory_mb=whole_in(path, where, "memory_mb", cell(row, "memory_mb") or "0"),
            gpu_memory_mb=None if gpu_memory == "" else whole_in(path, where, "gpu_memory_mb", gpu_memory, minimum=1),
            tenant=name_in(path, where, "tenant", cell(row, "tenant") or "default"),
            priority=whole_in(path, where, "priority", cell(row, "priority") or "0", minimum=-1_000_000),
            name=name, labels=labels_in(path, where, row.get("labels", ""), allow_lists=True),
            preemptible=flag_in(path, where, "preemptible", row.get("preemptible", "")))))
    jobs = sorted_by_submit(jobs)
    return jobs[:limit] if limit is not None else jobs


def plain_nodes(path: str | Path) -> list[ClusterNode]:
    """Users' own clusters: CSV or JSON (``{"nodes": [...]}``), one row per node or per group.

    Fields: ``id`` (required), ``count`` (that many nodes ``<id>-1`` .. ``<id>-N``), ``gpus``,
    ``gpu_memory_mb``, ``cpus``, ``memory_mb``, ``slots`` (default: the GPU count, at least 1)
    and ``labels``."""
    path = Path(path)
    nodes = []
    for where, row in records_of(path, ("id",), "nodes"):
        gpus = whole_in(path, where, "gpus", cell(row, "gpus") or "0")
        count = whole_in(path, where, "count", cell(row, "count") or "1", minimum=1)
        node_id = name_in(path, where, "id", text_of(row["id"]))
        template = ClusterNode(
            id=node_id, gpus=gpus, gpu_memory_mb=whole_in(path, where, "gpu_memory_mb", cell(row, "gpu_memory_mb") or
                                                        ("81920" if gpus else "0")),
            cpus=number_in(path, where, "cpus", cell(row, "cpus") or "1"),
            memory_mb=whole_in(path, where, "memory_mb", cell(row, "memory_mb") or "0"),
            slots=whole_in(path, where, "slots", cell(row, "slots") or str(max(gpus, 1)), minimum=1),
            labels={k: v for k, v in labels_in(path, where, row.get("labels", ""), False).items()
                    if isinstance(v, str)})
        _check_node(path, where, template)
        if cell(row, "count") == "":
            nodes.append(template)
        else:
            nodes += [_renamed(template, f"{node_id}-{i}") for i in range(1, count + 1)]
            _check_node(path, where, nodes[-1])
    return _unique(path, nodes)


def _renamed(node: ClusterNode, node_id: str) -> ClusterNode:
    return ClusterNode(node_id, node.gpus, node.gpu_memory_mb, node.cpus, node.memory_mb, node.slots, node.labels)


# ---- shapes and format detection ------------------------------------------------------------

_SHAPE_FIELDS = {"gpus", "gpu_memory_mb", "cpus", "memory_mb", "slots"}


def parse_shape(text: str) -> ClusterNode:
    """A node shape like ``gpus=8,gpu_memory_mb=24576,cpus=48,memory_mb=393216,gpu=P40``: any
    other key is a label. Missing: 8 GPUs of 80 GiB, 64 CPUs, 512 GiB, slots = GPUs."""
    values: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise InvalidRequest({"shape": f"{part[:40]!r} is not key=value"})
        values[key.strip()] = value.strip()
    labels = {k: v for k, v in values.items() if k not in _SHAPE_FIELDS}
    where = Path("--shape")
    gpus = whole_in(where, "", "gpus", values.get("gpus", "8"))
    node = ClusterNode(
        id="shape", gpus=gpus, gpu_memory_mb=whole_in(where, "", "gpu_memory_mb", values.get("gpu_memory_mb", "81920")),
        cpus=number_in(where, "", "cpus", values.get("cpus", "64")),
        memory_mb=whole_in(where, "", "memory_mb", values.get("memory_mb", "524288")),
        slots=whole_in(where, "", "slots", values.get("slots", str(max(gpus, 1))), minimum=1), labels=labels)
    return _check_node(where, "", node)


def uniform_cluster(shape: ClusterNode, count: int) -> list[ClusterNode]:
    """``count`` nodes of ``shape``, named ``node-0001``..."""
    width = max(4, len(str(count)))
    return [_renamed(shape, f"node-{i:0{width}d}") for i in range(1, count + 1)]


def _header(path: Path) -> set[str]:
    if path.suffix.lower() == ".json":
        return set()
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return {c.strip() for c in next(csv.reader(f), [])}
    except OSError as exc:
        raise TraceError(path, "", "", f"cannot be read ({exc.strerror})") from None


TRACE_FORMATS: dict[str, Callable[..., list[TraceJob]]] = {
    "philly": philly_jobs, "openb": openb_pods, "plain": plain_jobs}


def trace_format(path: str | Path) -> str:
    """Which reader a trace file needs, from its header."""
    columns = _header(Path(path))
    if {"timestamp", "num_gpus", "cluster"} <= columns:
        return "philly"
    if {"num_gpu", "gpu_milli"} <= columns:
        return "openb"
    return "plain"


def load_trace(path: str | Path, kind: str = "auto", limit: int | None = None) -> list[TraceJob]:
    """Read a trace with the reader ``kind`` names (``auto``: from the file's header)."""
    kind = trace_format(path) if kind == "auto" else kind
    if kind not in TRACE_FORMATS:
        raise InvalidRequest({"format": f"{kind!r} is not one of auto, {', '.join(TRACE_FORMATS)}"})
    return TRACE_FORMATS[kind](path, limit=limit)


def load_cluster(path: str | Path) -> list[ClusterNode]:
    """Read a cluster file: an openb node list (by its header), else the plain format."""
    columns = _header(Path(path))
    return openb_nodes(path) if {"sn", "model"} <= columns else plain_nodes(path)
