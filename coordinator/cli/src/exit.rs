//! Exit codes of the `serin` CLI and the error type every command returns.
//!
//! The codes are part of the interface: a CI job runs `serin rollout start --wait || page-someone`
//! and tells a rolled-back rollout (3) from a timeout (4), a rollout waiting for a human (5), a
//! rejected spec (2) and an unreachable coordinator (1).

use std::fmt;

use serin_proto::wire;
use tonic::Code;

/// How the `serin` process ends. The discriminant is the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The command did what was asked; with `--wait`/`--watch`: the rollout succeeded.
    Success = 0,
    /// Something went wrong: the coordinator could not be reached, a server or I/O error.
    Error = 1,
    /// A bad flag or argument, or the coordinator rejected the request (invalid argument,
    /// not found, failed precondition).
    Usage = 2,
    /// The rollout ended rolled back, aborted or failed.
    RolloutFailed = 3,
    /// `--wait` / `--timeout` ran out before the rollout ended.
    Timeout = 4,
    /// The rollout is paused and waits for an operator (`serin rollout resume|retry|abort`).
    Paused = 5,
}

impl Exit {
    /// The numeric process exit code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The exit code for a rollout observed in `state`, or `None` while it is still moving
    /// (`running`, `waiting`, `rolling_back`, ...).
    pub fn for_rollout_state(state: wire::RolloutState) -> Option<Exit> {
        use wire::RolloutState as S;
        match state {
            S::Succeeded => Some(Exit::Success),
            S::RolledBack | S::Aborted | S::Failed => Some(Exit::RolloutFailed),
            S::Paused => Some(Exit::Paused),
            S::Running | S::Waiting | S::RollingBack | S::Unspecified => None,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// The exit code table, shown at the end of `serin --help` and in the man page.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (with --wait/--watch: the rollout succeeded)
  1  error: the coordinator could not be reached, a server or I/O error
  2  usage error: bad flag or argument, or the coordinator rejected the request
     (invalid argument, not found, failed precondition)
  3  the rollout ended rolled back, aborted or failed
  4  --wait timed out (see --timeout)
  5  the rollout is paused and waits for an operator

Environment:
  SERIN_COORDINATOR  coordinator URL (same as --coordinator)
  NO_COLOR           disable colour in the output";

/// An error of a CLI command, carrying the exit code it maps to.
#[derive(Debug)]
pub enum CliError {
    /// The user's input is wrong (exit 2).
    Usage(String),
    /// The coordinator could not be reached at `addr` (exit 1).
    Unreachable {
        /// The URL that was dialled.
        addr: String,
        /// The cause, with its source chain.
        cause: String,
    },
    /// The coordinator answered with an error status.
    Rpc {
        /// What was being asked, e.g. "start rollout".
        what: String,
        /// The coordinator's status.
        status: tonic::Status,
        /// The coordinator URL.
        addr: String,
    },
    /// Anything else (local I/O, an inconsistent answer) (exit 1).
    Other(String),
}

impl CliError {
    /// Wraps a status returned by an RPC.
    pub fn rpc(what: impl Into<String>, addr: &str, status: tonic::Status) -> Self {
        CliError::Rpc {
            what: what.into(),
            status,
            addr: addr.to_string(),
        }
    }

    /// The process exit code for this error.
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Usage(_) => Exit::Usage,
            CliError::Unreachable { .. } | CliError::Other(_) => Exit::Error,
            CliError::Rpc { status, .. } => match status.code() {
                Code::InvalidArgument
                | Code::NotFound
                | Code::FailedPrecondition
                | Code::AlreadyExists
                | Code::OutOfRange => Exit::Usage,
                _ => Exit::Error,
            },
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(msg) | CliError::Other(msg) => f.write_str(msg),
            CliError::Unreachable { addr, cause } => {
                write!(f, "cannot reach the coordinator at {addr}: {cause}")
            }
            CliError::Rpc { what, status, addr } => match status.code() {
                Code::Unavailable | Code::Unknown if status.message().is_empty() => {
                    write!(f, "cannot {what}: the coordinator at {addr} is unavailable")
                }
                Code::Unavailable => write!(
                    f,
                    "cannot {what}: the coordinator at {addr} is unavailable: {}",
                    status.message()
                ),
                Code::DeadlineExceeded => write!(
                    f,
                    "cannot {what}: the coordinator at {addr} did not answer in time"
                ),
                code => {
                    let msg = status.message();
                    if msg.is_empty() {
                        write!(f, "cannot {what}: {code}")
                    } else {
                        write!(f, "cannot {what}: {msg}")
                    }
                }
            },
        }
    }
}

impl std::error::Error for CliError {}

/// Formats an error with its whole source chain: "outer: inner: innermost".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_states_map_to_documented_codes() {
        use wire::RolloutState as S;
        assert_eq!(Exit::for_rollout_state(S::Succeeded), Some(Exit::Success));
        for s in [S::RolledBack, S::Aborted, S::Failed] {
            assert_eq!(Exit::for_rollout_state(s).map(Exit::code), Some(3), "{s:?}");
        }
        assert_eq!(Exit::for_rollout_state(S::Paused).map(Exit::code), Some(5));
        for s in [S::Running, S::Waiting, S::RollingBack, S::Unspecified] {
            assert_eq!(Exit::for_rollout_state(s), None, "{s:?}");
        }
    }

    #[test]
    fn rejected_requests_are_usage_errors_and_outages_are_errors() {
        let addr = "http://127.0.0.1:7700";
        let rejected = CliError::rpc(
            "start rollout",
            addr,
            tonic::Status::failed_precondition("service web already has an active rollout r-1"),
        );
        assert_eq!(rejected.exit().code(), 2);
        assert!(
            rejected
                .to_string()
                .contains("already has an active rollout")
        );
        let missing = CliError::rpc("get rollout", addr, tonic::Status::not_found("no r-9"));
        assert_eq!(missing.exit().code(), 2);
        let down = CliError::rpc("list hosts", addr, tonic::Status::unavailable(""));
        assert_eq!(down.exit().code(), 1);
        assert!(down.to_string().contains(addr), "{down}");
        let unreachable = CliError::Unreachable {
            addr: addr.into(),
            cause: "connection refused".into(),
        };
        assert_eq!(unreachable.exit().code(), 1);
        assert!(unreachable.to_string().contains(addr));
    }
}
