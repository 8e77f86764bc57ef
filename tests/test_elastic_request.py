"""Elastic requests (issue 13) are validated before anything is written, naming the field, and
stored so the dispatcher reads back exactly the bounds the user gave."""

from __future__ import annotations

from typing import Any

import pytest

from broker.errors import InvalidRequest
from broker.models import Resources, SubmitRequest
from broker.store.records import UnreadableRecord, decode_request, encode_request, resources_of, task_request

PROBE = "workers.tasks.probe"


@pytest.mark.parametrize(("values", "field", "reason"), [
    ({"gpus": 4, "min_gpus": 0}, "min_gpus", "greater than or equal to 1"),
    ({"gpus": 4, "min_gpus": 5}, "min_gpus", "must be from 1 to gpus (4)"),
    ({"gpus": 0.5, "min_gpus": 1}, "min_gpus", "must be from 1 to gpus (0.5)"),
    ({"min_gpus": 1}, "min_gpus", "must be from 1 to gpus (0)"),
    ({"gpus": 4, "min_gpus": 2.0}, "min_gpus", "valid integer"),
])
def test_min_gpus_out_of_range_names_the_field(values: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        Resources(**values)
    assert list(refused.value.problems) == [field]
    assert reason in refused.value.problems[field]


@pytest.mark.parametrize(("values", "field", "reason"), [
    ({"replicas": 4, "min_replicas": 0}, "min_replicas", "greater than or equal to 1"),
    ({"replicas": 4, "min_replicas": 5}, "min_replicas", "must be from 1 to replicas (4)"),
    ({"min_replicas": 2}, "min_replicas", "must be from 1 to replicas (1)"),
    ({"replicas": 2, "resources": Resources(gpus=4, min_gpus=2)}, "replicas", "use min_replicas"),
])
def test_min_replicas_out_of_range_names_the_field(values: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        SubmitRequest(task_name=PROBE, **values)
    assert list(refused.value.problems) == [field]
    assert reason in refused.value.problems[field]


def test_bounds_round_trip_through_the_stored_request() -> None:
    single = SubmitRequest(task_name=PROBE, resources=Resources(gpus=8, min_gpus=2))
    wire = decode_request(encode_request(single))
    assert wire["mg"] == 2 and resources_of(wire) == single.resources
    request = task_request("t", wire)
    assert (request.whole_gpus, request.min_gpus, request.is_elastic) == (8, 2, True)

    gang = SubmitRequest(task_name=PROBE, resources=Resources(gpus=1), replicas=8, min_replicas=2)
    wire = decode_request(encode_request(gang))
    assert (wire["k"], wire["mk"]) == (8, 2)
    assert "mk" not in decode_request(encode_request(gang, member=True))
    request = task_request("g", wire)
    assert (request.replicas, request.min_replicas, request.is_gang, request.is_elastic) == (8, 2, True, True)

    fixed = decode_request(encode_request(SubmitRequest(task_name=PROBE, resources=Resources(gpus=8))))
    assert "mg" not in fixed and not task_request("f", fixed).is_elastic


@pytest.mark.parametrize(("text", "field"), [
    ('{"g":4,"m":0,"gm":0,"c":0,"r":0,"l":{},"p":0,"n":"x","mg":5}', "mg"),
    ('{"g":4,"m":0,"gm":0,"c":0,"r":0,"l":{},"p":0,"n":"x","mg":0}', "mg"),
    ('{"g":1,"m":0,"gm":0,"c":0,"r":0,"l":{},"p":0,"n":"x","k":3,"mk":4}', "mk"),
])
def test_a_stored_bound_out_of_range_is_unreadable(text: str, field: str) -> None:
    with pytest.raises(UnreadableRecord) as unreadable:
        decode_request(text)
    assert unreadable.value.field == field
