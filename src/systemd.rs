//! Everything satchel knows about systemd, and nothing else knows about it:
//! readiness and status notifications, the watchdog, and socket activation.
//! Each call is a no-op when the daemon does not run under systemd.

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1`: the socket accepts connections.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// `STATUS=<line>`: shown by `systemctl status`.
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// `STOPPING=1`: graceful stop has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// `RELOADING=1` with `MONOTONIC_USEC`, as `Type=notify-reload` expects; follow with
/// [`ready`] once the new configuration is in force.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The listening socket passed by systemd socket activation (`LISTEN_FDS`), if any.
/// Only the first passed descriptor is used; it must be a Unix stream socket.
pub fn activated_listener() -> std::io::Result<Option<UnixListener>> {
    let mut fds = sd_notify::listen_fds()?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    // SAFETY: systemd hands this descriptor to us and nobody else in the process owns
    // it; LISTEN_PID was checked to be ours by `listen_fds`.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    if listener.local_addr().is_err() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "LISTEN_FDS passed a descriptor that is not a Unix socket",
        ));
    }
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Sends `WATCHDOG=1` every half interval from a task on the daemon's own runtime:
/// when the event loop is frozen or wedged the pings stop and systemd kills the
/// daemon (`WatchdogSec=` in the unit).
pub async fn run_watchdog(interval: Duration, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(interval / 2);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => send(&[NotifyState::Watchdog]),
        }
    }
}
