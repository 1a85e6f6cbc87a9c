//! The request gate (`min_requests`): a wave's bake passes only when its time is up and its
//! hosts served at least that many requests since their activation.
//!
//! Agents report a request counter that only grows with each health report
//! ([`HealthSample::requests_total`]: HAProxy's `stot` of the host's server). The machine keeps,
//! per host and in memory only, what it counted of that counter's increase while the host runs
//! the rollout's release (activated, healthy or confirmed): the first report after an activation
//! sets the starting point, so requests served before it are not counted (the gate errs towards
//! "too few"). A counter that goes down (HAProxy restarted) counts from zero again. After a
//! coordinator restart the counting starts afresh, like the canary analysis' samples.
//!
//! Too few requests when the bake is up: the rollout pauses with the verdict
//! "insufficient data: n of N requests", never a pass. An operator then promotes (accepting the
//! wave as it is), resumes (the wave bakes again, counting on) or aborts.

use std::collections::BTreeMap;

use serin_proto::HostId;

use super::{DecisionKind, ENGINE, HostPhase, Rollout, RolloutState, WaveState};
use crate::fleet::HealthSample;

/// What was counted of one host's request counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// The counter's latest value.
    last: u64,
    /// Requests counted since the first report after the activation.
    counted: u64,
}

impl Served {
    /// Counting starts at the counter's value `total`.
    pub fn start(total: u64) -> Self {
        Self {
            last: total,
            counted: 0,
        }
    }

    /// The counter now reads `total`: its increase is counted; a counter that went down was
    /// reset (its source restarted) and counts from zero.
    pub fn observe(&mut self, total: u64) {
        let added = total.checked_sub(self.last).unwrap_or(total);
        self.counted = self.counted.saturating_add(added);
        self.last = total;
    }

    /// Requests counted so far.
    pub fn counted(&self) -> u64 {
        self.counted
    }
}

/// The requests a wave's hosts served, for the gate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaveRequests {
    /// Requests counted over the wave's hosts that run the release.
    pub served: u64,
    /// Hosts of the wave running the release that reported no counter yet.
    pub without_counter: u32,
}

impl Rollout {
    /// Counts a health report's request counter for the host (see the module docs).
    pub(super) fn count_requests(&mut self, id: &HostId, sample: &HealthSample) {
        let running = self.hosts.get(id).is_some_and(|h| {
            h.failure.is_none()
                && matches!(
                    h.phase,
                    HostPhase::Activated | HostPhase::Healthy | HostPhase::Confirmed
                )
        }) && sample.release.as_ref() == Some(&self.spec.release);
        match (running, sample.requests_total) {
            (true, Some(total)) => match self.served.get_mut(id) {
                Some(s) => s.observe(total),
                None => {
                    self.served.insert(id.clone(), Served::start(total));
                }
            },
            (true, None) => {}
            // Not (or no longer) on the release: the next activation counts afresh.
            (false, _) => {
                self.served.remove(id);
            }
        }
    }

    /// A host is (re)dispatched: what it served before does not count for this activation.
    pub(super) fn forget_requests(&mut self, id: &HostId) {
        self.served.remove(id);
    }

    /// The requests wave `idx`'s hosts served since their activation.
    pub(super) fn wave_requests(&self, idx: usize) -> WaveRequests {
        let mut r = WaveRequests::default();
        for id in &self.waves[idx].hosts {
            let Some(h) = self.hosts.get(id) else {
                continue;
            };
            if h.failure.is_some()
                || !matches!(
                    h.phase,
                    HostPhase::Activated | HostPhase::Healthy | HostPhase::Confirmed
                )
            {
                continue;
            }
            match self.served.get(id) {
                Some(s) => r.served = r.served.saturating_add(s.counted()),
                None => r.without_counter += 1,
            }
        }
        r
    }

    /// The request gate at the end of wave `idx`'s bake: adds the counts to the gate's
    /// `evidence`; too few requests pauses the rollout ("insufficient data") and answers true.
    /// An operator's promote skips it.
    pub(super) fn request_gate(
        &mut self,
        now: u64,
        idx: usize,
        evidence: &mut BTreeMap<String, String>,
    ) -> bool {
        let Some(min) = self.spec.min_requests.map(|m| m.get()) else {
            return false;
        };
        let r = self.wave_requests(idx);
        evidence.insert("requests_served".into(), r.served.to_string());
        evidence.insert("min_requests".into(), min.to_string());
        if r.without_counter > 0 {
            evidence.insert(
                "hosts_without_request_counter".into(),
                r.without_counter.to_string(),
            );
        }
        if r.served >= min || self.waves[idx].promote_by.is_some() {
            return false;
        }
        let verdict = format!("insufficient data: {} of {min} requests", r.served);
        evidence.insert("verdict".into(), verdict.clone());
        let mut reason = format!(
            "wave {}: {verdict} served since activation when the bake ended",
            idx + 1
        );
        if r.without_counter > 0 {
            reason.push_str(&format!(
                " ({} hosts report no request counter)",
                r.without_counter
            ));
        }
        let w = &mut self.waves[idx];
        w.state = WaveState::Paused;
        w.bake_ends_ms = None;
        w.promote_by = None;
        self.state = RolloutState::Paused;
        self.paused_for_data = true;
        self.dirty_header = true;
        self.reason = format!(
            "{reason}; paused for an operator: promote to accept the wave, resume to bake it again, abort to roll back"
        );
        self.decide(
            now,
            idx as u32,
            DecisionKind::Pause,
            reason,
            evidence.clone(),
            ENGINE,
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_counts_its_increase_and_survives_a_reset() {
        let mut s = Served::start(1_000);
        assert_eq!(
            s.counted(),
            0,
            "what was served before the start is not counted"
        );
        s.observe(1_040);
        s.observe(1_040);
        assert_eq!(s.counted(), 40);
        // HAProxy restarted: its counter starts over; what it shows now was served since.
        s.observe(7);
        assert_eq!(s.counted(), 47);
        s.observe(10);
        assert_eq!(s.counted(), 50);
    }
}
