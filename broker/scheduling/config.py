"""How a pool orders, places and preempts: one validated model, chosen per pool.

The dispatcher is started with it (``GPUBROKER_SCHEDULING`` as JSON, or ``gpubroker
dispatcher --scheduling FILE``) and publishes it in Redis, so the CLI and clients show
the queue in the order the dispatcher will use. The simulator takes the same model.
See docs/scheduling.md for what each choice does and when to pick it.
"""

from __future__ import annotations

import enum
import json
import tomllib
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker.errors import InvalidRequest
from broker.models import NAME_PATTERN, NAME_RULE
from broker.scheduling.elastic import Elastic
from broker.scheduling.ordering import Ordering, WithinTenant
from broker.scheduling.placement import PlacementKind

__all__ = ["RESOURCES", "Amounts", "Elastic", "Mode", "Ordering", "PlacementKind", "SchedulingConfig", "TenantPolicy",
           "WithinTenant"]


class Mode(enum.StrEnum):
    STRICT = "strict"  # the first task that does not fit blocks everything behind it
    BEST_EFFORT = "best_effort"  # tasks behind one that does not fit may start (skip-ahead)
    BACKFILL = "backfill"  # skip-ahead only where it cannot delay a higher-ranked task's start


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Amounts(_Config):
    """An amount of each resource; in a limit, ``None`` means unlimited."""

    gpus: float | None = Field(None, ge=0, allow_inf_nan=False)
    cpus: float | None = Field(None, ge=0, allow_inf_nan=False)
    memory_mb: int | None = Field(None, ge=0)

    def get(self, resource: str) -> float | None:
        value: float | None = getattr(self, resource)
        return value


RESOURCES = ("gpus", "cpus", "memory_mb")


class TenantPolicy(_Config):
    """A tenant's share of the pool (Kueue's ClusterQueue quota, per tenant).

    - ``weight``: its weight in dominant-resource fairness.
    - ``guarantee``: capacity it is owed (nominal quota); a tenant under it is served
      before tenants that borrow, and reclaims lent capacity by preemption. Missing = 0.
    - ``borrowing_limit``: how far above its guarantee it may go; missing = no limit.
    - ``lending_limit``: how much of its unused guarantee others may borrow; missing = all.
    """

    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    guarantee: Amounts = Amounts()
    borrowing_limit: Amounts = Amounts()
    lending_limit: Amounts = Amounts()


class SchedulingConfig(_Config):
    ordering: Ordering = Ordering.PRIORITY
    mode: Mode = Mode.BEST_EFFORT
    placement: PlacementKind = PlacementKind.BEST_FIT
    # Aging (ordering "priority" and "fair"'s within-tenant order): a waiting task's
    # effective priority rises by this much per minute waited, by at most aging_cap.
    aging_per_minute: float = Field(0.0, ge=0, allow_inf_nan=False)
    aging_cap: float = Field(1_000_000.0, ge=0, allow_inf_nan=False)
    # Runtime assumed for a task with neither its own estimate nor a learned one
    # (sjf ranks such tasks last; backfill treats them as never ending when None).
    default_runtime_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    # Preemption.
    preemption: bool = True  # may a task that cannot fit stop preemptible running tasks
    preemptible_default: bool = False  # for tasks submitted without preemptible=...
    preempt_equal_priority: bool = False
    min_runtime_s: float = Field(0.0, ge=0, allow_inf_nan=False)  # before a task may be preempted
    preempt_grace_s: float = Field(30.0, ge=0, allow_inf_nan=False)  # SIGTERM, then this, then SIGKILL
    srtf_factor: float = Field(2.0, ge=1, allow_inf_nan=False)  # arrival must be this much shorter
    # A task stopped this many times is no longer a victim (None: no limit): without it srtf
    # stopped one long Philly job 41 times, each restart making it look long again.
    max_preemptions: int | None = Field(3, ge=0)
    # Preemptors served per pass (the rest wait for the next): each one searches every node.
    preemptions_per_pass: int = Field(64, ge=0, le=100_000)
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    within_tenant: WithinTenant = WithinTenant.PRIORITY  # fair: the order of one tenant's tasks
    # How much an elastic request (min_gpus, min_replicas) is granted: max | min | fair (scheduling.elastic).
    elastic: Elastic = Elastic.MAX
    # How many pending tasks get a reason and an estimated start published for queue views.
    explain_limit: int = Field(1000, ge=0, le=100_000)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, value: dict[str, TenantPolicy]) -> dict[str, TenantPolicy]:
        for name in value:
            if not NAME_PATTERN.match(name):
                raise ValueError(f"{name[:80]!r} is not a valid tenant ({NAME_RULE})")
        return value

    def tenant(self, name: str) -> TenantPolicy:
        return self.tenants.get(name) or _DEFAULT_TENANT

    @property
    def orders_by_time(self) -> bool:
        """The order of waiting tasks changes with time alone (aging, hrrn) and the order decides
        more than who gets capacity that just came free (strict and backfill: the head blocks or
        holds): a live dispatcher's idle wake-up may then start a task with no event. Under
        best effort a new order places nothing until capacity or tasks change."""
        return self.mode is not Mode.BEST_EFFORT and (
            self.aging_per_minute > 0 or self.ordering is Ordering.HRRN
            or (self.ordering is Ordering.FAIR and self.within_tenant is WithinTenant.HRRN))

    @property
    def in_queue_order(self) -> bool:
        """Tasks are considered in the pending queue's own order: priority, then submit order."""
        return self.ordering is Ordering.PRIORITY and self.aging_per_minute == 0

    @property
    def is_spine(self) -> bool:
        """Queue order, skip-ahead and best fit: the dispatcher's lazy planner (which reads the
        queue only as far as it gets) decides exactly as the full planner would."""
        return self.in_queue_order and self.mode is Mode.BEST_EFFORT and self.placement is PlacementKind.BEST_FIT

    @classmethod
    def parse(cls, data: Any) -> SchedulingConfig:
        """Validate ``data``; raise InvalidRequest naming each bad field."""
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as exc:
            problems = {".".join(str(p) for p in err["loc"]) or "scheduling": err["msg"].removeprefix("Value error, ")
                        for err in exc.errors(include_url=False)}
            raise InvalidRequest(problems) from None

    @classmethod
    def load(cls, path: str | Path) -> SchedulingConfig:
        """Read a TOML or JSON file (by its suffix; JSON otherwise)."""
        text, toml = Path(path).read_text(), str(path).endswith(".toml")
        try:
            data = tomllib.loads(text) if toml else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            kind = "TOML" if toml else "JSON"
            raise InvalidRequest({"scheduling": f"{path}: not valid {kind} ({exc})"}) from None
        return cls.parse(data)


_DEFAULT_TENANT = TenantPolicy()
