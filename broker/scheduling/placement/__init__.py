"""Placement: where one task goes. One module per placer, listed in ``PLACERS``.

A new placer is a module here implementing ``base.Placer`` (read ``base.py`` for the contract
and the shared pieces) and one entry in ``PlacementKind`` and ``PLACERS`` below.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping

from broker.scheduling.model import GpuKind, NodeFree
from broker.scheduling.placement.base import Placer
from broker.scheduling.placement.best_fit import BestFitPlacer
from broker.scheduling.placement.first_fit import FirstFitPlacer
from broker.scheduling.placement.frag_aware import FragAware
from broker.scheduling.placement.spread import SpreadPlacer


class PlacementKind(enum.StrEnum):
    BEST_FIT = "best_fit"  # pack: fullest node / GPU that still fits
    SPREAD = "spread"  # least-loaded node first
    FIRST_FIT = "first_fit"  # first node (by id) and lowest GPU index that fits
    FRAG_AWARE = "frag_aware"  # least fragmentation for the observed request mix (FGD, ATC '23)


Mix = Mapping[GpuKind, int]  # GPU kind -> tasks submitted of that kind (frag_aware's expected mix)

#: kind -> a fresh placer over a copy of the nodes, given the pool's request mix.
PLACERS: dict[PlacementKind, Callable[[Iterable[NodeFree], Mix], Placer]] = {
    PlacementKind.BEST_FIT: lambda nodes, mix: BestFitPlacer(nodes),
    PlacementKind.SPREAD: lambda nodes, mix: SpreadPlacer(nodes),
    PlacementKind.FIRST_FIT: lambda nodes, mix: FirstFitPlacer(nodes),
    PlacementKind.FRAG_AWARE: FragAware,
}


def make_placer(kind: PlacementKind | str, nodes: Iterable[NodeFree], mix: Mix | None = None) -> Placer:
    """A fresh placer of ``kind`` over a copy of ``nodes``; ``mix`` feeds frag_aware."""
    try:
        kind = PlacementKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in PlacementKind)
        raise ValueError(f"placement: unknown kind {kind!r} (one of {known})") from None
    return PLACERS[kind](nodes, mix or {})
