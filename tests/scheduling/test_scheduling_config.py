"""The scheduling model: the example file loads, bad values are refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.errors import InvalidRequest
from broker.scheduling.config import Mode, Ordering, PlacementKind, SchedulingConfig
from broker.settings import Settings
from tests.support import ROOT


def test_the_example_file_loads() -> None:
    config = SchedulingConfig.load(ROOT / "config" / "scheduling.example.toml")
    assert (config.ordering, config.mode, config.placement) == (Ordering.FAIR, Mode.BACKFILL,
                                                                PlacementKind.BEST_FIT)
    assert config.tenant("vision").weight == 2 and config.tenant("vision").guarantee.gpus == 16
    assert config.tenant("nlp").lending_limit.gpus == 4
    assert config.tenant("nobody").weight == 1  # unnamed tenants get the defaults
    assert config.elastic == "fair" and SchedulingConfig().elastic == "max"


def test_settings_read_it_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBROKER_SCHEDULING", json.dumps({"ordering": "sjf", "mode": "strict"}))
    assert (Settings().scheduling.ordering, Settings().scheduling.mode) == (Ordering.SJF, Mode.STRICT)


@pytest.mark.parametrize(("data", "field", "reason"), [
    ({"ordering": "lottery"}, "ordering", "Input should be"),
    ({"mode": "eager"}, "mode", "Input should be"),
    ({"elastic": "most"}, "elastic", "Input should be 'max', 'min' or 'fair'"),
    ({"within_tenant": "lifo"}, "within_tenant", "Input should be"),
    ({"aging_per_minute": -1}, "aging_per_minute", "greater than or equal to 0"),
    ({"tenants": {"a": {"weight": 0}}}, "tenants.a.weight", "greater than 0"),
    ({"tenants": {"a": {"guarantee": {"gpus": -2}}}}, "tenants.a.guarantee.gpus", "greater than or equal"),
    ({"tenants": {"bad name": {}}}, "tenants", "not a valid tenant"),
    ({"srtf_factor": 0.5}, "srtf_factor", "greater than or equal to 1"),
    ({"surprise": 1}, "surprise", "Extra inputs"),
])
def test_bad_values_are_refused_naming_the_field(data: dict, field: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        SchedulingConfig.parse(data)
    assert reason in caught.value.problems[field], caught.value.problems


def test_a_file_that_is_not_toml_says_so(tmp_path: Path) -> None:
    bad = tmp_path / "s.toml"
    bad.write_text("ordering = \n")
    with pytest.raises(InvalidRequest, match="not valid TOML"):
        SchedulingConfig.load(bad)
