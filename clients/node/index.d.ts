// Type declarations for satchel-client (Node.js >= 20, ES module).

/** Anything MessagePack can carry. bin decodes as a Buffer; int64/uint64 as bigint (with useBigInt64). */
export type Value =
  | null
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | Value[]
  | { [key: string]: Value };

export const PROTOCOL_VERSION: 1;

/** Wire codes from protocol.md plus the client's own (DISCONNECTED, UNREACHABLE, CLOSED, CLIENT_TIMEOUT, CLIENT_OVERLOADED). */
export type ErrorCode =
  | 'BAD_REQUEST'
  | 'UNKNOWN_OP'
  | 'TOO_LARGE'
  | 'UNAVAILABLE'
  | 'TIMEOUT'
  | 'FORBIDDEN'
  | 'SHUTTING_DOWN'
  | 'INTERNAL'
  | 'INVALID_MAIL'
  | 'NOT_FOUND'
  | 'DISCONNECTED'
  | 'UNREACHABLE'
  | 'CLOSED'
  | 'CLIENT_TIMEOUT'
  | 'CLIENT_OVERLOADED'
  | (string & {});

export const CLIENT_CODES: Readonly<{
  DISCONNECTED: 'DISCONNECTED';
  UNREACHABLE: 'UNREACHABLE';
  CLOSED: 'CLOSED';
  CLIENT_TIMEOUT: 'CLIENT_TIMEOUT';
  CLIENT_OVERLOADED: 'CLIENT_OVERLOADED';
}>;

export class SatchelError extends Error {
  constructor(code: ErrorCode, message: string, extra?: { retryAfterMs?: number; field?: string; op?: string });
  readonly name: 'SatchelError';
  /** The wire code (`BAD_REQUEST`, …) or a client code (`DISCONNECTED`, `UNREACHABLE`, …). */
  readonly code: ErrorCode;
  /** Present when retrying after this long can help (UNAVAILABLE, TIMEOUT, SHUTTING_DOWN). */
  readonly retryAfterMs?: number;
  /** The request field at fault (BAD_REQUEST, TOO_LARGE, INVALID_MAIL, UNKNOWN_OP → "op"). */
  readonly field?: string;
  /** The op of the failed request. */
  readonly op?: string;
  readonly retryable: boolean;
}

export interface ClientOptions {
  /** Socket path; default SATCHEL_SOCKET, else the daemon's default path. */
  socket?: string;
  /** Sent in `hello`, shows in the daemon's logs. */
  clientName?: string;
  /** Default 2000. */
  connectTimeoutMs?: number;
  /** Client-side deadline per request; 0 (default) means none. */
  requestTimeoutMs?: number;
  /** Decode int64/uint64 as bigint and encode bigint as int64 (default true). */
  useBigInt64?: boolean;
  /**
   * How many requests may wait in the client for room on the connection (beyond the
   * daemon's max_inflight, or while node's socket buffer is full); more reject at once
   * with CLIENT_OVERLOADED. Default Infinity.
   */
  maxQueued?: number;
  /**
   * An in-process cache in front of the daemon (off by default). Hits cost no I/O;
   * it stays coherent through the daemon's push frames (`cache.track`): another
   * writer's change is dropped here within the invalidation latency. The trade-off:
   * up to `maxBytes` of this process' memory, and a decode per hit (values are kept
   * encoded so callers never share a mutable object). Needs the daemon's near-cache
   * (`cache.near`, on by default); without it the local cache stays off.
   */
  localCache?: { maxBytes: number };
}

export interface LocalStats {
  hits: number;
  misses: number;
  entries: number;
  bytes: number;
  invalidations: number;
  flushes: number;
}

export interface RequestCounts {
  /** Written to the daemon and not yet answered (at most the daemon's max_inflight). */
  sent: number;
  /** Waiting in the client for room on the connection. */
  queued: number;
}

export interface ServerInfo {
  protocol: number;
  server: string;
  maxFrame: number;
  maxInflight: number;
  ops: string[];
}

export type GetResult<T = Value> = { hit: true; value: T; ttlMs: number } | { hit: false };
export type FetchResult<T = Value> =
  | { hit: true; value: T; ttlMs?: number; stale?: true }
  | { hit: false; lease?: string };

export interface SetOptions {
  ttlMs?: number;
  tags?: string[];
}

export interface GetOrSetOptions extends SetOptions {
  leaseMs?: number;
  waitMs?: number;
  /** Throw on cache outages instead of calling the loader uncached (default false). */
  strict?: boolean;
}

export interface CacheApi {
  get<T = Value>(key: string): Promise<GetResult<T>>;
  mget<T = Value>(keys: string[]): Promise<Array<{ hit: true; value: T } | { hit: false }>>;
  set(key: string, value: Value, opts?: SetOptions): Promise<boolean>;
  del(keys: string | string[]): Promise<number>;
  invalidate(opts: { tags?: string[]; prefix?: string }): Promise<number>;
  fetch<T = Value>(key: string, opts?: { leaseMs?: number; waitMs?: number }): Promise<FetchResult<T>>;
  fill(key: string, lease: string, value: Value, opts?: SetOptions): Promise<boolean>;
  getOrSet<T extends Value>(key: string, loader: () => T | Promise<T>, opts?: GetOrSetOptions): Promise<T>;
  /** The local cache's counters (all zero without `localCache`). */
  localStats(): LocalStats;
}

export interface Attachment {
  filename: string;
  contentType?: string;
  /** Bytes; a string is sent as its UTF-8 bytes. */
  data: Uint8Array | string;
}

export interface Mail {
  to: string | string[];
  cc?: string | string[];
  bcc?: string | string[];
  from?: string;
  replyTo?: string;
  subject: string;
  text?: string;
  html?: string;
  headers?: Record<string, string>;
  attachments?: Attachment[];
  idempotencyKey?: string;
  sendAtMs?: number;
}

export interface SendResult {
  mailId: string;
  status: string;
  duplicate: boolean;
}

export interface MailStatus {
  mailId: string;
  status: string;
  attempts: number;
  lastError?: string;
  nextAttemptMs?: number;
  updatedMs: number;
  refused?: string[];
  [key: string]: unknown;
}

export interface DeadMail {
  mailId: string;
  to: string[];
  subject: string;
  attempts: number;
  lastError: string;
  deadMs: number;
  [key: string]: unknown;
}

export interface MailEvent {
  eventId: string;
  mailId: string;
  status: string;
  attempts: number;
  atMs: number;
  to?: string[];
  error?: string;
  class?: string;
  uid?: number;
  [key: string]: unknown;
}

export interface EventStream extends AsyncIterableIterator<MailEvent> {
  /** Where to resume: pass as `since` to a new stream. */
  readonly cursor: string | undefined;
}

export interface SuppressionEntry {
  address: string;
  reason: string;
  class: string;
  atMs: number;
}

export interface SuppressionApi {
  list(opts?: { limit?: number; cursor?: string }): Promise<{ entries: SuppressionEntry[]; cursor?: string }>;
  add(address: string, opts?: { reason?: string }): Promise<{ added: boolean }>;
  remove(address: string): Promise<{ removed: boolean }>;
}

export interface MailTemplate {
  name?: string;
  subject: string;
  text?: string;
  html?: string;
}

export interface TemplateApi {
  put(name: string, template: MailTemplate): Promise<{ stored: boolean }>;
  get(name: string): Promise<MailTemplate>;
  delete(name: string): Promise<{ deleted: boolean }>;
  list(): Promise<string[]>;
}

export interface MailApi {
  readonly suppression: SuppressionApi;
  readonly template: TemplateApi;
  send(mail: Mail): Promise<SendResult>;
  status(mailId: string): Promise<MailStatus>;
  cancel(mailId: string): Promise<{ cancelled: boolean; [key: string]: unknown }>;
  retry(mailId: string): Promise<{ status: string; [key: string]: unknown }>;
  dead(opts?: { limit?: number }): Promise<DeadMail[]>;
  events(opts?: { since?: string; mailId?: string; follow?: boolean; waitMs?: number }): EventStream;
}

export class SatchelClient {
  constructor(opts?: ClientOptions);
  readonly socketPath: string;
  readonly cache: CacheApi;
  readonly mail: MailApi;
  /** The last hello result, or null before the first connection. */
  readonly serverInfo: ServerInfo | null;
  /** Requests on the current connection, for metrics. */
  readonly requestCounts: RequestCounts;
  connect(): Promise<ServerInfo>;
  /** Whether the daemon's hello lists `op` (connects first). */
  supports(op: string): Promise<boolean>;
  /** Any op by name with its wire (snake_case) fields; resolves to the raw result. */
  request<T = any>(op: string, fields?: Record<string, unknown>): Promise<T>;
  ping(delayMs?: number): Promise<'pong'>;
  stats(): Promise<Record<string, any>>;
  health(): Promise<{ redis: { connected: boolean; latencyUs: number } }>;
  /** Closes the connection; in-flight requests reject with DISCONNECTED; later calls with CLOSED. */
  close(): void;
}

export function createClient(opts?: ClientOptions): SatchelClient;
/** The socket path for a uid and an environment (protocol.md, "Transport"). */
export function socketPathFor(uid: number, env: Record<string, string | undefined>): string;
export function defaultSocketPath(): string;
/** The wire fields `mail.send` sends for a camelCase mail. */
export function mailToWire(mail: Mail): Record<string, unknown>;

export default SatchelClient;
