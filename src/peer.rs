//! Who is on the other end of a connection: the peer's uid and gid from
//! `SO_PEERCRED`, read once at accept. Access decisions (`server.allow_uids`,
//! `allow_gids`) and per-uid key spaces (`cache.isolate_by_uid`,
//! `mail.isolate_by_uid`) are made from it; nothing else in the daemon looks at
//! credentials.

use tokio::net::UnixStream;

use crate::config::ServerConfig;
use crate::protocol::{ErrorCode, OpError};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Peer {
    pub fn of(stream: &UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(cred) => Peer {
                uid: Some(cred.uid()),
                gid: Some(cred.gid()),
            },
            Err(_) => Peer::default(),
        }
    }

    /// The peer of an in-process caller (an embedding app): the daemon's own
    /// credentials.
    pub fn this_process() -> Peer {
        Peer {
            uid: Some(nix::unistd::getuid().as_raw()),
            gid: Some(nix::unistd::getgid().as_raw()),
        }
    }

    /// The `FORBIDDEN` refusal for a peer outside `allow_uids` / `allow_gids`, or
    /// None when it may talk to the daemon.
    pub fn refusal(&self, cfg: &ServerConfig) -> Option<OpError> {
        if cfg.allow_uids.is_empty() && cfg.allow_gids.is_empty() {
            return None;
        }
        let (Some(uid), Some(gid)) = (self.uid, self.gid) else {
            return Some(OpError::new(
                ErrorCode::Forbidden,
                "cannot read the peer's credentials",
            ));
        };
        if cfg.allow_uids.contains(&uid) || cfg.allow_gids.contains(&gid) {
            None
        } else {
            Some(OpError::new(
                ErrorCode::Forbidden,
                format!("uid {uid} / gid {gid} is not in allow_uids or allow_gids"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_admit_by_uid_or_gid_and_refuse_unknown_credentials() {
        let mut cfg = ServerConfig::default();
        let p = Peer {
            uid: Some(1000),
            gid: Some(100),
        };
        assert!(p.refusal(&cfg).is_none(), "empty lists admit everyone");
        cfg.allow_uids = vec![1000];
        assert!(p.refusal(&cfg).is_none());
        cfg.allow_uids = vec![1];
        cfg.allow_gids = vec![100];
        assert!(p.refusal(&cfg).is_none());
        cfg.allow_gids = vec![1];
        assert_eq!(p.refusal(&cfg).map(|e| e.code), Some(ErrorCode::Forbidden));
        assert!(Peer::default().refusal(&cfg).is_some());
    }
}
