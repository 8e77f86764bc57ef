"""best_fit weighs every resource, not GPUs alone: hand-made cases where the GPU-only rule chose badly."""

from __future__ import annotations

from broker.scheduling.model import Placement
from broker.scheduling.placement.best_fit import BestFit, BestFitPlacer, fullness
from tests.scheduling.helpers import GiB, node, task


def test_whole_gpu_task_goes_where_cpu_is_short_too() -> None:
    """Both nodes have 2 whole GPUs; "cpu_poor" has 6 of 64 CPUs left. The GPU-only rule took the
    first node given ("cpu_rich"), leaving "cpu_poor"'s GPUs to a later 8-CPU task that no longer fits
    anywhere; weighing CPU fills "cpu_poor" with a 4-CPU task and keeps "cpu_rich" whole."""
    nodes = [node("cpu_rich", 2, cpus=64), node("cpu_poor", 2, cpus=6)]
    fit = BestFit(nodes)
    assert fit.place(task("small", 1, cpus=4)) == Placement("small", "cpu_poor", (0,))
    assert fit.place(task("big", 2, cpus=8)) == Placement("big", "cpu_rich", (0, 1))


def test_memory_counts() -> None:
    """Same GPUs and CPUs free; the node with less memory left is the fuller one."""
    nodes = [node("roomy", 4, ram=512 * GiB), node("full", 4, ram=64 * GiB)]
    assert BestFit(nodes).place(task("t", 1, ram=8 * GiB)) == Placement("t", "full", (0,))


def test_share_takes_the_fullest_node_then_its_best_gpu() -> None:
    """A share goes to the fuller node, onto the GPU there it fills best."""
    a, b = node("a", 2), node("b", 4)
    a.free_milli = [600, 300]
    a.free_mem = [48 * GiB, 24 * GiB]
    assert BestFit([b, a]).place(task("s", 0.25)) == Placement("s", "a", (1,))


def test_fuller_means_less_free_in_every_dimension() -> None:
    factors = (1.0, 1.0, 1.0, 1.0)
    assert fullness(node("x", 1, cpus=4), factors) < fullness(node("x", 1, cpus=8), factors)
    assert fullness(node("x", 1, ram=GiB), factors) < fullness(node("x", 1, ram=2 * GiB), factors)
    assert fullness(node("x", 1, mem=GiB), factors) < fullness(node("x", 1, mem=2 * GiB), factors)
    assert fullness(node("x", 1), factors) < fullness(node("x", 2), factors)


def test_a_view_is_judged_by_what_it_shows() -> None:
    """A backfill view with less free ranks as fuller than the same node's own copy."""
    nodes = [node("a", 2, cpus=16), node("b", 2, cpus=16)]
    placer = BestFitPlacer(nodes)
    view = nodes[1].copy()
    view.free_cpu_milli = 4000
    assert placer.choose(task("t", 1, cpus=2), {"b": view}) == Placement("t", "b", (0,))
    assert placer.choose(task("t", 1, cpus=2)) == Placement("t", "a", (0,))
