"""More of Celery's task API through the broker: replace, Reject, Ignore, a task's own base
class, class-based tasks, stamped revokes, what the request says, typed results, native joins.
(The cluster: ``tests.e2e.native_cluster``; its tasks: ``tests.tasks_for_tests``.)"""

from __future__ import annotations

import datetime
import decimal
import time
import uuid
from pathlib import Path

import pytest
from celery import group
from celery.exceptions import Reject, TaskRevokedError
from celery.result import AsyncResult
from typer.testing import CliRunner

from broker import Resources, TaskState
from tests import tasks_for_tests as t
from tests.e2e.native_cluster import GPU_NODE, Cluster
from tests.support import wait_until
from workers.app import app
from workers.cli import app as cli

pytestmark = pytest.mark.e2e


def test_replace_with_a_task_takes_its_resources_and_keeps_the_id(cluster: Cluster) -> None:
    # A CPU task replaces itself with a one-GPU task: same id, the GPU task's answer.
    result = t.replacer.delay(0, "task")
    value = result.get(timeout=30)
    status = cluster.status(result.id)
    assert value["node"] == GPU_NODE and value["cuda_visible_devices"] == str(status.gpus[0])
    assert (status.name, status.state, status.resources.gpus) == ("tests.gpu_where", TaskState.SUCCEEDED, 1)
    assert status.attempts == 2  # the replacer's attempt, then the replacement's
    assert cluster.free_gpus() == 2


def test_replace_with_a_chain_or_a_group(cluster: Cluster) -> None:
    # The last link of the chain (or the group's gather) comes under the replaced task's id.
    assert t.replacer.delay(5, "chain").get(timeout=30) == 16
    assert t.replacer.delay(3, "group").get(timeout=30) == [0, 2, 4]
    # While the chain's first link runs, the replaced task waits on no node, and says for what.
    slow = t.replacer.delay(7, "slow chain")
    waiting = wait_until(lambda: (s := cluster.status(slow.id)).replaced_by and s, 20, what="the task to be replaced")
    assert (waiting.state, waiting.node, waiting.gpus) == (TaskState.PENDING, None, [])
    assert "chain" in (waiting.replaced_by or "")
    env = {"GPUBROKER_REDIS_URL": cluster.settings.redis_url, "GPUBROKER_POOL": cluster.settings.pool}
    shown = CliRunner().invoke(cli, ["status", slow.id], env=env, terminal_width=200)
    assert "replaced by" in shown.output and "chain" in shown.output, shown.output
    assert slow.get(timeout=30) == 8
    assert cluster.status(slow.id).replaced_by is None


def test_reject_with_requeue_runs_the_task_again(cluster: Cluster, tmp_path: Path) -> None:
    result = t.rejector.delay(str(tmp_path / "flag"))
    assert result.get(timeout=30) == 2
    assert cluster.status(result.id).attempts == 2


def test_reject_as_celery_users_write_it(cluster: Cluster) -> None:
    # Requeued once: the second delivery says it was redelivered (before, it never did, and the
    # task was requeued for ever).
    once = t.reject_once.delay()
    assert once.get(timeout=30) == "second delivery"
    assert cluster.status(once.id).attempts == 2
    # Without requeue: FAILED, and get() raises the Reject, as in Celery.
    refused = t.reject_for_good.delay()
    with pytest.raises(Reject, match="not for us"):
        refused.get(timeout=30)
    assert cluster.status(refused.id).state is TaskState.FAILED


def test_a_plain_retry_without_exc_runs_again_cleanly(cluster: Cluster) -> None:
    result = t.plain_retry.delay()
    assert result.get(timeout=30) == 1
    assert cluster.status(result.id).attempts == 2
    assert "Pool callback raised exception" not in cluster.procs.log(f"worker-{GPU_NODE}")


def test_apply_and_eager_run_here_without_a_node() -> None:
    # Task.apply() runs in the caller's process, as in Celery: no broker, no node.
    assert t.add.apply((2, 3)).get() == 5
    app.conf.task_always_eager = True  # and delay() under task_always_eager
    try:
        assert t.add.delay(20, 22).get() == 42
    finally:
        app.conf.task_always_eager = False


def test_ignore_ends_the_task_and_frees_its_capacity(cluster: Cluster) -> None:
    result = t.ignorer.apply_async(resources=Resources(gpus=2))
    status = cluster.until(result.id, TaskState.CANCELLED)
    assert "Ignore" in (status.error or "")
    assert result.state == "REVOKED"
    assert cluster.free_gpus() == 2


def test_a_task_with_a_base_class_of_its_own_still_goes_through_the_broker(cluster: Cluster,
                                                                         tmp_path: Path) -> None:
    # base=Hooked (a plain celery.Task subclass): its autoretry and its on_success hook still work,
    # and the attempt is fenced, placed and released like any other.
    path = tmp_path / "hooked"
    result = t.hooked.apply_async(kwargs={"path": str(path), "fail_times": 1}, resources=Resources(gpus=1))
    assert result.get(timeout=30) == {"retries": 1, "node": GPU_NODE}
    # on_success runs after the outcome is recorded (as Celery's runs after the result is stored)
    hook = path.with_suffix(".hook")
    wait_until(lambda: hook.exists() and hook.read_text(), 10, what="the on_success hook to run")
    assert hook.read_text().startswith(result.id)
    status = cluster.status(result.id)
    assert (status.state, status.attempts, status.node) == (TaskState.SUCCEEDED, 2, GPU_NODE)
    assert cluster.free_gpus() == 2
    # A Celery 1.0-style class, registered with app.register_task.
    by_name = app.send_task("tests.class_based", (7,))
    assert by_name.get(timeout=30) == {"x": 7, "node": GPU_NODE}


def test_the_task_sees_its_eta_expiry_and_priority(cluster: Cluster) -> None:
    info = t.request_info.apply_async(countdown=1, expires=600, priority=7).get(timeout=30)
    assert info["eta"] is not None and info["expires"] is not None
    assert info["priority"] == 7


def test_results_keep_their_types(cluster: Cluster) -> None:
    value = t.typed.delay().get(timeout=30)
    assert value == {"when": datetime.datetime(2026, 12, 2, 12, 30, tzinfo=datetime.UTC), "id": uuid.UUID(int=7),
                     "amount": decimal.Decimal("1.25")}


def test_ignore_result_keeps_no_result(cluster: Cluster) -> None:
    # As in Celery: the task runs, and no result is kept (its record still says it succeeded).
    result = t.add.apply_async((20, 22), ignore_result=True)
    status = cluster.until(result.id, TaskState.SUCCEEDED)
    assert status.result is None
    assert AsyncResult(result.id, app=app).get(timeout=5) is None
    assert t.add.delay(20, 22).get(timeout=30) == 42  # the same task without it


def test_a_group_joins_natively(cluster: Cluster) -> None:
    results = group(t.add.s(i, 1) for i in range(6)).apply_async()
    assert results.supports_native_join
    assert results.join_native(timeout=30) == [1, 2, 3, 4, 5, 6]
    assert results.get(timeout=30) == [1, 2, 3, 4, 5, 6]


def test_a_failed_link_fails_the_rest_of_the_chain(cluster: Cluster) -> None:
    chained = (t.boom.s("first link") | t.add.s(1)).delay()
    with pytest.raises(RuntimeError, match="first link"):
        chained.get(timeout=30)


def test_revoke_by_stamped_headers_cancels_in_the_broker(cluster: Cluster) -> None:
    # The worker drops a message whose stamp was revoked; the broker cancels its task and
    # releases the GPUs it was reserved.
    app.control.revoke_by_stamped_headers({"batch": "doomed"}, terminate=False)
    time.sleep(0.5)  # the workers hear the broadcast
    signature = t.gpu_where.s().set(resources=Resources(gpus=2))
    signature.stamp(batch="doomed")
    result = signature.apply_async()
    status = cluster.until(result.id, TaskState.CANCELLED, timeout=30)
    assert status.started_at is None
    with pytest.raises(TaskRevokedError):
        result.get(timeout=5)
    wait_until(lambda: cluster.free_gpus() == 2, 10, what="the GPUs to be released")
