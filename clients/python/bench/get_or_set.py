"""get_or_set hits from Python, one call at a time: the blocking satchel client with and
without its in-process cache (``local_cache_bytes``) against redis-py doing the same
cache-aside by hand (GET, json.loads; SET on a miss), with and without redis-py's own
client-side cache (RESP3 ``cache_config``). One process, one private redis-server and
the release daemon (SATCHEL_BIN overrides); alternating runs, medians.

    cargo build --release && pip install redis
    python3 clients/python/bench/get_or_set.py [--secs 2] [--runs 3] [--keys 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("SATCHEL_BIN", str(HERE.parents[2] / "target" / "release" / "satchel"))
sys.path.append(str(HERE.parent / "tests"))
sys.path.append(str(HERE.parent))

import redis  # noqa: E402
from conftest import Stack  # noqa: E402

from satchel_client import Client  # noqa: E402


def value_for(i: int) -> dict:
    return {"id": i, "title": f"Exam {i}: Algebra I final", "date": "2026-12-01", "room": f"B-{i % 40}",
            "seats": 120, "published": False, "notes": "x" * 60}


def measure(op, keys: int, secs: float) -> float:
    n, end = 0, time.perf_counter() + secs
    while time.perf_counter() < end:
        for _ in range(100):
            op(n % keys)
            n += 1
    return n / secs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--secs", type=float, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--keys", type=int, default=10000)
    a = p.parse_args()
    stack = Stack()
    try:
        plain = Client(stack.socket)
        local = Client(stack.socket, local_cache_bytes=64 << 20)
        direct = redis.Redis.from_url(stack.redis.url)
        try:
            from redis.cache import CacheConfig

            cached = redis.Redis.from_url(stack.redis.url, protocol=3, cache_config=CacheConfig(max_size=a.keys * 2))
            cached.ping()
        except Exception as e:  # noqa: BLE001 - no client-side caching here
            print(f"redis-py client-side cache not measured: {e}")
            cached = None
        for i in range(a.keys):
            plain.cache.set(f"exam:{i}", value_for(i), ttl_ms=3_600_000)
            direct.set(f"direct:exam:{i}", json.dumps(value_for(i)), ex=3600)

        def by_hand(r):
            def op(k):
                hit = r.get(f"direct:exam:{k}")
                if hit is not None:
                    return json.loads(hit)
                v = value_for(k)
                r.set(f"direct:exam:{k}", json.dumps(v), ex=3600)
                return v
            return op

        sides = {
            "redis-py": by_hand(direct),
            "satchel": lambda k: plain.cache.get_or_set(f"exam:{k}", lambda: value_for(k)),
            "satchel local": lambda k: local.cache.get_or_set(f"exam:{k}", lambda: value_for(k)),
        }
        if cached is not None:
            sides["redis-py csc"] = by_hand(cached)
        for op in sides.values():  # warm every side's caches: each key read twice
            for k in range(a.keys * 2):
                op(k % a.keys)
        runs = {name: [] for name in sides}
        for _ in range(a.runs):
            for name, op in sides.items():
                runs[name].append(measure(op, a.keys, a.secs))
        med = {name: statistics.median(v) for name, v in runs.items()}
        print(f"get_or_set hits, 1 in flight, {a.keys} keys, ~200-byte values; medians of {a.runs} runs of {a.secs} s")
        print("| side | ops/s | / redis-py | / redis-py csc |")
        print("|---|---:|---:|---:|")
        for name, ops in med.items():
            csc = f"{ops / med['redis-py csc']:.2f}x" if "redis-py csc" in med else "n/a"
            print(f"| {name} | {ops:,.0f} | {ops / med['redis-py']:.2f}x | {csc} |")
        print("local stats:", local.cache.local_stats())
        plain.close()
        local.close()
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
