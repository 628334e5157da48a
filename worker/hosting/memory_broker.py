"""Each in-process worker's own in-memory broker: kombu's memory transport, one broker per virtual host.

Why: kombu's memory transport keeps one broker per process (``Transport.global_state`` and the
class-wide ``Channel.queues``), whatever the URL says. Two in-process workers (``embedfleet run``
beside an embedded ``serve``, or two in a test) then share every queue: a second worker hosting
the same model takes the first one's shards and calls, runs them under its own storage roots
(the embedded facade's are "nowhere": every shard of the run was refused, stop 27), and answers
the first one's broadcasts. Here the virtual host is the broker: ``memory://localhost/<name>``
names one of its own, with its exchanges, bindings and queues, and an in-process worker given
the plain ``memory://`` broker gets one named after itself (``InProcessWorker``).

Everything that sends to a worker's broker must use the worker's Celery app, or an app with its
``broker_transport``: a URL alone opens kombu's stock memory transport, the process-wide broker
no worker consumes. Threads only, as kombu's: nothing crosses a process.
"""

from __future__ import annotations

import threading
from queue import Queue
from typing import Any
from urllib.parse import urlparse

from kombu.transport import memory, virtual

#: the ``broker_transport`` setting of an app on these brokers (Celery resolves the path)
TRANSPORT = "worker.hosting.memory_broker:Transport"


class Broker:
    """One in-memory broker: the exchanges and bindings (kombu's ``BrokerState``) and the queues."""

    def __init__(self) -> None:
        self.state = virtual.BrokerState()
        self.queues: dict[str, Queue] = {}


_brokers: dict[str, Broker] = {}
_lock = threading.Lock()


def broker_for(virtual_host: str | None) -> Broker:
    """The broker of ``virtual_host`` (``/`` when none is named), made on first use."""
    name = _name(virtual_host)
    with _lock:
        found = _brokers.get(name)
        if found is None:
            found = _brokers[name] = Broker()
        return found


def _name(virtual_host: str | None) -> str:
    return (virtual_host or "").strip("/") or "/"


def names_one(url: str) -> bool:
    """Whether a ``memory://`` URL names a broker (a virtual host); plain ``memory://`` names none."""
    return _name(urlparse(url).path) != "/"


def private_url(name: str) -> str:
    """The URL of a broker of its own for a worker called ``name`` (no ``@`` or ``/`` in it)."""
    return f"memory://localhost/{name}"


def drop(url: str) -> None:
    """Forget the broker ``url`` names, with whatever its queues still hold: the worker that
    consumed it stopped, and nothing else could ever read them."""
    with _lock:
        _brokers.pop(_name(urlparse(url).path), None)


class Channel(memory.Channel):
    """kombu's in-memory channel on its connection's broker instead of the process's one."""

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        # an instance attribute: kombu's own methods use ``self.queues``; ``close`` replaces it
        # on this instance only, and the broker's dict stays for its other channels
        self.queues = connection.broker.queues
        super().__init__(connection, **kwargs)


class Transport(memory.Transport):
    """kombu's in-memory transport whose broker is the connection's virtual host's (``broker_for``)."""

    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self.broker = broker_for(client.virtual_host)
        self.state = self.broker.state
