//! The `serin` operator CLI: a pure gRPC client of the coordinator's ControlService.
//!
//! - [`args`]: the command line (clap derive) and the cheap client-side checks of its values;
//! - [`client`]: the connection to the coordinator;
//! - [`commands`]: one function per operator command, plus completions and the man page;
//! - [`render`]: JSON conversions of the wire messages and the text tables and reports;
//! - [`watch`]: the live view of a rollout (`start --wait`, `status --watch`);
//! - [`exit`]: the documented exit codes and the error type that maps onto them;
//! - [`offline`]: the commands that need no coordinator: [`pki`] (`serin ca …`), [`signing`]
//!   (`serin keygen`, `serin release sign|verify`) and [`bundle`] (`serin release pack`);
//! - [`audit`]: the security record: `serin audit` and `serin hosts revoke`;
//! - [`enrol`]: `serin token create`, `serin hosts pending`, `serin hosts approve`;
//! - [`credentials`]: where the CLI finds its operator certificate (flags, environment, per-user
//!   config file).
//!
//! The daemon half of the binary (`serin serve`, `serin check-config`) lives in `main.rs`, which
//! binds the listener and hands it to `serin_coordinator::server::run`.

pub mod args;
pub mod audit;
pub mod bundle;
pub mod client;
pub mod commands;
pub mod credentials;
pub mod enrol;
pub mod exit;
pub mod offline;
pub mod pki;
pub mod render;
pub mod signing;
pub mod watch;

#[cfg(test)]
mod fake_tests;

pub use args::{Cli, Command, OutputFormat};
pub use commands::run_operator;
pub use exit::{CliError, EXIT_CODES_HELP, Exit};
