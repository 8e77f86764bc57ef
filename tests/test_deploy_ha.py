"""docker-compose.ha.yml, checked without a Docker engine (as tests/test_deploy_files.py does for
docker-compose.yml): a master, a replica and three sentinels, and every gpubroker service on the
Sentinel URL with min_replicas_ack=1. The sentinel configuration it writes is run by a real
``redis-server --sentinel`` against a real master here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.redis_urls import parse_sentinel
from broker.settings import Settings
from tests.support import RedisServer, free_port, wait_until
from tests.test_deploy_files import GPUBROKER_SERVICES, ROOT, compose_document, interpolate

HA_FILE = ROOT / "docker-compose.ha.yml"
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")


@pytest.fixture(scope="module")
def ha() -> dict[str, Any]:
    return compose_document(HA_FILE)


def sentinel_lines(service: dict[str, Any]) -> list[str]:
    """The lines the sentinel's command writes into its configuration file."""
    script = service["command"][-1]
    return re.findall(r'^\s*"([^"$]+)" \\?$', script, re.MULTILINE)


def test_master_replica_and_three_sentinels(ha: dict[str, Any]) -> None:
    services = ha["services"]
    assert {"redis", "redis-replica", *SENTINELS} <= set(services)
    replica = services["redis-replica"]["environment"]["REDIS_REPLICATION"].split()
    assert replica[replica.index("--replicaof") + 1:][:2] == ["redis", "6379"]
    for name in ("redis", "redis-replica"):  # the base file's password, and masterauth for either role
        script = services[name]["command"][-1]
        assert "requirepass %s" in script and "masterauth %s" in script, name
    assert services["redis-replica"]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    for name in SENTINELS:
        lines = sentinel_lines(services[name])
        assert "sentinel monitor gpubroker redis 6379 2" in lines, name  # quorum 2 of 3
        assert '"sentinel auth-pass gpubroker $${REDIS_PASSWORD}"' in services[name]["command"][-1], name
        assert f"{name}-data:/data" in services[name]["volumes"], "its learned state survives a restart"
        assert services[name]["healthcheck"]["test"][-2:] == ["get-master-addr-by-name", "gpubroker"]


def test_every_gpubroker_service_is_on_the_sentinel_url(ha: dict[str, Any]) -> None:
    services = ha["services"]
    for name in GPUBROKER_SERVICES:
        env = services[name]["environment"]
        url = interpolate(env["GPUBROKER_REDIS_URL"], {"REDIS_PASSWORD": "s3cret"})
        target = parse_sentinel(url)
        assert target.service == "gpubroker", name
        assert {host for host, _ in target.sentinels} == set(SENTINELS), name
        assert {port for _, port in target.sentinels} == {26379}, name
        assert target.password == "s3cret", name  # the master's: Redis refuses a client without it
        assert Settings(redis_url=url).url == url
        assert env["GPUBROKER_MIN_REPLICAS_ACK"] == "${GPUBROKER_MIN_REPLICAS_ACK:-1}", name
        assert set(services[name]["depends_on"]) == set(SENTINELS), name
    assert set(ha["volumes"]) == {"redis-replica-data", *(f"{s}-data" for s in SENTINELS)}


def test_the_sentinel_configuration_runs(ha: dict[str, Any], tmp_path: Path) -> None:
    """The configuration the compose file writes, on loopback ports: the sentinel starts and finds the master."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed here")
    master = RedisServer(tmp_path / "master")
    master.start()
    port = free_port()
    lines = [line.replace("redis 6379", f"127.0.0.1 {master.port}").replace("port 26379", f"port {port}")
             for line in sentinel_lines(ha["services"]["sentinel-1"])]
    conf = tmp_path / "sentinel.conf"
    conf.write_text("\n".join([*lines, "bind 127.0.0.1", ""]))
    proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.2)

        def found() -> bool:
            assert proc.poll() is None, "redis-server --sentinel refused the configuration"
            try:
                return client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "gpubroker") is not None
            except redis.ConnectionError:
                return False

        wait_until(found, 10, what="the sentinel to start")
        assert int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "gpubroker")[1]) == master.port
    finally:
        proc.kill()
        proc.wait(10)
        master.stop()
