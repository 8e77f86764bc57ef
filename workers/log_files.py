"""Where an attempt's output is written on its node (``workers.logs`` redirects it there).

Every attempt's file is ``<task_log_dir>/<task id>.<attempt>.log``. Until an attempt has written
something its output goes to its pool process's spare file (``.spare-<node>-<pid>.log`` in the
same directory: empty, kept open from one attempt to the next), which is renamed to the attempt's
name once it has: a quiet attempt costs no file made and removed. The worker's main process
takes a killed attempt's output from its process's spare (``adopt``); a pool process that exits
removes its own, and a starting worker those its killed processes left (``sweep_spares``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from celery.signals import worker_process_shutdown

from workers import context
from workers.unit import alive, scoped

log = logging.getLogger(__name__)


def log_dir() -> Path:
    return _log_dir(context.settings().task_log_dir)


@functools.lru_cache(maxsize=4)
def _log_dir(configured: str) -> Path:
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "gpubroker-task-logs"


def log_path(tag: str) -> Path:
    """Where the attempt named by delivery tag ``<task id>.<attempt>`` writes on this node."""
    task_id, _, attempt = tag.rpartition(".")
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task_id or tag).lstrip(".") or "_"
    return log_dir() / f"{safe}.{attempt or 0}.log"  # one directory: making and removing one per task cost 90 µs


SPARE_PREFIX = ".spare-"


def spare_path(pid: int) -> Path:
    """The file pool process ``pid`` of this node writes an attempt's output to until the attempt
    has written something (``Capture``)."""
    return _spare_path(log_dir(), scoped(context.node_id()), pid)


@functools.lru_cache(maxsize=16)
def _spare_path(directory: Path, node: str, pid: int) -> Path:
    return directory / f"{SPARE_PREFIX}{node}-{pid}.log"


def open_append(path: Path, truncate: bool = False) -> int:
    """``path`` opened for appending (made, with its directory, when it is not there)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:  # the first attempt here (or the directory was removed)
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o644)


_spare: tuple[int, int, Path] | None = None  # (pid, fd, path) of this process's spare file: empty, kept open


def take_spare() -> tuple[int, Path]:
    """This process's spare file (made now when it has none), as (fd, path)."""
    global _spare
    path = spare_path(os.getpid())
    if _spare is not None and _spare[0] == os.getpid() and _spare[2] != path:  # the log directory changed
        drop_spare()
    if _spare is None or _spare[0] != os.getpid():  # a forked child does not write to its parent's
        _spare = (os.getpid(), open_append(path, truncate=True), path)
    return _spare[1], path


def drop_spare() -> None:
    """Close this process's spare and remove it, if it is empty (it is, unless an attempt runs)."""
    global _spare
    if _spare is not None and _spare[0] == os.getpid():
        _, fd, path = _spare
        with contextlib.suppress(OSError):
            if not os.fstat(fd).st_size:
                path.unlink()
            os.close(fd)
    _spare = None


def spent() -> None:
    """This process's spare became an attempt's file (renamed): the next attempt makes a new one."""
    global _spare
    _spare = None


def adopt(pid: int | None, tag: str) -> Path:
    """In the worker's main process, once pool process ``pid`` is gone (killed, or lost): the output
    of its attempt ``tag`` under the attempt's own name, if it was still in the process's spare
    file; an empty spare is removed. Where the attempt's output is."""
    path = log_path(tag)
    if pid:
        with contextlib.suppress(OSError):
            spare = spare_path(pid)
            if os.stat(spare).st_size:
                os.rename(spare, path)
            else:
                spare.unlink()
    return path


@worker_process_shutdown.connect
def _remove_spare(**_: Any) -> None:
    """A pool process that exits leaves no spare file behind."""
    drop_spare()


def sweep_spares(node: str) -> None:
    """At worker start: remove the spare files previous pool processes of ``node`` left (killed
    with their worker); one that holds output is kept, under a name that says so."""
    for spare in log_dir().glob(f"{SPARE_PREFIX}{scoped(node)}-*.log"):
        pid = spare.stem.rpartition("-")[2]
        if pid.isdigit() and alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            found = spare.stat()
            if found.st_size:
                kept = spare.with_name(f"left-{spare.name[len(SPARE_PREFIX):-4]}-{int(found.st_mtime)}.log")
                spare.rename(kept)
                log.warning("node %s: a killed pool process left output of an attempt: kept as %s", node, kept)
            else:
                spare.unlink()
