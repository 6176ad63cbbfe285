//! The `satchel` binary: wires the command line to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "satchel",
    version,
    about = "Local cache and mail sidecar over a Unix socket"
)]
struct Cli {
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
    /// Client commands (talk to a running daemon).
    #[command(flatten)]
    Client(satchel::cli::ClientCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match satchel::Config::load(config.as_deref()) {
            Ok(cfg) => {
                print!("{}", cfg.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("satchel: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config } => match satchel::daemon::run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("satchel: {e}");
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Client(cmd) => satchel::cli::run(cmd),
    }
}

/// mimalloc instead of glibc malloc: requests allocate and free many small buffers
/// on one thread, where glibc's malloc/free showed as ~15% of the daemon's profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
