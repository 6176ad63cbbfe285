#!/usr/bin/env python3
"""A real HTTP receiver for satchel's webhook tests (standard library only).

Every POST is appended as one JSON line to --out:
  {"t_ms", "event_id", "timestamp", "signature", "signature_ok", "body", "answer"}

`signature_ok` is checked here, independently of the daemon, with Python's hmac:
X-Satchel-Signature == "sha256=" + hex(HMAC-SHA256(secret, "<timestamp>.<body>")).

--plan "500,500,sleep,200" answers the first requests in that order (`sleep` holds
the request for --sleep seconds, longer than the daemon's timeout, then answers 200);
after the plan, every request gets 200.
"""

import argparse
import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATE = {"n": 0}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--plan", default="")
    p.add_argument("--sleep", type=float, default=3.0)
    a = p.parse_args()
    plan = [x for x in a.plan.split(",") if x]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ts = self.headers.get("X-Satchel-Timestamp", "")
            sig = self.headers.get("X-Satchel-Signature", "")
            want = "sha256=" + hmac.new(a.secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            with LOCK:
                i = STATE["n"]
                STATE["n"] += 1
            answer = plan[i] if i < len(plan) else "200"
            if answer == "sleep":
                time.sleep(a.sleep)
                code = 200
            else:
                code = int(answer)
            record = {
                "t_ms": int(time.time() * 1000),
                "event_id": self.headers.get("X-Satchel-Event-Id"),
                "timestamp": ts,
                "signature": sig,
                "signature_ok": hmac.compare_digest(sig, want),
                "body": json.loads(body or b"null"),
                "answer": answer,
            }
            try:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except (BrokenPipeError, ConnectionResetError):
                record["answer"] = answer + " (the client had gone)"
            with LOCK, open(a.out, "a") as f:
                f.write(json.dumps(record) + "\n")

    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    print("listening", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
