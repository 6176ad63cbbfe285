//! Client subcommands of the `satchel` binary, built on [`crate::Client`]:
//! [`args`] defines them, [`run`] executes them, [`output`] prints the result.
//!
//! Exit codes: 0 ok (also when stdout is closed early, e.g. piped into `head`), 1
//! other error from the daemon, 2 invalid input (also clap's usage errors), 3 not
//! found, 4 daemon unreachable (or shutting down, or at its connection limit), 5
//! access denied (FORBIDDEN).

pub mod app;
pub mod args;
pub mod dkim;
pub mod generate;
pub mod output;
pub mod run;

use std::process::ExitCode;

pub use args::{ClientCommand, Global};

use crate::client::{Client, ClientError};
use crate::protocol::ErrorCode;
use run::Outcome;

/// Runs one client subcommand and prints its result.
pub fn main(cmd: ClientCommand, global: Global) -> ExitCode {
    // clap checks this conflict only when both follow `stats`.
    if global.json && matches!(cmd, ClientCommand::Stats { prometheus: true }) {
        output::error("--prometheus and --json cannot be used together");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            output::error(&e.to_string());
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let client = Client::connect(global.client_socket()).await?;
        run::run(cmd, client, global.json).await
    });
    match outcome {
        Ok(Outcome::Value(value)) => {
            output::value(&value, global.json);
            ExitCode::SUCCESS
        }
        Ok(Outcome::Printed) => ExitCode::SUCCESS,
        Ok(Outcome::NotFound(what)) => {
            output::error(&what);
            ExitCode::from(3)
        }
        Err(e) => {
            output::error(&e.to_string());
            ExitCode::from(exit_code(&e))
        }
    }
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
