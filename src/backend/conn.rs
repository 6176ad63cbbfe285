//! The connections the backend holds, behind one type, and what differs on a Redis
//! Cluster: how a command finds its node, which keys may share one command, and
//! how to reach every primary.

use std::collections::HashMap;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// A connection: the shared reconnecting one, one of a task's own, or a cluster's
/// (which routes each command to the node owning its key's slot, and follows
/// `MOVED`/`ASK` and failovers by itself).
#[derive(Clone)]
pub enum Conn {
    Manager(ConnectionManager),
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Plain(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Runs `cmd` on the node that holds `key`'s slot (a keyless command such as
    /// `WAIT` goes where the key's writes went). Outside a cluster: as usual.
    pub async fn query_for_key(&mut self, key: &str, cmd: Cmd) -> RedisResult<Value> {
        match self {
            Conn::Cluster(c) => {
                let route = Route::new(slot_of(key), SlotAddr::Master);
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await
            }
            other => cmd.query_async(other).await,
        }
    }

    /// Runs `cmd` on the node at `host:port` (a cluster primary).
    pub async fn query_at(&mut self, host: &str, port: u16, cmd: Cmd) -> RedisResult<Value> {
        match self {
            Conn::Cluster(c) => {
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.to_owned(),
                        port,
                    }),
                )
                .await
            }
            other => cmd.query_async(other).await,
        }
    }

    /// Runs `cmd` on any primary (on one server: there).
    pub async fn query_random_primary(&mut self, cmd: Cmd) -> RedisResult<Value> {
        match self {
            Conn::Cluster(c) => {
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
                )
                .await
            }
            other => cmd.query_async(other).await,
        }
    }

    /// The primary serving `key`'s slot now (None outside a cluster).
    pub async fn cluster_owner_of(&mut self, key: &str) -> RedisResult<Option<(String, u16)>> {
        let Conn::Cluster(c) = self else {
            return Ok(None);
        };
        let slots = c
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        Ok(owner_of(&slots, slot_of(key)))
    }

    /// The primaries (`host`, `port`) of the cluster, from `CLUSTER SLOTS` asked of
    /// any node.
    pub async fn cluster_primaries(&mut self) -> RedisResult<Vec<(String, u16)>> {
        let Conn::Cluster(c) = self else {
            return Ok(Vec::new());
        };
        let slots = c
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        Ok(primaries_of(&slots))
    }
}

/// The hash slot of `key`: CRC16 (XMODEM) of its `{hash tag}` if it has a non-empty
/// one, else of the whole key, mod 16384 (the Redis Cluster specification). The
/// redis crate computes this too but does not expose the number.
pub fn slot_of(key: &str) -> u16 {
    let k = key.as_bytes();
    let tagged = k.iter().position(|b| *b == b'{').and_then(|open| {
        let close = k[open + 1..].iter().position(|b| *b == b'}')?;
        let tag = &k[open + 1..open + 1 + close];
        (!tag.is_empty()).then_some(tag)
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(k)) % 16384
}

/// Groups `keys` by slot, keeping their order within a group.
pub fn group_by_slot<'k, K: AsRef<str> + ?Sized>(keys: &[&'k K]) -> Vec<Vec<&'k K>> {
    let mut groups: Vec<Vec<&K>> = Vec::new();
    let mut index: HashMap<u16, usize> = HashMap::new();
    for k in keys {
        let slot = slot_of(k.as_ref());
        let i = *index.entry(slot).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[i].push(*k);
    }
    groups
}

/// `CLUSTER SLOTS` → the primary serving `slot`.
fn owner_of(slots: &Value, slot: u16) -> Option<(String, u16)> {
    let Value::Array(ranges) = slots else {
        return None;
    };
    ranges.iter().find_map(|range| {
        let Value::Array(fields) = range else {
            return None;
        };
        let (Some(Value::Int(lo)), Some(Value::Int(hi))) = (fields.first(), fields.get(1)) else {
            return None;
        };
        if !(*lo..=*hi).contains(&(slot as i64)) {
            return None;
        }
        let Some(Value::Array(node)) = fields.get(2) else {
            return None;
        };
        let host = match node.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return None,
        };
        match node.get(1) {
            Some(Value::Int(port)) => Some((host, *port as u16)),
            _ => None,
        }
    })
}

/// `CLUSTER SLOTS` → distinct primaries: each range is `[start, end, [ip, port, id],
/// replicas…]`.
fn primaries_of(slots: &Value) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    let Value::Array(ranges) = slots else {
        return out;
    };
    for range in ranges {
        let Value::Array(fields) = range else {
            continue;
        };
        let Some(Value::Array(node)) = fields.get(2) else {
            continue;
        };
        let host = match node.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = node.get(1) else {
            continue;
        };
        let p = (host, *port as u16);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Values from the Redis Cluster specification / CLUSTER KEYSLOT.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_eq!(slot_of("foo{}{bar}"), slot_of("foo{}{bar}"));
        assert_ne!(slot_of("foo{}{bar}"), slot_of("bar"));
        assert_eq!(slot_of("a:v:{k}"), slot_of("a:l:{k}"));
        let keys = ["x:{a}", "y:{b}", "z:{a}"];
        let refs: Vec<&str> = keys.to_vec();
        let groups = group_by_slot(&refs);
        assert_eq!(groups, vec![vec!["x:{a}", "z:{a}"], vec!["y:{b}"]]);
    }

    #[test]
    fn cluster_slots_give_distinct_primaries() {
        let node = |p: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(p),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let slots = Value::Array(vec![
            Value::Array(vec![Value::Int(0), Value::Int(100), node(7000), node(7003)]),
            Value::Array(vec![Value::Int(101), Value::Int(200), node(7001)]),
            Value::Array(vec![Value::Int(201), Value::Int(300), node(7000)]),
        ]);
        assert_eq!(
            primaries_of(&slots),
            vec![("127.0.0.1".into(), 7000), ("127.0.0.1".into(), 7001)]
        );
        assert_eq!(owner_of(&slots, 150), Some(("127.0.0.1".into(), 7001)));
        assert_eq!(owner_of(&slots, 301), None);
    }
}
