"""workers.logs.Capture in this process: fds 1 and 2 go to the file (a subprocess's too) and come back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workers import context, logs


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, str]]:
    monkeypatch.setenv(context.NODE_ENV, "n1")
    monkeypatch.setenv("GPUBROKER_TASK_LOG_DIR", str(tmp_path / "logs"))
    context._settings.cache_clear()
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(logs, "keep_tail", lambda task_id, tag, path, file="": calls.append((tag, file)) or 0)
    yield calls
    context._settings.cache_clear()


def test_the_attempts_output_and_its_subprocesses_go_to_the_file_then_the_fds_come_back(
        kept: list[tuple[str, str]], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    capture = logs.Capture("t/1", "t/1.2")
    print("from python")
    os.write(2, b"from fd 2\n")
    subprocess.run([sys.executable, "-c", "import os; os.write(1, b'from a child\\n')"], check=True)
    capture.end()
    capture.end()  # once is enough; again changes nothing
    print("after")
    path = tmp_path / "logs" / "t_1" / "2.log"
    assert path.read_text() == "from python\nfrom fd 2\nfrom a child\n"
    assert capfd.readouterr().out == "after\n"
    assert kept == [("t/1.2", f"n1:{path}"), ("t/1.2", "")]  # at the start (with the file), at the end


def test_an_unwritable_log_directory_leaves_the_output_where_it_was(
        kept: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GPUBROKER_TASK_LOG_DIR", str(tmp_path / "file"))  # a file, not a directory
    context._settings.cache_clear()
    capture = logs.Capture("t", "t.1")
    print("still here")
    capture.end()
    assert capfd.readouterr().out == "still here\n" and kept == []
