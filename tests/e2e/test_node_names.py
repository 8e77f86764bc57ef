"""A worker started without --node registers under this host's name, and `health worker` without
--node checks that node: readable node names by default, not ids made up at random."""

from __future__ import annotations

import subprocess

import pytest

from broker import Client
from broker.cli.common import host_node_id
from broker.settings import Settings
from tests.e2e.test_faults import wait_nodes_up
from tests.support import GPUBROKER, ROOT, Processes

pytestmark = pytest.mark.e2e


def test_a_worker_without_node_registers_as_this_host(procs: Processes, settings: Settings) -> None:
    with Client(settings=settings) as client:
        procs.spawn("worker-default", "worker", "--cpus", "2")
        wait_nodes_up(client, [host_node_id()])
        health = subprocess.run([*GPUBROKER, "health", "worker"], check=False, cwd=ROOT, env=procs.env,
                                capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr
        assert [n.id for n in client.nodes()] == [host_node_id()]
