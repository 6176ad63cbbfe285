"""A stand-in daemon for encoding tests: records each request and answers via a handler."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading

import msgpack


class FakeDaemon:
    def __init__(self, handler, ops=("hello", "ping")):
        self.handler = handler
        self.ops = list(ops)
        self.requests = []
        self.dir = tempfile.mkdtemp(prefix="satchel-fake-")
        self.socket = os.path.join(self.dir, "fake.sock")
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.socket)
        self.srv.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
                    n = struct.unpack(">I", buf[:4])[0]
                    req = msgpack.unpackb(buf[4 : 4 + n], raw=False)
                    buf = buf[4 + n :]
                    if req["op"] == "hello":
                        reply = {"ok": True, "result": {"protocol": 1, "server": "fake/0", "max_frame": 8 << 20,
                                                        "max_inflight": 1024, "ops": self.ops}}
                    else:
                        self.requests.append(req)
                        reply = self.handler(req)
                    reply["id"] = req["id"]
                    body = msgpack.packb(reply, use_bin_type=True)
                    conn.sendall(struct.pack(">I", len(body)) + body)

    def close(self):
        self.srv.close()
