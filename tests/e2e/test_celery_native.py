"""Celery's own API, end to end: what a Celery user writes runs through the broker
(the cluster: ``tests.e2e.native_cluster``)."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord, group
from celery.exceptions import TaskRevokedError

from broker import Resources, TaskState
from broker.celery_conf import celery_settings
from broker.errors import NotRegistered
from broker.native.app import GpuCelery
from broker.store.keys import PoolKeys
from tests import tasks_for_tests as t
from tests.e2e.native_cluster import CPU_NODE, GPU_NODE, GRACE_S, POOL, Cluster
from tests.e2e.test_flower import PASSWORD, USER, FlowerApi, start_flower
from tests.support import ROOT, Processes, wait_until
from workers.app import app

pytestmark = pytest.mark.e2e

# ---- calling tasks ----------------------------------------------------------------------------

def test_delay_runs_with_the_decorators_resources_and_get_returns_the_result(cluster: Cluster) -> None:
    result = t.gpu_where.delay()
    value = result.get(timeout=30)
    assert result.state == "SUCCESS" and result.successful()
    status = cluster.status(result.id)
    # The decorator's defaults: one whole GPU, tenant vision, priority 5; the task saw only it.
    assert (status.resources.gpus, status.tenant, status.priority) == (1, "vision", 5)
    assert value == {"node": GPU_NODE, "cuda_visible_devices": str(status.gpus[0])}
    assert status.state is TaskState.SUCCEEDED and status.result == value

    # apply_async overrides them per call; a plain task's .delay asks for no GPU.
    two = t.gpu_where.apply_async(resources=Resources(gpus=2), priority=7, tenant="nlp")
    assert sorted(int(g) for g in two.get(timeout=30)["cuda_visible_devices"].split(",")) == [0, 1]
    assert (cluster.status(two.id).priority, cluster.status(two.id).tenant) == (7, "nlp")
    assert t.add.delay(2, 3).get(timeout=30) == 5
    assert cluster.status(t.add.delay(1, 1).id).resources.gpus == 0

    # send_task by name takes the defaults the serving worker registered for it.
    by_name = app.send_task("tests.gpu_where")
    assert by_name.get(timeout=30)["node"] == GPU_NODE
    assert (cluster.status(by_name.id).resources.gpus, cluster.status(by_name.id).tenant) == (1, "vision")
    # AsyncResult by id, from nothing but the id.
    assert app.AsyncResult(result.id).get(timeout=5) == value


def test_apply_async_and_send_task_take_elastic_requests(cluster: Cluster) -> None:
    """min_gpus rides in resources, min_replicas beside replicas: the 2-GPU node grants what fits."""
    wide = t.gpu_where.apply_async(resources=Resources(gpus=8, min_gpus=1))
    assert sorted(wide.get(timeout=30)["cuda_visible_devices"].split(",")) == ["0", "1"]
    assert cluster.status(wide.id).resources.min_gpus == 1 and len(cluster.status(wide.id).gpus) == 2
    gang = app.send_task("tests.gpu_where", resources=Resources(gpus=1), replicas=4, min_replicas=1)
    assert gang.get(timeout=30)["node"] == GPU_NODE
    members = cluster.status(gang.id).members
    assert members is not None and len(members) == 2  # one per GPU of the one GPU node


def test_a_failure_raises_the_tasks_exception_with_its_traceback(cluster: Cluster) -> None:
    result = t.boom.delay("bad input")
    with pytest.raises(RuntimeError, match="bad input"):
        result.get(timeout=30)
    assert result.state == "FAILURE" and result.failed()
    assert "RuntimeError" in (result.traceback or "") and "tasks_for_tests.py" in (result.traceback or "")
    assert cluster.status(result.id).state is TaskState.FAILED
    # propagate=False hands the exception back instead.
    assert isinstance(result.get(timeout=5, propagate=False), RuntimeError)


def test_unknown_and_unplaceable_tasks_are_refused_at_the_call(cluster: Cluster) -> None:
    with pytest.raises(NotRegistered, match=r"tests\.nope"):
        app.send_task("tests.nope")
    with pytest.raises(ValueError, match="gpus"):
        t.add.apply_async((1, 2), resources=Resources(gpus=8))


def test_a_task_runs_only_on_a_node_that_has_it(cluster: Cluster) -> None:
    # nat-gpu's four slots are busy; nat-cpu is idle but does not run tests.add: it waits.
    # The fillers run long enough that a slow machine still checks while all four hold their slots.
    fillers = [t.sleeper.delay(6) for _ in range(4)]
    for f in fillers:
        cluster.until(f.id, TaskState.RUNNING)
    waiting = t.add.delay(20, 22)
    time.sleep(1)
    assert cluster.status(waiting.id).state is TaskState.PENDING
    assert all(cluster.status(f.id).state is TaskState.RUNNING for f in fillers), "checked while nat-gpu was full"
    assert waiting.get(timeout=30) == 42
    assert cluster.status(waiting.id).node == GPU_NODE
    # A task both nodes run goes to whichever is free.
    probe = app.send_task("workers.tasks.probe", kwargs={"seconds": 0})
    probe.get(timeout=30)
    assert cluster.status(probe.id).node in (GPU_NODE, CPU_NODE)
    for f in fillers:
        f.get(timeout=30)


# ---- canvas -----------------------------------------------------------------------------------

def test_chain_group_chord_and_links(cluster: Cluster) -> None:
    assert chain(t.add.s(1, 2), t.add.s(10), t.add.s(100)).apply_async().get(timeout=60) == 113
    assert group(t.add.s(i, i) for i in range(4)).apply_async().get(timeout=60) == [0, 2, 4, 6]
    assert chord((t.add.s(i, i) for i in range(4)), t.tsum.s()).apply_async().get(timeout=60) == 12

    # link: the callback gets the result; link_error: the errback gets the failed task's id.
    callback_id, errback_id = f"cb-{time.time_ns()}", f"eb-{time.time_ns()}"
    parent = t.add.apply_async((1, 1), link=t.add.s(100).set(task_id=callback_id))
    assert parent.get(timeout=30) == 2
    assert app.AsyncResult(callback_id).get(timeout=30) == 102
    failed = t.boom.apply_async(link_error=t.echo.s().set(task_id=errback_id))
    assert app.AsyncResult(errback_id).get(timeout=30) == failed.id
    assert failed.state == "FAILURE"


# ---- retries, countdown, ETA, expiry ----------------------------------------------------------

def test_retry_waits_its_countdown_holding_nothing(cluster: Cluster) -> None:
    started = time.time()
    result = t.flaky.delay(2, countdown=1.5)
    # Between attempts: Celery's RETRY state; the broker's task waits, on no node, not before then.
    seen = wait_until(lambda: (s := cluster.status(result.id)).retried and s, 30, 0.02, what="a retry")
    assert seen.state is TaskState.PENDING and seen.node is None
    assert seen.not_before is not None and seen.not_before > time.time() - 0.5
    assert "not yet" in (seen.retry_reason or "")
    assert result.state == "RETRY"
    value = result.get(timeout=30)
    assert value["retries"] == 2
    assert value["at"] - started >= 3.0  # two 1.5 s countdowns
    assert cluster.status(result.id).state is TaskState.SUCCEEDED

    # autoretry_for with backoff: succeeds on the second retry; gives up past max_retries.
    assert t.autoretry.delay(2).get(timeout=30) == 2
    with pytest.raises(ValueError, match="attempt 2 fails"):
        t.autoretry.delay(5).get(timeout=30)


def test_countdown_and_eta_hold_no_gpu_until_due(cluster: Cluster) -> None:
    submitted = time.time()
    later = t.gpu_where.apply_async(countdown=3, resources=Resources(gpus=2))
    eta = t.add.apply_async((1, 2), eta=datetime.now(UTC) + timedelta(seconds=2))
    time.sleep(1)
    status = cluster.status(later.id)
    assert status.state is TaskState.PENDING and status.node is None
    assert status.not_before == pytest.approx(submitted + 3, abs=1)
    assert cluster.free_gpus() == 2  # nothing reserved for it meanwhile
    assert eta.get(timeout=30) == 3
    assert later.get(timeout=30)["node"] == GPU_NODE
    assert (cluster.status(later.id).reserved_at or 0) >= submitted + 2.9
    assert (cluster.status(eta.id).reserved_at or 0) >= submitted + 1.9


def test_an_expired_task_is_revoked_unrun(cluster: Cluster) -> None:
    result = t.add.apply_async((1, 2), countdown=5, expires=1)
    status = cluster.until(result.id, TaskState.CANCELLED, timeout=10)
    assert status.started_at is None
    assert result.state == "REVOKED"
    with pytest.raises(TaskRevokedError):
        result.get(timeout=5)


# ---- revoke ------------------------------------------------------------------------------------

def test_revoke_a_waiting_task_and_terminate_a_running_one(cluster: Cluster) -> None:
    waiting = t.add.apply_async((1, 2), countdown=30)
    waiting.revoke()
    assert cluster.until(waiting.id, TaskState.CANCELLED, timeout=5).started_at is None
    assert waiting.state == "REVOKED"

    running = t.sleeper.apply_async((60,), resources=Resources(gpus=2))
    cluster.until(running.id, TaskState.RUNNING)
    assert cluster.free_gpus() == 0
    stopped_at = time.time()
    running.revoke(terminate=True)
    cluster.until(running.id, TaskState.CANCELLED, timeout=15)
    assert time.time() - stopped_at < 10
    assert cluster.free_gpus() == 2
    assert running.state == "REVOKED"


def test_a_plain_celery_app_revokes_a_task_that_ignores_sigterm(cluster: Cluster) -> None:
    # Revoke from an app that knows nothing of gpubroker: the workers' remote control cancels it
    # in the broker; the task ignores SIGTERM, so SIGKILL follows after the grace period.
    running = t.stubborn.apply_async((60,), resources=Resources(gpus=2))
    # Once it ignores SIGTERM (RUNNING alone is before its first line: one run of the merged
    # suite revoked it there, and SIGTERM stopped it at once).
    wait_until(lambda: cluster.status(running.id).progress_state == "IGNORING_SIGTERM", 30,
               what="the task to ignore SIGTERM")
    plain = Celery("plain", broker=cluster.settings.redis_url)
    try:
        revoked_at = time.time()
        plain.control.revoke(running.id, terminate=True)
        done = cluster.until(running.id, TaskState.CANCELLED, timeout=20)
    finally:
        plain.close()
    assert time.time() - revoked_at >= GRACE_S - 0.5  # it outlived SIGTERM until the grace ran out
    assert done.result is None
    assert cluster.free_gpus() == 2
    # The GPUs went to the next task only after the process was gone.
    nxt = t.gpu_where.apply_async(resources=Resources(gpus=2))
    assert nxt.get(timeout=30)["node"] == GPU_NODE


# ---- what a running task says of itself -------------------------------------------------------

def test_update_state_progress_is_visible_to_asyncresult_and_status(cluster: Cluster) -> None:
    result = t.progress.delay(6, 0.3)
    seen: list[int] = []

    def step() -> bool:
        if result.state == "PROGRESS":
            seen.append(result.info["step"])
        return len(set(seen)) >= 2

    wait_until(step, 20, 0.05, what="two PROGRESS updates")
    status = cluster.status(result.id)
    assert status.state is TaskState.RUNNING and status.progress_state == "PROGRESS"
    assert status.progress["of"] == 6
    assert seen == sorted(seen)
    assert result.get(timeout=30) == 6


def test_result_expires_is_how_long_the_record_is_kept(cluster: Cluster) -> None:
    keys = PoolKeys(POOL)
    default = t.add.delay(1, 1)
    default.get(timeout=30)
    assert cluster.redis.pttl(keys.task(default.id)) / 1000 == pytest.approx(86400, abs=60)
    # A Celery user's own result_expires setting.
    own = GpuCelery("own", set_as_current=False)
    own.conf.update(celery_settings(cluster.settings))
    own.conf.result_expires = 120
    try:
        result = own.send_task("tests.add", (2, 2))
        assert result.get(timeout=30) == 4
        assert cluster.redis.pttl(keys.task(result.id)) / 1000 == pytest.approx(120, abs=10)
    finally:
        own.close()


def test_rate_limit_spaces_starts_across_the_pool(cluster: Cluster) -> None:
    results = [t.limited.delay() for _ in range(5)]
    # While they wait, the queue says why.
    reasons = wait_until(lambda: [e.reason for e in cluster.client.queue() if e.name == "tests.limited"
                                  and "rate" in (e.reason or "")], 10, 0.05, what="a rate-limited reason")
    assert "rate limited" in reasons[0]
    for r in results:
        r.get(timeout=30)
    reserved = sorted(cluster.status(r.id).reserved_at or 0 for r in results)
    # 2/s with a burst of 2: k + 1 reservations span at least (k - 1) / 2 s.
    spans = [reserved[i + 2] - reserved[i] for i in range(len(reserved) - 2)]
    assert min(spans) >= 0.45, spans
    assert reserved[-1] - reserved[0] >= 1.45, reserved


# ---- producers and schedulers that are not gpubroker's ----------------------------------------

def test_a_plain_celery_apps_tasks_are_taken_in(cluster: Cluster) -> None:
    plain = Celery("plain", broker=cluster.settings.redis_url)
    try:
        sent = plain.send_task("tests.add", (40, 2))
        unknown = plain.send_task("tests.nope", (1,))
    finally:
        plain.close()
    done = cluster.until(sent.id, TaskState.SUCCEEDED, timeout=30)
    assert done.result == 42 and done.node == GPU_NODE
    assert app.AsyncResult(sent.id).get(timeout=5) == 42
    failed = app.AsyncResult(unknown.id)
    wait_until(lambda: failed.state == "FAILURE", 30, 0.1, what="the unknown task to fail")
    assert "tests.nope" in str(failed.result)


def test_beat_sends_its_schedule_through_the_broker(cluster: Cluster, tmp_path: Path) -> None:
    notes = tmp_path / "beat-notes"
    log = (tmp_path / "beat.log").open("ab")
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.beat_for_tests", "beat", "-s", str(tmp_path / "schedule"),
         "--loglevel", "INFO"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        env={**cluster.procs.env, "GPUBROKER_TEST_BEAT_FILE": str(notes)}, start_new_session=True)
    try:
        wait_until(lambda: notes.exists() and len(notes.read_text().split()) >= 3, 30, 0.2,
                   what=f"beat's tasks to run ({(tmp_path / 'beat.log').read_text(errors='replace')[-600:]})")
    finally:
        Processes.kill(beat, 15)
    ids = notes.read_text().split()
    assert len(set(ids)) == len(ids), "each beat tick ran once"
    for task_id in ids:
        status = cluster.status(task_id)
        assert (status.name, status.state, status.attempts) == ("tests.note", TaskState.SUCCEEDED, 1)


# ---- Flower -----------------------------------------------------------------------------------

def _post(flower: FlowerApi, path: str) -> int:
    request = urllib.request.Request(flower.base + path, method="POST", data=b"")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(response.status)


def test_flower_shows_the_broker_fields_a_preemption_as_retry_and_revokes(cluster: Cluster,
                                                                          tmp_path: Path) -> None:
    flower = start_flower(cluster.procs)
    wait_until(lambda: len([w for w, alive in (flower.json("/api/workers?status=true") or {}).items() if alive]) == 2,
               30, 0.2, what="Flower to see both workers")

    # The task page carries where the broker placed it. Workers send task events once Flower asks
    # for them (enable_events, every 5 s), as Celery's do: run the task until Flower sees one end.
    def shown() -> tuple[Any, dict[str, Any]] | None:
        placed = t.gpu_where.delay()
        placed.get(timeout=30)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            info = flower.task(placed.id)
            if info and info.get("state") == "SUCCESS" and info.get("node"):
                return placed, info
            time.sleep(0.2)
        return None

    placed, info = wait_until(shown, 60, 0, what="Flower's task page with the broker's fields")
    status = cluster.status(placed.id)
    # gpus as the task saw them in CUDA_VISIBLE_DEVICES.
    assert (info["node"], info["gpus"], info["tenant"]) == (GPU_NODE, ",".join(map(str, status.gpus)), "vision")

    # A preempted attempt is a retry, not a failure.
    victim = t.checkpointed.apply_async((3, str(tmp_path / "ckpt")), resources=Resources(gpus=2), priority=0,
                                        preemptible=True)
    cluster.until(victim.id, TaskState.RUNNING)
    time.sleep(0.5)
    urgent = t.gpu_where.apply_async(resources=Resources(gpus=2), priority=10)
    urgent.get(timeout=30)
    assert victim.get(timeout=60)["attempt"] == 2
    assert cluster.status(victim.id).preemptions == 1
    seen = wait_until(lambda: (i := flower.task(victim.id)) and i.get("state") == "SUCCESS" and i, 20, 0.2,
                      what="Flower to see the victim succeed")
    assert seen.get("retried") and not seen.get("failed"), seen

    # Flower's Terminate button cancels through the broker and frees the GPUs.
    running = t.sleeper.apply_async((60,), resources=Resources(gpus=2))
    cluster.until(running.id, TaskState.RUNNING)
    assert _post(flower, f"/api/task/revoke/{running.id}?terminate=true") == 200
    cluster.until(running.id, TaskState.CANCELLED, timeout=15)
    assert cluster.free_gpus() == 2
