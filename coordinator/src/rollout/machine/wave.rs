//! Wave policy: progress through the waves, dispatch within the budgets, the gate (breach,
//! unreachable hosts, canary analysis), promotion, waiting, and converging after success.

use super::*;

impl Rollout {
    pub(super) fn advance(&mut self, now: u64) {
        self.end_resume_grace(now);
        self.retry_orders(now);
        self.issue_due_rollbacks(now);
        // Each iteration makes at least one transition; a rollout has a bounded number of them.
        for _ in 0..(4 * self.waves.len() + 8) {
            let progressed = match self.state {
                RolloutState::Running => self.advance_wave(now),
                RolloutState::Waiting => self.check_waiting(now),
                RolloutState::RollingBack => self.advance_rollback(now),
                RolloutState::Succeeded => self.converge(now),
                _ => false,
            };
            if !progressed {
                break;
            }
        }
        if self.state == RolloutState::RollingBack || self.state.is_finished() {
            self.check_rollback_timeouts(now);
        }
        self.stage_ahead(now);
    }

    /// Once the resume grace has passed, hosts still unheard of since the restart are unreachable.
    pub(super) fn end_resume_grace(&mut self, now: u64) {
        if self.resume_grace_until.is_none_or(|t| now < t) {
            return;
        }
        self.resume_grace_until = None;
        let silent: Vec<HostId> = self
            .hosts
            .keys()
            .filter(|id| self.seen.unknown(id))
            .cloned()
            .collect();
        for id in &silent {
            self.seen.entry(id).reach = Reach::Unreachable;
        }
        if !silent.is_empty() {
            self.event(
                now,
                format!(
                    "{} hosts did not reconnect within {} of the coordinator restart; counted unreachable: {}",
                    silent.len(),
                    fmt_dur(self.settings.resume_grace),
                    join_ids(&silent)
                ),
            );
        }
    }

    pub(super) fn retry_orders(&mut self, now: u64) {
        let due: Vec<HostId> = self
            .hosts
            .values()
            .filter(|h| h.retry_at_ms.is_some_and(|t| t <= now))
            .map(|h| h.id.clone())
            .collect();
        for id in due {
            let Some(h) = self.hosts.get_mut(&id) else {
                continue;
            };
            h.retry_at_ms = None;
            let Some(kind) = h.order.as_ref().filter(|o| !o.done).map(|o| o.kind) else {
                continue;
            };
            // A stage is only retried while its host waits for its wave in a live rollout; a
            // cancel never is (its stage changes nothing the host serves).
            if kind == OrderKind::Cancel
                || (kind == OrderKind::Stage
                    && (h.phase != HostPhase::Pending
                        || h.failure.is_some()
                        || !matches!(
                            self.state,
                            RolloutState::Running | RolloutState::Waiting | RolloutState::Paused
                        )))
            {
                continue;
            }
            // An activation is only retried while the host may still take the release.
            if kind == OrderKind::Activate
                && (h.failure.is_some()
                    || h.phase != HostPhase::Dispatched
                    || matches!(
                        self.state,
                        RolloutState::RollingBack
                            | RolloutState::RolledBack
                            | RolloutState::Aborted
                            | RolloutState::Failed
                    ))
            {
                continue;
            }
            let attempts = h.attempts;
            self.issue(now, &id, kind);
            if let Some(h) = self.hosts.get_mut(&id) {
                h.attempts = attempts;
            }
        }
    }

    pub(super) fn resume_wave(&mut self, now: u64) {
        self.state = RolloutState::Running;
        self.paused_by_failure = false;
        self.paused_by_store = false;
        self.paused_for_data = false;
        self.stage_scan = true;
        self.reason.clear();
        if let Some(w) = self.waves.get_mut(self.current_wave) {
            w.state = if w.started_ms.is_some() {
                WaveState::Dispatching
            } else {
                WaveState::Pending
            };
            w.bake_ends_ms = None;
            w.deadline_base_ms = Some(now);
        }
        self.dirty_header = true;
    }

    pub(super) fn advance_wave(&mut self, now: u64) -> bool {
        let idx = self.current_wave;
        let Some(wave) = self.waves.get(idx) else {
            self.complete(now);
            return true;
        };
        match wave.state {
            WaveState::Pending => {
                let w = &mut self.waves[idx];
                w.state = WaveState::Dispatching;
                w.started_ms = Some(now);
                w.deadline_base_ms = Some(now);
                let n = w.hosts.len();
                self.dirty_header = true;
                self.event(
                    now,
                    format!(
                        "wave {} started: {n} hosts{}",
                        idx + 1,
                        if idx == 0 { " (canary)" } else { "" }
                    ),
                );
                return true;
            }
            WaveState::Passed => {
                if idx + 1 < self.waves.len() {
                    self.current_wave += 1;
                    self.dirty_header = true;
                } else {
                    self.complete(now);
                }
                return true;
            }
            WaveState::Dispatching | WaveState::Baking => {}
            _ => return false,
        }
        // Hosts past their healthy deadline (found without copying the wave's host list: this
        // runs on every step).
        let hd = ms(self.spec.healthy_deadline);
        let is_late = |h: &HostEntry| {
            h.failure.is_none()
                && h.phase == HostPhase::Activated
                && h.activated_ms.is_some_and(|t| t + hd <= now)
                && self.seen.reachable(&h.id)
        };
        // Usually none: found by one pass over the table (no lookups), then in dispatch order.
        let late: Vec<HostId> = if self.wave_entries(idx).any(is_late) {
            wave.hosts
                .iter()
                .filter(|id| self.hosts.get(*id).is_some_and(is_late))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for id in &late {
            {
                self.fail_armed_host(
                    now,
                    id,
                    format!(
                        "not healthy within the healthy deadline ({})",
                        fmt_dur(self.spec.healthy_deadline)
                    ),
                );
            }
        }
        // The wave's progress deadline.
        let progress_due = self.waves[idx]
            .deadline_base_ms
            .is_some_and(|t| t + ms(self.spec.progress_deadline) <= now);
        if progress_due {
            let ids = self.waves[idx].hosts.clone();
            for id in &ids {
                let late = self
                    .hosts
                    .get(id)
                    .is_some_and(|h| self.seen.reachable(id) && !h.settled(self.seen.get(id)));
                if late {
                    self.fail_host(
                        now,
                        id,
                        format!(
                            "not healthy within the progress deadline ({})",
                            fmt_dur(self.spec.progress_deadline)
                        ),
                    );
                }
            }
        }
        if let Some((reason, evidence)) = self.breach(idx) {
            self.gate_failed(now, idx, reason, evidence);
            return true;
        }
        self.dispatch(now, idx);
        let settled = self
            .wave_entries(idx)
            .all(|h| h.settled(self.seen.get(&h.id)));
        if !settled {
            return false;
        }
        let w = &mut self.waves[idx];
        match w.state {
            WaveState::Dispatching => {
                w.state = WaveState::Baking;
                let bake = self.spec.bake_for(idx);
                w.bake_ends_ms = Some(now + ms(bake));
                self.dirty_header = true;
                self.event(
                    now,
                    format!("wave {} baking for {}", idx + 1, fmt_dur(bake)),
                );
                true
            }
            WaveState::Baking
                if w.promote_by.is_some() || w.bake_ends_ms.is_some_and(|t| t <= now) =>
            {
                // Just after a restart, hosts not heard from yet are neither counted as healthy
                // nor as unreachable: the gate waits for them (at most the resume grace).
                let unknown = self.waves[idx]
                    .hosts
                    .iter()
                    .any(|id| self.hosts.contains_key(id) && self.seen.unknown(id));
                if unknown {
                    return false;
                }
                self.gate(now, idx);
                true
            }
            _ => false,
        }
    }

    pub(super) fn dispatch(&mut self, now: u64, idx: usize) {
        // Most steps have nobody left to dispatch: say so without counting the fleet.
        let waiting = self.wave_entries(idx).any(|h| {
            h.phase == HostPhase::Pending && h.failure.is_none() && self.seen.reachable(&h.id)
        });
        if !waiting {
            return;
        }
        let total = self.hosts.len() as u32;
        let mut in_flight = self.hosts.values().filter(|h| h.in_flight()).count() as u32;
        let mut unavailable = in_flight
            + self
                .hosts
                .values()
                .filter(|h| h.phase == HostPhase::RollingBack)
                .count() as u32;
        let max_in_flight = self
            .spec
            .max_in_flight
            .map_or(u32::MAX, |l| l.allowed_at_least_one(total));
        let max_unavailable = self
            .spec
            .max_unavailable
            .map_or(u32::MAX, |l| l.allowed_at_least_one(total));
        let max_domains = self.spec.max_domains_in_flight.map(|k| k.get() as usize);
        let mut domains: BTreeSet<String> = self
            .hosts
            .values()
            .filter(|h| h.in_flight())
            .filter_map(|h| h.domain.clone())
            .collect();
        for id in self.waves[idx].hosts.clone() {
            if in_flight >= max_in_flight || unavailable >= max_unavailable {
                break;
            }
            let Some(h) = self.hosts.get(&id) else {
                continue;
            };
            if h.phase != HostPhase::Pending || !self.seen.reachable(&id) || h.failure.is_some() {
                continue;
            }
            if let (Some(k), Some(d)) = (max_domains, &h.domain)
                && !domains.contains(d)
                && domains.len() >= k
            {
                continue;
            }
            if let Some(d) = &h.domain {
                domains.insert(d.clone());
            }
            self.activate(now, &id);
            in_flight += 1;
            unavailable += 1;
        }
    }

    pub(super) fn activate(&mut self, now: u64, id: &HostId) {
        // From now on its agent may be armed (a re-dispatch keeps the earlier time: the switch
        // of an earlier activation may still be running).
        self.seen.entry(id).armed_since.get_or_insert(now);
        self.holds_from_ms = 0;
        // A staged host leaving the stage-ahead window frees a slot.
        self.stage_scan = true;
        self.forget_requests(id);
        if let Some(h) = self.hosts.get_mut(id) {
            h.phase = h.phase.on_dispatch();
            h.dispatched_ms = Some(now);
            h.activated_ms = None;
            h.healthy_ms = None;
            h.detail = format!("activate {}", self.spec.release);
        }
        self.issue(now, id, OrderKind::Activate);
    }

    /// The entries of wave `idx`'s hosts, in host-id order: one pass over the table, no
    /// lookup per host (a walk over a 19,900-host wave by id spent its time hashing and
    /// comparing ids; a pass over every entry checking its wave costs microseconds even for a
    /// canary of one). For what does not depend on the order: counts, "any", "all".
    pub(super) fn wave_entries(&self, idx: usize) -> impl Iterator<Item = &HostEntry> + '_ {
        let wave = idx as u32;
        self.hosts.values().filter(move |h| h.wave == wave)
    }

    pub(super) fn counts(&self, idx: usize) -> Counts {
        let mut c = Counts::default();
        for h in self.wave_entries(idx) {
            let id = &h.id;
            c.size += 1;
            if h.counts_failed() {
                c.failed += 1;
            } else if h.counts_unreachable(self.seen.get(id)) {
                c.unreachable += 1;
            } else if matches!(h.phase, HostPhase::Healthy | HostPhase::Confirmed) {
                c.healthy += 1;
            } else if h.in_flight() {
                c.in_progress += 1;
            }
        }
        c
    }

    pub(super) fn cumulative_failed(&self) -> u32 {
        self.hosts.values().filter(|h| h.counts_failed()).count() as u32
    }

    /// A failure threshold is exceeded: the reason and the evidence.
    pub(super) fn breach(&self, idx: usize) -> Option<(String, BTreeMap<String, String>)> {
        let c = self.counts(idx);
        let total = self.hosts.len() as u32;
        let cum = self.cumulative_failed();
        let wave_limit = self.spec.failure_threshold;
        let cumulative_exceeded = self
            .spec
            .cumulative_failure_threshold
            .is_some_and(|l| l.exceeded(cum, total));
        // The evidence (lists of hosts, a dozen strings) only when a threshold is exceeded:
        // this runs on every step.
        if !wave_limit.exceeded(c.failed, c.size) && !cumulative_exceeded {
            return None;
        }
        let evidence = self.gate_evidence(idx, c);
        if wave_limit.exceeded(c.failed, c.size) {
            return Some((
                format!(
                    "wave {}: {} of {} hosts failed, more than the failure threshold {} allows ({})",
                    idx + 1,
                    c.failed,
                    c.size,
                    wave_limit,
                    wave_limit.allowed(c.size)
                ),
                evidence,
            ));
        }
        if let Some(l) = self.spec.cumulative_failure_threshold
            && l.exceeded(cum, total)
        {
            return Some((
                format!(
                    "{cum} of {total} hosts failed in the rollout, more than the cumulative failure threshold {l} allows ({})",
                    l.allowed(total)
                ),
                evidence,
            ));
        }
        None
    }

    pub(super) fn gate_evidence(&self, idx: usize, c: Counts) -> BTreeMap<String, String> {
        let total = self.hosts.len() as u32;
        let mut e = BTreeMap::new();
        e.insert("wave_size".into(), c.size.to_string());
        e.insert("healthy".into(), c.healthy.to_string());
        e.insert("failed".into(), c.failed.to_string());
        e.insert("unreachable".into(), c.unreachable.to_string());
        e.insert("in_progress".into(), c.in_progress.to_string());
        e.insert(
            "failure_threshold".into(),
            self.spec.failure_threshold.to_string(),
        );
        e.insert(
            "failures_allowed".into(),
            self.spec.failure_threshold.allowed(c.size).to_string(),
        );
        e.insert(
            "unreachable_threshold".into(),
            self.spec.unreachable_threshold.to_string(),
        );
        e.insert(
            "unreachable_allowed".into(),
            self.spec.unreachable_threshold.allowed(c.size).to_string(),
        );
        e.insert(
            "cumulative_failed".into(),
            self.cumulative_failed().to_string(),
        );
        if let Some(l) = self.spec.cumulative_failure_threshold {
            e.insert("cumulative_threshold".into(), l.to_string());
            e.insert("cumulative_allowed".into(), l.allowed(total).to_string());
        }
        let failed: Vec<HostId> = self.waves[idx]
            .hosts
            .iter()
            .filter(|id| self.hosts.get(*id).is_some_and(HostEntry::counts_failed))
            .cloned()
            .collect();
        if !failed.is_empty() {
            e.insert("failed_hosts".into(), join_ids(&failed));
        }
        let unreachable: Vec<HostId> = self.waves[idx]
            .hosts
            .iter()
            .filter(|id| {
                self.hosts
                    .get(*id)
                    .is_some_and(|h| h.counts_unreachable(self.seen.get(id)))
            })
            .cloned()
            .collect();
        if !unreachable.is_empty() {
            e.insert("unreachable_hosts".into(), join_ids(&unreachable));
        }
        e
    }

    /// Canary analysis at the gate of wave `idx`. Each canary host counts from the moment it
    /// reported healthy for its current activation (`healthy_ms`, cleared by every new activate
    /// order, so a retry starts afresh and the failed probes of the restart itself do not count);
    /// the baseline hosts count from the earliest of those moments, so both sides cover the
    /// same interval.
    pub(super) fn analyse(&mut self, idx: usize) -> Comparison {
        let wave = idx as u32;
        let wave_start = self.waves[idx].started_ms.unwrap_or(0);
        let canary: Vec<Window> = self
            .hosts
            .values()
            .filter(|h| {
                h.wave <= wave
                    && h.failure.is_none()
                    && matches!(h.phase, HostPhase::Healthy | HostPhase::Confirmed)
            })
            .map(|h| Window {
                host: h.id.clone(),
                since_ms: h.healthy_ms.unwrap_or(wave_start),
            })
            .collect();
        let since = canary
            .iter()
            .map(|w| w.since_ms)
            .min()
            .unwrap_or(wave_start);
        let baseline: Vec<Window> = self
            .hosts
            .values()
            .filter(|h| h.phase == HostPhase::Pending && self.seen.reachable(&h.id))
            .map(|h| Window {
                host: h.id.clone(),
                since_ms: since,
            })
            .collect();
        let c = analysis::compare(&self.settings.analysis, &self.samples, &canary, &baseline);
        self.comparison = Some(c.clone());
        c
    }

    pub(super) fn gate(&mut self, now: u64, idx: usize) {
        let c = self.counts(idx);
        let comparison = self.analyse(idx);
        let mut evidence = self.gate_evidence(idx, c);
        comparison.evidence(&mut evidence);
        let w = &self.waves[idx];
        let promoted_by = w.promote_by.clone();
        if let Some(t) = w.bake_ends_ms {
            evidence.insert("bake".into(), fmt_dur(self.spec.bake_for(idx)));
            if promoted_by.is_some() && t > now {
                evidence.insert("bake_skipped_ms".into(), (t - now).to_string());
            }
        }
        if let Some((reason, mut e)) = self.breach(idx) {
            e.extend(evidence);
            self.gate_failed(now, idx, reason, e);
            return;
        }
        let unreachable_limit = self.spec.unreachable_threshold;
        if unreachable_limit.exceeded(c.unreachable, c.size) && !w.accept_unreachable {
            let reason = format!(
                "wave {}: {} of {} hosts unreachable, more than the unreachable threshold {} allows ({}); waiting for them to return: {}",
                idx + 1,
                c.unreachable,
                c.size,
                unreachable_limit,
                unreachable_limit.allowed(c.size),
                some_ids(evidence.get("unreachable_hosts").map_or("", String::as_str))
            );
            let w = &mut self.waves[idx];
            w.state = WaveState::Waiting;
            w.promote_by = None;
            self.state = RolloutState::Waiting;
            self.reason = reason.clone();
            self.decide(
                now,
                idx as u32,
                DecisionKind::Wait,
                reason,
                evidence,
                ENGINE,
            );
            return;
        }
        if comparison.verdict == Verdict::CanaryWorse && self.settings.analysis_gates {
            let reason = format!(
                "wave {}: canary analysis says the new release fails health checks significantly more often than the baseline (p = {:.4})",
                idx + 1,
                comparison.p_value.unwrap_or(0.0)
            );
            self.gate_failed(now, idx, reason, evidence);
            return;
        }
        if self.request_gate(now, idx, &mut evidence) {
            return;
        }
        // Promote.
        let healthy: Vec<HostId> = self.waves[idx]
            .hosts
            .iter()
            .filter(|id| {
                self.hosts
                    .get(*id)
                    .is_some_and(|h| h.phase == HostPhase::Healthy && h.failure.is_none())
            })
            .cloned()
            .collect();
        let last = idx + 1 == self.waves.len();
        let requests = match (evidence.get("requests_served"), self.spec.min_requests) {
            (Some(n), Some(min)) => format!(", {n} requests served (at least {min})"),
            _ => String::new(),
        };
        let reason = format!(
            "wave {}: {} of {} hosts healthy, {} failed (threshold {}), {} unreachable{requests}{}",
            idx + 1,
            c.healthy,
            c.size,
            c.failed,
            self.spec.failure_threshold,
            c.unreachable,
            if promoted_by.is_some() {
                "; bake ended early by an operator"
            } else {
                ""
            }
        );
        let actor = promoted_by.unwrap_or_else(|| ENGINE.to_string());
        self.decide(
            now,
            idx as u32,
            DecisionKind::Promote,
            reason,
            evidence,
            &actor,
        );
        let w = &mut self.waves[idx];
        w.state = WaveState::Passed;
        w.promote_by = None;
        self.dirty_header = true;
        for id in &healthy {
            self.issue(now, id, OrderKind::Confirm);
        }
        if last {
            self.complete(now);
        }
    }

    pub(super) fn complete(&mut self, now: u64) {
        if self.state != RolloutState::Running {
            return;
        }
        self.current_wave = self.waves.len().saturating_sub(1);
        self.state = RolloutState::Succeeded;
        self.withdraw_stages();
        let total = self.hosts.len();
        let failed = self.cumulative_failed();
        self.reason = format!("every wave passed: {total} hosts, {failed} failed");
        let mut e = BTreeMap::new();
        e.insert("hosts".into(), total.to_string());
        e.insert("failed".into(), failed.to_string());
        e.insert("waves".into(), self.waves.len().to_string());
        let reason = self.reason.clone();
        self.decide(
            now,
            self.current_wave as u32,
            DecisionKind::Complete,
            reason,
            e,
            ENGINE,
        );
    }

    pub(super) fn gate_failed(
        &mut self,
        now: u64,
        idx: usize,
        reason: String,
        evidence: BTreeMap<String, String>,
    ) {
        match self.spec.on_failure {
            OnFailure::Rollback => {
                self.waves[idx].state = WaveState::Failed;
                self.decide(
                    now,
                    idx as u32,
                    DecisionKind::Rollback,
                    reason.clone(),
                    evidence,
                    ENGINE,
                );
                self.begin_rollback(now, RolloutState::RolledBack, reason);
            }
            OnFailure::Pause => {
                let w = &mut self.waves[idx];
                w.state = WaveState::Paused;
                w.bake_ends_ms = None;
                w.promote_by = None;
                self.state = RolloutState::Paused;
                self.paused_by_failure = true;
                self.reason = format!("{reason}; paused for an operator (on_failure = pause)");
                self.decide(
                    now,
                    idx as u32,
                    DecisionKind::Pause,
                    reason,
                    evidence,
                    ENGINE,
                );
            }
        }
    }

    pub(super) fn check_waiting(&mut self, now: u64) -> bool {
        let idx = self.current_wave;
        if idx >= self.waves.len() {
            return false;
        }
        if let Some((reason, evidence)) = self.breach(idx) {
            self.state = RolloutState::Running;
            self.gate_failed(now, idx, reason, evidence);
            return true;
        }
        // Unknown hosts (just after a restart) are neither back nor missing yet.
        if self.waves[idx]
            .hosts
            .iter()
            .any(|id| self.hosts.contains_key(id) && self.seen.unknown(id))
        {
            return false;
        }
        let c = self.counts(idx);
        if self
            .spec
            .unreachable_threshold
            .exceeded(c.unreachable, c.size)
        {
            return false;
        }
        let evidence = self.gate_evidence(idx, c);
        self.resume_wave(now);
        self.decide(
            now,
            idx as u32,
            DecisionKind::Resume,
            format!(
                "wave {}: enough hosts are reachable again ({} unreachable)",
                idx + 1,
                c.unreachable
            ),
            evidence,
            ENGINE,
        );
        true
    }

    /// After success: bring hosts that joined late or were accepted while unreachable to the
    /// release, and confirm them once healthy.
    pub(super) fn converge(&mut self, now: u64) -> bool {
        let mut changed = false;
        let total = self.hosts.len() as u32;
        let max_in_flight = self
            .spec
            .max_in_flight
            .map_or(u32::MAX, |l| l.allowed_at_least_one(total));
        let mut in_flight = self.hosts.values().filter(|h| h.in_flight()).count() as u32;
        let ids: Vec<HostId> = self.hosts.keys().cloned().collect();
        for id in ids {
            let Some(h) = self.hosts.get(&id) else {
                continue;
            };
            // Hosts that joined late, and hosts of a wave that was promoted while they were
            // unreachable (accepted by an operator), get the release once they are back, within
            // the in-flight budget.
            if h.phase == HostPhase::Pending && self.seen.reachable(&id) && h.failure.is_none() {
                if in_flight >= max_in_flight {
                    continue;
                }
                in_flight += 1;
                self.activate(now, &id);
                changed = true;
            } else if h.phase == HostPhase::Healthy
                && h.failure.is_none()
                && h.order
                    .as_ref()
                    .is_some_and(|o| o.kind == OrderKind::Activate)
            {
                self.issue(now, &id, OrderKind::Confirm);
                changed = true;
            } else if self.seen.reachable(&id)
                && h.failure.is_none()
                && h.phase == HostPhase::Activated
                && h.activated_ms
                    .is_some_and(|t| t + ms(self.spec.healthy_deadline) <= now)
            {
                self.fail_armed_host(now, &id, "not healthy within the healthy deadline".into());
                changed = true;
            }
        }
        changed
    }
}
