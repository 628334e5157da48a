"""Redis commands written straight to the connection: the few exchanges on an inline call's path.

redis-py wraps every command in machinery: a pool checkout under a lock, a check that the
connection holds no unread data (a non-blocking read, under its own timeout on asyncio), the
packing, a timeout around the reply, the release. On an idle machine that machinery runs cold
after every pause, and it runs before the command is written. Measured on the 2-core Zen 5 (each
call after 30 ms idle, medians): an LPUSH round trip from the event loop took 520-590 us through
redis-py's asyncio client and 210-235 us written to the transport; SETEX + PUBLISH from a thread
630-710 us through a redis-py pipeline and 240-280 us through a socket. A single-text call of
the thin facade makes three such exchanges on the path its client waits on: the job's LPUSH, the
worker's SETEX + PUBLISH of the answer, and the facade reading the published answer.

This module does only those, on plain ``redis://`` URLs (host, port, db, user, password;
``plain_url``): commands are packed by hiredis and written at once, replies parsed by hiredis
(Redis answers a connection's commands in order, so each reply resolves the oldest waiter).
Anything else (TLS, a unix socket, URL options, Sentinel) keeps redis-py: the callers check
``plain_url`` first.

* ``AsyncConnection``: an asyncio protocol (the facade's publisher and its pub/sub reader). A
  pattern subscription's messages go to a callback from ``data_received`` itself, with no task
  and no ``get_message`` poll between the socket and the waiting request.
* ``SyncConnection``: a blocking socket (the worker's answer writer thread).

Both raise redis-py's own ``ConnectionError`` / ``TimeoutError`` for a lost or silent
connection and ``ResponseError`` for an error reply, so callers' retry rules stay redis-py's.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import hiredis
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

pack = hiredis.pack_command
"""One command's bytes (RESP array of bulk strings)."""

#: what a lost, refused or silent connection raises (a caller may connect again and retry)
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError)


@dataclass(frozen=True)
class Address:
    """Where a plain ``redis://`` URL points, and how to log in."""

    host: str = "localhost"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None

    def handshake(self) -> list[bytes]:
        """The commands a fresh connection sends first (AUTH, SELECT), each answered +OK."""
        commands = []
        if self.password is not None:
            commands.append(pack(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)))
        if self.db:
            commands.append(pack(("SELECT", str(self.db))))
        return commands


_PLAIN_KEYS = {"host", "port", "db", "username", "password"}


def plain_url(url: str) -> Address | None:
    """The address of a ``redis://`` URL that carries nothing but host, port, db and credentials
    (parsed by redis-py itself); None for anything this module does not reproduce."""
    if not url.startswith("redis://"):
        return None
    try:
        parsed = parse_url(url)
    except ValueError:
        return None
    if not set(parsed) <= _PLAIN_KEYS:
        return None
    return Address(**parsed)


async def within(awaitable: Any, timeout: float) -> Any:
    """``await awaitable`` for at most ``timeout`` s (``TimeoutError`` after): ``asyncio.timeout``
    where there is one (Python 3.11: no task or extra future), else ``wait_for``."""
    if _timeout is None:
        return await asyncio.wait_for(awaitable, timeout)
    async with _timeout(timeout):
        return await awaitable


_timeout = getattr(asyncio, "timeout", None)


def _reply_error(reply: Any) -> Exception | None:
    return ResponseError(str(reply)) if isinstance(reply, hiredis.ReplyError) else None


# ------------------------------------------------------------------------------ asyncio
class _Protocol(asyncio.Protocol):
    def __init__(self, on_push: Callable[[list[Any]], None] | None) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.on_push = on_push
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self._close(RedisConnectionError(f"Redis sent something that is not RESP: {exc}"))
                return
            if reply is False:
                return
            if self.on_push is not None and type(reply) is list and reply and reply[0] == b"pmessage":
                self.on_push(reply)
                continue
            if not self.waiting:  # nothing asked for it: the stream is out of step
                self._close(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            future = self.waiting.popleft()
            if not future.done():
                error = _reply_error(reply)
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        error = RedisConnectionError(f"the Redis connection was lost: {exc or 'closed by the server'}")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(None)

    def _close(self, error: Exception) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


class AsyncConnection:
    """One connection to Redis from the event loop; ``call`` writes a packed command at once."""

    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol

    @classmethod
    async def open(cls, address: Address, connect_timeout: float,
                   on_push: Callable[[list[Any]], None] | None = None) -> "AsyncConnection":
        """Connect and log in (AUTH, SELECT); ``on_push`` receives pattern-subscription messages."""
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await within(loop.create_connection(lambda: _Protocol(on_push), address.host, address.port),
                                       connect_timeout)
        except (OSError, TimeoutError, asyncio.TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {address.host}:{address.port}: {exc}") from None
        connection = cls(protocol)
        try:
            for command in address.handshake():
                await connection.request(command, connect_timeout)
        except BaseException:
            connection.close()
            raise
        return connection

    @property
    def is_open(self) -> bool:
        return self._protocol.transport is not None and not self._protocol.transport.is_closing()

    @property
    def lost(self) -> "asyncio.Future[None]":
        """Done once the connection is gone."""
        return self._protocol.lost

    def call(self, command: bytes) -> "asyncio.Future[Any]":
        """Write ``command`` (``pack``ed) now; the future gets its reply (or the error)."""
        future = asyncio.get_running_loop().create_future()
        transport = self._protocol.transport
        if transport is None or transport.is_closing():
            future.set_exception(RedisConnectionError("the Redis connection is closed"))
            return future
        self._protocol.waiting.append(future)
        transport.write(command)
        return future

    async def request(self, command: bytes, timeout: float) -> Any:
        """``call`` and wait up to ``timeout`` s; a silent connection is closed (``TimeoutError``)."""
        future = self.call(command)
        try:
            return await within(future, timeout)
        except (TimeoutError, asyncio.TimeoutError):
            self.close()
            raise RedisTimeoutError(f"no answer from Redis within {timeout:g} s") from None

    def close(self) -> None:
        transport = self._protocol.transport
        if transport is not None:
            transport.close()


# ------------------------------------------------------------------------------ blocking
class SyncConnection:
    """One blocking connection to Redis; ``execute`` writes commands in one ``sendall`` and
    reads their replies. Not thread-safe: one thread owns it."""

    def __init__(self, address: Address, connect_timeout: float, timeout: float) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._socket: socket.socket | None = None
        self._reader = hiredis.Reader()

    def execute(self, commands: list[bytes]) -> list[Any]:
        """Every reply, in order (error replies as ``ResponseError`` values, not raised)."""
        sock = self._socket or self._connect()
        try:
            sock.sendall(b"".join(commands))
            return self._read(sock, len(commands))
        except socket.timeout:
            self.close()
            raise RedisTimeoutError(f"no answer from Redis within {self.timeout:g} s") from None
        except OSError as exc:
            self.close()
            raise RedisConnectionError(f"the Redis connection failed: {exc}") from None

    def _read(self, sock: socket.socket, count: int) -> list[Any]:
        replies: list[Any] = []
        while len(replies) < count:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.close()
                raise RedisConnectionError(f"Redis sent something that is not RESP: {exc}") from None
            if reply is not False:
                replies.append(_reply_error(reply) or reply)
                continue
            data = sock.recv(65536)
            if not data:
                raise OSError("closed by the server")
            self._reader.feed(data)
        return replies

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.address.host, self.address.port), self.connect_timeout)
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {self.address.host}:{self.address.port}: "
                                       f"{exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.timeout)
        self._socket, self._reader = sock, hiredis.Reader()
        handshake = self.address.handshake()
        if handshake:
            for reply in self.execute(handshake):
                if isinstance(reply, Exception):
                    self.close()
                    raise reply
        return sock

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
