//! Lua scripts: every check-and-write the cache needs is one atomic script.

use redis::Script;

/// The scripts, hashed once. Each touches the keys of one cache key (its value and
/// lease share a hash tag) or of one tag, so each is atomic on a Redis Cluster too;
/// what spans keys (a value and its tags, a tag and its keys) is a sequence of
/// scripts whose order keeps the guarantees (see `CacheService::store`).
pub struct Scripts {
    pub set: Script,
    pub tag_add: Script,
    pub fetch: Script,
    pub fill: Script,
    pub release: Script,
    pub del: Script,
    pub pop_tagged: Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            set: Script::new(SET),
            tag_add: Script::new(TAG_ADD),
            fetch: Script::new(FETCH),
            fill: Script::new(FILL),
            release: Script::new(RELEASE),
            del: Script::new(DEL),
            pop_tagged: Script::new(POP_TAGGED),
        }
    }
}

/// `cache.set`: unconditional store; voids any lease (stale-set protection).
/// KEYS: value, lease. ARGV: blob, ttl_ms, channel.
const SET: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[3], KEYS[1])
end
return 1
"#;

/// Adds a key to a tag's set, keeping the set at least as long as the value.
/// KEYS: tag set. ARGV: key, ttl_ms.
const TAG_ADD: &str = r#"
redis.call('SADD', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"#;

/// `cache.fetch`: the value, or a lease for exactly one caller, or "wait".
/// KEYS: value, lease. ARGV: lease_ms, token (`<seq>.<random>`, seq from `INCR seq`).
/// Returns {1, blob} | {2, lease pttl} | {3, token}.
const FETCH: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
local l = redis.call('PTTL', KEYS[2])
if l > 0 or l == -1 then return {2, l} end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1])
return {3, ARGV[2]}
"#;

/// `cache.fill`: store only if the caller still holds the lease. ARGV[5] = "1" when
/// the daemon saw one of the value's tags invalidated after the lease was granted
/// (then the lease is voided and nothing stored).
/// KEYS: value, lease. ARGV: token, blob, ttl_ms, channel, tag invalidated.
/// Returns 1 stored, 0 lease not held, -1 a tag was invalidated meanwhile.
const FILL: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
local stored = -1
if ARGV[5] ~= '1' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  stored = 1
end
redis.call('PUBLISH', ARGV[4], KEYS[1])
return stored
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

/// `cache.del`: KEYS: value1, lease1, value2, lease2, … (one slot) ARGV: channel.
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

/// Moves up to ARGV[1] members of a tag set to the tag's "being invalidated" set
/// (same hash tag, same slot) and returns them; the daemon deletes their values and
/// leases, then removes them from the second set. A daemon that dies in between
/// leaves them there for the next invalidation of the tag, so a member is never
/// forgotten before its value is gone; it lives as long as the tag's set would
/// have (at least as long as its members' values). KEYS: tag set, being-invalidated
/// set. ARGV: batch.
const POP_TAGGED: &str = r#"
local ttl = redis.call('PTTL', KEYS[1])
local m = redis.call('SPOP', KEYS[1], ARGV[1])
if #m > 0 then
  redis.call('SADD', KEYS[2], unpack(m))
  if ttl > redis.call('PTTL', KEYS[2]) then redis.call('PEXPIRE', KEYS[2], ttl) end
end
return m
"#;
