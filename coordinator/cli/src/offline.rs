//! The commands that never talk to a coordinator: the CA (`serin ca …`), release-signing keys
//! (`serin keygen`), manifests (`serin release sign|verify`) and bundles (`serin release pack`). `main.rs` runs them before any
//! runtime or connection exists.

use std::time::SystemTime;

use super::args::{Command, OutputFormat, ReleaseCommand};
use super::exit::{CliError, Exit};
use super::{bundle, pki, signing};

/// True for the commands [`run`] handles.
pub fn is_offline(command: &Command) -> bool {
    matches!(
        command,
        Command::Ca(_)
            | Command::Keygen(_)
            | Command::Release(
                ReleaseCommand::Pack(_) | ReleaseCommand::Sign(_) | ReleaseCommand::Verify(_)
            )
    )
}

/// Runs an offline command (the clock is read here, once, and passed down).
pub fn run(output: OutputFormat, command: Command) -> Result<Exit, CliError> {
    let now = SystemTime::now();
    match command {
        Command::Ca(cmd) => pki::run(output, cmd, now),
        Command::Keygen(args) => signing::keygen(output, args),
        Command::Release(ReleaseCommand::Pack(args)) => bundle::run(output, args),
        Command::Release(ReleaseCommand::Sign(args)) => signing::sign(output, args, now),
        Command::Release(ReleaseCommand::Verify(args)) => signing::verify(output, args, now),
        _ => Err(CliError::Other(
            "internal error: not an offline command".to_string(),
        )),
    }
}
