//! Redis over TLS (`rediss://`, `redis.tls`, a private CA, mutual TLS) and ACL
//! credentials, against a real redis-server with its TLS port on.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};
use rmpv::Value;
use satchel::protocol::ErrorCode;
use support::near::*;
use support::*;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    // Distinct names: a leaf whose subject equals its issuer looks self-signed to
    // OpenSSL (redis-server then rejects the client certificate as "unknown CA").
    let named = |names: Vec<String>, cn: &str| {
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p
    };
    let mut ca_params = named(Vec::new(), "satchel test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = named(names, cn).signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()], "redis");
    let (client_cert, client_key) = leaf(vec!["satchel-client".into()], "satchel");
    let write = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

/// redis-server with only a TLS port.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    fn start(dir: &Path, pki: &Pki, extra: &[&str]) -> TlsRedis {
        let port = unused_port();
        let s = |p: &Path| p.to_str().unwrap().to_owned();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                &s(&pki.server_cert),
                "--tls-key-file",
                &s(&pki.server_key),
            ])
            .args(["--tls-ca-cert-file", &s(&pki.ca)])
            .args(["--save", "", "--appendonly", "no", "--dir", &s(dir)])
            .args(extra)
            .stdout(std::fs::File::create(dir.join("redis.log")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "redis-server did not open its TLS port: {}",
            std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
        );
        TlsRedis { child, port }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn health_code(d: &Daemon) -> Option<String> {
    let mut s = d.raw();
    use std::io::Write;
    s.write_all(&frame(&request(1, "health", |_| 0))).unwrap();
    let (_, ok, v) = decode(&read_frame(&mut s).unwrap());
    (!ok).then(|| code(&v).to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_serves_the_cache_near_cache_and_mail() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let redis = TlsRedis::start(dir.path(), &pki, &["--tls-auth-clients", "no"]);
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let ca = pki.ca.to_str().unwrap();
    let d = Daemon::start(
        &url,
        &[
            ("SATCHEL_REDIS_TLS_CA_FILE", ca),
            ("SATCHEL_MAIL_ENABLED", "false"),
        ],
    );
    let c = d.client().await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let c = c.clone();
            async move {
                c.cache_set("k", Value::from("over tls"), None, &[])
                    .await
                    .is_ok()
            }
        })
        .await,
        "no cache.set over TLS; log:\n{}",
        d.log_text()
    );
    assert_eq!(
        c.cache_get("k").await.unwrap(),
        Some(Value::from("over tls"))
    );
    // The near-cache's tracking connection is TLS too.
    assert!(
        eventually(Duration::from_secs(10), || {
            let c = c.clone();
            async move {
                let s = c.stats().await.unwrap();
                field(field(field(&s, "cache"), "near"), "tracking").as_bool() == Some(true)
            }
        })
        .await
    );
    for _ in 0..3 {
        c.cache_get("k").await.unwrap();
    }
    let s = c.stats().await.unwrap();
    assert!(
        field(field(field(&s, "cache"), "near"), "hits")
            .as_u64()
            .unwrap()
            >= 1
    );
    let mail = satchel::client::Mail {
        to: vec!["a@example.test".into()],
        subject: "over tls".into(),
        text: Some("t".into()),
        ..Default::default()
    };
    let queued = c.mail_send(&mail).await.unwrap();
    assert_eq!(queued.status, "queued");
    assert_eq!(health_code(&d), None);

    // Without the private CA the system roots do not trust this server.
    let untrusted = Daemon::start(&url, &[("SATCHEL_MAIL_ENABLED", "false")]);
    assert_eq!(health_code(&untrusted).as_deref(), Some("UNAVAILABLE"));
    // redis.tls = true turns a redis:// URL into TLS.
    let plain_url = format!("redis://127.0.0.1:{}", redis.port);
    let by_flag = Daemon::start(
        &plain_url,
        &[
            ("SATCHEL_REDIS_TLS", "true"),
            ("SATCHEL_REDIS_TLS_CA_FILE", ca),
            ("SATCHEL_MAIL_ENABLED", "false"),
        ],
    );
    let cf = by_flag.client().await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let cf = cf.clone();
            async move { cf.cache_get("k").await.ok().flatten() == Some(Value::from("over tls")) }
        })
        .await
    );

    // Coherent over TLS: a write through the other daemon reaches this daemon's
    // near-cache and an app's local cache on it (client tracking) within 500 ms.
    let local = satchel::Client::builder(&d.socket)
        .local_cache_bytes(1 << 20)
        .connect()
        .await
        .unwrap();
    let old = Value::from("over tls");
    read_into_near(&c, "k", &old).await;
    assert_eq!(local.cache_get("k").await.unwrap(), Some(old.clone()));
    let new = Value::from("changed over tls");
    cf.cache_set("k", new.clone(), None, &[]).await.unwrap();
    let limit = Duration::from_millis(500);
    let t = time_until_changed(&c, "k", &old, limit).await;
    assert!(
        t.is_some(),
        "the near-cache kept the old value past {limit:?}"
    );
    eprintln!("tls: another daemon's write reached the near-cache in {t:?}");
    assert!(
        eventually(limit, || {
            let (local, new) = (local.clone(), new.clone());
            async move { local.cache_get("k").await.unwrap() == Some(new) }
        })
        .await,
        "the local cache kept the old value past {limit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_acl_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let redis = TlsRedis::start(
        dir.path(),
        &pki,
        &[
            "--tls-auth-clients",
            "yes",
            "--user",
            "app",
            "on",
            ">s3cret",
            "~*",
            "&*",
            "+@all",
        ],
    );
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let (ca, cert, key) = (
        pki.ca.to_str().unwrap(),
        pki.client_cert.to_str().unwrap(),
        pki.client_key.to_str().unwrap(),
    );
    let base = [
        ("SATCHEL_REDIS_TLS_CA_FILE", ca),
        ("SATCHEL_MAIL_ENABLED", "false"),
    ];
    // No client certificate: refused by the server.
    let no_cert = Daemon::start(&url, &base);
    assert_eq!(health_code(&no_cert).as_deref(), Some("UNAVAILABLE"));
    // A certificate but a wrong password: refused.
    let mut env = base.to_vec();
    env.extend([
        ("SATCHEL_REDIS_TLS_CERT_FILE", cert),
        ("SATCHEL_REDIS_TLS_KEY_FILE", key),
        ("SATCHEL_REDIS_USERNAME", "app"),
    ]);
    let mut wrong = env.clone();
    wrong.push(("SATCHEL_REDIS_PASSWORD", "nope"));
    let wrong = Daemon::start(&url, &wrong);
    assert_ne!(health_code(&wrong), None);
    // Both right: served.
    env.push(("SATCHEL_REDIS_PASSWORD", "s3cret"));
    let good = Daemon::start(&url, &env);
    let c = good.client().await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let c = c.clone();
            async move { c.cache_set("k", Value::from(1), None, &[]).await.is_ok() }
        })
        .await,
        "log:\n{}",
        good.log_text()
    );
    assert_eq!(c.cache_get("k").await.unwrap(), Some(Value::from(1)));
    // The password never shows in check-config's output.
    let out = std::process::Command::new(satchel_bin())
        .arg("check-config")
        .env("SATCHEL_REDIS_PASSWORD", "s3cret")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret"));
    let err = c
        .call("cache.get", vec![("key", Value::from(""))])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
}

#[test]
fn a_half_configured_client_certificate_is_a_config_error_naming_the_key() {
    let out = std::process::Command::new(satchel_bin())
        .arg("check-config")
        .env("SATCHEL_REDIS_TLS_CERT_FILE", "/etc/hostname")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("redis.tls_key_file"), "{text}");
}
