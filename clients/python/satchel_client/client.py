"""The blocking client: one connection shared by every thread, a reader thread that
matches answers to requests by id, so calls from many threads are pipelined."""

from __future__ import annotations

import itertools
import socket as _socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as _FutureTimeout
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from ._common import (
    CACHE_OUTAGE,
    CLIENT_TIMEOUT,
    CLOSED,
    DEFAULT_MAX_FRAME,
    DISCONNECTED,
    EMPTY_LOCAL_STATS,
    PROTOCOL_VERSION,
    EventCursor,
    UNREACHABLE,
    FrameReader,
    LocalCache,
    SatchelError,
    as_list,
    decode_body,
    default_socket_path,
    encode_frame,
    error_from_wire,
    fields,
    mail_fields,
)


class _Connection:
    def __init__(self, sock: _socket.socket, local: Optional[LocalCache] = None):
        self.sock = sock
        self.local = local
        self.pending: Dict[int, Any] = {}  # id -> (Future, op)
        self.plock = threading.Lock()
        self.closed = False
        self.fatal: Optional[SatchelError] = None  # an id-less error frame before close
        self.hello: Optional[Dict[str, Any]] = None
        self.max_frame = DEFAULT_MAX_FRAME

    def read_loop(self) -> None:
        reader = FrameReader()
        try:
            while True:
                data = self.sock.recv(256 * 1024)
                if not data:
                    break
                for body in reader.feed(data):
                    self._on_frame(body)
        except OSError:
            pass
        finally:
            self.fail_all()

    def _on_frame(self, body: bytes) -> None:
        try:
            msg = decode_body(body)
        except Exception:
            return
        if not isinstance(msg, dict):
            return
        rid = msg.get("id")
        if rid is None:
            if "push" in msg:
                if self.local is not None:
                    self.local.on_push(msg)
                return
            # FORBIDDEN, connection-limit UNAVAILABLE or TOO_LARGE: the daemon closes next.
            if msg.get("ok") is False:
                self.fatal = error_from_wire(msg.get("error"), None)
            return
        with self.plock:
            entry = self.pending.pop(rid, None)
        if entry is None:
            return
        fut, op = entry
        if msg.get("ok") is True:
            fut.set_result(msg.get("result"))
        else:
            fut.set_exception(error_from_wire(msg.get("error"), op))

    def fail_all(self) -> None:
        with self.plock:
            self.closed = True
            pending, self.pending = self.pending, {}
        # Pushes are per connection: what was kept can no longer be trusted.
        if self.local is not None:
            self.local.live = False
            self.local.flush()
        err = self.fatal
        for fut, op in pending.values():
            if not fut.done():
                fut.set_exception(
                    err
                    or SatchelError(
                        DISCONNECTED,
                        "connection to the satchel daemon closed; the request may or may not have run",
                        op=op,
                    )
                )
        try:
            # shutdown first: close alone does not wake a reader blocked in recv.
            self.sock.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class Client:
    """A blocking satchel client, safe to share between threads.

    Connects (and says ``hello``) on first use and again after the connection drops;
    requests in flight when it drops raise ``SatchelError`` with code ``DISCONNECTED``.
    """

    def __init__(
        self,
        socket: Optional[str] = None,
        *,
        client_name: Optional[str] = None,
        connect_timeout: float = 2.0,
        request_timeout: Optional[float] = None,
        local_cache_bytes: int = 0,
    ):
        """``local_cache_bytes`` > 0 keeps values this process read in its own memory
        (hits cost no I/O), coherent through the daemon's invalidation pushes; it needs
        the daemon's near-cache (``cache.near``, on by default)."""
        self.local = LocalCache(local_cache_bytes) if local_cache_bytes > 0 else None
        self.socket_path = socket or default_socket_path()
        self.client_name = client_name or f"python/{threading.get_native_id()}"
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._lock = threading.Lock()  # connection state and socket writes
        self._conn: Optional[_Connection] = None
        self._ids = itertools.count(1)
        self._closed = False
        self.cache = CacheApi(self)
        self.mail = MailApi(self)

    # -- connection -----------------------------------------------------------------

    def _connect_locked(self) -> _Connection:
        if self._closed:
            raise SatchelError(CLOSED, "client is closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            raise SatchelError(
                UNREACHABLE, f"cannot connect to the satchel daemon at {self.socket_path}: {e}"
            ) from None
        sock.settimeout(None)
        conn = _Connection(sock, self.local)
        threading.Thread(target=conn.read_loop, name="satchel-reader", daemon=True).start()
        fut = self._send_locked(conn, "hello", {"protocol": PROTOCOL_VERSION, "client": self.client_name})
        try:
            hello = fut.result(self.connect_timeout)
        except _FutureTimeout:
            conn.fail_all()
            raise SatchelError(UNREACHABLE, "the daemon did not answer hello in time") from None
        if hello.get("protocol") != PROTOCOL_VERSION:
            conn.fail_all()
            raise SatchelError("INTERNAL", f"daemon speaks protocol {hello.get('protocol')}")
        conn.hello = hello
        conn.max_frame = int(hello.get("max_frame") or DEFAULT_MAX_FRAME)
        if self.local is not None:
            # Track before any read goes out on this connection; a daemon that cannot
            # (cache.near off) leaves the local cache off for this connection.
            try:
                tracked = self._send_locked(conn, "cache.track", {}).result(self.connect_timeout)
                self.local.live = bool(tracked and tracked.get("tracking"))
            except (SatchelError, _FutureTimeout):
                self.local.live = False
        self._conn = conn
        return conn

    def _send_locked(self, conn: _Connection, op: str, args: Dict[str, Any]) -> Future:
        rid = next(self._ids)
        req = {"id": rid, "op": op}
        req.update(args)
        frame = encode_frame(req, conn.max_frame)
        fut: Future = Future()
        with conn.plock:
            if conn.closed:
                # The daemon may already have refused this connection (FORBIDDEN, …).
                raise conn.fatal or SatchelError(DISCONNECTED, "connection to the satchel daemon closed", op=op)
            conn.pending[rid] = (fut, op)
        try:
            conn.sock.sendall(frame)
        except OSError:
            # The daemon closed its end. A refusal (FORBIDDEN, connection limit) may be
            # waiting in our receive buffer: let the reader thread read it, then fail
            # every pending request with it (or DISCONNECTED) at EOF.
            try:
                conn.sock.shutdown(_socket.SHUT_WR)
            except OSError:
                conn.fail_all()
        return fut

    def submit(self, op: str, args: Optional[Dict[str, Any]] = None) -> Future:
        """Sends one op with exactly these fields, without waiting; the Future resolves
        to its result."""
        with self._lock:
            conn = self._connect_locked()
            return self._send_locked(conn, op, args or {})

    def request(self, op: str, **args: Any) -> Any:
        """Sends any op with its wire fields (None fields are dropped); returns its result."""
        return self._call(op, fields(**args))

    def _call(self, op: str, args: Dict[str, Any]) -> Any:
        fut = self.submit(op, args)
        try:
            return fut.result(self.request_timeout)
        except _FutureTimeout:
            raise SatchelError(CLIENT_TIMEOUT, f"{op}: no answer within {self.request_timeout} s", op=op) from None

    def connect(self) -> Dict[str, Any]:
        """Connects if needed; returns the hello result."""
        with self._lock:
            return dict(self._connect_locked().hello or {})

    def supports(self, op: str) -> bool:
        return op in (self.connect().get("ops") or [])

    def ping(self, delay_ms: Optional[int] = None) -> str:
        return self.request("ping", delay_ms=delay_ms)

    def stats(self) -> Dict[str, Any]:
        return self.request("stats")

    def health(self) -> Dict[str, Any]:
        return self.request("health")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.sock.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass
            conn.fail_all()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CacheApi:
    def __init__(self, client: Client):
        self._c = client

    def _local(self) -> Optional[LocalCache]:
        local = self._c.local
        if local is None:
            return None
        if self._c._conn is None or self._c._conn.closed:
            self._c.connect()
        return local if local.live else None

    def _read(self, op: str, key: str, args: Dict[str, Any]) -> Dict[str, Any]:
        """One read through the local cache: a local hit, or the daemon's answer (kept
        unless an invalidation overtook it)."""
        local = self._local()
        if local is None:
            return self._c._call(op, args)
        got = local.get(key)
        if got is not None:
            return {"hit": True, "value": got[0], "ttl_ms": got[1]}
        epoch = local.begin(key)
        try:
            r = self._c._call(op, args)
        except BaseException:
            local.finish(key, epoch)
            raise
        local.finish(key, epoch, bool(r.get("hit")) and not r.get("stale"), r.get("value"), r.get("ttl_ms"))
        return r

    def get(self, key: str) -> Dict[str, Any]:
        """``{"hit": True, "value": v, "ttl_ms": n}`` or ``{"hit": False}``."""
        return self._read("cache.get", key, {"key": key})

    def mget(self, keys: Sequence[str]) -> List[Dict[str, Any]]:
        local = self._local()
        if local is None:
            return self._c.request("cache.mget", keys=list(keys))
        out, ask, epochs = local.split(keys)
        if not ask:
            return out
        try:
            r = self._c._call("cache.mget", {"keys": [keys[i] for i in ask]})
        except BaseException:
            local.merge(keys, out, ask, epochs, None)
            raise
        return local.merge(keys, out, ask, epochs, r)

    def _forget(self, keys: Sequence[str]) -> None:
        if self._c.local is not None:
            for k in keys:
                self._c.local.invalidate(k)

    def set(self, key: str, value: Any, ttl_ms: Optional[int] = None, tags: Optional[Sequence[str]] = None) -> bool:
        args = fields(key=key, ttl_ms=ttl_ms, tags=as_list(tags))
        args["value"] = value
        self._forget([key])
        stored = self._c._call("cache.set", args)["stored"]
        self._forget([key])
        return stored

    def delete(self, keys: Union[str, Sequence[str]]) -> int:
        """Deletes one key or several; returns how many existed. (``del`` is a keyword.)"""
        keys = as_list(keys) or []
        deleted = self._c.request("cache.del", keys=keys)["deleted"]
        self._forget(keys)
        return deleted

    def local_stats(self) -> Dict[str, int]:
        """The local cache's counters: hits, misses, entries, bytes, invalidations, flushes."""
        return self._c.local.stats() if self._c.local is not None else dict(EMPTY_LOCAL_STATS)

    def invalidate(self, tags: Optional[Sequence[str]] = None, prefix: Optional[str] = None) -> int:
        return self._c.request("cache.invalidate", tags=as_list(tags), prefix=prefix)["deleted"]

    def fetch(self, key: str, lease_ms: Optional[int] = None, wait_ms: Optional[int] = None) -> Dict[str, Any]:
        """``{"hit": True, "value", "ttl_ms"}``, ``{"hit": False, "lease"}`` (load and fill) or ``{"hit": False}``."""
        return self._read("cache.fetch", key, fields(key=key, lease_ms=lease_ms, wait_ms=wait_ms))

    def fill(self, key: str, lease: str, value: Any, ttl_ms: Optional[int] = None, tags: Optional[Sequence[str]] = None) -> bool:
        args = fields(key=key, lease=lease, ttl_ms=ttl_ms, tags=as_list(tags))
        args["value"] = value
        stored = self._c._call("cache.fill", args)["stored"]
        self._forget([key])
        return stored

    def get_or_set(
        self,
        key: str,
        loader: Callable[[], Any],
        ttl_ms: Optional[int] = None,
        tags: Optional[Sequence[str]] = None,
        lease_ms: Optional[int] = None,
        wait_ms: Optional[int] = None,
        strict: bool = False,
    ) -> Any:
        """Cache-aside with leases: one caller per missing key runs ``loader`` and fills;
        concurrent callers wait for its value. Without a lease the loader runs and nothing
        is filled; a raising loader raises here and its lease expires. On a cache outage
        the loader runs uncached unless ``strict``."""
        local = self._c.local
        if local is not None and local.live:
            got = local.get(key)
            if got is not None:
                return got[0]
        try:
            r = self.fetch(key, lease_ms=lease_ms, wait_ms=wait_ms)
        except SatchelError as e:
            if not strict and e.code in CACHE_OUTAGE:
                return loader()
            raise
        if r.get("hit"):
            return r.get("value")
        value = loader()
        if r.get("lease"):
            try:
                self.fill(key, r["lease"], value, ttl_ms=ttl_ms, tags=tags)
            except SatchelError as e:
                if strict or e.code not in CACHE_OUTAGE:
                    raise
        return value


class SuppressionApi:
    """The suppression list (``mail.suppression.*``)."""

    def __init__(self, client: Client):
        self._c = client

    def list(self, limit: Optional[int] = None, cursor: Optional[str] = None) -> Dict[str, Any]:
        """One page: ``{"entries": [{address, reason, class, at_ms}], "cursor"?}``."""
        return self._c.request("mail.suppression.list", limit=limit, cursor=cursor)

    def add(self, address: str, reason: Optional[str] = None) -> Dict[str, Any]:
        return self._c.request("mail.suppression.add", address=address, reason=reason)

    def remove(self, address: str) -> Dict[str, Any]:
        return self._c.request("mail.suppression.remove", address=address)


class TemplateApi:
    """Shared templates (``mail.template.*``); send with ``template=`` and ``vars=``."""

    def __init__(self, client: Client):
        self._c = client

    def put(self, name: str, subject: str, text: Optional[str] = None, html: Optional[str] = None) -> Dict[str, Any]:
        return self._c.request("mail.template.put", name=name, subject=subject, text=text, html=html)

    def get(self, name: str) -> Dict[str, Any]:
        return self._c.request("mail.template.get", name=name)

    def delete(self, name: str) -> Dict[str, Any]:
        return self._c.request("mail.template.delete", name=name)

    def list(self) -> List[str]:
        return self._c.request("mail.template.list")["templates"]


class MailApi:
    def __init__(self, client: Client):
        self._c = client
        self.suppression = SuppressionApi(client)
        self.template = TemplateApi(client)

    def send(self, to: Any, subject: Optional[str] = None, **kw: Any) -> Dict[str, Any]:
        """Queues a mail; returns ``{"mail_id", "status", "duplicate"}``. Keywords: cc, bcc,
        from_, reply_to, text, html, headers, attachments, idempotency_key, send_at_ms,
        template and vars (render a stored template instead of subject/text/html)."""
        return self._c.request("mail.send", **mail_fields(to, subject, **kw))

    def status(self, mail_id: str) -> Dict[str, Any]:
        return self._c.request("mail.status", mail_id=mail_id)

    def cancel(self, mail_id: str) -> Dict[str, Any]:
        return self._c.request("mail.cancel", mail_id=mail_id)

    def retry(self, mail_id: str) -> Dict[str, Any]:
        return self._c.request("mail.retry", mail_id=mail_id)

    def dead(self, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        return self._c.request("mail.dead", limit=limit)

    def events(
        self,
        since: Optional[str] = None,
        mail_id: Optional[str] = None,
        follow: bool = True,
        wait_ms: int = 30_000,
    ) -> "EventStream":
        """Mail events (status transitions), oldest first: an iterator that
        long-polls ``mail.events`` and resumes by itself (also after the daemon was
        unreachable for a while). ``since=None``: only events from now on; ``"0"``:
        from the oldest kept. With ``follow=False`` it ends when no event is left.
        Its ``cursor`` is where to resume later (``since=stream.cursor``)."""
        return EventStream(self._c, since, mail_id, follow, wait_ms)


class EventStream:
    """See :meth:`MailApi.events`."""

    def __init__(self, client: Client, since: Optional[str], mail_id: Optional[str], follow: bool, wait_ms: int):
        self._c = client
        self._mail_id = mail_id
        self._follow = follow
        self._state = EventCursor(since, wait_ms if follow else 0, client.request_timeout)

    @property
    def cursor(self) -> Optional[str]:
        return self._state.cursor

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> Dict[str, Any]:
        while True:
            e = self._state.take()
            if e is not None:
                return e
            try:
                r = self._c.request(
                    "mail.events",
                    since=self._state.cursor,
                    mail_id=self._mail_id,
                    wait_ms=self._state.wait_ms,
                    limit=1000,
                )
            except SatchelError as err:
                if not (self._follow and err.retryable):
                    raise
                time.sleep((err.retry_after_ms or 250) / 1000)
                continue
            if not self._state.feed(r) and not self._follow:
                raise StopIteration
