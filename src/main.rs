//! The `satchel` binary: wires the command line to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use satchel::cli::{self, Global, output};
use satchel::config::ConfigSource;

#[derive(Parser)]
#[command(
    name = "satchel",
    version,
    about = "Local cache and mail sidecar over a Unix socket"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
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
    Dkim(cli::dkim::DkimCommand),
    /// Client commands (talk to a running daemon).
    #[command(flatten)]
    Client(cli::ClientCommand),
}

fn main() -> ExitCode {
    let Cli { global, command } = Cli::parse();
    let source = |path| ConfigSource {
        path,
        socket: global.socket.clone(),
    };
    match command {
        Command::CheckConfig { config } => match source(config).load() {
            Ok(cfg) => {
                output::line(cfg.to_toml().trim_end());
                ExitCode::SUCCESS
            }
            Err(e) => {
                output::error(&e.to_string());
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => match satchel::daemon::run(source(config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                output::error(&e.to_string());
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Dkim(cmd) => cli::dkim::main(cmd, global.json),
        Command::Client(cmd) => cli::main(cmd, global),
    }
}

/// mimalloc instead of glibc malloc: requests allocate and free many small buffers
/// on one thread, where glibc's malloc/free showed as ~15% of the daemon's profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
