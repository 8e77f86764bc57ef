"""Validation: every field's bad values are refused with a message naming the field."""

from __future__ import annotations

import math

import pytest

from broker.errors import InvalidRequest
from broker.models import NodeSpec, Resources, SubmitRequest

GOOD = {"task_name": "workers.tasks.probe"}


@pytest.mark.parametrize(
    ("values", "field", "reason"),
    [
        ({"gpus": -1}, "gpus", "greater than or equal to 0"),
        ({"gpus": 1.5}, "gpus", "whole number"),
        ({"gpus": 2000}, "gpus", "less than or equal"),
        ({"gpus": math.nan}, "gpus", "finite"),
        ({"gpus": math.inf}, "gpus", "finite"),
        ({"gpus": "1"}, "gpus", "valid number"),
        ({"gpus": True}, "gpus", "valid number"),
        ({"gpus": 0.0004}, "gpus", "multiple of 0.001"),
        ({"gpu_memory_mb": 1000}, "gpu_memory_mb", "needs gpus > 0"),
        ({"gpus": 1, "gpu_memory_mb": 0}, "gpu_memory_mb", "greater than 0"),
        ({"gpus": 1, "gpu_memory_mb": 1.5}, "gpu_memory_mb", "valid integer"),
        ({"cpus": -0.5}, "cpus", "greater than or equal to 0"),
        ({"cpus": 0.0001}, "cpus", "multiple of 0.001"),
        ({"cpus": math.nan}, "cpus", "finite"),
        ({"memory_mb": -1}, "memory_mb", "greater than or equal to 0"),
        ({"memory_mb": 1.0}, "memory_mb", "valid integer"),
        ({"labels": {"gpu model": "H100"}}, "labels", "not a valid label key"),
        ({"labels": {"gpu_model": "H100{x}"}}, "labels", "not a valid label value"),
        ({"labels": {"k": 1}}, "labels", "valid string"),
        ({"labels": {"gpu": []}}, "labels", "preference list needs 1"),
        ({"labels": {"gpu": ["H100", "H100"]}}, "labels", "names a value twice"),
        ({"labels": {"gpu": ["H100", "bad value"]}}, "labels", "label value"),
        ({"labels": ["gpu_model"]}, "labels", "valid dictionary"),
        ({"gpu": 1}, "gpu", "Extra inputs"),
    ],
)
def test_resources_refuse_bad_values(values: dict, field: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        Resources(**values)
    assert field in caught.value.problems, caught.value.problems
    assert reason in caught.value.problems[field]
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("gpus", "whole", "milli"),
    [(0, 0, 0), (0.25, 0, 250), (0.001, 0, 1), (0.999, 0, 999), (1, 1, 0), (8, 8, 0), (8.0, 8, 0)],
)
def test_resources_gpu_shapes(gpus: float, whole: int, milli: int) -> None:
    r = Resources(gpus=gpus)
    assert (r.whole_gpus, r.gpu_milli) == (whole, milli)


@pytest.mark.parametrize(
    ("values", "field", "reason"),
    [
        ({"task_name": ""}, "task_name", "at least 1"),
        ({"task_name": "a b"}, "task_name", "dotted Python name"),
        ({"task_name": "tasks.{probe}"}, "task_name", "dotted Python name"),
        ({"task_name": "tasks.probe\n"}, "task_name", "dotted Python name"),
        ({"task_name": "x" * 201}, "task_name", "at most 200"),
        ({"args": ({1, 2},)}, "args", "JSON-serialisable"),
        ({"args": (math.nan,)}, "args", "JSON-serialisable"),
        ({"args": (1, "a", 10**5000)}, "args", "JSON-serialisable"),  # json cannot print it (4,300 digits)
        ({"kwargs": {"a": None, "b": -math.inf}}, "kwargs", "JSON-serialisable"),
        ({"args": "abc"}, "args", ""),
        ({"kwargs": {"x": object()}}, "kwargs", "JSON-serialisable"),
        ({"kwargs": {1: 2}}, "kwargs.1.[key]", "valid string"),
        ({"priority": 10**7}, "priority", "less than or equal"),
        ({"priority": 1.5}, "priority", "valid integer"),
        ({"tenant": "team a"}, "tenant", "not a valid tenant"),
        ({"tenant": "a:b*"}, "tenant", "not a valid tenant"),
        ({"tenant": "x" * 65}, "tenant", "not a valid tenant"),
        ({"estimated_runtime_s": 0}, "estimated_runtime_s", "greater than 0"),
        ({"estimated_runtime_s": math.inf}, "estimated_runtime_s", "finite"),
        ({"idempotency_key": ""}, "idempotency_key", "at least 1"),
        ({"idempotency_key": "k" * 300}, "idempotency_key", "at most 256"),
        ({"max_retries": -1}, "max_retries", "greater than or equal to 0"),
        ({"resources": {"gpus": 2.5}}, "resources.gpus", "whole number"),
        ({"resources": {"cpus": -1}}, "resources.cpus", "greater than or equal"),
    ],
)
def test_submit_request_refuses_bad_values(values: dict, field: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        SubmitRequest(**{**GOOD, **values})
    assert field in caught.value.problems, caught.value.problems
    assert reason in caught.value.problems[field]


def test_every_bad_field_is_reported_at_once() -> None:
    with pytest.raises(InvalidRequest) as caught:
        SubmitRequest(task_name="a b", tenant="?", priority="high", resources={"gpus": -1})
    assert set(caught.value.fields) == {"task_name", "tenant", "priority", "resources.gpus"}


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"node_id": "gpu node"}, "node_id"),
        ({"node_id": "n{1}"}, "node_id"),
        ({"node_id": "n1", "gpus": -1}, "gpus"),
        ({"node_id": "n1", "gpus": 2, "gpu_memory_mb": 0}, "gpu_memory_mb"),
        ({"node_id": "n1", "cpus": 0}, "cpus"),
        ({"node_id": "n1", "slots": 0}, "slots"),
        ({"node_id": "n1", "labels": {"a": "b c"}}, "labels"),
    ],
)
def test_node_spec_refuses_bad_values(values: dict, field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        NodeSpec(**values)
    assert field in caught.value.problems
