//! The embedded daemon (issue 17): `examples/embedded.rs` runs satchel inside its own
//! runtime and uses the in-process handle for cache-aside and mail, while serving the
//! socket. This test talks to it both ways: HTTP (the app's in-process calls) and the
//! socket (another process, here the Rust client), and each sees what the other wrote.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rmpv::Value;
use satchel::Client;
use support::*;

struct App {
    child: Child,
    http: u16,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_app(redis: &RedisServer, sink: &SmtpSink) -> App {
    let bin = std::path::Path::new(satchel_bin())
        .parent()
        .unwrap()
        .join("examples/embedded");
    assert!(
        bin.exists(),
        "build it first: cargo build --example embedded ({bin:?})"
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("app.sock");
    let http = free_port();
    let child = Command::new(bin)
        .env("SATCHEL_SERVER_SOCKET", &socket)
        .env("SATCHEL_REDIS_URL", redis.url())
        .env(
            "SATCHEL_MAIL_SMTP_URL",
            format!("smtp://127.0.0.1:{}?tls=none", sink.port),
        )
        .env("EMBEDDED_LISTEN", format!("127.0.0.1:{http}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let app = App {
        child,
        http,
        socket,
        _dir: dir,
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", http)).is_ok() && app.socket.exists()
        }),
        "the embedded app did not come up"
    );
    app
}

async fn http(app: &App, method: reqwest::Method, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .request(method, format!("http://127.0.0.1:{}{path}", app.http))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_embedding_satchel_and_a_socket_client_share_the_cache_and_the_queue() {
    let redis = RedisServer::start();
    let sink = SmtpSink::start();
    let app = start_app(&redis, &sink);
    let get = reqwest::Method::GET;

    // In process: cache-aside loads once, then hits.
    let (status, first) = http(&app, get.clone(), "/exam/7").await;
    assert_eq!(status, 200, "{first}");
    assert!(first.contains("Exam 7: Algebra I final"), "{first}");
    assert_eq!(http(&app, get.clone(), "/exam/7").await.1, first);
    assert_eq!(http(&app, get.clone(), "/loads").await.1.trim(), "1");

    // Over the socket, another process reads the same bytes the app stored in process…
    let c = Client::connect(&app.socket).await.unwrap();
    let over_socket = c.cache_get("exam:7").await.unwrap().expect("a hit");
    assert_eq!(format!("{over_socket}\n"), first);
    // … and what it stores is the app's next hit (no load).
    let eight = Value::Map(vec![
        ("id".into(), 8.into()),
        ("title".into(), "set over the socket".into()),
    ]);
    c.cache_set("exam:8", eight.clone(), Some(60_000), &[])
        .await
        .unwrap();
    assert_eq!(
        http(&app, get.clone(), "/exam/8").await.1,
        format!("{eight}\n")
    );
    assert_eq!(http(&app, get.clone(), "/loads").await.1.trim(), "1");
    // A delete over the socket is the app's next miss.
    c.cache_del(&["exam:7"]).await.unwrap();
    http(&app, get.clone(), "/exam/7").await;
    assert_eq!(http(&app, get.clone(), "/loads").await.1.trim(), "2");

    // Mail queued in process is delivered, and the socket client sees its status.
    let (status, mail_id) = http(&app, reqwest::Method::POST, "/notify?to=ann@example.com").await;
    assert_eq!(status, 200, "{mail_id}");
    let mail_id = mail_id.trim().to_owned();
    assert!(
        eventually(Duration::from_secs(10), || {
            let (c, id) = (c.clone(), mail_id.clone());
            async move {
                c.mail_status(&id)
                    .await
                    .is_ok_and(|s| field(&s, "status").as_str() == Some("sent"))
            }
        })
        .await
    );
    assert_eq!(sink.count(), 1);

    // SIGTERM stops both servers through the app's one token.
    let mut app = app;
    signal(app.child.id(), nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            app.child.try_wait(),
            Ok(Some(_))
        )),
        "the app did not stop"
    );
    assert!(app.child.wait().unwrap().success());
}
