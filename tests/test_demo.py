"""``gpubroker demo``: the workload and summary (pure), and the whole demo end to end.

The end-to-end test runs the demo as a user would, with its own private redis-server,
and then checks that nothing it started is still running: not the process groups it
printed, and no process whose command line or environment names the demo's Redis port.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.cli.demo import NODES, SHAPES, summarize, workload
from broker.models import Resources, TaskState, TaskStatus
from tests.support import GPUBROKER, ROOT

# ---- pure -----------------------------------------------------------------------------------


def test_workload_is_mixed_and_reproducible() -> None:
    jobs = workload(15)
    assert jobs == workload(15)
    gpus = {job.resources.gpus for job in jobs}
    assert {1, 2, 4, 8, 0.25, 0.5, 0} <= gpus
    assert len({job.tenant for job in jobs}) >= 3
    assert len({job.priority for job in jobs}) >= 2
    assert any(job.resources.labels for job in jobs)
    assert all(0.2 <= job.seconds <= 2.0 for job in jobs)


def test_every_label_selector_names_a_demo_node_label() -> None:
    node_labels = {opts[opts.index("--label") + 1] for opts in NODES.values()}
    for kind, resources in SHAPES:
        assert all(f"{k}={v}" in node_labels for k, v in resources.labels.items()), kind


def _status(gpus: float, submitted: float, reserved: float, started: float, finished: float) -> TaskStatus:
    return TaskStatus(id=f"t{submitted}", name="workers.tasks.probe", state=TaskState.SUCCEEDED, tenant="a",
                      priority=0, resources=Resources(gpus=gpus), submitted_at=submitted, reserved_at=reserved,
                      started_at=started, finished_at=finished)


def test_summary_counts_fractional_shares_by_their_fraction() -> None:
    statuses = [_status(2, 100, 100.5, 101, 105), _status(0.5, 100, 102, 103, 110), _status(0, 101, 101, 101, 102)]
    summary = summarize(statuses, total_gpus=4)
    assert summary.by_state == {"SUCCEEDED": 3}
    assert summary.wait_s == [1, 3, 0]
    assert summary.runtime_s == [4, 7, 1]
    assert summary.makespan_s == 10  # 100 -> 110
    assert summary.gpu_seconds_used == pytest.approx(2 * 4 + 0.5 * 7)
    assert summary.utilisation == pytest.approx(11.5 / 40)


# ---- end to end -----------------------------------------------------------------------------


def _proc_fields(pid: str) -> tuple[int, str, bytes, bytes] | None:
    """(process group, state, cmdline, environ) of a live process, or None if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except PermissionError:
            environ = b""
        return int(fields[2]), fields[0], cmdline, environ
    except (OSError, IndexError, ValueError):
        return None


def leftovers(pgids: set[int], redis_port: str) -> list[str]:
    found = []
    needle = f"127.0.0.1:{redis_port}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        info = _proc_fields(pid)
        if info is None or info[1] == "Z" or int(pid) == os.getpid():
            continue
        pgid, _, cmdline, environ = info
        if pgid in pgids or needle in cmdline or needle in environ:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid} (pgid {pgid}): {command}")
    return found


@pytest.mark.e2e
def test_demo_runs_the_mixed_workload_and_leaves_nothing_running(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUBROKER_", "FLOWER_"))}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="200")
    t0 = time.monotonic()
    command = [*GPUBROKER, "demo", "--no-live", "--tasks", "15", "--timeout", "240"]
    proc = subprocess.run(command, check=False, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-5000:]
    assert "15/15 tasks succeeded" in out, out[-3000:]
    assert re.search(r"tasks SUCCEEDED\s*│\s*15/15", out), out[-3000:]
    assert "GPU utilisation" in out
    assert re.search(r"http://127\.0\.0\.1:\d+\s+\(basic auth admin:gpubroker\)", out)

    pgids = {int(pid) for pid in re.findall(r"started \S+\s+pid (\d+)", out)}
    assert len(pgids) == 2 + len(NODES) + 1, out[:2000]  # redis, dispatcher, nodes, flower
    port = re.search(r"Redis redis://127\.0\.0\.1:(\d+)/", out)
    assert port, out[:2000]
    assert leftovers(pgids, port.group(1)) == []
    assert list(tmp_path.glob(".demo/*/worker-h100x8.log")), "logs go to .demo/ under the working directory"
    print(f"demo took {time.monotonic() - t0:.1f}s")


@pytest.mark.e2e
@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["ctrl-c", "started-with-sigint-ignored"])
def test_demo_keep_leaves_the_cluster_up_until_ctrl_c_then_stops_everything(tmp_path: Path,
                                                                            sigint_ignored: bool) -> None:
    """Also when started as a shell's background job, which inherits SIGINT ignored (CI's make test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUBROKER_", "FLOWER_"))}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="200", PYTHONUNBUFFERED="1")
    command = [*GPUBROKER, "demo", "--no-live", "--tasks", "3", "--timeout", "240", "--keep"]
    if sigint_ignored:  # exec keeps an ignored signal ignored, as a shell's background job starts
        command = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                   "os.execv(sys.argv[1], sys.argv[1:])", *command]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert proc.stdout is not None
        out = ""
        while "tasks succeeded" not in out or "Flower:" not in out.rpartition("tasks succeeded")[2]:
            line = proc.stdout.readline()
            assert line, f"the demo ended before it kept the cluster up:\n{out[-3000:]}"
            out += line
        assert re.search(r"Flower: http://127\.0\.0\.1:\d+\s+\(basic auth admin:gpubroker\)\n$", out), out[-2000:]
        pgids = {int(pid) for pid in re.findall(r"started \S+\s+pid (\d+)", out)}
        port = re.search(r"Redis redis://127\.0\.0\.1:(\d+)/", out)
        assert port and len(pgids) == 2 + len(NODES) + 1, out[:2000]
        time.sleep(2)  # after the summary, nothing stops by itself
        up = leftovers(pgids, port.group(1))
        # Every process the demo started is still up (a warm pool process that ran a task is in a
        # process group of its own, so there may be more groups than the demo started).
        assert proc.poll() is None and pgids <= {int(line.split()[2].rstrip("):")) for line in up}, up
        proc.send_signal(signal.SIGINT)
        rest = proc.stdout.read()
        assert proc.wait(60) == 0, rest
    finally:
        proc.kill()
    assert "stopped" in rest
    assert leftovers(pgids, port.group(1)) == []
