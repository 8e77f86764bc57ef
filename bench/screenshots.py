"""Flower's pages, as a browser shows them while the demo cluster runs: docs/img/flower-*.png.

Starts the cluster of ``gpubroker demo`` (private redis-server, dispatcher, its three simulated
nodes, Flower with basic auth, ``broker.cli.demo``), submits the demo's workload, and once tasks
have finished and others still run, opens Flower's workers page, tasks page and one finished
task's page in headless Chromium (Debian's ``chromium``) and saves the screenshots. The page is
loaded with the basic-auth credentials in its URL; every process stops at the end.

    python -m bench.screenshots [--tasks 40] [--out docs/img] [--chromium chromium]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from broker.cli.demo import DEFAULT_FLOWER_AUTH, DemoRun
from broker.client import Client
from broker.models import TaskState
from broker.sim.localcluster import LocalCluster, make_logdir

ROOT = Path(__file__).resolve().parent.parent
SIZE = "1400,900"
TALL = "1400,1500"  # a task's page: down to the node, GPUs and tenant the worker reports


def screenshot(chromium: str, url: str, out: Path, size: str = SIZE) -> None:
    """One page, after its scripts have had 8 s of (virtual) time to fetch their tables."""
    argv = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--window-size={size}", "--virtual-time-budget=8000", f"--screenshot={out}", url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"chromium failed on {url}: {done.stderr[-1000:]}")
    print(f"saved {out} ({out.stat().st_size} bytes) from {url.rsplit('@', maxsplit=1)[-1]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    if shutil.which(args.chromium) is None:
        sys.exit("headless Chromium is needed: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    auth = os.environ.get("FLOWER_BASIC_AUTH") or DEFAULT_FLOWER_AUTH
    cluster = LocalCluster(make_logdir())
    try:
        demo = DemoRun(cluster, Console(), timeout=600)
        url, pool = demo.start(None, with_flower=True)
        with Client(url, pool=pool) as client:
            demo.wait_ready(client)
            if demo.flower_url is None:
                sys.exit("Flower did not come up; see its log in " + str(cluster.logdir))
            ids = demo.submit(client, args.tasks)
            # Some finished and some still running, so each page has both.
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                states = [client.status(i).state for i in ids]
                if states.count(TaskState.SUCCEEDED) >= len(ids) // 3 and TaskState.RUNNING in states:
                    break
                time.sleep(1)
            done = next(i for i in ids if client.status(i).state == TaskState.SUCCEEDED)
            base = demo.flower_url.replace("http://", f"http://{auth}@")
            screenshot(args.chromium, f"{base}/workers", args.out / "flower-workers.png")
            screenshot(args.chromium, f"{base}/tasks", args.out / "flower-tasks.png")
            screenshot(args.chromium, f"{base}/task/{done}", args.out / "flower-task.png", TALL)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
