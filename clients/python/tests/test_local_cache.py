"""The in-process cache (``local_cache_bytes``), blocking and asyncio, against real
daemons and a private redis-server."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
from conftest import Daemon, eventually

from satchel_client import AsyncClient, Client
from satchel_client._common import LocalCache


@pytest.fixture(scope="module")
def other(stack):
    d = Daemon(os.path.join(stack.dir, "other.sock"), stack.redis.url).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def plain(stack):
    c = Client(stack.socket)
    eventually("the daemon tracks Redis", lambda: c.stats()["cache"]["near"]["tracking"])
    yield c
    c.close()


def test_a_local_hit_makes_no_request_and_a_write_elsewhere_reaches_it(stack, other, plain):
    remote = Client(other.socket)
    with Client(stack.socket, local_cache_bytes=1 << 20) as local:
        plain.cache.set("py:a", {"n": 1}, ttl_ms=60_000)
        assert local.cache.get("py:a")["value"] == {"n": 1}
        before = plain.stats()["requests"]
        hit = local.cache.get("py:a")
        got = local.cache.get_or_set("py:a", lambda: pytest.fail("loader ran"))
        assert plain.stats()["requests"] - before == 1, "only the stats request reached the daemon"
        assert hit["hit"] and 0 < hit["ttl_ms"] <= 60_000
        got["n"] = 99
        assert local.cache.get("py:a")["value"] == {"n": 1}, "decoded per hit"
        # Another daemon's write is dropped here within 500 ms.
        remote.cache.set("py:a", "new")
        started = time.monotonic()
        while local.cache.get("py:a")["value"] != "new":
            assert time.monotonic() - started < 0.5, "the invalidation did not arrive within 500 ms"
            time.sleep(0.001)
        s = local.cache.local_stats()
        assert s["hits"] >= 3 and s["invalidations"] >= 1, s
        # Own writes, mget mixing local and remote, and a dropped connection.
        local.cache.set("py:b", 1)
        local.cache.get("py:b")
        local.cache.set("py:b", 2)
        assert local.cache.get("py:b")["value"] == 2
        r = local.cache.mget(["py:b", "py:missing", "py:a"])
        assert [x.get("value") if x["hit"] else None for x in r] == [2, None, "new"]
        assert local.cache.local_stats()["entries"] > 0
        local._conn.sock.shutdown(2)
        eventually("the local cache to be emptied", lambda: local.cache.local_stats()["entries"] == 0)
        plain.cache.set("py:b", "changed while disconnected")
        assert local.cache.get("py:b")["value"] == "changed while disconnected"
    remote.close()


def test_under_load_no_read_is_older_than_the_bound_after_an_acknowledged_write(stack, other, plain):
    keys, bound = 4, 0.5
    remote = Client(other.socket)
    acked = [[] for _ in range(keys)]
    for i in range(keys):
        remote.cache.set(f"py:v{i}", 0)
    stop = threading.Event()
    failures, reads, versions = [], [0], [0]

    def writer():
        v = 0
        while not stop.is_set():
            v += 1
            i = v % keys
            remote.cache.set(f"py:v{i}", v)
            acked[i].append((v, time.monotonic()))
            versions[0] = v
            time.sleep(0.002)

    with Client(stack.socket, local_cache_bytes=1 << 20) as local:

        def reader(r):
            n = r
            while not stop.is_set():
                n += 1
                i = n % keys
                begun = time.monotonic()
                seen = local.cache.get(f"py:v{i}")["value"]
                reads[0] += 1
                older = [a for a in list(acked[i]) if a[1] < begun]
                if older and seen < older[-1][0] and begun - older[-1][1] > bound:
                    failures.append((i, seen, older[-1]))
                if n % 20 == 0:
                    time.sleep(0.0005)  # let the writer thread have the GIL

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join()
        hits = local.cache.local_stats()["hits"]
    remote.close()
    print(f"{versions[0]} versions, {reads[0]} reads ({hits} local hits)")
    assert not failures, failures[:3]
    assert versions[0] > 100 and reads[0] > 1000
    assert hits > reads[0] / 4


def test_async_client_local_cache(stack, other, plain):
    async def main():
        remote = AsyncClient(other.socket)
        local = AsyncClient(stack.socket, local_cache_bytes=1 << 20)
        await remote.cache.set("py:as", "old")
        assert (await local.cache.get("py:as"))["value"] == "old"
        before = plain.stats()["requests"]
        assert await local.cache.get_or_set("py:as", lambda: pytest.fail("loader ran")) == "old"
        assert plain.stats()["requests"] - before == 1
        await remote.cache.set("py:as", "new")
        started = time.monotonic()
        while (await local.cache.get("py:as"))["value"] != "new":
            assert time.monotonic() - started < 0.5
            await asyncio.sleep(0.001)
        r = await local.cache.mget(["py:as", "py:nope"])
        assert [x["hit"] for x in r] == [True, False]
        await local.cache.delete("py:as")
        assert (await local.cache.get("py:as"))["hit"] is False
        s = local.cache.local_stats()
        await local.close()
        await remote.close()
        return s

    s = asyncio.run(main())
    assert s["hits"] >= 1 and s["invalidations"] >= 1, s


def test_the_pending_read_rule():
    c = LocalCache(1 << 20)
    c.live = True
    e = c.begin("k")
    c.on_push({"push": "invalidate", "keys": ["k"]})
    c.finish("k", e, True, "old", 60_000)
    assert c.get("k") is None
    e = c.begin("k")
    c.on_push({"push": "flush"})
    c.finish("k", e, True, "old", 60_000)
    assert c.get("k") is None
    c.finish("k", c.begin("k"), True, "fresh", 60_000)
    assert c.get("k")[0] == "fresh"
    small = LocalCache(4096)
    small.live = True
    for i in range(100):
        small.finish(f"k{i}", small.begin(f"k{i}"), True, "x" * 100, 60_000)
    assert small.bytes <= 4096 and 0 < small.stats()["entries"] < 100
    assert small.get("k0") is None and small.get("k99")[0] == "x" * 100


def test_a_value_read_while_its_invalidation_was_in_flight_is_not_kept(stack, other, plain):
    remote = Client(other.socket)
    with Client(stack.socket, local_cache_bytes=1 << 20) as local:
        holder = plain.cache.fetch("py:race", lease_ms=10_000)
        assert holder.get("lease")
        waits = plain.stats()["cache"]["lease_waits"]
        answer = {}
        t = threading.Thread(target=lambda: answer.update(local.cache.fetch("py:race", wait_ms=10_000)))
        t.start()
        eventually("the fetch to wait", lambda: plain.stats()["cache"]["lease_waits"] > waits)
        heard = local.cache.local_stats()["invalidations"]
        # Another daemon writes the key: its invalidation reaches the local client
        # before the answer (which needs one more Redis round trip).
        remote.cache.set("py:race", "written elsewhere")
        t.join(10)
        assert answer.get("value") == "written elsewhere"
        eventually("the invalidation", lambda: local.cache.local_stats()["invalidations"] > heard)
        misses = local.cache.local_stats()["misses"]
        assert local.cache.get("py:race")["value"] == "written elsewhere"
        assert local.cache.local_stats()["misses"] == misses + 1, "kept although its invalidation came first"
    remote.close()
