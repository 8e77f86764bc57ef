"""workers.logs.Capture in this process: fds 1 and 2 go to the file (a subprocess's too) and come back."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers import context, log_files, logs


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, str]]:
    monkeypatch.setenv(context.NODE_ENV, "n1")
    monkeypatch.setenv("GPUBROKER_TASK_LOG_DIR", str(tmp_path / "logs"))
    context._settings.cache_clear()
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(logs, "keep_tail", lambda task_id, tag, path: calls.append((tag, str(path))) or True)
    yield calls
    context._settings.cache_clear()


def test_the_attempts_output_and_its_subprocesses_go_to_the_file_then_the_fds_come_back(
        kept: list[tuple[str, str]], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    capture = logs.Capture("t/1", "t/1.2").begin()
    print("from python")
    os.write(2, b"from fd 2\n")
    subprocess.run([sys.executable, "-c", "import os; os.write(1, b'from a child\\n')"], check=True)
    capture.end()
    capture.end()  # once is enough; again changes nothing
    print("after")
    path = tmp_path / "logs" / "t_1.2.log"
    assert path.read_text() == "from python\nfrom fd 2\nfrom a child\n"
    assert capfd.readouterr().out == "after\n"
    assert kept == [("t/1.2", str(path))]  # at the end (start.lua recorded where the file is)
    assert capture.location == f"n1:{path}"


def test_an_attempt_that_writes_nothing_costs_no_copy_and_leaves_no_file(kept: list[tuple[str, str]],
                                                                          tmp_path: Path) -> None:
    capture = logs.Capture("t", "t.1").begin()
    spare = log_files.spare_path(os.getpid())
    assert spare.exists() and not (tmp_path / "logs" / "t.1.log").exists()  # quiet so far: the spare holds it
    capture.end()
    assert kept == [] and not (tmp_path / "logs" / "t.1.log").exists()
    inode = spare.stat().st_ino
    logs.Capture("t", "t.2").begin().end()
    assert spare.stat().st_ino == inode  # the same spare, made once: no file made and removed per attempt
    print("out", end="", file=sys.stderr)  # between attempts: the worker's stderr, not a log
    capture = logs.Capture("t", "t.3").begin()
    print("kept")
    capture.end()
    assert (tmp_path / "logs" / "t.3.log").stat().st_ino == inode  # the spare it wrote to, renamed
    logs.Capture("t", "t.4").begin().end()  # a new spare
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted([spare.name, "t.3.log"])
    assert (tmp_path / "logs" / "t.3.log").read_text() == "kept\n" and spare.stat().st_size == 0
    assert kept == [("t.3", str(tmp_path / "logs" / "t.3.log"))]
    log_files.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)  # the pool process exits
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["t.3.log"]


def test_a_running_attempt_that_writes_has_its_own_file_before_it_ends(
        kept: list[tuple[str, str]], tmp_path: Path) -> None:
    """The refresher gives the output its name once it grew (within task_log_flush_s): on the node
    a running task's log is where ``gpubroker status`` says it is."""
    capture = logs.Capture("t", "t.1").begin()
    print("working")
    deadline = time.monotonic() + 10
    while not (tmp_path / "logs" / "t.1.log").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert capture.active and (tmp_path / "logs" / "t.1.log").read_text() == "working\n"
    print("done")
    capture.end()
    assert (tmp_path / "logs" / "t.1.log").read_text() == "working\ndone\n"
    assert kept[-1] == ("t.1", str(tmp_path / "logs" / "t.1.log"))


def test_a_killed_attempts_output_is_taken_from_its_process_spare(kept: list[tuple[str, str]], tmp_path: Path) -> None:
    """The worker's main process, once the pool process is gone (killed, or its time limit): what
    the attempt wrote before the refresher named it is given the attempt's name."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / "logs").mkdir()
    log_files.spare_path(child.pid).write_text("half way\n")
    child.kill()
    child.wait()
    assert log_files.adopt(child.pid, "t.1") == tmp_path / "logs" / "t.1.log"
    assert (tmp_path / "logs" / "t.1.log").read_text() == "half way\n"
    assert not log_files.spare_path(child.pid).exists()
    log_files.spare_path(child.pid).write_text("")  # a quiet one: its empty spare goes
    assert log_files.adopt(child.pid, "t.2") == tmp_path / "logs" / "t.2.log"
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["t.1.log"]


def test_a_worker_starting_removes_the_spares_its_killed_processes_left(kept: list[tuple[str, str]],
                                                                       tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "logs").mkdir()
    log_files.spare_path(dead.pid).write_text("")
    mine = log_files.spare_path(os.getpid())  # a live process's: left alone
    mine.write_text("")
    other_node = tmp_path / "logs" / f"{log_files.SPARE_PREFIX}n2-{dead.pid}.log"
    other_node.write_text("")
    log_files.sweep_spares("n1")
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted([mine.name, other_node.name])
    log_files.spare_path(dead.pid).write_text("output nobody took\n")
    log_files.sweep_spares("n1")
    left = [p for p in (tmp_path / "logs").iterdir() if p.name.startswith("left-")]
    assert len(left) == 1 and left[0].read_text() == "output nobody took\n"


def test_an_attempt_whose_file_had_output_before_copies_only_what_it_adds(kept: list[tuple[str, str]],
                                                                          tmp_path: Path) -> None:
    """A redelivered attempt appends to its first delivery's file: the refresher starts from its size."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "t.1.log").write_text("first delivery\n")
    capture = logs.Capture("t", "t.1").begin()
    assert logs._refresher()._kept == len("first delivery\n")
    capture.end()
    assert (tmp_path / "logs" / "t.1.log").read_text() == "first delivery\n"  # kept, not removed


def test_a_capture_never_begun_closes_its_file_and_leaves_the_fds(kept: list[tuple[str, str]],
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """Its start was refused (a stale or cancelled message): nothing was redirected, and no fd is
    left open but the process's spare."""
    logs.Capture("t", "t.0").begin().end()  # this process has its spare now
    before = len(os.listdir("/proc/self/fd"))
    capture = logs.Capture("t", "t.1")
    capture.end()
    print("here")
    assert capfd.readouterr().out == "here\n" and kept == []
    assert len(os.listdir("/proc/self/fd")) == before
    (log_files.log_dir() / "t.2.log").write_text("a delivery that ran\n")  # a refused redelivery of it
    logs.Capture("t", "t.2").end()
    assert (log_files.log_dir() / "t.2.log").read_text() == "a delivery that ran\n" and kept == []


def test_an_unwritable_log_directory_leaves_the_output_where_it_was(
        kept: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GPUBROKER_TASK_LOG_DIR", str(tmp_path / "file"))  # a file, not a directory
    context._settings.cache_clear()
    capture = logs.Capture("t", "t.1")
    assert capture.location == ""  # start.lua records no file
    capture.begin()
    print("still here")
    capture.end()
    assert capfd.readouterr().out == "still here\n" and kept == []


def test_a_last_copy_that_failed_is_tried_once_more_after_the_outcome(
        kept: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([False, True])  # the end's copy (Redis down), the one after
    monkeypatch.setattr(logs, "keep_tail", lambda task_id, tag, path: kept.append((tag, "")) or next(answers))
    capture = logs.Capture("t", "t.1").begin()
    print("out")
    capture.end()
    assert len(kept) == 1 and logs._missed == [capture]
    logs.task_postrun.send(sender=None)  # Celery sends it once the task returned: its outcome is recorded
    assert len(kept) == 2 and logs._missed == []
    logs.task_postrun.send(sender=None)
    assert len(kept) == 2, "a copy that was kept is not made again"


def test_a_copy_is_one_try_that_gives_up_instead_of_waiting_for_redis(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A Redis that accepts connections and never answers (one stopped, or a lost network): the
    copy gives up after its timeout, on its first connection, and says so; it raises nothing."""
    silent = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv(context.NODE_ENV, "n1")
    monkeypatch.setenv("GPUBROKER_REDIS_URL", f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
    context._settings.cache_clear()
    logs._copier.cache_clear()
    try:
        (tmp_path / "1.log").write_text("out\n")
        assert logs.keep_tail("t", "t.1", tmp_path / "1.log") is False
        silent.settimeout(0.5)
        silent.accept()[0].close()  # the copy's one connection
        with pytest.raises(TimeoutError):
            silent.accept()  # and no other: it did not retry
    finally:
        silent.close()
        context._settings.cache_clear()
        logs._copier.cache_clear()


def test_a_stream_handler_added_after_an_attempt_is_found_by_the_next(kept: list[tuple[str, str]]) -> None:
    """The walk over the loggers is kept between attempts until loggers are added: a handler on a
    new logger that writes to fd 2 is pointed at the worker's stream from the next attempt on (the
    same file: a copy of the worker's fd 2), and back once fds 1 and 2 are other files."""
    logs.Capture("t", "t.1").begin().end()
    handler = logging.StreamHandler(sys.__stderr__)
    logger = logging.getLogger(f"test-capture-{os.getpid()}")
    logger.addHandler(handler)
    try:
        capture = logs.Capture("t", "t.2").begin()
        assert handler.stream is capture.worker_stream
        capture.end()
        assert handler.stream is capture.worker_stream
        logs._fds.close()  # as when fds 1 and 2 changed
        logs._fds = None
        assert handler.stream is sys.__stderr__
    finally:
        logger.removeHandler(handler)
