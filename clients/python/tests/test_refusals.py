"""Frames the daemon sends on its own (id nil) before closing: the client raises them
with the daemon's code rather than a bare disconnect."""

from __future__ import annotations

import asyncio

import pytest

from conftest import Stack, eventually
from satchel_client import AsyncClient, Client, SatchelError


@pytest.fixture()
def forbidding():
    s = Stack({"SATCHEL_SERVER_ALLOW_UIDS": "4242424"})
    yield s
    s.stop()


def test_peer_outside_allow_uids_gets_forbidden(forbidding):
    for _ in range(20):
        c = Client(forbidding.socket)
        with pytest.raises(SatchelError) as e:
            c.ping()
        assert e.value.code == "FORBIDDEN"
        c.close()


def test_async_peer_outside_allow_uids_gets_forbidden(forbidding):
    async def main():
        c = AsyncClient(forbidding.socket)
        with pytest.raises(SatchelError) as e:
            await c.ping()
        await c.close()
        return e.value.code

    assert asyncio.run(main()) == "FORBIDDEN"


def test_connection_limit_gives_unavailable_with_retry_after():
    s = Stack({"SATCHEL_SERVER_MAX_CONNECTIONS": "1"})
    first, second = Client(s.socket), Client(s.socket)
    try:
        def connects(c):
            try:
                return c.ping() == "pong"
            except SatchelError:
                return False

        # The harness's readiness probe may hold the one slot for a moment.
        eventually("the first client to connect", lambda: connects(first))
        with pytest.raises(SatchelError) as e:
            second.ping()
        assert e.value.code == "UNAVAILABLE"
        assert e.value.retry_after_ms > 0
        first.close()
        eventually("the second client to connect once a slot frees", lambda: connects(second))
    finally:
        first.close()
        second.close()
        s.stop()
