//! `satchel generate` (hidden): the man pages and shell completions the Debian
//! package ships, made from the command line's own definition (clap_mangen,
//! clap_complete), so they can never disagree with it. As ripgrep's `--generate`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Subcommand};
use clap_complete::Shell;

use super::app::Cli;
use super::output;

#[derive(Debug, Subcommand)]
pub enum Generate {
    /// Write satchel.1 and a satchel-<subcommand>.1 for every subcommand into DIR.
    Man { dir: PathBuf },
    /// Write the completions for bash, zsh and fish into DIR.
    Completions { dir: PathBuf },
}

pub fn main(what: Generate) -> ExitCode {
    let done = match what {
        Generate::Man { dir } => man_pages(&dir),
        Generate::Completions { dir } => completions(&dir),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::error(&e);
            ExitCode::FAILURE
        }
    }
}

fn man_pages(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    write_pages(dir, &cmd, "satchel")
}

/// One page for `cmd` (named `name`), then one per visible subcommand, recursively.
fn write_pages(dir: &Path, cmd: &clap::Command, name: &str) -> Result<(), String> {
    let page = cmd.clone().name(name.to_owned());
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(|e| e.to_string())?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_pages(dir, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(())
}

fn completions(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "satchel", dir)
            .map_err(|e| format!("{shell}: {e}"))?;
    }
    Ok(())
}
