//! The `satchel` command line as a whole: every subcommand, as clap sees it. The
//! binary parses it; `satchel generate` turns it into man pages and completions.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::Global;

#[derive(Parser)]
#[command(
    name = "satchel",
    version,
    about = "Local cache and mail sidecar over a Unix socket"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        /// TOML config file; every key is optional.
        #[arg(long, env = "SATCHEL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a config (file + SATCHEL_* environment) and print the effective one.
    CheckConfig {
        #[arg(long, env = "SATCHEL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// DKIM keys for signing mail (`[[mail.dkim]]`); needs no daemon.
    #[command(subcommand)]
    Dkim(super::dkim::DkimCommand),
    /// Man pages and shell completions, for packaging (hidden).
    #[command(subcommand, hide = true)]
    Generate(super::generate::Generate),
    /// Client commands (talk to a running daemon).
    #[command(flatten)]
    Client(super::ClientCommand),
}
