"""Task logs: an attempt's stdout and stderr (its subprocesses' too) land in a file on its node,
and their last part is kept with the task for ``gpubroker logs``. Real dispatcher, worker, Redis."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker import Client, Resources, TaskState
from broker.cli import app
from broker.settings import Settings
from tests.e2e.test_faults import wait_nodes_up
from tests.support import GPUBROKER, ROOT, Processes

pytestmark = pytest.mark.e2e

TASKS = ("--tasks", "tests.tasks_for_tests")
NODE = ("--gpus", "1", "--gpu-memory-mb", "16000", "--cpus", "4", "--memory-mb", "8192", "--slots", "2")
TAIL = 4096


def start(procs: Processes, client: Client, tmp_path: Path) -> Path:
    logdir = tmp_path / "task-logs"
    procs.dispatcher()
    procs.spawn("worker-n1", "worker", "--node", "n1", *NODE, *TASKS,
                env={"GPUBROKER_TASK_LOG_DIR": str(logdir), "GPUBROKER_TASK_LOG_TAIL_BYTES": str(TAIL),
                     "GPUBROKER_TASK_LOG_FLUSH_S": "0.2"})
    wait_nodes_up(client, ["n1"])
    return logdir


def cli(settings: Settings, *args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"GPUBROKER_REDIS_URL": settings.redis_url,
                                                       "GPUBROKER_POOL": settings.pool})
    assert result.exit_code == 0, result.output
    return result.output


def test_output_of_the_task_and_its_subprocess_is_on_the_node_and_with_the_task(
        procs: Processes, settings: Settings, tmp_path: Path) -> None:
    with Client(settings=settings) as client:
        logdir = start(procs, client, tmp_path)
        task_id = client.submit("tests.chatty", resources=Resources(gpus=1)).id
        done = client.wait(task_id, 60)
        assert done.state is TaskState.SUCCEEDED
        path = logdir / f"{task_id}.1.log"
        assert done.log_files == {1: f"n1:{path}"}
        assert path.read_text().splitlines() == ["out 1", "err 1", "child 1", "end 1"]
        assert cli(settings, "logs", task_id).splitlines() == ["out 1", "err 1", "child 1", "end 1"]
        assert json.loads(cli(settings, "status", task_id, "--json"))["log_files"] == {"1": f"n1:{path}"}
        # Celery's own logging still goes to the worker's log, not the task's.
        assert f"Task tests.chatty[{task_id}] succeeded" in procs.log("worker-n1")


def test_only_the_last_part_is_kept_and_each_attempt_has_its_own_log(
        procs: Processes, settings: Settings, tmp_path: Path) -> None:
    with Client(settings=settings) as client:
        logdir = start(procs, client, tmp_path)
        task_id = client.submit("tests.chatty", kwargs={"filler": 3 * TAIL, "retry_first": True},
                                resources=Resources(gpus=1)).id
        done = client.wait(task_id, 60)
        assert done.state is TaskState.SUCCEEDED and done.result == 2
        for attempt in (1, 2):
            whole = (logdir / f"{task_id}.{attempt}.log").read_bytes()
            assert whole.startswith(f"out {attempt}\n".encode()) and whole.endswith(f"end {attempt}\n".encode())
            kept = client.logs(task_id, attempt)
            assert kept.size == len(whole) and kept.tail == whole[-TAIL:]
        shown = cli(settings, "logs", task_id, "--attempt", "1")
        assert "out 1" not in shown and shown.endswith("end 1\n") and "end 2" not in shown
        assert cli(settings, "logs", task_id).endswith("end 2\n")


def test_the_log_of_an_attempt_whose_process_was_killed_is_kept_by_the_worker(
        procs: Processes, settings: Settings, tmp_path: Path) -> None:
    with Client(settings=settings) as client:
        start(procs, client, tmp_path)
        task_id = client.submit("tests.chatty", kwargs={"killed_first": True}, resources=Resources(gpus=1),
                                max_retries=1).id
        done = client.wait(task_id, 60)
        assert done.state is TaskState.SUCCEEDED and done.result == 2
        assert client.logs(task_id, 1).tail == b"out 1\nerr 1\nchild 1\nend 1\n"  # the child could not say
        assert set(done.log_files) == {1, 2}


def test_follow_shows_output_of_a_running_task_before_it_ends(
        procs: Processes, settings: Settings, tmp_path: Path) -> None:
    with Client(settings=settings) as client:
        start(procs, client, tmp_path)
        task_id = client.submit("tests.chatty", kwargs={"lines": 40, "pause": 0.1},
                                resources=Resources(gpus=1)).id
        follower = subprocess.Popen([*GPUBROKER, "logs", task_id, "--follow", "--interval", "0.1"],
                                    stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**procs.env})
        try:
            assert follower.stdout is not None
            seen = []
            while "line 0" not in seen:
                seen.append(follower.stdout.readline().strip())
            assert not client.status(task_id).state.is_final, "output shown only once the task ended"
            rest = follower.stdout.read()  # not communicate(): it would skip what readline buffered
            follower.wait(60)
        finally:
            follower.kill()
        assert follower.returncode == 0
        assert client.status(task_id).state is TaskState.SUCCEEDED
        lines = [*seen, *rest.splitlines()]
        assert lines == ["out 1", "err 1", "child 1", *(f"line {i}" for i in range(40)), "end 1"]
