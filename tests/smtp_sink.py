#!/usr/bin/env python3
"""A real SMTP server for satchel's mail tests (aiosmtpd).

Every accepted message is appended as one JSON line to --out (and every RCPT
address asked, accepted or not, as a line to <out>.rcpt):
  {"mail_from", "rcpt_tos", "data", "tls", "auth", "t_ms", "t_us"}

Behaviour is chosen per recipient by the local part (what comes before an optional
"+tag", so tests can use fresh addresses: fail451-twice+t1@example.com):

  reject550        RCPT answered 550 (permanent)
  down421          RCPT answered 421 (service closing)
  fail451-twice    RCPT answered 451 the first two times this exact address is seen
  fail-after-data  the first DATA with this address is answered 451 after the content
  slow<ms>         the message is accepted only after <ms> milliseconds (e.g. slow800)
  anything else    accepted

--tls-cert/--tls-key enable STARTTLS (and --require-tls refuses mail before it), or
with --implicit-tls, TLS from the first byte (smtps);
--auth user:pass requires AUTH PLAIN/LOGIN with those credentials;
--idle-421 S answers MAIL FROM with 421 in a session that sat idle for S seconds since
its last message (a relay closing idle sessions); --idle-close S closes a session idle
for S seconds without a word (aiosmtpd's own timeout, as Postfix's smtpd_timeout).
"""

import argparse
import asyncio
import json
import re
import ssl
import sys
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

SEEN = {}
LOCK = threading.Lock()
IDLE_421 = [None]


def behaviour(address):
    local = address.split("@", 1)[0].lower()
    return local.split("+", 1)[0]


def seen(key):
    with LOCK:
        SEEN[key] = SEEN.get(key, 0) + 1
        return SEEN[key]


class Handler:
    def __init__(self, out):
        self.out = out

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        last = getattr(session, "satchel_last", None)
        if IDLE_421[0] and last is not None and time.time() - last > IDLE_421[0]:
            return "421 4.4.2 idle too long, closing"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        # Every RCPT the sink was asked, accepted or not: <out>.rcpt, a line each.
        with LOCK, open(self.out + ".rcpt", "a") as f:
            f.write(address + "\n")
        kind = behaviour(address)
        if kind == "reject550":
            return "550 5.1.1 <%s>: no such user here" % address
        if kind == "down421":
            return "421 4.3.2 service shutting down, try later"
        if kind == "fail451-twice" and seen(("rcpt", address.lower())) <= 2:
            return "451 4.3.0 temporary failure, try again"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        session.satchel_last = time.time()
        kinds = [behaviour(r) for r in envelope.rcpt_tos]
        for r, kind in zip(envelope.rcpt_tos, kinds):
            if kind == "fail-after-data" and seen(("data", r.lower())) <= 1:
                return "451 4.3.0 failed after DATA, try again"
            m = re.fullmatch(r"slow(\d+)", kind)
            if m:
                await asyncio.sleep(int(m.group(1)) / 1000)
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "data": envelope.content.decode("utf-8", "replace"),
            "tls": session.ssl is not None
            or server.transport.get_extra_info("ssl_object") is not None,
            "t_ms": int(time.time() * 1000),
            "t_us": int(time.time() * 1_000_000),
            "auth": (session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None),
        }
        with LOCK:
            with open(self.out, "a") as f:
                f.write(json.dumps(record) + "\n")
        return "250 2.0.0 queued"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--require-tls", action="store_true")
    p.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte (smtps)")
    p.add_argument("--auth")
    p.add_argument("--idle-421", type=float, help="answer MAIL FROM with 421 in a session idle this long (s)")
    p.add_argument("--idle-close", type=float, help="close a session idle this long (s), without a reply")
    a = p.parse_args()
    IDLE_421[0] = a.idle_421

    kwargs = {}
    if a.idle_close:
        kwargs["timeout"] = a.idle_close
    controller_kwargs = {}
    if a.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(a.tls_cert, a.tls_key)
        if a.implicit_tls:
            controller_kwargs["ssl_context"] = ctx
        else:
            kwargs["tls_context"] = ctx
            kwargs["require_starttls"] = a.require_tls
    if a.auth:
        user, password = a.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == user
                and auth_data.password.decode() == password
            )
            if ok:
                return AuthResult(success=True, auth_data=auth_data)
            # handled=False: aiosmtpd answers 535 itself.
            return AuthResult(success=False, handled=False)

        kwargs["authenticator"] = authenticator
        kwargs["auth_required"] = True
        kwargs["auth_require_tls"] = bool(a.tls_cert) and not a.implicit_tls
    else:
        kwargs["auth_require_tls"] = False

    controller = Controller(
        Handler(a.out),
        hostname="127.0.0.1",
        port=a.port,
        decode_data=False,
        enable_SMTPUTF8=True,
        **kwargs,
        **controller_kwargs,
    )
    controller.start()
    print("READY", a.port, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    sys.exit(main())
