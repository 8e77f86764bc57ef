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
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from broker.errors import GpuBrokerError, InvalidRequest
from broker.keys import NAME_PATTERN, NAME_RULE
from broker.models import MILLI, NodeSpec, Resources

Selector = dict[str, str | tuple[str, ...]]  # label key -> value, or acceptable values in order of preference


class TraceError(GpuBrokerError, ValueError):
    """A trace or cluster file was refused: where, which field, and why."""

    def __init__(self, path: str | Path, where: str, field_name: str, reason: str) -> None:
        self.path, self.where, self.field, self.reason = str(path), where, field_name, reason
        location = f"{self.path}, {where}: " if where else f"{self.path}: "
        super().__init__(f"{location}{field_name}: {reason}" if field_name else f"{location}{reason}")


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One job of a trace: when it arrives, how long it runs once started, what it asks for."""

    id: str
    submit_s: float
    duration_s: float | None  # None: runs until the simulation ends (static packing)
    gpus: float = 0.0  # whole GPUs (>= 1) or a share of one (< 1)
    cpus: float = 0.0
    memory_mb: int = 0
    gpu_memory_mb: int | None = None
    tenant: str = "default"
    priority: int = 0
    name: str = "trace.job"
    labels: Selector = field(default_factory=dict)
    preemptible: bool | None = None

    def resources(self) -> Resources:
        labels = {k: v if isinstance(v, str) else list(v) for k, v in self.labels.items()}
        return Resources(gpus=self.gpus, gpu_memory_mb=self.gpu_memory_mb, cpus=self.cpus,
                         memory_mb=self.memory_mb, labels=labels)

    @property
    def gpu_milli(self) -> int:
        """GPU capacity held while it runs, in thousandths of a GPU."""
        return round(self.gpus * MILLI)


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One node of a simulated cluster (what a worker would register)."""

    id: str
    gpus: int = 0
    gpu_memory_mb: int = 0
    cpus: float = 1.0
    memory_mb: int = 0
    slots: int = 1
    labels: dict[str, str] = field(default_factory=dict)


# ---- row helpers -------------------------------------------------------------------------


class _Rows:
    """The data rows of a CSV file with their line numbers, checked against required columns."""

    def __init__(self, path: Path, required: tuple[str, ...]) -> None:
        self.path = path
        try:
            self._file = path.open(newline="", encoding="utf-8-sig")
        except OSError as exc:
            raise TraceError(path, "", "", f"cannot be read ({exc.strerror})") from None
        self._reader = csv.reader(self._file)
        header = next(self._reader, None)
        if header is None:
            self._file.close()
            raise TraceError(path, "line 1", "", "the file is empty (a header line was expected)")
        self.columns = [c.strip() for c in header]
        missing = [c for c in required if c not in self.columns]
        if missing:
            self._file.close()
            raise TraceError(path, "line 1", "header", f"missing column(s) {', '.join(missing)} "
                             f"(found: {', '.join(self.columns)})")

    def __iter__(self) -> Iterator[tuple[str, dict[str, str]]]:
        with self._file:
            for row in self._reader:
                where = f"line {self._reader.line_num}"
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != len(self.columns):
                    raise TraceError(self.path, where, "", f"has {len(row)} fields; the header has {len(self.columns)}")
                yield where, dict(zip(self.columns, (cell.strip() for cell in row), strict=True))


def _number(path: Path, where: str, name: str, text: str, *, minimum: float = 0.0) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(path, where, name, f"{text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise TraceError(path, where, name, f"{text[:40]!r} is not a finite number")
    if value < minimum:
        raise TraceError(path, where, name, f"{value:g} is below the minimum {minimum:g}")
    return value


def _whole(path: Path, where: str, name: str, text: str, *, minimum: int = 0) -> int:
    value = _number(path, where, name, text, minimum=minimum)
    if value != int(value):
        raise TraceError(path, where, name, f"{text[:40]!r} is not a whole number")
    return int(value)


def _name(path: Path, where: str, name: str, text: str) -> str:
    if not NAME_PATTERN.match(text):
        raise TraceError(path, where, name, f"{text[:80]!r} is not valid ({NAME_RULE})")
    return text


def _check_resources(path: Path, where: str, job: TraceJob) -> TraceJob:
    """Refuse here, naming the line, what ``Client.submit`` would refuse later."""
    try:
        job.resources()
    except InvalidRequest as exc:
        field_name, reason = next(iter(exc.problems.items()))
        raise TraceError(path, where, field_name, reason) from None
    return job


def _sorted_by_submit(jobs: list[TraceJob]) -> list[TraceJob]:
    """Arrival order, ties in file order, times shifted so that the first submit is at 0."""
    jobs.sort(key=lambda j: j.submit_s)  # stable
    origin = jobs[0].submit_s if jobs else 0.0
    if origin:
        jobs = [_shifted(j, origin) for j in jobs]
    return jobs


def _shifted(job: TraceJob, origin: float) -> TraceJob:
    return TraceJob(job.id, job.submit_s - origin, job.duration_s, job.gpus, job.cpus, job.memory_mb,
                    job.gpu_memory_mb, job.tenant, job.priority, job.name, job.labels, job.preemptible)


# ---- Philly ------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1)


def philly_jobs(path: str | Path, limit: int | None = None) -> list[TraceJob]:
    """The Philly job list, in submit order (the file is not sorted); ``limit`` keeps the first jobs."""
    path = Path(path)
    jobs = []
    for where, row in _Rows(path, ("timestamp", "duration", "num_gpus", "cluster")):
        try:
            submitted = (datetime.fromisoformat(row["timestamp"]) - _EPOCH).total_seconds()
        except ValueError:
            raise TraceError(path, where, "timestamp", f"{row['timestamp'][:40]!r} is not a time like "
                             "'2017-10-09 07:01:55'") from None
        vc = _name(path, where, "cluster", row["cluster"])
        jobs.append(TraceJob(
            id=f"philly-{where.removeprefix('line ')}", submit_s=submitted,
            duration_s=_number(path, where, "duration", row["duration"]),
            gpus=_whole(path, where, "num_gpus", row["num_gpus"], minimum=1),
            tenant=vc, name="philly.vc_" + re.sub(r"\W", "_", vc)))
    jobs = _sorted_by_submit(jobs)
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
    rows = _Rows(path, ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli"))
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
            _name(path, where, "gpu_spec", model)
        labels: Selector = {} if not spec else {"gpu": spec[0] if len(spec) == 1 else tuple(spec)}
        if static:
            submitted, duration = float(index), None
        else:
            submitted, duration = _openb_times(path, where, row)
        name = _name(path, where, "name", row["name"])
        job_id = name if name not in seen else f"{name}.{where.removeprefix('line ')}"  # variant files repeat names
        seen.add(job_id)
        qos = row.get("qos") or "default"
        jobs.append(_check_resources(path, where, TraceJob(
            id=job_id, submit_s=submitted, duration_s=duration, gpus=gpus,
            cpus=_whole(path, where, "cpu_milli", row["cpu_milli"]) / MILLI,
            memory_mb=_whole(path, where, "memory_mib", row["memory_mib"]),
            tenant=_name(path, where, "qos", qos), name="openb.pod", labels=labels)))
        if limit is not None and static and len(jobs) >= limit:
            break
    jobs = _sorted_by_submit(jobs)
    return jobs[:limit] if limit is not None else jobs


def _openb_gpus(path: Path, where: str, row: dict[str, str]) -> float:
    count = _whole(path, where, "num_gpu", row["num_gpu"])
    milli = _whole(path, where, "gpu_milli", row["gpu_milli"])
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
    created = _number(path, where, "creation_time", row["creation_time"])
    deleted = _number(path, where, "deletion_time", row["deletion_time"])
    scheduled_text = row.get("scheduled_time", "")
    began = created if _nan(scheduled_text) else _number(path, where, "scheduled_time", scheduled_text)
    if deleted < began:
        raise TraceError(path, where, "deletion_time", f"{deleted:g} is before the pod started ({began:g})")
    return created, deleted - began


def openb_nodes(path: str | Path, slots: int = OPENB_SLOTS) -> list[ClusterNode]:
    """An openb node list: ``sn, cpu_milli, memory_mib, gpu, model``; a GPU node gets label ``gpu=<model>``."""
    path = Path(path)
    nodes = []
    for where, row in _Rows(path, ("sn", "cpu_milli", "memory_mib", "gpu", "model")):
        gpus = _whole(path, where, "gpu", row["gpu"])
        model = row["model"]
        if gpus and not model:
            raise TraceError(path, where, "model", f"is empty for a node with {gpus} GPUs")
        labels = {"gpu": _name(path, where, "model", model)} if model else {}
        nodes.append(_check_node(path, where, ClusterNode(
            id=_name(path, where, "sn", row["sn"]), gpus=gpus,
            gpu_memory_mb=OPENB_GPU_MEMORY_MB.get(model, OPENB_DEFAULT_GPU_MEMORY_MB) if gpus else 0,
            cpus=_whole(path, where, "cpu_milli", row["cpu_milli"], minimum=1) / MILLI,
            memory_mb=_whole(path, where, "memory_mib", row["memory_mib"]), slots=slots, labels=labels)))
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


def _records(path: Path, required: tuple[str, ...], key: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a CSV file, or items of a JSON list (bare, or under ``key``), with where they are."""
    if path.suffix.lower() != ".json":
        yield from _Rows(path, required)
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TraceError(path, "", "", f"cannot be read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise TraceError(path, f"line {exc.lineno}", "", f"is not valid JSON ({exc.msg})") from None
    items = data.get(key) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise TraceError(path, "", key, f"expected a JSON list, or an object with a {key!r} list")
    for index, item in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise TraceError(path, where, "", "is not a JSON object")
        missing = [c for c in required if c not in item]
        if missing:
            raise TraceError(path, where, missing[0], "is missing")
        yield where, {k: "" if v is None else v for k, v in item.items()}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _opt(row: dict[str, Any], name: str) -> str:
    value = row.get(name, "")
    return "" if value == "" else _text(value)


def _plain_labels(path: Path, where: str, value: Any, allow_lists: bool) -> Selector:
    """``k=v;k2=a|b`` in CSV, or a JSON object; ``a|b`` (or a JSON list) means a or b, preferring a."""
    if value in ("", None):
        return {}
    if isinstance(value, str):
        pairs = {}
        for part in filter(None, (p.strip() for p in value.split(";"))):
            key, sep, val = part.partition("=")
            if not sep:
                raise TraceError(path, where, "labels", f"{part[:40]!r} is not key=value")
            pairs[key.strip()] = val.strip()
        value = {k: v.split("|") if "|" in v else v for k, v in pairs.items()}
    if not isinstance(value, dict):
        raise TraceError(path, where, "labels", "must be an object (JSON) or key=value;key=value (CSV)")
    out: Selector = {}
    for key, val in value.items():
        _name(path, where, "labels", str(key))
        if isinstance(val, list) and allow_lists:
            out[key] = tuple(_name(path, where, f"labels.{key}", str(v)) for v in val)
        elif isinstance(val, str):
            out[key] = _name(path, where, f"labels.{key}", val)
        else:
            raise TraceError(path, where, f"labels.{key}", f"{val!r} is not a label value")
    return out


def _flag(path: Path, where: str, name: str, value: Any) -> bool | None:
    text = _text(value).lower() if value != "" else ""
    if text == "":
        return None
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise TraceError(path, where, name, f"{text[:20]!r} is not true or false")


def plain_jobs(path: str | Path, limit: int | None = None) -> list[TraceJob]:
    """Users' own traces: CSV with a header, or JSON (a list of objects, or ``{"jobs": [...]}``).

    Fields: ``submit_s`` and ``gpus`` (required); ``duration_s`` (empty: runs until the end);
    ``id``, ``cpus``, ``memory_mb``, ``gpu_memory_mb``, ``tenant``, ``priority``, ``name``
    (a dotted task name), ``labels`` and ``preemptible`` (optional)."""
    path = Path(path)
    jobs, seen = [], set()
    for where, row in _records(path, ("submit_s", "gpus"), "jobs"):
        job_id = _opt(row, "id") or where.replace("line ", "job-").replace("jobs[", "job-").rstrip("]")
        if job_id in seen:
            raise TraceError(path, where, "id", f"{job_id!r} is used twice")
        seen.add(job_id)
        duration = _opt(row, "duration_s")
        gpu_memory = _opt(row, "gpu_memory_mb")
        name = _opt(row, "name") or "trace.job"
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name, re.ASCII):
            raise TraceError(path, where, "name", f"{name[:80]!r} is not a dotted Python name like 'trace.job'")
        jobs.append(_check_resources(path, where, TraceJob(
            id=job_id, submit_s=_number(path, where, "submit_s", _text(row["submit_s"])),
            duration_s=None if duration == "" else _number(path, where, "duration_s", duration),
            gpus=_number(path, where, "gpus", _text(row["gpus"])),
            cpus=_number(path, where, "cpus", _opt(row, "cpus") or "0"),
            memory_mb=_whole(path, where, "memory_mb", _opt(row, "memory_mb") or "0"),
            gpu_memory_mb=None if gpu_memory == "" else _whole(path, where, "gpu_memory_mb", gpu_memory, minimum=1),
            tenant=_name(path, where, "tenant", _opt(row, "tenant") or "default"),
            priority=_whole(path, where, "priority", _opt(row, "priority") or "0", minimum=-1_000_000),
            name=name, labels=_plain_labels(path, where, row.get("labels", ""), allow_lists=True),
            preemptible=_flag(path, where, "preemptible", row.get("preemptible", "")))))
    jobs = _sorted_by_submit(jobs)
    return jobs[:limit] if limit is not None else jobs


def plain_nodes(path: str | Path) -> list[ClusterNode]:
    """Users' own clusters: CSV or JSON (``{"nodes": [...]}``), one row per node or per group.

    Fields: ``id`` (required), ``count`` (that many nodes ``<id>-1`` .. ``<id>-N``), ``gpus``,
    ``gpu_memory_mb``, ``cpus``, ``memory_mb``, ``slots`` (default: the GPU count, at least 1)
    and ``labels``."""
    path = Path(path)
    nodes = []
    for where, row in _records(path, ("id",), "nodes"):
        gpus = _whole(path, where, "gpus", _opt(row, "gpus") or "0")
        count = _whole(path, where, "count", _opt(row, "count") or "1", minimum=1)
        node_id = _name(path, where, "id", _text(row["id"]))
        template = ClusterNode(
            id=node_id, gpus=gpus, gpu_memory_mb=_whole(path, where, "gpu_memory_mb", _opt(row, "gpu_memory_mb") or
                                                        ("81920" if gpus else "0")),
            cpus=_number(path, where, "cpus", _opt(row, "cpus") or "1"),
            memory_mb=_whole(path, where, "memory_mb", _opt(row, "memory_mb") or "0"),
            slots=_whole(path, where, "slots", _opt(row, "slots") or str(max(gpus, 1)), minimum=1),
            labels={k: v for k, v in _plain_labels(path, where, row.get("labels", ""), False).items()
                    if isinstance(v, str)})
        _check_node(path, where, template)
        if _opt(row, "count") == "":
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
    gpus = _whole(where, "", "gpus", values.get("gpus", "8"))
    node = ClusterNode(
        id="shape", gpus=gpus, gpu_memory_mb=_whole(where, "", "gpu_memory_mb", values.get("gpu_memory_mb", "81920")),
        cpus=_number(where, "", "cpus", values.get("cpus", "64")),
        memory_mb=_whole(where, "", "memory_mb", values.get("memory_mb", "524288")),
        slots=_whole(where, "", "slots", values.get("slots", str(max(gpus, 1))), minimum=1), labels=labels)
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
