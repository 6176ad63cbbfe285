//! Binding the Unix socket path: replace a stale file from a crashed run, never steal
//! a path a live daemon answers on, and apply the configured mode and group.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

use super::ServerError;
use crate::config::ServerConfig;

pub(super) fn bind(cfg: &ServerConfig) -> Result<UnixListener, ServerError> {
    let path = cfg.socket.as_path();
    let fail = |message: String| ServerError::Socket {
        path: path.to_owned(),
        message,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| fail(format!("cannot create directory {}: {e}", parent.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(fail(
                        "another process (probably a running satchel) is listening on it; \
                         stop it or choose another server.socket"
                            .into(),
                    ));
                }
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "removing stale socket from an earlier run");
                    std::fs::remove_file(path)
                        .map_err(|e| fail(format!("cannot remove stale socket: {e}")))?;
                }
                Err(e) => return Err(fail(format!("exists and cannot be probed: {e}"))),
            }
        }
        Ok(_) => {
            return Err(fail(
                "exists and is not a socket; refusing to replace it".into(),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(format!("cannot bind: {e}")))?;
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(cfg.socket_mode_bits()),
    )
    .map_err(|e| fail(format!("cannot set mode {}: {e}", cfg.socket_mode)))?;
    if !cfg.socket_group.is_empty() {
        let gid = resolve_group(&cfg.socket_group).ok_or_else(|| {
            fail(format!(
                "server.socket_group: no group named {:?}",
                cfg.socket_group
            ))
        })?;
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| fail(format!("cannot set group {}: {e}", cfg.socket_group)))?;
    }
    Ok(listener)
}

fn resolve_group(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Some(gid);
    }
    nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Removes the socket file on clean exit, unless something else has replaced it
/// meanwhile (same path, other inode).
pub(super) fn remove_if_ours(path: &Path, ino: u64) {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.ino() == ino
    {
        let _ = std::fs::remove_file(path);
    }
}
