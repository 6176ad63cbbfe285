//! Running a client subcommand against the daemon: build the request, call it
//! through [`crate::Client`], and say what happened as an [`Outcome`].

use rmpv::Value;

use super::args::{
    CacheCommand, ClientCommand, MailCommand, SendArgs, SuppressionCommand, TemplateCommand,
};
use super::output::from_json;
use crate::client::{Client, ClientError};

/// What a client command produced.
pub enum Outcome {
    Value(Value),
    /// It printed as it went (`mail events`).
    Printed,
    /// Nothing there (a cache miss, an unknown id): exit 3.
    NotFound(String),
}

pub async fn run(cmd: ClientCommand, client: Client, json: bool) -> Result<Outcome, ClientError> {
    match cmd {
        ClientCommand::Ping => {
            let started = std::time::Instant::now();
            client.ping().await?;
            Ok(Outcome::Value(Value::from(format!(
                "pong in {} µs",
                started.elapsed().as_micros()
            ))))
        }
        ClientCommand::Stats { prometheus: false } => Ok(Outcome::Value(client.stats().await?)),
        ClientCommand::Stats { prometheus: true } => {
            // The daemon renders it from the same samples as `stats`.
            let text = client
                .call("stats", vec![("format", Value::from("prometheus"))])
                .await?;
            let text = text.as_str().unwrap_or("").trim_end().to_owned();
            Ok(Outcome::Value(Value::from(text)))
        }
        ClientCommand::Cache(cmd) => cache(cmd, client).await,
        ClientCommand::Mail(cmd) => mail(cmd, client, json).await,
    }
}

fn invalid_input(message: String) -> ClientError {
    ClientError::Server {
        code: "BAD_REQUEST".into(),
        message,
        retry_after_ms: None,
        field: None,
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

async fn cache(cmd: CacheCommand, c: Client) -> Result<Outcome, ClientError> {
    Ok(match cmd {
        CacheCommand::Get { key } => match c.cache_get(&key).await? {
            Some(v) => Outcome::Value(v),
            None => Outcome::NotFound(format!("miss: {key}")),
        },
        CacheCommand::Set {
            key,
            value,
            json_value,
            ttl_ms,
            tags,
        } => {
            let value = if json_value {
                let parsed: serde_json::Value = serde_json::from_str(&value)
                    .map_err(|e| invalid_input(format!("VALUE is not JSON: {e}")))?;
                from_json(&parsed)
            } else {
                Value::from(value.as_str())
            };
            c.cache_set(&key, value, ttl_ms, &strs(&tags)).await?;
            Outcome::Value(Value::from("stored"))
        }
        CacheCommand::Del { keys } => Outcome::Value(Value::from(c.cache_del(&strs(&keys)).await?)),
        CacheCommand::Invalidate { tags, prefix } => Outcome::Value(Value::from(
            c.cache_invalidate(&strs(&tags), prefix.as_deref()).await?,
        )),
    })
}

async fn mail(cmd: MailCommand, c: Client, json: bool) -> Result<Outcome, ClientError> {
    Ok(Outcome::Value(match cmd {
        MailCommand::Events {
            since,
            follow,
            mail_id,
        } => return events(&c, since, follow, mail_id, json).await,
        MailCommand::Suppression(cmd) => return suppression(&c, cmd).await,
        MailCommand::Template(cmd) => return template(&c, cmd).await,
        MailCommand::Send(args) => {
            let q = c.mail_send(&mail_of(args)?).await?;
            let mut out = vec![
                (Value::from("mail_id"), Value::from(q.mail_id)),
                (Value::from("status"), Value::from(q.status)),
                (Value::from("duplicate"), Value::from(q.duplicate)),
            ];
            if !q.suppressed.is_empty() {
                let list = q.suppressed.into_iter().map(Value::from).collect();
                out.push((Value::from("suppressed"), Value::Array(list)));
            }
            Value::Map(out)
        }
        MailCommand::Status { mail_id } => c.mail_status(&mail_id).await?,
        MailCommand::Dead { limit } => Value::Array(c.mail_dead(limit).await?),
        MailCommand::Retry { mail_id } => Value::from(c.mail_retry(&mail_id).await?),
        MailCommand::Cancel { mail_id } => Value::from(if c.mail_cancel(&mail_id).await? {
            "cancelled"
        } else {
            "not cancelled (already sending or finished)"
        }),
    }))
}

async fn template(c: &Client, cmd: TemplateCommand) -> Result<Outcome, ClientError> {
    let read = |path: Option<String>| -> Result<Option<String>, ClientError> {
        path.map(|p| std::fs::read_to_string(&p).map_err(|e| invalid_input(format!("{p}: {e}"))))
            .transpose()
    };
    Ok(match cmd {
        TemplateCommand::Put {
            name,
            subject,
            text,
            html,
            text_file,
            html_file,
        } => {
            let text = text.or(read(text_file)?);
            let html = html.or(read(html_file)?);
            c.mail_template_put(&name, &subject, text.as_deref(), html.as_deref())
                .await?;
            Outcome::Value(Value::from(format!("stored {name}")))
        }
        TemplateCommand::Get { name } => Outcome::Value(c.mail_template_get(&name).await?),
        TemplateCommand::Delete { name } => {
            if c.mail_template_delete(&name).await? {
                Outcome::Value(Value::from(format!("deleted {name}")))
            } else {
                Outcome::NotFound(format!("no template named {name}"))
            }
        }
        TemplateCommand::List => Outcome::Value(Value::Array(
            c.mail_template_list()
                .await?
                .into_iter()
                .map(Value::from)
                .collect(),
        )),
    })
}

async fn suppression(c: &Client, cmd: SuppressionCommand) -> Result<Outcome, ClientError> {
    Ok(match cmd {
        SuppressionCommand::List => {
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let (page, next) = c
                    .mail_suppression_list(Some(1000), cursor.as_deref())
                    .await?;
                all.extend(page);
                match next {
                    Some(n) => cursor = Some(n),
                    None => break,
                }
            }
            Outcome::Value(Value::Array(all))
        }
        SuppressionCommand::Add { address, reason } => {
            c.mail_suppression_add(&address, reason.as_deref()).await?;
            Outcome::Value(Value::from(format!("suppressed {address}")))
        }
        SuppressionCommand::Remove { address } => {
            if c.mail_suppression_remove(&address).await? {
                Outcome::Value(Value::from(format!("removed {address}")))
            } else {
                Outcome::NotFound(format!("{address} was not on the suppression list"))
            }
        }
    })
}

/// `mail events`: one poll, or (`--follow`) long polls until interrupted; each event
/// printed as it comes (a JSON object per line with `--json`).
async fn events(
    c: &Client,
    since: Option<String>,
    follow: bool,
    mail_id: Option<String>,
    json: bool,
) -> Result<Outcome, ClientError> {
    // Without --follow and --since there is nothing "new from now" to print yet.
    let mut cursor = match (&since, follow) {
        (None, false) => Some("0".to_owned()),
        _ => since,
    };
    loop {
        let wait = follow.then_some(30_000);
        let (events, next) = c
            .mail_events(cursor.as_deref(), Some(1000), wait, mail_id.as_deref())
            .await?;
        for e in &events {
            if json {
                super::output::line(&super::output::to_json(e).to_string());
            } else {
                super::output::line(&event_line(e));
            }
        }
        cursor = Some(next);
        if !follow && events.is_empty() {
            return Ok(Outcome::Printed);
        }
    }
}

/// `<at> <status> <mail_id> attempts=<n> [class=…] [error=…] <event_id>`.
fn event_line(e: &Value) -> String {
    let f = |k: &str| crate::client::get(e, k);
    let s = |k: &str| f(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let mut out = format!(
        "{} {:<10} {} attempts={}",
        f("at_ms").and_then(Value::as_u64).unwrap_or(0),
        s("status"),
        s("mail_id"),
        f("attempts").and_then(Value::as_u64).unwrap_or(0)
    );
    for k in ["class", "error"] {
        let v = s(k);
        if !v.is_empty() {
            out.push_str(&format!(" {k}={v:?}"));
        }
    }
    out.push(' ');
    out.push_str(&s("event_id"));
    out
}

/// The arguments of `mail send` as a [`crate::client::Mail`], reading attachments.
fn mail_of(a: SendArgs) -> Result<crate::client::Mail, ClientError> {
    let attachments = a
        .attachments
        .iter()
        .map(|spec| read_attachment(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let headers = a
        .headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| invalid_input(format!("--header {h:?}: expected \"Name: value\"")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::client::Mail {
        to: a.to,
        cc: a.cc,
        bcc: a.bcc,
        from: a.from,
        reply_to: a.reply_to,
        subject: a.subject,
        text: a.text,
        html: a.html,
        headers,
        attachments,
        idempotency_key: a.idempotency_key,
        send_at_ms: a.send_at_ms,
        vars: match &a.vars {
            None => None,
            Some(json) => {
                let parsed: serde_json::Value = serde_json::from_str(json)
                    .map_err(|e| invalid_input(format!("--vars is not JSON: {e}")))?;
                Some(from_json(&parsed))
            }
        },
        template: a.template,
    })
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
