"""``make compose-check``: docker-compose.yml run in a real Docker engine, as an operator would.

Brings the stack up (one image build, Redis with a password), then under a steady load of probe
tasks: scales the workers 1 -> 3, checks the node names and every healthcheck, freezes the
dispatcher (its healthcheck must fail) and thaws it, restarts Redis, drains worker-2 (nothing new
starts there), scales 3 -> 1, and at the end checks that nothing was lost: every submitted task
reached a final state exactly once (one task per submit, one attempt each, once in the finished
index) and every node's capacity is whole again. Then it tears the stack down (volumes too).

With ``--ha`` (docker-compose.ha.yml: a replica, three sentinels, every service on the Sentinel
URL with ``min_replicas_ack`` 1) the Redis restart is a failover instead: the master is
SIGKILLed, the sentinels must promote the replica, the old master is started again and must come
back as the new master's replica; the figures are how long submits were refused and how long
until the sentinels named the new master, and the ledger at the end must still be exact.

    python -m bench.compose_check [--tasks 1000] [--rate 1] [--acl] [--ha] [--monitoring] [--keep] [--output FILE]

Needs Docker with Compose v2 and the images docker-compose.yml starts from (scripts/base_images.sh
makes local ones where no registry is reachable). It runs as its own compose project
(gpubroker-check), with a generated .env, so it touches no other stack. Not part of the test suite.
Exits 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "gpubroker-check"
ROLES = ("ADMIN", "PRODUCER", "DISPATCHER", "WORKER", "MONITOR", "FLOWER")
FLOWER_PORT, PROMETHEUS_PORT = 15555, 19090


class Check:
    def __init__(self, out: TextIO, env_file: Path, acl: bool, monitoring: bool, ha: bool = False) -> None:
        self.out, self.env_file, self.acl, self.monitoring, self.ha = out, env_file, acl, monitoring, ha
        self.extra = 4 if ha else 0  # containers besides those of docker-compose.yml: a replica, 3 sentinels
        self.t0 = time.time()
        self.failures: list[str] = []

    def log(self, text: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {text}"
        print(line, flush=True)
        if self.out is not sys.stdout:
            self.out.write(line + "\n")
            self.out.flush()

    def expect(self, ok: bool, what: str) -> None:
        self.log(f"{'PASS' if ok else 'FAIL'}: {what}")
        if not ok:
            self.failures.append(what)

    def compose_argv(self, *args: str) -> list[str]:
        files = (["-f", "docker-compose.yml"] + (["-f", "docker-compose.acl.yml"] if self.acl else [])
                 + (["-f", "docker-compose.ha.yml"] if self.ha else []))
        profiles = ["--profile", "monitoring"] if self.monitoring else []
        return ["docker", "compose", "-p", PROJECT, "--env-file", str(self.env_file), *files, *profiles, *args]

    def compose(self, *args: str, check: bool = True, quiet: bool = False, stdin: str | None = None,
                timeout: float = 600) -> subprocess.CompletedProcess[str]:
        shown = [arg if "\n" not in arg else f"<{arg.count(chr(10))}-line script>" for arg in args]
        self.log("$ docker compose " + " ".join(shown))
        done = subprocess.run(self.compose_argv(*args), cwd=ROOT, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if not quiet:
            for line in (done.stdout + done.stderr).strip().splitlines()[-25:]:
                self.log(f"    {line}")
        if check and done.returncode != 0:
            if quiet:
                self.log(done.stderr.strip()[-2000:])
            raise SystemExit(f"docker compose {' '.join(args)} exited {done.returncode}")
        return done

    def gpubroker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``gpubroker ARGS`` in the dispatcher's container, as an operator (admin in the ACL variant)."""
        return self.compose("exec", "-T", *self.admin_env(), "dispatcher", "gpubroker", *args, check=check)

    def admin_env(self) -> list[str]:
        if not self.acl:
            return []
        password = read_env(self.env_file)["REDIS_ADMIN_PASSWORD"]
        return ["-e", f"GPUBROKER_REDIS_URL=redis://admin:{password}@redis:6379/0"]

    def container_health(self) -> dict[str, str]:
        ids = subprocess.run(self.compose_argv("ps", "-q"), cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
        if not ids:
            return {}
        fmt = "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}no-healthcheck{{end}}"
        done = subprocess.run(["docker", "inspect", "-f", fmt, *ids], capture_output=True, text=True, check=True)
        return dict(line.lstrip("/").split(" ", 1) for line in done.stdout.strip().splitlines())

    def nodes(self) -> list[dict[str, Any]]:
        done = self.compose("exec", "-T", *self.admin_env(), "dispatcher", "gpubroker", "nodes", "--json",
                            quiet=True)
        return list(json.loads(done.stdout))


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def write_env(path: Path) -> None:
    lines = {
        "REDIS_PASSWORD": secrets.token_hex(16),
        "FLOWER_BASIC_AUTH": f"check:{secrets.token_hex(8)}",
        "FLOWER_PORT": f"127.0.0.1:{FLOWER_PORT}",
        "PROMETHEUS_PORT": str(PROMETHEUS_PORT),
        **({"PROMETHEUS_IMAGE": os.environ["PROMETHEUS_IMAGE"]} if os.environ.get("PROMETHEUS_IMAGE") else {}),
        **{f"REDIS_{role}_PASSWORD": secrets.token_hex(16) for role in ROLES},
    }
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))


class Load(threading.Thread):
    """``compose_load submit`` in the dispatcher's container; the ids it prints."""

    def __init__(self, check: Check, tasks: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.check, self.tasks, self.rate = check, tasks, rate
        self.submitted: list[dict[str, Any]] = []
        self.retries = 0
        self.returncode: int | None = None
        self.stderr = ""

    def run(self) -> None:
        script = (ROOT / "bench" / "compose_load.py").read_text()
        argv = self.check.compose_argv("exec", "-T", *self.check.admin_env(), "dispatcher", "python", "-",
                                       "submit", str(self.tasks), str(self.rate))
        proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdin and proc.stdout and proc.stderr
        proc.stdin.write(script)
        proc.stdin.close()
        for line in proc.stdout:
            item = json.loads(line)
            if "retry" in item:
                self.retries += 1
            else:
                self.submitted.append(item)
        self.stderr = proc.stderr.read()
        self.returncode = proc.wait()


def running_on(nodes: list[dict[str, Any]]) -> dict[str, int]:
    return {n["id"]: n["tasks"] for n in nodes}


def wait_for(check: Check, what: str, predicate: Any, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(3)
    check.log(f"timed out after {timeout:.0f}s waiting for {what}")
    return False


def prometheus(query: str) -> Any:
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/{query}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["data"]


def check_prometheus(check: Check) -> None:
    """Every scrape target up, and the dispatcher's metrics agree with the three nodes."""
    def targets() -> dict[str, str]:
        try:
            return {t["labels"]["job"]: t["health"] for t in prometheus("targets")["activeTargets"]}
        except OSError:
            return {}

    ok = wait_for(check, "every scrape target up", lambda: bool(targets()) and set(targets().values()) == {"up"}, 120)
    check.expect(ok, f"Prometheus scrapes every target: {targets()}")
    query = urllib.request.quote('sum(gpubroker_nodes{state="up"})')
    result = prometheus(f"query?query={query}")["result"]
    check.expect(bool(result) and float(result[0]["value"][1]) == 3, f"gpubroker_nodes up per Prometheus: {result}")


def wait_healthy(check: Check, containers: int, timeout: float) -> bool:
    """Until the engine reports ``containers`` gpubroker containers (Prometheus aside), all healthy."""
    flaps: list[str] = []

    def ok() -> bool:
        health = {k: v for k, v in check.container_health().items() if "prometheus" not in k}
        flaps.extend(f"{k} {v}" for k, v in health.items() if v == "unhealthy")
        return len(health) == containers and set(health.values()) == {"healthy"}

    done = wait_for(check, "every container healthy", ok, timeout)
    if flaps:
        check.log(f"seen unhealthy on the way (a loaded host): {sorted(set(flaps))}")
    check.log(f"health: {check.container_health()}")
    return done


def master_name(check: Check) -> str:
    """Who sentinel-1 says the master is (its host name; '' when it cannot say)."""
    done = check.compose("exec", "-T", "sentinel-1", "redis-cli", "-p", "26379", "sentinel",
                         "get-master-addr-by-name", "gpubroker", check=False, quiet=True)
    return done.stdout.split()[0] if done.returncode == 0 and done.stdout.split() else ""


def role(check: Check, service: str) -> str:
    done = check.compose("exec", "-T", service, "redis-cli", "role", check=False, quiet=True)
    return done.stdout.split()[0] if done.returncode == 0 and done.stdout.split() else ""


def failover(check: Check, load: Load) -> None:
    """SIGKILL the master under load; the replica must take over and the old master rejoin as its
    replica. With min_replicas_ack 1, submits are refused from the kill until a replica confirms
    writes again (the new master has none until the old one is back): that window is measured."""
    check.expect(master_name(check) == "redis", f"before: the sentinels name redis the master ({master_name(check)})")
    before = len(load.submitted)
    killed = time.time()
    check.compose("kill", "-s", "SIGKILL", "redis")
    promoted = wait_for(check, "the sentinels to promote redis-replica", lambda: master_name(check) == "redis-replica",
                        120)
    check.expect(promoted, f"failover: redis-replica is the master {time.time() - killed:.1f}s after the kill")
    check.compose("start", "redis")
    back = wait_for(check, "the old master back as a replica", lambda: role(check, "redis") == "slave", 120)
    check.expect(back, f"the old master came back as a replica {time.time() - killed:.1f}s after the kill")
    check.expect(wait_healthy(check, 6 + check.extra, 300), "every container healthy again after the failover")
    check.expect(wait_for(check, "a submit after the failover", lambda: len(load.submitted) > before + 2, 120),
                 "submits go on after the failover")
    acked = sorted(item["at"] for item in load.submitted)
    gaps = [b - a for a, b in itertools.pairwise(acked) if b > killed - 5]
    check.log(f"failover figures: submits refused for {max(gaps, default=0):.1f}s at most (acknowledged submits "
              f"apart, load {load.rate}/s), {load.retries} submit retries so far; master named "
              f"redis-replica {'in time' if promoted else 'never'}")


def node_ids(check: Check) -> set[str]:
    return {n["id"] for n in check.nodes() if n["state"] == "up"}


def run(check: Check, tasks: int, rate: float, keep: bool) -> None:  # noqa: PLR0915 - one scenario, in order
    for what, argv in (("docker compose", ["docker", "compose", "version", "--short"]),
                       ("docker engine", ["docker", "version", "-f", "{{.Server.Version}}"])):
        check.log(f"{what}: {subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()}")
    check.compose("down", "-v", "--remove-orphans", quiet=True)
    check.compose("build", quiet=True)
    images = subprocess.run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                            text=True, check=True).stdout.split()
    ours = sorted(i for i in images if i.startswith(("gpubroker", PROJECT)))
    check.expect(ours == ["gpubroker:local"], f"one image tag built: {ours}")

    check.compose("up", "-d", "--scale", "worker=1", timeout=300)
    check.expect(wait_healthy(check, 4 + check.extra, 400), "every container healthy (1 worker)")
    check.expect(node_ids(check) == {"worker-1"}, f"node names: {sorted(node_ids(check))}")

    # Redis refuses a client without the password.
    probe = check.compose("exec", "-T", "-e", "REDISCLI_AUTH=", "redis", "redis-cli", "dbsize", check=False, quiet=True)
    check.expect("NOAUTH" in probe.stdout + probe.stderr, f"redis without password refused: {probe.stdout.strip()}")

    load = Load(check, tasks, rate)
    load.start()
    check.log(f"load: probe tasks (1-2 GPUs, 2-6 s) at {rate}/s until the workers are back at 1 (at most {tasks})")
    time.sleep(10)

    check.compose("up", "-d", "--scale", "worker=3", "--no-recreate", timeout=300)
    check.expect(wait_healthy(check, 6 + check.extra, 400), "every container healthy (3 workers)")
    check.expect(wait_for(check, "3 nodes up", lambda: node_ids(check) == {"worker-1", "worker-2", "worker-3"}, 300),
                 "scaled 1 -> 3: nodes worker-1, worker-2, worker-3 up")
    if check.monitoring:
        check_prometheus(check)
    time.sleep(10)
    check.log(f"tasks per node: {running_on(check.nodes())}; submitted so far: {len(load.submitted)}")

    # The dispatcher's healthcheck fails within seconds of it stopping its job, and recovers.
    check.compose("pause", "dispatcher")
    time.sleep(8)
    stuck = check.compose("exec", "-T", "worker", "gpubroker", "health", "dispatcher", check=False)
    check.expect(stuck.returncode != 0, "gpubroker health dispatcher fails while the dispatcher is frozen")
    check.compose("unpause", "dispatcher")
    check.expect(wait_for(check, "dispatcher healthy", lambda: check.compose(
        "exec", "-T", "worker", "gpubroker", "health", "dispatcher", check=False, quiet=True).returncode == 0, 60),
        "gpubroker health dispatcher passes again once it is thawed")
    check.expect(wait_healthy(check, 6 + check.extra, 180), "the engine sees every container healthy again")

    if check.ha:
        failover(check, load)
    else:
        check.compose("restart", "redis")
        check.expect(wait_healthy(check, 6, 300), "every container healthy again after the Redis restart")
    check.log(f"after the Redis {'failover' if check.ha else 'restart'}: tasks per node {running_on(check.nodes())}; "
              f"submitted so far: {len(load.submitted)}, submit retries {load.retries}")

    check.gpubroker("drain", "worker-2")
    drained_at = time.time()  # once the command returned (it may take long on a loaded host)
    time.sleep(15)
    nodes = {n["id"]: n for n in check.nodes()}
    check.expect(nodes["worker-2"]["draining"], "worker-2 shows as draining")

    check.compose("up", "-d", "--scale", "worker=1", "--no-recreate", timeout=300)
    check.expect(wait_healthy(check, 4 + check.extra, 400), "every container healthy (back at 1 worker)")
    check.expect(wait_for(check, "only worker-1 up", lambda: node_ids(check) == {"worker-1"}, 300),
                 "scaled 3 -> 1: only worker-1 is up")

    check.compose("exec", "-T", "dispatcher", "touch", "/tmp/compose-check-stop")
    load.join(timeout=tasks / rate + 600)
    check.expect(load.returncode == 0, f"the load ran to its end (exit {load.returncode}) {load.stderr[-500:]}")
    check.log(f"submitted {len(load.submitted)} tasks, {load.retries} submit retries while Redis was down")
    tasks = len(load.submitted)

    ids = "".join(item["id"] + "\n" for item in load.submitted)
    script = (ROOT / "bench" / "compose_load.py").read_text()
    done = check.compose("exec", "-T", *check.admin_env(), "dispatcher", "sh", "-c",
                         f"cat > /tmp/load.py <<'EOF'\n{script}\nEOF\npython /tmp/load.py verify 1500",
                         stdin=ids, quiet=True, timeout=1800)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    runs = report.pop("runs")
    check.log("ledger: " + json.dumps(report, indent=None))
    check.expect(report["tasks"] == tasks == report["distinct"], f"{tasks} submits made {report['distinct']} tasks")
    check.expect(all(item["created"] for item in load.submitted) or load.retries > 0,
                 "every submit created its task (or a retry found it)")
    check.expect(report["states"] == {"SUCCEEDED": tasks}, f"every task SUCCEEDED: {report['states']}")
    # attempts counts reservations: a task a stopping worker handed back unstarted is reserved again.
    check.log(f"reservations per task: {report['attempts']}")
    check.expect(report["result_node_matches"] == tasks, "each result names the node its record names")
    check.expect(report["finished_index"] == {"entries": tasks, "distinct": tasks},
                 f"each task once in the finished index: {report['finished_index']}")
    late = [r for r in runs if r["node"] == "worker-2" and r["started_at"] and r["started_at"] > drained_at + 2]
    check.expect(not late, f"no task started on worker-2 after its drain ({len(late)} did)")
    up = [n for n in report["nodes"] if n["state"] == "up"]
    whole = all(n["tasks"] == 0 and n["free_gpus"] == n["gpus"] and n["free_slots"] == n["slots"]
                and n["free_cpus"] == n["cpus"] and n["free_memory_mb"] == n["memory_mb"] for n in up)
    check.expect(bool(up) and whole, f"capacity exact on every node up: {up}")

    logs = check.compose("logs", "--no-color", "worker", quiet=True).stdout
    check.expect("In Celery 5.1" not in logs and "broker_connection_retry configuration" not in logs,
                 "no Celery deprecation notice in the worker logs")
    check.log(f"worker log lines mentioning a lost broker connection: {logs.count('Connection to broker lost')}")

    if not keep:
        check.compose("down", "-v", "--remove-orphans")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000, help="at most this many submits")
    parser.add_argument("--rate", type=float, default=1.0, help="submits a second")
    parser.add_argument("--acl", action="store_true", help="with docker-compose.acl.yml (one Redis user per role)")
    parser.add_argument("--ha", action="store_true",
                        help="with docker-compose.ha.yml: the Redis restart becomes a failover (master SIGKILLed)")
    parser.add_argument("--monitoring", action="store_true",
                        help="with the monitoring profile: Prometheus must scrape every target")
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    parser.add_argument("--output", type=Path, help="also write the log here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env_file = Path(tmp) / "check.env"
        write_env(env_file)
        out = args.output.open("w") if args.output else sys.stdout
        check = Check(out, env_file, args.acl, args.monitoring, args.ha)
        try:
            run(check, args.tasks, args.rate, args.keep)
        except BaseException as exc:
            check.failures.append(f"aborted: {exc!r}")
            if not args.keep:
                check.compose("logs", "--no-color", "--tail", "40", check=False)
                check.compose("down", "-v", "--remove-orphans", check=False, quiet=True)
            raise
        finally:
            check.log(f"{len(check.failures)} failed: {check.failures}" if check.failures else "all checks passed")
            if out is not sys.stdout:
                out.close()
    sys.exit(1 if check.failures else 0)


if __name__ == "__main__":
    main()
