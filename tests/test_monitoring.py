"""config/monitoring names only what the processes really export: every metric in the alert rules
and the Grafana dashboard is a sample name a real dispatcher's registry serves (after one cycle
against a real Redis), every ``job`` they name is scraped, and every expression is well formed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import redis
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.dispatcher import Dispatcher
from broker.settings import Settings

MONITORING = Path(__file__).resolve().parents[1] / "config" / "monitoring"
METRIC = re.compile(r"\b(gpubroker_\w+|up)\b(?!\s*\()")
JOB = re.compile(r'job\s*=\s*"([^"]+)"')


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every alert rule and every dashboard target."""
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    found = [(f"alert {r['alert']}", str(r["expr"])) for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    found += [(f"panel {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    found += [("dashboard variable", v["query"]) for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return found


def exported(settings: Settings, redis_client: redis.Redis) -> set[str]:
    dispatcher = Dispatcher(settings, client=redis_client)
    dispatcher.scripts.register("n1", "inc-1", 3_600_000, 2, 1000, 4000, 4000, 4, {})  # per-node series
    dispatcher.run_cycle()
    text = generate_latest(REGISTRY).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_expression_names_only_exported_metrics(settings: Settings, redis_client: redis.Redis) -> None:
    names = exported(settings, redis_client)
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {c["job_name"] for c in scrape["scrape_configs"]}
    assert "alerts.yml" in scrape["rule_files"]
    exprs = expressions()
    assert len(exprs) >= 13
    used = set()
    for where, expr in exprs:
        for opening, closing in ("()", "{}", "[]"):
            assert expr.count(opening) == expr.count(closing), f"{where}: unbalanced {opening}{closing}: {expr}"
        metrics = {m for m in METRIC.findall(expr) if m != "up"}
        assert metrics or "up{" in expr, f"{where}: names no metric: {expr}"
        unknown = {m for m in metrics if m not in names}
        assert not unknown, f"{where}: {sorted(unknown)} not exported (exported: {sorted(names)})"
        assert set(JOB.findall(expr)) <= jobs, f"{where}: a job no scrape config has"
        used |= metrics
    # the alerts the operations issue asks for
    alerts = " ".join(e for w, e in exprs if w.startswith("alert"))
    for needed in ('gpubroker_nodes{state="up"}', "gpubroker_oldest_pending_seconds", "gpubroker_tasks_total",
                   "gpubroker_rejected_messages_total", "up{job="):
        assert needed in alerts, needed


def test_the_check_catches_a_name_nobody_exports(settings: Settings, redis_client: redis.Redis) -> None:
    names = exported(settings, redis_client)
    assert "gpubroker_pending_tasks" in names and "gpubroker_task_wait_seconds_bucket" in names
    assert not {m for m in METRIC.findall("sum(gpubroker_pending_task)") if m != "up"} <= names
