//! serin's wire limits in one table: what a peer may send, how many calls it may hold open, how
//! long it has to say who it is, and how much of its own input an error may echo back.
//!
//! The limits that belong to the message types live with them (`serin_proto`, the manifest
//! format, the TLS handshake) and are re-exported here, so this module is the one place to read
//! them all; the coordinator and the agent take them from here. `SECURITY.md` ("Wire limits")
//! lists each with the test that holds it against the real coordinator.
//!
//! The per-peer limits are enforced with [`PeerSlots`] (calls held open per identity) and
//! [`TokenBucket`] (a rate with a burst, time passed in).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::manifest::{MAX_COUNTER as MAX_MANIFEST_COUNTER, MAX_MANIFEST_LEN};
pub use crate::transport::{
    DEFAULT_HANDSHAKE_TIMEOUT as HANDSHAKE_TIMEOUT, MAX_PENDING_HANDSHAKES, PROOF_TIMEOUT,
};
pub use serin_proto::{
    MAX_ARTIFACT_SIZE, MAX_ECHOED_BYTES, MAX_MANIFEST_BYTES, MAX_ORDER_DEADLINE, MAX_ORDER_SEQ,
    truncated,
};

/// `Attach` streams one agent identity (one host id) may hold at once, from the call's arrival
/// until its stream ends, hello phase included. Two: the current stream and the one replacing
/// it after a reconnect (the registry ends the older as soon as the newer says hello). A third
/// is refused with `resource_exhausted`, so one certificate cannot pile up silent streams.
pub const ATTACH_STREAMS_PER_HOST: usize = 2;

/// Control calls one operator identity may have in flight at once (watches and uploads count
/// for as long as they stream). A person with a few terminals and a CI job stay far below it;
/// beyond it a call is refused with `resource_exhausted`, and other operators are unaffected.
pub const CONTROL_CALLS_PER_OPERATOR: usize = 32;

/// Least time a new `Attach` stream has to send its hello; the coordinator waits
/// [`hello_timeout`]. After it the stream is refused (`deadline_exceeded`) and its connection
/// closed.
pub const MIN_HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The hello timeout for a coordinator that calls an agent unreachable after
/// `unreachable_after`: that long, but never under [`MIN_HELLO_TIMEOUT`].
pub fn hello_timeout(unreachable_after: Duration) -> Duration {
    unreachable_after.max(MIN_HELLO_TIMEOUT)
}

/// Refused calls written to the audit log in a burst; beyond it, [`REFUSED_AUDIT_PER_SECOND`].
pub const REFUSED_AUDIT_BURST: u32 = 50;

/// Refused calls written to the audit log per second after a burst. The ones over the rate are
/// counted and written as one summary entry when the rate allows again, so a flood of refused
/// calls adds at most ~430,000 entries a day (about 100 MB) instead of filling the store.
pub const REFUSED_AUDIT_PER_SECOND: u32 = 5;

/// Longest rollout id a control call may name. Ids the coordinator makes are far shorter; a
/// longer one is refused before it is looked up (and never echoed back in full).
pub const MAX_ROLLOUT_ID_BYTES: usize = 128;

/// All slots of a peer are taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{peer} already has {limit} {what} open (the limit per peer); close one or retry later")]
pub struct SlotsFull {
    /// The peer (an identity URI), cut to [`MAX_ECHOED_BYTES`].
    pub peer: String,
    /// The limit.
    pub limit: usize,
    /// What is counted ("Attach streams", "control calls").
    pub what: &'static str,
}

/// Counts what each peer holds open, up to a limit per peer. A slot is held by a [`PeerSlot`]
/// and given back when it is dropped.
#[derive(Debug)]
pub struct PeerSlots {
    limit: usize,
    what: &'static str,
    held: Mutex<HashMap<String, usize>>,
}

impl PeerSlots {
    /// Up to `limit` slots per peer, counting `what` (for the refusal's message).
    pub fn new(limit: usize, what: &'static str) -> Arc<Self> {
        Arc::new(Self {
            limit,
            what,
            held: Mutex::default(),
        })
    }

    /// Takes a slot for `peer`, or says that it holds `limit` already.
    pub fn try_acquire(self: &Arc<Self>, peer: &str) -> Result<PeerSlot, SlotsFull> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(peer.to_string()).or_default();
        if *n >= self.limit {
            return Err(SlotsFull {
                peer: truncated(peer),
                limit: self.limit,
                what: self.what,
            });
        }
        *n += 1;
        Ok(PeerSlot {
            slots: self.clone(),
            peer: peer.to_string(),
        })
    }

    /// Slots `peer` holds now.
    pub fn held(&self, peer: &str) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(peer).copied().unwrap_or(0)
    }
}

/// One slot of a peer in a [`PeerSlots`]; given back on drop.
#[derive(Debug)]
pub struct PeerSlot {
    slots: Arc<PeerSlots>,
    peer: String,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

/// A token bucket: `burst` events at once, then `per_second`. Time is passed in.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    burst: f64,
    per_second: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, per_second: u32) -> Self {
        Self {
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            tokens: f64::from(burst),
            last: None,
        }
    }

    /// Whether one more event is allowed at `now` (and takes its token if so).
    pub fn allow(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_peer_and_given_back_on_drop() {
        let slots = PeerSlots::new(2, "Attach streams");
        let a1 = slots.try_acquire("serin://agent/a").unwrap();
        let _a2 = slots.try_acquire("serin://agent/a").unwrap();
        let full = slots.try_acquire("serin://agent/a").unwrap_err();
        assert_eq!(
            full.to_string(),
            "serin://agent/a already has 2 Attach streams open (the limit per peer); close one or retry later"
        );
        // Another peer is not affected.
        let _b = slots.try_acquire("serin://agent/b").unwrap();
        drop(a1);
        assert_eq!(slots.held("serin://agent/a"), 1);
        let _a3 = slots.try_acquire("serin://agent/a").unwrap();
        drop(_a3);
        drop(_a2);
        drop(_b);
        assert!(
            slots.held.lock().unwrap().is_empty(),
            "no entry left behind"
        );
    }

    #[test]
    fn a_refusal_never_echoes_a_long_peer_in_full() {
        let slots = PeerSlots::new(0, "control calls");
        let long = "x".repeat(10_000);
        let e = slots.try_acquire(&long).unwrap_err();
        assert!(e.to_string().len() < 200, "{}", e.to_string().len());
    }

    #[test]
    fn the_bucket_allows_a_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, 2);
        assert!((0..3).all(|_| b.allow(t0)));
        assert!(!b.allow(t0));
        // Half a second buys one more at 2/s.
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.allow(t1));
        assert!(!b.allow(t1));
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.allow(t2)).count(), 3);
    }

    #[test]
    fn the_hello_timeout_has_a_floor() {
        assert_eq!(hello_timeout(Duration::from_secs(1)), MIN_HELLO_TIMEOUT);
        assert_eq!(
            hello_timeout(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
    }
}
