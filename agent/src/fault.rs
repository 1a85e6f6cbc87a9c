//! Fault injection for crash and watchdog tests.
//!
//! [`point`] marks a step of staging or activation. In builds with the `fault-injection` feature,
//! the environment variable `SERIN_AGENT_CRASH_AT=<point>[,<point>...]` makes the agent SIGKILL
//! itself the first time it reaches one of the named points, so tests can check that every step
//! is recoverable. [`wedge`] marks a place in a loop: with the feature, when the file named by
//! `SERIN_AGENT_WEDGE_FILE` exists and holds that place's name, the agent removes the file (so
//! the next agent process runs normally) and blocks the loop there for good: a wedged main loop,
//! which systemd's watchdog must restart.
//!
//! [`chaos`] decides the fate of each order result the agent sends (`SERIN_CHAOS`, see
//! `serin_proto::chaos`; the coordinator does the same for orders; the suites count both).
//!
//! Without the feature all of them compile to nothing, and the product binary does not even contain the
//! variables' names: no crate of the workspace enables the feature (cargo would unify it into
//! every workspace build); the test harness builds its agent with it in a target directory of its
//! own (`tests/src/binaries.rs`), and a test checks the product binary.

/// Marks the named step; see the module docs.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Marks the named place in a loop; see the module docs.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn wedge(_name: &str) {}

/// Marks the named step; see the module docs.
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    let Ok(points) = std::env::var("SERIN_AGENT_CRASH_AT") else {
        return;
    };
    if points.split(',').any(|p| p.trim() == name) {
        tracing::warn!(point = name, "fault injection: killing the agent");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        // raise(SIGKILL) does not return; make sure of it.
        std::process::abort();
    }
}

/// Marks the named place in a loop; see the module docs.
#[cfg(feature = "fault-injection")]
pub fn wedge(name: &str) {
    let Some(file) = std::env::var_os("SERIN_AGENT_WEDGE_FILE") else {
        return;
    };
    let wanted = |f: &std::ffi::OsStr| std::fs::read_to_string(f).is_ok_and(|s| s.trim() == name);
    if wanted(&file) {
        if let Err(e) = std::fs::remove_file(&file) {
            tracing::warn!(point = name, error = %e, "fault injection: cannot remove the wedge file");
        }
        tracing::warn!(point = name, "fault injection: wedging this loop");
        // Block this thread for good, as a deadlock would; only a restart ends it.
        loop {
            std::thread::park();
        }
    }
}

/// The message chaos on this agent's order results, if any (`serin_proto::chaos`): the
/// coordinator is the agent's one peer.
#[inline(always)]
pub fn chaos() -> Option<&'static serin_proto::chaos::Chaos> {
    serin_proto::chaos::chaos("order results")
}
