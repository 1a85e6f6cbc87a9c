//! The traffic state of one service and the agent-check line it answers, as pure values.
//!
//! HAProxy's agent-check protocol traps this module is built around (verified with HAProxy 2.6):
//! - `up` does **not** leave drain: a serving answer always carries `ready`.
//! - a percentage scales the server's *configured* weight (configured weight 0 stays 0), so the
//!   share of traffic a percentage gives depends on the other servers of the backend; the
//!   coordinator turns a wanted share into percentages (`serin_coordinator::haproxy::weights_for_share`).
//! - draining every server of a backend gives 100 % errors; the agent cannot see the backend, so
//!   that check lives on the coordinator side.

use std::time::{Duration, Instant};

/// What the load balancer should do with new connections to this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// Serving, at the state's weight.
    Ready,
    /// No new connections; established ones finish (HAProxy `drain`).
    Drain,
    /// Out of the backend entirely (HAProxy `maint`).
    Maint,
}

/// A weight ramp after a swap: from `from_percent` to the target weight over `duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowStart {
    /// The weight right after the swap, in percent of the target.
    pub from_percent: u8,
    /// How long the ramp to the full target takes.
    pub duration: Duration,
}

/// The traffic state of one service on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficState {
    admin: AdminState,
    /// Target weight in percent of the configured weight (0..=100).
    weight: u8,
    slow_start: Option<SlowStart>,
    /// When the ramp started (the last swap), if one is running.
    ramp_started: Option<Instant>,
}

/// Why a traffic state change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrafficError {
    /// A weight above 100 %.
    #[error("weight {0}% is out of range (0..=100)")]
    WeightOutOfRange(u32),
    /// A slow start starting above 100 %.
    #[error("slow start from {0}% is out of range (1..=100)")]
    SlowStartOutOfRange(u32),
}

impl SlowStart {
    /// A ramp from `from_percent` (1..=100) over `duration`.
    pub fn new(from_percent: u32, duration: Duration) -> Result<Self, TrafficError> {
        if !(1..=100).contains(&from_percent) {
            return Err(TrafficError::SlowStartOutOfRange(from_percent));
        }
        Ok(SlowStart {
            from_percent: from_percent as u8,
            duration,
        })
    }
}

impl Default for TrafficState {
    fn default() -> Self {
        TrafficState::new(None)
    }
}

impl TrafficState {
    /// Ready at full weight; `slow_start` applies after each [`TrafficState::swapped`].
    pub fn new(slow_start: Option<SlowStart>) -> Self {
        TrafficState {
            admin: AdminState::Ready,
            weight: 100,
            slow_start,
            ramp_started: None,
        }
    }

    /// The admin state.
    pub fn admin(&self) -> AdminState {
        self.admin
    }

    /// The target weight in percent (before any slow-start ramp).
    pub fn target_weight(&self) -> u8 {
        self.weight
    }

    /// Sets the target weight (e.g. the canary's share turned into a percentage).
    pub fn with_weight(mut self, percent: u32) -> Result<Self, TrafficError> {
        if percent > 100 {
            return Err(TrafficError::WeightOutOfRange(percent));
        }
        self.weight = percent as u8;
        Ok(self)
    }

    /// Stop sending new connections (before a swap).
    pub fn drain(mut self) -> Self {
        self.admin = AdminState::Drain;
        self
    }

    /// Take the server out of the backend.
    pub fn maint(mut self) -> Self {
        self.admin = AdminState::Maint;
        self
    }

    /// Serve again at the target weight (after a swap and a healthy check).
    pub fn ready(mut self) -> Self {
        self.admin = AdminState::Ready;
        self
    }

    /// A new process took over at `now`: restart the slow-start ramp, if one is configured.
    pub fn swapped(mut self, now: Instant) -> Self {
        self.ramp_started = self.slow_start.map(|_| now);
        self
    }

    /// The weight in percent HAProxy should use at `now`: the target, scaled down linearly
    /// during a slow-start ramp (never below 1 % while the target is above 0).
    pub fn effective_weight(&self, now: Instant) -> u8 {
        let (Some(ramp), Some(started)) = (self.slow_start, self.ramp_started) else {
            return self.weight;
        };
        let elapsed = now.saturating_duration_since(started);
        if elapsed >= ramp.duration || ramp.duration.is_zero() {
            return self.weight;
        }
        let target = u64::from(self.weight);
        let from = target * u64::from(ramp.from_percent) / 100;
        let span = ramp.duration.as_millis().max(1) as u64;
        let done = elapsed.as_millis() as u64;
        let w = from + (target - from) * done / span;
        let w = if target > 0 { w.max(1) } else { 0 };
        w.min(target) as u8
    }

    /// Whether a slow-start ramp is still running at `now`.
    pub fn ramping(&self, now: Instant) -> bool {
        self.effective_weight(now) != self.weight
    }

    /// The agent-check line at `now`, newline included: `up ready 40%`, `drain` or `maint`.
    pub fn answer(&self, now: Instant) -> String {
        match self.admin {
            // `ready` because `up` alone does not leave drain.
            AdminState::Ready => format!("up ready {}%\n", self.effective_weight(now)),
            AdminState::Drain => "drain\n".to_owned(),
            AdminState::Maint => "maint\n".to_owned(),
        }
    }
}

/// Waiting for a drained server to go idle before its swap: done when no session is left, or
/// when the drain timeout has passed (the swap then goes ahead and the evidence says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainWait {
    started: Instant,
    timeout: Duration,
}

/// What a [`DrainWait`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainVerdict {
    /// Sessions are still open and there is time left.
    Wait,
    /// No session left.
    Idle {
        /// Time since the drain began.
        after: Duration,
    },
    /// The timeout passed with sessions still open: swap anyway.
    TimedOut {
        /// Time since the drain began.
        after: Duration,
        /// Sessions still open.
        sessions: u64,
    },
}

impl DrainWait {
    /// A drain that began at `started` and waits at most `timeout`.
    pub fn new(started: Instant, timeout: Duration) -> Self {
        DrainWait { started, timeout }
    }

    /// The verdict at `now` with `sessions` still open (from HAProxy's `scur`, or the
    /// service's own count).
    pub fn decide(&self, now: Instant, sessions: u64) -> DrainVerdict {
        let after = now.saturating_duration_since(self.started);
        if sessions == 0 {
            DrainVerdict::Idle { after }
        } else if after >= self.timeout {
            DrainVerdict::TimedOut { after, sessions }
        } else {
            DrainVerdict::Wait
        }
    }
}

impl DrainVerdict {
    /// The evidence line for the host's progress and `explain`.
    pub fn evidence(&self) -> String {
        match self {
            DrainVerdict::Wait => "draining".to_owned(),
            DrainVerdict::Idle { after } => format!("drained: idle after {after:?}"),
            DrainVerdict::TimedOut { after, sessions } => format!(
                "drain timed out after {after:?} with {sessions} session(s) still open; swapping anyway"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_answers_carry_ready_because_up_does_not_leave_drain() {
        let now = Instant::now();
        let s = TrafficState::new(None);
        assert_eq!(s.answer(now), "up ready 100%\n");
        let s = s.with_weight(33).unwrap().drain();
        assert_eq!(s.answer(now), "drain\n");
        assert_eq!(s.clone().maint().answer(now), "maint\n");
        // Back from drain: `ready`, at the weight set while draining.
        assert_eq!(s.ready().answer(now), "up ready 33%\n");
    }

    #[test]
    fn weights_above_100_percent_are_refused() {
        let e = TrafficState::new(None).with_weight(101).unwrap_err();
        assert_eq!(e.to_string(), "weight 101% is out of range (0..=100)");
        assert!(SlowStart::new(0, Duration::from_secs(1)).is_err());
        assert!(SlowStart::new(101, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn slow_start_ramps_linearly_from_the_low_value_to_the_target() {
        let t0 = Instant::now();
        let ramp = SlowStart::new(10, Duration::from_secs(10)).unwrap();
        let s = TrafficState::new(Some(ramp)).swapped(t0);
        assert_eq!(s.effective_weight(t0), 10);
        assert_eq!(s.effective_weight(t0 + Duration::from_secs(5)), 55);
        assert_eq!(s.effective_weight(t0 + Duration::from_secs(9)), 91);
        assert_eq!(s.effective_weight(t0 + Duration::from_secs(10)), 100);
        assert_eq!(s.effective_weight(t0 + Duration::from_secs(60)), 100);
        assert!(s.ramping(t0 + Duration::from_secs(1)));
        assert!(!s.ramping(t0 + Duration::from_secs(10)));
        // The weights never go down during the ramp.
        let mut last = 0;
        for ms in (0..=10_000).step_by(250) {
            let w = s.effective_weight(t0 + Duration::from_millis(ms));
            assert!(w >= last, "weight fell from {last} to {w} at {ms} ms");
            last = w;
        }
    }

    #[test]
    fn slow_start_scales_the_target_weight_of_a_canary() {
        let t0 = Instant::now();
        let ramp = SlowStart::new(10, Duration::from_secs(4)).unwrap();
        let s = TrafficState::new(Some(ramp))
            .with_weight(33)
            .unwrap()
            .swapped(t0);
        assert_eq!(s.effective_weight(t0), 3);
        assert_eq!(s.effective_weight(t0 + Duration::from_secs(2)), 18);
        assert_eq!(s.answer(t0 + Duration::from_secs(4)), "up ready 33%\n");
    }

    #[test]
    fn no_ramp_without_slow_start_or_before_a_swap() {
        let t0 = Instant::now();
        assert_eq!(
            TrafficState::new(None).swapped(t0).effective_weight(t0),
            100
        );
        let ramp = SlowStart::new(10, Duration::from_secs(4)).unwrap();
        assert_eq!(TrafficState::new(Some(ramp)).effective_weight(t0), 100);
    }

    #[test]
    fn a_drain_waits_for_idle_or_proceeds_after_its_timeout_saying_so() {
        let t0 = Instant::now();
        let d = DrainWait::new(t0, Duration::from_secs(5));
        assert_eq!(d.decide(t0 + Duration::from_secs(1), 3), DrainVerdict::Wait);
        let idle = d.decide(t0 + Duration::from_millis(1500), 0);
        assert_eq!(
            idle,
            DrainVerdict::Idle {
                after: Duration::from_millis(1500)
            }
        );
        assert_eq!(idle.evidence(), "drained: idle after 1.5s");
        let late = d.decide(t0 + Duration::from_secs(5), 1);
        assert_eq!(
            late,
            DrainVerdict::TimedOut {
                after: Duration::from_secs(5),
                sessions: 1
            }
        );
        assert_eq!(
            late.evidence(),
            "drain timed out after 5s with 1 session(s) still open; swapping anyway"
        );
    }

    #[test]
    fn a_zero_target_stays_zero_during_a_ramp() {
        let t0 = Instant::now();
        let ramp = SlowStart::new(10, Duration::from_secs(4)).unwrap();
        let s = TrafficState::new(Some(ramp))
            .with_weight(0)
            .unwrap()
            .swapped(t0);
        assert_eq!(s.effective_weight(t0 + Duration::from_secs(1)), 0);
    }
}
