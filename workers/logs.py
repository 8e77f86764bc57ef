"""Task logs: each attempt's stdout and stderr, to a file on its node and its last part with the task.

The pool child redirects fds 1 and 2 (``os.dup2``) to ``<task_log_dir>/<task id>.<attempt>.log``
as the attempt starts and restores them when it ends, so what the processes it starts write to
the fds they inherit lands there too (a ``print`` in a ``subprocess`` as much as the task's own).
``sys.stdout``/``sys.stderr`` write straight to the file meanwhile: Celery's redirection of them
into its logger would prefix every line. Celery's own logging keeps going to the worker's log:
handlers that wrote to fd 1 or 2 get a copy of the original fd for the attempt.

start.lua records where the file is. While the attempt runs a thread copies the file's last
``task_log_tail_bytes`` to the task (log.lua) when it grew, at most every ``task_log_flush_s``,
which bounds the Redis write rate; the last copy is made just before the outcome is recorded,
unless the attempt wrote nothing.

A copy never waits for Redis: every copy is one try on a connection of its own that neither
retries nor waits longer than ``COPY_TIMEOUT_S``, and a failed one is only logged, so the
outcome is delayed by two such timeouts at the most (a copy in flight, the last one), and by
nothing when Redis refuses connections. During a Redis outage the outcome report retries until
Redis is back (``workers.task``); a last copy that failed then is tried once more after the
outcome is recorded (``task_postrun``), which log.lua allows (it fences by attempt number, not
by state). The file on the node always has the whole output.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import redis
from celery.signals import task_postrun
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.store.connection import connect
from broker.store.keys import PoolKeys
from broker.store.scripts import LogCode, Scripts
from workers import context, log_files

log = logging.getLogger(__name__)

COPY_TIMEOUT_S = 1.0  # the longest one copy to Redis may take, connecting included


def tail_of(path: Path, limit: int) -> tuple[bytes, int]:
    """The last ``limit`` bytes of ``path`` and its size (b"", 0 when it is not there)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            return f.read(min(limit, size)), size  # not what came after ``size`` was read: it says where the tail ends
    except OSError:
        return b"", 0


@functools.cache
def _copier(pid: int) -> Scripts:
    """This process's connection for log copies: one try each, ``COPY_TIMEOUT_S`` at most."""
    settings = context.settings()
    client = connect(settings.model_copy(update={"socket_timeout_s": COPY_TIMEOUT_S}))  # its URL, TLS, auth
    client.set_retry(Retry(NoBackoff(), 0))
    return Scripts(client, PoolKeys(settings.pool))


def keep_tail(task_id: str, tag: str, path: Path) -> bool:
    """Copy the log's last part (and where the whole of it is) to attempt ``tag`` of the task, in
    one try; whether it was kept."""
    tail, size = tail_of(path, context.settings().task_log_tail_bytes)
    try:
        return _copier(os.getpid()).log(task_id, tag, tail, size, f"{context.node_id()}:{path}") is LogCode.OK
    except (redis.RedisError, OSError) as exc:  # the log is worth a try, never a delayed or lost outcome
        log.warning("could not keep the log of %s with it: %s", tag, exc)
        return False


_found: tuple[tuple[int, tuple[int, ...]], list[logging.StreamHandler[Any]]] | None = None


def _handler_streams() -> list[logging.StreamHandler[Any]]:
    """The handlers that write to fd 1 or 2 (Celery's own): walking every logger was a sixth of a
    short task's time in its pool process, so the walk is kept until loggers are added or the
    root's handlers change. A handler a task adds to a logger that existed writes to its fds,
    into its log, which is where its own output belongs."""
    global _found
    key = (len(logging.Logger.manager.loggerDict), tuple(map(id, logging.getLogger().handlers)))
    if _found is None or _found[0] != key:
        _found = (key, _walk_handler_streams())
    return _found[1]


def _walk_handler_streams() -> list[logging.StreamHandler[Any]]:
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    found = []
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                try:
                    if handler.stream.fileno() in (1, 2):
                        found.append(handler)
                except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                    continue
    return found


class _Fds:
    """What every attempt of this process redirects around, made once per process: copies of the
    worker's own fds 1 and 2, the stream Celery's handlers write to instead of fds 1 and 2 (the
    same file, through the copy: an attempt's fds 1 and 2 are its log's), and the
    ``sys.stdout``/``sys.stderr`` of an attempt (they write to fds 1 and 2, whatever file those
    are). Made again when fds 1 and 2 are not the files they were (something else redirected
    them between attempts); the handlers then go back to what they wrote to before."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.identity = _identity()
        self.saved = (os.dup(1), os.dup(2))
        self.worker_stream: IO[str] = open(os.dup(self.saved[1]), "w", buffering=1, encoding="utf-8",
                                           errors="replace")
        self.streams = (open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False),
                        open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False))
        self.moved: dict[logging.StreamHandler[Any], Any] = {}  # handler -> the stream it had

    def move_handlers(self) -> None:
        """Point the handlers that write to fd 1 or 2 at the worker's stream, once each (moving
        them per attempt, and back, was a tenth of a short task's bookkeeping)."""
        for handler in _handler_streams():
            if handler not in self.moved:
                self.moved[handler] = handler.setStream(self.worker_stream)

    def close(self) -> None:
        for handler, previous in self.moved.items():
            if handler.stream is self.worker_stream and previous is not None:
                handler.setStream(previous)
        for fd in self.saved:
            os.close(fd)
        self.worker_stream.close()


def _identity() -> tuple[tuple[int, int], ...]:
    return tuple((st.st_dev, st.st_ino) for st in map(os.fstat, (1, 2)))


_fds: _Fds | None = None


def _process_fds() -> _Fds:
    global _fds
    if _fds is not None and (_fds.pid != os.getpid() or _fds.identity != _identity()):
        if _fds.pid == os.getpid():
            _fds.close()
        _fds = None
    if _fds is None:
        _fds = _Fds()
    return _fds


class Capture:
    """An attempt's fds 1 and 2 sent to its log file, from ``begin`` until ``end``.

    The output goes first to this process's spare file (``log_files.spare_path``), which is renamed to the
    attempt's own name (``path``) as soon as the attempt has written something: by the refresher,
    within ``task_log_flush_s``, or at the end. A quiet attempt costs no copy to Redis and leaves
    no file: the spare stays, empty, for the next attempt (making a file per attempt and removing
    it when nothing was written cost a seventh of a short task's bookkeeping). ``location``, the
    attempt's own name, goes to start.lua, which records it. Where the file cannot be written the
    attempt runs as before, its output in the worker's log: a full or misconfigured log directory
    is the operator's to fix (the warning says so), not a reason to fail the task."""

    def __init__(self, task_id: str, tag: str) -> None:
        self.task_id, self.tag = task_id, tag
        self.path = log_files.log_path(tag)
        self.active = False
        self.fd: int | None = None
        self.spare: Path | None = None  # where the output is until it has its own name (None: it has)
        self.location = ""  # ``<node>:<path>`` of the whole output, "" when there is no file
        try:
            if os.path.exists(self.path):  # a redelivered attempt: its first delivery's output is there
                self.fd = log_files.open_append(self.path)
            else:
                self.fd, self.spare = log_files.take_spare()
            self.location = f"{context.node_id()}:{self.path}"
        except OSError as exc:
            log.warning("task %s: no log file (%s); its output goes to the worker's log (GPUBROKER_TASK_LOG_DIR)",
                        tag, exc)

    def begin(self) -> Capture:
        """Send fds 1 and 2 (and ``sys.stdout``/``sys.stderr``) to the file."""
        if self.fd is None:
            return self
        self.active = True
        _flush_all()
        self.fds = fds = _process_fds()
        fds.move_handlers()  # Celery's handlers write to the worker's original stderr meanwhile
        self.worker_stream = fds.worker_stream
        size = self.size()  # a redelivered attempt's file has its first delivery's output
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)
        self.streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = fds.streams
        _refresher().arm(self, size)
        return self

    def size(self) -> int:
        return os.fstat(self.fd).st_size if self.fd is not None else 0

    def publish(self) -> None:
        """The attempt wrote something: its output gets its own name (the spare is the attempt's
        file from now on; the next attempt makes a new one)."""
        if self.spare is None:
            return
        try:
            os.rename(self.spare, self.path)
        except OSError as exc:
            log.warning("task %s: its output stays in %s (%s)", self.tag, self.spare, exc)
        self.spare = None
        log_files.spent()

    def end(self) -> None:
        """Keep the last part with the task, if anything was written (else leave no file), and
        give the fds back (call once its processes are gone)."""
        if self.fd is None:
            return
        begun, self.active = self.active, False  # not begun: its start was refused, it wrote nothing
        if begun:
            _refresher().disarm()  # and waits for a copy in flight
            _flush_all()
        wrote = self.size()
        if begun:
            sys.stdout, sys.stderr = self.streams
            os.dup2(self.fds.saved[0], 1)
            os.dup2(self.fds.saved[1], 2)
        fd, self.fd = self.fd, None
        if self.spare is not None and not wrote:
            return  # the spare stays open, as empty as it was, for the next attempt
        self.publish()
        os.close(fd)
        if not wrote:  # a file an earlier delivery left empty
            with contextlib.suppress(OSError):
                self.path.unlink()
        elif begun and not keep_tail(self.task_id, self.tag, self.path):  # a refused one's file is left as it was
            _missed.append(self)  # once more after the outcome (task_postrun)


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


class _Refresher(threading.Thread):
    """In a pool process: copies the running attempt's log tail when it grew, at most every
    ``task_log_flush_s``. One thread per process, armed for each attempt (as ``workers.fence``'s
    watchdog is): starting and joining a thread per attempt was a third of a short task's cost."""

    def __init__(self) -> None:
        super().__init__(name="gpubroker-log", daemon=True)
        self._lock = threading.Lock()  # held while copying: ``disarm`` waits for the copy
        self._capture: Capture | None = None
        self._kept = 0  # the size last copied (the file starts empty: nothing to copy yet)

    def run(self) -> None:
        interval = context.settings().task_log_flush_s
        while True:
            time.sleep(interval)
            with self._lock:
                capture = self._capture
                if capture is None:
                    continue
                size = capture.size()
                if size != self._kept:
                    capture.publish()  # it wrote: its file gets its own name now
                    if keep_tail(capture.task_id, capture.tag, capture.path):
                        self._kept = size

    def arm(self, capture: Capture, size: int) -> None:
        """Watch ``capture``, whose file holds ``size`` bytes as it begins."""
        with self._lock:
            self._capture, self._kept = capture, size

    def disarm(self) -> None:
        with self._lock:
            self._capture = None


_running: tuple[int, _Refresher] | None = None


def _refresher() -> _Refresher:
    """This process's refresher (started at its first attempt: a thread does not survive fork),
    kept as ``workers.fence.watch`` keeps its watchdog."""
    global _running
    if _running is None or _running[0] != os.getpid():
        _running = (os.getpid(), _Refresher())
        _running[1].start()
    return _running[1]


_missed: list[Capture] = []  # this process's attempts whose last copy failed (a Redis outage)


@task_postrun.connect
def _copy_missed(**_: Any) -> None:
    """After the outcome is recorded (Redis answered again): one more try for a last copy that failed."""
    while _missed:
        capture = _missed.pop()
        keep_tail(capture.task_id, capture.tag, capture.path)
