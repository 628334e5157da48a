"""producer.resp against a real redis-server: the URLs it takes, logging in, replies in order,
error replies raised, and a connection lost to a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from producer.resp import Address, AsyncConnection, SyncConnection, pack, plain_url
from tests.conftest import RedisServer


class PasswordRedis(RedisServer):
    persistence = ("--save", "", "--appendonly", "no", "--requirepass", "s3cret")

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(port=self.port, password="s3cret", db=2)

    def start(self) -> None:
        import subprocess
        import shutil
        import time

        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", *self.persistence,
                                      "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.exceptions.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")


@pytest.mark.parametrize("url, address", [
    ("redis://127.0.0.1:6379/1", Address("127.0.0.1", 6379, 1)),
    ("redis://:pw@h:7/2", Address("h", 7, 2, None, "pw")),
    ("redis://u:p%40x@h/0", Address("h", 6379, 0, "u", "p@x")),
    ("redis://h", Address("h")),
    ("rediss://h:1/0", None),  # TLS
    ("unix:///tmp/redis.sock", None),
    ("redis://h/0?socket_timeout=3", None),  # an option redis-py would apply
    ("sqs://", None),
])
def test_only_plain_urls_are_taken(url: str, address: Address | None) -> None:
    assert plain_url(url) == address


@pytest.fixture
def password_redis(tmp_path: Path):  # type: ignore[no-untyped-def]
    server = PasswordRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_the_async_connection_logs_in_answers_in_order_and_raises_error_replies(password_redis: PasswordRedis) -> None:
    address = Address("127.0.0.1", password_redis.port, 2, None, "s3cret")

    async def scenario() -> None:
        connection = await AsyncConnection.open(address, 5)
        password_redis.client().set("text", "x")
        first = connection.call(pack(("LPUSH", "q", "a")))
        wrong = connection.call(pack(("LPUSH", "text", "b")))  # WRONGTYPE: an error reply between two answers
        third = connection.call(pack(("LPUSH", "q", "c")))
        assert await first == 1
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await wrong
        assert await third == 2
        connection.close()
        with pytest.raises(ResponseError):  # a wrong password
            await AsyncConnection.open(Address("127.0.0.1", password_redis.port, 2, None, "wrong"), 5)

    asyncio.run(scenario())
    assert password_redis.client().lrange("q", 0, -1) == [b"c", b"a"]  # in db 2, logged in


def test_a_lost_async_connection_fails_its_waiters_and_says_so(password_redis: PasswordRedis) -> None:
    address = Address("127.0.0.1", password_redis.port, 2, None, "s3cret")

    async def scenario() -> None:
        connection = await AsyncConnection.open(address, 5)
        blocked = connection.call(pack(("BLPOP", "never", "0")))  # waits until Redis goes away
        await asyncio.sleep(0.2)
        password_redis.stop()
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(blocked, 10)
        await asyncio.wait_for(connection.lost, 10)
        assert not connection.is_open
        with pytest.raises(RedisConnectionError):
            await connection.call(pack(("PING",)))

    asyncio.run(scenario())


def test_the_sync_connection_reconnects_after_a_restart(password_redis: PasswordRedis) -> None:
    connection = SyncConnection(Address("127.0.0.1", password_redis.port, 2, None, "s3cret"), 5, 10)
    replies = connection.execute([pack(("SET", "k", "1")), pack(("LPUSH", "k", "x")), pack(("GET", "k"))])
    assert replies[0] == b"OK" and isinstance(replies[1], ResponseError) and replies[2] == b"1"
    password_redis.stop()
    with pytest.raises(RedisConnectionError):
        connection.execute([pack(("PING",))])
    password_redis.start()
    assert connection.execute([pack(("SET", "k", "2"))]) == [b"OK"]  # a new connection, logged in again
    assert password_redis.client().get("k") == b"2"
