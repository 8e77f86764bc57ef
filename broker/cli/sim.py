"""``gpubroker sim`` and ``gpubroker plan``: replay a trace, and size a cluster for a target."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from broker.cli.common import app, run_cli
from broker.errors import InvalidRequest
from broker.scheduling.config import Mode, Ordering, PlacementKind, SchedulingConfig
from broker.sim.localcluster import private_redis
from broker.sim.results import SimResult
from broker.sim.traces import ClusterNode, TraceJob, load_cluster, load_trace, openb_pods, parse_shape, uniform_cluster

console = Console()

TraceOpt = Annotated[Path, typer.Option("--trace", help="Trace file: Philly CSV, openb pod CSV, or plain CSV/JSON")]
FormatOpt = Annotated[str, typer.Option("--format", help="auto, philly, openb or plain")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Only the first N jobs (in submit order)")]
StaticOpt = Annotated[bool | None, typer.Option(
    "--static/--replay", help="openb: pods arrive one per second and never finish (the FGD experiments)")]
ModeOpt = Annotated[Mode | None, typer.Option("--mode", help="Mode for policies that name none")]
PlacementOpt = Annotated[PlacementKind | None, typer.Option("--placement", help="Placement policy")]
SchedulingOpt = Annotated[Path | None, typer.Option("--scheduling", help="Scheduling config file (TOML or JSON)")]
EstimatesOpt = Annotated[str, typer.Option(
    "--estimates", help="'true': each job declares its trace duration; 'learned': none (runtime statistics)")]
OutOpt = Annotated[Path, typer.Option("--out", help="Directory for result.json and the plots")]
RedisOpt = Annotated[str | None, typer.Option("--redis-url", help="Use this Redis (default: a private server)")]


@dataclass(frozen=True)
class Policy:
    label: str
    config: SchedulingConfig


def parse_policies(names: list[str], base: SchedulingConfig, mode: Mode | None,
                   placement: PlacementKind | None) -> list[Policy]:
    """``ORDERING[:MODE]`` each (``sjf:backfill``), over ``base``; none: ``base``'s own."""
    out = []
    for name in names or [base.ordering.value]:
        ordering, _, named_mode = name.partition(":")
        try:
            overrides: dict[str, Any] = {"ordering": Ordering(ordering)}
            if named_mode or mode is not None:
                overrides["mode"] = Mode(named_mode) if named_mode else mode
        except ValueError:
            raise InvalidRequest({"policy": f"{name!r} is not ORDERING[:MODE] with ORDERING one of "
                                            f"{', '.join(o.value for o in Ordering)} and MODE one of "
                                            f"{', '.join(m.value for m in Mode)}"}) from None
        if placement is not None:
            overrides["placement"] = placement
        config = SchedulingConfig.parse({**base.model_dump(), **overrides})
        label = name if placement is None else f"{name} / {placement.value}"
        out.append(Policy(label, config))
    if len({p.label for p in out}) != len(out):
        raise InvalidRequest({"policy": "the same policy is named twice"})
    return out


def read_trace(trace: Path, kind: str, limit: int | None, static: bool | None) -> list[TraceJob]:
    if static is not None:
        if kind not in ("auto", "openb"):
            raise InvalidRequest({"static": "applies to openb pod lists only"})
        return openb_pods(trace, static=static, limit=limit)
    return load_trace(trace, kind, limit)


def read_cluster(cluster: Path | None, nodes: int | None, shape: str | None) -> list[ClusterNode]:
    if cluster is not None:
        if nodes is not None or shape is not None:
            raise InvalidRequest({"cluster": "give --cluster, or --nodes with --shape, not both"})
        return load_cluster(cluster)
    if nodes is None:
        raise InvalidRequest({"cluster": "give --cluster FILE, or --nodes N (with --shape)"})
    if nodes < 1:
        raise InvalidRequest({"nodes": "must be at least 1"})
    return uniform_cluster(parse_shape(shape or ""), nodes)


class _Bar:
    """A Rich progress bar for one run after another."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress = progress
        self.task = progress.add_task(label, total=None, day="")

    def __call__(self, done: int, expected: int, now_s: float) -> None:
        self.progress.update(self.task, completed=done, total=expected, day=f"day {now_s / 86400:.1f}")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("events"),
                    TextColumn("{task.fields[day]}"), TimeElapsedColumn(), console=console, transient=False)


def _run_all(jobs: list[TraceJob], nodes: list[ClusterNode], policies: list[Policy], estimates: str,
             redis_url: str | None) -> list[SimResult]:
    from broker.sim.engine import simulate  # the dispatcher and Celery: only for `sim` (other commands start faster)

    results = []
    with _progress() as progress:
        for policy in policies:
            results.append(simulate(jobs, nodes, policy.config, redis_url=redis_url, estimates=estimates,
                                    label=policy.label, progress=_Bar(progress, policy.label)))
    return results


@app.command("sim")
def sim(
    trace: TraceOpt,
    cluster: Annotated[Path | None, typer.Option("--cluster", help="Cluster file: openb node CSV or plain CSV/JSON")]
    = None,
    nodes: Annotated[int | None, typer.Option("--nodes", help="Instead of --cluster: this many nodes of --shape")]
    = None,
    shape: Annotated[str | None, typer.Option(
        "--shape", help="Node shape, e.g. gpus=8,gpu_memory_mb=24576,cpus=48,memory_mb=393216,gpu=P40")] = None,
    policy: Annotated[list[str] | None, typer.Option(
        "--policy", help="ORDERING[:MODE], e.g. fifo, sjf:backfill, fair (repeatable: one run each)")] = None,
    mode: ModeOpt = None, placement: PlacementOpt = None, scheduling: SchedulingOpt = None,
    estimates: EstimatesOpt = "learned", trace_format: FormatOpt = "auto", limit: LimitOpt = None,
    static: StaticOpt = None, out: OutOpt = Path("sim-out"), redis_url: RedisOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON result instead of tables")] = False,
    checkpoint: Annotated[float | None, typer.Option(
        "--checkpoint-interval", help="Seconds between checkpoints of every job: a preempted job resumes from its "
                                      "last (default: restarts from zero)")] = None,
) -> None:
    """Replay a trace through the real dispatcher and Lua scripts under a virtual clock."""
    from broker.sim.report import plot_allocation, plot_wait_cdf, result_json, summary_table, tenant_table

    def go() -> None:
        base = SchedulingConfig.load(scheduling) if scheduling else SchedulingConfig()
        policies = parse_policies(policy or [], base, mode, placement)
        jobs = read_trace(trace, trace_format, limit, static)
        if checkpoint is not None:
            if not checkpoint > 0:
                raise InvalidRequest({"checkpoint_interval": f"must be a number of seconds > 0 (got {checkpoint})"})
            jobs = [dataclasses.replace(job, checkpoint_interval_s=checkpoint) for job in jobs]
        cluster_nodes = read_cluster(cluster, nodes, shape)
        results = _run_all(jobs, cluster_nodes, policies, estimates, redis_url)
        out.mkdir(parents=True, exist_ok=True)
        document = result_json(results, trace=str(trace), jobs=len(jobs), cluster=str(cluster or shape or ""),
                               estimates=estimates)
        (out / "result.json").write_text(json.dumps(document, indent=1))
        cdf, allocation = plot_wait_cdf(results, out / "wait_cdf.png"), plot_allocation(results, out / "allocation.png")
        if as_json:
            console.print_json(json.dumps(document))
            return
        console.print(summary_table(results, title=f"{trace.name}: {len(jobs):,} jobs"))
        for r in results:
            console.print(tenant_table(r))
        console.print(f"wrote {out / 'result.json'}, {cdf}, {allocation}")

    run_cli(go)


@app.command("plan")
def plan(
    trace: TraceOpt,
    target: Annotated[list[str], typer.Option("--target", help="e.g. 'p95 wait <= 30m' (repeatable: all must hold)")],
    shape: Annotated[str, typer.Option("--shape", help="Node shape to count, e.g. gpus=8,cpus=48,memory_mb=393216")]
    = "gpus=8",
    policy: Annotated[str | None, typer.Option("--policy", help="ORDERING[:MODE]")] = None,
    mode: ModeOpt = None, placement: PlacementOpt = None, scheduling: SchedulingOpt = None,
    estimates: EstimatesOpt = "learned", trace_format: FormatOpt = "auto", limit: LimitOpt = None,
    static: StaticOpt = None,
    min_nodes: Annotated[int, typer.Option("--min-nodes", help="Smallest cluster to consider")] = 1,
    max_nodes: Annotated[int, typer.Option("--max-nodes", help="Largest cluster to consider")] = 4096,
    out: OutOpt = Path("plan-out"), redis_url: RedisOpt = None,
) -> None:
    """Find the fewest nodes of one shape that meet the targets, by bisection over simulations."""
    from broker.sim.capacity import parse_target, plan_capacity, plan_json, plan_table_rows, plot_plan
    from broker.sim.engine import simulate
    from broker.sim.report import plot_wait_cdf, summary_table

    def go() -> None:
        targets = [parse_target(t) for t in target]
        base = SchedulingConfig.load(scheduling) if scheduling else SchedulingConfig()
        (chosen,) = parse_policies([policy] if policy else [], base, mode, placement)
        jobs = read_trace(trace, trace_format, limit, static)
        node_shape = parse_shape(shape)
        server = private_redis() if redis_url is None else contextlib.nullcontext(redis_url)
        with _progress() as progress, server as url:
            def run(nodes: list[ClusterNode]) -> SimResult:
                label = f"{len(nodes)} nodes"
                # Capacity planning leaves out jobs larger than one node (plan_capacity): no gangs.
                return simulate(jobs, nodes, chosen.config, redis_url=url, estimates=estimates, label=label,
                                progress=_Bar(progress, label), gangs=False)

            result = plan_capacity(jobs, node_shape, targets, run, min_nodes, max_nodes)
        out.mkdir(parents=True, exist_ok=True)
        table = Table(title=f"{trace.name}: {len(jobs):,} jobs, {chosen.label}, nodes of {shape}")
        for name in ("nodes", "GPUs", *[t.text for t in targets], "met"):
            table.add_column(name, justify="right")
        for row in plan_table_rows(result):
            table.add_row(*row)
        console.print(table)
        (out / "plan.json").write_text(json.dumps(plan_json(result), indent=1))
        figure = plot_plan(result, out / "plan.png")
        if result.left_out:
            console.print(f"{result.left_out:,} jobs need more than one node of this shape and were left out")
        if result.answer is None:
            console.print(f"[red]no cluster of up to {max_nodes} nodes meets the targets[/]")
            raise typer.Exit(1)
        decided = result.results[result.answer]
        console.print(summary_table([decided], title=f"the answer: {result.answer} nodes"))
        cdf = plot_wait_cdf([decided], out / "wait_cdf.png")
        console.print(f"answer: {result.answer} nodes ({result.answer * node_shape.gpus} GPUs); "
                      f"wrote {out / 'plan.json'}, {figure}, {cdf}")

    run_cli(go)
