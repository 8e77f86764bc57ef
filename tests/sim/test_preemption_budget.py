"""The simulator's checkpoint model and the preemption budget, end to end through the real dispatcher."""

from __future__ import annotations

from broker.scheduling.config import SchedulingConfig
from broker.sim.report import metrics
from broker.sim.traces import TraceJob
from tests.sim.test_sim import ONE_GPU, run, timeline
from tests.support import RedisServer


def test_a_preempted_job_resumes_from_its_last_checkpoint(redis_server: RedisServer) -> None:
    """"low" runs 0-25 s, checkpointing every 10 s: 20 s are kept, 5 redone. Stopped at 25 for
    "high" (25-45), it resumes with 80 s left and ends at 125, not 145 as from scratch."""
    jobs = [TraceJob("low", 0, 100, gpus=1, preemptible=True, checkpoint_interval_s=10),
            TraceJob("high", 25, 20, gpus=1, priority=10)]
    result = run(redis_server, jobs, ONE_GPU, SchedulingConfig(preemption=True))
    assert timeline(result) == {"low": (0, 125, (0,)), "high": (25, 45, (0,))}
    low = result.jobs[0]
    assert (low.preemptions, low.saved_s, low.lost_s) == (1, 20, 5)
    figures = metrics(result)
    assert (figures["preempted_max"], figures["lost_gpu_h"]) == (1, 5 / 3600)


def test_without_checkpoints_the_whole_run_is_redone(redis_server: RedisServer) -> None:
    jobs = [TraceJob("low", 0, 100, gpus=1, preemptible=True), TraceJob("high", 25, 20, gpus=1, priority=10)]
    result = run(redis_server, jobs, ONE_GPU, SchedulingConfig(preemption=True))
    assert timeline(result)["low"] == (0, 145, (0,))
    assert (result.jobs[0].saved_s, result.jobs[0].lost_s) == (0, 25)


def test_a_job_is_preempted_at_most_max_preemptions_times(redis_server: RedisServer) -> None:
    """Four urgent jobs arrive while "low" runs; with a budget of 2, the third and fourth wait for it."""
    jobs = [TraceJob("low", 0, 100, gpus=1, preemptible=True)]
    jobs += [TraceJob(f"high{i}", 10 + 30 * i, 5, gpus=1, priority=10) for i in range(4)]
    unlimited = run(redis_server, jobs, ONE_GPU, SchedulingConfig(preemption=True, max_preemptions=None))
    assert unlimited.jobs[0].preemptions == 4
    budget = run(redis_server, jobs, ONE_GPU, SchedulingConfig(preemption=True, max_preemptions=2))
    assert budget.jobs[0].preemptions == 2
    assert metrics(budget)["preempted_max"] == 2
