"""The default socket path: one rule for the daemon and every client (protocol.md,
"Transport"), checked against the rule's table and against the daemon itself."""

import os
import re
import subprocess

from satchel_client import default_socket_path, socket_path_for

from conftest import SATCHEL_BIN


def test_root_gets_the_system_socket_even_with_xdg_runtime_dir_set():
    assert socket_path_for(0, {"XDG_RUNTIME_DIR": "/run/user/0"}) == "/run/satchel/satchel.sock"
    assert socket_path_for(0, {}) == "/run/satchel/satchel.sock"
    assert socket_path_for(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == "/run/user/1000/satchel/satchel.sock"
    assert socket_path_for(1000, {"XDG_RUNTIME_DIR": ""}) == "/tmp/satchel-1000/satchel.sock"
    assert socket_path_for(1000, {}) == "/tmp/satchel-1000/satchel.sock"
    assert socket_path_for(0, {"SATCHEL_SOCKET": "/x.sock", "XDG_RUNTIME_DIR": "/r"}) == "/x.sock"


def test_this_process_and_the_daemon_agree_with_xdg_runtime_dir_set(monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("SATCHEL_SOCKET", "SATCHEL_SERVER_SOCKET")}
    env["XDG_RUNTIME_DIR"] = "/tmp/xdg-agree"
    out = subprocess.run([str(SATCHEL_BIN), "check-config"], env=env, capture_output=True, text=True, check=True)
    daemon = re.search(r'^socket = "(.*)"$', out.stdout, re.M).group(1)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/tmp/xdg-agree")
    monkeypatch.delenv("SATCHEL_SOCKET", raising=False)
    assert default_socket_path() == daemon
