"""kombu's SQS transport for workers: a received body that is not a kombu envelope is deleted and counted.

kombu wraps a body that is not its JSON envelope into one with no task, which Celery rejects as an
unknown message; with the redrive policy such a message is received again and again until SQS moves
it to the dead-letter queue, beside the shards that really failed. Here it is deleted on receipt
instead, counted (``embedfleet_discarded_messages``) and logged at most once a minute, as
``worker.hosting.transport`` does for Redis. A module of its own because kombu's SQS transport
imports botocore: a Redis worker never loads it (Celery imports ``SQS_TRANSPORT`` by name).
"""

from __future__ import annotations

import logging
from queue import Empty
from typing import Any

from kombu.transport import SQS
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from worker.hosting.transport import UNDECODABLE, throttle

log = logging.getLogger(__name__)


class SqsChannel(SQS.Channel):
    """kombu's SQS channel; a received body that is not a kombu envelope is deleted and counted."""

    def _get(self, queue: str) -> Any:
        try:
            return super()._get(queue)
        except IndexError:  # the one message received was discarded
            raise Empty() from None

    def _messages_to_python(self, messages: list[dict[str, Any]], queue: str) -> list[Any]:
        kept = [m for m in messages if self._decodable(m, queue, self._new_queue(queue))]
        return super()._messages_to_python(kept, queue)

    def _on_messages_ready(self, queue: str, qname: str, messages: dict[str, Any]) -> int:
        received = messages.get("Messages") or []
        kept = [m for m in received if self._decodable(m, qname, queue)]
        return int(super()._on_messages_ready(queue, qname, {**messages, "Messages": kept}))

    def _decodable(self, message: dict[str, Any], queue: str, queue_url: str) -> bool:
        """Whether the body is a kombu envelope; if not, the message is deleted and counted."""
        try:
            payload = loads(bytes_to_str(self._decode_python_message_body(message["Body"])))
            if not isinstance(payload, dict) or not isinstance(payload.get("properties"), dict) \
                    or "body" not in payload:
                raise ValueError("not a kombu message envelope")
        except (*UNDECODABLE, AttributeError) as exc:
            self._discard(message, queue, queue_url, exc)
            return False
        return True

    def _discard(self, message: dict[str, Any], queue: str, queue_url: str, exc: BaseException) -> None:
        throttle.discarded(queue, exc)
        try:
            self.sqs(queue=queue).delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
        except Exception as error:  # it comes back after the visibility timeout, and is discarded again
            log.warning("could not delete an undecodable message from %s: %s", queue, error)


class SqsTransport(SQS.Transport):
    Channel = SqsChannel
