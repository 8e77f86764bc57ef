"""An attempt's processes as one unit: found, signalled and confirmed gone together.

A task may start processes of its own (``subprocess``, ``multiprocessing``, ``torchrun``), and
they hold its GPUs as much as the task does. At the end of every attempt (success, failure,
retry, cancel, preemption, time limit, a lost or self-fenced process) every process of it is
killed, and only once none is left is the attempt's outcome recorded, which is what releases
its capacity. Three things make the unit, set up by the pool child as the attempt starts:

- a cgroup v2 of its own, ``<worker's cgroup>/gpubroker-<node>-<attempt>``, where the worker
  may create one (root, or a delegated subtree; ``task_cgroups`` turns it off): no process
  can leave it, and ``cgroup.kill`` ends them all at once;
- a process group of its own (the child leads it), so SIGTERM reaches the whole task at once;
  the child is also a child subreaper (orphaned descendants stay in its tree, even after
  ``setsid``) and dies with the worker (``PR_SET_PDEATHSIG``);
- a marker in the environment, ``GPUBROKER_ATTEMPT=<node>:<attempt>``, which every process it
  starts inherits: when the child itself is gone (killed at the end of a grace period, or by
  the OOM killer) its orphans are found by it (Jenkins' ProcessTreeKiller uses the same idea).
  A process that scrubs its environment and escapes by double fork is caught only by the
  cgroup.

The attempt is named by its delivery tag (``<task id>.<attempt>``), which the pool child, the
worker's main process and the node agent all know.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ATTEMPT_ENV = "GPUBROKER_ATTEMPT"
CGROUPS_ENV = "GPUBROKER_TASK_CGROUPS"  # "false": no cgroups (the process group and marker remain)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
KILL_WAIT_S = 30.0  # how long to wait for a killed process to be gone (one in D state is not)
CHILDREN_LISTED = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()  # CONFIG_PROC_CHILDREN


def scoped(node: str) -> str:
    """``node`` within its Redis deployment and pool (``GPUBROKER_REDIS_URL`` less its password,
    ``GPUBROKER_POOL``, which the worker exports for its pool processes): workers of the same node
    name in other pools, or on another Redis, on one machine never sweep each other's attempts."""
    return _scoped(node, os.environ.get("GPUBROKER_REDIS_URL"), os.environ.get("GPUBROKER_POOL"))


@functools.lru_cache(maxsize=64)
def _scoped(node: str, url: str | None, pool: str | None) -> str:
    if not url and not pool:
        return node
    scheme, _, rest = (url or "").partition("://")
    where = f"{scheme}://{rest.rpartition('@')[2]}|{pool or ''}"
    return f"{node}.{hashlib.sha1(where.encode()).hexdigest()[:8]}"


def marker(node: str, tag: str) -> str:
    return f"{scoped(node)}:{tag}"


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)  # loading it took as long as a short task's bookkeeping


def _prctl(option: int, value: int) -> bool:
    try:
        return int(_libc().prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def _childless() -> bool:
    """This process has no child at all, running or ended (one syscall). For a subreaper that is
    every descendant: an orphaned one is re-parented to it."""
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


CGROUP_ROOT_ENV = "GPUBROKER_TASK_CGROUP_ROOT"  # what the worker found, for its pool processes


@functools.cache
def cgroup_root() -> Path | None:
    """The worker's own cgroup v2 directory, if it may create cgroups under it; else None. The
    worker finds out once and exports it (``CGROUP_ROOT_ENV``); its pool processes read that."""
    if CGROUP_ROOT_ENV in os.environ:
        return Path(os.environ[CGROUP_ROOT_ENV]) if os.environ[CGROUP_ROOT_ENV] else None
    if os.environ.get(CGROUPS_ENV, "true").lower() in ("0", "false", "no", "off"):
        return None
    try:
        own = next((line.split("::", 1)[1].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if line.startswith("0::")), None)
        mount = next((fields[4] for fields in (line.split() for line in
                                                Path("/proc/self/mountinfo").read_text().splitlines())
                      if "cgroup2" in fields[fields.index("-") + 1:fields.index("-") + 2]), None)
    except (OSError, ValueError):
        return None
    if own is None or mount is None:
        return None
    root = Path(mount) / own.lstrip("/")
    probe = root / f"gpubroker-probe-{os.getpid()}"
    try:
        probe.mkdir()
        ok = (probe / "cgroup.kill").exists()
        probe.rmdir()
    except OSError:
        return None
    return root if ok else None


def _environ_has(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (of each of its threads), from /proc, as far as they could be read."""
    found: list[int] = []
    try:
        for thread in Path(f"/proc/{pid}/task").iterdir():
            found.extend(int(p) for p in (thread / "children").read_text().split())
    except OSError:
        pass
    return found


def alive(pid: int) -> bool:
    """Is ``pid`` a process that has not ended (a zombie has)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if sys.platform.startswith("linux"):
            return False
        try:  # no /proc here
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _kill(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


_entered: Path | None = None  # the cgroup this (warm pool) process moved into, once
_headed: tuple[int, bool] | None = None  # (pid, subreaper) of a process set up to head its attempts


@functools.lru_cache(maxsize=64)
def _cgroup(name: str) -> Path | None:
    """The cgroup of that name under the worker's (None without cgroups): a warm process's is the
    same object for each of its attempts."""
    root = cgroup_root()
    return root / name.replace("/", "_") if root else None


def _entered_once(group: Path) -> None:
    global _entered
    _entered = group


def _head_once() -> bool:
    """Make this process the head of what its attempts start; whether it is their subreaper. A
    subreaper, and death with the worker, stay set for the process's life: a warm process sets
    them at its first attempt only (they were a tenth of a short task's bookkeeping)."""
    global _headed
    if os.getpgrp() != os.getpid():  # one syscall: a task may have moved it to another group
        try:
            os.setpgid(0, 0)
        except OSError:
            log.warning("pool process %d: could not start a process group", os.getpid(), exc_info=True)
    if _headed is None or _headed[0] != os.getpid():
        subreaper = _prctl(PR_SET_CHILD_SUBREAPER, 1)
        parent = os.getppid()
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the worker died before the line above took effect
            os._exit(1)
        _headed = (os.getpid(), subreaper)
    return _headed[1]


class Unit:
    """The processes of one attempt on this node (see the module docstring)."""

    def __init__(self, node: str, tag: str, warm: bool = False) -> None:
        """``warm``: the attempt runs in a pool process that outlives it (``workers.warm``). Such a
        process enters a cgroup of its own once (``gpubroker-<node>-w<pid>``) and every attempt it
        runs is contained there: moving a process into a cgroup waits for an RCU grace period
        (10-20 ms on a busy machine), which a warm process must not pay per task."""
        self.node, self.tag = node, tag
        self.marker = marker(node, tag)
        self.cgroup = _cgroup(f"gpubroker-{scoped(node)}-w{os.getpid()}" if warm else f"gpubroker-{scoped(node)}-{tag}")
        self.warm = warm
        self._subreaper = False  # enter() made this process the subreaper of what the attempt starts

    def _process_cgroup(self, leader: int | None) -> Path | None:
        """The cgroup of warm pool process ``leader``, where its attempts run (see ``__init__``)."""
        root = cgroup_root()
        return root / f"gpubroker-{scoped(self.node)}-w{leader}".replace("/", "_") if root and leader else None

    # ---- in the pool child, as the attempt starts and ends ----------------------------------

    def enter(self) -> None:
        """Make this process (the pool child about to run the attempt) the head of the unit."""
        os.environ[ATTEMPT_ENV] = self.marker
        self._subreaper = _head_once()
        if self.cgroup is not None and not (self.warm and _entered is self.cgroup):
            try:
                self.cgroup.mkdir(exist_ok=True)
                (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))
                _entered_once(self.cgroup)
            except OSError:
                log.warning("attempt %s: could not enter cgroup %s", self.tag, self.cgroup, exc_info=True)
                self.cgroup = None

    def end_here(self) -> None:
        """In the pool child, before the outcome is recorded: kill every other process of the unit
        and wait until they are gone (reaping those that became this process's children)."""
        if self._subreaper and _childless():
            return  # it started no process that is still there: nothing to look for in /proc
        deadline = time.monotonic() + KILL_WAIT_S
        while True:
            # A subreaper's descendants stay in its tree: no need to look through every process.
            others = [p for p in self.pids(scan=False) if p != os.getpid()]
            self._reap()
            if not others:
                return
            _kill(others, signal.SIGKILL)
            if time.monotonic() > deadline:
                log.error("attempt %s: processes %s outlived SIGKILL for %gs", self.tag, others, KILL_WAIT_S)
                return
            time.sleep(0.01)

    def leave(self) -> None:
        """In a pool process that lives on after the attempt (a warm one): what it starts from now
        on carries no marker of this attempt. It stays in its own cgroup (``__init__``)."""
        if os.environ.get(ATTEMPT_ENV) == self.marker:
            del os.environ[ATTEMPT_ENV]

    @staticmethod
    def _reap() -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    # ---- from anywhere on the node ----------------------------------------------------------

    def pids(self, leader: int | None = None, scan: bool = True) -> set[int]:
        """Every live process of the unit: its cgroup's, the tree under its leader (the pool child:
        ``leader``, or this process if it is the one), and, with ``scan``, any process on the
        machine carrying its marker (those whose leader is gone)."""
        found: set[int] = set()
        for group in (self.cgroup, self._process_cgroup(leader)):
            if group is not None:
                try:
                    found.update(int(p) for p in (group / "cgroup.procs").read_text().split())
                except OSError:
                    pass
        head = leader if leader is not None else (os.getpid() if os.environ.get(ATTEMPT_ENV) == self.marker
                                                  else None)
        if head is not None and alive(head):
            stack = [head]
            while stack:
                pid = stack.pop()
                found.add(pid)
                stack.extend(children(pid))
        if scan or not CHILDREN_LISTED:
            needle = f"{ATTEMPT_ENV}={self.marker}".encode()
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit() and _environ_has(int(entry.name), needle):
                    found.add(int(entry.name))
        return {p for p in found if alive(p)}

    def signal(self, signum: int, leader: int | None = None) -> set[int]:
        """Send ``signum`` to every process of the unit; the pids signalled."""
        pids = self.pids(leader)
        grouped: set[int] = set()
        if leader is not None and alive(leader):
            try:
                os.killpg(leader, signum)  # the group at once; each of its members gets it once
                grouped = {p for p in pids if _group(p) == leader}
            except (ProcessLookupError, PermissionError):
                pass
        _kill(pids - grouped, signum)
        return pids

    def kill(self, leader: int | None = None, wait_s: float = KILL_WAIT_S) -> bool:
        """SIGKILL every process of the unit and wait until none is left; False if one outlived
        ``wait_s`` (a process in uninterruptible sleep cannot be killed by anyone)."""
        deadline = time.monotonic() + wait_s
        for group in (self.cgroup, self._process_cgroup(leader)):
            if group is not None:
                try:
                    (group / "cgroup.kill").write_text("1")
                except OSError:
                    pass
        while True:
            left = self.signal(signal.SIGKILL, leader)
            if not left:
                self.remove()
                return True
            if time.monotonic() > deadline:
                log.error("attempt %s: processes %s outlived SIGKILL for %gs", self.tag, sorted(left), wait_s)
                return False
            time.sleep(0.02)

    def remove(self) -> None:
        """Remove the unit's cgroup once it is empty (harmless when it is not, or is gone)."""
        if self.cgroup is not None:
            try:
                self.cgroup.rmdir()
            except OSError:
                pass


def sweep_node(node: str) -> int:
    """Kill what a previous worker process of ``node`` left on this machine: any process carrying
    one of its attempts' markers, and its attempts' cgroups. Run before registering: the tasks
    they ran are requeued by the registration, and must not run beside their next attempts."""
    prefix = f"{ATTEMPT_ENV}={scoped(node)}:".encode()
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(item.startswith(prefix) for item in env):
            _kill([int(entry.name)], signal.SIGKILL)
            killed += 1
    root = cgroup_root()
    if root is not None:
        for group in root.glob(f"gpubroker-{scoped(node)}-*"):
            try:
                (group / "cgroup.kill").write_text("1")
                deadline = time.monotonic() + KILL_WAIT_S
                while "populated 1" in (group / "cgroup.events").read_text() and time.monotonic() < deadline:
                    time.sleep(0.02)
                group.rmdir()
            except OSError:
                pass
    return killed


def remove_empty_cgroups(node: str) -> None:
    """Remove this node's attempt cgroups that are empty (a pool child cannot remove its own while
    it is in it); one still in use is left (rmdir refuses it)."""
    root = cgroup_root()
    if root is None:
        return
    for group in root.glob(f"gpubroker-{scoped(node)}-*"):
        try:
            group.rmdir()
        except OSError:
            pass


def containment() -> str:
    """How this worker contains its tasks' processes, in words (logged at start)."""
    root = cgroup_root()
    where = f"a cgroup v2 each under {root}" if root else "no cgroups (not available or turned off)"
    return f"{where}; a process group each, subreaper, {ATTEMPT_ENV} marker"
