//! What Redis' `INFO` says about how safe queued mail is there (issue 14's durability
//! checks). `INFO`, not `CONFIG GET`: managed Redis services block the latter.

use serde::Serialize;

/// `health` → `redis.durability`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Durability {
    /// `maxmemory_policy`, e.g. `noeviction`.
    pub eviction_policy: String,
    /// Whether AOF is on.
    pub aof: bool,
    /// Replicas connected to this server.
    pub replicas: u64,
    /// Why queued mail may be lost here; empty when nothing is known to be wrong.
    pub warnings: Vec<String>,
}

impl Durability {
    /// What holds for two primaries together: the warnings of both, the fewer
    /// replicas, AOF only if both have it, and an evicting policy over `noeviction`.
    pub fn worst(mut self, other: Durability) -> Durability {
        if self.eviction_policy == "noeviction" {
            self.eviction_policy = other.eviction_policy;
        }
        self.aof &= other.aof;
        self.replicas = self.replicas.min(other.replicas);
        self.warnings.extend(other.warnings);
        self
    }

    /// Reads the `INFO` text (sections persistence, memory, replication).
    /// `replicated`: in sentinel (and cluster) mode a server without a replica is a
    /// warning, since a failover would then have nothing to promote.
    pub fn from_info(info: &str, replicated: bool) -> Durability {
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let eviction_policy = field("maxmemory_policy").unwrap_or("unknown").to_owned();
        let aof = field("aof_enabled") == Some("1");
        let replicas = field("connected_slaves")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let mut warnings = Vec::new();
        if eviction_policy != "noeviction" {
            warnings.push(format!(
                "maxmemory-policy is {eviction_policy}: Redis may evict queued mail under memory pressure; set it to noeviction"
            ));
        }
        if !aof {
            // INFO cannot tell whether RDB snapshots are scheduled; without AOF, mail
            // accepted since the last snapshot (if any) is lost when Redis restarts.
            warnings.push(
                "AOF is off (appendonly no): mail accepted since the last RDB snapshot, if any, is lost when Redis restarts; turn on appendonly"
                    .to_owned(),
            );
        }
        if replicated && replicas == 0 {
            warnings.push(
                "the master has no connected replica: a failover has nothing to promote, and mail.min_replicas_ack cannot be met"
                    .to_owned(),
            );
        }
        Durability {
            eviction_policy,
            aof,
            replicas,
            warnings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_and_no_aof_are_warnings_and_a_safe_server_has_none() {
        let risky = Durability::from_info(
            "# Persistence\r\naof_enabled:0\r\n# Memory\r\nmaxmemory_policy:allkeys-lru\r\n# Replication\r\nconnected_slaves:2\r\n",
            true,
        );
        assert_eq!(risky.eviction_policy, "allkeys-lru");
        assert!(!risky.aof);
        assert_eq!(risky.replicas, 2);
        assert_eq!(risky.warnings.len(), 2, "{:?}", risky.warnings);
        let safe = Durability::from_info(
            "aof_enabled:1\nmaxmemory_policy:noeviction\nconnected_slaves:0\n",
            false,
        );
        assert!(safe.warnings.is_empty(), "{:?}", safe.warnings);
        let lonely = Durability::from_info(
            "aof_enabled:1\nmaxmemory_policy:noeviction\nconnected_slaves:0\n",
            true,
        );
        assert_eq!(lonely.warnings.len(), 1, "{:?}", lonely.warnings);
        assert!(lonely.warnings[0].contains("no connected replica"));
    }
}
