"""What the blocking and the asyncio client share: errors, framing, field mapping."""

from __future__ import annotations

import collections
import os
import struct
import threading
import time
from typing import Any, Dict, Iterable, Optional

import msgpack

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 8 * 1024 * 1024

# Codes the client raises itself, beside the daemon's wire codes.
DISCONNECTED = "DISCONNECTED"  # connection dropped with the request in flight; it may or may not have run
UNREACHABLE = "UNREACHABLE"  # the socket could not be connected to
CLOSED = "CLOSED"  # the client was closed
CLIENT_TIMEOUT = "CLIENT_TIMEOUT"  # no answer within request_timeout
CLIENT_OVERLOADED = "CLIENT_OVERLOADED"  # max_queued requests already wait for the wire; not sent

# Codes after which get_or_set calls the loader uncached: the cache is out, the request is fine.
CACHE_OUTAGE = frozenset(
    {"UNAVAILABLE", "TIMEOUT", "SHUTTING_DOWN", DISCONNECTED, UNREACHABLE, CLIENT_TIMEOUT}
)

_HEADER = struct.Struct(">I")


class SatchelError(Exception):
    """An error answer from the daemon, or a client-side failure.

    ``code`` is the wire code (``BAD_REQUEST``, ``UNAVAILABLE``, …) or one of the client
    codes (``DISCONNECTED``, ``UNREACHABLE``, ``CLOSED``, ``CLIENT_TIMEOUT``,
    ``CLIENT_OVERLOADED``).
    """

    def __init__(
        self,
        code: str,
        message: str,
        retry_after_ms: Optional[int] = None,
        field: Optional[str] = None,
        op: Optional[str] = None,
    ):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.field = field
        self.op = op

    @property
    def retryable(self) -> bool:
        return self.retry_after_ms is not None or self.code in (DISCONNECTED, UNREACHABLE)


def error_from_wire(err: Any, op: Optional[str]) -> SatchelError:
    e = err if isinstance(err, dict) else {}
    code = e.get("code") if isinstance(e.get("code"), str) else "INTERNAL"
    message = e.get("message") if isinstance(e.get("message"), str) else f"daemon error {code}"
    retry = e.get("retry_after_ms")
    field = e.get("field") if isinstance(e.get("field"), str) else None
    return SatchelError(code, message, retry_after_ms=retry, field=field, op=op)


def socket_path_for(uid: int, env) -> str:
    """The socket path for a uid and an environment, by the one rule the daemon and
    every client share (protocol.md, "Transport"): ``SATCHEL_SOCKET`` if set; root
    uses ``/run/satchel/satchel.sock`` whatever ``XDG_RUNTIME_DIR`` says; anyone else
    ``$XDG_RUNTIME_DIR/satchel/satchel.sock``, else ``/tmp/satchel-<uid>/satchel.sock``."""
    if env.get("SATCHEL_SOCKET"):
        return env["SATCHEL_SOCKET"]
    if uid == 0:
        return "/run/satchel/satchel.sock"
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "satchel", "satchel.sock")
    return f"/tmp/satchel-{uid}/satchel.sock"


def default_socket_path() -> str:
    """The daemon's default socket path for this process (README: ``server.socket``)."""
    return socket_path_for(os.getuid(), os.environ)


def encode_frame(req: Dict[str, Any], max_frame: int) -> bytes:
    try:
        body = msgpack.packb(req, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise SatchelError("BAD_REQUEST", f"cannot encode request: {e}", op=req.get("op")) from None
    if len(body) > max_frame:
        # The daemon would answer TOO_LARGE and close the connection, failing every other
        # request on it; refuse here instead.
        raise SatchelError(
            "TOO_LARGE",
            f"request is {len(body)} bytes, the daemon's max_frame is {max_frame}",
            op=req.get("op"),
        )
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


class FrameReader:
    """Splits a byte stream into frame bodies."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterable[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _HEADER.unpack_from(self._buf, 0)
            if len(self._buf) < 4 + n:
                break
            out.append(bytes(self._buf[4 : 4 + n]))
            del self._buf[: 4 + n]
        return out


def fields(**kw: Any) -> Dict[str, Any]:
    """Drops unset (None) fields: the daemon treats nil and absent alike."""
    return {k: v for k, v in kw.items() if v is not None}


def as_list(v: Any) -> Any:
    if v is None or isinstance(v, (list, tuple)):
        return list(v) if v is not None else None
    return [v]


def mail_fields(
    to: Any,
    subject: Optional[str] = None,
    *,
    cc: Any = None,
    bcc: Any = None,
    from_: Optional[str] = None,
    reply_to: Optional[str] = None,
    text: Optional[str] = None,
    html: Optional[str] = None,
    headers: Optional[Dict[str, str]] = None,
    attachments: Optional[list] = None,
    idempotency_key: Optional[str] = None,
    send_at_ms: Optional[int] = None,
    template: Optional[str] = None,
    vars: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The wire fields of ``mail.send``. Attachments: ``{filename, content_type, data}``
    dicts (or 3-tuples); ``data`` is bytes (a str is sent as UTF-8)."""
    atts = None
    if attachments is not None:
        atts = []
        for a in attachments:
            if isinstance(a, (tuple, list)):
                a = {"filename": a[0], "content_type": a[1], "data": a[2]}
            a = dict(a)
            if isinstance(a.get("data"), str):
                a["data"] = a["data"].encode()
            atts.append({k: v for k, v in a.items() if v is not None})
    return fields(
        to=as_list(to),
        cc=as_list(cc),
        bcc=as_list(bcc),
        **{"from": from_},
        reply_to=reply_to,
        subject=subject,
        text=text,
        html=html,
        headers=headers,
        attachments=atts,
        idempotency_key=idempotency_key,
        send_at_ms=send_at_ms,
        template=template,
        vars=vars,
    )


# What a local entry costs besides its encoded value and key (dict slots, the tuple).
_LOCAL_ENTRY_OVERHEAD = 120


class LocalCache:
    """The in-process cache (``local_cache_bytes``): values this process read, kept
    encoded (callers never share a mutable object), bounded by bytes (least recently
    used first), coherent through the daemon's push frames (``cache.track``,
    protocol.md "Push frames"). A read marks its key pending; an invalidation or flush
    that arrives before its answer voids it, and a voided answer is used, not kept.
    Thread-safe: the blocking client's reader thread delivers pushes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()  # key -> (bytes, expires_at, size)
        self._pending: Dict[str, list] = {}  # key -> [reads, voided]
        self._lock = threading.Lock()
        self.bytes = 0
        self.epoch = 0
        self.live = False
        self.hits = self.misses = self.invalidations = self.flushes = 0

    def get(self, key: str) -> Optional[tuple]:
        """``(value, ttl_ms)`` of a live entry, or None."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                self.misses += 1
                return None
            now = time.monotonic()
            if now >= e[1]:
                self._drop(key)
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            blob, expires = e[0], e[1]
        return decode_body(blob), max(1, int((expires - now) * 1000))

    def begin(self, key: str) -> int:
        with self._lock:
            p = self._pending.get(key)
            if p is None:
                p = self._pending[key] = [0, False]
            p[0] += 1
            return self.epoch

    def finish(self, key: str, epoch: int, hit: bool = False, value: Any = None, ttl_ms: Any = None) -> None:
        with self._lock:
            p = self._pending.get(key)
            voided = True
            if p is not None:
                voided = p[1]
                p[0] -= 1
                if p[0] == 0:
                    del self._pending[key]
            if voided or epoch != self.epoch or not self.live or not hit or not ttl_ms or ttl_ms <= 0:
                return
            blob = msgpack.packb(value, use_bin_type=True)
            size = len(blob) + len(key) + _LOCAL_ENTRY_OVERHEAD
            if size > self.max_bytes // 4:
                return
            self._drop(key)
            self._entries[key] = (blob, time.monotonic() + ttl_ms / 1000.0, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)

    def split(self, keys: Any) -> tuple:
        """For an ``mget``: ``(out, ask, epochs)``: the answers held here (None where
        not), the indexes to ask the daemon for, and their reads begun."""
        out: list = [None] * len(keys)
        ask = []
        for i, k in enumerate(keys):
            got = self.get(k)
            if got is not None:
                out[i] = {"hit": True, "value": got[0], "ttl_ms": got[1]}
            else:
                ask.append(i)
        return out, ask, [self.begin(keys[i]) for i in ask]

    def merge(self, keys: Any, out: list, ask: list, epochs: list, answers: Optional[list]) -> list:
        """Ends the reads ``split`` began (``answers`` None: the request failed) and
        fills ``out`` with the daemon's answers."""
        for j, i in enumerate(ask):
            e = answers[j] if answers is not None else {}
            self.finish(keys[i], epochs[j], bool(e.get("hit")) and not e.get("stale"), e.get("value"), e.get("ttl_ms"))
            out[i] = e
        return out

    def _drop(self, key: str) -> None:
        e = self._entries.pop(key, None)
        if e is not None:
            self.bytes -= e[2]

    def invalidate(self, key: str) -> None:
        with self._lock:
            p = self._pending.get(key)
            if p is not None:
                p[1] = True
            self._drop(key)

    def flush(self) -> None:
        with self._lock:
            self.epoch += 1
            self._entries.clear()
            self.bytes = 0
            self.flushes += 1

    def on_push(self, msg: Dict[str, Any]) -> None:
        kind = msg.get("push")
        if kind == "invalidate":
            keys = msg.get("keys") or []
            for k in keys:
                self.invalidate(k)
            with self._lock:
                self.invalidations += len(keys)
        elif kind == "flush":
            self.flush()

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "entries": len(self._entries),
                "bytes": self.bytes,
                "invalidations": self.invalidations,
                "flushes": self.flushes,
            }


EMPTY_LOCAL_STATS = {"hits": 0, "misses": 0, "entries": 0, "bytes": 0, "invalidations": 0, "flushes": 0}


class EventCursor:
    """What an event stream has read and where it resumes: ``cursor`` is the id of
    the last event handed out, or (when everything fetched was handed out) the cursor
    the daemon answered; pass it as ``since`` to resume without gaps or repeats."""

    def __init__(self, since: Optional[str], wait_ms: int, request_timeout: Optional[float]):
        self.cursor = since
        self._server: Optional[str] = since
        self._buf: "collections.deque[Dict[str, Any]]" = collections.deque()
        # A long poll must end before the client's own timeout would.
        if request_timeout is not None:
            wait_ms = min(wait_ms, max(0, int(request_timeout * 1000) - 500))
        self.wait_ms = max(0, min(wait_ms, 30_000))

    def feed(self, result: Dict[str, Any]) -> bool:
        """Takes one mail.events answer; whether it held events."""
        events = result.get("events") or []
        self._buf.extend(events)
        self._server = result.get("cursor", self._server)
        if not self._buf:
            self.cursor = self._server
        return bool(events)

    def take(self) -> Optional[Dict[str, Any]]:
        if not self._buf:
            return None
        e = self._buf.popleft()
        self.cursor = e.get("event_id") if self._buf else self._server
        return e
