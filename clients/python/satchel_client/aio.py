"""The asyncio client: one connection per client, a reader task matching answers to
requests by id, so concurrent coroutines are pipelined."""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import os
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Union

from ._common import (
    CACHE_OUTAGE,
    CLIENT_OVERLOADED,
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


class _AioConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, local: Optional[LocalCache] = None):
        self.local = local
        self.reader = reader
        self.writer = writer
        self.pending: Dict[int, Any] = {}  # id -> (Future, op)
        self.closed = False
        self.fatal: Optional[SatchelError] = None
        self.hello: Optional[Dict[str, Any]] = None
        self.max_frame = DEFAULT_MAX_FRAME
        self.task: Optional[asyncio.Task] = None
        # Flow control, as in the Node client: at most `max_on_wire` requests (the
        # daemon's max_inflight, from hello) are written and unanswered; the rest wait
        # in `backlog` and go out as answers come back. A request whose caller gave up
        # (timeout, cancellation) while it waited is never sent.
        self.wire: set = set()  # ids written and not yet answered
        self.max_on_wire: float = float("inf")
        self.backlog: collections.deque = collections.deque()  # (id, frame)

    @property
    def must_queue(self) -> bool:
        return bool(self.backlog) or len(self.wire) >= self.max_on_wire

    def write(self, rid: int, frame: bytes) -> None:
        if self.backlog or len(self.wire) >= self.max_on_wire:
            self.backlog.append((rid, frame))
        else:
            self.wire.add(rid)
            self.writer.write(frame)

    def pump(self) -> None:
        while self.backlog and not self.closed and len(self.wire) < self.max_on_wire:
            rid, frame = self.backlog.popleft()
            entry = self.pending.get(rid)
            if entry is None or entry[0].done():
                self.pending.pop(rid, None)
                continue
            self.wire.add(rid)
            self.writer.write(frame)

    async def read_loop(self) -> None:
        frames = FrameReader()
        try:
            while True:
                data = await self.reader.read(256 * 1024)
                if not data:
                    break
                for body in frames.feed(data):
                    self._on_frame(body)
        except (OSError, asyncio.CancelledError):
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
            if msg.get("ok") is False:
                self.fatal = error_from_wire(msg.get("error"), None)
            return
        wire = self.wire
        answered = rid in wire
        if answered:
            wire.remove(rid)
        entry = self.pending.pop(rid, None)
        if entry is not None and not entry[0].done():
            fut, op = entry
            if msg.get("ok") is True:
                fut.set_result(msg.get("result"))
            else:
                fut.set_exception(error_from_wire(msg.get("error"), op))
        if answered and self.backlog:
            self.pump()

    def fail_all(self) -> None:
        self.closed = True
        # Pushes are per connection: what was kept can no longer be trusted.
        if self.local is not None:
            self.local.live = False
            self.local.flush()
        pending, self.pending = self.pending, {}
        unsent = {rid for rid, _ in self.backlog}
        self.backlog.clear()
        self.wire.clear()
        for rid, (fut, op) in pending.items():
            if fut.done():
                continue
            if rid in unsent:
                base = self.fatal.message if self.fatal else "connection to the satchel daemon closed"
                fut.set_exception(
                    SatchelError(
                        self.fatal.code if self.fatal else DISCONNECTED,
                        f"{base} (this request was still queued in the client and never sent)",
                        op=op,
                    )
                )
            else:
                fut.set_exception(
                    self.fatal
                    or SatchelError(
                        DISCONNECTED,
                        "connection to the satchel daemon closed; the request may or may not have run",
                        op=op,
                    )
                )
        self.writer.close()


class AsyncClient:
    """An asyncio satchel client. Use it from one event loop; share it between tasks."""

    def __init__(
        self,
        socket: Optional[str] = None,
        *,
        client_name: Optional[str] = None,
        connect_timeout: float = 2.0,
        request_timeout: Optional[float] = None,
        max_queued: Optional[int] = None,
        local_cache_bytes: int = 0,
    ):
        """``local_cache_bytes`` > 0 keeps values this process read in its own memory
        (hits cost no I/O), coherent through the daemon's invalidation pushes; it needs
        the daemon's near-cache (``cache.near``, on by default)."""
        self.local = LocalCache(local_cache_bytes) if local_cache_bytes > 0 else None
        self.socket_path = socket or default_socket_path()
        self.max_queued = max_queued
        self.client_name = client_name or f"python-asyncio/{os.getpid()}"
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._conn: Optional[_AioConnection] = None
        self._connecting: Optional[asyncio.Future] = None
        self._ids = itertools.count(1)
        self._closed = False
        self.cache = AsyncCacheApi(self)
        self.mail = AsyncMailApi(self)

    async def _ensure(self) -> _AioConnection:
        if self._closed:
            raise SatchelError(CLOSED, "client is closed")
        if self._conn is not None and not self._conn.closed:
            return self._conn
        # One connect attempt shared by every coroutine that needs it.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> _AioConnection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path, limit=1 << 20), self.connect_timeout
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise SatchelError(
                UNREACHABLE, f"cannot connect to the satchel daemon at {self.socket_path}: {e!r}"
            ) from None
        conn = _AioConnection(reader, writer, self.local)
        conn.task = asyncio.ensure_future(conn.read_loop())
        try:
            hello = await asyncio.wait_for(
                self._send(conn, "hello", {"protocol": PROTOCOL_VERSION, "client": self.client_name}),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            conn.fail_all()
            raise SatchelError(UNREACHABLE, "the daemon did not answer hello in time") from None
        if hello.get("protocol") != PROTOCOL_VERSION:
            conn.fail_all()
            raise SatchelError("INTERNAL", f"daemon speaks protocol {hello.get('protocol')}")
        conn.hello = hello
        conn.max_frame = int(hello.get("max_frame") or DEFAULT_MAX_FRAME)
        if hello.get("max_inflight"):
            conn.max_on_wire = int(hello["max_inflight"])
        if self.local is not None:
            # Track before any read goes out on this connection; a daemon that cannot
            # (cache.near off) leaves the local cache off for this connection.
            try:
                tracked = await asyncio.wait_for(self._send(conn, "cache.track", {}), self.connect_timeout)
                self.local.live = bool(tracked and tracked.get("tracking"))
            except (SatchelError, asyncio.TimeoutError):
                self.local.live = False
        self._conn = conn
        return conn

    def _send(self, conn: _AioConnection, op: str, args: Dict[str, Any]) -> "asyncio.Future[Any]":
        if conn.closed:
            # The daemon may already have refused this connection (FORBIDDEN, …).
            raise conn.fatal or SatchelError(DISCONNECTED, "connection to the satchel daemon closed", op=op)
        rid = next(self._ids)
        req = {"id": rid, "op": op}
        req.update(args)
        frame = encode_frame(req, conn.max_frame)
        if conn.must_queue and self.max_queued is not None and len(conn.backlog) >= self.max_queued:
            raise SatchelError(
                CLIENT_OVERLOADED,
                f"{op}: {len(conn.backlog)} requests already wait for room on the connection "
                f"(max_queued {self.max_queued}); not sent",
                op=op,
            )
        fut = asyncio.get_running_loop().create_future()
        conn.pending[rid] = (fut, op)
        conn.write(rid, frame)
        return fut

    @property
    def request_counts(self) -> Dict[str, int]:
        """``{"sent": written and unanswered, "queued": waiting for room}``, for metrics."""
        conn = self._conn
        if conn is None or conn.closed:
            return {"sent": 0, "queued": 0}
        return {"sent": len(conn.wire), "queued": len(conn.backlog)}

    async def _call(self, op: str, args: Dict[str, Any]) -> Any:
        conn = await self._ensure()
        fut = self._send(conn, op, args)
        if conn.writer.transport.get_write_buffer_size() > (1 << 20):
            await conn.writer.drain()
        if self.request_timeout is None:
            return await fut
        try:
            return await asyncio.wait_for(fut, self.request_timeout)
        except asyncio.TimeoutError:
            raise SatchelError(CLIENT_TIMEOUT, f"{op}: no answer within {self.request_timeout} s", op=op) from None

    async def request(self, op: str, **args: Any) -> Any:
        """Sends any op with its wire fields (None fields are dropped); returns its result."""
        return await self._call(op, fields(**args))

    async def connect(self) -> Dict[str, Any]:
        return dict((await self._ensure()).hello or {})

    async def supports(self, op: str) -> bool:
        return op in ((await self.connect()).get("ops") or [])

    async def ping(self, delay_ms: Optional[int] = None) -> str:
        return await self.request("ping", delay_ms=delay_ms)

    async def stats(self) -> Dict[str, Any]:
        return await self.request("stats")

    async def health(self) -> Dict[str, Any]:
        return await self.request("health")

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail_all()
            if conn.task is not None:
                conn.task.cancel()
                try:
                    await conn.task
                except BaseException:
                    pass

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def _maybe_await(v: Any) -> Any:
    return await v if inspect.isawaitable(v) else v


class AsyncCacheApi:
    def __init__(self, client: AsyncClient):
        self._c = client

    async def _local(self) -> Optional[LocalCache]:
        local = self._c.local
        if local is None:
            return None
        if self._c._conn is None or self._c._conn.closed:
            await self._c._ensure()
        return local if local.live else None

    async def _read(self, op: str, key: str, args: Dict[str, Any]) -> Dict[str, Any]:
        """One read through the local cache: a local hit, or the daemon's answer (kept
        unless an invalidation overtook it)."""
        local = await self._local()
        if local is None:
            return await self._c._call(op, args)
        got = local.get(key)
        if got is not None:
            return {"hit": True, "value": got[0], "ttl_ms": got[1]}
        epoch = local.begin(key)
        try:
            r = await self._c._call(op, args)
        except BaseException:
            local.finish(key, epoch)
            raise
        local.finish(key, epoch, bool(r.get("hit")) and not r.get("stale"), r.get("value"), r.get("ttl_ms"))
        return r

    async def get(self, key: str) -> Dict[str, Any]:
        return await self._read("cache.get", key, {"key": key})

    async def mget(self, keys: Sequence[str]) -> List[Dict[str, Any]]:
        local = await self._local()
        if local is None:
            return await self._c.request("cache.mget", keys=list(keys))
        out, ask, epochs = local.split(keys)
        if not ask:
            return out
        try:
            r = await self._c._call("cache.mget", {"keys": [keys[i] for i in ask]})
        except BaseException:
            local.merge(keys, out, ask, epochs, None)
            raise
        return local.merge(keys, out, ask, epochs, r)

    def _forget(self, keys: Sequence[str]) -> None:
        if self._c.local is not None:
            for k in keys:
                self._c.local.invalidate(k)

    async def set(self, key: str, value: Any, ttl_ms: Optional[int] = None, tags: Optional[Sequence[str]] = None) -> bool:
        args = fields(key=key, ttl_ms=ttl_ms, tags=as_list(tags))
        args["value"] = value
        self._forget([key])
        stored = (await self._c._call("cache.set", args))["stored"]
        self._forget([key])
        return stored

    async def delete(self, keys: Union[str, Sequence[str]]) -> int:
        keys = as_list(keys) or []
        deleted = (await self._c.request("cache.del", keys=keys))["deleted"]
        self._forget(keys)
        return deleted

    async def invalidate(self, tags: Optional[Sequence[str]] = None, prefix: Optional[str] = None) -> int:
        return (await self._c.request("cache.invalidate", tags=as_list(tags), prefix=prefix))["deleted"]

    async def fetch(self, key: str, lease_ms: Optional[int] = None, wait_ms: Optional[int] = None) -> Dict[str, Any]:
        return await self._read("cache.fetch", key, fields(key=key, lease_ms=lease_ms, wait_ms=wait_ms))

    async def fill(self, key: str, lease: str, value: Any, ttl_ms: Optional[int] = None, tags: Optional[Sequence[str]] = None) -> bool:
        args = fields(key=key, lease=lease, ttl_ms=ttl_ms, tags=as_list(tags))
        args["value"] = value
        stored = (await self._c._call("cache.fill", args))["stored"]
        self._forget([key])
        return stored

    def local_stats(self) -> Dict[str, int]:
        """The local cache's counters: hits, misses, entries, bytes, invalidations, flushes."""
        return self._c.local.stats() if self._c.local is not None else dict(EMPTY_LOCAL_STATS)

    async def get_or_set(
        self,
        key: str,
        loader: Callable[[], Union[Any, Awaitable[Any]]],
        ttl_ms: Optional[int] = None,
        tags: Optional[Sequence[str]] = None,
        lease_ms: Optional[int] = None,
        wait_ms: Optional[int] = None,
        strict: bool = False,
    ) -> Any:
        """Like ``Client.cache.get_or_set``; ``loader`` may be sync or async."""
        local = self._c.local
        if local is not None and local.live:
            got = local.get(key)
            if got is not None:
                return got[0]
        try:
            r = await self.fetch(key, lease_ms=lease_ms, wait_ms=wait_ms)
        except SatchelError as e:
            if not strict and e.code in CACHE_OUTAGE:
                return await _maybe_await(loader())
            raise
        if r.get("hit"):
            return r.get("value")
        value = await _maybe_await(loader())
        if r.get("lease"):
            try:
                await self.fill(key, r["lease"], value, ttl_ms=ttl_ms, tags=tags)
            except SatchelError as e:
                if strict or e.code not in CACHE_OUTAGE:
                    raise
        return value


class AsyncSuppressionApi:
    """The suppression list (``mail.suppression.*``)."""

    def __init__(self, client: AsyncClient):
        self._c = client

    async def list(self, limit: Optional[int] = None, cursor: Optional[str] = None) -> Dict[str, Any]:
        return await self._c.request("mail.suppression.list", limit=limit, cursor=cursor)

    async def add(self, address: str, reason: Optional[str] = None) -> Dict[str, Any]:
        return await self._c.request("mail.suppression.add", address=address, reason=reason)

    async def remove(self, address: str) -> Dict[str, Any]:
        return await self._c.request("mail.suppression.remove", address=address)


class AsyncTemplateApi:
    """Shared templates (``mail.template.*``)."""

    def __init__(self, client: AsyncClient):
        self._c = client

    async def put(self, name: str, subject: str, text: Optional[str] = None, html: Optional[str] = None) -> Dict[str, Any]:
        return await self._c.request("mail.template.put", name=name, subject=subject, text=text, html=html)

    async def get(self, name: str) -> Dict[str, Any]:
        return await self._c.request("mail.template.get", name=name)

    async def delete(self, name: str) -> Dict[str, Any]:
        return await self._c.request("mail.template.delete", name=name)

    async def list(self) -> List[str]:
        return (await self._c.request("mail.template.list"))["templates"]


class AsyncMailApi:
    def __init__(self, client: AsyncClient):
        self._c = client
        self.suppression = AsyncSuppressionApi(client)
        self.template = AsyncTemplateApi(client)

    async def send(self, to: Any, subject: Optional[str] = None, **kw: Any) -> Dict[str, Any]:
        return await self._c.request("mail.send", **mail_fields(to, subject, **kw))

    async def status(self, mail_id: str) -> Dict[str, Any]:
        return await self._c.request("mail.status", mail_id=mail_id)

    async def cancel(self, mail_id: str) -> Dict[str, Any]:
        return await self._c.request("mail.cancel", mail_id=mail_id)

    async def retry(self, mail_id: str) -> Dict[str, Any]:
        return await self._c.request("mail.retry", mail_id=mail_id)

    async def dead(self, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        return await self._c.request("mail.dead", limit=limit)

    def events(
        self,
        since: Optional[str] = None,
        mail_id: Optional[str] = None,
        follow: bool = True,
        wait_ms: int = 30_000,
    ) -> "AsyncEventStream":
        """As :meth:`satchel_client.client.MailApi.events`, an async iterator:
        ``async for event in client.mail.events(since="0"): ...``."""
        return AsyncEventStream(self._c, since, mail_id, follow, wait_ms)


class AsyncEventStream:
    """See :meth:`AsyncMailApi.events`."""

    def __init__(self, client: AsyncClient, since: Optional[str], mail_id: Optional[str], follow: bool, wait_ms: int):
        self._c = client
        self._mail_id = mail_id
        self._follow = follow
        self._state = EventCursor(since, wait_ms if follow else 0, client.request_timeout)

    @property
    def cursor(self) -> Optional[str]:
        return self._state.cursor

    def __aiter__(self) -> "AsyncEventStream":
        return self

    async def __anext__(self) -> Dict[str, Any]:
        while True:
            e = self._state.take()
            if e is not None:
                return e
            try:
                r = await self._c.request(
                    "mail.events",
                    since=self._state.cursor,
                    mail_id=self._mail_id,
                    wait_ms=self._state.wait_ms,
                    limit=1000,
                )
            except SatchelError as err:
                if not (self._follow and err.retryable):
                    raise
                await asyncio.sleep((err.retry_after_ms or 250) / 1000)
                continue
            if not self._state.feed(r) and not self._follow:
                raise StopAsyncIteration
