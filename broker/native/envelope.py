"""Celery's task envelope, built without publishing it: what ``send_task`` hands kombu's Redis
transport, for ``Client.submit_many`` (issue 14, batch submit).

``send_task`` spends most of a submit in kombu's producer machinery (routing, declare checks,
a Redis client per publish) before the transport's ``_put`` turns the envelope into a broker
submit. The envelope itself is Celery's ``amqp.as_task_v2`` (headers, ``[args, kwargs, embed]``)
serialised by kombu's JSON serialiser and wrapped as kombu's ``prepare_message`` and virtual
``basic_publish`` do; building only that makes a batch of thousands cheap, and
``tests/test_submit_many.py`` checks that the stored records equal ``Client.submit``'s.
What is skipped is the publish itself: the ``before/after_task_publish`` signals, and the
task-sent event (a batch of 10,000 would be 10,000 events; ``Client.submit`` still sends one).
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu.exceptions import EncodeError
from kombu.serialization import dumps

from broker.errors import InvalidRequest
from broker.native.messages import TaskMessage, task_message


class Envelopes:
    """Builds task envelopes as ``app.send_task`` would, one app's reply queue and origin for all."""

    def __init__(self, app: Celery) -> None:
        self.amqp = app.amqp
        self.reply_to = app.thread_oid  # what send_task puts in reply_to
        self.origin = anon_nodename()  # what as_task_v2 computes per call

    def build(self, task_id: str, name: str, args: list[Any], kwargs: dict[str, Any], priority: int | None,
              countdown: float | None, eta: datetime | None, expires: float | datetime | None) -> TaskMessage:
        """The envelope of ``send_task(name, args, kwargs, task_id=..., countdown/eta/expires=...)``,
        read back as the transport reads it (so ``not_before``/``expires_at`` are parsed the same way)."""
        try:
            message = self.amqp.as_task_v2(task_id, name, args, kwargs, countdown=countdown, eta=eta,
                                           expires=expires, reply_to=self.reply_to, ignore_result=None,
                                           origin=self.origin)
        except (TypeError, ValueError) as exc:  # a countdown/expires Celery refuses ("not a number")
            raise InvalidRequest({"countdown" if countdown is not None else "expires": str(exc)}) from None
        try:
            content_type, encoding, body = dumps(message.body, serializer="json")
        except EncodeError as exc:
            raise InvalidRequest({"args": f"cannot be encoded as JSON ({exc})"}) from None
        except RecursionError:  # as broker.message: Celery's encoder nests deeper than SubmitRequest's check
            raise InvalidRequest({"args": "nested too deeply to encode"}) from None
        data = body.encode(encoding) if isinstance(body, str) else body
        envelope = {
            "body": base64.b64encode(data).decode(), "content-encoding": encoding, "content-type": content_type,
            "headers": message.headers,
            # kombu's prepare_message: delivery_mode 2 (persistent), priority 0 when none was given.
            "properties": {**message.properties, "delivery_mode": 2, "priority": priority or 0,
                           "body_encoding": "base64"},
        }
        read = task_message(envelope)
        assert read is not None  # headers carry task and id
        return read
