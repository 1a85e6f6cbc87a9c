//! Prepare, then activate: `Stage` orders ahead of a host's wave, their results, and their
//! cancellation when the rollout rolls back or ends before the host's wave.
//!
//! While a rollout runs, at most [`EngineSettings::stage_ahead`] pending hosts hold a stage
//! order of it: the current wave's hosts still waiting for dispatch first, then the next waves'
//! in dispatch order, one wave at a time: a wave is staged once no host of an earlier wave is
//! still downloading (a dispatched host of the current wave, or a stage in flight), so the
//! downloads the next wave needs never share the coordinator's uploads with later ones. Only a host that was never given an order of this rollout is staged, so a
//! stage never follows an activation (a retried or re-dispatched host is activated directly).
//! The agent downloads and verifies the release and answers STAGED; the host's later activate
//! order (a higher sequence) swaps a release already on disk. A stage changes nothing a host
//! serves: the host stays pending, counts as baseline in the canary analysis, and a stage that
//! fails is a warning in its detail and the event log, never a failure (its activation stages
//! again, and fails there if the problem stays). A rollout restored from its records in a state
//! that stages nothing (rolling back, finished) withdraws a stage its records still show in
//! flight (an answer not saved before the restart). A rollback or an abort sends a `Cancel` to
//! every reachable host whose stage was sent and not answered, and withdraws the others; a
//! rollout that completes withdraws its stages still in flight (those hosts are activated when
//! they come back).

use super::*;

impl Rollout {
    /// Gives stage orders to pending hosts while the rollout runs, up to the setting.
    pub(super) fn stage_ahead(&mut self, now: u64) {
        if !std::mem::take(&mut self.stage_scan) {
            return;
        }
        let limit = self.settings.stage_ahead as usize;
        if limit == 0 || self.state != RolloutState::Running {
            return;
        }
        let mut staged = 0usize;
        let mut candidates = Vec::new();
        // Downloads in wave order: a wave's hosts are staged once no host of an earlier wave
        // (the current wave's dispatched hosts included) is still downloading, so the wave that
        // runs next never shares the coordinator's uploads (nor a small host's CPU) with a
        // later one.
        let mut collecting = true;
        for (i, w) in self.waves.iter().enumerate().skip(self.current_wave) {
            let mut busy = false;
            for id in &w.hosts {
                let Some(h) = self.hosts.get(id) else {
                    continue;
                };
                let reachable = self.seen.reachable(id);
                if h.staged_ahead() {
                    staged += 1;
                    busy |= reachable && h.stage_in_flight();
                } else if i == self.current_wave
                    && h.phase == HostPhase::Dispatched
                    && h.failure.is_none()
                {
                    // Its activation is still downloading (or swapping) the release.
                    busy |= reachable;
                } else if collecting
                    && h.phase == HostPhase::Pending
                    && h.order.is_none()
                    && h.failure.is_none()
                    && candidates.len() < limit
                    && reachable
                {
                    candidates.push(id.clone());
                }
            }
            if busy || !candidates.is_empty() {
                collecting = false;
            }
            if !collecting && candidates.is_empty() {
                // Nothing to stage: the later waves need no walk (this runs after many steps).
                return;
            }
        }
        let room = limit.saturating_sub(staged);
        for id in candidates.into_iter().take(room) {
            if let Some(h) = self.hosts.get_mut(&id) {
                h.detail = format!("staging {} ahead of its wave", self.spec.release);
            }
            self.issue(now, &id, OrderKind::Stage);
        }
    }

    /// A result about a host's current stage or cancel order.
    pub(super) fn on_stage_result(
        &mut self,
        now: u64,
        id: &HostId,
        kind: OrderKind,
        out: &OrderOutcome,
    ) {
        let release = self.spec.release.clone();
        let max_attempts = self.settings.max_order_attempts;
        let retry_delay = ms(self.settings.order_retry_delay);
        let Some(h) = self.hosts.get_mut(id) else {
            return;
        };
        let Some(o) = h.order.as_mut() else {
            return;
        };
        let described = if out.message.is_empty() {
            out.code.as_str().to_string()
        } else {
            format!("{}: {}", out.code.as_str(), out.message)
        };
        match (kind, out.phase) {
            (OrderKind::Stage, OrderPhase::Progress) => {
                h.detail = format!("staging {release} ahead of its wave");
            }
            (OrderKind::Stage, OrderPhase::Staged) if !o.done => {
                o.done = true;
                h.stage_warning = None;
                h.detail = format!("{release} staged ahead of its wave");
                self.dirty_hosts.insert(id.clone());
            }
            (OrderKind::Stage, OrderPhase::Rejected)
                if matches!(out.code, ResultCode::StaleOrder | ResultCode::Busy)
                    && h.attempts < max_attempts
                    && !o.done =>
            {
                // Allocated again past what the agent applied (see the activate's refusals).
                h.attempts += 1;
                h.last_seq = h.last_seq.max(out.seq).max(out.last_seq);
                h.retry_at_ms = Some(if out.code == ResultCode::StaleOrder {
                    now
                } else {
                    now + retry_delay
                });
                self.dirty_hosts.insert(id.clone());
            }
            (OrderKind::Stage, OrderPhase::Failed | OrderPhase::Rejected) if !o.done => {
                o.done = true;
                let warning = format!("staging ahead failed ({described})");
                h.detail = format!("warning: {warning}; its activation stages again");
                h.stage_warning = Some(warning);
                let msg = format!(
                    "host {id}: staging {release} ahead of its wave failed ({described}); not a failure: its activation stages again"
                );
                self.dirty_hosts.insert(id.clone());
                self.event(now, msg);
            }
            (OrderKind::Stage, OrderPhase::Cancelled) => {
                // Superseded on the agent by a newer order.
                o.done = true;
            }
            (
                OrderKind::Cancel,
                OrderPhase::Cancelled | OrderPhase::Failed | OrderPhase::Rejected,
            ) if !o.done => {
                // Whatever the answer, nothing of the stage can change what the host serves.
                o.done = true;
                h.detail = format!("staging of {release} cancelled");
                self.dirty_hosts.insert(id.clone());
            }
            _ => {}
        }
    }

    /// A rollback or an abort: every stage in flight is cancelled (a `Cancel` to a reachable
    /// host its stage was sent to) or withdrawn; nothing is activated any more.
    pub(super) fn cancel_stages(&mut self, now: u64) {
        let in_flight: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.stage_in_flight())
            .map(|h| h.id.clone())
            .collect();
        let mut cancelled = 0;
        for id in &in_flight {
            let reachable = self.seen.reachable(id);
            let Some(h) = self.hosts.get_mut(id) else {
                continue;
            };
            let sent = h.order.as_ref().is_some_and(|o| o.seq.is_some());
            h.retry_at_ms = None;
            if sent && reachable {
                h.detail = format!("cancelling the staging of {}", self.spec.release);
                self.issue(now, id, OrderKind::Cancel);
                cancelled += 1;
            } else {
                Self::withdraw_stage(h);
                self.dirty_hosts.insert(id.clone());
            }
        }
        if !in_flight.is_empty() {
            self.event(
                now,
                format!(
                    "{} stages in flight stopped: {cancelled} cancelled, {} withdrawn",
                    in_flight.len(),
                    in_flight.len() - cancelled
                ),
            );
        }
    }

    /// Every stage in flight is withdrawn (the rollout completed; its pending hosts are
    /// activated when they are back).
    pub(super) fn withdraw_stages(&mut self) {
        for h in self.hosts.values_mut() {
            if h.stage_in_flight() {
                Self::withdraw_stage(h);
                h.retry_at_ms = None;
                self.dirty_hosts.insert(h.id.clone());
            }
        }
    }

    /// A stage order that is not to be sent or re-sent any more: one never sent is forgotten,
    /// one sent is done (whatever the agent answers changes nothing).
    pub(super) fn withdraw_stage(h: &mut HostEntry) {
        match h.order.as_mut() {
            Some(o) if o.kind == OrderKind::Stage && o.seq.is_none() => h.order = None,
            Some(o) if o.kind == OrderKind::Stage => o.done = true,
            _ => {}
        }
    }
}
