"""Harness: a private redis-server on a free port and a satchel daemon on a socket in a
temp dir, per test module. Never touches a Redis the machine already runs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve().parent
SATCHEL_BIN = Path(os.environ.get("SATCHEL_BIN") or HERE.parents[2] / "target" / "debug" / "satchel").resolve()

LOUD_SKIPS: list = []


def eventually(what, check, timeout=10.0, every=0.02):
    """Polls ``check`` until truthy or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = check()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f": {last!r}" if last else ""))
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connects(family, addr) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.connect(addr)
            return True
        except OSError:
            return False


class Redis:
    def __init__(self, tmp: str):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        eventually("redis-server to listen", lambda: self.proc.poll() is None
                   and _connects(socket.AF_INET, ("127.0.0.1", self.port)))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Daemon:
    def __init__(self, sock_path: str, redis_url: str, env=None):
        self.socket = sock_path
        self.redis_url = redis_url
        self.extra_env = dict(env or {})
        self.proc = None

    def start(self):
        if not SATCHEL_BIN.exists():
            raise RuntimeError(f"satchel binary not found at {SATCHEL_BIN}: run `cargo build` or set SATCHEL_BIN")
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "SATCHEL_SERVER_SOCKET": self.socket,
            "SATCHEL_REDIS_URL": self.redis_url,
            "SATCHEL_LOG_LEVEL": "warn",
            **self.extra_env,
        }
        self.proc = subprocess.Popen([str(SATCHEL_BIN), "serve"], env=env, stdout=subprocess.DEVNULL)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"satchel exited with {self.proc.returncode}")
            return _connects(socket.AF_UNIX, self.socket)

        eventually(f"satchel to accept on {self.socket}", up)
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        if self.proc is not None:
            self.proc.wait(timeout=15)


class Stack:
    """redis + daemon in a fresh temp dir. ``env``: extra daemon environment, or a
    function of the dir that returns it."""

    def __init__(self, env=None):
        self.dir = tempfile.mkdtemp(prefix="satchel-py-")
        if callable(env):
            env = env(self.dir)
        self.redis = Redis(self.dir)
        self.daemon = Daemon(os.path.join(self.dir, "satchel.sock"), self.redis.url, env).start()
        self.socket = self.daemon.socket

    def stop(self):
        self.daemon.stop(signal.SIGKILL)
        self.redis.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack():
    s = Stack()
    yield s
    s.stop()


def pytest_terminal_summary(terminalreporter):
    for line in LOUD_SKIPS:
        terminalreporter.write_line(f"*** SKIPPED: {line} ***", yellow=True, bold=True)
