//! DKIM for tests: keys made by `satchel dkim keygen`, and dkimpy (an independent
//! verifier, tests/dkim_verify.py) checking delivered messages against them.

use std::path::Path;
use std::process::{Command, Stdio};

use super::satchel_bin;

/// `satchel --json dkim keygen …`: writes the key, returns (record name, record).
pub fn keygen(domain: &str, selector: &str, algorithm: &str, out: &Path) -> (String, String) {
    let o = Command::new(satchel_bin())
        .args([
            "--json",
            "dkim",
            "keygen",
            "--domain",
            domain,
            "--selector",
            selector,
        ])
        .args(["--algorithm", algorithm, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    (
        v["record_name"].as_str().unwrap().to_owned(),
        v["record"].as_str().unwrap().to_owned(),
    )
}

/// Runs dkimpy over the messages; one result object per message.
pub fn verify(records: &serde_json::Value, messages: &[String]) -> Vec<serde_json::Value> {
    let mut child = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dkim_verify.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = serde_json::json!({"records": records, "messages": messages});
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.to_string().as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "dkim_verify.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}
