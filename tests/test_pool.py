"""The worker's pool against a consumer restart: what it watches when Celery re-registers it."""

from __future__ import annotations

import os
from typing import Any

import pytest
from kombu.asynchronous import Hub

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
