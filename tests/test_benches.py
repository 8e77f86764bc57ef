"""Every benchmark of ``make bench`` runs to its end, on tiny sizes: not its figures (timing belongs
to the benches, never to tests), only that it still works. bench.dispatch and bench.scale once
stopped at their second cycle for a whole stop (the hand-off had changed under them) and nobody
knew until they were run again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e  # real processes: dispatchers, redis-servers of their own

CASES = {
    "react": (["--tasks", "5", "--repeats", "1", "--nodes", "2"],
              ["| express on |", "| express off |", "a bare wake-up"]),
    "dispatch": (["--tasks", "400", "--nodes", "10", "--gpus", "2"], ["placements/s"]),
    "submit": (["--single", "50", "--batch", "200", "--repeats", "1"], ["apply_async", "submit_many"]),
    "e2e": ("--tasks 20 --fresh-tasks 2 --samples 3 --repeats 1 --sides celery,cpu,gpu-fresh".split(),
            ["x Celery", "issue 14 targets"]),
    "affinity": ("--nodes 2 --gpus 1 --slots 1 --models 2 --requests 6 --load-s 0.05".split(), ["warm"]),
    "scale": (["--cases", "1k/10", "--repeats", "1"], ["placements/s", "gpubroker queue --json"]),
}


@pytest.mark.parametrize("bench", sorted(CASES))
def test_the_benchmark_runs_to_its_end_and_prints_its_figures(bench: str) -> None:
    args, expected = CASES[bench]
    done = subprocess.run([sys.executable, "-m", f"bench.{bench}", *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    missing = [line for line in expected if line not in done.stdout]
    assert not missing, f"bench.{bench} printed no {missing}:\n{done.stdout[-3000:]}"
