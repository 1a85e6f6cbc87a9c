//! Process limits the coordinator depends on: one open file per connected agent.
//!
//! Under systemd the default soft `RLIMIT_NOFILE` is 1,024, which would stop the coordinator at
//! about a thousand agents although the hard limit is far higher. [`raise_nofile_limit`] lifts the
//! soft limit to the hard one at start (the unit also sets `LimitNOFILE=`), and
//! [`connection_cap`] derives how many connections the accept loop admits as full agent streams
//! while keeping descriptors in reserve for operators, the store and artifact files.

/// The open-files limit after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// Soft limit now in force.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
    /// The soft limit before it was raised, when it was.
    pub raised_from: Option<u64>,
}

/// The limit could not be read or changed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} the open-files limit (RLIMIT_NOFILE): {source}")]
pub struct LimitError {
    action: &'static str,
    #[source]
    source: nix::Error,
}

/// Raises the soft open-files limit to the hard limit (capped at what the kernel accepts).
pub fn raise_nofile_limit() -> Result<NofileLimit, LimitError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|source| LimitError {
        action: "read",
        source,
    })?;
    if soft >= hard {
        return Ok(NofileLimit {
            soft,
            hard,
            raised_from: None,
        });
    }
    // RLIM_INFINITY as a hard limit is refused as a soft value beyond fs.nr_open.
    let target = hard.min(nr_open().unwrap_or(hard));
    if target <= soft {
        return Ok(NofileLimit {
            soft,
            hard,
            raised_from: None,
        });
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard).map_err(|source| LimitError {
        action: "raise",
        source,
    })?;
    Ok(NofileLimit {
        soft: target,
        hard,
        raised_from: Some(soft),
    })
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Descriptors kept back from agent connections for a given soft limit: operator connections and
/// artifact uploads in progress. At least 32, at most 64 (an operator's CLI uses one connection;
/// a larger reserve would only cost agents), about 1/16 of the limit in between.
pub fn reserved_fds(soft: u64) -> u64 {
    (soft / 16).clamp(32, 64)
}

/// How many accepted connections count as normal: beyond it, new agent streams are refused
/// (`resource_exhausted`) and their connections closed, so operators can still get in.
pub fn connection_cap(soft: u64) -> usize {
    // A listener, the store, a few log and artifact files: the first ~16 descriptors.
    let usable = soft.saturating_sub(16).saturating_sub(reserved_fds(soft));
    usize::try_from(usable.max(1)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_keeps_a_reserve() {
        assert_eq!(reserved_fds(1024), 64);
        assert_eq!(connection_cap(1024), 1024 - 16 - 64);
        assert_eq!(reserved_fds(20_000), 64);
        // This machine's limit still admits the 19,900 agents the issue measures.
        assert!(connection_cap(20_000) >= 19_900);
        assert_eq!(reserved_fds(100), 32);
        assert_eq!(connection_cap(100), 100 - 16 - 32);
        assert_eq!(connection_cap(10), 1);
    }
}
