"""Runtime settings: one pydantic-settings model, read from ``GPUBROKER_*`` at the edge."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.errors import ConfigError
from broker.models import NAME_PATTERN, NAME_RULE
from broker.redis_urls import check as check_url
from broker.scheduling.config import SchedulingConfig

#: What ``handoff`` also takes, as earlier versions did (a boolean).
HANDOFF_WORDS = {"true": "always", "on": "always", "1": "always", "yes": "always",
                 "false": "never", "off": "never", "0": "never", "no": "never"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPUBROKER_", extra="ignore")

    # redis://, rediss:// (TLS) or redis+sentinel://sentinel:26379[,...]/<service>[/<db>] (broker.redis_urls).
    redis_url: str = "redis://127.0.0.1:6379/0"
    pool: str = "default"
    # Pools on other Redis deployments: pool -> its URL (GPUBROKER_POOL_URLS='{"b": "redis://..."}');
    # a pool not listed is on redis_url. Every process of a pool must be given the same map.
    pool_urls: dict[str, str] = Field(default_factory=dict)
    # Replicas that must confirm (Redis WAIT) a submit, reserve, start, finish or cancel before it
    # counts as done; 0: none (Redis replication is asynchronous, a failover may lose the last writes).
    min_replicas_ack: int = Field(0, ge=0)
    # How long a write waits for those replicas before it fails with ReplicasNotConfirmed.
    replicas_ack_timeout_s: float = Field(2.0, gt=0)
    # A node whose worker has not heartbeated for lease_s is reaped and its tasks requeued.
    lease_s: float = Field(15.0, gt=0)
    heartbeat_s: float = Field(3.0, gt=0)
    # A running attempt whose node has not renewed its lease for lease_s minus this stops itself
    # (SIGTERM, then SIGKILL half of it later), so it never runs beside its requeued successor
    # (workers/fence.py). None (or an empty GPUBROKER_SELF_FENCE_MARGIN_S): a quarter of lease_s.
    self_fence_margin_s: float | None = Field(None, gt=0)
    # Submitted messages (args + kwargs as Celery encodes them) above this are refused.
    max_payload_bytes: int = Field(1024 * 1024, gt=0)
    # How many pending tasks one dispatcher cycle looks at, and placements per reserve call.
    dispatch_window: int = Field(10_000, gt=0)
    commit_batch: int = Field(500, gt=0, le=5000)
    # A node down (lease expired) for this long is removed from the pool (gpubroker nodes remove does
    # it at once): it no longer shows in `nodes` nor counts for the submit-time fit check.
    node_forget_after_s: float = Field(3600.0, gt=0)
    # Longest a dispatcher sleeps without a wake-up before it reaps expired leases anyway.
    reap_interval_s: float = Field(2.0, gt=0)
    # kombu only restores unacked messages after this; the lease reaper recovers first,
    # so long GPU tasks are never redelivered by kombu (celery#5935). Workers keep no unacked
    # copy of a node queue's messages (workers.rejects.NodeQoS): it applies to copies an older
    # worker version left, and to plain Celery queues on the same Redis.
    visibility_timeout_s: int = Field(30 * 24 * 3600, gt=0)
    socket_timeout_s: float = Field(5.0, gt=0)
    # Ordering, placement and preemption (GPUBROKER_SCHEDULING='{"ordering": "fair", ...}').
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig)
    # The dispatcher serves Prometheus metrics on this port (0: not at all); 9808, not 9100
    # (node_exporter's). A port already taken is logged, not fatal.
    metrics_port: int = Field(9808, ge=0, le=65535)
    # How often (at most) the dispatcher publishes each pending task's reason and estimated start.
    explain_interval_s: float = Field(1.0, gt=0)
    # On the spine's scheduling, an attempt that ends may pass its reservation at once to the head
    # of the queue when that asks exactly the same (finish.lua, _handoff.lua): a stream of like
    # tasks then needs no dispatcher cycle per task. auto: while tasks wait for capacity (the
    # place best fit would choose); always (true): whenever; never (false): the dispatcher
    # makes every placement (broker.handoff).
    handoff: Literal["auto", "always", "never"] = "auto"
    # On the spine's scheduling, a dispatcher whose last cycle left nothing waiting places the tasks
    # submitted since from their wake-ups alone, in one round trip (broker.express); false: in a cycle.
    express: bool = True
    # A finished task's record (and its idempotency key) is kept this long, as Celery's
    # result_expires; 0 keeps it for good.
    result_expires_s: float = Field(86400.0, ge=0)
    # A cancelled running task gets SIGTERM, then SIGKILL after this many seconds.
    cancel_grace_s: float = Field(10.0, ge=0)
    # Each attempt's stdout and stderr (its subprocesses' too) go to <task_log_dir>/<task id>.<attempt>.log
    # on its node ("": gpubroker-task-logs in the temporary directory). The last task_log_tail_bytes of it
    # are kept with the task (`gpubroker logs`), refreshed at most every task_log_flush_s while it runs.
    task_log_dir: str = ""
    task_log_tail_bytes: int = Field(64 * 1024, gt=0, le=16 * 1024 * 1024)
    task_log_flush_s: float = Field(2.0, gt=0)
    # A gang member's code starts only once every member has started (workers.gang); a member
    # still waiting after this many seconds fails its attempt.
    gang_barrier_timeout_s: float = Field(60.0, gt=0)
    # When one member of a gang ends (fails, is lost), the others get SIGTERM, then SIGKILL after this.
    gang_stop_grace_s: float = Field(5.0, ge=0)
    # A warm pool process (a CPU task's, or a reuse=True GPU task's) exits after this many tasks,
    # or once it uses more than this much memory (MiB, resident) after a task; None (or empty): no limit.
    max_tasks_per_process: int | None = Field(None, gt=0)
    max_memory_per_process_mb: int | None = Field(None, gt=0)
    # Workers publish which GPU sets their warm processes hold and the task name each ran last, and the
    # dispatcher sends a task of that name there when the set is free (warm affinity); false: they do not.
    warm_affinity: bool = True
    # Lists where Celery producers that do not use these settings publish (task_default_queue):
    # the dispatcher moves what lands there into the pool, so a task sent past the broker still runs.
    ingest_queues: list[str] = Field(default_factory=lambda: ["celery"])

    def __init__(self, **values: Any) -> None:
        """Raises ConfigError naming each bad setting and its environment variable."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(_problems(exc)) from None

    @property
    def fence_margin_s(self) -> float:
        return self.self_fence_margin_s if self.self_fence_margin_s is not None else self.lease_s / 4

    @model_validator(mode="after")
    def _lease_fits(self) -> Settings:
        if self.fence_margin_s >= self.lease_s:
            raise ValueError(f"self_fence_margin_s ({self.fence_margin_s:g}) must be shorter than lease_s "
                             f"({self.lease_s:g})")
        if self.heartbeat_s >= self.lease_s - self.fence_margin_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s:g}) must be shorter than lease_s minus the fence "
                             f"margin ({self.lease_s - self.fence_margin_s:g} s), or running tasks would stop "
                             "themselves between two renewals")
        return self

    @field_validator("self_fence_margin_s", "max_tasks_per_process", "max_memory_per_process_mb", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def url(self) -> str:
        """The Redis URL of this pool: its entry in ``pool_urls``, else ``redis_url``."""
        return self.pool_urls.get(self.pool, self.redis_url)

    def for_pool(self, pool: str) -> Settings:
        """These settings for another pool (on its own Redis when ``pool_urls`` says so)."""
        return Settings(**{**self.model_dump(), "pool": pool})

    @field_validator("handoff", mode="before")
    @classmethod
    def _handoff_words(cls, value: object) -> object:
        """true/false (and on/off, 1/0, yes/no) as earlier versions took them: always/never."""
        word = str(value).strip().lower() if isinstance(value, str | bool) else value
        return HANDOFF_WORDS.get(word, word) if isinstance(word, str) else word

    @field_validator("redis_url")
    @classmethod
    def _url_form(cls, value: str) -> str:
        return check_url(value)

    @field_validator("pool_urls")
    @classmethod
    def _pool_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for pool, url in value.items():
            if not NAME_PATTERN.match(pool):
                raise ValueError(f"pool name {pool!r}: {NAME_RULE}")
            try:
                check_url(url)
            except ValueError as exc:
                raise ValueError(f"pool {pool!r}: {exc}") from None
        return value

    @field_validator("pool")
    @classmethod
    def _pool_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(NAME_RULE)
        return value


def _problems(exc: ValidationError) -> dict[str, str]:
    """Each bad setting as ``field (GPUBROKER_FIELD)`` -> reason; never its value (it may be a password)."""
    problems = {}
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        field = f"{'.'.join(loc)} (GPUBROKER_{loc[0].upper()})" if loc else "settings"
        problems[field] = error["msg"].removeprefix("Value error, ")
    return problems


def redacted_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc or ":" not in parts.netloc.rpartition("@")[0]:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
