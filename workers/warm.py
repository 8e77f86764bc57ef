"""Warm pool processes: which tasks a pool process may run, and when it must go (issue 14).

A pool process starts fresh. What it runs first decides what it is warm for, for life:

- a CPU task (no GPU reserved): it stays, and runs CPU tasks only (as plain Celery reuses its
  processes; ``CUDA_VISIBLE_DEVICES`` is empty in it);
- a GPU task with ``reuse=True`` (``@app.task(reuse=True)`` or at submit): it keeps
  ``CUDA_VISIBLE_DEVICES`` for those GPU indices and runs only ``reuse=True`` tasks reserved
  exactly those indices, so what the task loaded at module level (a model on those GPUs) is
  there for the next one;
- any other GPU task: it runs that one task and exits (a fresh process per task, the default:
  CUDA is initialised by nobody before ``CUDA_VISIBLE_DEVICES`` is set).

A task that reaches a process warm for something else is handed back to the node queue
(``Reject(requeue=True)`` before start.lua: the reservation stays, the task is not started) and
that process exits, so a fresh one takes it. A process also exits after ``max_tasks_per_process``
tasks or when it grows past ``max_memory_per_process_mb`` (Celery's own per-child limits), and
when GPUs it holds are reserved for another task: the pool process that received that task
marks it (``Board``), an idle pool process looks at the mark at least once a second (billiard's
wait for a job), and the task waits for it to be gone before it starts.

``Board`` is memory shared between the worker's main process and its pool processes, one slot
per pool process index: its pid, the attempt it runs now (the node agent checks it before a
SIGTERM, so a stop never lands on the next task of a warm process), the GPUs it is warm for,
whether it must exit, the task name it ran last and whether it stays warm for its GPUs (a
``reuse=True`` task's), and the slot's warm hits and misses (``reuse=True`` GPU tasks that
started in a process warm for their name and GPUs, or not; kept across the slot's owners). The
node agent publishes the warm GPU sets and the counts (``workers.affinity``) for the dispatcher's
warm affinity, and the worker's main process hands a ``reuse=True`` GPU task's message to the
idle process warm for its GPUs when there is one (``process_order``, used by ``workers.pool``):
Celery's pool would give it to the first idle process, whatever that one is warm for.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
from collections.abc import Mapping
from typing import Any

from workers.unit import alive

log = logging.getLogger(__name__)

# pid, retire, attempt tag, what it is warm for, task name last run, warm for its GPUs, hits, misses
_SLOT = struct.Struct("=iB128s64s128sBII")
_OWNED = struct.Struct("=128s64s128sB")  # the fields after pid and retire, written by the slot's owner
_COUNTS = _SLOT.size - 8  # offset of hits and misses in a slot
CPU = "cpu"  # warm for CPU tasks
RELEASE_WAIT_S = 5.0  # longest a task waits for an idle process holding its GPUs to exit


class Board:
    """What each pool process of this worker runs and is warm for (see the module docstring)."""

    def __init__(self, slots: int) -> None:
        """``slots``: the pool's size; billiard numbers its processes 0 to size - 1."""
        self.slots = slots
        self._shared = mmap.mmap(-1, _SLOT.size * slots)  # MAP_SHARED | MAP_ANONYMOUS: kept across fork

    def read(self, index: int) -> tuple[int, bool, str, str]:
        pid, retire, tag, held, *_ = _SLOT.unpack_from(self._shared, index * _SLOT.size)
        return pid, bool(retire), tag.rstrip(b"\0").decode(), held.rstrip(b"\0").decode()

    def write(self, index: int, pid: int, tag: str, held: str, name: str | None = None, warm: bool = False) -> None:
        """The owner's fields of slot ``index`` (its pid's); a new owner starts unmarked.
        ``name``: the task name it runs (None: as it was)."""
        if not 0 <= index < self.slots:
            return
        at = index * _SLOT.size
        if struct.unpack_from("=i", self._shared, at)[0] != pid:
            struct.pack_into("=iB", self._shared, at, pid, 0)
        if name is None:
            _, _, last, was_warm = _OWNED.unpack_from(self._shared, at + 5)
            name, warm = last.rstrip(b"\0").decode(), bool(was_warm)
        _OWNED.pack_into(self._shared, at + 5, tag.encode()[:128], held.encode()[:64], name.encode()[:128], warm)

    def count(self, index: int, hit: bool) -> None:
        """One more warm hit (or miss) in slot ``index`` (only its owner counts there)."""
        if 0 <= index < self.slots:
            at = index * _SLOT.size + _COUNTS + (0 if hit else 4)
            struct.pack_into("=I", self._shared, at, struct.unpack_from("=I", self._shared, at)[0] + 1)

    def warm_sets(self) -> list[tuple[str, str]]:
        """(GPU indices, task name last run) of each live process that stays warm for a GPU set
        and is not told to exit: what the dispatcher may send that name to."""
        out = set()
        for i in range(self.slots):
            pid, retire, _tag, held, name, warm, _, _ = _SLOT.unpack_from(self._shared, i * _SLOT.size)
            if pid and warm and not retire and held.rstrip(b"\0") and alive(pid):
                out.add((held.rstrip(b"\0").decode(), name.rstrip(b"\0").decode()))
        return sorted(out)

    def starts(self) -> tuple[int, int]:
        """Warm hits and misses of this worker's pool processes so far."""
        counts = [_SLOT.unpack_from(self._shared, i * _SLOT.size)[-2:] for i in range(self.slots)]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def mark_retire(self, index: int) -> None:
        """Tell the process in slot ``index`` to exit before its next task (only others write this)."""
        struct.pack_into("=B", self._shared, index * _SLOT.size + 4, 1)

    def entries(self) -> list[tuple[int, int, bool, str, str]]:
        return [(i, *slot) for i in range(self.slots) if (slot := self.read(i))[0]]

    def runs(self, pid: int, tag: str) -> bool | None:
        """Does pool process ``pid`` run attempt ``tag`` now? None: not on the board."""
        for _, slot_pid, _, running, _ in self.entries():
            if slot_pid == pid:
                return running == tag[:128]
        return None

    def retire_holders(self, gpus: str, reuse: bool) -> None:
        """A task was reserved ``gpus``: every process warm for any of them goes, unless it is
        warm for exactly these and the task may reuse it."""
        wanted = set(gpus.split(","))
        for index, pid, retire, _tag, held in self.entries():
            if (pid != os.getpid() and held and held != CPU and not retire and wanted & set(held.split(","))
                    and not (reuse and held == gpus)):
                log.info("pool process %d (warm for GPUs %s) retires: GPUs %s are reserved for another task",
                         pid, held, gpus)
                self.mark_retire(index)

    def wait_released(self, gpus: str, reuse: bool, me: int) -> None:
        """Wait until no idle process other than this one is warm for GPUs of ``gpus`` (they were
        told to retire as the task arrived); a busy one shares them rightfully (GPU shares)."""
        wanted = set(gpus.split(","))
        deadline = time.monotonic() + RELEASE_WAIT_S
        while True:
            holders = [pid for _, pid, _, tag, held in self.entries()
                       if pid != me and not tag and held and held != CPU and wanted & set(held.split(","))
                       and not (reuse and held == gpus) and alive(pid)]
            if not holders:
                return
            if time.monotonic() > deadline:
                log.warning("GPUs %s: idle pool processes %s warm for them have not exited after %gs", gpus,
                            holders, RELEASE_WAIT_S)
                return
            time.sleep(0.01)


def reservation(properties: Any, task: Any) -> tuple[str, bool]:
    """The GPU indices reserved for this delivery ("" for none) and whether the task may run in
    a warm process for them (``reuse`` at submit, else the task's decorator)."""
    properties = properties or {}
    reuse = properties.get("reuse")
    return (properties.get("gpubroker") or {}).get("gpus") or "", bool(
        getattr(task, "reuse", False) if reuse is None else reuse is True)


_board: Board | None = None


def board(slots: int = 1) -> Board:
    """This worker's board (created by the agent, for its pool's size, before the pool forks)."""
    global _board
    if _board is None:
        _board = Board(slots)
    return _board


class ThisProcess:
    """What this pool process is warm for, and whether it must exit before its next task."""

    held: str | None = None  # None: nothing run here yet
    name = ""  # the task name it ran last
    retiring = False

    @classmethod
    def index(cls) -> int:
        from billiard.process import current_process

        index = getattr(current_process(), "index", None)
        return index if isinstance(index, int) else -1

    @classmethod
    def admits(cls, gpus: str, reuse: bool) -> bool:
        """May this process run a task reserved ``gpus`` ("" for none)?"""
        if cls.held is None:
            return True
        if not gpus:
            return cls.held == CPU
        return reuse and cls.held == gpus

    @classmethod
    def starting(cls, tag: str, gpus: str, reuse: bool, name: str = "") -> bool:
        """An attempt of task ``name`` starts here (start.lua said so): this process is now warm
        for its GPUs, or runs it and exits (a GPU task that does not reuse). A ``reuse=True`` GPU
        task counts a warm hit when this process last ran its name on these GPUs, else a miss;
        returns True on a miss (what this process is warm for changed: worth publishing now)."""
        hit = cls.held == gpus and cls.name == name
        if gpus and reuse:
            board().count(cls.index(), hit)
        cls.held, cls.name = gpus or CPU, name
        if gpus and not reuse:
            cls.retiring = True
        board().write(cls.index(), os.getpid(), tag, cls.held, name, bool(gpus and reuse))
        return bool(gpus and reuse and not hit)

    @classmethod
    def ended(cls) -> None:
        board().write(cls.index(), os.getpid(), "", cls.held or "")

    @classmethod
    def retire(cls) -> None:
        cls.retiring = True

    @classmethod
    def must_retire(cls) -> bool:
        if cls.retiring:
            return True
        pid, retire, _, _ = board().read(cls.index()) if 0 <= cls.index() < board().slots else (0, False, "", "")
        return retire and pid == os.getpid()


def process_order(task_id: str | None, ready: list[int], processes: Mapping[int, Any]) -> list[int]:
    """The worker's main process: ``ready`` (inqueue fds of idle pool processes; ``processes``
    maps them to the processes) ordered for the job of ``task_id``, a ``reuse=True`` GPU task:
    first a process warm for exactly its GPUs, then a fresh one, then the rest, which would hand
    it back and exit (``workers.pool``). Other tasks: as Celery has them."""
    from celery.worker import state  # the requests this worker holds (main process only)

    request = next((r for requests in (state.reserved_requests, state.active_requests) for r in list(requests)
                    if r.id == task_id), None) if task_id else None
    if request is None:
        return ready
    gpus, reuse = reservation(request.request_dict.get("properties"), request.task)
    if not (gpus and reuse):  # any idle process can run it (a CPU-warm or fresh one): Celery's order
        return ready

    def rank(fd: int) -> int:
        proc = processes.get(fd)
        index = getattr(proc, "index", -1)
        if proc is None or not 0 <= index < board().slots:
            return 1
        pid, retire, _tag, held, _name, warm, _, _ = _SLOT.unpack_from(board()._shared, index * _SLOT.size)
        if pid != proc.pid or not held.rstrip(b"\0"):
            return 1  # it has run nothing yet
        return 0 if held.rstrip(b"\0").decode() == gpus and warm and not retire else 2
    return sorted(ready, key=rank)
