//! The mail queue in Redis: keys, and the Lua scripts that make every status
//! transition atomic.
//!
//! Key layout (`K` = `<redis.prefix>:m`):
//!
//! - `K:stream`: a Stream with consumer group `workers`. An entry holds
//!   `id=<mail_id>` and the message itself, `raw=<RFC 5322 bytes>`; it is acknowledged
//!   and deleted once its delivery attempt ends, so the stream holds only undelivered
//!   or in-flight entries (never trimmed otherwise). Workers get the message with the
//!   entry, and enqueueing writes it once (into the entry, not into the hash: a
//!   third less Redis time per `mail.send`, measured).
//! - `K:s:<mail_id>`: a hash, the status record. While the mail has no stream entry
//!   (scheduled, retrying, dead) the message is kept here as `raw`, and moves into the
//!   entry when the mail is queued again. Expires `status_retention_ms` after the last
//!   transition, except while queued or sending (no expiry: however long delivery
//!   waits, the record is there when a worker gets to the entry). (Entries without `raw`, written by satchel 0.1, are delivered from the
//!   hash's `raw`.)
//! - `K:sched`: a sorted set of mail_id by due time: scheduled mail and retries.
//! - `K:dead`: a sorted set of dead mail_id by time of death (newest first for
//!   `mail.dead`), trimmed to the retention window.
//! - `K:idem:<key>`: the mail_id first sent with an idempotency key.
//! - `K:counts`: a hash of mails per status, kept by the scripts.
//! - `K:rate:<unix second>`: the global rate-limit window.
//!
//! All times in scripts come from Redis `TIME`, so daemons on many hosts agree on
//! when scheduled mail is due. Every Redis call of the mail side is a method here;
//! the worker and the ops only call these.

use std::time::Duration;

use redis::{Script, Value};

use super::bounce::Class;
use super::status::MailStatus;
use crate::backend::reply::{bytes, text, uint};
use crate::backend::{Backend, BackendError, Dedicated};

/// The consumer group every daemon joins.
pub const GROUP: &str = "workers";

const NOW: &str = "local t = redis.call('TIME'); local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// A message over [`INLINE_BODY`] lives in its own key beside its status record,
/// `<status key>:b`, a list of pieces of at most [`BODY_PIECE`] (written before the
/// mail is enqueued, so no command carries more than ~1 MiB, and a list so that no
/// write reallocates a large string: `APPEND` did, at ~25 ms per MiB added to 9 MiB); these keep that key's lifetime the record's. Every
/// script gets them.
const BODY: &str = "local function expire_all(sk, ms) redis.call('PEXPIRE', sk, ms); redis.call('PEXPIRE', sk .. ':b', ms) end
local function persist_all(sk) redis.call('PERSIST', sk); redis.call('PERSIST', sk .. ':b') end
local function drop_body(sk) redis.call('UNLINK', sk .. ':b') end
-- Dead mail is listed in the queue's dead set and in its owner's (`<dead>:u<uid>`),
-- so an app's `mail.dead` reads only its own.
local function add_dead(dead, sk, id, at)
  redis.call('ZADD', dead, at, id)
  local o = redis.call('HGET', sk, 'owner')
  if o then redis.call('ZADD', dead .. ':u' .. o, at, id) end
end
local function trim_dead(dead, sk, before)
  redis.call('ZREMRANGEBYSCORE', dead, '-inf', before)
  local o = redis.call('HGET', sk, 'owner')
  if o then redis.call('ZREMRANGEBYSCORE', dead .. ':u' .. o, '-inf', before) end
end
local function rem_dead(dead, sk, id)
  redis.call('ZREM', dead, id)
  local o = redis.call('HGET', sk, 'owner')
  if o then redis.call('ZREM', dead .. ':u' .. o, id) end
end
-- Whether the caller may see this record: ARGV owner '' means any (an admin, or
-- isolation off); otherwise the record's owner must be that uid.
local function visible(sk, owner)
  return owner == '' or redis.call('HGET', sk, 'owner') == owner
end
-- The suppression list: one hash per address (`<sp><address>`: reason, class,
-- at_ms; expires after the ttl) and a sorted set of addresses by expiry (`<sp>`
-- without the trailing ':'), for listing. Addresses come normalized (domain in
-- lower case; `norm` does the same for the recipients of a new mail).
local function suppress(sp, addr, reason, class, ttl)
  redis.call('HSET', sp .. addr, 'reason', reason, 'class', class, 'at_ms', now)
  redis.call('PEXPIRE', sp .. addr, ttl)
  local idx = string.sub(sp, 1, -2)
  redis.call('ZADD', idx, now + ttl, addr)
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', now)
end
local function norm(a)
  local l, d = string.match(a, '^(.*)@([^@]*)$')
  if l then return l .. '@' .. string.lower(d) end
  return a
end
-- The event of a transition, in the same script as the transition (so it exists
-- exactly when the transition happened). The events stream is the last key of
-- every script that calls this; EVENTS_MAX is mail.events_max.
local function emit_with(id, status, attempts, to, owner, err, class)
  local a = {'mail_id', id, 'status', status, 'attempts', attempts, 'at_ms', now}
  if to and to ~= '' then a[#a + 1] = 'to'; a[#a + 1] = to end
  if owner and owner ~= '' then a[#a + 1] = 'owner'; a[#a + 1] = owner end
  if err and err ~= '' then a[#a + 1] = 'error'; a[#a + 1] = err end
  if class and class ~= '' then a[#a + 1] = 'class'; a[#a + 1] = class end
  redis.call('XADD', KEYS[#KEYS], 'MAXLEN', '~', EVENTS_MAX, '*', unpack(a))
end
local function emit(sk, id, status, err, class)
  local f = redis.call('HMGET', sk, 'attempts', 'to', 'owner')
  emit_with(id, status, f[1] or '0', f[2], f[3], err, class)
end
";

const ACK: &str = "local function ack(stream, group, id) if id ~= '' then redis.call('XACK', stream, group, id); redis.call('XDEL', stream, id) end end
-- Before an entry is deleted for good while its mail lives on (retry, dead): keep the
-- message in the status hash.
local function keep_raw(stream, id, sk)
  if id == '' or redis.call('HEXISTS', sk, 'raw') == 1 then return end
  local e = redis.call('XRANGE', stream, id, id)
  if e[1] then
    local f = e[1][2]
    for i = 1, #f, 2 do
      if f[i] == 'raw' then redis.call('HSET', sk, 'raw', f[i + 1]) end
    end
  end
end
";

/// Queues a mail again (scheduled or retry due, `mail.retry`): a new stream entry
/// that carries the message, which leaves the status hash; and no expiry while
/// queued (a mail waiting out a long SMTP outage must not lose its record).
const REQUEUE: &str = "local function requeue(stream, sk, id)
  persist_all(sk)
  local raw = redis.call('HGET', sk, 'raw')
  if raw then
    redis.call('XADD', stream, '*', 'id', id, 'raw', raw)
    redis.call('HDEL', sk, 'raw')
  elseif redis.call('HEXISTS', sk, 'body') == 1 then
    redis.call('XADD', stream, '*', 'id', id, 'body', '1')
  else
    redis.call('XADD', stream, '*', 'id', id)
  end
end
";

/// Enqueues a batch of mails in one call (group commit: concurrent `mail.send`s share
/// one script run, which costs Redis far less per mail than one run each).
/// KEYS: stream, sched, counts, events.  ARGV: idem_ttl_ms, retention_ms, status key prefix,
/// idempotency key prefix, suppression key prefix ('' = off), then per mail
/// ENQUEUE_ARGS values: mail_id, send_at_ms
/// (0 = now), idempotency key ('' = none), from, rcpt, to, subject, message_id, raw
/// ('' when the message is in its body key), body ('1' when it is), owner (the
/// sender's uid, '' unknown), template (its name, '' none).
/// → per mail: mail_id, status, duplicate (0|1), the recipients dropped because they
/// are suppressed ("\n"-separated; when none is left the mail is `suppressed`, final,
/// and never sent). Mails are handled in order, so two
/// in one batch with the same idempotency key behave as two calls would.
const ENQUEUE: &str = r#"
local idem_ttl, retention, sp, ip, supp = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local out, added = {}, {queued = 0, scheduled = 0, suppressed = 0}
local evs, batch_n = {}, 0
-- An empty suppression list (the common case) costs one EXISTS per batch.
local check_supp = supp ~= '' and redis.call('EXISTS', string.sub(supp, 1, -2)) == 1
for j = 6, #ARGV, 12 do
  local id, send_at, ikey = ARGV[j], tonumber(ARGV[j + 1]), ARGV[j + 2]
  local existing = nil
  if ikey ~= '' then
    existing = redis.call('GET', ip .. ikey)
    if not existing then redis.call('SET', ip .. ikey, id, 'PX', idem_ttl) end
  end
  if existing then
    -- The duplicate's own body, written ahead, is not needed.
    drop_body(sp .. id)
    local st = redis.call('HGET', sp .. existing, 'status')
    out[#out + 1] = existing; out[#out + 1] = st or 'expired'; out[#out + 1] = 1; out[#out + 1] = ''
  else
    local sk = sp .. id
    local rcpt, dropped = ARGV[j + 4], {}
    if check_supp then
      local kept = {}
      for a in string.gmatch(rcpt, '[^\n]+') do
        if redis.call('EXISTS', supp .. norm(a)) == 1 then dropped[#dropped + 1] = a
        else kept[#kept + 1] = a end
      end
      rcpt = table.concat(kept, '\n')
    end
    local status = 'queued'
    if rcpt == '' then status = 'suppressed'
    elseif send_at > now then status = 'scheduled' end
    redis.call('HSET', sk, 'status', status, 'attempts', 0, 'created_ms', now, 'updated_ms', now,
      'from', ARGV[j + 3], 'rcpt', rcpt, 'to', ARGV[j + 5], 'subject', ARGV[j + 6],
      'message_id', ARGV[j + 7])
    if #dropped > 0 then redis.call('HSET', sk, 'suppressed', table.concat(dropped, '\n')) end
    local body = ARGV[j + 9] == '1'
    if body then redis.call('HSET', sk, 'body', 1) end
    if ARGV[j + 10] ~= '' then redis.call('HSET', sk, 'owner', ARGV[j + 10]) end
    if ARGV[j + 11] ~= '' then redis.call('HSET', sk, 'template', ARGV[j + 11]) end
    if status == 'suppressed' then
      -- Final: never sent, so no message is kept.
      drop_body(sk)
      expire_all(sk, retention)
    elseif status == 'scheduled' then
      redis.call('HSET', sk, 'next_attempt_ms', send_at)
      if not body then redis.call('HSET', sk, 'raw', ARGV[j + 8]) end
      redis.call('ZADD', KEYS[2], send_at, id)
      expire_all(sk, retention + send_at - now)
    elseif body then
      -- No expiry while queued: the record must outlive any wait for delivery.
      persist_all(sk)
      redis.call('XADD', KEYS[1], '*', 'id', id, 'body', '1')
    else
      redis.call('XADD', KEYS[1], '*', 'id', id, 'raw', ARGV[j + 8])
    end
    added[status] = added[status] + 1
    -- One event entry for the whole batch (below): an XADD per mail cost Redis a
    -- third more per enqueued mail.
    batch_n = batch_n + 1
    local k = tostring(batch_n)
    evs[#evs + 1] = 'm' .. k; evs[#evs + 1] = id
    evs[#evs + 1] = 's' .. k; evs[#evs + 1] = status
    if ARGV[j + 5] ~= '' then evs[#evs + 1] = 't' .. k; evs[#evs + 1] = ARGV[j + 5] end
    if ARGV[j + 10] ~= '' then evs[#evs + 1] = 'o' .. k; evs[#evs + 1] = ARGV[j + 10] end
    out[#out + 1] = id; out[#out + 1] = status; out[#out + 1] = 0
    out[#out + 1] = table.concat(dropped, '\n')
  end
end
for st, n in pairs(added) do
  if n > 0 then redis.call('HINCRBY', KEYS[3], st, n) end
end
if batch_n > 0 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', EVENTS_MAX, '*', 'n', batch_n, 'at_ms', now, unpack(evs))
end
return out
"#;

/// KEYS: sched, stream, counts, events.  ARGV: status key prefix, limit.
const MOVE_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local sk = ARGV[1] .. id
  local st = redis.call('HGET', sk, 'status')
  if st == 'scheduled' or st == 'retrying' then
    redis.call('HSET', sk, 'status', 'queued', 'updated_ms', now)
    redis.call('HDEL', sk, 'next_attempt_ms')
    redis.call('HINCRBY', KEYS[3], st, -1)
    redis.call('HINCRBY', KEYS[3], 'queued', 1)
    requeue(KEYS[2], sk, id)
    emit(sk, id, 'queued')
  end
end
return #due
"#;

/// Starts a delivery attempt for a stream entry.
/// KEYS: status, counts, stream, dead, events.  ARGV: max_attempts, group, entry id,
/// retention_ms, mail_id, where the message is: 'raw' (in the entry), 'body' (in
/// the body key), '' (in the hash, for entries of satchel 0.1).
/// → {'go', attempts, from, rcpt, raw ('' unless it came from the hash)} |
///   {'skip', status} | {'dead', reason}
const BEGIN: &str = r#"
local st = redis.call('HGET', KEYS[1], 'status')
if not st then ack(KEYS[3], ARGV[2], ARGV[3]); return {'skip', 'missing'} end
if st ~= 'queued' and st ~= 'sending' then
  -- Already finished (e.g. a reclaimed entry whose 'sent' was written just before a
  -- crash), cancelled, or waiting in the schedule: never send it again from here.
  ack(KEYS[3], ARGV[2], ARGV[3]); return {'skip', st}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
local raw = ''
if ARGV[6] == '' then raw = redis.call('HGET', KEYS[1], 'raw')
elseif ARGV[6] == 'body' and redis.call('EXISTS', KEYS[1] .. ':b') == 0 then raw = false end
local reason = nil
if not raw then reason = 'the queued message has no content'
elseif attempts >= tonumber(ARGV[1]) then
  reason = 'poison: delivery was interrupted ' .. attempts .. ' times (mail.max_attempts)'
end
if reason then
  redis.call('HSET', KEYS[1], 'status', 'dead', 'last_error', reason, 'dead_ms', now, 'updated_ms', now)
  add_dead(KEYS[4], KEYS[1], ARGV[5], now)
  redis.call('HINCRBY', KEYS[2], st, -1)
  redis.call('HINCRBY', KEYS[2], 'dead', 1)
  expire_all(KEYS[1], ARGV[4])
  keep_raw(KEYS[3], ARGV[3], KEYS[1])
  ack(KEYS[3], ARGV[2], ARGV[3])
  emit(KEYS[1], ARGV[5], 'dead', reason)
  return {'dead', reason}
end
redis.call('HSET', KEYS[1], 'status', 'sending', 'attempts', attempts + 1, 'updated_ms', now)
if st ~= 'sending' then
  redis.call('HINCRBY', KEYS[2], st, -1)
  redis.call('HINCRBY', KEYS[2], 'sending', 1)
end
emit(KEYS[1], ARGV[5], 'sending')
local f = redis.call('HMGET', KEYS[1], 'from', 'rcpt')
return {'go', attempts + 1, f[1] or '', f[2] or '', raw}
"#;

/// Ends a delivery attempt. The status is written before the ack: if we die in
/// between, the entry is reclaimed, BEGIN sees the final status, and acks it without
/// a second delivery.
/// KEYS: status, counts, stream, sched, dead, events.  ARGV: outcome (sent|retry|dead), group,
/// entry id, retention_ms, last_error, delay_ms, new rcpt ('' = keep), mail_id, refused,
/// class ('' = none), suppression key prefix ('' = suppression off), suppress_ttl_ms,
/// then (address, reason, class) per recipient to suppress.
const FINISH: &str = r#"
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'sending' then ack(KEYS[3], ARGV[2], ARGV[3]); return 0 end
local ttl = tonumber(ARGV[4])
redis.call('HINCRBY', KEYS[2], 'sending', -1)
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'refused', ARGV[9]) end
if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'class', ARGV[10]) end
if ARGV[11] ~= '' then
  for i = 13, #ARGV, 3 do suppress(ARGV[11], ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[12])) end
end
if ARGV[1] == 'sent' then
  redis.call('HSET', KEYS[1], 'status', 'sent', 'sent_ms', now, 'updated_ms', now)
  redis.call('HDEL', KEYS[1], 'raw', 'body', 'next_attempt_ms')
  drop_body(KEYS[1])
  redis.call('HINCRBY', KEYS[2], 'sent', 1)
elseif ARGV[1] == 'retry' then
  local at = now + tonumber(ARGV[6])
  redis.call('HSET', KEYS[1], 'status', 'retrying', 'last_error', ARGV[5], 'next_attempt_ms', at, 'updated_ms', now)
  if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'rcpt', ARGV[7]) end
  redis.call('ZADD', KEYS[4], at, ARGV[8])
  redis.call('HINCRBY', KEYS[2], 'retrying', 1)
  ttl = ttl + tonumber(ARGV[6])
else
  redis.call('HSET', KEYS[1], 'status', 'dead', 'last_error', ARGV[5], 'dead_ms', now, 'updated_ms', now)
  add_dead(KEYS[5], KEYS[1], ARGV[8], now)
  trim_dead(KEYS[5], KEYS[1], now - ttl)
  redis.call('HINCRBY', KEYS[2], 'dead', 1)
end
if ARGV[1] ~= 'sent' then keep_raw(KEYS[3], ARGV[3], KEYS[1]) end
expire_all(KEYS[1], ttl)
ack(KEYS[3], ARGV[2], ARGV[3])
local final = {sent = 'sent', retry = 'retrying'}
if ARGV[1] == 'sent' then emit(KEYS[1], ARGV[8], 'sent')
else emit(KEYS[1], ARGV[8], final[ARGV[1]] or 'dead', ARGV[5], ARGV[10]) end
return 1
"#;

/// KEYS: status, sched, counts, events.  ARGV: mail_id, retention_ms, owner ('' = any).
/// → -1 unknown (or another uid's), 0 no, 1 yes
const CANCEL: &str = r#"
local st = redis.call('HGET', KEYS[1], 'status')
if not st or not visible(KEYS[1], ARGV[3]) then return -1 end
if st ~= 'queued' and st ~= 'scheduled' and st ~= 'retrying' then return 0 end
-- A queued mail's stream entry stays; the worker that reads it sees 'cancelled'.
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'updated_ms', now)
redis.call('HDEL', KEYS[1], 'raw', 'body', 'next_attempt_ms')
drop_body(KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], st, -1)
redis.call('HINCRBY', KEYS[3], 'cancelled', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
emit(KEYS[1], ARGV[1], 'cancelled')
return 1
"#;

/// KEYS: status, stream, dead, counts, events.  ARGV: mail_id, owner ('' = any). (Queued
/// again, the record has no expiry.) → -1 unknown (or another uid's), 1 requeued,
/// or the current status (not dead).
const RETRY: &str = r#"
local st = redis.call('HGET', KEYS[1], 'status')
if not st or not visible(KEYS[1], ARGV[2]) then return -1 end
if st ~= 'dead' then return st end
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', 0, 'updated_ms', now)
redis.call('HDEL', KEYS[1], 'dead_ms', 'next_attempt_ms')
rem_dead(KEYS[3], KEYS[1], ARGV[1])
requeue(KEYS[2], KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[4], 'dead', -1)
redis.call('HINCRBY', KEYS[4], 'queued', 1)
emit(KEYS[1], ARGV[1], 'queued')
return 1
"#;

/// `mail.suppression.add`. KEYS: the address's entry. ARGV: suppression key prefix,
/// address, reason, class, ttl_ms.
const SUPPRESS: &str = r#"
suppress(ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]))
return 1
"#;

/// `mail.suppression.remove`. KEYS: the address's entry, the index. ARGV: address.
/// → 1 removed, 0 it was not there.
const UNSUPPRESS: &str = r#"
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return n
"#;

/// One global fixed window per second. KEYS: rate key prefix. ARGV: rate.
/// → ms to wait before trying again, 0 = go.
const RATE: &str = r#"
local key = KEYS[1] .. ':' .. t[1]
local n = redis.call('INCR', key)
if n == 1 then redis.call('PEXPIRE', key, 2000) end
if n > tonumber(ARGV[1]) then return 1000 - math.floor(tonumber(t[2]) / 1000) end
return 0
"#;

/// The keys and scripts of one queue.
#[derive(Debug, Clone)]
pub struct Queue {
    base: String,
    stream: String,
    sched: String,
    dead: String,
    counts: String,
    rate: String,
    /// The event stream (`mail.events`).
    pub events: String,
    enqueue: Script,
    move_due: Script,
    begin: Script,
    finish: Script,
    cancel: Script,
    retry: Script,
    rate_script: Script,
    suppress: Script,
    unsuppress: Script,
}

/// A message larger than this is not carried in a script's arguments or a stream
/// entry: it goes into its own key in [`BODY_PIECE`]s first.
pub const INLINE_BODY: usize = 256 * 1024;
/// The most message bytes one command writes or reads.
pub const BODY_PIECE: usize = 1 << 20;
/// A body key written for a mail that was then never enqueued (the daemon died in
/// between) expires after this.
const ORPHAN_BODY_MS: u64 = 3_600_000;

/// One mail for [`Queue::enqueue`].
#[derive(Debug)]
pub struct NewMail {
    pub built: super::message::Built,
    /// When to send (Unix ms); 0 or a past time = now.
    pub send_at_ms: u64,
    /// As stored: with `mail.isolate_by_uid`, prefixed by the owner (`u<uid>:`), so
    /// two apps' keys never collide.
    pub idempotency_key: Option<String>,
    /// The uid that sent it (SO_PEERCRED), when known.
    pub owner: Option<u32>,
    /// The template it was rendered from.
    pub template: Option<String>,
}

impl NewMail {
    /// Whether the message goes through its body key (see [`Queue::store_body`]).
    pub fn in_body_key(&self) -> bool {
        self.built.raw.len() > INLINE_BODY
    }

    /// Bytes the enqueue script carries for this mail.
    pub fn inline_len(&self) -> usize {
        if self.in_body_key() {
            0
        } else {
            self.built.raw.len()
        }
    }
}

/// What `enqueue` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    pub mail_id: String,
    pub status: MailStatus,
    pub duplicate: bool,
    /// Recipients dropped because they are on the suppression list.
    pub suppressed: Vec<String>,
    /// Replicas that acknowledged the write, when it waited for them.
    pub replicas: Option<u64>,
}

/// What `begin` decided for a stream entry.
#[derive(Debug, Clone)]
pub enum Begin {
    Go {
        attempts: u64,
        from: String,
        rcpts: Vec<String>,
        raw: Vec<u8>,
    },
    /// Nothing to deliver: the mail is in this status (None: no record).
    Skip(Option<MailStatus>),
    Dead(String),
}

/// The end of a delivery attempt.
#[derive(Debug, Clone)]
pub enum Outcome {
    Sent {
        refused: String,
        suppress: Vec<Suppress>,
    },
    Retry {
        error: String,
        delay_ms: u64,
        rcpts: Option<Vec<String>>,
        refused: String,
        suppress: Vec<Suppress>,
    },
    Dead {
        error: String,
        refused: String,
        class: Class,
        suppress: Vec<Suppress>,
    },
}

/// A recipient the attempt showed does not exist: to put on the suppression list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppress {
    pub address: String,
    pub reason: String,
    pub class: Class,
}

impl Outcome {
    fn suppress(&self) -> &[Suppress] {
        match self {
            Outcome::Sent { suppress, .. }
            | Outcome::Retry { suppress, .. }
            | Outcome::Dead { suppress, .. } => suppress,
        }
    }
}

/// One status record, as `mail.status` reports it.
#[derive(Debug, Clone)]
pub struct StatusRecord {
    pub status: MailStatus,
    pub attempts: u64,
    pub last_error: Option<String>,
    pub next_attempt_ms: Option<u64>,
    pub updated_ms: u64,
    pub refused: Option<String>,
    pub owner: Option<u32>,
    /// The failure's bounce class (`bad-mailbox`, `transient`, …).
    pub class: Option<String>,
    /// Recipients dropped at `mail.send`: on the suppression list.
    pub suppressed: Option<String>,
    /// The template the mail was rendered from.
    pub template: Option<String>,
}

/// One entry of the suppression list.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Suppressed {
    pub address: String,
    pub reason: String,
    pub class: String,
    pub at_ms: u64,
}

/// One entry of `mail.dead`.
#[derive(Debug, Clone)]
pub struct DeadRecord {
    pub mail_id: String,
    pub to: Vec<String>,
    pub subject: String,
    pub attempts: u64,
    pub last_error: String,
    pub dead_ms: u64,
    pub owner: Option<u32>,
    pub class: Option<String>,
}

/// Whose mail a request may see and steer (`mail.isolate_by_uid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every mail: isolation is off, or the caller is in `mail.admin_uids`.
    All,
    /// Only mail this uid sent. Mail with no recorded owner is not among it.
    Owner(u32),
}

impl Scope {
    pub fn sees(self, owner: Option<u32>) -> bool {
        match self {
            Scope::All => true,
            Scope::Owner(uid) => owner == Some(uid),
        }
    }

    /// The scripts' `visible()` argument: '' = any.
    fn owner_arg(self) -> String {
        match self {
            Scope::All => String::new(),
            Scope::Owner(uid) => uid.to_string(),
        }
    }
}

/// One stream entry: a mail to deliver.
#[derive(Debug)]
pub struct Entry {
    pub id: String,
    /// Empty for an entry that is not ours (acknowledged without delivery).
    pub mail_id: String,
    /// The message, when the entry carries it (entries of satchel 0.1 do not).
    pub raw: Option<Vec<u8>>,
    /// The message is in its body key (it is over [`INLINE_BODY`]).
    pub body: bool,
}

impl Entry {
    /// Where BEGIN finds the message (its ARGV[6]).
    fn message_at(&self) -> &'static str {
        match (&self.raw, self.body) {
            (Some(_), _) => "raw",
            (None, true) => "body",
            (None, false) => "",
        }
    }
}

/// What one `XAUTOCLAIM` step took over.
#[derive(Debug)]
pub struct Claimed {
    pub entries: Vec<Entry>,
    /// Where the next step starts; `0-0` when the scan is complete.
    pub cursor: String,
}

/// Mails per status across every daemon, and the stream's length.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub by_status: Vec<(MailStatus, i64)>,
    pub stream_len: u64,
}

impl Counts {
    pub fn of(&self, status: MailStatus) -> i64 {
        self.by_status
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(0, |(_, n)| *n)
    }
}

/// A script: the clock, the events' cap, the helper functions it uses, then its body.
fn script(body: &str, helpers: &[&str], events_max: u64) -> Script {
    Script::new(&script_text(body, helpers, events_max))
}

fn script_text(body: &str, helpers: &[&str], events_max: u64) -> String {
    let mut s = String::from(NOW);
    s.push_str(&format!("local EVENTS_MAX = {events_max}\n"));
    s.push_str(BODY);
    for h in helpers {
        s.push_str(h);
    }
    s.push_str(body);
    s
}

/// The source of every script (for tests that check what they write).
#[cfg(test)]
pub fn script_sources() -> Vec<String> {
    [
        ENQUEUE, MOVE_DUE, BEGIN, FINISH, CANCEL, RETRY, REQUEUE, ACK,
    ]
    .iter()
    .map(|b| script_text(b, &[], 100_000))
    .collect()
}

pub fn split_list(s: &str) -> Vec<String> {
    s.split('\n')
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn status_of(v: Option<&Value>) -> Option<MailStatus> {
    MailStatus::parse(&text(v?)?)
}

impl Queue {
    /// The queue's keys start with `<prefix>:m`; on a Redis Cluster with
    /// `{<prefix>:m}`, a hash tag that puts every mail key in one slot, so each
    /// transition stays one atomic script there too.
    pub fn new(redis_prefix: &str, cluster: bool, events_max: u64) -> Queue {
        let base = if cluster {
            format!("{{{redis_prefix}:m}}")
        } else {
            format!("{redis_prefix}:m")
        };
        Queue {
            stream: format!("{base}:stream"),
            sched: format!("{base}:sched"),
            dead: format!("{base}:dead"),
            counts: format!("{base}:counts"),
            rate: format!("{base}:rate"),
            events: format!("{base}:events"),
            enqueue: script(ENQUEUE, &[], events_max),
            move_due: script(MOVE_DUE, &[REQUEUE], events_max),
            begin: script(BEGIN, &[ACK], events_max),
            finish: script(FINISH, &[ACK], events_max),
            cancel: script(CANCEL, &[], events_max),
            retry: script(RETRY, &[REQUEUE], events_max),
            rate_script: script(RATE, &[], events_max),
            suppress: script(SUPPRESS, &[], events_max),
            unsuppress: script(UNSUPPRESS, &[], events_max),
            base,
        }
    }

    pub fn status_key(&self, mail_id: &str) -> String {
        format!("{}:s:{mail_id}", self.base)
    }

    fn status_prefix(&self) -> String {
        format!("{}:s:", self.base)
    }

    /// `<K>:sup:` + a normalized address: one suppressed address; `<K>:sup` is the
    /// index of them by expiry.
    pub fn suppression_prefix(&self) -> String {
        format!("{}:sup:", self.base)
    }

    fn idem_key(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.base)
    }

    /// Creates the consumer group (and the stream) if missing.
    pub async fn ensure_group(&self, backend: &Backend) -> Result<(), BackendError> {
        backend.ensure_group(&self.stream, GROUP, "0").await
    }

    /// Enqueues `mails` in one script run; the answers come in the same order.
    /// With `ack = Some((replicas, timeout))` it then waits for that many replicas.
    pub async fn enqueue(
        &self,
        backend: &Backend,
        mails: &[NewMail],
        idem_ttl_ms: u64,
        retention_ms: u64,
        suppression: bool,
        ack: Option<(u64, Duration)>,
    ) -> Result<Vec<Enqueued>, BackendError> {
        let mut inv = self.enqueue.prepare_invoke();
        inv.key(&self.stream)
            .key(&self.sched)
            .key(&self.counts)
            .key(&self.events)
            .arg(idem_ttl_ms)
            .arg(retention_ms)
            .arg(self.status_prefix())
            .arg(self.idem_key(""))
            .arg(if suppression {
                self.suppression_prefix()
            } else {
                String::new()
            });
        for m in mails {
            let b = &m.built;
            let body = m.in_body_key();
            inv.arg(&b.mail_id)
                .arg(m.send_at_ms)
                .arg(m.idempotency_key.as_deref().unwrap_or(""))
                .arg(&b.from)
                .arg(b.rcpts.join("\n"))
                .arg(b.to_display.join("\n"))
                .arg(&b.subject)
                .arg(&b.message_id)
                .arg(if body { &[][..] } else { &b.raw[..] })
                .arg(if body { "1" } else { "" })
                .arg(m.owner.map(|u| u.to_string()).unwrap_or_default())
                .arg(m.template.as_deref().unwrap_or(""));
        }
        let (v, replicas): (Value, _) = match ack {
            None => (backend.invoke(&inv).await?, None),
            Some((want, timeout)) => {
                let (v, n) = backend
                    .invoke_acked(&inv, &self.stream, want, timeout)
                    .await?;
                (v, Some(n))
            }
        };
        match &v {
            Value::Array(items) if items.len() == 4 * mails.len() => items
                .chunks(4)
                .map(|it| {
                    Ok(Enqueued {
                        mail_id: text(&it[0]).unwrap_or_default(),
                        status: status_of(it.get(1))
                            .ok_or_else(|| BackendError::reply("enqueue status", &it[1]))?,
                        duplicate: uint(&it[2]) == Some(1),
                        suppressed: text(&it[3]).map(|t| split_list(&t)).unwrap_or_default(),
                        replicas,
                    })
                })
                .collect(),
            other => Err(BackendError::reply("enqueue", other)),
        }
    }

    /// Moves due scheduled mail and retries into the stream; returns how many.
    pub async fn move_due(&self, backend: &Backend, limit: u64) -> Result<u64, BackendError> {
        backend
            .invoke(
                self.move_due
                    .key(&self.sched)
                    .key(&self.stream)
                    .key(&self.counts)
                    .key(&self.events)
                    .arg(self.status_prefix())
                    .arg(limit),
            )
            .await
    }

    pub async fn begin(
        &self,
        backend: &Backend,
        entry: &Entry,
        max_attempts: u64,
        retention_ms: u64,
    ) -> Result<Begin, BackendError> {
        let v: Value = backend
            .invoke(
                self.begin
                    .key(self.status_key(&entry.mail_id))
                    .key(&self.counts)
                    .key(&self.stream)
                    .key(&self.dead)
                    .key(&self.events)
                    .arg(max_attempts)
                    .arg(GROUP)
                    .arg(&entry.id)
                    .arg(retention_ms)
                    .arg(&entry.mail_id)
                    .arg(entry.message_at()),
            )
            .await?;
        let Value::Array(items) = &v else {
            return Err(BackendError::reply("begin", &v));
        };
        match (items.first().and_then(text).as_deref(), items.len()) {
            (Some("go"), 5) => Ok(Begin::Go {
                attempts: uint(&items[1]).unwrap_or(1),
                from: text(&items[2]).unwrap_or_default(),
                rcpts: split_list(&text(&items[3]).unwrap_or_default()),
                raw: bytes(&items[4]).unwrap_or_default(),
            }),
            (Some("skip"), 2) => Ok(Begin::Skip(status_of(items.get(1)))),
            (Some("dead"), 2) => Ok(Begin::Dead(text(&items[1]).unwrap_or_default())),
            _ => Err(BackendError::reply("begin", &v)),
        }
    }

    /// Ends an attempt. `suppression`: `mail.suppress_ttl_ms` while the suppression
    /// list is on (the outcome's nonexistent recipients go on it, in the same script).
    pub async fn finish(
        &self,
        backend: &Backend,
        entry: &Entry,
        retention_ms: u64,
        outcome: &Outcome,
        suppression: Option<u64>,
    ) -> Result<(), BackendError> {
        let (kind, error, delay, rcpts, refused, class) = match outcome {
            Outcome::Sent { refused, .. } => ("sent", "", 0, String::new(), refused, ""),
            Outcome::Retry {
                error,
                delay_ms,
                rcpts,
                refused,
                ..
            } => (
                "retry",
                error.as_str(),
                *delay_ms,
                rcpts.as_ref().map(|r| r.join("\n")).unwrap_or_default(),
                refused,
                Class::Transient.as_str(),
            ),
            Outcome::Dead {
                error,
                refused,
                class,
                ..
            } => (
                "dead",
                error.as_str(),
                0,
                String::new(),
                refused,
                class.as_str(),
            ),
        };
        let mut inv = self.finish.prepare_invoke();
        inv.key(self.status_key(&entry.mail_id))
            .key(&self.counts)
            .key(&self.stream)
            .key(&self.sched)
            .key(&self.dead)
            .key(&self.events)
            .arg(kind)
            .arg(GROUP)
            .arg(&entry.id)
            .arg(retention_ms)
            .arg(error)
            .arg(delay)
            .arg(rcpts)
            .arg(&entry.mail_id)
            .arg(refused.as_str())
            .arg(class)
            .arg(match suppression {
                Some(_) => self.suppression_prefix(),
                None => String::new(),
            })
            .arg(suppression.unwrap_or(0));
        for s in outcome.suppress() {
            inv.arg(&s.address).arg(&s.reason).arg(s.class.as_str());
        }
        let _: Value = backend.invoke(&inv).await?;
        Ok(())
    }

    /// → None if unknown, Some(cancelled?)
    pub async fn cancel(
        &self,
        backend: &Backend,
        mail_id: &str,
        retention_ms: u64,
        scope: Scope,
    ) -> Result<Option<bool>, BackendError> {
        let r: i64 = backend
            .invoke(
                self.cancel
                    .key(self.status_key(mail_id))
                    .key(&self.sched)
                    .key(&self.counts)
                    .key(&self.events)
                    .arg(mail_id)
                    .arg(retention_ms)
                    .arg(scope.owner_arg()),
            )
            .await?;
        Ok(match r {
            -1 => None,
            n => Some(n == 1),
        })
    }

    /// → Err(None) unknown, Err(Some(status)) not dead, Ok(()) requeued.
    pub async fn retry(
        &self,
        backend: &Backend,
        mail_id: &str,
        scope: Scope,
    ) -> Result<Result<(), Option<MailStatus>>, BackendError> {
        let v: Value = backend
            .invoke(
                self.retry
                    .key(self.status_key(mail_id))
                    .key(&self.stream)
                    .key(&self.dead)
                    .key(&self.counts)
                    .key(&self.events)
                    .arg(mail_id)
                    .arg(scope.owner_arg()),
            )
            .await?;
        Ok(match &v {
            Value::Int(1) => Ok(()),
            Value::Int(_) => Err(None),
            other => Err(status_of(Some(other))),
        })
    }

    /// Waits for the global rate window; returns ms to wait (0 = go).
    pub async fn rate_wait(&self, backend: &Backend, rate: u64) -> Result<u64, BackendError> {
        // `t` (Redis TIME) is defined by the NOW prelude.
        backend
            .invoke(self.rate_script.key(&self.rate).arg(rate))
            .await
    }

    /// The record, or None when there is none the caller may see.
    pub async fn status(
        &self,
        backend: &Backend,
        mail_id: &str,
        scope: Scope,
    ) -> Result<Option<StatusRecord>, BackendError> {
        let v: Vec<Value> = backend
            .query(redis::cmd("HMGET").arg(self.status_key(mail_id)).arg(&[
                "status",
                "attempts",
                "last_error",
                "next_attempt_ms",
                "updated_ms",
                "refused",
                "owner",
                "class",
                "suppressed",
                "template",
            ]))
            .await?;
        let Some(status) = status_of(v.first()) else {
            return Ok(None);
        };
        let owner = v.get(6).and_then(uint).map(|u| u as u32);
        if !scope.sees(owner) {
            return Ok(None);
        }
        Ok(Some(StatusRecord {
            owner,
            status,
            attempts: v.get(1).and_then(uint).unwrap_or(0),
            last_error: v.get(2).and_then(text),
            next_attempt_ms: v.get(3).and_then(uint),
            updated_ms: v.get(4).and_then(uint).unwrap_or(0),
            refused: v.get(5).and_then(text),
            class: v.get(7).and_then(text),
            suppressed: v.get(8).and_then(text),
            template: v.get(9).and_then(text),
        }))
    }

    pub async fn dead(
        &self,
        backend: &Backend,
        limit: u64,
        scope: Scope,
    ) -> Result<Vec<DeadRecord>, BackendError> {
        let set = match scope {
            Scope::All => self.dead.clone(),
            Scope::Owner(uid) => format!("{}:u{uid}", self.dead),
        };
        let ids: Vec<String> = backend
            .query(
                redis::cmd("ZREVRANGE")
                    .arg(&set)
                    .arg(0)
                    .arg(limit.saturating_sub(1)),
            )
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(self.status_key(id)).arg(&[
                "status",
                "to",
                "subject",
                "attempts",
                "last_error",
                "dead_ms",
                "owner",
                "class",
            ]);
        }
        let rows: Vec<Vec<Value>> = backend.pipeline(&pipe).await?;
        Ok(ids
            .into_iter()
            .zip(rows)
            .filter(|(_, r)| status_of(r.first()) == Some(MailStatus::Dead))
            .filter(|(_, r)| scope.sees(r.get(6).and_then(uint).map(|u| u as u32)))
            .map(|(mail_id, r)| DeadRecord {
                mail_id,
                to: split_list(&r.get(1).and_then(text).unwrap_or_default()),
                subject: r.get(2).and_then(text).unwrap_or_default(),
                attempts: r.get(3).and_then(uint).unwrap_or(0),
                last_error: r.get(4).and_then(text).unwrap_or_default(),
                dead_ms: r.get(5).and_then(uint).unwrap_or(0),
                owner: r.get(6).and_then(uint).map(|u| u as u32),
                class: r.get(7).and_then(text),
            })
            .collect())
    }

    /// The templates' hash: name → JSON of [`super::template::Stored`].
    fn templates_key(&self) -> String {
        format!("{}:tpl", self.base)
    }

    pub async fn template_put(
        &self,
        backend: &Backend,
        name: &str,
        t: &super::template::Stored,
    ) -> Result<(), BackendError> {
        let json = serde_json::to_string(t).map_err(|e| BackendError::Reply(e.to_string()))?;
        let _: i64 = backend
            .query(
                redis::cmd("HSET")
                    .arg(self.templates_key())
                    .arg(name)
                    .arg(json),
            )
            .await?;
        Ok(())
    }

    pub async fn template_get(
        &self,
        backend: &Backend,
        name: &str,
    ) -> Result<Option<super::template::Stored>, BackendError> {
        let json: Option<String> = backend
            .query(redis::cmd("HGET").arg(self.templates_key()).arg(name))
            .await?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| BackendError::Reply(e.to_string())))
            .transpose()
    }

    pub async fn template_delete(
        &self,
        backend: &Backend,
        name: &str,
    ) -> Result<bool, BackendError> {
        let n: i64 = backend
            .query(redis::cmd("HDEL").arg(self.templates_key()).arg(name))
            .await?;
        Ok(n == 1)
    }

    pub async fn template_names(&self, backend: &Backend) -> Result<Vec<String>, BackendError> {
        let mut names: Vec<String> = backend
            .query(redis::cmd("HKEYS").arg(self.templates_key()))
            .await?;
        names.sort();
        Ok(names)
    }

    /// Puts `address` (normalized) on the suppression list for `ttl_ms`.
    pub async fn suppression_add(
        &self,
        backend: &Backend,
        address: &str,
        reason: &str,
        class: &str,
        ttl_ms: u64,
    ) -> Result<(), BackendError> {
        let sp = self.suppression_prefix();
        let _: i64 = backend
            .invoke(
                self.suppress
                    .key(format!("{sp}{address}"))
                    .arg(&sp)
                    .arg(address)
                    .arg(reason)
                    .arg(class)
                    .arg(ttl_ms),
            )
            .await?;
        Ok(())
    }

    /// Takes `address` (normalized) off the suppression list; whether it was on it.
    pub async fn suppression_remove(
        &self,
        backend: &Backend,
        address: &str,
    ) -> Result<bool, BackendError> {
        let sp = self.suppression_prefix();
        let n: i64 = backend
            .invoke(
                self.unsuppress
                    .key(format!("{sp}{address}"))
                    .key(sp.trim_end_matches(':'))
                    .arg(address),
            )
            .await?;
        Ok(n == 1)
    }

    /// One page of the suppression list (`ZSCAN` of its index: every address that
    /// stays on the list is listed at least once over a full pass); the next cursor,
    /// None at the end. Entries that expired meanwhile are dropped from the index.
    pub async fn suppression_list(
        &self,
        backend: &Backend,
        cursor: u64,
        limit: u64,
    ) -> Result<(Vec<Suppressed>, Option<u64>), BackendError> {
        let sp = self.suppression_prefix();
        let idx = sp.trim_end_matches(':').to_owned();
        let (next, flat): (u64, Vec<String>) = backend
            .query(
                redis::cmd("ZSCAN")
                    .arg(&idx)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(limit),
            )
            .await?;
        // ZSCAN answers member, score, member, score, …
        let addresses: Vec<String> = flat.into_iter().step_by(2).collect();
        if addresses.is_empty() {
            return Ok((Vec::new(), (next != 0).then_some(next)));
        }
        let mut pipe = redis::pipe();
        for a in &addresses {
            pipe.cmd("HMGET")
                .arg(format!("{sp}{a}"))
                .arg(&["reason", "class", "at_ms"]);
        }
        let rows: Vec<Vec<Value>> = backend.pipeline(&pipe).await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (address, r) in addresses.into_iter().zip(rows) {
            match r.first().and_then(text) {
                Some(reason) => out.push(Suppressed {
                    address,
                    reason,
                    class: r.get(1).and_then(text).unwrap_or_default(),
                    at_ms: r.get(2).and_then(uint).unwrap_or(0),
                }),
                None => gone.push(address),
            }
        }
        if !gone.is_empty() {
            let _: Result<i64, _> = backend.query(redis::cmd("ZREM").arg(&idx).arg(&gone)).await;
        }
        Ok((out, (next != 0).then_some(next)))
    }

    /// Mails per status across every daemon, and the stream length (undelivered +
    /// in flight).
    pub async fn counts(&self, backend: &Backend) -> Result<Counts, BackendError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET").arg(&self.counts);
        for st in MailStatus::ALL {
            pipe.arg(st.as_str());
        }
        pipe.cmd("XLEN").arg(&self.stream);
        let (counts, stream_len): (Vec<Option<i64>>, u64) = backend.pipeline(&pipe).await?;
        Ok(Counts {
            by_status: MailStatus::ALL
                .into_iter()
                .zip(counts)
                .map(|(s, n)| (s, n.unwrap_or(0).max(0)))
                .collect(),
            stream_len,
        })
    }

    /// Writes a large message into its body key in pieces of at most
    /// [`BODY_PIECE`], one command each, so Redis is never busy with one command
    /// for long. The key expires unless the enqueue script adopts it.
    pub async fn store_body(
        &self,
        backend: &Backend,
        mail_id: &str,
        raw: &[u8],
    ) -> Result<(), BackendError> {
        let key = format!("{}:b", self.status_key(mail_id));
        for (i, piece) in raw.chunks(BODY_PIECE).enumerate() {
            let mut pipe = redis::pipe();
            if i == 0 {
                // Atomic: a key without its expiry would outlive a crash here.
                pipe.atomic()
                    .cmd("UNLINK")
                    .arg(&key)
                    .ignore()
                    .cmd("RPUSH")
                    .arg(&key)
                    .arg(piece)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&key)
                    .arg(ORPHAN_BODY_MS)
                    .ignore();
            } else {
                pipe.cmd("RPUSH").arg(&key).arg(piece).ignore();
            }
            let _: Value = backend.pipeline(&pipe).await?;
        }
        Ok(())
    }

    /// Reads a message from its body key, one piece per command.
    pub async fn read_body(
        &self,
        backend: &Backend,
        mail_id: &str,
    ) -> Result<Vec<u8>, BackendError> {
        let key = format!("{}:b", self.status_key(mail_id));
        let pieces: u64 = backend.query(redis::cmd("LLEN").arg(&key)).await?;
        let mut raw = Vec::with_capacity(pieces as usize * BODY_PIECE);
        for i in 0..pieces {
            let piece: Option<Vec<u8>> =
                backend.query(redis::cmd("LINDEX").arg(&key).arg(i)).await?;
            match piece {
                Some(p) => raw.extend_from_slice(&p),
                None => break, // deleted meanwhile (cancelled)
            }
        }
        Ok(raw)
    }

    /// Stream entries not yet acknowledged (waiting + in flight).
    pub async fn depth(&self, backend: &Backend) -> Result<u64, BackendError> {
        backend.query(redis::cmd("XLEN").arg(&self.stream)).await
    }

    /// Takes up to `count` new entries for `consumer`, blocking up to `block_ms` on
    /// the reader's own connection. A `NOGROUP` error means the stream was deleted
    /// (FLUSHALL): call [`Queue::ensure_group`] and read again.
    pub async fn read_new(
        &self,
        conn: &mut Dedicated,
        consumer: &str,
        count: usize,
        block_ms: u64,
    ) -> Result<Vec<Entry>, BackendError> {
        let v: Value = conn
            .query(
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(count)
                    .arg("BLOCK")
                    .arg(block_ms)
                    .arg("STREAMS")
                    .arg(&self.stream)
                    .arg(">"),
            )
            .await?;
        Ok(stream_entries(&v))
    }

    /// Takes over up to `count` entries idle for `idle_ms` (their consumer died), from
    /// `cursor` on. Entries deleted from the stream while pending are acknowledged
    /// here: nothing to deliver, but they must leave the pending list.
    pub async fn claim_abandoned(
        &self,
        backend: &Backend,
        consumer: &str,
        idle_ms: u64,
        cursor: &str,
        count: usize,
    ) -> Result<Claimed, BackendError> {
        let v: Value = backend
            .query(
                redis::cmd("XAUTOCLAIM")
                    .arg(&self.stream)
                    .arg(GROUP)
                    .arg(consumer)
                    .arg(idle_ms)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        let Value::Array(parts) = &v else {
            return Err(BackendError::reply("XAUTOCLAIM", &v));
        };
        if let Some(Value::Array(deleted)) = parts.get(2)
            && !deleted.is_empty()
        {
            let mut ack = redis::cmd("XACK");
            ack.arg(&self.stream).arg(GROUP);
            for d in deleted.iter().filter_map(text) {
                ack.arg(d);
            }
            let _: Result<Value, _> = backend.query(&ack).await;
        }
        Ok(Claimed {
            cursor: parts.first().and_then(text).unwrap_or_else(|| "0-0".into()),
            entries: parts.get(1).map(entries_of).unwrap_or_default(),
        })
    }

    /// Refreshes `consumer`'s claim on an entry whose delivery is still running, so
    /// it is not taken over as if this daemon had died.
    pub async fn keep_claim(&self, backend: &Backend, consumer: &str, entry_id: &str) {
        let _: Result<Value, _> = backend
            .query(
                redis::cmd("XCLAIM")
                    .arg(&self.stream)
                    .arg(GROUP)
                    .arg(consumer)
                    .arg(0)
                    .arg(entry_id)
                    .arg("JUSTID"),
            )
            .await;
    }

    /// Acknowledges and deletes an entry that is not one of ours, so it is not
    /// reclaimed for ever.
    pub async fn drop_foreign(&self, backend: &Backend, entry_id: &str) {
        let mut pipe = redis::pipe();
        pipe.cmd("XACK")
            .arg(&self.stream)
            .arg(GROUP)
            .arg(entry_id)
            .cmd("XDEL")
            .arg(&self.stream)
            .arg(entry_id);
        let _: Result<Value, _> = backend.pipeline(&pipe).await;
    }
}

/// The entries of an XREADGROUP / XAUTOCLAIM entry list.
fn entries_of(list: &Value) -> Vec<Entry> {
    let mut out = Vec::new();
    let Value::Array(entries) = list else {
        return out;
    };
    for e in entries {
        let Value::Array(parts) = e else { continue };
        let (Some(id), Some(Value::Array(fields))) = (parts.first(), parts.get(1)) else {
            continue;
        };
        let Some(id) = text(id) else { continue };
        let field = |name: &str| {
            fields
                .chunks(2)
                .find(|kv| kv.first().and_then(text).as_deref() == Some(name))
                .and_then(|kv| kv.get(1))
        };
        out.push(Entry {
            id,
            mail_id: field("id").and_then(text).unwrap_or_default(),
            raw: field("raw").and_then(bytes),
            body: field("body").is_some(),
        });
    }
    out
}

fn stream_entries(v: &Value) -> Vec<Entry> {
    // RESP2: [[stream, [entries]]]; RESP3 may give a map.
    match v {
        Value::Array(streams) => streams
            .iter()
            .flat_map(|s| match s {
                Value::Array(kv) if kv.len() == 2 => entries_of(&kv[1]),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(kv) => kv.iter().flat_map(|(_, e)| entries_of(e)).collect(),
        _ => Vec::new(),
    }
}
