"""The worker's pool against a consumer restart: what it watches when Celery re-registers it."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from kombu.asynchronous import Hub

from workers import pool as pool_module
from workers.pool import FreshProcessAsynPool


class _Exited:
    """A pool process whose exit was handled (Celery set its watch to None) but not yet replaced."""

    _sentinel_poll = None


class _Running:
    def __init__(self, fd: int) -> None:
        self._sentinel_poll = fd


def test_re_registering_skips_a_process_whose_exit_was_handled() -> None:
    pool = object.__new__(FreshProcessAsynPool)  # only the method under test, no processes
    hub = Hub()
    read, write = os.pipe()
    try:
        pool._track_child_process(_Exited(), hub)  # stock Celery: ValueError, the consumer stops
        assert read not in hub.readers
        pool._track_child_process(_Running(read), hub)
        assert read in hub.readers  # a live process is still watched for its exit
    finally:
        hub.close()
        os.close(read)
        os.close(write)


def test_stock_celery_fails_on_it() -> None:
    """Why the override exists: if this stops raising, Celery fixed it and the override can go."""
    from celery.concurrency.asynpool import AsynPool

    pool: Any = object.__new__(AsynPool)
    hub = Hub()
    try:
        with pytest.raises(ValueError, match="file descriptor is None"):
            AsynPool._track_child_process(pool, _Exited(), hub)
    finally:
        hub.close()


class _Counter:
    def __init__(self, value: int) -> None:
        self.value = value


def test_an_exiting_process_waits_until_the_main_process_read_its_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """billiard's wait before a pool process exits, kept (it must not exit with a result unread)
    but looked at every CONSUMED_POLL_S: the counter the main process bumps decides."""
    worker = object.__new__(pool_module.WarmWorker)
    worker.on_ready_counter = _Counter(0)
    timer = threading.Timer(0.05, lambda: setattr(worker.on_ready_counter, "value", 3))
    timer.start()
    assert worker._ensure_messages_consumed(completed=3) is True
    assert worker.on_ready_counter.value == 3
    monkeypatch.setattr(pool_module, "CONSUMED_WAIT_S", 0.05)
    assert worker._ensure_messages_consumed(completed=4) is False  # never read: gives up, as billiard's does
    worker.on_ready_counter = None
    assert worker._ensure_messages_consumed(completed=1) is False
