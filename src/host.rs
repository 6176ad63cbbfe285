//! Facts about the machine the daemon runs on: the wall clock and the host name.
//! One copy of each, so every module agrees.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The kernel's host name, or `localhost` when it cannot be read or is not plain
/// ASCII (it goes into SMTP `EHLO` and consumer names).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.is_ascii())
        .unwrap_or_else(|| "localhost".into())
}
