"""Bad input never reaches Redis (DESIGN.md invariant 6), fuzzed with Hypothesis.

``Client.submit`` and the CLI's ``submit`` get wrong types, negative/NaN/huge numbers,
fractional GPU counts above 1, unknown labels, names and tenants with Redis key
metacharacters, whitespace and huge lengths, non-JSON arguments and payloads over
``max_payload_bytes``. Each is refused with an error naming the field, and a DUMP of
every key is byte-for-byte the same afterwards. Good input, drawn just as widely, is
accepted and stored as given, so the refusals are not a test that cannot fail.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from broker import Client, InvalidRequest, Resources, TaskState
from broker.models import IDEMPOTENCY_KEY_MAX, MAX_PRIORITY, NAME_PATTERN, TASK_NAME_MAX, TASK_NAME_PATTERN
from broker.settings import Settings
from broker.store.scripts import Scripts, wall_clock_ms
from tests.conftest import Clock
from workers.cli import app

PAYLOAD_LIMIT = 8192
PROBE = "workers.tasks.probe"
# Characters with a meaning in Redis key patterns, hash tags or our key layout, and whitespace.
METACHARACTERS = "{}:*?[]\\ \n\t\r\x00/'\""
# Terminal markup the CLI must print as text, not interpret (Rich would raise on a stray closing tag).
MARKUP = ("[/x]", "a[bold]b", "[red]", "x[/]", "[link=file:///etc/passwd]x[/link]")
FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Each CLI run builds Typer's command afresh (~0.1 s): the CLI gets fewer examples than the client.
CLI_FUZZ = settings(FUZZ, max_examples=40)
CLI_SMOKE = settings(FUZZ, max_examples=15)
runner = CliRunner()


def dump(client: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key with its serialised value: equal dumps mean Redis is byte-for-byte unchanged."""
    return {key: client.dump(key) for key in sorted(client.scan_iter(count=1000))}


@pytest.fixture
def pool(scripts: Scripts, clock: Clock, settings: Settings) -> Settings:
    """Two registered nodes (so satisfiability is judged) and settings with a small payload limit."""
    clock.now_ms = wall_clock_ms()
    scripts.register("a100", "inc-a", 3_600_000, 4, 40_960, 16_000, 131_072, 8, {"gpu_model": "A100"})
    scripts.register("cpu", "inc-c", 3_600_000, 0, 0, 64_000, 524_288, 8, {"zone": "z1"})
    return Settings(**{**settings.model_dump(), "max_payload_bytes": PAYLOAD_LIMIT})


@pytest.fixture
def client(pool: Settings) -> Iterator[Client]:
    with Client(settings=pool) as c:
        yield c


# ---- strategies ----------------------------------------------------------------------

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
good_task_names = st.lists(identifiers, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= TASK_NAME_MAX)
good_names = st.from_regex(NAME_PATTERN, fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
not_json = st.sampled_from([float("nan"), float("inf"), -float("inf"), b"bytes", {1, 2}, object(), complex(1, 2),
                            Resources()])
wrong_scalars = st.one_of(st.binary(max_size=8), st.lists(st.integers(), max_size=2), st.dictionaries(
    st.text(max_size=3), st.integers(), max_size=2))


def with_metacharacter(valid: st.SearchStrategy[str], among: str = METACHARACTERS) -> st.SearchStrategy[str]:
    return st.tuples(valid, st.sampled_from(among), valid).map("".join)


def bad_names(valid: st.SearchStrategy[str], longest: int, pattern: Any) -> st.SearchStrategy[Any]:
    """Names a field refuses: metacharacters, whitespace, empty, too long, other text, wrong types."""
    return st.one_of(
        with_metacharacter(valid),
        st.just(""),
        st.integers(longest + 1, 5000).map(lambda n: "a" * n),
        st.text(min_size=1, max_size=30).filter(lambda s: not pattern.match(s)),
        st.integers(), st.floats(), st.none(), wrong_scalars,
    )


def bad_resources() -> st.SearchStrategy[tuple[str, Any]]:
    """(field, value) pairs Resources refuses, as the keyword a caller would pass."""
    numbers_out = st.one_of(st.floats(max_value=-0.001), st.just(math.nan), st.just(math.inf),
                            st.floats(min_value=1e7, allow_infinity=False), st.text(max_size=3), st.none())
    return st.one_of(
        st.tuples(st.just("gpus"), st.one_of(numbers_out, st.floats(1.001, 1000).filter(lambda g: g != int(g)),
                                             st.sampled_from([0.0001, 0.5005, 2000.0]), st.booleans())),
        st.tuples(st.just("cpus"), st.one_of(numbers_out, st.sampled_from([0.0001, 1.0005]))),
        st.tuples(st.just("memory_mb"), st.one_of(st.integers(max_value=-1), st.integers(min_value=2**41),
                                                  st.floats(), st.text(max_size=3))),
        st.tuples(st.just("gpu_memory_mb"), st.one_of(st.integers(max_value=0), st.integers(min_value=2**25),
                                                      st.floats(), st.text(max_size=3))),
        st.tuples(st.just("labels"), st.one_of(
            st.dictionaries(with_metacharacter(good_names), good_names, min_size=1, max_size=2),
            st.dictionaries(good_names, with_metacharacter(good_names), min_size=1, max_size=2),
            st.dictionaries(st.integers(), good_names, min_size=1, max_size=1),
            st.text(max_size=5), st.lists(good_names, min_size=1, max_size=2))),
    )


def bad_submissions() -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """(the field the error must name, the submit keywords that are wrong only there)."""
    oversized = st.integers(PAYLOAD_LIMIT, 4 * PAYLOAD_LIMIT).map(lambda n: "x" * n)
    return st.one_of(
        bad_names(good_task_names, TASK_NAME_MAX, TASK_NAME_PATTERN).map(lambda v: ("task_name", {"task_name": v})),
        # (a tenant of None is the task's declared default, else "default")
        bad_names(good_names, 64, NAME_PATTERN).filter(lambda v: v is not None).map(
            lambda v: ("tenant", {"tenant": v})),
        st.one_of(st.text(max_size=5), st.integers(), st.dictionaries(st.text(max_size=3), st.integers()),
                  st.lists(not_json, min_size=1, max_size=2), st.lists(st.lists(not_json, min_size=1), min_size=1),
                  oversized.map(lambda blob: [blob])).map(lambda v: ("args", {"args": v})),
        st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=5), st.integers(),
                  st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),
                  st.dictionaries(st.text(max_size=5), not_json, min_size=1, max_size=2),
                  oversized.map(lambda blob: {"blob": blob})).map(lambda v: ("kwargs", {"kwargs": v})),
        bad_resources().map(lambda fv: ("resources", {"resources": {fv[0]: fv[1]}})),
        st.one_of(st.text(max_size=3), st.integers(), st.lists(st.integers(), max_size=2)).map(
            lambda v: ("resources", {"resources": v})),
        # Valid on its own, but no registered node has it (or has that much).
        st.dictionaries(good_names, good_names, min_size=1, max_size=2).filter(
            lambda labels: labels not in ({"gpu_model": "A100"}, {"zone": "z1"})).map(
            lambda labels: ("resources.labels", {"resources": Resources(labels=labels)})),
        st.sampled_from([5.0, 16.0, 1024.0]).map(lambda g: ("resources.gpus", {"resources": Resources(gpus=g)})),
        st.one_of(st.integers(max_value=-MAX_PRIORITY - 1), st.integers(min_value=MAX_PRIORITY + 1),
                  st.floats(), st.text(max_size=3), st.booleans()).map(  # None: the task's declared default
            lambda v: ("priority", {"priority": v})),
        st.one_of(st.floats(max_value=0), st.just(math.nan), st.just(math.inf),
                  st.floats(min_value=10 * 365 * 86400 + 1, allow_infinity=False), st.text(max_size=3)).map(
            lambda v: ("estimated_runtime_s", {"estimated_runtime_s": v})),
        st.one_of(st.just(""), st.integers(IDEMPOTENCY_KEY_MAX + 1, 3000).map(lambda n: "k" * n), st.integers(),
                  st.binary(min_size=1, max_size=4), st.just("a\ud800b")).map(
            lambda v: ("idempotency_key", {"idempotency_key": v})),
        st.one_of(st.integers(max_value=-1), st.integers(min_value=101), st.floats(), st.text(max_size=3),
                  st.booleans()).map(lambda v: ("max_retries", {"max_retries": v})),
    )


def names_field(exc: InvalidRequest, field: str) -> bool:
    return any(f == field or f.startswith(field + ".") for f in exc.problems) and field in str(exc)


# ---- Client.submit ---------------------------------------------------------------------


@FUZZ
@given(case=bad_submissions())
def test_bad_submit_is_refused_naming_the_field_and_writes_nothing(
        client: Client, redis_client: redis.Redis, case: tuple[str, dict[str, Any]]) -> None:
    field, wrong = case
    before = dump(redis_client)
    with pytest.raises(InvalidRequest) as refused:
        client.submit(**{"task_name": PROBE, **wrong})
    assert names_field(refused.value, field), (field, refused.value.problems)
    assert dump(redis_client) == before


@FUZZ
@given(case=bad_resources())
def test_bad_resources_are_refused_naming_the_field(case: tuple[str, Any]) -> None:
    field, value = case
    with pytest.raises(InvalidRequest) as refused:
        Resources(**{field: value})
    assert names_field(refused.value, field), refused.value.problems


@st.composite
def good_resources(draw: st.DrawFn) -> Resources:
    """Anything the a100 node could run (the cpu node has no GPUs)."""
    kind = draw(st.sampled_from(["whole", "share", "cpu"]))
    cpus = draw(st.integers(0, 16_000)) / 1000
    memory = draw(st.integers(0, 131_072))
    labels = draw(st.sampled_from([{}, {"gpu_model": "A100"}]))
    if kind == "whole":
        return Resources(gpus=float(draw(st.integers(1, 4))), gpu_memory_mb=draw(st.none() | st.integers(1, 40_960)),
                         cpus=cpus, memory_mb=memory, labels=labels)
    if kind == "share":
        return Resources(gpus=draw(st.integers(1, 999)) / 1000, gpu_memory_mb=draw(st.none() | st.integers(1, 40_960)),
                         cpus=cpus, memory_mb=memory, labels=labels)
    return Resources(cpus=cpus, memory_mb=memory, labels=draw(st.sampled_from([{}, {"zone": "z1"}])))


@settings(FUZZ, max_examples=60)
@given(task_name=good_task_names, args=st.lists(json_values, max_size=3),
       kwargs=st.dictionaries(st.text(max_size=8), json_values, max_size=3), resources=good_resources(),
       priority=st.integers(-MAX_PRIORITY, MAX_PRIORITY), tenant=good_names,
       estimate=st.none() | st.floats(0.001, 10 * 365 * 86400),
       idempotency_key=st.none() | st.text(min_size=1, max_size=IDEMPOTENCY_KEY_MAX).filter(
           lambda k: not any(0xD800 <= ord(c) <= 0xDFFF for c in k)),
       max_retries=st.integers(0, 100))
def test_good_submit_is_accepted_and_stored_as_given(
        client: Client, task_name: str, args: list[Any], kwargs: dict[str, Any], resources: Resources,
        priority: int, tenant: str, estimate: float | None, idempotency_key: str | None, max_retries: int) -> None:
    assume(len(json.dumps([args, kwargs])) < PAYLOAD_LIMIT // 4)  # Celery's envelope roughly doubles it
    handle = client.submit(task_name, args=args, kwargs=kwargs, resources=resources, priority=priority,
                           tenant=tenant, estimated_runtime_s=estimate, idempotency_key=idempotency_key,
                           max_retries=max_retries)
    status = client.status(handle.id)
    if not handle.created:  # a key drawn twice: the first task answers
        return
    assert status.state is TaskState.PENDING
    assert (status.name, status.tenant, status.priority, status.resources) == (task_name, tenant, priority, resources)


def test_a_payload_over_the_limit_is_refused_naming_the_bigger_part(client: Client, redis_client: redis.Redis) -> None:
    before = dump(redis_client)
    for field, keywords in (("args", {"args": ["x" * PAYLOAD_LIMIT]}),
                            ("kwargs", {"kwargs": {"blob": "x" * PAYLOAD_LIMIT}})):
        with pytest.raises(InvalidRequest) as refused:
            client.submit(PROBE, **keywords)
        assert list(refused.value.problems) == [field]
        assert f"the limit is {PAYLOAD_LIMIT}" in str(refused.value)
    assert dump(redis_client) == before
    # Just under the limit is fine: the limit is on the encoded task, not a rough guess.
    client.submit(PROBE, args=["x" * (PAYLOAD_LIMIT // 2)])


def test_default_payload_limit_is_one_mebibyte() -> None:
    assert Settings().max_payload_bytes == 1024 * 1024


def test_a_client_for_a_pool_name_with_metacharacters_is_refused(redis_client: redis.Redis) -> None:
    for pool in ("a{b}", "a:b", "*", "a b", "x\ny", "p" * 65):
        with pytest.raises(ValueError, match="pool"):
            Client(pool=pool)
    assert redis_client.dbsize() == 0


# ---- the CLI ---------------------------------------------------------------------------


@pytest.fixture
def env(pool: Settings) -> dict[str, str]:
    return {"GPUBROKER_REDIS_URL": pool.redis_url, "GPUBROKER_POOL": pool.pool,
            "GPUBROKER_MAX_PAYLOAD_BYTES": str(PAYLOAD_LIMIT)}


def cli_text(value: str) -> bool:
    """What a shell can pass as an argument (no NUL) and Click will not read as an option."""
    return "\x00" not in value and not value.startswith("-")


def cli_metacharacter(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return with_metacharacter(valid, METACHARACTERS.replace("\x00", "")).filter(cli_text)


def bad_cli_submissions() -> st.SearchStrategy[tuple[str, list[str]]]:
    """(the field the refusal must name, submit's argv) for values Click parses but gpubroker refuses."""
    def option(name: str, field: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, list[str]]]:
        return values.filter(cli_text).map(lambda v: (field, [PROBE, f"--{name}", v]))

    texts = st.text(min_size=1, max_size=30).filter(cli_text)
    return st.one_of(
        st.one_of(cli_metacharacter(good_task_names), st.sampled_from(MARKUP),
                  texts.filter(lambda s: not TASK_NAME_PATTERN.match(s)),
                  st.integers(TASK_NAME_MAX + 1, 3000).map(lambda n: "a" * n)).map(lambda v: ("task_name", [v])),
        option("tenant", "tenant", st.one_of(cli_metacharacter(good_names), st.sampled_from(MARKUP),
                                             st.just("t" * 65), texts.filter(
            lambda s: not NAME_PATTERN.match(s)))),
        option("gpus", "gpus", st.sampled_from(["nan", "inf", "1.5", "2.25", "2000", "0.0005", "1e9"])),
        option("cpus", "cpus", st.sampled_from(["nan", "inf", "0.0001", "1e9"])),
        option("memory-mb", "memory_mb", st.sampled_from(["999999999999999", str(2**41)])),
        option("priority", "priority", st.sampled_from([str(MAX_PRIORITY + 1), str(2**62)])),
        option("estimate", "estimated_runtime_s", st.sampled_from(["0", "nan", "inf", "1e12"])),
        option("idempotency-key", "idempotency_key", st.just("k" * (IDEMPOTENCY_KEY_MAX + 1))),
        option("args", "args", st.one_of(
            st.sampled_from(['{"a": 1}', '"text"', "[NaN]", "[Infinity]", "[1, 2", "{oops", "", "[1]]"]),
            st.text(max_size=20).filter(lambda s: not _is_json_array(s)),
            st.integers(PAYLOAD_LIMIT, 3 * PAYLOAD_LIMIT).map(lambda n: json.dumps(["x" * n])))),
        option("kwargs", "kwargs", st.one_of(
            st.sampled_from(["[1]", '{"a": NaN}', '{"a": 1', "null", '"s"']),
            st.integers(PAYLOAD_LIMIT, 3 * PAYLOAD_LIMIT).map(lambda n: json.dumps({"blob": "x" * n})))),
        option("label", "labels", st.tuples(cli_metacharacter(good_names), good_names).map("=".join)),
        option("label", "label", good_names),
        option("label", "resources.labels", good_names.map(lambda key: f"{key}=nowhere")),
        st.just(("gpu_memory_mb", [PROBE, "--gpu-memory-mb", "1000"])),
    )


def _is_json_array(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except ValueError:
        return False


@CLI_FUZZ
@given(case=bad_cli_submissions())
def test_bad_cli_submit_exits_2_refused_naming_the_field_and_writes_nothing(
        env: dict[str, str], redis_client: redis.Redis, case: tuple[str, list[str]]) -> None:
    field, argv = case
    before = dump(redis_client)
    result = runner.invoke(app, ["submit", *argv], env=env)
    assert result.exit_code == 2, (argv, result.output, result.exception)
    assert "refused" in result.output and field in result.output, (argv, result.output)
    assert dump(redis_client) == before


@CLI_SMOKE
@given(option=st.sampled_from(["--gpus", "--cpus", "--memory-mb", "--priority", "--estimate", "--gpu-memory-mb"]),
       value=st.sampled_from(["abc", "1,5", "0x10", "one", "[]", "1.5.1"]))
def test_cli_values_of_the_wrong_type_exit_2_naming_the_option(
        env: dict[str, str], redis_client: redis.Redis, option: str, value: str) -> None:
    before = dump(redis_client)
    result = runner.invoke(app, ["submit", PROBE, option, value], env=env)
    assert result.exit_code == 2, (option, value, result.output)
    assert "Invalid value" in result.output and option in result.output, result.output
    assert dump(redis_client) == before


@pytest.mark.parametrize("name", ["a{b}", "a:b", "x y", "*"])
def test_cli_pool_with_metacharacters_exits_2(env: dict[str, str], redis_client: redis.Redis, name: str) -> None:
    before = dump(redis_client)
    result = runner.invoke(app, ["submit", PROBE, "--pool", name], env=env)
    assert result.exit_code == 2 and "pool" in result.output, result.output
    assert dump(redis_client) == before


@CLI_SMOKE
@given(task_name=good_task_names, tenant=good_names, gpus=st.sampled_from(["0", "0.5", "1", "4", "0.125"]),
       priority=st.integers(-MAX_PRIORITY, MAX_PRIORITY), args=st.lists(json_values, max_size=3))
def test_good_cli_submit_prints_the_new_task_id(env: dict[str, str], client: Client, task_name: str, tenant: str,
                                               gpus: str, priority: int, args: list[Any]) -> None:
    result = runner.invoke(app, ["submit", task_name, "--tenant", tenant, "--gpus", gpus, "--priority",
                                 str(priority), "--args", json.dumps(args), "--json"], env=env)
    assert result.exit_code == 0, result.output
    status = client.status(json.loads(result.output)["id"])
    assert (status.name, status.tenant, status.priority, status.resources.gpus) == (
        task_name, tenant, priority, float(gpus))
