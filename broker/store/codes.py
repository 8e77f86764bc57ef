"""Return codes of the Lua transition scripts, one IntEnum per script, mirroring the ``Returns:``
block of its header (``tests/store/test_lua_headers.py`` checks that they agree). Re-exported by
``broker.store.scripts``, where the wrappers that return them live."""

from __future__ import annotations

import enum


class RegisterCode(enum.IntEnum):
    CREATED = 0
    REFRESHED = 1
    REPLACED = 2
    SHAPE_CHANGED = 3


class HeartbeatCode(enum.IntEnum):
    OK = 0
    NOT_REGISTERED = 1
    FENCED = 2
    REAPED = 3


class SubmitCode(enum.IntEnum):
    CREATED = 0
    DUPLICATE = 1
    ID_TAKEN = 2
    BAD_REQUEST = 3


class ReserveCode(enum.IntEnum):
    OK = 0
    NOT_PENDING = 1
    NODE_DOWN = 2
    LABEL_MISMATCH = 3
    NO_CAPACITY = 4
    BAD_PLACEMENT = 5
    NOT_SERVED = 6
    RATE_LIMITED = 7


class StartCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    CANCELLED = 2
    STALE = 3
    ALREADY_RUNNING = 4
    FENCED = 5


class FinishCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    STALE = 2
    BAD_OUTCOME = 3


class CancelCode(enum.IntEnum):
    CANCELLED = 0
    NOT_FOUND = 1
    ALREADY_FINAL = 2
    MOVED = 3
    STOPPING = 4
    REVOKED = 5
    REQUESTED = 6


class PromoteCode(enum.IntEnum):
    OK = 0


class ExpireCode(enum.IntEnum):
    OK = 0


class ProgressCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    STALE = 2


class ReapCode(enum.IntEnum):
    OK = 0


class RedeliverCode(enum.IntEnum):
    OK = 0


class DrainCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    FENCED = 2


class ForgetCode(enum.IntEnum):
    REMOVED = 0
    NOT_FOUND = 1
    UP = 2
    FENCED = 3


class QuarantineCode(enum.IntEnum):
    FAILED = 0
    DEAD_LETTERED = 1
    NOT_PENDING = 2


class PreemptCode(enum.IntEnum):
    REQUEUED = 0
    STOPPING = 1
    NOT_FOUND = 2
    NOT_HELD = 3
    ALREADY = 4
