//! Client subcommands of the `satchel` binary, built on [`crate::Client`].
//!
//! Exit codes: 0 ok, 1 other error from the daemon, 2 invalid input (also clap's
//! usage errors), 3 not found, 4 daemon unreachable.

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

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Check that the daemon answers.
    Ping(Target),
    /// Print the daemon's counters.
    Stats(Target),
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
                (t, r)
            }
            ClientCommand::Stats(t) => {
                let r = with_client(&t, |c| async move { c.stats().await }).await;
                (t, r)
            }
        };
        match outcome {
            Ok(value) => {
                print_value(&value, target.json);
                ExitCode::SUCCESS
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
            _ => 1,
        },
        ClientError::Protocol(_) => 1,
    }
}

fn print_value(v: &Value, json: bool) {
    if json {
        println!("{}", to_json(v));
    } else {
        match v {
            Value::String(s) => println!("{}", s.as_str().unwrap_or("")),
            Value::Map(_) => print_map(v, 0),
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
