//! Liveness of the agent's main loop, for systemd's watchdog.
//!
//! The connection loop (the agent's main loop: every order and every result passes through it)
//! calls [`Liveness::beat`] every [`Liveness::PERIOD`], whatever it is waiting for. The binary's
//! watchdog task pings systemd (`WATCHDOG=1`) only while the last beat is recent, so a wedged loop
//! stops the pings and systemd restarts the agent. The first beat also marks the agent ready
//! (`READY=1`): the services are set up and the first connection attempt is under way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Shared stamp of the main loop's last beat; cheap to clone.
#[derive(Debug, Clone)]
pub struct Liveness {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The reference point of `last_ms`.
    start: Instant,
    /// Milliseconds after `start` of the last beat, plus one (0: no beat yet).
    last_ms: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

impl Liveness {
    /// How often the main loop beats.
    pub const PERIOD: Duration = Duration::from_secs(1);

    /// A liveness stamp that has not seen a beat yet.
    pub fn new() -> Self {
        Liveness {
            inner: Arc::new(Inner {
                start: Instant::now(),
                last_ms: AtomicU64::new(0),
            }),
        }
    }

    /// Records that the main loop is turning. Test builds can wedge the loop here
    /// ([`crate::fault::wedge`]).
    pub fn beat(&self) {
        crate::fault::wedge("main-loop");
        let ms = u64::try_from(self.inner.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.inner.last_ms.store(ms + 1, Ordering::Relaxed);
    }

    /// How long ago the last beat was, as of `now`; `None` before the first beat.
    pub fn since_last_beat(&self, now: Instant) -> Option<Duration> {
        match self.inner.last_ms.load(Ordering::Relaxed) {
            0 => None,
            stamp => {
                let at = self.inner.start + Duration::from_millis(stamp - 1);
                Some(now.saturating_duration_since(at))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_beat_then_a_recent_one() {
        let l = Liveness::new();
        assert_eq!(l.since_last_beat(Instant::now()), None);
        l.beat();
        let now = Instant::now();
        assert!(l.since_last_beat(now).unwrap() < Duration::from_secs(1));
        let later = now + Duration::from_secs(10);
        assert!(l.since_last_beat(later).unwrap() >= Duration::from_secs(9));
    }
}
