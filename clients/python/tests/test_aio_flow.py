"""Client-side flow control of the asyncio client against the real daemon, with
max_inflight_per_conn = 4 so the bound is easy to fill: slow pings (delay_ms) hold it."""

from __future__ import annotations

import asyncio

import pytest

from conftest import Stack
from satchel_client import AsyncClient, SatchelError

MAX_INFLIGHT = 4


@pytest.fixture(scope="module")
def small_stack():
    s = Stack(env={"SATCHEL_SERVER_MAX_INFLIGHT_PER_CONN": str(MAX_INFLIGHT)})
    yield s
    s.stop()


def hold_wire(c, ms):
    return [asyncio.ensure_future(c.ping(delay_ms=ms)) for _ in range(MAX_INFLIGHT)]


def test_never_more_on_the_wire_than_the_daemon_allows_and_all_complete(small_stack):
    async def main():
        async with AsyncClient(small_stack.socket) as c:
            assert (await c.connect())["max_inflight"] == MAX_INFLIGHT
            slow = hold_wire(c, 200)
            sets = [asyncio.ensure_future(c.cache.set(f"flow:{i}", i)) for i in range(40)]
            await asyncio.sleep(0.05)
            assert c.request_counts == {"sent": MAX_INFLIGHT, "queued": 40}
            seen = 0

            async def watch():
                nonlocal seen
                while True:
                    seen = max(seen, c.request_counts["sent"])
                    await asyncio.sleep(0.001)

            watcher = asyncio.ensure_future(watch())
            await asyncio.gather(*slow, *sets)
            watcher.cancel()
            assert seen <= MAX_INFLIGHT, seen
            assert c.request_counts == {"sent": 0, "queued": 0}
            got = await c.cache.mget([f"flow:{i}" for i in range(40)])
            assert [g["value"] for g in got] == list(range(40))

    asyncio.run(main())


def test_beyond_max_queued_a_call_fails_fast_with_client_overloaded(small_stack):
    async def main():
        async with AsyncClient(small_stack.socket, max_queued=5) as c:
            await c.connect()
            slow = hold_wire(c, 200)
            await asyncio.sleep(0)
            results = await asyncio.gather(
                *[c.cache.set(f"shed:{i}", i) for i in range(8)], return_exceptions=True
            )
            await asyncio.gather(*slow)
            assert results[:5] == [True] * 5
            for err in results[5:]:
                assert isinstance(err, SatchelError)
                assert err.code == "CLIENT_OVERLOADED"
                assert err.op == "cache.set"
            got = await c.cache.mget([f"shed:{i}" for i in range(8)])
            assert [g["hit"] for g in got] == [True] * 5 + [False] * 3

    asyncio.run(main())


def test_a_request_that_times_out_while_queued_is_never_sent(small_stack):
    async def main():
        async with AsyncClient(small_stack.socket, request_timeout=0.1) as c, AsyncClient(
            small_stack.socket
        ) as probe:
            await c.connect()
            slow = hold_wire(c, 300)
            await asyncio.sleep(0)
            with pytest.raises(SatchelError) as info:
                await c.cache.set("never-sent", 1)
            assert info.value.code == "CLIENT_TIMEOUT"
            for r in await asyncio.gather(*slow, return_exceptions=True):
                assert isinstance(r, SatchelError) and r.code == "CLIENT_TIMEOUT"
            deadline = asyncio.get_running_loop().time() + 5
            while c.request_counts["sent"] and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            assert c.request_counts == {"sent": 0, "queued": 0}
            assert await c.ping() == "pong"
            assert await probe.cache.get("never-sent") == {"hit": False}

    asyncio.run(main())


def test_a_dropped_connection_fails_queued_requests_as_never_sent(small_stack):
    async def main():
        async with AsyncClient(small_stack.socket) as c:
            await c.connect()
            slow = hold_wire(c, 5000)
            queued = asyncio.ensure_future(c.cache.set("dropped", 1))
            await asyncio.sleep(0.02)
            c._conn.writer.transport.abort()
            with pytest.raises(SatchelError) as info:
                await queued
            assert info.value.code == "DISCONNECTED"
            assert "never sent" in info.value.message
            for r in await asyncio.gather(*slow, return_exceptions=True):
                assert r.code == "DISCONNECTED"
                assert "never sent" not in r.message

    asyncio.run(main())
