"""Each Lua script's header agrees with its wrapper in broker/store/scripts.py (STYLE.md rule 2).

The header is the contract: KEYS and ARGV in order with their names, every return code, the
states it moves a task between, and the helper files it includes. ``SIGNATURES``, the IntEnums
and ``records.TRANSITIONS`` are what Python relies on; if they drift apart, a call passes keys
in the wrong slots, misreads a code, or a state is written that nothing else knows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from broker.models import SubmitRequest, TaskState
from broker.scheduling.model import GangPlacement, Placement
from broker.store import gangs
from broker.store.keys import PoolKeys
from broker.store.records import TRANSITIONS
from broker.store.scripts import LUA, SIGNATURES, Scripts, includes, script_source
from tests.invariants import ControlledClock

MAX_LINES = 90
SCRIPTS = sorted(p.name.removesuffix(".lua") for p in LUA.iterdir()
                 if p.name.endswith(".lua") and not p.name.startswith("_"))
HELPERS = sorted(p.name for p in LUA.iterdir() if p.name.endswith(".lua") and p.name.startswith("_"))
# Scripts that take a fixed prefix, then one group per item: of KEYS and ARGV (reserve: per
# placement), or of ARGV only (register: per task name).
BATCHED = {"reserve": ("KEYS", "ARGV"), "register": ("ARGV",), "reserve_gang": ("KEYS", "ARGV"),
           "submit_gang": ("ARGV",), "settle_gang": ("KEYS",)}

_KEY = re.compile(r"^-- KEYS\[(\d+)\]\s+(\w+)")
_ARG = re.compile(r"^-- ARGV\[(\d+)\]\s+(\w+)")
_CODE = re.compile(r"^--\s+(\d+)\s+([A-Z][A-Z_]*)\b")


@dataclass
class Header:
    lines: list[str]
    keys: list[tuple[int, str]] = field(default_factory=list)
    argv: list[tuple[int, str]] = field(default_factory=list)
    returns: list[tuple[int, str]] = field(default_factory=list)


def source(name: str) -> list[str]:
    return (LUA / f"{name}.lua").read_text().splitlines()


def parse_header(lines: list[str]) -> Header:
    """The leading block of ``--`` lines: KEYS, ARGV, and the codes listed after ``-- Returns``."""
    block: list[str] = []
    for line in lines:
        if not line.startswith("--"):
            break
        block.append(line)
    header, in_returns = Header(block), False
    for line in block:
        if line.startswith("-- Returns"):
            in_returns = True
        elif in_returns and (m := _CODE.match(line)):
            header.returns.append((int(m.group(1)), m.group(2)))
        elif m := _KEY.match(line):
            header.keys.append((int(m.group(1)), m.group(2)))
        elif m := _ARG.match(line):
            header.argv.append((int(m.group(1)), m.group(2)))
    return header


def numbered(names: Sequence[str]) -> list[tuple[int, str]]:
    return list(enumerate(names, start=1))


def test_every_script_has_a_wrapper_signature() -> None:
    assert SCRIPTS and set(SCRIPTS) == set(SIGNATURES)


@pytest.mark.parametrize("name", SCRIPTS)
def test_file_is_short_and_opens_with_its_header(name: str) -> None:
    lines = source(name)
    assert len(lines) <= MAX_LINES, f"{name}.lua has {len(lines)} lines; split it or move helpers to _lib.lua"
    assert re.match(rf"^-- {name}\.lua: \S", lines[0]), f"{name}.lua must open with '-- {name}.lua: <what it does>'"
    header = parse_header(lines)
    prose = [line for line in header.lines[1:] if not (_KEY.match(line) or _ARG.match(line))]
    assert any(len(line) > 10 for line in prose[:3]), f"{name}.lua: say what it does and the invariant it keeps"


@pytest.mark.parametrize("name", SCRIPTS)
def test_keys_and_argv_match_the_wrapper(name: str) -> None:
    _, keys, argv = SIGNATURES[name]
    header = parse_header(source(name))
    assert header.keys == numbered(keys), f"{name}.lua KEYS"
    assert header.argv == numbered(argv), f"{name}.lua ARGV"
    if name in BATCHED:
        text = "\n".join(header.lines)
        groups = {"KEYS": len(keys), "ARGV": len(argv)}
        assert all(f"{part}[{groups[part] + 1}+" in text for part in BATCHED[name]), "document the per-item groups"


@pytest.mark.parametrize("name", SCRIPTS)
def test_returns_match_the_code_enum(name: str) -> None:
    codes = SIGNATURES[name][0]
    header = parse_header(source(name))
    assert header.returns == [(c.value, c.name) for c in codes], f"{name}.lua Returns vs {codes.__name__}"


class RecordingScripts(Scripts):
    """The real wrappers, noting how many KEYS and ARGV each call passes."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: dict[str, tuple[int, int]] = {}

    def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.calls[name] = (len(keys), len(args))
        return super()._run(name, keys, args)

    def call(self, name: str, keys: Sequence[str], args: Sequence[Any], client: Any = None) -> Any:
        self.calls[name] = (len(keys), len(args))
        return super().call(name, keys, args, client)


def test_wrappers_pass_what_the_headers_declare(redis_client: redis.Redis, keys: PoolKeys,
                                                clock: ControlledClock) -> None:
    s = RecordingScripts(redis_client, keys, clock)
    s.register("n1", "inc-1", 10_000, 1, 1000, 1000, 1000, 1, {"zone": "a"})
    s.heartbeat("n1", "inc-1", 10_000)
    s.submit("t1", SubmitRequest(task_name="x.y", max_retries=0), '{"headers":{"id":"t1"},"properties":{"a":1}}')
    s.reserve([Placement("t1", "n1"), Placement("t2", "n1")])
    s.start("t1", "n1", "t1.1")
    s.finish("t1", "n1", "t1.1", "succeeded", "null")
    s.cancel("t1", "n1")
    s.reap()
    s.preempt("t1", "n1", "t2", 1000)
    s.promote()
    s.expire()
    s.head(3)
    s.progress("t1", "t1.1", "PROGRESS", "{}")
    s.log("t1", "t1.1", b"out", 3, "n1:/tmp/t1/1.log")
    s.drain("n1", "operator")
    s.forget("n1")
    s.quarantine("t1", "{", "req: not JSON")
    gang = SubmitRequest(task_name="x.y", replicas=2)
    gangs.submit_gang(s, "g", gang, '{"headers":{"id":"g"},"properties":{"a":1}}')
    gangs.reserve_gang(s, GangPlacement("g", (Placement("g", "n1"), Placement("g", "n1"))))
    gangs.settle(s, "g", 2, 1000)
    s.redeliver("n1")

    expected = {name: (len(k), len(a)) for name, (_, k, a) in SIGNATURES.items()}
    fixed_keys, fixed_argv = expected["reserve"]
    expected["reserve"] = (fixed_keys + 2 * 4, fixed_argv + 2 * 3)  # two placements, each 4 KEYS and 3 ARGV
    fixed_keys, fixed_argv = expected["submit_gang"]
    expected["submit_gang"] = (fixed_keys, fixed_argv + 2)  # one message per member
    fixed_keys, fixed_argv = expected["reserve_gang"]
    expected["reserve_gang"] = (fixed_keys + 2 * 4, fixed_argv + 2 * 2)  # two members, each 4 KEYS and 2 ARGV
    fixed_keys, fixed_argv = expected["settle_gang"]
    expected["settle_gang"] = (fixed_keys + 2, fixed_argv)  # one KEY per member
    assert s.calls == expected


_STATE = re.compile(r"'([A-Z][A-Z_]+)'")
_FUNCTION = re.compile(r"^local function (\w+)|^local (\w+(?:, \w+)*) =", re.MULTILINE)


def code_of(file: str) -> str:
    """A Lua file without its comments."""
    return re.sub(r"--.*", "", (LUA / file).read_text())


def defined_in(helper: str) -> set[str]:
    names: set[str] = set()
    for function, variables in _FUNCTION.findall((LUA / helper).read_text()):
        names |= {function} if function else {v.strip() for v in variables.split(",")}
    return names


@pytest.mark.parametrize("name", SCRIPTS)
def test_includes_are_exactly_what_the_script_uses(name: str) -> None:
    """A script loads only the helper files it uses, and each one it uses (or a helper it uses needs)."""
    listed = includes(name)
    assert set(listed) <= set(HELPERS), f"{name}.lua includes a file that does not exist"
    body = code_of(f"{name}.lua")
    needed = {h for h in HELPERS if any(re.search(rf"\b{n}\b", body) for n in defined_in(h))}
    for helper in list(needed):  # what the included helpers use in turn
        text = code_of(helper)
        needed |= {h for h in HELPERS if h != helper and any(re.search(rf"\b{n}\b", text) for n in defined_in(h))}
    assert set(listed) == needed, f"{name}.lua: Includes {listed}, uses {sorted(needed)}"
    assert listed == sorted(listed, key=lambda h: h != "_lib.lua"), "_lib.lua first: the others build on it"


@pytest.mark.parametrize("name", SCRIPTS)
def test_transitions_header_and_state_literals_agree_with_the_table(name: str) -> None:
    """The header's ``Transitions: FROM -> TO`` names TRANSITIONS' states, and every state the script
    (with its includes) compares or writes is a TaskState."""
    before, after = TRANSITIONS[name]
    line = next((x for x in parse_header(source(name)).lines if x.startswith("-- Transitions: ")), None)
    assert line is not None, f"{name}.lua: say which states it moves a task between"
    arrow = re.sub(r"\(.*?\)", "", line.removeprefix("-- Transitions: "))  # asides in brackets
    named = [set(_STATE_WORD.findall(side)) for side in arrow.split("->")] if "->" in arrow else [set(), set()]
    assert named == [{s.value for s in before}, {s.value for s in after}], f"{name}.lua: {line}"
    text = script_source(name)
    commands = set(_COMMAND.findall(text))  # redis.call('HSET', ...): a command, not a state
    unknown = set(_STATE.findall(text)) - commands - set(TaskState) - NOT_STATES
    assert not unknown, f"{name}.lua uses state-like literals that are not TaskStates: {unknown}"


_STATE_WORD = re.compile(r"\b[A-Z]{4,}\b")
_COMMAND = re.compile(r"call(?:_chunked)?\('([A-Z]+)'")
NOT_STATES = {"WITHSCORES", "LIMIT", "BYSCORE"}
