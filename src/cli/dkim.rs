//! `satchel dkim keygen`: a new signing key and the DNS record to publish. Local:
//! it needs no daemon.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::output;
use crate::config::{DkimAlgorithm, DkimKey};

#[derive(Debug, Subcommand)]
pub enum DkimCommand {
    /// Write a new private key (PKCS#8 PEM, mode 0600) and print the DNS TXT record
    /// and the `[[mail.dkim]]` entry that use it.
    Keygen {
        /// The signing domain: the `From` domain of the mail to sign.
        #[arg(long)]
        domain: String,
        /// The selector: the record goes at `<selector>._domainkey.<domain>`.
        #[arg(long)]
        selector: String,
        /// rsa-sha256 (2048 bits; every verifier knows it) or ed25519-sha256.
        #[arg(long, default_value = "rsa-sha256")]
        algorithm: DkimAlgorithm,
        /// Where to write the key; an existing file is not overwritten.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The record's value as zone-file strings: TXT strings hold at most 255 bytes.
fn txt_strings(record: &str) -> String {
    record
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn main(cmd: DkimCommand, json: bool) -> ExitCode {
    let DkimCommand::Keygen {
        domain,
        selector,
        algorithm,
        out,
    } = cmd;
    let entry = crate::config::DkimEntry {
        domain: domain.clone(),
        selector: selector.clone(),
        key_file: out.display().to_string(),
        algorithm,
        key: None,
    };
    if let Err(e) = entry.validate() {
        output::error(&e);
        return ExitCode::from(2);
    }
    let written = DkimKey::generate(algorithm).and_then(|key| {
        let pem = key.to_pem()?;
        let mut file = std::fs::OpenOptions::new();
        file.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
        file.open(&out)
            .and_then(|mut f| f.write_all(pem.as_bytes()))
            .map_err(|e| format!("{}: {e}", out.display()))?;
        Ok(key)
    });
    let key = match written {
        Ok(key) => key,
        Err(e) => {
            output::error(&e);
            return ExitCode::FAILURE;
        }
    };
    let name = format!("{selector}._domainkey.{domain}");
    let record = key.dns_record();
    if json {
        output::line(
            &serde_json::json!({
                "key_file": out.display().to_string(),
                "algorithm": algorithm.as_str(),
                "record_name": name,
                "record": record,
            })
            .to_string(),
        );
    } else {
        output::line(&format!(
            "wrote {} ({} private key; readable by the satchel user only)\n\n\
             publish this DNS record:\n{name}. IN TXT {}\n\n\
             and add to the config:\n[[mail.dkim]]\ndomain = {:?}\nselector = {:?}\nkey_file = {:?}\nalgorithm = {:?}",
            out.display(),
            algorithm.as_str(),
            txt_strings(&record),
            domain,
            selector,
            out.display().to_string(),
            algorithm.as_str(),
        ));
    }
    ExitCode::SUCCESS
}
