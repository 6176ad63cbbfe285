"""The blocking client against the real daemon and a private redis-server."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from conftest import eventually
from satchel_client import Client, SatchelError


@pytest.fixture(scope="module")
def client(stack):
    c = Client(stack.socket, client_name="py-tests")
    yield c
    c.close()


def test_hello_reports_protocol_limits_and_ops(client):
    hello = client.connect()
    assert hello["protocol"] == 1
    assert hello["server"].startswith("satchel/")
    assert "cache.fetch" in hello["ops"]
    assert client.ping() == "pong"


def test_pipelined_answers_are_matched_by_id_out_of_order(client):
    slow = client.submit("ping", {"delay_ms": 200})
    fast = client.submit("ping", {})
    assert fast.result(5) == "pong"
    assert not slow.done()
    assert slow.result(5) == "pong"


def test_values_keep_their_messagepack_types(client):
    value = {
        "s": "text ✓",
        "n": 42,
        "neg": -7,
        "f": 1.5,
        "big": 2**62,
        "huge": 2**64 - 1,
        "bin": b"\x00\x01\xff",
        "list": [1, "two", None, True],
        "nested": {"a": {"b": []}},
        "none": None,
    }
    assert client.cache.set("types", value, ttl_ms=60000) is True
    got = client.cache.get("types")
    assert got["hit"] is True
    assert 0 < got["ttl_ms"] <= 60000
    assert got["value"] == value
    assert isinstance(got["value"]["bin"], bytes)


def test_a_miss_is_hit_false(client):
    assert client.cache.get("never-set") == {"hit": False}


def test_mget_in_order_and_delete_counts(client):
    client.cache.set("m1", "one")
    client.cache.set("m2", "two")
    r = client.cache.mget(["m1", "missing", "m2"])
    assert [x.get("value") if x["hit"] else None for x in r] == ["one", None, "two"]
    assert client.cache.delete(["m1", "m2", "missing"]) == 2
    assert client.cache.delete("m1") == 0


def test_bad_request_names_the_field(client):
    with pytest.raises(SatchelError) as e:
        client.cache.set("k", 1, ttl_ms=0)
    assert e.value.code == "BAD_REQUEST"
    assert e.value.field == "ttl_ms"


def test_unknown_op(client):
    with pytest.raises(SatchelError) as e:
        client.request("nope.nothing")
    assert e.value.code == "UNKNOWN_OP"
    assert e.value.field == "op"


def test_too_large_value_keeps_the_connection(client):
    with pytest.raises(SatchelError) as e:
        client.cache.set("big", b"\0" * (2 * 1024 * 1024))
    assert e.value.code == "TOO_LARGE"
    assert e.value.field == "value"
    assert client.ping() == "pong"


def test_oversize_frame_is_refused_client_side(client):
    in_flight = client.submit("ping", {"delay_ms": 100})
    with pytest.raises(SatchelError) as e:
        client.cache.set("huge", b"\0" * (9 * 1024 * 1024))
    assert e.value.code == "TOO_LARGE"
    assert in_flight.result(5) == "pong"


def test_hundred_threads_get_or_set_one_key_load_once(client):
    loads = []
    lock = threading.Lock()

    def loader():
        with lock:
            loads.append(1)
        time.sleep(0.05)
        return {"exam": "final"}

    results = []
    barrier = threading.Barrier(100)

    def worker():
        barrier.wait()
        results.append(client.cache.get_or_set("herd", loader, ttl_ms=60000, tags=["herd"]))

    threads = [threading.Thread(target=worker) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(loads) == 1
    assert results == [{"exam": "final"}] * 100


def test_get_or_set_hit_skips_the_loader(client):
    client.cache.set("cached", "from cache")
    assert client.cache.get_or_set("cached", lambda: pytest.fail("loader called")) == "from cache"


def test_raising_loader_fills_nothing_and_its_lease_expires(client):
    def boom():
        raise RuntimeError("db down")

    with pytest.raises(RuntimeError):
        client.cache.get_or_set("flaky", boom, lease_ms=100)
    assert client.cache.get("flaky") == {"hit": False}
    assert client.cache.get_or_set("flaky", lambda: "recovered", lease_ms=100) == "recovered"
    assert client.cache.get("flaky")["value"] == "recovered"


def test_fetch_and_fill_expose_leases(client):
    r = client.cache.fetch("manual", lease_ms=5000)
    assert r["hit"] is False and isinstance(r["lease"], str)
    assert client.cache.fill("manual", r["lease"], "v", tags=["t-manual"]) is True
    hit = client.cache.fetch("manual")
    assert {k: hit[k] for k in ("hit", "value")} == {"hit": True, "value": "v"}
    assert 0 < hit["ttl_ms"] <= 3_600_000
    assert client.cache.fill("manual", r["lease"], "again") is False


def test_tag_and_prefix_invalidation(client):
    client.cache.set("exam:1", "a", tags=["exams", "exam:1"])
    client.cache.set("exam:2", "b", tags=["exams"])
    client.cache.set("user:1:a", 1)
    client.cache.set("user:10:a", 2)
    assert client.cache.invalidate(tags=["exams"]) == 2
    assert client.cache.get("exam:1") == {"hit": False}
    assert client.cache.invalidate(prefix="user:1:") == 1
    assert client.cache.get("user:10:a")["hit"] is True


def test_unreachable_socket(stack):
    c = Client(stack.dir + "/nobody.sock")
    with pytest.raises(SatchelError) as e:
        c.ping()
    assert e.value.code == "UNREACHABLE"


def test_reconnects_after_the_daemon_restarts(stack, client):
    assert client.ping() == "pong"
    in_flight = client.submit("ping", {"delay_ms": 5000})
    time.sleep(0.05)
    stack.daemon.stop(signal.SIGKILL)
    with pytest.raises(SatchelError) as e:
        in_flight.result(5)
    assert e.value.code == "DISCONNECTED"
    with pytest.raises(SatchelError) as e:
        client.ping()
    assert e.value.code == "UNREACHABLE"
    stack.daemon.start()
    assert client.ping() == "pong"
    client.cache.set("after-restart", "ok")
    assert client.cache.get("after-restart")["value"] == "ok"


def test_redis_outage_gives_unavailable_and_get_or_set_falls_back(stack, client):
    stack.redis.stop()
    with pytest.raises(SatchelError) as e:
        client.cache.get("x")
    assert e.value.code == "UNAVAILABLE"
    assert e.value.retry_after_ms > 0
    assert client.cache.get_or_set("x", lambda: "from db") == "from db"
    with pytest.raises(SatchelError):
        client.cache.get_or_set("x", lambda: "from db", strict=True)
