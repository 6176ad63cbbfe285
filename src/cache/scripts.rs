//! Lua scripts: every check-and-write the cache needs is one atomic script.

use redis::Script;

/// The scripts, hashed once.
pub struct Scripts {
    pub set: Script,
    pub fetch: Script,
    pub fill: Script,
    pub release: Script,
    pub del: Script,
    pub invalidate_tag: Script,
    pub pop_tagged: Script,
    pub scan_prefix: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            set: Script::new(SET),
            fetch: Script::new(FETCH),
            fill: Script::new(FILL),
            release: Script::new(RELEASE),
            del: Script::new(DEL),
            invalidate_tag: Script::new(INVALIDATE_TAG),
            pop_tagged: Script::new(POP_TAGGED),
            scan_prefix: Script::new(SCAN_PREFIX),
        }
    }
}

/// `cache.set`: unconditional store; voids any lease (stale-set protection).
/// KEYS: value, lease. ARGV: blob, ttl_ms, base, key, channel, tags...
const SET: &str = r#"
local function store(vkey, lkey, blob, ttl, base, key, first_tag)
  redis.call('SET', vkey, blob, 'PX', ttl)
  local had_lease = redis.call('DEL', lkey)
  local ttl_n = tonumber(ttl)
  for i = first_tag, #ARGV do
    local t = base .. 't:' .. ARGV[i]
    redis.call('SADD', t, key)
    if redis.call('PTTL', t) < ttl_n then redis.call('PEXPIRE', t, ttl_n) end
  end
  return had_lease
end
if store(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 6) == 1 then
  redis.call('PUBLISH', ARGV[5], KEYS[1])
end
return 1
"#;

/// `cache.fetch`: the value, or a lease for exactly one caller, or "wait".
/// KEYS: value, lease, seq. ARGV: lease_ms, random.
/// Returns {1, blob} | {2, lease pttl} | {3, token}.
const FETCH: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
local l = redis.call('PTTL', KEYS[2])
if l > 0 or l == -1 then return {2, l} end
local seq = redis.call('INCR', KEYS[3])
local token = seq .. '.' .. ARGV[2]
redis.call('SET', KEYS[2], token, 'PX', ARGV[1])
return {3, token}
"#;

/// `cache.fill`: store only if the caller still holds the lease and none of the
/// value's tags was invalidated after the lease was granted.
/// KEYS: value, lease. ARGV: token, blob, ttl_ms, base, key, channel, tags...
/// Returns 1 stored, 0 lease not held, -1 a tag was invalidated meanwhile.
const FILL: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local granted = tonumber(string.match(ARGV[1], '^(%d+)'))
for i = 7, #ARGV do
  local ti = redis.call('GET', ARGV[4] .. 'ti:' .. ARGV[i])
  if ti and tonumber(ti) > granted then
    redis.call('DEL', KEYS[2])
    redis.call('PUBLISH', ARGV[6], KEYS[1])
    return -1
  end
end
local ttl_n = tonumber(ARGV[3])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl_n)
redis.call('DEL', KEYS[2])
for i = 7, #ARGV do
  local t = ARGV[4] .. 't:' .. ARGV[i]
  redis.call('SADD', t, ARGV[5])
  if redis.call('PTTL', t) < ttl_n then redis.call('PEXPIRE', t, ttl_n) end
end
redis.call('PUBLISH', ARGV[6], KEYS[1])
return 1
"#;

/// Gives a lease back (a waiter it was meant for has gone).
/// KEYS: lease, value. ARGV: token, channel.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], KEYS[2])
  return 1
end
return 0
"#;

/// `cache.del`: KEYS: value1, lease1, value2, lease2, … ARGV: channel.
/// Returns the number of values deleted; voided leases wake their waiters.
const DEL: &str = r#"
local n = 0
for i = 1, #KEYS, 2 do
  n = n + redis.call('DEL', KEYS[i])
  if redis.call('DEL', KEYS[i + 1]) == 1 then
    redis.call('PUBLISH', ARGV[1], KEYS[i])
  end
end
return n
"#;

/// Records a tag invalidation (so fills of leases granted earlier are refused).
/// KEYS: ti, seq. ARGV: record ttl ms.
const INVALIDATE_TAG: &str = r#"
local seq = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], seq, 'PX', ARGV[1])
return seq
"#;

/// Deletes up to ARGV[2] keys of a tag set (values and leases).
/// KEYS: tag set. ARGV: base, batch. Returns {values deleted, members popped,
/// [members]} (the members, so the near-cache can drop them before answering).
const POP_TAGGED: &str = r#"
local members = redis.call('SPOP', KEYS[1], ARGV[2])
local n = 0
for _, m in ipairs(members) do
  n = n + redis.call('UNLINK', ARGV[1] .. 'v:' .. m)
  redis.call('UNLINK', ARGV[1] .. 'l:' .. m)
end
return {n, #members, members}
"#;

/// One SCAN step of prefix invalidation: unlinks matching value and lease keys.
/// ARGV: cursor, pattern, count, position of the v/l letter. Returns {cursor,
/// values deleted, [value keys deleted]}.
const SCAN_PREFIX: &str = r#"
local r = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local pos = tonumber(ARGV[4])
local n, gone = 0, {}
for _, k in ipairs(r[2]) do
  local deleted = redis.call('UNLINK', k)
  if string.sub(k, pos, pos) == 'v' then
    n = n + deleted
    gone[#gone + 1] = k
  end
end
return {r[1], n, gone}
"#;
