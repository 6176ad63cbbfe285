// satchel Node.js client: one pipelined Unix-socket connection, promise API.
//
// The wire contract is protocol.md at the repository root: every frame is a 4-byte
// big-endian length and one MessagePack map; responses may arrive in any order and are
// matched to their request by `id`.

import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Packr, Unpackr } from 'msgpackr';

export const PROTOCOL_VERSION = 1;


/** Error codes the client raises itself, beside the daemon's wire codes. */
export const CLIENT_CODES = Object.freeze({
  /** The connection dropped while the request was in flight; it may or may not have run. */
  DISCONNECTED: 'DISCONNECTED',
  /** The daemon's socket could not be connected to. */
  UNREACHABLE: 'UNREACHABLE',
  /** The client was closed. */
  CLOSED: 'CLOSED',
  /** No answer within `requestTimeoutMs` (only when that option is set). */
  CLIENT_TIMEOUT: 'CLIENT_TIMEOUT',
  /** `maxQueued` requests already wait for room on the connection; this one was not sent. */
  CLIENT_OVERLOADED: 'CLIENT_OVERLOADED',
});

// Codes after which calling the loader without the cache is the right move in getOrSet:
// the cache is unreachable, not the request wrong.
const CACHE_OUTAGE = new Set([
  'UNAVAILABLE',
  'TIMEOUT',
  'SHUTTING_DOWN',
  'DISCONNECTED',
  'UNREACHABLE',
  'CLIENT_TIMEOUT',
]);

export class SatchelError extends Error {
  /**
   * @param {string} code wire code (`BAD_REQUEST`, `UNAVAILABLE`, …) or a client code
   * @param {string} message
   * @param {{retryAfterMs?: number, field?: string, op?: string}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'SatchelError';
    this.code = code;
    this.retryAfterMs = extra.retryAfterMs;
    this.field = extra.field;
    this.op = extra.op;
  }

  /** True when retrying later can help (the daemon or connection said so). */
  get retryable() {
    return this.retryAfterMs !== undefined || this.code === 'DISCONNECTED' || this.code === 'UNREACHABLE';
  }
}

function errorFromWire(err, op) {
  const e = err && typeof err === 'object' ? err : {};
  const code = typeof e.code === 'string' ? e.code : 'INTERNAL';
  const message = typeof e.message === 'string' ? e.message : `daemon error ${code}`;
  const retry = e.retry_after_ms;
  return new SatchelError(code, message, {
    retryAfterMs: retry === undefined || retry === null ? undefined : Number(retry),
    field: typeof e.field === 'string' ? e.field : undefined,
    op,
  });
}

/**
 * The socket path for a uid and an environment, by the one rule the daemon and every
 * client share (protocol.md, "Transport"): `SATCHEL_SOCKET` if set; root uses
 * `/run/satchel/satchel.sock` whatever `XDG_RUNTIME_DIR` says; anyone else
 * `$XDG_RUNTIME_DIR/satchel/satchel.sock`, else `/tmp/satchel-<uid>/satchel.sock`.
 */
export function socketPathFor(uid, env) {
  if (env.SATCHEL_SOCKET) return env.SATCHEL_SOCKET;
  if (uid === 0) return '/run/satchel/satchel.sock';
  if (env.XDG_RUNTIME_DIR) return path.join(env.XDG_RUNTIME_DIR, 'satchel', 'satchel.sock');
  return `/tmp/satchel-${uid}/satchel.sock`;
}

/** The daemon's default socket path for this process (README: server.socket). */
export function defaultSocketPath() {
  const uid = typeof process.getuid === 'function' ? process.getuid() : os.userInfo().uid;
  return socketPathFor(uid, process.env);
}

// Drop undefined fields: the daemon treats a missing field and nil alike, so sending
// nothing is the same request in fewer bytes.
function fields(obj) {
  const out = {};
  for (const [k, v] of Object.entries(obj)) if (v !== undefined) out[k] = v;
  return out;
}

const snake = (s) => s.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase());
const camel = (s) => s.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase());

function isPlainObject(v) {
  return v !== null && typeof v === 'object' && Object.getPrototypeOf(v) === Object.prototype;
}

// Result maps come back snake_case; JS callers get camelCase. Header maps are data, not
// field names, so they are left alone.
/**
 * Mail records' times (`…Ms`) and `attempts` as numbers: Unix ms need more than 32
 * bits, so they arrive as 64-bit ints (BigInt with `useBigInt64`), yet stay far below
 * 2^53. Applied after camelKeys to status, dead and event records.
 */
function mailNumbers(v) {
  if (Array.isArray(v)) return v.map(mailNumbers);
  if (!isPlainObject(v)) return v;
  for (const [k, val] of Object.entries(v)) {
    if (typeof val === 'bigint' && (k.endsWith('Ms') || k === 'attempts')) v[k] = Number(val);
  }
  return v;
}

function camelKeys(v) {
  if (Array.isArray(v)) return v.map(camelKeys);
  if (!isPlainObject(v)) return v;
  const out = {};
  for (const [k, val] of Object.entries(v)) out[camel(k)] = k === 'headers' ? val : camelKeys(val);
  return out;
}

/** Turns a camelCase mail into the wire's `mail.send` fields (exported for tests). */
export function mailToWire(mail) {
  if (!isPlainObject(mail)) throw new TypeError('mail.send expects an object');
  const out = {};
  for (const [k, v] of Object.entries(mail)) {
    if (v === undefined || v === null) continue;
    const key = snake(k);
    if (key === 'to' || key === 'cc' || key === 'bcc') {
      out[key] = Array.isArray(v) ? v : [v];
    } else if (key === 'attachments') {
      out[key] = v.map((a) => {
        const w = {};
        for (const [ak, av] of Object.entries(a)) {
          if (av === undefined || av === null) continue;
          w[snake(ak)] = ak === 'data' && typeof av === 'string' ? Buffer.from(av) : av;
        }
        return w;
      });
    } else {
      out[key] = v;
    }
  }
  return out;
}

// What an entry costs besides its encoded value and key (the Map slot, the object).
const LOCAL_ENTRY_OVERHEAD = 96;

/**
 * The in-process cache (`localCache: {maxBytes}`): values this process read, kept
 * encoded (so callers never share a mutable object), bounded by bytes (least recently
 * used go first), coherent through the daemon's push frames (`cache.track`,
 * protocol.md "Push frames"). A read marks its keys pending; an invalidation or flush
 * that arrives before the answer voids them, and a voided answer is used but not kept.
 */
export class LocalCache {
  constructor(maxBytes, codec) {
    this.maxBytes = maxBytes;
    this.codec = codec;
    this.entries = new Map(); // key -> {bytes: Buffer, expiresAt: ms, size}
    this.bytes = 0;
    this.pending = new Map(); // key -> {reads, voided}
    this.epoch = 0; // moved on by every flush
    this.live = false; // the connection tracks (cache.track answered true)
    this.stats = { hits: 0, misses: 0, invalidations: 0, flushes: 0 };
  }

  /** The decoded value of a live entry, or undefined. */
  get(key) {
    const e = this.entries.get(key);
    if (e === undefined) {
      this.stats.misses += 1;
      return undefined;
    }
    const now = Date.now();
    if (now >= e.expiresAt) {
      this.drop(key);
      this.stats.misses += 1;
      return undefined;
    }
    // Most recently used last.
    this.entries.delete(key);
    this.entries.set(key, e);
    this.stats.hits += 1;
    return { value: this.codec.unpack(e.bytes), ttlMs: e.expiresAt - now };
  }

  /** A read of `key` is about to be sent; returns its ticket for `finish`. */
  begin(key) {
    let p = this.pending.get(key);
    if (p === undefined) {
      p = { reads: 0, voided: false };
      this.pending.set(key, p);
    }
    p.reads += 1;
    return this.epoch;
  }

  /** The read of `key` begun in `epoch` was answered: keep the value unless voided. */
  finish(key, epoch, hit, value, ttlMs) {
    const p = this.pending.get(key);
    let voided = true;
    if (p !== undefined) {
      voided = p.voided;
      p.reads -= 1;
      if (p.reads === 0) this.pending.delete(key);
    }
    if (voided || epoch !== this.epoch || !this.live || !hit || !(ttlMs > 0)) return;
    const bytes = Buffer.from(this.codec.pack(value));
    const size = bytes.length + key.length * 2 + LOCAL_ENTRY_OVERHEAD;
    if (size > this.maxBytes / 4) return;
    this.drop(key);
    this.entries.set(key, { bytes, expiresAt: Date.now() + ttlMs, size });
    this.bytes += size;
    while (this.bytes > this.maxBytes) {
      const oldest = this.entries.keys().next().value;
      this.drop(oldest);
    }
  }

  drop(key) {
    const e = this.entries.get(key);
    if (e !== undefined) {
      this.entries.delete(key);
      this.bytes -= e.size;
    }
  }

  /** This key may have changed (a push, or a write through this client). */
  invalidate(key) {
    const p = this.pending.get(key);
    if (p !== undefined) p.voided = true;
    this.drop(key);
  }

  /** Drop everything; reads in flight are not kept. */
  flush() {
    this.epoch += 1;
    this.entries.clear();
    this.bytes = 0;
    this.stats.flushes += 1;
  }

  onPush(msg) {
    if (msg.push === 'invalidate' && Array.isArray(msg.keys)) {
      for (const k of msg.keys) this.invalidate(k);
      this.stats.invalidations += msg.keys.length;
    } else if (msg.push === 'flush') {
      this.flush();
    }
  }

  snapshot() {
    return { ...this.stats, entries: this.entries.size, bytes: this.bytes };
  }
}

// The bytes of a key-only request between its id and its key: `op: <op>, key:`.
const KEY_OP_MIDDLE = new Map();

/**
 * The frame of `{id, op, key}` (a key-only op: `cache.get`, `cache.fetch`), written
 * by hand: a 3-entry map with the id always as a uint32 (MessagePack allows any
 * width). A generic pack of a fresh object plus the copy into a frame cost several
 * times as much, on the path of every cache hit (BENCHMARKS.md).
 */
function keyOpFrame(id, op, key) {
  let mid = KEY_OP_MIDDLE.get(op);
  if (mid === undefined) {
    const name = Buffer.from(op);
    mid = Buffer.concat([Buffer.from([0xa2, 0x6f, 0x70, 0xa0 | name.length]), name, Buffer.from([0xa3, 0x6b, 0x65, 0x79])]);
    KEY_OP_MIDDLE.set(op, mid);
  }
  const klen = Buffer.byteLength(key);
  const khead = klen < 32 ? 1 : klen < 256 ? 2 : klen < 65536 ? 3 : 5;
  const bodyLen = 9 + mid.length + khead + klen;
  const f = Buffer.allocUnsafe(4 + bodyLen);
  f.writeUInt32BE(bodyLen, 0);
  f[4] = 0x83; // map of 3
  f[5] = 0xa2; // "id"
  f[6] = 0x69;
  f[7] = 0x64;
  f[8] = 0xce; // uint32
  f.writeUInt32BE(id, 9);
  let o = 13 + mid.copy(f, 13);
  if (klen < 32) f[o++] = 0xa0 | klen;
  else if (klen < 256) {
    f[o++] = 0xd9;
    f[o++] = klen;
  } else if (klen < 65536) {
    f[o++] = 0xda;
    f.writeUInt16BE(klen, o);
    o += 2;
  } else {
    f[o++] = 0xdb;
    f.writeUInt32BE(klen, o);
    o += 4;
  }
  f.write(key, o, 'utf8');
  return f;
}

/** A `cache.fetch` result as the client returns it. */
function fetchAnswer(r) {
  if (!r.hit) return r;
  if (r.stale) return { hit: true, value: r.value, stale: true };
  return { hit: true, value: r.value, ttlMs: r.ttl_ms === undefined ? undefined : Number(r.ttl_ms) };
}

class Connection {
  constructor(client, socket) {
    this.client = client;
    this.socket = socket;
    this.pending = new Map(); // id -> {resolve, reject, op, timer}
    // The start of a frame not yet whole, in pieces: `have` bytes of the `need` that
    // complete it (4 while its length is unknown).
    this.chunks = [];
    this.have = 0;
    this.need = 4;
    this.corked = false;
    this.fatal = null; // an id-less error frame the daemon sent before closing
    this.closed = false;
    this.hello = null;
    // Flow control. At most `maxOnWire` requests (the daemon's max_inflight, from hello)
    // are written and unanswered; the rest wait in `backlog` (read from `head` on) and
    // go out as answers come back, and while node's socket buffer is full. So the
    // daemon never has to stop reading, node's write buffer stays small, and a request
    // that times out while it waits is never sent at all.
    this.wire = new Set(); // ids written and not yet answered (timed-out ones included)
    this.maxOnWire = Infinity;
    this.backlog = []; // [{id, frame}]
    this.head = 0;
    this.blocked = false; // socket.write() returned false: wait for 'drain'
  }

  /** Requests waiting for room on the wire. */
  get queued() {
    return this.backlog.length - this.head;
  }

  /** True when a new request would have to wait instead of being written now. */
  get mustQueue() {
    return this.blocked || this.queued > 0 || this.wire.size >= this.maxOnWire;
  }

  onData(chunk) {
    let buf = chunk;
    if (this.have > 0) {
      this.chunks.push(chunk);
      this.have += chunk.length;
      // A large answer arrives in many chunks: joined once, when it is whole.
      if (this.have < this.need) return;
      buf = Buffer.concat(this.chunks, this.have);
      this.chunks = [];
      this.have = 0;
    }
    let off = 0;
    for (;;) {
      const left = buf.length - off;
      if (left < 4) {
        this.need = 4;
        break;
      }
      const len = buf.readUInt32BE(off);
      if (left < 4 + len) {
        this.need = 4 + len;
        break;
      }
      this.onFrame(buf.subarray(off + 4, off + 4 + len));
      off += 4 + len;
    }
    if (off < buf.length) {
      this.chunks.push(off === 0 ? buf : buf.subarray(off));
      this.have = buf.length - off;
    }
  }

  onFrame(body) {
    let msg;
    try {
      msg = this.client.decoder.unpack(body);
    } catch (err) {
      this.socket.destroy(new SatchelError('INTERNAL', `undecodable response frame: ${err.message}`));
      return;
    }
    if (!msg || typeof msg !== 'object') return;
    const id = msg.id;
    if (msg.push !== undefined && (id === null || id === undefined)) {
      this.client.local?.onPush(msg);
      return;
    }
    if (id === null || id === undefined) {
      // FORBIDDEN, connection-limit UNAVAILABLE or TOO_LARGE: the daemon closes next.
      if (msg.ok === false) this.fatal = errorFromWire(msg.error, undefined);
      return;
    }
    const answered = this.wire.delete(Number(id));
    const p = this.pending.get(Number(id));
    if (p) {
      this.pending.delete(Number(id));
      if (p.timer) clearTimeout(p.timer);
      if (msg.ok === true) p.resolve(msg.result);
      else p.reject(errorFromWire(msg.error, p.op));
    }
    if (answered) this.pump();
  }

  /** Writes the request now if there is room on the wire, else queues it. */
  write(id, frame) {
    if (this.mustQueue) this.backlog.push({ id, frame });
    else this.send(id, frame);
  }

  send(id, frame) {
    if (!this.corked) {
      // Requests made in the same tick go out in one write(2). (Writing every 8 or
      // 16 helped while the daemon answered a burst only at its end; it now writes
      // every 16 requests it reads, and this is as fast: BENCHMARKS.md.)
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    this.wire.add(id);
    if (!this.socket.write(frame) && !this.blocked) {
      this.blocked = true;
      this.socket.once('drain', () => {
        this.blocked = false;
        this.pump();
      });
    }
  }

  /** Moves queued requests onto the wire while there is room. */
  pump() {
    while (this.queued > 0 && !this.blocked && !this.closed && this.wire.size < this.maxOnWire) {
      const { id, frame } = this.backlog[this.head];
      this.backlog[this.head++] = undefined;
      // A request that timed out while it waited is dropped: it never reaches the daemon.
      if (this.pending.has(id)) this.send(id, frame);
    }
    if (this.head > 1024 && this.head * 2 > this.backlog.length) {
      this.backlog = this.backlog.slice(this.head);
      this.head = 0;
    }
  }

  failAll(err) {
    this.closed = true;
    const unsent = new Set();
    for (let i = this.head; i < this.backlog.length; i++) unsent.add(this.backlog[i].id);
    for (const [id, p] of this.pending) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(unsent.has(id) ? new SatchelError(err.code, `${err.message} (this request was still queued in the client and never sent)`, { op: p.op }) : err);
    }
    this.pending.clear();
    this.backlog = [];
    this.head = 0;
    this.wire.clear();
  }
}

export class SatchelClient {
  /**
   * @param {object} [opts]
   * @param {string} [opts.socket] socket path (default: SATCHEL_SOCKET or the daemon's default)
   * @param {string} [opts.clientName] sent in `hello`, shows in the daemon's logs
   * @param {number} [opts.connectTimeoutMs=2000]
   * @param {number} [opts.requestTimeoutMs=0] 0: no client-side timeout
   * @param {boolean} [opts.useBigInt64=true] int64/uint64 values decode as BigInt
   * @param {number} [opts.maxQueued=Infinity] requests that may wait for room on the
   *   connection (beyond the daemon's max_inflight); more reject with CLIENT_OVERLOADED
   */
  constructor(opts = {}) {
    this.socketPath = opts.socket ?? defaultSocketPath();
    this.clientName = opts.clientName ?? `node/${process.pid}`;
    this.connectTimeoutMs = opts.connectTimeoutMs ?? 2000;
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 0;
    this.maxQueued = opts.maxQueued ?? Infinity;
    const big = opts.useBigInt64 ?? true;
    // Plain MessagePack both ways: no records, no extensions of msgpackr's own.
    const codec = { useRecords: false, moreTypes: false, mapsAsObjects: true, int64AsType: big ? 'bigint' : 'number', skipValues: [undefined], encodeUndefinedAsNil: true };
    this.encoder = new Packr(codec);
    this.decoder = new Unpackr(codec);
    this.localCodec = new Packr(codec);
    this.nextId = 1;
    this.conn = null;
    this.connecting = null;
    this.closedByUser = false;
    this.maxFrame = 8 * 1024 * 1024;
    const localBytes = opts.localCache?.maxBytes ?? 0;
    this.local = localBytes > 0 ? new LocalCache(localBytes, this.localCodec) : null;
    this.cache = new CacheApi(this);
    this.mail = new MailApi(this);
  }

  /**
   * Requests on the current connection: `sent` (written, not yet answered) and `queued`
   * (waiting for room: the daemon's max_inflight, or node's socket buffer). For metrics.
   */
  get requestCounts() {
    const c = this.conn;
    return c && !c.closed ? { sent: c.wire.size, queued: c.queued } : { sent: 0, queued: 0 };
  }

  /** The last `hello` result (`{protocol, server, maxFrame, maxInflight, ops}`), or null. */
  get serverInfo() {
    return this.conn && this.conn.hello ? camelKeys(this.conn.hello) : null;
  }

  /** Connects (and says hello) if not connected; resolves to the hello result. */
  async connect() {
    const conn = await this.ensureConnected();
    return camelKeys(conn.hello);
  }

  /** True when the daemon's hello listed `op` (connects first). */
  async supports(op) {
    const conn = await this.ensureConnected();
    return Array.isArray(conn.hello.ops) && conn.hello.ops.includes(op);
  }

  ensureConnected() {
    if (this.closedByUser) return Promise.reject(new SatchelError('CLOSED', 'client is closed'));
    if (this.conn && !this.conn.closed) return Promise.resolve(this.conn);
    if (!this.connecting) {
      this.connecting = this.openWithRetry().finally(() => {
        this.connecting = null;
      });
    }
    return this.connecting;
  }

  // A daemon that refuses a connection (allow list, connection limit) sends one error
  // frame and closes. If that close beats our hello write, the write fails with EPIPE and
  // node discards the socket before the refusal frame is read. So a connection closed
  // during hello without a frame is tried again, this time listening a few ms for a
  // refusal before writing hello: the normal connect pays nothing, a refused one
  // learns why.
  async openWithRetry() {
    const listenFirstMs = [0, 5, 25, 100];
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.openConnection(listenFirstMs[attempt]);
      } catch (err) {
        if (!(err instanceof SatchelError && err.closedDuringHello) || attempt + 1 >= listenFirstMs.length) throw err;
      }
    }
  }

  openConnection(listenFirstMs = 0) {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ path: this.socketPath });
      const conn = new Connection(this, socket);
      let settled = false;
      let connected = false;
      // Covers connect and hello: a daemon that accepts but never answers is unreachable too.
      const timer = setTimeout(() => {
        conn.fatal ??= new SatchelError('UNREACHABLE', `no hello from the satchel daemon at ${this.socketPath} within ${this.connectTimeoutMs} ms`);
        socket.destroy();
      }, this.connectTimeoutMs);
      socket.setNoDelay?.(true);
      socket.on('data', (c) => conn.onData(c));
      socket.on('error', () => {}); // 'close' follows and carries the consequences
      socket.on('close', () => {
        clearTimeout(timer);
        let err = conn.fatal;
        if (!err && settled) {
          err = new SatchelError('DISCONNECTED', 'connection to the satchel daemon closed; the request may or may not have run');
        } else if (!err && connected) {
          err = new SatchelError(
            'DISCONNECTED',
            `the satchel daemon at ${this.socketPath} closed the connection during hello (refused? see its log)`,
          );
          err.closedDuringHello = true;
        } else if (!err) {
          err = new SatchelError('UNREACHABLE', `cannot connect to the satchel daemon at ${this.socketPath}`);
        }
        conn.failAll(err);
        if (this.conn === conn) this.conn = null;
        // Pushes are per connection: what was kept can no longer be trusted.
        if (this.local) {
          this.local.live = false;
          this.local.flush();
        }
        if (!settled) {
          settled = true;
          reject(err);
        }
      });
      socket.on('connect', () => {
        connected = true;
        if (listenFirstMs > 0) setTimeout(sayHello, listenFirstMs);
        else sayHello();
      });
      const sayHello = () => {
        if (conn.closed || socket.destroyed) return;
        this.sendOn(conn, 'hello', { protocol: PROTOCOL_VERSION, client: this.clientName }).then(
          (hello) => {
            if (settled) return;
            clearTimeout(timer);
            if (this.closedByUser) {
              socket.destroy();
              settled = true;
              reject(new SatchelError('CLOSED', 'client is closed'));
              return;
            }
            if (Number(hello.protocol) !== PROTOCOL_VERSION) {
              socket.destroy();
              settled = true;
              reject(new SatchelError('INTERNAL', `daemon speaks protocol ${hello.protocol}, this client ${PROTOCOL_VERSION}`));
              return;
            }
            conn.hello = hello;
            if (hello.max_frame) this.maxFrame = Number(hello.max_frame);
            if (hello.max_inflight) conn.maxOnWire = Number(hello.max_inflight);
            const ready = () => {
              settled = true;
              this.conn = conn;
              resolve(conn);
            };
            if (!this.local) return ready();
            // Track before any read goes out on this connection; a daemon that cannot
            // (cache.near off) leaves the local cache off for this connection.
            this.sendOn(conn, 'cache.track', {}).then(
              (r) => {
                this.local.live = r && r.tracking === true;
                ready();
              },
              () => {
                this.local.live = false;
                ready();
              },
            );
          },
          (err) => {
            if (settled) return;
            settled = true;
            socket.destroy();
            reject(err);
          },
        );
      };
    });
  }

  takeId() {
    const id = this.nextId;
    this.nextId = id >= 0xffffffff ? 1 : id + 1;
    return id;
  }

  sendOn(conn, op, args) {
    const id = this.takeId();
    let body;
    try {
      // Assigned, not spread: the spread copies through a slow generic path.
      const msg = { id, op };
      for (const k in args) msg[k] = args[k];
      body = this.encoder.pack(msg);
    } catch (err) {
      return Promise.reject(new SatchelError('BAD_REQUEST', `cannot encode request: ${err.message}`, { op }));
    }
    const frame = Buffer.allocUnsafe(4 + body.length);
    frame.writeUInt32BE(body.length, 0);
    frame.set(body, 4);
    return this.dispatch(conn, id, op, frame);
  }

  /** `{id, op, key}` for the hot key-only ops, encoded by hand ([`keyOpFrame`]). */
  sendKeyOn(conn, op, key) {
    const id = this.takeId();
    return this.dispatch(conn, id, op, keyOpFrame(id, op, key));
  }

  dispatch(conn, id, op, frame) {
    return new Promise((resolve, reject) => {
      if (conn.closed) {
        reject(conn.fatal ?? new SatchelError('DISCONNECTED', 'connection to the satchel daemon closed'));
        return;
      }
      if (frame.length - 4 > this.maxFrame) {
        // The daemon would answer TOO_LARGE and close the connection; refuse it here so
        // the other requests on this connection are not hurt.
        reject(new SatchelError('TOO_LARGE', `request is ${frame.length - 4} bytes, the daemon's max_frame is ${this.maxFrame}`, { op }));
        return;
      }
      if (conn.mustQueue && conn.queued >= this.maxQueued) {
        reject(new SatchelError('CLIENT_OVERLOADED', `${op}: ${conn.queued} requests already wait for room on the connection (maxQueued ${this.maxQueued}); not sent`, { op }));
        return;
      }
      const p = { resolve, reject, op, timer: null };
      if (this.requestTimeoutMs > 0) {
        p.timer = setTimeout(() => {
          conn.pending.delete(id);
          reject(new SatchelError('CLIENT_TIMEOUT', `${op}: no answer within ${this.requestTimeoutMs} ms`, { op }));
        }, this.requestTimeoutMs);
      }
      conn.pending.set(id, p);
      conn.write(id, frame);
    });
  }

  /**
   * Sends one op with its wire fields (undefined ones are dropped) and resolves to its
   * `result`, or rejects with a SatchelError. The escape hatch for ops without a method.
   */
  request(op, args = {}) {
    let wire;
    try {
      wire = fields(args);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.send(op, wire);
  }

  /** As `request`, for fields that hold no undefined values (the hot cache paths). */
  send(op, args) {
    const conn = this.conn;
    // Connected: straight to the wire, one promise for the whole call.
    if (conn && !conn.closed) return this.sendOn(conn, op, args);
    return this.ensureConnected().then((c) => this.sendOn(c, op, args));
  }

  /** As `send` for an op whose only field is a string `key` (`cache.get`, `cache.fetch`). */
  sendKey(op, key) {
    if (typeof key !== 'string') return this.send(op, { key });
    const conn = this.conn;
    if (conn && !conn.closed) return this.sendKeyOn(conn, op, key);
    return this.ensureConnected().then((c) => this.sendKeyOn(c, op, key));
  }

  ping(delayMs) {
    return this.request('ping', { delay_ms: delayMs });
  }

  async stats() {
    return camelKeys(await this.request('stats'));
  }

  async health() {
    return camelKeys(await this.request('health'));
  }

  /**
   * Closes the connection; in-flight requests reject with DISCONNECTED and later calls
   * with CLOSED. An open connection keeps node's event loop alive: close on shutdown.
   */
  close() {
    this.closedByUser = true;
    if (this.conn) this.conn.socket.destroy();
    this.conn = null;
  }
}

class CacheApi {
  constructor(client) {
    this.client = client;
  }

  /** The local cache when it is usable right now without waiting, else undefined. */
  liveLocal() {
    const { local, conn } = this.client;
    return local !== null && local.live && conn && !conn.closed ? local : undefined;
  }

  /** The local cache when it can be used for a read (connecting first if need be). */
  async usableLocal() {
    const { local, conn } = this.client;
    if (local === null) return null;
    if (!conn || conn.closed) await this.client.ensureConnected();
    return local.live ? local : null;
  }

  /** `{hit: true, value, ttlMs}` or `{hit: false}`; a local hit makes no request. */
  async get(key) {
    const local = this.liveLocal() ?? (this.client.local !== null ? await this.usableLocal() : null);
    if (local !== null) {
      const got = local.get(key);
      if (got !== undefined) return { hit: true, value: got.value, ttlMs: got.ttlMs };
      const epoch = local.begin(key);
      let r;
      try {
        r = await this.client.sendKey('cache.get', key);
      } catch (err) {
        local.finish(key, epoch, false);
        throw err;
      }
      local.finish(key, epoch, r.hit && !r.stale, r.value, Number(r.ttl_ms));
      return r.hit ? { hit: true, value: r.value, ttlMs: Number(r.ttl_ms) } : { hit: false };
    }
    const r = await this.client.sendKey('cache.get', key);
    return r.hit ? { hit: true, value: r.value, ttlMs: Number(r.ttl_ms) } : { hit: false };
  }

  /** One `{hit, value?}` per key, in order; local hits are not asked for. */
  async mget(keys) {
    const local = this.liveLocal() ?? (this.client.local !== null ? await this.usableLocal() : null);
    if (local === null) return this.client.request('cache.mget', { keys });
    const out = new Array(keys.length);
    const ask = [];
    for (let i = 0; i < keys.length; i++) {
      const got = local.get(keys[i]);
      if (got !== undefined) out[i] = { hit: true, value: got.value, ttl_ms: got.ttlMs };
      else ask.push(i);
    }
    if (ask.length === 0) return out;
    const askKeys = ask.map((i) => keys[i]);
    const epochs = askKeys.map((k) => local.begin(k));
    let r;
    try {
      r = await this.client.send('cache.mget', { keys: askKeys });
    } catch (err) {
      askKeys.forEach((k, j) => local.finish(k, epochs[j], false));
      throw err;
    }
    ask.forEach((i, j) => {
      const e = r[j];
      local.finish(keys[i], epochs[j], e.hit && !e.stale, e.value, Number(e.ttl_ms));
      out[i] = e;
    });
    return out;
  }

  async set(key, value, { ttlMs, tags } = {}) {
    this.client.local?.invalidate(key);
    const r = await this.client.request('cache.set', { key, value: value ?? null, ttl_ms: ttlMs, tags });
    this.client.local?.invalidate(key);
    return r.stored;
  }

  /** Deletes one key or a list; resolves to how many existed. */
  async del(keys) {
    const list = Array.isArray(keys) ? keys : [keys];
    const r = await this.client.request('cache.del', { keys: list });
    if (this.client.local) for (const k of list) this.client.local.invalidate(k);
    return Number(r.deleted);
  }

  /** Removes every entry carrying one of `tags` and/or starting with `prefix`; resolves to the count. */
  async invalidate({ tags, prefix } = {}) {
    const r = await this.client.request('cache.invalidate', { tags, prefix });
    return Number(r.deleted);
  }

  /** `{hit: true, value, ttlMs}`, `{hit: false, lease}` (you load and fill) or `{hit: false}` (load, don't fill). */
  fetch(key, opts) {
    // Without a local cache: the request's own promise, no async frame around it
    // (this is the path of every getOrSet hit).
    if (this.client.local === null) {
      const sent =
        opts === undefined
          ? this.client.sendKey('cache.fetch', key)
          : this.client.request('cache.fetch', { key, lease_ms: opts.leaseMs, wait_ms: opts.waitMs });
      return sent.then(fetchAnswer);
    }
    return this.fetchLocal(key, opts);
  }

  async fetchLocal(key, opts) {
    const local = this.liveLocal() ?? (await this.usableLocal());
    let epoch;
    if (local !== null) {
      const got = local.get(key);
      if (got !== undefined) return { hit: true, value: got.value, ttlMs: got.ttlMs };
      epoch = local.begin(key);
    }
    let r;
    try {
      if (opts === undefined) r = await this.client.sendKey('cache.fetch', key);
      else r = await this.client.request('cache.fetch', { key, lease_ms: opts.leaseMs, wait_ms: opts.waitMs });
    } catch (err) {
      if (epoch !== undefined) local.finish(key, epoch, false);
      throw err;
    }
    if (!r.hit) {
      if (epoch !== undefined) local.finish(key, epoch, false);
      return r;
    }
    if (epoch !== undefined) local.finish(key, epoch, !r.stale, r.value, r.ttl_ms === undefined ? undefined : Number(r.ttl_ms));
    return fetchAnswer(r);
  }

  async fill(key, lease, value, { ttlMs, tags } = {}) {
    const r = await this.client.request('cache.fill', { key, lease, value: value ?? null, ttl_ms: ttlMs, tags });
    this.client.local?.invalidate(key);
    return r.stored;
  }

  /** The local cache's counters: `{hits, misses, entries, bytes, invalidations, flushes}`. */
  localStats() {
    const l = this.client.local;
    return l ? l.snapshot() : { hits: 0, misses: 0, invalidations: 0, flushes: 0, entries: 0, bytes: 0 };
  }

  /**
   * Cache-aside with leases: on a hit returns the cached value; on a miss exactly one
   * caller (per key, across daemons sharing the Redis) runs `loader` and fills, the
   * others wait for its value. Without a lease (the holder was too slow) the loader runs
   * and nothing is filled. A throwing loader throws here and its lease just expires.
   * When the cache itself is out (UNAVAILABLE, TIMEOUT, connection lost) the loader runs
   * uncached, unless `strict` is set.
   */
  getOrSet(key, loader, opts = {}) {
    const { leaseMs, waitMs, strict = false } = opts;
    const plain = leaseMs === undefined && waitMs === undefined;
    // The hit path without a local cache: the request's promise and one callback.
    const fetched =
      this.client.local === null && plain
        ? this.client.sendKey('cache.fetch', key)
        : this.fetch(key, plain ? undefined : { leaseMs, waitMs });
    return fetched.then(
      (r) => (r.hit ? r.value : this.loadAndFill(key, loader, r, opts)),
      (err) => {
        if (!strict && err instanceof SatchelError && CACHE_OUTAGE.has(err.code)) return loader();
        throw err;
      },
    );
  }

  /** getOrSet after a miss: load, and fill when the miss came with a lease. */
  async loadAndFill(key, loader, r, { ttlMs, tags, strict = false }) {
    const value = await loader();
    if (r.lease) {
      try {
        await this.fill(key, r.lease, value, { ttlMs, tags });
      } catch (err) {
        if (strict || !(err instanceof SatchelError && CACHE_OUTAGE.has(err.code))) throw err;
      }
    }
    return value;
  }
}

class MailApi {
  constructor(client) {
    this.client = client;
    /** The suppression list (`mail.suppression.*`). */
    this.suppression = new SuppressionApi(client);
    /** Shared templates (`mail.template.*`); send with `{to, template, vars}`. */
    this.template = new TemplateApi(client);
  }

  /**
   * Queues a mail: `{to, cc?, bcc?, from?, replyTo?, subject, text?, html?, headers?,
   * attachments?: [{filename, contentType, data}], idempotencyKey?, sendAtMs?}` →
   * `{mailId, status, duplicate}`.
   */
  async send(mail) {
    return camelKeys(await this.client.request('mail.send', mailToWire(mail)));
  }

  async status(mailId) {
    return mailNumbers(camelKeys(await this.client.request('mail.status', { mail_id: mailId })));
  }

  async cancel(mailId) {
    return camelKeys(await this.client.request('mail.cancel', { mail_id: mailId }));
  }

  async retry(mailId) {
    return camelKeys(await this.client.request('mail.retry', { mail_id: mailId }));
  }

  async dead({ limit } = {}) {
    return mailNumbers(camelKeys(await this.client.request('mail.dead', { limit })));
  }

  /**
   * Mail events (status transitions), oldest first, as an async iterator that
   * long-polls `mail.events` and resumes by itself (also after the daemon was
   * unreachable for a while): `for await (const e of satchel.mail.events({ since: '0' }))`.
   * `since` undefined: only events from now on; `'0'`: from the oldest kept. With
   * `follow: false` it ends when no event is left. `.cursor` is where to resume
   * (`{ since: stream.cursor }`) without gaps or repeats.
   */
  events({ since, mailId, follow = true, waitMs = 30_000 } = {}) {
    return new EventStream(this.client, { since, mailId, follow, waitMs });
  }
}

class TemplateApi {
  constructor(client) {
    this.client = client;
  }

  /** Stores (or replaces) a template: `{subject, text?, html?}` (minijinja). */
  async put(name, { subject, text, html }) {
    return camelKeys(await this.client.request('mail.template.put', { name, subject, text, html }));
  }

  /** `{name, subject, text?, html?}`; NOT_FOUND when there is none. */
  async get(name) {
    return camelKeys(await this.client.request('mail.template.get', { name }));
  }

  /** `{deleted: bool}`. */
  async delete(name) {
    return camelKeys(await this.client.request('mail.template.delete', { name }));
  }

  /** The templates' names. */
  async list() {
    return (await this.client.request('mail.template.list', {})).templates ?? [];
  }
}

class SuppressionApi {
  constructor(client) {
    this.client = client;
  }

  /** One page: `{entries: [{address, reason, class, atMs}], cursor?}` (no cursor: the end). */
  async list({ limit, cursor } = {}) {
    const r = await this.client.request('mail.suppression.list', { limit, cursor });
    return { entries: mailNumbers(camelKeys(r.entries ?? [])), cursor: r.cursor ?? undefined };
  }

  /** Stops mailing `address`. */
  async add(address, { reason } = {}) {
    return camelKeys(await this.client.request('mail.suppression.add', { address, reason }));
  }

  /** `{removed: bool}`: whether it was on the list. */
  async remove(address) {
    return camelKeys(await this.client.request('mail.suppression.remove', { address }));
  }
}

class EventStream {
  constructor(client, { since, mailId, follow, waitMs }) {
    this.client = client;
    this.mailId = mailId;
    this.follow = follow;
    // A long poll must end before the client's own request timeout would.
    const cap = client.requestTimeoutMs > 0 ? Math.max(0, client.requestTimeoutMs - 500) : 30_000;
    this.waitMs = follow ? Math.max(0, Math.min(waitMs, 30_000, cap)) : 0;
    this.buf = [];
    this.server = since;
    /** Where to resume: the last event handed out, or the daemon's cursor once all were. */
    this.cursor = since;
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  async next() {
    for (;;) {
      if (this.buf.length > 0) {
        const e = this.buf.shift();
        this.cursor = this.buf.length > 0 ? e.eventId : this.server;
        return { value: e, done: false };
      }
      let r;
      try {
        r = await this.client.request('mail.events', {
          since: this.cursor,
          mail_id: this.mailId,
          wait_ms: this.waitMs,
          limit: 1000,
        });
      } catch (err) {
        if (!(this.follow && err instanceof SatchelError && err.retryable)) throw err;
        await new Promise((ok) => setTimeout(ok, err.retryAfterMs ?? 250));
        continue;
      }
      const events = mailNumbers(camelKeys(r.events ?? []));
      this.server = r.cursor ?? this.server;
      this.buf.push(...events);
      if (events.length === 0) {
        this.cursor = this.server;
        if (!this.follow) return { value: undefined, done: true };
      }
    }
  }

  async return() {
    this.buf = [];
    return { value: undefined, done: true };
  }
}

/** Shorthand for `new SatchelClient(opts)`. */
export function createClient(opts) {
  return new SatchelClient(opts);
}

export default SatchelClient;
