"""Celery's task envelope, built without publishing it: what ``send_task`` hands kombu's Redis
transport, for ``Client.submit_many`` (issue 14, batch submit).

``send_task`` spends most of a submit in kombu's producer machinery (routing, declare checks,
a Redis client per publish) before the transport's ``_put`` turns the envelope into a broker
submit. The envelope itself is Celery's ``amqp.as_task_v2`` (headers, ``[args, kwargs, embed]``)
serialised by kombu's JSON serialiser and wrapped as kombu's ``prepare_message`` and virtual
``basic_publish`` do; building only that makes a batch of thousands cheap, and
``tests/test_submit_many.py`` checks that the stored records equal ``Client.submit``'s.
What is skipped is kombu's publish itself. Celery's ``before_task_publish`` signal is sent here
(its receivers may add headers, as tracing does) and ``after_task_publish`` by the caller once
the task is written; ``Client.submit`` adds the task-sent event (``broker.native.events``), a
batch sends none (10,000 submits would be 10,000 events).
"""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple

from celery import Celery, signals
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu.exceptions import EncodeError
from kombu.serialization import dumps

from broker.errors import InvalidRequest
from broker.native.messages import epoch_seconds

ROUTING_KEY = "celery"  # the default queue's, as send_task routes a task with no route
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}  # as_task_v2's, with no canvas


_PLAIN = (int, float, bool, type(None))


def _plain_str(text: str) -> bool:
    """A string saferepr prints as repr does: saferepr quotes with ' and escapes only ' (no
    backslash, newline or other escape); repr escapes those, and switches to " for a '."""
    return "'" not in text and "\\" not in text and text.isprintable()


def _saferepr(value: Any, maxsize: int, maxlevels: int) -> str:
    return str(saferepr(value, maxsize, maxlevels=maxlevels))


def task_repr(value: Any, maxsize: int, maxlevels: int) -> str:
    """Celery's ``saferepr(value, maxsize, maxlevels=...)``, the argsrepr/kwargsrepr headers, with
    the common case fast: plain values (int, float, bool, None, strings without quote, backslash
    or unprintable characters) in lists, tuples and str-keyed dicts nested less than
    ``maxlevels`` deep print exactly as ``repr`` prints them while well under ``maxsize``, and
    ``repr`` costs a fraction of saferepr's walk (which took 15 % of a batch submit's time).
    Anything else, or anything longer, goes to saferepr. tests/test_submit_many.py checks the
    two agree on random values."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if type(item) in _PLAIN:
            continue
        if type(item) is str:
            if not _plain_str(item):
                return _saferepr(value, maxsize, maxlevels)
            continue
        if type(item) is dict:
            if depth >= maxlevels or not all(type(k) is str and _plain_str(k) for k in item):
                return _saferepr(value, maxsize, maxlevels)
            children: Any = item.values()
        elif type(item) in (list, tuple) and depth < maxlevels:
            children = item
        else:  # a self-reference ends here too: its depth passes maxlevels
            return _saferepr(value, maxsize, maxlevels)
        stack.extend((child, depth + 1) for child in children if type(child) not in _PLAIN)
    text = repr(value)
    return text if len(text) < maxsize // 2 else _saferepr(value, maxsize, maxlevels)


# What differs between two envelopes of one task name (``_template``), in the order the document has them.
_SLOTS = ("body", "id", "eta", "expires", "id", "argsrepr", "kwargsrepr", "id", "priority")


def _quoted(text: str | None) -> str:
    """A string (or None) as json.dumps prints it (ensure_ascii): the encoder's own function."""
    return "null" if text is None else str(encode_basestring_ascii(text))


def _document(body64: str, encoding: str, content_type: str, headers: dict[str, Any], properties: dict[str, Any],
              priority: Any, reuse: bool | None) -> dict[str, Any]:
    """The envelope kombu's Redis transport stores, to encode."""
    return {
        "body": body64, "content-encoding": encoding, "content-type": content_type, "headers": headers,
        # kombu's prepare_message: delivery_mode 2 (persistent), priority 0 when none was given;
        # as TaskMessage.stored, the properties close the document (reserve.lua appends there).
        "properties": {**properties, "delivery_mode": 2, "priority": priority or 0, "body_encoding": "base64",
                       # apply_async(reuse=...) travels as a property too (workers.warm reads it)
                       **({"reuse": reuse} if reuse is not None else {})},
    }


class Envelope(NamedTuple):
    """What the transport would make of the publish: the stored envelope and its timers (seconds),
    and the Celery headers it carries."""

    stored: str
    not_before: float | None
    expires_at: float | None
    headers: dict[str, Any]


def after_publish(envelope: Envelope) -> None:
    """Celery's ``after_task_publish`` for a task written (only when something listens)."""
    if signals.after_task_publish.receivers:
        body = json.loads(envelope.stored)
        signals.after_task_publish.send(sender=envelope.headers["task"], body=body, exchange="",
                                        routing_key=ROUTING_KEY, headers=envelope.headers)


class Envelopes:
    """Builds task envelopes as ``app.send_task`` would, one app's reply queue and origin for all.

    The headers are ``amqp.as_task_v2``'s, written here with the app's settings read once: that
    function reads two settings and the clock per call, which cost a batch more than the rest
    of the envelope. Times (countdown, eta, expires) still go through ``as_task_v2``."""

    def __init__(self, app: Celery) -> None:
        self.amqp = app.amqp
        self.reply_to = app.thread_oid  # what send_task puts in reply_to
        self.origin = anon_nodename()  # what as_task_v2 computes per call
        self.levels = app.conf.task_repr_maxlevels
        self.args_max, self.kwargs_max = app.amqp.argsrepr_maxsize, app.amqp.kwargsrepr_maxsize
        self._templates: dict[tuple[Any, ...], str | None] = {}  # ``_template``'s

    def build(self, task_id: str, name: str, args: list[Any], kwargs: dict[str, Any], priority: int | None,
              countdown: float | None, eta: datetime | None, expires: float | datetime | None,
              reuse: bool | None = None) -> Envelope:
        """The envelope of ``send_task(name, args, kwargs, task_id=..., countdown/eta/expires=...)``
        as the transport stores it (``TaskMessage.stored``)."""
        eta_iso, expires_iso = (None, None) if countdown is None and eta is None and expires is None else \
            self._times(task_id, name, countdown, eta, expires)
        args = args or ()  # type: ignore[assignment]  # as_task_v2: no args are "()" in argsrepr
        argsrepr, kwargsrepr = task_repr(args, self.args_max, self.levels), task_repr(kwargs, self.kwargs_max,
                                                                                      self.levels)
        headers = self._headers(task_id, name, argsrepr, kwargsrepr, eta_iso, expires_iso)
        properties = {"correlation_id": task_id, "reply_to": self.reply_to}
        hooked = bool(signals.before_task_publish.receivers)
        if hooked:  # as send_task_message: before the body is encoded
            signals.before_task_publish.send(sender=name, body=(args, kwargs, _EMBED), exchange="",
                                             routing_key=ROUTING_KEY, headers=headers, properties=properties,
                                             declare=[], retry_policy=None)
        try:
            content_type, encoding, body = dumps((args, kwargs, _EMBED), serializer="json")
        except EncodeError as exc:
            raise InvalidRequest({"args": f"cannot be encoded as JSON ({exc})"}) from None
        except RecursionError:  # as broker.message: Celery's encoder nests deeper than SubmitRequest's check
            raise InvalidRequest({"args": "nested too deeply to encode"}) from None
        data = body.encode(encoding) if isinstance(body, str) else body
        body64 = base64.b64encode(data).decode()
        # (a receiver may have changed anything; a value of another type is json's to print)
        plain = not hooked and {type(priority), type(eta_iso), type(expires_iso)} <= {int, str, type(None)}
        template = self._template(name, reuse, content_type, encoding) if plain else None
        if template is None:
            stored = json.dumps(_document(body64, encoding, content_type, headers, properties, priority, reuse),
                                separators=(",", ":"), allow_nan=False)
        else:
            quoted_id = _quoted(task_id)
            stored = template % (body64, quoted_id, _quoted(eta_iso), _quoted(expires_iso), quoted_id,
                                 _quoted(argsrepr), _quoted(kwargsrepr), quoted_id, priority or 0)
        return Envelope(stored, epoch_seconds(eta_iso, "eta"), epoch_seconds(expires_iso, "expires"), headers)

    def _headers(self, task_id: str, name: str, argsrepr: str, kwargsrepr: str, eta_iso: str | None,
                 expires_iso: str | None) -> dict[str, Any]:
        return {
            "lang": "py", "task": name, "id": task_id, "shadow": None, "eta": eta_iso, "expires": expires_iso,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
            "parent_id": None, "argsrepr": argsrepr, "kwargsrepr": kwargsrepr, "origin": self.origin,
            "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        }

    def _template(self, name: str, reuse: bool | None, content_type: str, encoding: str) -> str | None:
        """The stored envelope of a task ``name`` as a ``%`` template of what differs between two
        such tasks (``_SLOTS``: id, body, argsrepr, kwargsrepr, priority, eta, expires): the
        document ``json.dumps`` prints, with marks in those places, split there once per name.
        Filling it in costs a fraction of encoding the document (which was a third of the
        envelope's cost); tests/test_submit_many.py holds the two equal. None when the marks do
        not come out whole and in that order."""
        key = (name, reuse, content_type, encoding)
        if key in self._templates:
            return self._templates[key]
        marks = {slot: f"<gpubroker:{slot}>" for slot in _SLOTS}
        headers = self._headers(marks["id"], name, marks["argsrepr"], marks["kwargsrepr"], marks["eta"],
                                marks["expires"])
        properties = {"correlation_id": marks["id"], "reply_to": self.reply_to}
        text = json.dumps(_document(marks["body"], encoding, content_type, headers, properties, marks["priority"],
                                    reuse), separators=(",", ":"), allow_nan=False)
        pieces = re.split(r'"<gpubroker:([a-z]+)>"', text)
        literals, slots = pieces[::2], pieces[1::2]
        template: str | None = None
        if tuple(slots) == _SLOTS and "<gpubroker:" not in "".join(literals):
            # the body is base64, quoted here; the other strings come quoted by _quoted
            parts = [literals[0].replace("%", "%%")]
            for literal, slot in zip(literals[1:], slots, strict=True):
                parts += ['"%s"' if slot == "body" else "%s", literal.replace("%", "%%")]
            template = "".join(parts)
        if len(self._templates) < 256:
            self._templates[key] = template
        return template

    def _times(self, task_id: str, name: str, countdown: float | None, eta: datetime | None,
               expires: float | datetime | None) -> tuple[str | None, str | None]:
        """The eta and expires headers, as ``as_task_v2`` computes them (the app's clock and zone)."""
        try:
            headers = self.amqp.as_task_v2(task_id, name, countdown=countdown, eta=eta, expires=expires).headers
        except (TypeError, ValueError) as exc:  # a countdown/expires Celery refuses ("not a number")
            raise InvalidRequest({"countdown" if countdown is not None else "expires": str(exc)}) from None
        return headers["eta"], headers["expires"]
