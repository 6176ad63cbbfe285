//! Client subcommands of the `satchel` binary, built on [`crate::Client`].
//!
//! Exit codes: 0 ok, 1 other error from the daemon, 2 invalid input (also clap's
//! usage errors), 3 not found, 4 daemon unreachable (or shutting down, or at its
//! connection limit), 5 access denied (FORBIDDEN).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use rmpv::Value;

use crate::client::{Client, ClientError};
use crate::protocol::ErrorCode;

#[derive(Debug, Args, Clone)]
pub struct Target {
    /// The daemon's socket.
    #[arg(long, env = "SATCHEL_SOCKET", default_value_os_t = crate::config::default_socket_path())]
    pub socket: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct StatsArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print the Prometheus text format instead (e.g. for node_exporter's textfile
    /// collector).
    #[arg(long, conflicts_with = "json")]
    pub prometheus: bool,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Check that the daemon answers.
    Ping(Target),
    /// Print the daemon's counters.
    Stats(StatsArgs),
    /// Read and write cache entries.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Queue mail and inspect the queue.
    #[command(subcommand)]
    Mail(MailCommand),
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum MailCommand {
    /// Queue a mail; prints its mail_id.
    Send {
        /// Recipient (repeatable); "Name <addr>" allowed.
        #[arg(long, required = true)]
        to: Vec<String>,
        #[arg(long)]
        cc: Vec<String>,
        #[arg(long)]
        bcc: Vec<String>,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        reply_to: Option<String>,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        text: Option<String>,
        #[arg(long)]
        html: Option<String>,
        /// Attach a file: PATH, or PATH:content/type (repeatable).
        #[arg(long = "attach")]
        attachments: Vec<String>,
        /// An extra header "Name: value" (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Send at this Unix time in milliseconds.
        #[arg(long)]
        send_at_ms: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Print a mail's status (exit 3 if unknown).
    Status {
        mail_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// List dead mail, newest first.
    Dead {
        #[arg(long)]
        limit: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Queue a dead mail again.
    Retry {
        mail_id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Cancel a queued, scheduled or retrying mail.
    Cancel {
        mail_id: String,
        #[command(flatten)]
        target: Target,
    },
}

fn invalid_input(message: String) -> ClientError {
    ClientError::Server {
        code: "BAD_REQUEST".into(),
        message,
        retry_after_ms: None,
    }
}

/// Guesses a content type from a file name (for `--attach` without `:type`).
fn content_type_for(path: &str) -> &'static str {
    let ext = path.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

fn read_attachment(spec: &str) -> Result<crate::client::Attachment, ClientError> {
    let (path, content_type) = match spec.rsplit_once(':') {
        Some((p, t)) if t.contains('/') => (p, t.to_owned()),
        _ => (spec, content_type_for(spec).to_owned()),
    };
    let data =
        std::fs::read(path).map_err(|e| invalid_input(format!("cannot read {path}: {e}")))?;
    let filename = std::path::Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_owned());
    Ok(crate::client::Attachment {
        filename,
        content_type,
        data,
    })
}

async fn run_mail(cmd: MailCommand) -> (Target, Result<Outcome, ClientError>) {
    match cmd {
        MailCommand::Send {
            to,
            cc,
            bcc,
            from,
            reply_to,
            subject,
            text,
            html,
            attachments,
            headers,
            idempotency_key,
            send_at_ms,
            target,
        } => {
            let r = async {
                let attachments = attachments
                    .iter()
                    .map(|a| read_attachment(a))
                    .collect::<Result<Vec<_>, _>>()?;
                let headers = headers
                    .iter()
                    .map(|h| {
                        h.split_once(':')
                            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                            .ok_or_else(|| {
                                invalid_input(format!("--header {h:?}: expected \"Name: value\""))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let mail = crate::client::Mail {
                    to,
                    cc,
                    bcc,
                    from,
                    reply_to,
                    subject,
                    text,
                    html,
                    headers,
                    attachments,
                    idempotency_key,
                    send_at_ms,
                };
                let c = Client::connect(&target.socket).await?;
                let q = c.mail_send(&mail).await?;
                Ok(Outcome::Value(Value::Map(vec![
                    (Value::from("mail_id"), Value::from(q.mail_id)),
                    (Value::from("status"), Value::from(q.status)),
                    (Value::from("duplicate"), Value::from(q.duplicate)),
                ])))
            }
            .await;
            (target, r)
        }
        MailCommand::Status { mail_id, target } => {
            let r = with_client(&target, |c| async move { c.mail_status(&mail_id).await }).await;
            (target, r.map(Outcome::Value))
        }
        MailCommand::Dead { limit, target } => {
            let r = with_client(&target, |c| async move {
                c.mail_dead(limit).await.map(Value::Array)
            })
            .await;
            (target, r.map(Outcome::Value))
        }
        MailCommand::Retry { mail_id, target } => {
            let r = with_client(&target, |c| async move {
                c.mail_retry(&mail_id).await.map(Value::from)
            })
            .await;
            (target, r.map(Outcome::Value))
        }
        MailCommand::Cancel { mail_id, target } => {
            let r = with_client(&target, |c| async move {
                c.mail_cancel(&mail_id).await.map(|done| {
                    Value::from(if done {
                        "cancelled"
                    } else {
                        "not cancelled (already sending or finished)"
                    })
                })
            })
            .await;
            (target, r.map(Outcome::Value))
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Print a cached value (exit 3 on a miss).
    Get {
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Store a value: a string, or JSON with --json-value.
    Set {
        key: String,
        value: String,
        /// Parse VALUE as JSON (objects become MessagePack maps, …).
        #[arg(long)]
        json_value: bool,
        #[arg(long)]
        ttl_ms: Option<u64>,
        /// A tag for `cache invalidate --tag` (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete keys; prints how many existed.
    Del {
        #[arg(required = true)]
        keys: Vec<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Remove every key carrying a tag and/or starting with a prefix.
    Invalidate {
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        target: Target,
    },
}

/// What a client command produced.
enum Outcome {
    Value(Value),
    /// Nothing there (a cache miss, an unknown id): exit 3.
    NotFound(String),
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// JSON text → MessagePack value (for `cache set --json-value`).
pub fn from_json(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => n
            .as_u64()
            .map(Value::from)
            .or_else(|| n.as_i64().map(Value::from))
            .unwrap_or_else(|| Value::F64(n.as_f64().unwrap_or(0.0))),
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::Array(a.iter().map(from_json).collect()),
        serde_json::Value::Object(o) => Value::Map(
            o.iter()
                .map(|(k, v)| (Value::from(k.as_str()), from_json(v)))
                .collect(),
        ),
    }
}

async fn run_cache(cmd: CacheCommand) -> (Target, Result<Outcome, ClientError>) {
    match cmd {
        CacheCommand::Get { key, target } => {
            let r = async {
                let c = Client::connect(&target.socket).await?;
                Ok(match c.cache_get(&key).await? {
                    Some(v) => Outcome::Value(v),
                    None => Outcome::NotFound(format!("miss: {key}")),
                })
            }
            .await;
            (target, r)
        }
        CacheCommand::Set {
            key,
            value,
            json_value,
            ttl_ms,
            tags,
            target,
        } => {
            let r = async {
                let value = if json_value {
                    let parsed: serde_json::Value =
                        serde_json::from_str(&value).map_err(|e| ClientError::Server {
                            code: "BAD_REQUEST".into(),
                            message: format!("VALUE is not JSON: {e}"),
                            retry_after_ms: None,
                        })?;
                    from_json(&parsed)
                } else {
                    Value::from(value.as_str())
                };
                let c = Client::connect(&target.socket).await?;
                c.cache_set(&key, value, ttl_ms, &strs(&tags)).await?;
                Ok(Outcome::Value(Value::from("stored")))
            }
            .await;
            (target, r)
        }
        CacheCommand::Del { keys, target } => {
            let r = async {
                let c = Client::connect(&target.socket).await?;
                let n = c.cache_del(&strs(&keys)).await?;
                Ok(Outcome::Value(Value::from(n)))
            }
            .await;
            (target, r)
        }
        CacheCommand::Invalidate {
            tags,
            prefix,
            target,
        } => {
            let r = async {
                let c = Client::connect(&target.socket).await?;
                let n = c.cache_invalidate(&strs(&tags), prefix.as_deref()).await?;
                Ok(Outcome::Value(Value::from(n)))
            }
            .await;
            (target, r)
        }
    }
}

pub fn run(cmd: ClientCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("satchel: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (target, outcome) = match cmd {
            ClientCommand::Ping(t) => {
                let r = with_client(&t, |c| async move {
                    let started = std::time::Instant::now();
                    c.ping().await?;
                    Ok(Value::from(format!(
                        "pong in {} µs",
                        started.elapsed().as_micros()
                    )))
                })
                .await;
                (t, r.map(Outcome::Value))
            }
            ClientCommand::Stats(args) => {
                let t = args.target;
                let r = with_client(&t, |c| async move { c.stats().await }).await;
                let r = if args.prometheus {
                    r.map(|stats| Value::from(prometheus_text(&stats)))
                } else {
                    r
                };
                (t, r.map(Outcome::Value))
            }
            ClientCommand::Cache(cmd) => run_cache(cmd).await,
            ClientCommand::Mail(cmd) => run_mail(cmd).await,
        };
        match outcome {
            Ok(Outcome::Value(value)) => {
                print_value(&value, target.json);
                ExitCode::SUCCESS
            }
            Ok(Outcome::NotFound(what)) => {
                eprintln!("satchel: {what}");
                ExitCode::from(3)
            }
            Err(e) => {
                eprintln!("satchel: {e}");
                ExitCode::from(exit_code(&e))
            }
        }
    })
}

async fn with_client<F, Fut>(t: &Target, f: F) -> Result<Value, ClientError>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<Value, ClientError>>,
{
    let client = Client::connect(&t.socket).await?;
    f(client).await
}

fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Connect { .. } | ClientError::Closed => 4,
        ClientError::Server { .. } => match e.code() {
            Some(ErrorCode::NotFound) => 3,
            Some(ErrorCode::BadRequest | ErrorCode::InvalidMail | ErrorCode::TooLarge) => 2,
            Some(ErrorCode::Unavailable | ErrorCode::ShuttingDown) => 4,
            Some(ErrorCode::Forbidden) => 5,
            _ => 1,
        },
        ClientError::Protocol(_) => 1,
    }
}

/// `stats` leaves that are levels, not running totals. Every other number is a counter
/// and gets the `_total` suffix, as Prometheus names counters.
const GAUGES: &[&str] = &[
    "uptime_ms",
    "connections",
    "inflight",
    "redis_connected",
    "mail_queued",
    "mail_scheduled",
    "mail_sending",
    "mail_retrying",
    "mail_queue_depth",
    "mail_local_sending",
    "mail_delivery_rate",
    "mail_workers",
];

/// The `stats` map in the Prometheus text format: nested keys joined by `_` under the
/// `satchel_` prefix, booleans as 0/1. Strings (the Redis URL) and nil (mail counts
/// while Redis is down) are left out, so a scrape never reports a made-up zero.
pub fn prometheus_text(stats: &Value) -> String {
    let mut leaves = Vec::new();
    flatten(stats, String::new(), &mut leaves);
    let mut out = String::new();
    for (path, value) in leaves {
        let (name, kind) = if GAUGES.contains(&path.as_str()) {
            (format!("satchel_{path}"), "gauge")
        } else if path.ends_with("_total") {
            (format!("satchel_{path}"), "counter")
        } else {
            (format!("satchel_{path}_total"), "counter")
        };
        out.push_str(&format!("# TYPE {name} {kind}\n{name} {value}\n"));
    }
    // `print_value` adds the final newline.
    out.pop();
    out
}

fn flatten(v: &Value, path: String, out: &mut Vec<(String, String)>) {
    let number = match v {
        Value::Map(entries) => {
            for (k, val) in entries {
                let Some(key) = k.as_str() else { continue };
                let key: String = key
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() {
                            c.to_ascii_lowercase()
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let child = if path.is_empty() {
                    key
                } else {
                    format!("{path}_{key}")
                };
                flatten(val, child, out);
            }
            return;
        }
        Value::Boolean(b) => (*b as u8).to_string(),
        Value::Integer(i) => i.to_string(),
        Value::F32(f) => f.to_string(),
        Value::F64(f) => f.to_string(),
        _ => return,
    };
    if !path.is_empty() {
        out.push((path, number));
    }
}

fn print_value(v: &Value, json: bool) {
    if json {
        println!("{}", to_json(v));
    } else {
        match v {
            Value::String(s) => println!("{}", s.as_str().unwrap_or("")),
            Value::Map(_) => print_map(v, 0),
            Value::Array(items) if items.iter().all(Value::is_map) => {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    print_map(item, 0);
                }
            }
            other => println!("{}", to_json(other)),
        }
    }
}

fn print_map(v: &Value, indent: usize) {
    if let Some(entries) = v.as_map() {
        for (k, val) in entries {
            let key = k.as_str().map(str::to_owned).unwrap_or_else(|| to_json(k));
            if val.is_map() {
                println!("{:indent$}{key}:", "");
                print_map(val, indent + 2);
            } else {
                println!("{:indent$}{key}: {}", "", to_json(val));
            }
        }
    }
}

/// MessagePack → JSON text (bin as an array of bytes, non-str keys stringified).
pub fn to_json(v: &Value) -> String {
    match v {
        Value::Nil => "null".into(),
        Value::Boolean(b) => b.to_string(),
        Value::Integer(i) => i.to_string(),
        Value::F32(f) => f.to_string(),
        Value::F64(f) => f.to_string(),
        Value::String(s) => json_str(s.as_str().unwrap_or("")),
        Value::Binary(b) => format!(
            "[{}]",
            b.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
        ),
        Value::Array(a) => format!("[{}]", a.iter().map(to_json).collect::<Vec<_>>().join(",")),
        Value::Map(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| {
                    let key = k.as_str().map(str::to_owned).unwrap_or_else(|| to_json(k));
                    format!("{}:{}", json_str(&key), to_json(v))
                })
                .collect::<Vec<_>>()
                .join(",")
        ),
        Value::Ext(t, d) => format!("{{\"ext\":{t},\"len\":{}}}", d.len()),
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_flattens_types_and_skips_what_is_not_a_number() {
        let stats = Value::Map(vec![
            (Value::from("requests"), Value::from(42)),
            (Value::from("connections_total"), Value::from(3)),
            (Value::from("inflight"), Value::from(1)),
            (
                Value::from("redis"),
                Value::Map(vec![
                    (Value::from("connected"), Value::from(true)),
                    (Value::from("url"), Value::from("redis://x")),
                ]),
            ),
            (
                Value::from("mail"),
                Value::Map(vec![
                    (Value::from("queued"), Value::Nil),
                    (Value::from("delivery_rate"), Value::F64(2.5)),
                    (Value::from("local_sent"), Value::from(7)),
                ]),
            ),
        ]);
        assert_eq!(
            prometheus_text(&stats),
            "# TYPE satchel_requests_total counter\nsatchel_requests_total 42\n\
             # TYPE satchel_connections_total counter\nsatchel_connections_total 3\n\
             # TYPE satchel_inflight gauge\nsatchel_inflight 1\n\
             # TYPE satchel_redis_connected gauge\nsatchel_redis_connected 1\n\
             # TYPE satchel_mail_delivery_rate gauge\nsatchel_mail_delivery_rate 2.5\n\
             # TYPE satchel_mail_local_sent_total counter\nsatchel_mail_local_sent_total 7"
        );
    }
}
