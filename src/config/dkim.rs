//! `[[mail.dkim]]`: the keys that sign outgoing mail. Each key file is read and
//! parsed when the config is loaded (at start and at every reload), so a missing,
//! unreadable or wrong key is a config error that names the file, never a mail that
//! fails later.
//!
//! Accepted key files: RSA in PKCS#8 PEM (`BEGIN PRIVATE KEY`, openssl's default
//! output) or PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`); ed25519 in PKCS#8 PEM, or the raw
//! 32-byte seed (as bytes, or base64 on one line, as lettre and some tools write it).

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

/// `algorithm` of a `[[mail.dkim]]` entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DkimAlgorithm {
    #[default]
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

impl DkimAlgorithm {
    /// The `a=` tag value.
    pub fn as_str(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 => "rsa-sha256",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }
}

impl std::str::FromStr for DkimAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rsa-sha256" | "rsa" => Ok(DkimAlgorithm::RsaSha256),
            "ed25519-sha256" | "ed25519" => Ok(DkimAlgorithm::Ed25519Sha256),
            other => Err(format!(
                "{other:?} is not a DKIM algorithm (rsa-sha256 or ed25519-sha256)"
            )),
        }
    }
}

/// One `[[mail.dkim]]` entry: mail whose `From` domain is `domain` is signed with
/// `key_file` under `selector`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimEntry {
    pub domain: String,
    pub selector: String,
    pub key_file: String,
    #[serde(default)]
    pub algorithm: DkimAlgorithm,
    /// The key read from `key_file` when the config was loaded.
    #[serde(skip)]
    pub key: Option<Arc<DkimKey>>,
}

impl DkimEntry {
    /// Reads and parses `key_file` into `key`; the error names the file.
    pub fn read_key(&mut self) -> Result<(), String> {
        let key = DkimKey::read(Path::new(&self.key_file), self.algorithm)
            .map_err(|e| format!("{}: {e}", self.key_file))?;
        self.key = Some(Arc::new(key));
        Ok(())
    }

    /// Checks the names: a domain and a selector that can stand in a DNS name and a
    /// DKIM tag.
    pub fn validate(&self) -> Result<(), String> {
        for (what, value) in [("domain", &self.domain), ("selector", &self.selector)] {
            let ok = !value.is_empty()
                && value.len() <= 253
                && value.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !ok {
                return Err(format!("{what} {value:?} is not a DNS name"));
            }
        }
        if self.key_file.is_empty() {
            return Err("key_file is required".into());
        }
        Ok(())
    }
}

/// A private key that signs mail.
pub enum DkimKey {
    Rsa(rsa::RsaPrivateKey),
    Ed25519(ed25519_dalek::SigningKey),
}

impl std::fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself: configs are logged and printed.
        write!(f, "DkimKey({})", self.algorithm().as_str())
    }
}

/// Two keys are the same key when their public halves are (a reload that reads an
/// unchanged file compares equal).
impl PartialEq for DkimKey {
    fn eq(&self, other: &Self) -> bool {
        self.public_key_der() == other.public_key_der()
    }
}

impl DkimKey {
    pub fn read(path: &Path, algorithm: DkimAlgorithm) -> Result<DkimKey, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        DkimKey::parse(&bytes, algorithm)
    }

    /// Parses a key file's contents as a key for `algorithm`.
    pub fn parse(bytes: &[u8], algorithm: DkimAlgorithm) -> Result<DkimKey, String> {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        use rsa::pkcs8::DecodePrivateKey;
        let text = std::str::from_utf8(bytes).ok().map(str::trim);
        match algorithm {
            DkimAlgorithm::RsaSha256 => {
                let text = text.ok_or("not a PEM file")?;
                let key = if text.contains("BEGIN RSA PRIVATE KEY") {
                    rsa::RsaPrivateKey::from_pkcs1_pem(text).map_err(|e| e.to_string())?
                } else if text.contains("BEGIN PRIVATE KEY") {
                    rsa::RsaPrivateKey::from_pkcs8_pem(text).map_err(|_| {
                        "not an RSA private key (algorithm = \"rsa-sha256\"; an ed25519 key needs algorithm = \"ed25519-sha256\")".to_string()
                    })?
                } else {
                    return Err(
                        "not an RSA private key in PEM (BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY)".into(),
                    );
                };
                let bits = rsa::traits::PublicKeyParts::size(&key) * 8;
                if bits < 1024 {
                    return Err(format!(
                        "an RSA key of {bits} bits is too short: verifiers ignore keys under 1024 bits (use 2048)"
                    ));
                }
                Ok(DkimKey::Rsa(key))
            }
            DkimAlgorithm::Ed25519Sha256 => {
                if let Some(text) = text.filter(|t| t.contains("BEGIN PRIVATE KEY")) {
                    return ed25519_dalek::SigningKey::from_pkcs8_pem(text)
                        .map(DkimKey::Ed25519)
                        .map_err(|_| {
                            "not an ed25519 private key (algorithm = \"ed25519-sha256\"; an RSA key needs algorithm = \"rsa-sha256\")".to_string()
                        });
                }
                let seed: Vec<u8> = match text {
                    _ if bytes.len() == 32 => bytes.to_vec(),
                    Some(t) => BASE64.decode(t).map_err(|_| {
                        "not an ed25519 key: expected PKCS#8 PEM, or a 32-byte seed raw or in base64"
                            .to_string()
                    })?,
                    None => return Err("not an ed25519 key".into()),
                };
                let seed: [u8; 32] = seed
                    .try_into()
                    .map_err(|_| "an ed25519 seed is 32 bytes".to_string())?;
                Ok(DkimKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(
                    &seed,
                )))
            }
        }
    }

    /// A new random key: RSA 2048 bits, or ed25519.
    pub fn generate(algorithm: DkimAlgorithm) -> Result<DkimKey, String> {
        let mut rng = rand_core::OsRng;
        Ok(match algorithm {
            DkimAlgorithm::RsaSha256 => {
                DkimKey::Rsa(rsa::RsaPrivateKey::new(&mut rng, 2048).map_err(|e| e.to_string())?)
            }
            DkimAlgorithm::Ed25519Sha256 => {
                DkimKey::Ed25519(ed25519_dalek::SigningKey::generate(&mut rng))
            }
        })
    }

    pub fn algorithm(&self) -> DkimAlgorithm {
        match self {
            DkimKey::Rsa(_) => DkimAlgorithm::RsaSha256,
            DkimKey::Ed25519(_) => DkimAlgorithm::Ed25519Sha256,
        }
    }

    /// The key as PKCS#8 PEM (what `satchel dkim keygen` writes).
    pub fn to_pem(&self) -> Result<String, String> {
        use rsa::pkcs8::EncodePrivateKey;
        let pem = match self {
            DkimKey::Rsa(k) => k.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF),
            DkimKey::Ed25519(k) => k.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF),
        };
        pem.map(|p| p.to_string()).map_err(|e| e.to_string())
    }

    /// The public key as the DNS record's `p=` carries it: an RSA
    /// SubjectPublicKeyInfo (as `openssl rsa -pubout` and opendkim-genkey publish
    /// it), or the raw 32 ed25519 bytes (RFC 8463).
    pub fn public_key_der(&self) -> Vec<u8> {
        use rsa::pkcs8::EncodePublicKey;
        match self {
            DkimKey::Rsa(k) => k
                .to_public_key()
                .to_public_key_der()
                .map(|d| d.as_bytes().to_vec())
                .unwrap_or_default(),
            DkimKey::Ed25519(k) => k.verifying_key().to_bytes().to_vec(),
        }
    }

    /// The TXT record to publish at `<selector>._domainkey.<domain>`.
    pub fn dns_record(&self) -> String {
        let k = match self {
            DkimKey::Rsa(_) => "rsa",
            DkimKey::Ed25519(_) => "ed25519",
        };
        format!("v=DKIM1; k={k}; p={}", BASE64.encode(self.public_key_der()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pem_and_a_wrong_algorithm_is_named() {
        for alg in [DkimAlgorithm::Ed25519Sha256, DkimAlgorithm::RsaSha256] {
            let key = DkimKey::generate(alg).unwrap();
            let pem = key.to_pem().unwrap();
            let back = DkimKey::parse(pem.as_bytes(), alg).unwrap();
            assert_eq!(back, key);
            assert!(key.dns_record().starts_with("v=DKIM1; k="));
            let other = match alg {
                DkimAlgorithm::RsaSha256 => DkimAlgorithm::Ed25519Sha256,
                DkimAlgorithm::Ed25519Sha256 => DkimAlgorithm::RsaSha256,
            };
            let e = DkimKey::parse(pem.as_bytes(), other).unwrap_err();
            assert!(e.contains("needs algorithm"), "{e}");
        }
    }

    #[test]
    fn rsa_keys_in_pkcs1_and_ed25519_seeds_in_base64_are_accepted() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        let DkimKey::Rsa(rsa) = DkimKey::generate(DkimAlgorithm::RsaSha256).unwrap() else {
            unreachable!()
        };
        let pkcs1 = rsa.to_pkcs1_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        assert!(pkcs1.contains("BEGIN RSA PRIVATE KEY"));
        DkimKey::parse(pkcs1.as_bytes(), DkimAlgorithm::RsaSha256).unwrap();
        let seed = BASE64.encode([7u8; 32]);
        DkimKey::parse(seed.as_bytes(), DkimAlgorithm::Ed25519Sha256).unwrap();
        DkimKey::parse(&[7u8; 32], DkimAlgorithm::Ed25519Sha256).unwrap();
        assert!(DkimKey::parse(b"garbage", DkimAlgorithm::RsaSha256).is_err());
        assert!(DkimKey::parse(b"garbage", DkimAlgorithm::Ed25519Sha256).is_err());
    }
}
