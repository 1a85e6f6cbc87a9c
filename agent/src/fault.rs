//! Fault injection for crash tests.
//!
//! [`point`] marks a step of staging or activation. In builds with the `fault-injection` feature,
//! the environment variable `SERIN_AGENT_CRASH_AT=<point>[,<point>...]` makes the agent SIGKILL
//! itself the first time it reaches one of the named points, so tests can check that every step
//! is recoverable. Without the feature, [`point`] compiles to nothing.

/// Marks the named step; see the module docs.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

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
