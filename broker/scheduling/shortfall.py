"""Whether some registered node could ever run a request: the submit-time check (moved out of
``broker.models`` to keep it small)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from broker.models import NodeView, Resources, selector_matches


def shortfall(resources: Resources, nodes: Sequence[NodeView]) -> dict[str, str]:
    """Why no registered node could ever run ``resources``; empty if one could (an elastic
    request: with its ``min_gpus``)."""
    matching = [n for n in nodes if selector_matches(resources.labels, n.labels)]
    if not matching:
        return {"resources.labels": f"no registered node has labels {resources.labels}"}

    least = resources.min_gpus or resources.whole_gpus  # an elastic request runs with its minimum

    def gpus_ok(n: NodeView) -> bool:
        if resources.gpus == 0:
            return True
        if resources.whole_gpus:
            return len(n.gpus) >= least and n.gpu_memory_mb >= (resources.gpu_memory_mb or 0)
        return len(n.gpus) >= 1

    def gpu_memory_ok(n: NodeView) -> bool:
        return resources.gpu_memory_mb is None or n.gpu_memory_mb >= resources.gpu_memory_mb

    checks: dict[str, tuple[Callable[[NodeView], bool], str]] = {
        "resources.gpus": (gpus_ok, f"asks {least or resources.gpus:g} GPUs on one node; the largest node has "
                           f"{max(len(n.gpus) for n in matching)}"),
        "resources.gpu_memory_mb": (gpu_memory_ok, f"asks {resources.gpu_memory_mb} MiB per GPU; the largest "
                                    f"GPU has {max(n.gpu_memory_mb for n in matching)} MiB"),
        "resources.cpus": (lambda n: n.cpus >= resources.cpus,
                           f"asks {resources.cpus:g} CPUs; the largest node has {max(n.cpus for n in matching):g}"),
        "resources.memory_mb": (lambda n: n.memory_mb >= resources.memory_mb,
                                f"asks {resources.memory_mb} MiB RAM; the largest node has "
                                f"{max(n.memory_mb for n in matching)} MiB"),
    }
    if any(all(ok(n) for ok, _ in checks.values()) for n in matching):
        return {}
    short = {field: why for field, (ok, why) in checks.items() if not any(ok(n) for n in matching)}
    return short or {"resources": "no single registered node has all of these resources together"}
