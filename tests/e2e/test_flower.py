"""Flower sees the broker's nodes and tasks: real dispatcher, two workers and Flower over HTTP.

Flower learns everything from Celery events, asynchronously, so every check polls
with a timeout. A task waiting in the broker's pending queue has no Celery message
yet; Flower knows it only from the task-sent event the client emits at submit.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from broker.client import Client
from broker.models import Resources, TaskState
from broker.settings import Settings
from tests.support import ROOT, Processes, free_port, wait_until

USER, PASSWORD = "u", "p"
NODES = {
    "fl-big": ["--gpus", "2", "--gpu-memory-mb", "40960", "--cpus", "8", "--slots", "4", "--label", "gpu_model=A100"],
    "fl-small": ["--gpus", "1", "--gpu-memory-mb", "24576", "--cpus", "2", "--slots", "2", "--label", "gpu_model=L4"],
}


class FlowerApi:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, Any]:
        request = urllib.request.Request(self.base + path)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (urllib.error.URLError, OSError):
            return 0, None

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        return body if status == 200 else None

    def task(self, task_id: str) -> dict[str, Any] | None:
        body: dict[str, Any] | None = self.json(f"/api/task/info/{task_id}")
        return body


def start_flower(procs: Processes) -> FlowerApi:
    port = free_port()
    log = (procs.logdir / "flower.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "broker.celery_conf:app", "flower", f"--port={port}",
         "--address=127.0.0.1", f"--basic-auth={USER}:{PASSWORD}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=procs.env, start_new_session=True)
    procs.procs.append(proc)  # stopped (with its process group) by the fixture
    return FlowerApi(port)


def node_of(worker: str) -> str:
    """Flower names workers ``<node>@<hostname>``."""
    return worker.split("@", 1)[0]


def task_events_on(flower: FlowerApi, client: Client) -> bool:
    """Does Flower hear a task end on every node (a probe run on each)?"""
    ids = [client.submit("workers.tasks.probe", resources=Resources(cpus=1, labels=labels)).id
           for labels in ({"gpu_model": "A100"}, {"gpu_model": "L4"})]
    for task_id in ids:
        client.wait(task_id, 30)
    time.sleep(0.5)
    return all((flower.task(task_id) or {}).get("state") == "SUCCESS" for task_id in ids)


@pytest.mark.e2e
def test_flower_shows_nodes_and_tasks_through_its_api(settings: Settings, procs: Processes) -> None:
    procs.dispatcher()
    for node, options in NODES.items():
        procs.worker(node, *options)
    flower = start_flower(procs)
    client = Client(settings=settings)
    try:
        wait_until(lambda: {n.id for n in client.nodes() if n.state == "up"} >= set(NODES), 30, 0.1,
                   what=f"nodes to register ({procs.log('worker-fl-big')[-800:]})")
        # Workers Flower has heard from through events: its event receiver is live from here on.
        wait_until(lambda: {node_of(w) for w, alive in (flower.json("/api/workers?status=true") or {}).items()
                            if alive} >= set(NODES), 30, 0.2, what=f"Flower to see both workers via events "
                   f"({(procs.logdir / 'flower.log').read_text(errors='replace')[-800:]})")

        # Authentication: the API refuses anonymous and wrong credentials.
        assert flower.get("/api/workers", auth=None)[0] == 401
        assert flower.get("/api/workers", auth=(USER, "wrong"))[0] == 401

        # Both nodes are Celery workers, named <node>@<host>, as inspect reports them.
        def inspected() -> set[str]:
            return {node_of(w) for w in flower.json("/api/workers?refresh=true") or {}}

        wait_until(lambda: inspected() == set(NODES), 20, 0.2, what="/api/workers to list both nodes")
        # Workers send task events once a monitor asks (Flower's enable_events, every 5 s), as Celery's do.
        wait_until(lambda: task_events_on(flower, client), 60, 0.5, what="Flower to turn the workers' task events on")

        # fl-big's two GPUs are busy with `hog` for 3 s, so `waiting` (2 GPUs, fits only
        # fl-big) stays in the broker's pending queue meanwhile.
        probe = "workers.tasks.probe"
        hog = client.submit(probe, kwargs={"seconds": 3}, resources=Resources(gpus=2))
        waiting = client.submit(probe, resources=Resources(gpus=2), tenant="late")
        others = [
            client.submit(probe, kwargs={"seconds": 1}, resources=Resources(gpus=1, labels={"gpu_model": "L4"})),
            client.submit(probe, kwargs={"seconds": 1}, resources=Resources(gpus=0.5)),
            client.submit(probe, resources=Resources(cpus=1)),
        ]
        ids = [hog.id, waiting.id, *(h.id for h in others)]

        seen = wait_until(lambda: flower.task(waiting.id), 10, 0.05, what="Flower to list the waiting task")
        seen_at = time.time()
        assert seen["state"] in ("PENDING", "SENT"), seen
        assert seen["name"] == probe

        finals = {task_id: client.wait(task_id, 30) for task_id in ids}
        assert all(s.state is TaskState.SUCCEEDED for s in finals.values()), finals
        # Flower listed it before the broker started it.
        assert finals[waiting.id].started_at is not None and finals[waiting.id].started_at > seen_at
        assert finals[waiting.id].node == "fl-big"

        def all_succeeded_in_flower() -> dict[str, Any] | None:
            listed = flower.json("/api/tasks") or {}
            if all(listed.get(task_id, {}).get("state") == "SUCCESS" for task_id in ids):
                return listed
            return None

        listed = wait_until(all_succeeded_in_flower, 20, 0.2, what="Flower to report every task SUCCESS")
        for task_id, status in finals.items():
            assert node_of(listed[task_id]["worker"]) == status.node, (task_id, listed[task_id], status)

        # A gang: Flower shows each member's attempt under the job's id (ids <job>:m<rank>,
        # root_id the job), on the node its record names; the job id itself is no Celery task.
        gang = client.submit(probe, resources=Resources(gpus=1), replicas=2, spread=True)
        done = client.wait(gang.id, 30)
        assert done.state is TaskState.SUCCEEDED and done.members is not None
        members = [f"{gang.id}:m{m.rank}" for m in done.members]
        listed = wait_until(lambda: (t := flower.json("/api/tasks") or {}) and all(
            t.get(m, {}).get("state") == "SUCCESS" for m in members) and t, 20, 0.2,
            what="Flower to report both members SUCCESS")
        for member in done.members:
            shown = listed[f"{gang.id}:m{member.rank}"]
            assert shown["root_id"] == gang.id and node_of(shown["worker"]) == member.node, shown
        assert gang.id not in listed
    finally:
        client.close()
