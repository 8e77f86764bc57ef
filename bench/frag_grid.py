"""The FGD protocol over every openb pod list in the trace folder, next to the paper's figures.

For each pod list: the mean allocation at 130 % arrived over the seeds (``bench.frag_offline``'s
protocol) for each placer, and the paper's FGD and best-fit means of column 130 over seeds
42-51 (``paper-allocation-by-arrived-percent.csv``; no rows for cpu0, gpushare20, gpuspec05).

    python -m bench.frag_grid [--seeds 10] [--lists default,multigpu20] [--policies frag_aware,best_fit] [--workers 2]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from multiprocessing import Pool
from pathlib import Path

from bench.frag_offline import TRACE, inflate, policies, read_openb, simulate
from broker.models import MILLI

PAPER = TRACE.parent / "paper-allocation-by-arrived-percent.csv"
PAPER_POLICIES = {"06-FGD": "paper FGD", "05-BestFit": "paper best-fit"}


def paper_means(path: Path = PAPER, seeds: range = range(42, 52)) -> dict[tuple[str, str], float]:
    """(pod list, paper policy label) -> mean of column 130 over ``seeds``."""
    rows: dict[tuple[str, str], list[float]] = defaultdict(list)
    if not path.exists():
        return {}
    with path.open() as f:
        for row in csv.DictReader(f):
            label = PAPER_POLICIES.get(row["sc_policy"])
            if label and int(row["seed"]) in seeds:
                rows[row["workload"].removeprefix("openb_pod_list_"), label].append(float(row["130"]))
    return {key: statistics.mean(values) for key, values in rows.items()}


def lists_in(folder: Path) -> list[str]:
    return sorted(p.stem.removeprefix("openb_pod_list_") for p in folder.glob("openb_pod_list_*.csv"))


def one(job: tuple[Path, str, str, int, float]) -> tuple[str, str, int, float]:
    trace, pods, policy, seed, tune = job
    nodes, tasks = read_openb(trace, pods)
    capacity = sum(len(n.free_milli) for n in nodes) * MILLI
    run = simulate(policies()[policy], nodes, inflate(tasks, capacity, tune, seed), [tune])
    return pods, policy, seed, run.allocated[tune]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=42)
    parser.add_argument("--lists", default="", help="comma-separated pod lists (default: every one in --trace)")
    parser.add_argument("--policies", default="frag_aware,best_fit")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tune", type=float, default=1.3)
    parser.add_argument("--trace", type=Path, default=TRACE)
    args = parser.parse_args()
    lists = [p for p in args.lists.split(",") if p] or lists_in(args.trace)
    chosen = [p for p in args.policies.split(",") if p]
    jobs = [(args.trace, pods, policy, seed, args.tune) for pods in lists for policy in chosen
            for seed in range(args.first_seed, args.first_seed + args.seeds)]
    results: dict[tuple[str, str], list[float]] = defaultdict(list)
    with Pool(args.workers) as pool:
        for pods, policy, seed, value in pool.imap_unordered(one, jobs):
            results[pods, policy].append(value)
            print(f"  {pods} {policy} seed {seed}: {value:.2%}", flush=True)
    paper = paper_means(args.trace.parent / PAPER.name)
    columns = [*PAPER_POLICIES.values(), *chosen]
    print(f"\n| pod list | {' | '.join(columns)} |")
    print(f"| --- |{' ---: |' * len(columns)}")
    for pods in lists:
        cells = [f"{paper[pods, label]:.2f}" if (pods, label) in paper else "-" for label in PAPER_POLICIES.values()]
        cells += [f"{100 * statistics.mean(results[pods, p]):.2f}" for p in chosen]
        print(f"| {pods} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
