"""The rows traces are read from, and what they become: ``TraceJob`` and ``ClusterNode``.

Helpers that check one field at a time and raise ``TraceError`` naming the file, the line (or
JSON item), the field and the reason; ``traces`` builds each format's reader from them.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import GpuBrokerError, InvalidRequest
from broker.models import MILLI, NAME_PATTERN, NAME_RULE, Resources

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
    # A preempted job resumes from its last checkpoint, taken every this many seconds of its run
    # (None: it restarts from zero).
    checkpoint_interval_s: float | None = None

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


class CsvRows:
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


def number_in(path: Path, where: str, name: str, text: str, *, minimum: float = 0.0) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(path, where, name, f"{text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise TraceError(path, where, name, f"{text[:40]!r} is not a finite number")
    if value < minimum:
        raise TraceError(path, where, name, f"{value:g} is below the minimum {minimum:g}")
    return value


def whole_in(path: Path, where: str, name: str, text: str, *, minimum: int = 0) -> int:
    value = number_in(path, where, name, text, minimum=minimum)
    if value != int(value):
        raise TraceError(path, where, name, f"{text[:40]!r} is not a whole number")
    return int(value)


def name_in(path: Path, where: str, name: str, text: str) -> str:
    if not NAME_PATTERN.match(text):
        raise TraceError(path, where, name, f"{text[:80]!r} is not valid ({NAME_RULE})")
    return text


def check_resources(path: Path, where: str, job: TraceJob) -> TraceJob:
    """Refuse here, naming the line, what ``Client.submit`` would refuse later."""
    try:
        job.resources()
    except InvalidRequest as exc:
        field_name, reason = next(iter(exc.problems.items()))
        raise TraceError(path, where, field_name, reason) from None
    return job


def sorted_by_submit(jobs: list[TraceJob]) -> list[TraceJob]:
    """Arrival order, ties in file order, times shifted so that the first submit is at 0."""
    jobs.sort(key=lambda j: j.submit_s)  # stable
    origin = jobs[0].submit_s if jobs else 0.0
    if origin:
        jobs = [shifted(j, origin) for j in jobs]
    return jobs


def shifted(job: TraceJob, origin: float) -> TraceJob:
    return TraceJob(job.id, job.submit_s - origin, job.duration_s, job.gpus, job.cpus, job.memory_mb,
                    job.gpu_memory_mb, job.tenant, job.priority, job.name, job.labels, job.preemptible)



# ---- the plain format's helpers -----------------------------------------------------------


def records_of(path: Path, required: tuple[str, ...], key: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a CSV file, or items of a JSON list (bare, or under ``key``), with where they are."""
    if path.suffix.lower() != ".json":
        yield from CsvRows(path, required)
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


def text_of(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def cell(row: dict[str, Any], name: str) -> str:
    value = row.get(name, "")
    return "" if value == "" else text_of(value)


def labels_in(path: Path, where: str, value: Any, allow_lists: bool) -> Selector:
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
        name_in(path, where, "labels", str(key))
        if isinstance(val, list) and allow_lists:
            out[key] = tuple(name_in(path, where, f"labels.{key}", str(v)) for v in val)
        elif isinstance(val, str):
            out[key] = name_in(path, where, f"labels.{key}", val)
        else:
            raise TraceError(path, where, f"labels.{key}", f"{val!r} is not a label value")
    return out


def flag_in(path: Path, where: str, name: str, value: Any) -> bool | None:
    text = text_of(value).lower() if value != "" else ""
    if text == "":
        return None
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise TraceError(path, where, name, f"{text[:20]!r} is not true or false")
