"""What users submit and what they read back, validated before anything touches Redis.

Also the rules every layer shares: names (pools, tenants, labels), priorities, the unit of a
GPU share (``MILLI``) and the one label matcher. Whether some node could ever run a request
is ``broker.scheduling.shortfall``."""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from broker.errors import InvalidRequest

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
NAME_RULE = "1-64 characters from letters, digits, '_', '.' and '-'"
# A task's pending score packs priority above its submit sequence number (store.keys.SEQ_BITS);
# both must stay inside a double's 53-bit mantissa for ZRANGE to keep exact order.
MAX_PRIORITY = 1_000_000
MILLI = 1000  # a GPU share and CPUs are counted in thousandths
TASK_NAME_MAX = 200
IDEMPOTENCY_KEY_MAX = 256
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z", re.ASCII)
_JSON_PLAIN = frozenset({str, int, bool, type(None)})  # what json.dumps prints (an int below 2**64 here)


class TaskState(enum.StrEnum):
    PENDING = "PENDING"
    RESERVED = "RESERVED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})


def _check_name(value: str, what: str = "name") -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(f"{value[:80]!r} is not a valid {what} ({NAME_RULE})")
    return value


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        _check_name(key, "label key")
        _check_name(value, "label value")
    return labels


MAX_PREFERENCES = 16
MAX_REPLICAS = 1024  # members of one gang: more than any pool here has nodes times GPUs


def _check_selector(labels: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
    """A task's label selector: each key needs one value, or one of a list (earlier preferred)."""
    for key, value in labels.items():
        _check_name(key, "label key")
        if isinstance(value, str):
            _check_name(value, "label value")
            continue
        if not value or len(value) > MAX_PREFERENCES:
            raise ValueError(f"label {key!r}: a preference list needs 1 to {MAX_PREFERENCES} values")
        if len(set(value)) != len(value):
            raise ValueError(f"label {key!r}: a preference list names a value twice")
        for item in value:
            _check_name(item, "label value")
    return labels


Exact = tuple[tuple[str, str], ...]  # label -> the one value a task needs, sorted by label
Prefer = tuple[tuple[str, tuple[str, ...]], ...]  # label -> values it accepts, most preferred first


def split_selector(selector: Mapping[str, str | Sequence[str]]) -> tuple[Exact, Prefer]:
    """A label selector as (exact values, preference lists), each sorted by label."""
    exact = tuple(sorted((k, v) for k, v in selector.items() if isinstance(v, str)))
    prefer = tuple(sorted((k, tuple(v)) for k, v in selector.items() if not isinstance(v, str)))
    return exact, prefer


def labels_fit(labels: Mapping[str, str], exact: Iterable[tuple[str, str]],
               prefer: Iterable[tuple[str, Sequence[str]]] = ()) -> bool:
    """The one label matcher: a node with ``labels`` has each ``exact`` value and one value of
    each ``prefer`` list."""
    return all(labels.get(k) == v for k, v in exact) and all(labels.get(k) in values for k, values in prefer)


def selector_matches(selector: Mapping[str, str | Sequence[str]], labels: Mapping[str, str]) -> bool:
    """Whether a node with ``labels`` meets a task's label ``selector``."""
    return labels_fit(labels, *split_selector(selector))


def _whole_milli(value: float, what: str) -> int:
    milli = round(value * MILLI)
    if not math.isclose(milli, value * MILLI, abs_tol=1e-6):
        raise ValueError(f"{what} must be a multiple of 0.001 (got {value!r})")
    return milli


def _problems(exc: pydantic.ValidationError) -> dict[str, str]:
    problems: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"]) or "request"
        nested = err.get("ctx", {}).get("error")
        if isinstance(nested, InvalidRequest):
            # A nested model's own __init__ already named its fields; keep the full path.
            problems.update({f"{loc}.{field}": why for field, why in nested.problems.items()})
        else:
            problems[loc] = err["msg"].removeprefix("Value error, ")
    return problems


class _Strict(BaseModel):
    """Strict input model: constructing it with bad values raises InvalidRequest."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise InvalidRequest(_problems(exc)) from None


class Resources(_Strict):
    """What one task needs. See the README's resource model for the rules."""

    gpus: float = Field(0, ge=0, le=1024, allow_inf_nan=False)
    gpu_memory_mb: int | None = Field(None, gt=0, le=16 * 1024 * 1024)
    cpus: float = Field(0, ge=0, le=100_000, allow_inf_nan=False)
    memory_mb: int = Field(0, ge=0, le=1 << 40)
    # A value that is a list accepts any of its values, preferring earlier ones:
    # {"gpu": ["H100", "A100"]} runs on an H100 node if one fits, else on an A100 node.
    labels: dict[str, str | list[str]] = Field(default_factory=dict)
    # Elastic (issue 13): any whole number of GPUs from min_gpus to gpus on one node, as the pool's
    # scheduling.elastic rule grants; None: exactly gpus.
    min_gpus: int | None = Field(None, ge=1, le=1024)

    @field_validator("gpus")
    @classmethod
    def _gpus_shape(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"must be a whole number of GPUs when 1 or more (got {value!r})")
        if 0 < value < 1:
            _whole_milli(value, "a GPU share")
        return value

    @field_validator("cpus")
    @classmethod
    def _cpus_shape(cls, value: float) -> float:
        _whole_milli(value, "cpus")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _label_types(cls, value: Any) -> Any:
        # Checked here so the error names the label, not the two arms of the union.
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(item, str) and not (isinstance(item, list) and all(isinstance(v, str) for v in item)):
                    raise ValueError(f"label {str(key)[:80]!r}: must be a valid string or a list of strings "
                                     f"(got {type(item).__name__})")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        return _check_selector(value)

    @field_validator("gpu_memory_mb")
    @classmethod
    def _memory_needs_gpu(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("gpus", 1) == 0:
            raise ValueError("needs gpus > 0 (a CPU task sees no GPU)")
        return value

    @field_validator("min_gpus")
    @classmethod
    def _min_gpus(cls, value: int | None, info: ValidationInfo) -> int | None:
        gpus = info.data.get("gpus")
        if value is not None and gpus is not None and not 1 <= value <= gpus:
            raise ValueError(f"must be from 1 to gpus ({gpus:g}) (got {value})")
        return value

    @property
    def whole_gpus(self) -> int:
        return int(self.gpus) if self.gpus >= 1 else 0

    @property
    def gpu_milli(self) -> int:
        """The share of one GPU, in thousandths, for a fractional request; else 0."""
        return round(self.gpus * MILLI) if 0 < self.gpus < 1 else 0

    @property
    def cpu_milli(self) -> int:
        return round(self.cpus * MILLI)


class SubmitRequest(_Strict):
    """Everything ``Client.submit`` accepts, checked field by field."""

    task_name: str = Field(min_length=1, max_length=TASK_NAME_MAX)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    tenant: str = "default"
    estimated_runtime_s: float | None = Field(None, gt=0, le=10 * 365 * 86400, allow_inf_nan=False)
    idempotency_key: str | None = Field(None, min_length=1, max_length=IDEMPOTENCY_KEY_MAX)
    max_retries: int = Field(3, ge=0, le=100)
    # May the scheduler stop it (SIGTERM, a grace period, then SIGKILL) and requeue it for a more
    # urgent task? None: the pool's scheduling.preemptible_default.
    preemptible: bool | None = None
    # Seconds since the epoch: not placed before then (countdown, ETA); cancelled if it has not
    # started by then (expires).
    not_before: float | None = Field(None, gt=0, allow_inf_nan=False)
    expires_at: float | None = Field(None, gt=0, allow_inf_nan=False)
    # A gang (issue 13; broker.store.gangs): ``replicas`` members of ``resources``, all or nothing.
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    spread: bool = False
    same_label: str | None = None
    min_replicas: int | None = Field(None, ge=1, le=MAX_REPLICAS)  # elastic gang: from this many to replicas

    @field_validator("min_replicas")
    @classmethod
    def _min_replicas(cls, value: int | None, info: ValidationInfo) -> int | None:
        replicas = info.data.get("replicas")
        if value is not None and replicas is not None and value > replicas:
            raise ValueError(f"must be from 1 to replicas ({replicas}) (got {value})")
        return value

    @field_validator("replicas")
    @classmethod
    def _fixed_members(cls, value: int, info: ValidationInfo) -> int:
        resources = info.data.get("resources")
        if value > 1 and resources is not None and resources.min_gpus is not None:
            raise ValueError("a gang's members take fixed GPUs: resources.min_gpus goes with replicas=1; "
                             "use min_replicas for an elastic gang")
        return value

    @field_validator("same_label")
    @classmethod
    def _same_label(cls, value: str | None) -> str | None:
        return None if value is None else _check_name(value, "label key")

    @field_validator("task_name")
    @classmethod
    def _task_name(cls, value: str) -> str:
        if not TASK_NAME_PATTERN.match(value):
            raise ValueError(f"{value[:80]!r} is not a dotted Python name like 'workers.tasks.probe'")
        return value

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return _check_name(value, "tenant")

    @field_validator("args", mode="before")
    @classmethod
    def _tuple_args(cls, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    @field_validator("args", "kwargs")
    @classmethod
    def _json_only(cls, value: Any) -> Any:
        if all(type(v) in _JSON_PLAIN and (type(v) is not int or -2**64 < v < 2**64)  # no trial encoding
               for v in (value.values() if isinstance(value, dict) else value)):  # (a third of the model's cost)
            return value
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"must be JSON-serialisable ({exc})") from None
        except RecursionError:  # uncaught, it would escape as a crash instead of naming the field
            raise ValueError("must be JSON-serialisable (nested too deeply)") from None
        return value


class NodeSpec(_Strict):
    """The shape a worker registers for its node."""

    node_id: str
    gpus: int = Field(0, ge=0, le=64)
    gpu_memory_mb: int = Field(0, ge=0, le=16 * 1024 * 1024)
    cpus: float = Field(1, gt=0, le=100_000, allow_inf_nan=False)
    memory_mb: int = Field(0, ge=0, le=1 << 40)
    slots: int = Field(1, ge=1, le=1024)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        return _check_name(value, "node id")

    @field_validator("cpus")
    @classmethod
    def _cpus_shape(cls, value: float) -> float:
        _whole_milli(value, "cpus")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_labels(value)

    @field_validator("gpu_memory_mb")
    @classmethod
    def _gpu_memory(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("gpus", 0) > 0 and value <= 0:
            raise ValueError("must be > 0 when the node has GPUs")
        return value

    @property
    def cpu_milli(self) -> int:
        return round(self.cpus * MILLI)


# ---- read models -----------------------------------------------------------------


class GpuView(BaseModel):
    index: int
    memory_mb: int
    free_milli: int
    free_memory_mb: int

    @property
    def used_fraction(self) -> float:
        return 1 - self.free_milli / MILLI


class NodeView(BaseModel):
    id: str
    state: str
    lease_expires_at: float | None
    gpus: list[GpuView]
    gpu_memory_mb: int
    cpus: float
    memory_mb: int
    slots: int
    labels: dict[str, str]
    free_cpus: float
    free_memory_mb: int
    free_slots: int
    tasks: int
    serves: list[str] | None = None  # the task names its worker runs; None: any
    draining: bool = False  # no new tasks are placed on it (gpubroker drain, or its worker is stopping)
    down_since: float | None = None  # when its lease expired (seconds since the epoch), while down
    warm_starts: tuple[int, int] = (0, 0)  # reuse=True GPU tasks started warm for their name and GPUs, or not

    @property
    def free_gpus(self) -> int:  # GPUs nobody holds any share of
        return sum(1 for g in self.gpus if g.free_milli == MILLI)


class MemberView(BaseModel):  # a gang member, as ``status(id).members`` lists it
    rank: int
    node: str | None = None
    gpus: list[int] = Field(default_factory=list)
    state: TaskState
    error: str | None = None


class TaskStatus(BaseModel):
    id: str
    name: str
    state: TaskState
    tenant: str
    priority: int
    resources: Resources
    node: str | None = None
    gpus: list[int] = Field(default_factory=list)
    attempts: int = 0
    result: Any = None
    error: str | None = None
    submitted_at: float
    reserved_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    preemptible: bool | None = None
    preemptions: int = 0  # times it was stopped and requeued for a more urgent task
    # Celery's side: what the running task last said (update_state), a failure's exception, a retry's wait.
    progress_state: str | None = None
    progress: Any = None
    exception: dict[str, Any] | None = None
    retried: bool = False  # it asked Celery to retry and waits to run again
    retry_reason: str | None = None
    replaced_by: str | None = None  # it replaced itself (Task.replace) and waits for this to be sent
    not_before: float | None = None  # seconds: not placed before then (countdown, ETA, a retry's wait)
    expires_at: float | None = None
    log_files: dict[int, str] = {}  # attempt -> <node>:<path> of its whole output (`gpubroker logs`)
    # While PENDING, as of the dispatcher's last pass:
    position: int | None = None
    reason: str | None = None
    estimated_start_at: float | None = None
    members: list[MemberView] | None = None  # a gang's (issue 13), in rank order; None for a single task


class QueueEntry(BaseModel):
    position: int  # in the order the dispatcher's policy ranks the queue, when it has published one
    id: str
    name: str
    tenant: str
    priority: int
    resources: Resources
    submitted_at: float
    estimated_runtime_s: float | None = None
    reason: str | None = None  # why it is not running yet, as of the dispatcher's last pass
    estimated_start_at: float | None = None  # from running tasks' estimated ends; None if unknown
