//! The rollback sub-machine: every touched host back to its baseline at once, timeouts, and
//! the end of a rollback.

use super::*;

impl Rollout {
    pub(super) fn touched_evidence(&self) -> BTreeMap<String, String> {
        let (with, without): (Vec<&HostEntry>, Vec<&HostEntry>) = self
            .hosts
            .values()
            .filter(|h| h.phase.touched_new())
            .partition(|h| h.baseline.is_some());
        let mut e = BTreeMap::new();
        e.insert("hosts_to_roll_back".into(), with.len().to_string());
        if !without.is_empty() {
            let ids: Vec<HostId> = without.iter().map(|h| h.id.clone()).collect();
            e.insert("no_baseline_hosts".into(), join_ids(&ids));
        }
        e
    }

    pub(super) fn begin_rollback(&mut self, now: u64, final_state: RolloutState, reason: String) {
        self.state = RolloutState::RollingBack;
        self.rollback_final = Some(final_state);
        self.reason = reason;
        self.dirty_header = true;
        self.cancel_stages(now);
        let touched: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.phase.touched_new())
            .map(|h| h.id.clone())
            .collect();
        let mut ordered = 0;
        for id in &touched {
            if self.start_host_rollback(now, id) {
                ordered += 1;
            }
        }
        let left = touched.len() - ordered;
        self.event(
            now,
            if left == 0 {
                format!("rolling back {ordered} hosts to their baselines")
            } else {
                format!(
                    "rolling back {ordered} hosts to their baselines; {left} hosts have no baseline release to restore and stay on {}",
                    self.spec.release
                )
            },
        );
    }

    /// Sends a touched host back to its baseline. A host without a baseline (a first install)
    /// has nothing to go back to: it gets no rollback order, is left on the rollout's release
    /// and its outstanding activate order is withdrawn (never re-sent). Returns whether a
    /// rollback was ordered.
    pub(super) fn start_host_rollback(&mut self, now: u64, id: &HostId) -> bool {
        let release = self.spec.release.clone();
        let Some(h) = self.hosts.get_mut(id) else {
            return false;
        };
        if h.baseline.is_none() {
            h.left_without_baseline = true;
            h.phase = h.phase.on_no_baseline(h.failure.is_some());
            h.retry_at_ms = None;
            h.detail = format!("no baseline release to restore; left on {release}");
            match h.order.as_mut() {
                Some(o) if o.seq.is_none() => h.order = None,
                Some(o) => o.done = true,
                None => {}
            }
            self.dirty_hosts.insert(id.clone());
            let msg = format!("host {id}: {}", h.detail);
            self.event(now, msg);
            return false;
        }
        h.phase = h.phase.on_rollback_ordered();
        h.attempts = 0;
        // A retry pending for the activation (a busy refusal) is not the rollback's: it would
        // re-issue the rollback as a second order. A host still staging is not skipped either:
        // the rollback preempts its stage on the agent.
        h.retry_at_ms = None;
        h.rollback_at_ms = None;
        h.detail = format!(
            "rolling back to {}",
            h.baseline
                .as_ref()
                .map_or("the previous release", ReleaseId::as_str)
        );
        self.issue(now, id, OrderKind::Rollback);
        true
    }

    pub(super) fn check_rollback_timeouts(&mut self, now: u64) {
        let limit = ms(self.settings.rollback_timeout);
        for h in self.hosts.values_mut() {
            if self.seen.reachable(&h.id)
                && h.phase == HostPhase::RollingBack
                && h.order
                    .as_ref()
                    .filter(|o| o.kind == OrderKind::Rollback)
                    .and_then(|o| o.sent_ms)
                    .is_some_and(|t| t + limit <= now)
            {
                h.phase = h.phase.on_failed();
                let reason = format!(
                    "no answer to the rollback order within {}",
                    fmt_dur(self.settings.rollback_timeout)
                );
                h.rollback_failed = Some(reason.clone());
                h.detail = reason;
                if let Some(o) = h.order.as_mut() {
                    o.done = true;
                }
                self.dirty_hosts.insert(h.id.clone());
            }
        }
    }

    /// When the rollout's rollback must be over: the rollback timeout after it was decided (or
    /// after the coordinator restarted into it). Hosts a rollback reaches but that are not back
    /// by then count as not restored, so a rollback always ends (a host that keeps reconnecting,
    /// an order that never got a sequence, an agent that never answers).
    pub(super) fn rollback_deadline(&self) -> Option<u64> {
        let decided = self
            .decisions
            .iter()
            .rev()
            .find(|d| d.kind.rolls_back())
            .map(|d| d.at_ms)?;
        Some(decided.max(self.restored_ms.unwrap_or(0)) + ms(self.settings.rollback_timeout))
    }

    /// At the rollback deadline, every reachable host still rolling back is not restored.
    fn end_overdue_rollbacks(&mut self, now: u64) {
        if self.rollback_deadline().is_none_or(|t| now < t) {
            return;
        }
        let reason = format!(
            "not back on its baseline within the rollback timeout ({})",
            fmt_dur(self.settings.rollback_timeout)
        );
        for h in self.hosts.values_mut() {
            if h.phase == HostPhase::RollingBack && self.seen.reachable(&h.id) {
                h.phase = h.phase.on_failed();
                h.rollback_failed = Some(reason.clone());
                h.detail = reason.clone();
                h.retry_at_ms = None;
                if let Some(o) = h.order.as_mut() {
                    match o.seq {
                        // Never sent: withdrawn.
                        None => h.order = None,
                        Some(_) => o.done = true,
                    }
                }
                self.dirty_hosts.insert(h.id.clone());
            }
        }
    }

    pub(super) fn advance_rollback(&mut self, now: u64) -> bool {
        self.check_rollback_timeouts(now);
        self.end_overdue_rollbacks(now);
        let outstanding = self.hosts.values().any(|h| {
            h.phase == HostPhase::RollingBack
                && (self.seen.reachable(&h.id) || self.seen.unknown(&h.id))
        });
        if outstanding {
            return false;
        }
        let failed: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.rollback_failed.is_some())
            .map(|h| h.id.clone())
            .collect();
        let later: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.phase == HostPhase::RollingBack)
            .map(|h| h.id.clone())
            .collect();
        let mut e = BTreeMap::new();
        let rolled = self
            .hosts
            .values()
            .filter(|h| h.phase == HostPhase::RolledBack)
            .count();
        e.insert("rolled_back".into(), rolled.to_string());
        if !later.is_empty() {
            e.insert("unreachable_pending_rollback".into(), join_ids(&later));
        }
        let final_state = if failed.is_empty() {
            self.rollback_final.unwrap_or(RolloutState::RolledBack)
        } else {
            e.insert("rollback_failed".into(), join_ids(&failed));
            self.reason = format!(
                "{}; the rollback failed on {}",
                self.reason,
                join_ids(&failed)
            );
            RolloutState::Failed
        };
        if !later.is_empty() {
            self.reason = format!(
                "{}; {} unreachable hosts are rolled back when they reconnect",
                self.reason,
                later.len()
            );
        }
        let left: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.left_without_baseline)
            .map(|h| h.id.clone())
            .collect();
        if !left.is_empty() {
            e.insert("no_baseline_hosts".into(), join_ids(&left));
            e.insert("left_on_release".into(), self.spec.release.to_string());
            self.reason = format!(
                "{}; {} hosts had no baseline release to restore and were left on {}",
                self.reason,
                left.len(),
                self.spec.release
            );
        }
        self.state = final_state;
        let reason = self.reason.clone();
        let idx = self.current_wave as u32;
        self.decide(now, idx, DecisionKind::RollbackFinished, reason, e, ENGINE);
        true
    }
}
