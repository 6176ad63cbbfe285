//! The client subcommands' arguments (clap). What they do is in [`super::run`];
//! how results are printed is in [`super::output`].

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// Options every subcommand takes, before or after its name
/// (`satchel --socket S mail send …` and `satchel mail send … --socket S`).
#[derive(Debug, Args, Clone, Default)]
pub struct Global {
    /// The daemon's socket [env: SATCHEL_SOCKET; default: see protocol.md]. For
    /// `serve` and `check-config`, it replaces `server.socket`.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Global {
    /// The socket a client command talks to: `--socket`, else `SATCHEL_SOCKET`, else
    /// the default rule the daemon uses too.
    pub fn client_socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(crate::Client::default_socket_path)
    }
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Check that the daemon answers.
    Ping,
    /// Print the daemon's counters.
    Stats {
        /// Print the Prometheus text format instead (e.g. for node_exporter's
        /// textfile collector).
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
    },
    /// Read and write cache entries.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Queue mail and inspect the queue.
    #[command(subcommand)]
    Mail(MailCommand),
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Print a cached value (exit 3 on a miss).
    Get { key: String },
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
    },
    /// Delete keys; prints how many existed.
    Del {
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Remove every key carrying a tag and/or starting with a prefix.
    Invalidate {
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long)]
        prefix: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// Recipient (repeatable); "Name <addr>" allowed.
    #[arg(long, required = true)]
    pub to: Vec<String>,
    #[arg(long)]
    pub cc: Vec<String>,
    #[arg(long)]
    pub bcc: Vec<String>,
    #[arg(long)]
    pub from: Option<String>,
    #[arg(long)]
    pub reply_to: Option<String>,
    /// Required unless --template names a stored template.
    #[arg(long, required_unless_present = "template", default_value = "")]
    pub subject: String,
    #[arg(long)]
    pub text: Option<String>,
    #[arg(long)]
    pub html: Option<String>,
    /// Attach a file: PATH, or PATH:content/type (repeatable).
    #[arg(long = "attach")]
    pub attachments: Vec<String>,
    /// An extra header "Name: value" (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Send at this Unix time in milliseconds.
    #[arg(long)]
    pub send_at_ms: Option<u64>,
    /// Render the mail from this stored template (`mail template put`).
    #[arg(long, conflicts_with_all = ["text", "html"])]
    pub template: Option<String>,
    /// The template's variables, as a JSON object.
    #[arg(long, requires = "template")]
    pub vars: Option<String>,
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum MailCommand {
    /// Queue a mail; prints its mail_id.
    Send(SendArgs),
    /// Print a mail's status (exit 3 if unknown).
    Status { mail_id: String },
    /// List dead mail, newest first.
    Dead {
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Queue a dead mail again.
    Retry { mail_id: String },
    /// Cancel a queued, scheduled or retrying mail.
    Cancel { mail_id: String },
    /// The suppression list: addresses that are not mailed (they do not exist).
    #[command(subcommand)]
    Suppression(SuppressionCommand),
    /// Shared mail templates (minijinja), rendered at `mail send --template`.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Print mail events (status transitions), oldest first: those after --since,
    /// else (with --follow) the new ones from now on. Each line ends with the event's
    /// id; pass the last one as --since to resume.
    Events {
        /// Resume after this event id (`0`: from the oldest kept).
        #[arg(long)]
        since: Option<String>,
        /// Keep waiting for new events until interrupted.
        #[arg(long)]
        follow: bool,
        /// Only this mail's events.
        #[arg(long)]
        mail_id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SuppressionCommand {
    /// Print every suppressed address (all pages).
    List,
    /// Stop mailing an address.
    Add {
        address: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Mail an address again (exit 3 if it was not on the list).
    Remove { address: String },
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Store (or replace) a template.
    Put {
        name: String,
        #[arg(long)]
        subject: String,
        #[arg(long, conflicts_with = "text_file")]
        text: Option<String>,
        #[arg(long, conflicts_with = "html_file")]
        html: Option<String>,
        #[arg(long)]
        text_file: Option<String>,
        #[arg(long)]
        html_file: Option<String>,
    },
    /// Print a template.
    Get { name: String },
    /// Delete a template (exit 3 if there was none).
    Delete { name: String },
    /// Print the templates' names.
    List,
}
