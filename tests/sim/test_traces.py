"""Trace and cluster readers: the shipped traces, small files with known content, and bad rows."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from broker.errors import InvalidRequest
from broker.sim.traces import (
    ClusterNode,
    TraceError,
    load_cluster,
    load_trace,
    openb_nodes,
    openb_pods,
    parse_shape,
    philly_jobs,
    plain_jobs,
    plain_nodes,
    trace_format,
    uniform_cluster,
)
from tests.support import ROOT

TRACES = ROOT.parent / "shared" / "traces"
PHILLY = TRACES / "philly-pollux-jobs" / "philly.csv"
OPENB = TRACES / "alibaba-gpu-v2023-openb" / "csv"
needs_traces = pytest.mark.skipif(not PHILLY.exists() or not OPENB.exists(), reason="../shared/traces not present")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- Philly ---------------------------------------------------------------------------------

PHILLY_HEADER = "timestamp,duration,num_gpus,gpu_time,cluster\n"


def test_philly_rows_are_sorted_by_submit_and_shifted_to_zero(tmp_path: Path) -> None:
    path = write(tmp_path, "p.csv", PHILLY_HEADER + "2017-10-09 07:01:55,66.0,1,66.0,11cb48\n"
                 "2017-10-09 06:13:03,2951.5,8,23612.0,6214e9\n" "2017-10-09 07:01:55,10,2,20,11cb48\n")
    jobs = philly_jobs(path)
    assert [(j.id, j.submit_s, j.duration_s, j.gpus, j.tenant) for j in jobs] == [
        ("philly-3", 0.0, 2951.5, 8, "6214e9"),
        ("philly-2", 2932.0, 66.0, 1, "11cb48"),  # 06:13:03 -> 07:01:55
        ("philly-4", 2932.0, 10.0, 2, "11cb48"),  # same second: file order kept
    ]
    assert jobs[0].name == "philly.vc_6214e9" and jobs[0].cpus == 0 and jobs[0].memory_mb == 0
    assert [j.id for j in philly_jobs(path, limit=2)] == ["philly-3", "philly-2"]


@pytest.mark.parametrize(("row", "field", "reason"), [
    ("2017-10-09 07:01:55,66.0,one,66.0,11cb48", "num_gpus", "'one' is not a number"),
    ("2017-10-09 07:01:55,66.0,1.5,66.0,11cb48", "num_gpus", "not a whole number"),
    ("2017-10-09 07:01:55,66.0,0,0,11cb48", "num_gpus", "below the minimum 1"),
    ("yesterday,66.0,1,66.0,11cb48", "timestamp", "is not a time like"),
    ("2017-10-09 07:01:55,-3,1,-3,11cb48", "duration", "below the minimum 0"),
    ("2017-10-09 07:01:55,nan,1,1,11cb48", "duration", "not a finite number"),
    ("2017-10-09 07:01:55,66.0,1,66.0,bad vc!", "cluster", "is not valid"),
])
def test_a_bad_philly_row_names_its_line_and_field(tmp_path: Path, row: str, field: str, reason: str) -> None:
    path = write(tmp_path, "p.csv", PHILLY_HEADER + "2017-10-09 07:01:55,66.0,1,66.0,11cb48\n" + row + "\n")
    with pytest.raises(TraceError) as caught:
        philly_jobs(path)
    assert caught.value.where == "line 3" and caught.value.field == field
    assert reason in str(caught.value) and "p.csv, line 3: " + field in str(caught.value)


def test_philly_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"line 3: has 4 fields; the header has 5"):
        philly_jobs(write(tmp_path, "a.csv", PHILLY_HEADER + "2017-10-09 07:01:55,1,1,1,x\n"
                          "2017-10-09 07:01:55,1,1,1\n"))
    with pytest.raises(TraceError, match=r"line 1: header: missing column\(s\) cluster"):
        philly_jobs(write(tmp_path, "b.csv", "timestamp,duration,num_gpus\n"))
    with pytest.raises(TraceError, match="the file is empty"):
        philly_jobs(write(tmp_path, "c.csv", ""))
    with pytest.raises(TraceError, match="cannot be read"):
        philly_jobs(tmp_path / "missing.csv")


@needs_traces
def test_the_shipped_philly_trace_matches_its_readme() -> None:
    jobs = philly_jobs(PHILLY)
    assert len(jobs) == 82_247
    assert jobs[0].submit_s == 0 and all(a.submit_s <= b.submit_s for a, b in itertools.pairwise(jobs))
    assert round(jobs[-1].submit_s / 86400, 1) == 108.9  # 2017-09-04 10:30:41 -> 2017-12-22 08:02:11
    assert Counter(j.gpus for j in jobs)[1] == 76_627 and Counter(j.gpus for j in jobs)[128] == 3
    assert len({j.tenant for j in jobs}) == 15
    assert round(sum(j.gpus * (j.duration_s or 0) for j in jobs) / 3600) == 978_078
    assert trace_format(PHILLY) == "philly"


# ---- openb ----------------------------------------------------------------------------------

OPENB_HEADER = ("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,"
                "scheduled_time\n")


def test_openb_pods_shares_models_and_times(tmp_path: Path) -> None:
    path = write(tmp_path, "pods.csv", OPENB_HEADER +
                 "pod-a,12000,16384,1,1000,,LS,Running,100,1100,102\n"
                 "pod-b,6000,12288,1,460,V100M16|V100M32|V100M32,BE,Running,50,80,50\n"
                 "pod-c,88000,327680,8,1000,G2,Burstable,Succeeded,200,500,210\n"
                 "pod-d,3152,5600,0,0,,BE,Pending,60,90,NaN\n")
    jobs = openb_pods(path)
    by_id = {j.id: j for j in jobs}
    assert [j.id for j in jobs] == ["pod-b", "pod-d", "pod-a", "pod-c"]
    assert [j.submit_s for j in jobs] == [0.0, 10.0, 50.0, 150.0]  # creation times, shifted
    assert by_id["pod-a"].duration_s == 998.0  # deletion - scheduled
    assert by_id["pod-d"].duration_s == 30.0  # never scheduled: deletion - creation
    assert (by_id["pod-b"].gpus, by_id["pod-b"].cpus, by_id["pod-b"].memory_mb) == (0.46, 6.0, 12288)
    assert by_id["pod-b"].labels == {"gpu": ("V100M16", "V100M32")}  # the repeated model dropped
    assert by_id["pod-c"].labels == {"gpu": "G2"} and by_id["pod-c"].gpus == 8
    assert by_id["pod-d"].gpus == 0 and by_id["pod-d"].tenant == "BE"
    assert by_id["pod-b"].resources().labels == {"gpu": ["V100M16", "V100M32"]}


def test_openb_static_mode_arrives_one_per_second_and_never_ends(tmp_path: Path) -> None:
    path = write(tmp_path, "multigpu.csv", "name,cpu_milli,memory_mib,num_gpu,gpu_milli\n"
                 "p0,1000,100,2,1000\np1,1000,100,1,250\np0,1000,100,1,250\n")
    jobs = openb_pods(path)
    assert [(j.id, j.submit_s, j.duration_s, j.gpus) for j in jobs] == [
        ("p0", 0.0, None, 2.0), ("p1", 1.0, None, 0.25), ("p0.4", 2.0, None, 0.25)]
    with pytest.raises(TraceError, match="has no creation_time/deletion_time"):
        openb_pods(path, static=False)


@pytest.mark.parametrize(("row", "field", "reason"), [
    ("pod-x,1000,100,2,500,,LS,Running,1,2,1", "gpu_milli", "only 1-GPU pods share a GPU"),
    ("pod-x,1000,100,0,300,,LS,Running,1,2,1", "gpu_milli", "for a pod with num_gpu 0"),
    ("pod-x,1000,100,1,0,,LS,Running,1,2,1", "gpu_milli", "must be 1..1000"),
    ("pod-x,1000,100,1,1000,,LS,Running,10,5,8", "deletion_time", "before the pod started"),
    ("pod-x,1000,100,1,1000,Tesla V100,LS,Running,1,2,1", "gpu_spec", "is not valid"),
    ("pod-x,1000,lots,1,1000,,LS,Running,1,2,1", "memory_mib", "is not a number"),
])
def test_a_bad_openb_row_names_its_line_and_field(tmp_path: Path, row: str, field: str, reason: str) -> None:
    path = write(tmp_path, "pods.csv", OPENB_HEADER + "pod-a,1000,100,1,1000,,LS,Running,1,2,1\n" + row + "\n")
    with pytest.raises(TraceError) as caught:
        openb_pods(path)
    assert (caught.value.where, caught.value.field) == ("line 3", field)
    assert reason in caught.value.reason


def test_openb_nodes_carry_their_model_as_a_label(tmp_path: Path) -> None:
    path = write(tmp_path, "nodes.csv", "sn,cpu_milli,memory_mib,gpu,model\n"
                 "n-1,64000,262144,2,P100\nn-2,96000,786432,8,G2\nn-3,32000,131072,0,\n")
    nodes = openb_nodes(path)
    assert nodes[0] == ClusterNode("n-1", 2, 16_384, 64.0, 262_144, 256, {"gpu": "P100"})
    assert nodes[1].labels == {"gpu": "G2"} and nodes[1].gpu_memory_mb == 32_768  # undisclosed model: default
    assert (nodes[2].gpus, nodes[2].gpu_memory_mb, nodes[2].labels) == (0, 0, {})
    bad = write(tmp_path, "bad.csv", "sn,cpu_milli,memory_mib,gpu,model\nn-1,64000,262144,2,\n")
    with pytest.raises(TraceError, match=r"bad.csv, line 2: model: is empty for a node with 2 GPUs"):
        openb_nodes(bad)
    twice = write(tmp_path, "twice.csv", "sn,cpu_milli,memory_mib,gpu,model\nn-1,1000,1,1,T4\nn-1,1000,1,1,T4\n")
    with pytest.raises(TraceError, match="node 'n-1' is listed twice"):
        openb_nodes(twice)


@needs_traces
def test_the_shipped_openb_files_match_their_readme() -> None:
    pods = openb_pods(OPENB / "openb_pod_list_default.csv")
    assert len(pods) == 8152
    assert Counter(int(p.gpus) if p.gpus >= 1 else (0 if p.gpus == 0 else "share") for p in pods) == {
        0: 1088, 1: 3911, "share": 3078, 2: 16, 4: 15, 8: 44}
    assert round(sum(p.gpus for p in pods), 1) == 6086.8
    spec = openb_pods(OPENB / "openb_pod_list_gpuspec10.csv")
    assert sum(1 for p in spec if p.labels) == 732
    nodes = load_cluster(OPENB / "openb_node_list_gpu_node.csv")
    assert len(nodes) == 1213 and sum(n.gpus for n in nodes) == 6212
    assert Counter(n.labels["gpu"] for n in nodes)["G2"] == 549
    assert len(openb_pods(OPENB / "openb_pod_list_multigpu20.csv")) == 8324


# ---- plain formats ----------------------------------------------------------------------------


def test_plain_jobs_csv_and_json_read_the_same(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "jobs.csv", "id,submit_s,duration_s,gpus,cpus,memory_mb,tenant,priority,labels,"
                     "preemptible\n"
                     "train,5,100,2,8,1024,vision,3,gpu=H100|A100,true\n"
                     "serve,0,,0.25,,,,,zone=a;gpu=L4,\n")
    json_path = write(tmp_path, "jobs.json", json.dumps({"jobs": [
        {"id": "train", "submit_s": 5, "duration_s": 100, "gpus": 2, "cpus": 8, "memory_mb": 1024,
         "tenant": "vision", "priority": 3, "labels": {"gpu": ["H100", "A100"]}, "preemptible": True},
        {"id": "serve", "submit_s": 0, "duration_s": None, "gpus": 0.25, "labels": {"zone": "a", "gpu": "L4"}}]}))
    from_csv, from_json = plain_jobs(csv_path), plain_jobs(json_path)
    assert from_csv == from_json
    serve, train = from_csv
    assert (serve.id, serve.submit_s, serve.duration_s, serve.gpus, serve.tenant) == ("serve", 0, None, 0.25, "default")
    assert (train.submit_s, train.priority, train.cpus, train.preemptible) == (5, 3, 8, True)
    assert train.labels == {"gpu": ("H100", "A100")} and serve.labels == {"zone": "a", "gpu": "L4"}
    assert trace_format(csv_path) == "plain" and load_trace(json_path) == from_json


@pytest.mark.parametrize(("text", "where", "field", "reason"), [
    ("submit_s,gpus\n0,1\n3,1.5\n", "line 3", "gpus", "must be a whole number of GPUs"),
    ("submit_s,gpus,tenant\n0,1,ok\n3,1,no way\n", "line 3", "tenant", "is not valid"),
    ("id,submit_s,gpus\na,0,1\na,1,1\n", "line 3", "id", "'a' is used twice"),
    ("submit_s,gpus,labels\n0,1,gpu\n", "line 2", "labels", "is not key=value"),
    ("submit_s,gpus,name\n0,1,not a name\n", "line 2", "name", "dotted Python name"),
    ("submit_s,gpus,preemptible\n0,1,maybe\n", "line 2", "preemptible", "is not true or false"),
])
def test_a_bad_plain_csv_row_names_its_line_and_field(tmp_path: Path, text: str, where: str, field: str,
                                                       reason: str) -> None:
    with pytest.raises(TraceError) as caught:
        plain_jobs(write(tmp_path, "jobs.csv", text))
    assert (caught.value.where, caught.value.field) == (where, field)
    assert reason in caught.value.reason


def test_a_bad_json_item_names_its_index(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"jobs\[1\]: gpus: is missing"):
        plain_jobs(write(tmp_path, "j.json", '[{"submit_s": 0, "gpus": 1}, {"submit_s": 1}]'))
    with pytest.raises(TraceError, match=r"jobs\[0\]: cpus: -1 is below the minimum 0"):
        plain_jobs(write(tmp_path, "j.json", '[{"submit_s": 0, "gpus": 1, "cpus": -1}]'))
    with pytest.raises(TraceError, match=r"line 1: is not valid JSON"):
        plain_jobs(write(tmp_path, "j.json", "[{"))
    with pytest.raises(TraceError, match="expected a JSON list"):
        plain_jobs(write(tmp_path, "j.json", '{"tasks": []}'))


def test_plain_nodes_expand_counts_and_default_slots(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "id,count,gpus,gpu_memory_mb,cpus,memory_mb,labels\n"
                 "dgx,2,8,81920,112,2000000,gpu=H100\ncpu-box,,0,,32,65536,\n")
    nodes = plain_nodes(path)
    assert [n.id for n in nodes] == ["dgx-1", "dgx-2", "cpu-box"]
    assert nodes[0] == ClusterNode("dgx-1", 8, 81920, 112.0, 2_000_000, 8, {"gpu": "H100"})
    assert (nodes[2].gpus, nodes[2].slots) == (0, 1)
    as_json = write(tmp_path, "c.json", json.dumps({"nodes": [{"id": "n", "gpus": 2, "slots": 3}]}))
    assert load_cluster(as_json) == [ClusterNode("n", 2, 81920, 1.0, 0, 3, {})]
    with pytest.raises(TraceError, match=r"line 2: slots: 0 is below the minimum 1"):
        plain_nodes(write(tmp_path, "bad.csv", "id,gpus,slots\nn,1,0\n"))
    with pytest.raises(TraceError, match="lists no nodes"):
        plain_nodes(write(tmp_path, "empty.csv", "id,gpus\n"))


def test_node_shapes() -> None:
    shape = parse_shape("gpus=4,gpu_memory_mb=24576,cpus=48,memory_mb=393216,gpu=P40")
    assert shape == ClusterNode("shape", 4, 24576, 48.0, 393216, 4, {"gpu": "P40"})
    assert parse_shape("").gpus == 8
    assert [n.id for n in uniform_cluster(shape, 3)] == ["node-0001", "node-0002", "node-0003"]
    with pytest.raises(InvalidRequest, match="is not key=value"):
        parse_shape("gpus")
    with pytest.raises(TraceError, match="gpus: 'x' is not a number"):
        parse_shape("gpus=x")
