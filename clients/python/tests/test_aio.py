"""The asyncio client against the real daemon (plain asyncio.run, no plugin needed)."""

from __future__ import annotations

import asyncio
import signal

import pytest

from satchel_client import AsyncClient, SatchelError


def run(coro):
    return asyncio.run(coro)


def test_async_set_get_and_types(stack):
    async def main():
        async with AsyncClient(stack.socket) as c:
            hello = await c.connect()
            assert "cache.get" in hello["ops"]
            assert await c.cache.set("a", {"b": b"\x01", "n": 2**63}, ttl_ms=10000) is True
            got = await c.cache.get("a")
            assert got["value"] == {"b": b"\x01", "n": 2**63}
            assert await c.cache.delete("a") == 1
            assert (await c.cache.mget(["a"]))[0] == {"hit": False}

    run(main())


def test_async_thousand_concurrent_get_or_set_load_once(stack):
    async def main():
        loads = 0

        async def loader():
            nonlocal loads
            loads += 1
            await asyncio.sleep(0.05)
            return "loaded"

        async with AsyncClient(stack.socket) as c:
            results = await asyncio.gather(
                *(c.cache.get_or_set("aherd", loader, ttl_ms=60000, tags=["aherd"]) for _ in range(1000))
            )
            assert results == ["loaded"] * 1000
            assert loads == 1
            assert await c.cache.invalidate(tags=["aherd"]) == 1
            # a sync loader works too
            assert await c.cache.get_or_set("aherd", lambda: "sync") == "sync"

    run(main())


def test_async_error_codes(stack):
    async def main():
        async with AsyncClient(stack.socket) as c:
            with pytest.raises(SatchelError) as e:
                await c.request("nope")
            assert e.value.code == "UNKNOWN_OP"
            with pytest.raises(SatchelError) as e:
                await c.cache.set("k", 1, ttl_ms=-5)
            assert (e.value.code, e.value.field) == ("BAD_REQUEST", "ttl_ms")
            with pytest.raises(SatchelError) as e:
                await c.cache.set("k", b"\0" * (2 << 20))
            assert e.value.code == "TOO_LARGE"
            assert await c.ping() == "pong"

    run(main())


def test_async_reconnects_after_the_daemon_restarts(stack):
    async def main():
        async with AsyncClient(stack.socket) as c:
            assert await c.ping() == "pong"
            in_flight = asyncio.ensure_future(c.ping(5000))
            await asyncio.sleep(0.05)
            stack.daemon.stop(signal.SIGKILL)
            with pytest.raises(SatchelError) as e:
                await in_flight
            assert e.value.code == "DISCONNECTED"
            stack.daemon.start()
            assert await c.ping() == "pong"

    run(main())
