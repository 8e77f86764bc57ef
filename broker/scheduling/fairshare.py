"""Tenant usage for weighted dominant-resource fairness with quotas (Kueue's semantics).

Usage is counted in GPUs (a share as its fraction), CPUs and memory (MiB). A tenant's
``guarantee`` is capacity it is owed (missing = 0); above it the tenant borrows, up to
``borrowing_limit`` more (missing = no limit), and only from capacity the other tenants do
not keep: each keeps the part of its guarantee it does not lend (``guarantee -
lending_limit``, nothing when the lending limit is missing) that it is not using.
The planner adds what it places as it goes, so one pass already spreads across tenants.
"""

from __future__ import annotations

from collections.abc import Iterable

from broker.models import MILLI
from broker.scheduling.config import RESOURCES, Amounts, SchedulingConfig
from broker.scheduling.model import NodeFree, RunningTask, Vector, held

ZERO: Vector = (0.0, 0.0, 0.0)
EPSILON = 1e-9  # GPU shares are thousandths: sums of them must not fail a comparison by rounding
INF = float("inf")


def _amounts(amounts: Amounts, missing: float) -> Vector:
    values = [amounts.get(r) for r in RESOURCES]
    return (missing if values[0] is None else values[0], missing if values[1] is None else values[1],
            missing if values[2] is None else values[2])


def _fmt(value: float) -> str:
    return "unlimited" if value == INF else f"{value:.3g}" if value < 1000 else f"{value:.0f}"


class Ledger:
    """Who uses what, against the pool's capacity and each tenant's quota."""

    def __init__(self, config: SchedulingConfig, nodes: Iterable[NodeFree], running: Iterable[RunningTask]) -> None:
        self.config = config
        self.epoch = 0  # bumped on every change of usage: who borrows, and so who may be preempted, may change
        running = list(running)
        by_node: dict[str, list[float]] = {}
        self.usage: dict[str, list[float]] = {}
        for task in running:
            self.add(task.tenant, held(task))
            used = by_node.setdefault(task.node_id, [0.0, 0.0])
            used[0] += task.cpu_milli
            used[1] += task.memory_mb
        capacity = [0.0, 0.0, 0.0]
        for node in nodes:  # registered capacity, else what is free plus what runs there
            used = by_node.get(node.id, [0.0, 0.0])
            capacity[0] += len(node.free_milli)
            capacity[1] += (node.cap_cpu_milli or node.free_cpu_milli + used[0]) / MILLI
            capacity[2] += node.cap_memory_mb or node.free_memory_mb + used[1]
        self.capacity: Vector = (capacity[0], capacity[1], capacity[2])
        self.guarantee = {t: _amounts(p.guarantee, 0.0) for t, p in config.tenants.items()}
        self.borrowing = {t: _amounts(p.borrowing_limit, INF) for t, p in config.tenants.items()}
        # What each tenant never lends: guarantee - lending_limit (nothing without a lending limit).
        self.kept = {t: tuple(max(0.0, g - lend) for g, lend in zip(self.guarantee[t], _amounts(p.lending_limit, INF),
                                                                    strict=True))
                     for t, p in config.tenants.items()}

    def add(self, tenant: str, amount: Vector, sign: int = 1) -> None:
        self.epoch += 1
        usage = self.usage.setdefault(tenant, [0.0, 0.0, 0.0])
        for r in range(3):
            usage[r] += sign * amount[r]

    def remove(self, tenant: str, amount: Vector) -> None:
        self.add(tenant, amount, -1)

    def used(self, tenant: str) -> list[float]:
        return self.usage.get(tenant) or [0.0, 0.0, 0.0]

    def dominant_share(self, tenant: str) -> float:
        """The tenant's largest share of any resource, over its weight."""
        usage = self.used(tenant)
        share = max((u / c for u, c in zip(usage, self.capacity, strict=True) if c > 0), default=0.0)
        return share / self.config.tenant(tenant).weight

    def within_guarantee(self, tenant: str, amount: Vector = ZERO) -> bool:
        """Would the tenant, with ``amount`` more, still use no more than its guarantee?"""
        guarantee = self.guarantee.get(tenant, ZERO)
        return all(u + a <= g + EPSILON for u, a, g in zip(self.used(tenant), amount, guarantee, strict=True))

    def is_borrower(self, tenant: str, less: Vector = ZERO) -> bool:
        """Does the tenant (less ``less``) use more than its guarantee of some resource?"""
        guarantee = self.guarantee.get(tenant, ZERO)
        return any(u - x > g + EPSILON for u, x, g in zip(self.used(tenant), less, guarantee, strict=True))

    def borrowers(self) -> set[str]:
        return {t for t in self.usage if self.is_borrower(t)}

    def refusal(self, tenant: str, amount: Vector) -> str | None:
        """Why the tenant may not take ``amount`` more now (None: it may)."""
        usage = self.used(tenant)
        guarantee = self.guarantee.get(tenant, ZERO)
        limit = self.borrowing.get(tenant, (INF, INF, INF))
        for r, name in enumerate(RESOURCES):
            if amount[r] > 0 and usage[r] + amount[r] > guarantee[r] + limit[r] + EPSILON:
                return (f"tenant {tenant} over quota ({name} {_fmt(usage[r])} of {_fmt(guarantee[r])} guaranteed, "
                        f"borrowing limit {_fmt(limit[r])}; needs {_fmt(amount[r])} more)")
        total = [sum(u[r] for u in self.usage.values()) for r in range(3)]
        for r, name in enumerate(RESOURCES):
            if amount[r] <= 0 or usage[r] + amount[r] <= guarantee[r] + EPSILON:
                continue
            free = self.capacity[r] - total[r]
            if free < amount[r] - EPSILON:
                continue  # the pool lacks it now: a wait for capacity (a hold, a preemption), not for quota
            kept = sum(max(0.0, self.kept[t][r] - self.used(t)[r]) for t in self.kept if t != tenant)
            if free - amount[r] < kept - EPSILON:
                return (f"tenant {tenant} over quota ({name}: {_fmt(free)} free, {_fmt(kept)} kept for other "
                        f"tenants' guarantees; needs {_fmt(amount[r])})")
        return None
