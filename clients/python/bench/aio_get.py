"""cache.get throughput of the asyncio client: N coroutines sharing one AsyncClient.

    cargo build --release
    python3 clients/python/bench/aio_get.py [--inflight 64] [--secs 2] [--runs 3]

Starts a private redis-server and the release daemon (SATCHEL_BIN overrides) through
the test harness. To compare two client versions, run it twice with PYTHONPATH
pointing at each version's clients/python directory first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("SATCHEL_BIN", str(HERE.parents[2] / "target" / "release" / "satchel"))
sys.path.append(str(HERE.parent / "tests"))
sys.path.append(str(HERE.parent))

# The client first: the harness puts this checkout's client first on sys.path.
import satchel_client  # noqa: E402
from satchel_client import AsyncClient  # noqa: E402
from conftest import Stack  # noqa: E402


async def bench(socket: str, inflight: int, secs: float, runs: int) -> None:
    async with AsyncClient(socket) as c:
        for i in range(100):
            await c.cache.set(f"k{i}", "x" * 200)
        for _ in range(runs):
            done = 0
            started = time.perf_counter()

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() - started < secs:
                    await c.cache.get(f"k{done % 100}")
                    done += 1

            await asyncio.gather(*[worker() for _ in range(inflight)])
            print(f"{inflight} in flight: {done / (time.perf_counter() - started):,.0f} gets/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--secs", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"client: {satchel_client.__file__}")
    stack = Stack()
    try:
        asyncio.run(bench(stack.socket, args.inflight, args.secs, args.runs))
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
