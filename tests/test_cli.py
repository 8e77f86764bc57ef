"""The CLI through Typer's runner against a real Redis: exit codes and messages a user sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from broker.cli.common import host_node_id
from broker.settings import Settings
from workers.cli import app

runner = CliRunner()


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return {"GPUBROKER_REDIS_URL": settings.redis_url, "GPUBROKER_POOL": settings.pool}


def test_submit_status_queue_cancel(env: dict[str, str]) -> None:
    submitted = runner.invoke(app, ["submit", "workers.tasks.probe", "--gpus", "0.5", "--priority", "3", "--json"],
                              env=env)
    assert submitted.exit_code == 0, submitted.output
    task_id = json.loads(submitted.output)["id"]
    queue = runner.invoke(app, ["queue", "--json"], env=env)
    assert [(e["position"], e["id"], e["priority"]) for e in json.loads(queue.output)] == [(1, task_id, 3)]
    status = runner.invoke(app, ["status", task_id, "--json"], env=env)
    assert json.loads(status.output)["state"] == "PENDING"
    cancelled = runner.invoke(app, ["cancel", task_id, "--json"], env=env)
    assert json.loads(cancelled.output)["state"] == "CANCELLED"


def test_status_shows_a_countdown_and_an_expiry(env: dict[str, str]) -> None:
    submitted = runner.invoke(app, ["submit", "workers.tasks.probe", "--countdown", "120", "--expires", "600",
                                    "--json"], env=env)
    assert submitted.exit_code == 0, submitted.output
    task_id = json.loads(submitted.output)["id"]
    shown = runner.invoke(app, ["status", task_id], env=env, terminal_width=200)
    assert shown.exit_code == 0, shown.output
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in shown.output.splitlines()
             if line.count("│") >= 3}
    assert lines["state"] == "PENDING"
    assert lines["not before"].startswith(("in 1m 5", "in 2m")), lines  # ~120 s from now
    assert lines["expires"].startswith(("in 9m", "in 10m")), lines
    assert lines["tenant"] == "default" and lines["priority"] == "0"  # the defaults, none declared


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "workers.tasks.probe", "--gpus", "1.5"], "gpus: must be a whole number"),
        (["submit", "workers.tasks.probe", "--kwargs", "[1]"], "kwargs: must be a JSON object"),
        (["submit", "workers.tasks.probe", "--args", "{oops"], "args: not valid JSON"),
        (["submit", "workers.tasks.probe", "--label", "gpu_model"], "label: 'gpu_model' is not key=value"),
        (["submit", "not a task"], "task_name"),
    ],
)
def test_bad_input_is_refused_with_exit_code_2(env: dict[str, str], redis_client: redis.Redis, args: list[str],
                                               message: str) -> None:
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 2
    assert "refused" in result.output and message in result.output
    assert redis_client.dbsize() == 0


def test_unknown_task_is_an_error_with_exit_code_3(env: dict[str, str]) -> None:
    result = runner.invoke(app, ["status", "nope"], env=env)
    assert result.exit_code == 3
    assert "no task with id 'nope'" in result.output


def test_worker_gpus_auto_without_nvml_says_what_to_do(env: dict[str, str], redis_client: redis.Redis) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # a real GPU machine would start a real worker here
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML")
    result = runner.invoke(app, ["worker", "--node", "n1", "--gpus", "auto"], env=env)
    assert result.exit_code == 3
    assert "--gpus auto" in result.output and "--gpus N" in result.output
    assert redis_client.dbsize() == 0


def test_dispatcher_refuses_a_bad_scheduling_file(env: dict[str, str], redis_client: redis.Redis,
                                                  tmp_path: Path) -> None:
    bad = tmp_path / "scheduling.toml"
    bad.write_text('ordering = "lottery"\n[tenants.a]\nweight = -1\n')
    result = runner.invoke(app, ["dispatcher", "--scheduling", str(bad)], env=env)
    assert result.exit_code == 2
    assert "ordering" in result.output and "tenants.a.weight" in result.output
    assert redis_client.dbsize() == 0


def test_submit_with_a_label_preference_list_and_preemptible(env: dict[str, str]) -> None:
    submitted = runner.invoke(app, ["submit", "workers.tasks.probe", "--gpus", "1", "--label", "gpu=H100|A100",
                                    "--label", "zone=eu", "--preemptible", "--json"], env=env)
    assert submitted.exit_code == 0, submitted.output
    status = json.loads(runner.invoke(app, ["status", json.loads(submitted.output)["id"], "--json"], env=env).output)
    assert status["resources"]["labels"] == {"gpu": ["H100", "A100"], "zone": "eu"}
    assert status["preemptible"] is True


def test_submit_an_elastic_request_and_a_bad_minimum(env: dict[str, str]) -> None:
    submitted = runner.invoke(app, ["submit", "workers.tasks.probe", "--gpus", "8", "--min-gpus", "2", "--json"],
                              env=env)
    assert submitted.exit_code == 0, submitted.output
    task_id = json.loads(submitted.output)["id"]
    status = json.loads(runner.invoke(app, ["status", task_id, "--json"], env=env).output)
    assert (status["resources"]["gpus"], status["resources"]["min_gpus"]) == (8, 2)
    assert "2-8 GPU" in runner.invoke(app, ["status", task_id], env=env).output
    refused = runner.invoke(app, ["submit", "workers.tasks.probe", "--gpus", "2", "--min-gpus", "3"], env=env)
    assert refused.exit_code != 0 and "min_gpus" in refused.output


def test_host_node_id_is_the_hostname_made_a_valid_node_id() -> None:
    assert host_node_id("gpu-a.example.com") == "gpu-a.example.com"
    assert host_node_id("Rack 4/GPU #2") == "Rack-4-GPU--2"
    assert host_node_id("-" + "x" * 80) == "x" * 64
    assert host_node_id("") == "node"


@pytest.mark.parametrize("command", [["worker", "--node", "n1"], ["dispatcher"]])
def test_a_log_level_that_is_not_one_is_refused_naming_the_option(env: dict[str, str], command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--log-level", "LOUD"], env=env)
    assert result.exit_code == 2 and "--log-level" in result.output and "'LOUD' is not a log level" in result.output
