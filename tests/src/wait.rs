//! Waiting for a condition instead of sleeping.
//!
//! Every wait polls a condition every [`POLL`] and, on timeout, panics naming what it waited for,
//! how long, and a context dump (typically the agent's log tail and the messages the fake
//! coordinator recorded), so a failing test says what went wrong.

use std::time::{Duration, Instant};

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(25);

/// Polls `check` until it returns `Some`, and returns that value.
///
/// Panics after `timeout` with "timed out after …s waiting for {what}" followed by `dump()`.
pub fn wait_for_value<T>(
    what: &str,
    timeout: Duration,
    dump: &dyn Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() >= timeout {
            panic!(
                "timed out after {:.1}s waiting for {what}\n{}",
                timeout.as_secs_f64(),
                dump()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `condition` until it is true; panics after `timeout` naming `what`, with `dump()`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    dump: &dyn Fn() -> String,
    mut condition: impl FnMut() -> bool,
) {
    wait_for_value(what, timeout, dump, || condition().then_some(()))
}

/// Asserts that `condition` holds at every poll for `duration`; panics naming `what` otherwise.
///
/// For "nothing happens" assertions (the service keeps serving while …). `condition` returns
/// `Err(reason)` when it does not hold.
pub fn hold_for(
    what: &str,
    duration: Duration,
    dump: &dyn Fn() -> String,
    mut condition: impl FnMut() -> Result<(), String>,
) {
    let start = Instant::now();
    while start.elapsed() < duration {
        if let Err(reason) = condition() {
            panic!(
                "{what} stopped holding after {:.2}s: {reason}\n{}",
                start.elapsed().as_secs_f64(),
                dump()
            );
        }
        std::thread::sleep(POLL);
    }
}
