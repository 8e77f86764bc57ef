"""Self-fencing: an attempt stops itself before its node's lease can expire.

The dispatcher requeues the tasks of a node whose lease expired. If the node's worker is
merely cut off (a network partition, Redis unreachable, its main process frozen), the
attempts it runs would go on beside their requeued successors. So each attempt watches the
lease from inside its own pool process: the node agent writes, after every renewal Redis
acknowledged, until when the lease is surely held (``sent + lease_s - margin``, counted from
before the renewal was sent) into memory shared with the pool's processes; a watchdog thread in
the attempt reads it. Once that time has passed the attempt gets SIGTERM (``Preempted`` in the
task) and, half the margin later, SIGKILL, every process of it (``workers.unit``): all before
the lease can expire. ``margin`` is ``self_fence_margin_s``, by default a quarter of the lease.

Clock assumption: the lease's expiry is the worker's wall clock at the renewal plus
``lease_s``, and the dispatcher compares it with its own wall clock; the attempt measures on
this machine's monotonic clock. The clocks of worker and dispatcher machines must agree to
within half the margin (NTP does far better), or an attempt may still run when a dispatcher
with a clock that far ahead requeues its task.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import struct
import threading
import time

from workers.unit import Unit

log = logging.getLogger(__name__)

_FORMAT = "d"
CHECK_S = 0.1


class LeaseWindow:
    """Until when (monotonic seconds) this node's lease is surely held, shared with every pool
    process forked after it was created."""

    def __init__(self) -> None:
        self._shared = mmap.mmap(-1, struct.calcsize(_FORMAT))  # MAP_SHARED | MAP_ANONYMOUS
        self._write(float("inf"))  # no lease yet: nothing to fence until the first renewal

    def _write(self, value: float) -> None:
        self._shared.seek(0)
        self._shared.write(struct.pack(_FORMAT, value))

    def renewed(self, sent_at: float, lease_s: float, margin_s: float) -> None:
        """Redis acknowledged a renewal sent at ``sent_at`` (monotonic)."""
        self._write(sent_at + lease_s - margin_s)

    def held_until(self) -> float:
        return float(struct.unpack_from(_FORMAT, self._shared, 0)[0])


_window: LeaseWindow | None = None


def window() -> LeaseWindow:
    """This worker's lease window (created by the agent before the pool starts)."""
    global _window
    if _window is None:
        _window = LeaseWindow()
    return _window


class Watchdog(threading.Thread):
    """In a pool process: stops the attempt it runs (``unit``) when the lease window closes.

    One thread per process, armed for each attempt (``arm``): a warm process runs many attempts,
    and starting a thread per attempt cost milliseconds on a loaded machine. Arming and stopping
    only set a field: the thread looks every ``CHECK_S`` anyway, and waking it would hand it the
    GIL at the start of every attempt."""

    def __init__(self, margin_s: float) -> None:
        super().__init__(name="gpubroker-fence", daemon=True)
        self.margin_s = margin_s
        self.unit: Unit | None = None
        self.fired = False  # it stopped the attempt: the outcome is "lost", not the task's failure

    def run(self) -> None:
        shared = window()
        while True:
            time.sleep(CHECK_S)
            unit, held_until = self.unit, shared.held_until()
            if unit is None or time.monotonic() < held_until:
                continue
            self.fired = True
            log.error("attempt %s: this node's lease was not renewed in time (Redis unreachable, or the "
                      "worker's main process stalled); stopping it before the lease can expire", unit.tag)
            unit.signal(signal.SIGTERM, os.getpid())
            deadline = held_until + self.margin_s / 2
            while time.monotonic() < deadline:
                time.sleep(CHECK_S)
                if self.unit is not unit or time.monotonic() < shared.held_until():
                    if self.unit is unit:
                        log.warning("attempt %s: the lease was renewed after all; it was already told to stop",
                                    unit.tag)
                        self.unit = None  # told once: this attempt is not watched further
                    break
            else:
                log.error("attempt %s: SIGKILL, the lease may expire in %.1fs", unit.tag, self.margin_s / 2)
                unit.kill(os.getpid(), wait_s=self.margin_s / 4)
                os.killpg(os.getpid(), signal.SIGKILL)  # this process too, whatever the rest did

    def arm(self, unit: Unit) -> Watchdog:
        self.fired, self.unit = False, unit
        return self

    def stop(self) -> None:
        self.unit = None


_watchdog: tuple[int, Watchdog] | None = None


def watch(unit: Unit, margin_s: float) -> Watchdog:
    """This process's watchdog, armed for ``unit`` (started at its first attempt)."""
    global _watchdog
    if _watchdog is None or _watchdog[0] != os.getpid():  # a thread does not survive fork
        _watchdog = (os.getpid(), Watchdog(margin_s))
        _watchdog[1].start()
    return _watchdog[1].arm(unit)
