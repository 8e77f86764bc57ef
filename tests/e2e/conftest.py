"""Fixtures of the end-to-end modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.native_cluster import Cluster, running_cluster
from tests.support import RedisServer


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Celery-native cluster for the module (``tests.e2e.native_cluster``)."""
    with running_cluster(redis_server, tmp_path_factory.mktemp("native")) as started:
        yield started
