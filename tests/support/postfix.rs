//! A private Postfix (Debian's package) for tests: its own config directory, queue
//! and maillog in a temporary directory, listening on a free port of 127.0.0.1 only,
//! with STARTTLS offered on a self-signed certificate (as a stock install's
//! "snakeoil") and virtual maildir delivery for the domain `example.test`, whose one
//! mailbox is `ann@example.test` (anyone else: `550 5.1.1 … User unknown`). Nothing
//! of the system's Postfix is used or touched; it needs root, as Postfix does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{free_port, wait_until};

pub struct Postfix {
    pub port: u16,
    dir: tempfile::TempDir,
}

/// The services the instance runs: Debian's master.cf, unchrooted, trimmed to what
/// receiving and local (virtual) delivery need.
const MASTER_CF: &str = "\
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
tlsmgr    unix  - - n 1000 1 tlsmgr
pickup    unix  n - n 60 1 pickup
showq     unix  n - n - - showq
";

fn id(flag: &str, name: &str) -> String {
    let o = Command::new("id").args([flag, name]).output().expect("id");
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

impl Postfix {
    pub fn start() -> Postfix {
        assert!(
            Path::new("/usr/sbin/postfix").exists() && nix::unistd::geteuid().is_root(),
            "this test needs Debian's postfix package and root: apt-get install postfix (.ci/run does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // The postfix user walks this tree (it is 0700 as made).
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for sub in ["conf", "queue", "data", "mail"] {
            std::fs::create_dir(d.join(sub)).unwrap();
        }
        let (uid, gid) = (id("-u", "postfix"), id("-g", "postfix"));
        for owned in ["data", "mail"] {
            let st = Command::new("chown")
                .arg(format!("{uid}:{gid}"))
                .arg(d.join(owned))
                .status()
                .unwrap();
            assert!(st.success());
        }
        let cert =
            rcgen::generate_simple_self_signed(vec!["relay.example.test".to_owned()]).unwrap();
        std::fs::write(d.join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(d.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
        let port = free_port();
        let p = d.display();
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {p}/queue
data_directory = {p}/data
mail_owner = postfix
setgid_group = postdrop
inet_protocols = ipv4
myhostname = relay.example.test
mydestination =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
virtual_mailbox_domains = example.test
virtual_mailbox_base = {p}/mail
virtual_mailbox_maps = texthash:{p}/conf/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
smtpd_tls_cert_file = {p}/cert.pem
smtpd_tls_key_file = {p}/key.pem
smtpd_tls_security_level = may
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
maillog_file_prefixes = {p}
maillog_file = {p}/maillog
"
        );
        std::fs::write(d.join("conf/main.cf"), main_cf).unwrap();
        std::fs::write(
            d.join("conf/master.cf"),
            format!("127.0.0.1:{port} inet n - n - - smtpd\n{MASTER_CF}"),
        )
        .unwrap();
        std::fs::write(
            d.join("conf/vmailbox"),
            "ann@example.test example.test/ann/\n",
        )
        .unwrap();
        let pf = Postfix { port, dir };
        let out = pf.postfix("start");
        assert!(
            wait_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "postfix did not listen on {port}: {out}\n{}",
            pf.log()
        );
        pf
    }

    fn postfix(&self, what: &str) -> String {
        let o = Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(self.dir.path().join("conf"))
            .arg(what)
            .output()
            .expect("run postfix");
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Its maillog.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// The messages delivered to `ann@example.test`, as stored (Postfix's
    /// `Return-Path`, `Delivered-To` and `Received` in front).
    pub fn mailbox(&self) -> Vec<String> {
        let new: PathBuf = self.dir.path().join("mail/example.test/ann/new");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&new)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .collect()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let pid_file = self.dir.path().join("queue/pid/master.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        self.postfix("stop");
        if let Some(pid) = pid {
            let alive = || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
            if !wait_until(Duration::from_secs(5), || !alive()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
