//! The `satchel` binary: wires the command line to the library.

use std::process::ExitCode;

use clap::Parser;
use satchel::cli::app::{Cli, Command};
use satchel::cli::{self, output};
use satchel::config::ConfigSource;

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
        Command::Generate(what) => cli::generate::main(what),
        Command::Client(cmd) => cli::main(cmd, global),
    }
}

/// mimalloc instead of glibc malloc: requests allocate and free many small buffers
/// on one thread, where glibc's malloc/free showed as ~15% of the daemon's profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
