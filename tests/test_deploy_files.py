"""Checks of the deployment files (Dockerfile, docker-compose.yml, config/) that need no Docker engine.

The compose file is parsed with PyYAML and its ``${VAR...}`` values are interpolated here the way
Compose does it; the worker's shell command is run with stand-ins for ``gpubroker`` and
``hostname`` and the arguments it produces are parsed by the real CLI. Only where the docker CLI
has the compose plugin is ``docker compose config`` itself run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel

import workers.cli  # noqa: F401 - registers the ``worker`` command on broker.cli.app
from broker.cli import app as cli_app
from broker.settings import Settings
from tests.support import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ACL_FILE = ROOT / "docker-compose.acl.yml"
CONFIG = ROOT / "config"
SERVICES = ("redis", "dispatcher", "worker", "flower")
# Compose sets it itself (the project name), for interpolation.
COMPOSE_PROVIDED = {"COMPOSE_PROJECT_NAME"}
ACL_ROLES = ("ADMIN", "PRODUCER", "DISPATCHER", "WORKER", "MONITOR", "FLOWER")
GPUBROKER_SERVICES = ("dispatcher", "worker", "flower")
SETTING_VARS = sorted(f"GPUBROKER_{name.upper()}" for name in Settings.model_fields)

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, and $$ (a literal $).
_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation, for the forms this project uses."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        missing = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in {":?", "?"} and missing:
            raise MissingVariable(f"{name}: {arg}")
        if op in {":-", "-"} and missing:
            return arg
        return current or ""

    return _INTERPOLATION.sub(one, value)


def referenced_variables(text: str) -> set[str]:
    return {m.group("name") for m in _INTERPOLATION.finditer(text) if m.group("name")}


def _strings(node: Any) -> list[str]:
    """Every string in a parsed YAML document (keys too): where Compose interpolates."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in (*_strings(key), *_strings(value))]
    if isinstance(node, list):
        return [text for item in node for text in _strings(item)]
    return []


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return command if isinstance(command, str) else " ".join(command)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
            values[key.strip()] = shlex.split(value)[0] if value.strip() else ""
    return values


def redis_directives(path: Path) -> dict[str, list[list[str]]]:
    directives: dict[str, list[list[str]]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, *args = shlex.split(line)
            directives.setdefault(name.lower(), []).append(args)
    return directives


def cli_commands() -> dict[str, Any]:
    """The real ``gpubroker`` commands (Typer ships its own Click, so these are duck-typed)."""
    return dict(typer.main.get_command(cli_app).commands)  # type: ignore[attr-defined]


def long_options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")}


def compose_document(path: Path) -> dict[str, Any]:
    """A compose file, parsed (the test skips where PyYAML is not installed)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed in this environment")
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_document(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(CONFIG / "gpubroker.env.example")


def argv_stubs(tmp_path: Path) -> Path:
    """A folder of stand-ins for a container's commands: ``gpubroker`` (and ``redis-server``) print
    their argv (NUL separated), ``hostname`` a container id (``-i``: its address, 10.0.0.2), and
    ``getent hosts NAME`` resolves NAME from the file ``hosts`` beside them, as the compose
    network's DNS would."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    argv = '#!/bin/sh\nfor a in "$@"; do printf \'%s\\0\' "$a"; done\n'
    (stubs / "gpubroker").write_text(argv)
    (stubs / "redis-server").write_text(argv)
    (stubs / "hostname").write_text('#!/bin/sh\nif [ "$1" = -i ]; then echo 10.0.0.2; else echo c0ffee123456; fi\n')
    (stubs / "hosts").write_text("")
    (stubs / "getent").write_text(f'#!/bin/sh\nexec awk -v n="$2" \'$2 == n {{print $1 "  " $2}}\' {stubs / "hosts"}\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    return stubs


# ---- docker-compose.yml ----------------------------------------------------------------------


def test_compose_has_the_four_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(SERVICES) <= set(services)


def test_redis_service_persists_and_has_a_healthcheck(compose: dict[str, Any],
                                                       services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    assert "./config/redis.conf:/usr/local/etc/redis/redis.conf:ro" in redis["volumes"]
    assert redis_directives(CONFIG / "redis.conf")["appendonly"] == [["yes"]]
    data = [v for v in redis["volumes"] if str(v).endswith(":/data")]
    assert data, "redis needs a volume on /data"
    assert data[0].split(":")[0] in compose["volumes"], "the data volume must be a named volume"
    test = redis["healthcheck"]["test"]
    assert "redis-cli" in test and "ping" in test
    # redis-cli logs in with REDISCLI_AUTH: the healthcheck needs the password too.
    assert redis["environment"]["REDISCLI_AUTH"] == redis["environment"]["REDIS_PASSWORD"]
    # Reachable from the compose network only (and with the password only).
    assert "ports" not in redis


def test_gpubroker_services_wait_for_a_healthy_redis(services: dict[str, dict[str, Any]]) -> None:
    for name in GPUBROKER_SERVICES:
        service = services[name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        url = interpolate(service["environment"]["GPUBROKER_REDIS_URL"], {"REDIS_PASSWORD": "s3cret"})
        assert url == "redis://:s3cret@redis:6379/0", name
        with pytest.raises(MissingVariable):  # no password, no stack
            interpolate(service["environment"]["GPUBROKER_REDIS_URL"], {})
    assert services["dispatcher"]["restart"] == "unless-stopped"
    assert command_text(services["dispatcher"]).startswith("gpubroker dispatcher")


def test_one_image_built_once(services: dict[str, dict[str, Any]]) -> None:
    builders = [name for name, service in services.items() if "build" in service]
    assert builders == ["dispatcher"], "one service builds; the others run its tag"
    build = services["dispatcher"]["build"]
    assert build == "." or build["context"] == "."
    for name in GPUBROKER_SERVICES:
        assert services[name]["image"] == "gpubroker:local", name


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check["test"], f"{name} has no healthcheck"
        assert {"interval", "timeout", "retries", "start_period"} <= set(check), name


def _run_redis_command(command: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh here")
    stubs = argv_stubs(tmp_path)
    argv = [interpolate(part, {}) for part in command]
    assert argv[:2] == ["sh", "-c"]
    return subprocess.run([sh, *argv[1:]], env={**env, "TMPDIR": str(tmp_path), "PATH": f"{stubs}:/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30, check=False)


def _serve(conf: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A real redis-server on a free loopback port with ``conf``, its include pointed at the repo's
    redis.conf and its data in ``tmp_path``."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed here")
    base = tmp_path / "redis.conf.base"
    base.write_text(re.sub(r"(?m)^dir /data$", f"dir {tmp_path}", (CONFIG / "redis.conf").read_text()))
    conf.write_text(conf.read_text().replace("include /usr/local/etc/redis/redis.conf", f"include {base}"))
    port = free_port()
    proc = subprocess.Popen([binary, str(conf), "--port", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port


def test_redis_runs_with_the_password(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    import redis

    command = services["redis"]["command"]
    refused = _run_redis_command(command, tmp_path, {"REDIS_PASSWORD": "not/url-safe"})
    assert refused.returncode != 0 and "letters and digits" in refused.stderr
    done = _run_redis_command(command, tmp_path, {"REDIS_PASSWORD": "s3cret"})
    assert done.returncode == 0, done.stderr
    conf = tmp_path / "redis.conf"
    assert done.stdout.split("\0")[:-1] == [str(conf)], "redis-server reads the written file, no password in argv"
    assert conf.stat().st_mode & 0o077 == 0, "the file with the password is private"
    proc, port = _serve(conf, tmp_path)
    try:
        anonymous = redis.Redis(port=port, socket_connect_timeout=0.2)
        with_password = redis.Redis(port=port, password="s3cret", socket_connect_timeout=0.2)

        def up() -> bool:
            try:
                return bool(with_password.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 10, what="redis-server with the compose command's config")
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        assert with_password.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        proc.kill()
        proc.wait(10)


def test_every_setting_reaches_the_gpubroker_containers(services: dict[str, dict[str, Any]]) -> None:
    for name in GPUBROKER_SERVICES:
        missing = set(SETTING_VARS) - set(services[name]["environment"])
        assert not missing, f"{name} does not pass {sorted(missing)}"


def test_worker_is_scalable(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "hostname" not in worker, "a fixed hostname would give every replica the same node id"
    assert '--node "$$node"' in command_text(worker)


def _run_worker_command(services: dict[str, dict[str, Any]], tmp_path: Path, shell_env: dict[str, str],
                        hosts: str = "") -> list[str]:
    """Run the worker's command as the container would, with a stand-in gpubroker; its argv."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh here")
    worker = services["worker"]
    stubs = argv_stubs(tmp_path)
    (stubs / "hosts").write_text(hosts)
    shell_env = {"COMPOSE_PROJECT_NAME": "gpubroker", "REDIS_PASSWORD": "pw", **shell_env}
    env = {key: interpolate(str(value), shell_env) for key, value in worker["environment"].items() if value is not None}
    env["PATH"] = f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin"
    env["TMPDIR"] = str(tmp_path)
    argv = [interpolate(part, shell_env) for part in worker["command"]]
    assert argv[0] == "sh" and argv[1] == "-c"
    done = subprocess.run([sh, *argv[1:]], env=env, capture_output=True, timeout=30, check=True)
    return done.stdout.decode().split("\0")[:-1]


def test_worker_command_names_each_replica_worker_n(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    # This container (10.0.0.2) is gpubroker-worker-2; replica 1 and another project's replica exist.
    hosts = "10.0.0.1 gpubroker-worker-1\n10.0.0.2 gpubroker-worker-2\n10.0.0.9 other-worker-3\n"
    args = _run_worker_command(services, tmp_path, {}, hosts)
    assert args[0] == "worker"
    ctx = cli_commands()["worker"].make_context("worker", args[1:])  # parses and validates, runs nothing
    params = ctx.params
    assert params["node"] == "worker-2"
    assert (tmp_path / "gpubroker-node").read_text() == "worker-2\n", "the healthcheck reads the node id here"
    # Another project name: its own containers only.
    args = _run_worker_command(services, tmp_path, {"COMPOSE_PROJECT_NAME": "other"}, hosts)
    assert cli_commands()["worker"].make_context("worker", args[1:]).params["node"] == "c0ffee123456"


def test_worker_command_falls_back_to_the_hostname(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    # No container name resolves to this one (no compose DNS): the container hostname, as before.
    args = _run_worker_command(services, tmp_path, {})
    assert args[0] == "worker"
    params = cli_commands()["worker"].make_context("worker", args[1:]).params
    assert params["node"] == "c0ffee123456"
    # The default shape: a simulated 4-GPU node.
    assert params["gpus"] == "4"
    assert params["gpu_memory_mb"] == 81920
    assert params["slots"] >= 1
    assert params["label"] == ["gpu_model=simulated", "zone=compose"]
    assert not params["tasks"]


def test_worker_command_for_real_gpus(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    shell_env = {"WORKER_GPUS": "auto", "WORKER_GPU_MEMORY_MB": "", "WORKER_LABELS": "zone=a",
                 "WORKER_TASKS": "mymodels.tasks other.tasks"}
    args = _run_worker_command(services, tmp_path, shell_env)
    assert "--gpu-memory-mb" not in args, "an empty WORKER_GPU_MEMORY_MB must leave the memory to NVML"
    params = cli_commands()["worker"].make_context("worker", args[1:]).params
    assert params["gpus"] == "auto"
    assert params["gpu_memory_mb"] is None
    assert params["label"] == ["zone=a"]
    assert params["tasks"] == ["mymodels.tasks", "other.tasks"]


def test_worker_has_a_commented_gpu_example() -> None:
    text = COMPOSE_FILE.read_text()
    for pattern in (r"^\s*#\s*devices:", r"^\s*#\s*- driver: nvidia", r"^\s*#\s*capabilities: \[gpu\]",
                    r"^\s*#.*--gpus auto"):
        assert re.search(pattern, text, re.MULTILINE), pattern


def test_gpubroker_commands_and_options_in_compose_exist(services: dict[str, dict[str, Any]]) -> None:
    commands = cli_commands()
    checked = 0
    for name, service in services.items():
        text = command_text(service)
        for sub in re.findall(r"\bgpubroker\s+([a-z][a-z-]*)", text):
            assert sub in commands, f"{name}: `gpubroker {sub}` is not a command"
            unknown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)) - long_options(commands[sub])
            assert not unknown, f"{name}: gpubroker {sub} has no option {sorted(unknown)}"
            checked += 1
    assert checked >= 2  # dispatcher and worker


def test_dispatcher_and_worker_have_gpubroker_health_checks(services: dict[str, dict[str, Any]],
                                                            tmp_path: Path) -> None:
    health = cli_commands()["health"].commands
    dispatcher = services["dispatcher"]["healthcheck"]
    assert dispatcher["test"] == ["CMD", "gpubroker", "health", "dispatcher"]
    worker = services["worker"]["healthcheck"]
    kind, line = worker["test"]
    assert kind == "CMD-SHELL"
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh here")
    # Run it as the container would (compose turns $$ into $), with stand-ins that print argv.
    stubs = argv_stubs(tmp_path)
    (tmp_path / "gpubroker-node").write_text("worker-3\n")  # as the worker's command writes it
    done = subprocess.run([sh, "-c", line.replace("$$", "$")],
                          env={"PATH": f"{stubs}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}, capture_output=True,
                          check=True)
    args = done.stdout.decode().split("\0")[:-1]
    assert args[:2] == ["health", "worker"]
    params = health["worker"].make_context("worker", args[2:]).params
    assert params["node"] == "worker-3"  # the node id the worker command registered with
    health["dispatcher"].make_context("dispatcher", dispatcher["test"][4:])
    for check in (dispatcher, worker):
        assert {"interval", "timeout", "retries", "start_period"} <= set(check)


def test_flower_requires_basic_auth(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    assert flower["command"] == ["celery", "-A", "broker.celery_conf:app", "flower",
                                 "--conf=/app/config/flowerconfig.py"]
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]+\}", auth)
    with pytest.raises(MissingVariable):
        interpolate(auth, {})
    with pytest.raises(MissingVariable):
        interpolate(auth, {"FLOWER_BASIC_AUTH": ""})
    assert interpolate(auth, {"FLOWER_BASIC_AUTH": "admin:s3cret"}) == "admin:s3cret"
    assert any(str(port).endswith(":5555") for port in flower["ports"])
    assert "./config/flowerconfig.py:/app/config/flowerconfig.py:ro" in flower["volumes"]


def test_flower_app_is_importable() -> None:
    from celery import Celery

    from broker import celery_conf

    assert isinstance(celery_conf.app, Celery)


def test_compose_variables_are_in_the_env_example(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    acl = pytest.importorskip("yaml").safe_load(ACL_FILE.read_text())
    used = set().union(*(referenced_variables(text) for text in (*_strings(compose), *_strings(acl))))
    assert used, "expected ${...} variables in docker-compose.yml"
    missing = used - set(env_example) - COMPOSE_PROVIDED
    assert not missing, f"config/gpubroker.env.example lacks {sorted(missing)}"
    # The example's worker shape is the compose file's default shape.
    worker_env = compose["services"]["worker"]["environment"]
    for key, value in worker_env.items():
        if key.startswith("WORKER_"):
            assert interpolate(value, env_example) == interpolate(value, {}), key


def _acl_users() -> set[str]:
    return {line.split()[1] for line in (CONFIG / "redis-acl.conf").read_text().splitlines()
            if line.startswith("user ")}


@pytest.fixture(scope="module")
def acl_services() -> dict[str, dict[str, Any]]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed in this environment")
    return dict(yaml.safe_load(ACL_FILE.read_text())["services"])


def test_acl_variant_gives_each_service_its_role(acl_services: dict[str, dict[str, Any]]) -> None:
    users = _acl_users()
    passwords = {f"REDIS_{role}_PASSWORD": f"pw{role.lower()}" for role in ACL_ROLES}
    for name in GPUBROKER_SERVICES:
        url = interpolate(acl_services[name]["environment"]["GPUBROKER_REDIS_URL"], passwords)
        user, _, rest = url.removeprefix("redis://").partition(":")
        assert user == name and user in users, f"{name} logs in as {user!r}"
        assert rest == f"pw{name}@redis:6379/0", name
    redis = acl_services["redis"]
    assert "./config/redis-acl.conf:/usr/local/etc/redis/redis-acl.conf:ro" in redis["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "--user", "monitor", "ping"]
    assert "monitor" in users
    assert redis["environment"]["REDISCLI_AUTH"] == redis["environment"]["REDIS_MONITOR_PASSWORD"]
    # Every role of the ACL file gets a password from the environment.
    assert {f"REDIS_{user.upper()}_PASSWORD" for user in users - {"default"}} <= set(redis["environment"])


def test_acl_variant_redis_loads_every_role(acl_services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    import redis

    command = acl_services["redis"]["command"]
    passwords = {f"REDIS_{role}_PASSWORD": f"pw{role.lower()}" for role in ACL_ROLES}
    (tmp_path / "redis-acl.conf").write_text((CONFIG / "redis-acl.conf").read_text())
    command = [part.replace("/usr/local/etc/redis/redis-acl.conf", str(tmp_path / "redis-acl.conf"))
               for part in command]
    missing = _run_redis_command(command, tmp_path, {**passwords, "REDIS_WORKER_PASSWORD": ""})
    assert missing.returncode != 0 and "REDIS_WORKER_PASSWORD" in missing.stderr
    done = _run_redis_command(command, tmp_path, passwords)
    assert done.returncode == 0, done.stderr
    assert "CHANGE-ME" not in (tmp_path / "users.acl").read_text()
    proc, port = _serve(tmp_path / "redis.conf", tmp_path)
    try:
        def up() -> bool:
            try:
                return bool(redis.Redis(port=port, username="monitor", password="pwmonitor",
                                        socket_connect_timeout=0.2).ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 10, what="redis-server with the ACL variant's config")
        for user in _acl_users() - {"default"}:
            assert redis.Redis(port=port, username=user, password=f"pw{user}").ping(), user
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=port, username=user, password="CHANGE-ME-" + user + "-password").ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
    finally:
        proc.kill()
        proc.wait(10)


def test_monitoring_profile_scrapes_the_services(services: dict[str, dict[str, Any]]) -> None:
    yaml = pytest.importorskip("yaml")
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert "./config/monitoring:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert all(str(port).startswith("127.0.0.1:") for port in prometheus["ports"])
    scrape = yaml.safe_load((CONFIG / "monitoring" / "prometheus.yml").read_text())
    targets = {t for c in scrape["scrape_configs"] for sc in c.get("static_configs", ()) for t in sc["targets"]}
    targets |= {f"{name}:{sd['port']}" for c in scrape["scrape_configs"] for sd in c.get("dns_sd_configs", ())
                for name in sd["names"]}  # a service name resolves to every replica
    assert "dispatcher:9808" in targets and "9808" in [str(p) for p in services["dispatcher"]["expose"]]
    assert "worker:9809" in targets and "9809" in [str(p) for p in services["worker"]["expose"]]
    assert "--metrics-port 9809" in " ".join(map(str, services["worker"]["command"]))
    assert "flower:5555" in targets
    for target in targets:
        host = target.split(":")[0]
        assert host in services or host == "127.0.0.1", f"{target}: no such service"


def test_worker_reconnect_notice_is_silenced() -> None:
    import warnings

    from celery.exceptions import CPendingDeprecationWarning
    from celery.signals import worker_ready
    from celery.worker.consumer.consumer import CANCEL_TASKS_BY_DEFAULT

    from broker import celery_conf

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        celery_conf.quiet_reconnect_warning()
        # What a worker's logging setup does next (celery.app.log.Logging.setup), then the worker is ready.
        warnings.filterwarnings("always", category=CPendingDeprecationWarning)
        warnings.warn(CANCEL_TASKS_BY_DEFAULT, CPendingDeprecationWarning, stacklevel=1)
        worker_ready.send(sender=None)
        warnings.warn(CANCEL_TASKS_BY_DEFAULT, CPendingDeprecationWarning, stacklevel=1)
        warnings.warn("another notice", CPendingDeprecationWarning, stacklevel=1)
    # Celery's filter wins until the worker is ready (the notice comes only on a reconnect), then ours.
    assert [str(w.message) for w in caught] == [CANCEL_TASKS_BY_DEFAULT, "another notice"]
    # Silenced, not changed: a worker keeps its running tasks when Redis goes away.
    settings = celery_conf.celery_settings(Settings())
    assert settings["worker_cancel_long_running_tasks_on_connection_loss"] is False


# ---- docker compose itself, where the plugin exists ---------------------------------------------


def _docker_compose_available() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30,
                              check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_docker_compose_config(tmp_path: Path) -> None:
    if not _docker_compose_available():
        pytest.skip("the docker CLI with the compose plugin is not installed here (`docker compose version` fails)")
    empty = tmp_path / "empty.env"
    empty.write_text("")  # so a developer's .env does not decide the outcome
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH" and not k.startswith("REDIS_")}
    env["REDIS_PASSWORD"] = "s3cret"
    base = ["docker", "compose", "--env-file", str(empty), "-f", str(COMPOSE_FILE), "config", "--quiet"]
    ok = subprocess.run(base, cwd=ROOT, env={**env, "FLOWER_BASIC_AUTH": "admin:s3cret"}, capture_output=True,
                        text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    acl = ["docker", "compose", "--env-file", str(empty), "-f", str(COMPOSE_FILE), "-f", str(ACL_FILE), "config",
           "--quiet"]
    passwords = {f"REDIS_{role}_PASSWORD": "pw" for role in ACL_ROLES}
    ok = subprocess.run(acl, cwd=ROOT, env={**env, **passwords, "FLOWER_BASIC_AUTH": "admin:s3cret"},
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    no_password = subprocess.run(base, cwd=ROOT, env={**env, "REDIS_PASSWORD": "", "FLOWER_BASIC_AUTH": "a:b"},
                                 capture_output=True, text=True, timeout=60, check=False)
    assert no_password.returncode != 0 and "REDIS_PASSWORD" in no_password.stderr
    refused = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode != 0
    assert "FLOWER_BASIC_AUTH" in refused.stderr


# ---- config/ ---------------------------------------------------------------------------------


def test_config_is_not_a_python_package() -> None:
    assert not (CONFIG / "__init__.py").exists()


def test_redis_conf_persistence_settings() -> None:
    directives = redis_directives(CONFIG / "redis.conf")
    assert directives["appendonly"] == [["yes"]]
    assert directives["appendfsync"] == [["everysec"]]
    assert directives["maxmemory-policy"] == [["noeviction"]]
    assert directives["save"] and directives["save"][0], "RDB snapshots should be on too"
    assert directives["dir"] == [["/data"]]
    assert directives["no-appendfsync-on-rewrite"] == [["no"]]


def test_redis_conf_is_accepted_by_redis_server(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed here")
    import redis

    port = free_port()
    # The file as written, only with a scratch directory for /data (which must exist when read),
    # pinned to loopback and a free port.
    conf = tmp_path / "redis.conf"
    conf.write_text(re.sub(r"(?m)^dir /data$", f"dir {tmp_path}", (CONFIG / "redis.conf").read_text()))
    proc = subprocess.Popen([binary, str(conf), "--port", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, socket_connect_timeout=0.2, decode_responses=True)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                output = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"redis-server refused config/redis.conf:\n{output}")
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 10, what="redis-server with config/redis.conf")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("save")["save"]
    finally:
        client.close()
        proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def test_flowerconfig_compiles_and_sets_only_flower_options() -> None:
    path = CONFIG / "flowerconfig.py"
    code = compile(path.read_text(), str(path), "exec")
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    settings = {k: v for k, v in namespace.items() if not k.startswith("__")}
    from flower.options import default_options

    known = {name.replace("-", "_") for name in default_options._options}
    assert set(settings) <= known, f"not Flower options: {sorted(set(settings) - known)}"
    assert settings["port"] == 5555
    assert settings["address"] == "0.0.0.0"
    assert settings["persistent"] is False
    assert isinstance(settings["max_tasks"], int)
    assert isinstance(settings["purge_offline_workers"], int)
    # Flower applies this file over FLOWER_* variables: setting basic_auth here would override FLOWER_BASIC_AUTH.
    assert "basic_auth" not in settings
    assert "FLOWER_BASIC_AUTH" in path.read_text()


def test_env_example_lists_every_setting_with_its_default(env_example: dict[str, str]) -> None:
    missing = set(SETTING_VARS) - set(env_example)
    assert not missing, f"config/gpubroker.env.example lacks {sorted(missing)}"
    unknown = {k for k in env_example if k.startswith("GPUBROKER_")} - set(SETTING_VARS)
    assert not unknown, f"config/gpubroker.env.example names unknown settings {sorted(unknown)}"
    for name, field in Settings.model_fields.items():
        value = env_example[f"GPUBROKER_{name.upper()}"]
        # A nested model (scheduling) is JSON in the environment, as pydantic-settings reads it.
        nested = (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)) or (
            typing.get_origin(field.annotation) in (list, dict))
        parsed = getattr(Settings(**{name: json.loads(value) if nested else value}), name)
        default = field.get_default(call_default_factory=True)
        assert parsed == default, f"GPUBROKER_{name.upper()}={value} is not the default {default!r}"
    for secret in ("FLOWER_BASIC_AUTH", "REDIS_PASSWORD", *(f"REDIS_{role}_PASSWORD" for role in ACL_ROLES)):
        assert env_example[secret] == "", f"the example must not ship a password ({secret})"


def test_env_example_comments_every_variable() -> None:
    lines = (CONFIG / "gpubroker.env.example").read_text().splitlines()
    for before, line in itertools.pairwise(lines):
        if line.strip() and not line.startswith("#"):
            assert before.startswith("# "), f"{line!r} has no comment line above it"


# ---- Dockerfile ------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_base_image_is_an_argument() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("BASE_IMAGE=")
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms and all(rest.split()[0] == "${BASE_IMAGE}" for rest in froms)


def test_dockerfile_installs_the_project_and_runs_as_non_root() -> None:
    instructions = _dockerfile_instructions()
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "pip install" in runs
    assert not re.search(r"pip install[^&]*(\s-e\s|--editable)", runs)
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert instructions[-1] == ("CMD", '["gpubroker", "--help"]')
    # Flower's config must be where the compose file's --conf points (WORKDIR /app, config/ copied in).
    assert ("WORKDIR", "/app") in instructions
    assert ("COPY", "config ./config") in instructions


def test_dockerignore_keeps_local_state_out() -> None:
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", ".demo", "**/__pycache__", ".pytest_cache"} <= entries
    assert ".env" in entries, "a .env with the Flower password must not reach the image"


def test_cli_entry_point_is_the_one_the_image_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "workers", "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    for command in ("dispatcher", "worker"):
        assert command in done.stdout
