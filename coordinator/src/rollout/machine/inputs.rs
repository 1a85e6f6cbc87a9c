//! Input handlers: what each kind of [`Input`] changes in the machine (hosts up and down,
//! health, order results, sequence allocations, store failures and recoveries, operator calls).

use super::*;

impl Rollout {
    pub(super) fn on_host_up(&mut self, now: u64, s: HostSnapshot) {
        self.host_seen(now, s, true);
    }

    /// A host seen connected (or not) in a hello (`hello`: it said hello just now, so whatever
    /// it was sent before may be lost) or in a snapshot (a resynchronisation: a host that was
    /// reachable before and still is has its order already; re-sending it to every such host
    /// was the re-send storm of a lagging task. The driver's per-host backoff repeats an order
    /// that really was lost).
    fn host_seen(&mut self, now: u64, s: HostSnapshot, hello: bool) {
        if !self.hosts.contains_key(&s.host_id) {
            self.maybe_join(now, &s);
            return;
        }
        let svc = s.services.get(&self.spec.service).cloned();
        let Some(h) = self.hosts.get_mut(&s.host_id) else {
            return;
        };
        let seen = self.seen.entry(&s.host_id);
        let was = seen.reach;
        if s.connected && was != Reach::Reachable {
            // Holds sent while it was away were lost: hold it again now if it is armed.
            seen.held_ms = None;
            self.holds_from_ms = 0;
            // It may be staged ahead now.
            self.stage_scan = true;
        }
        seen.reach = match (s.connected, was) {
            (true, _) => Reach::Reachable,
            // A disconnected host in a snapshot right after a restart says nothing new: it
            // stays unknown until it says hello or the resume grace passes.
            (false, Reach::Unknown) => Reach::Unknown,
            (false, _) => Reach::Unreachable,
        };
        if let Some(svc) = svc {
            seen.current = svc.current_release.clone();
            seen.healthy = svc.healthy;
            if svc.last_seq > h.last_seq {
                h.last_seq = svc.last_seq;
                self.dirty_hosts.insert(s.host_id.clone());
            }
        }
        if !s.connected {
            return;
        }
        // Re-send the order the host should be working on (same id, same seq: the agent
        // deduplicates it and replays its result).
        if let Some(o) = h
            .order
            .as_mut()
            .filter(|o| !o.done && o.seq.is_some() && (hello || was != Reach::Reachable))
        {
            // Its answer is awaited from now (the rollback timeout counts from the re-send,
            // not from a send the host may never have seen).
            o.sent_ms = Some(now);
            self.sends.push(s.host_id.clone());
            // Likewise the healthy deadline of an activated host that was away: its agent
            // replays what happened meanwhile (e.g. a dead-man revert nobody could prevent),
            // which must not be pre-empted by a deadline that ran out while it was unreachable.
            if was != Reach::Reachable && h.phase == HostPhase::Activated {
                h.activated_ms = Some(now);
                self.dirty_hosts.insert(s.host_id.clone());
            }
        }
        match was {
            Reach::Reachable => {}
            Reach::Unknown => self.event(
                now,
                format!(
                    "host {} reconnected after the coordinator restart",
                    s.host_id
                ),
            ),
            Reach::Unreachable => {
                self.event(now, format!("host {} is reachable again", s.host_id));
            }
        }
    }

    pub(super) fn on_store_failed(&mut self, now: u64, error: String) {
        // Allocations requested in the failed round were dropped with it: ask again.
        self.requested.clear();
        self.alloc_scan = true;
        if !matches!(self.state, RolloutState::Running | RolloutState::Waiting) {
            self.event(now, format!("saving the rollout failed: {error}"));
            return;
        }
        self.state = RolloutState::Paused;
        self.paused_by_store = true;
        self.paused_by_failure = false;
        self.reason = format!(
            "saving the rollout failed ({error}); paused until the store accepts writes again"
        );
        if let Some(w) = self.waves.get_mut(self.current_wave) {
            w.state = WaveState::Paused;
            w.bake_ends_ms = None;
        }
        let idx = self.current_wave.min(self.waves.len().saturating_sub(1)) as u32;
        let mut e = BTreeMap::new();
        e.insert("store_error".into(), error.clone());
        self.decide(
            now,
            idx,
            DecisionKind::Pause,
            format!("the store refused a save: {error}"),
            e,
            ENGINE,
        );
    }

    pub(super) fn on_store_recovered(&mut self, now: u64) {
        // Orders held back while the store failed went out just now: their clocks start now.
        for h in self.hosts.values_mut() {
            if let Some(o) = h.order.as_mut().filter(|o| !o.done && o.seq.is_some()) {
                o.sent_ms = Some(now);
            }
        }
        if !(self.paused_by_store && self.state == RolloutState::Paused) {
            self.paused_by_store = false;
            return;
        }
        let idx = self.current_wave.min(self.waves.len().saturating_sub(1)) as u32;
        self.resume_wave(now);
        self.decide(
            now,
            idx,
            DecisionKind::Resume,
            "the store accepts writes again".into(),
            BTreeMap::new(),
            ENGINE,
        );
    }

    pub(super) fn on_resync(&mut self, now: u64, snaps: Vec<HostSnapshot>) {
        let mut seen = BTreeSet::new();
        for s in snaps {
            seen.insert(s.host_id.clone());
            if s.connected || self.hosts.contains_key(&s.host_id) {
                self.host_seen(now, s, false);
            } else {
                self.candidates.remove(&s.host_id);
            }
        }
        let gone: Vec<HostId> = self
            .hosts
            .keys()
            .filter(|h| !seen.contains(*h))
            .cloned()
            .collect();
        for h in gone {
            let seen = self.seen.entry(&h);
            if seen.reach == Reach::Reachable {
                seen.reach = Reach::Unreachable;
            }
        }
    }

    pub(super) fn on_host_down(&mut self, now: u64, id: &HostId) {
        self.candidates.remove(id);
        // A cancel that cannot reach the host is not needed: its stage changes nothing it
        // serves (and the agent ends a stage whose download is cut).
        if let Some(o) = self
            .hosts
            .get_mut(id)
            .and_then(|h| h.order.as_mut())
            .filter(|o| o.kind == OrderKind::Cancel && !o.done)
        {
            o.done = true;
            self.dirty_hosts.insert(id.clone());
        }
        if self.hosts.contains_key(id) && self.seen.reach(id) != Reach::Unreachable {
            self.seen.entry(id).reach = Reach::Unreachable;
            self.event(now, format!("host {id} is unreachable"));
        }
    }

    /// Remembers the connected, selected hosts of `fleet` the plan skipped (unhealthy, say, on a
    /// verdict about a process that is gone): their health reports reconsider them for joining.
    pub fn watch_skipped(&mut self, fleet: &[HostSnapshot]) {
        for s in fleet {
            if s.connected
                && !self.hosts.contains_key(&s.host_id)
                && plan::selected(&self.spec, s)
                && plan::skip_reason(&self.spec, s).is_some()
            {
                self.candidates.insert(s.host_id.clone(), s.clone());
            }
        }
    }

    pub(super) fn maybe_join(&mut self, now: u64, s: &HostSnapshot) {
        let joinable = matches!(
            self.state,
            RolloutState::Running
                | RolloutState::Waiting
                | RolloutState::Paused
                | RolloutState::Succeeded
        );
        self.candidates.remove(&s.host_id);
        if !joinable || !s.connected || self.waves.is_empty() || !plan::selected(&self.spec, s) {
            return;
        }
        if plan::skip_reason(&self.spec, s).is_some() {
            // Not now (e.g. no passing health verdict yet): its health reports bring it back.
            self.candidates.insert(s.host_id.clone(), s.clone());
            return;
        }
        let p = plan::planned_host(&self.spec, s);
        let last = self.waves.len() - 1;
        let ordinal = self.hosts.values().map(|h| h.ordinal).max().unwrap_or(0) + 1;
        let entry = HostEntry {
            id: p.host_id.clone(),
            ordinal,
            hostname: p.hostname,
            labels: p.labels,
            domain: p.domain,
            wave: last as u32,
            baseline: p.baseline.clone(),
            phase: HostPhase::Pending,
            failure: None,
            waived: false,
            rollback_failed: None,
            left_without_baseline: false,
            detail: "joined during the rollout".into(),
            order: None,
            activate_order: None,
            orders_issued: 0,
            attempts: 0,
            retry_at_ms: None,
            rollback_at_ms: None,
            last_seq: p.last_seq,
            dispatched_ms: None,
            activated_ms: None,
            healthy_ms: None,
            joined: true,
            stage_warning: None,
        };
        self.hosts.insert_sorted(p.host_id.clone(), entry);
        let seen = self.seen.entry(&p.host_id);
        seen.reach = Reach::Reachable;
        seen.current = p.baseline.clone();
        self.waves[last].hosts.push(p.host_id.clone());
        self.dirty_hosts.insert(p.host_id.clone());
        self.dirty_header = true;
        self.stage_scan = true;
        self.event(
            now,
            format!("host {} joined; added to wave {}", p.host_id, last + 1),
        );
    }

    pub(super) fn on_health(&mut self, now: u64, id: &HostId, sample: HealthSample) {
        if sample.service != self.spec.service {
            return;
        }
        let window = self.settings.analysis.window;
        let Some(h) = self.hosts.get_mut(id) else {
            // Not in the rollout: a selected host whose hello came before its first passing
            // verdict joins now (only rollout hosts are compared by the analysis).
            if let Some(mut snap) = self.candidates.get(id).cloned() {
                if let Some(svc) = snap.services.get_mut(&self.spec.service) {
                    svc.healthy = Some(sample.healthy);
                    if sample.release.is_some() {
                        svc.current_release = sample.release.clone();
                    }
                }
                self.maybe_join(now, &snap);
            }
            return;
        };
        let seen = self.seen.entry(id);
        let before = (seen.healthy, seen.current.clone());
        seen.healthy = Some(sample.healthy);
        if sample.release.is_some() {
            seen.current = sample.release.clone();
        }
        // Most reports repeat what is known: only a change is worth a new status.
        if (seen.healthy, &seen.current) != (before.0, &before.1) {
            self.status_changed = true;
        }
        let turned_bad = !sample.healthy
            && h.phase == HostPhase::Healthy
            && h.failure.is_none()
            && sample
                .release
                .as_ref()
                .is_none_or(|r| *r == self.spec.release)
            && !self.state.is_finished()
            && self.state != RolloutState::RollingBack;
        let checks = format!(
            "{}/{} checks passing",
            sample.checks_passing, sample.checks_total
        );
        self.count_requests(id, &sample);
        self.samples.push(id, sample, window);
        if turned_bad {
            self.fail_armed_host(
                now,
                id,
                format!("turned unhealthy after becoming healthy ({checks})"),
            );
        }
    }

    pub(super) fn on_seqs(&mut self, now: u64, v: Vec<(String, u64)>) {
        let by_order: foldhash::HashMap<String, u64> = v.into_iter().collect();
        if by_order.is_empty() {
            return;
        }
        for (id, h) in self.hosts.iter_mut() {
            let Some(o) = h.order.as_mut() else { continue };
            if o.seq.is_some() {
                continue;
            }
            if let Some(seq) = by_order.get(&o.order_id) {
                o.seq = Some(*seq);
                o.sent_ms = Some(now);
                h.last_seq = h.last_seq.max(*seq);
                self.requested.remove(&o.order_id);
                self.dirty_hosts.insert(id.clone());
                if self.seen.reachable(id) {
                    self.sends.push(id.clone());
                }
            }
        }
    }

    pub(super) fn on_result(&mut self, now: u64, id: &HostId, out: OrderOutcome) {
        if out.rollout_id != self.id || out.service != self.spec.service {
            return;
        }
        let target = self.spec.release.clone();
        let max_attempts = self.settings.max_order_attempts;
        let retry_delay = ms(self.settings.order_retry_delay);
        let Some(h) = self.hosts.get_mut(id) else {
            return;
        };
        if out.current_release.is_some() {
            self.seen.entry(id).current = out.current_release.clone();
        }
        if h.left_without_baseline {
            // Its orders were withdrawn when the rollout rolled back; late results change nothing.
            return;
        }
        let Some(order) = h.order.clone() else { return };
        let kind = if order.order_id == out.order_id {
            order.kind
        } else if h.activate_order.as_deref() == Some(out.order_id.as_str()) {
            OrderKind::Activate
        } else {
            return;
        };
        let is_current = order.order_id == out.order_id;
        if is_current && matches!(kind, OrderKind::Stage | OrderKind::Cancel) {
            self.on_stage_result(now, id, kind, &out);
            return;
        }
        let detail_of = |out: &OrderOutcome| {
            let code = out.code.as_str().to_string();
            if out.message.is_empty() {
                code
            } else {
                format!("{code}: {}", out.message)
            }
        };
        let phase = out.phase;
        let mut fail: Option<String> = None;
        let mut changed = true;
        match (phase, kind) {
            (OrderPhase::Progress | OrderPhase::Staged, _) => {
                h.detail = if phase == OrderPhase::Staged {
                    "staged".into()
                } else {
                    "staging".into()
                };
                changed = false;
            }
            (OrderPhase::Activated, OrderKind::Activate) if h.phase == HostPhase::Dispatched => {
                h.phase = h.phase.on_activated();
                h.activated_ms = Some(now);
                h.detail = format!("activated {target}");
            }
            (OrderPhase::Healthy, OrderKind::Activate)
                if matches!(h.phase, HostPhase::Dispatched | HostPhase::Activated)
                    && h.failure.is_none() =>
            {
                h.phase = h.phase.on_healthy();
                h.activated_ms.get_or_insert(now);
                h.healthy_ms = Some(now);
                self.seen.entry(id).healthy = Some(true);
                h.detail = format!("healthy on {target}");
                if let Some(o) = h.order.as_mut().filter(|_| is_current) {
                    o.done = true;
                }
            }
            (OrderPhase::Confirmed, OrderKind::Confirm) => {
                self.seen.disarmed(id);
                if h.failure.is_none() {
                    h.phase = h.phase.on_confirmed();
                    h.detail = format!("confirmed on {target}");
                }
                if let Some(o) = h.order.as_mut() {
                    o.done = true;
                }
            }
            (OrderPhase::RolledBack, _) => {
                // Back on its baseline, whoever decided it: nothing armed any more.
                self.seen.disarmed(id);
                if h.phase == HostPhase::RollingBack || kind == OrderKind::Rollback {
                    // Also the agent's own rollback while its rollback order waited for it:
                    // the host is recorded as rolled back and never ordered again.
                    h.rollback_at_ms = None;
                    h.phase = h.phase.on_rolled_back();
                    h.detail = format!(
                        "rolled back to {}",
                        out.current_release
                            .as_ref()
                            .map_or("nothing", ReleaseId::as_str)
                    );
                    if let Some(o) = h.order.as_mut().filter(|o| o.kind == OrderKind::Rollback) {
                        o.done = true;
                    }
                } else if h.failure.is_none() && out.code == ResultCode::ConfirmTimeout {
                    // The agent's dead-man switch fired because no confirm or hold reached it:
                    // the coordinator's silence (a partition, a restart), not the release. Never
                    // a failure; the host takes the release again while the rollout goes on.
                    if let Some(o) = h.order.as_mut() {
                        o.done = true;
                    }
                    h.activated_ms = None;
                    h.healthy_ms = None;
                    let redispatch = matches!(
                        self.state,
                        RolloutState::Running
                            | RolloutState::Waiting
                            | RolloutState::Paused
                            | RolloutState::Succeeded
                    );
                    let why = "reverted by its dead-man switch (confirm_timeout) while the coordinator could not hold it; not a release failure";
                    h.phase = h.phase.on_unheld_revert(redispatch);
                    h.detail = if redispatch {
                        format!("{why}; dispatched again")
                    } else {
                        why.to_string()
                    };
                    let msg = format!("host {id} {}", h.detail);
                    self.dirty_hosts.insert(id.clone());
                    self.event(now, msg);
                    if redispatch {
                        // The coordinator's silence used up the wave's time, not the release:
                        // its progress deadline counts again from this re-dispatch, as after a
                        // resume (else the host would fail the moment it is dispatched again).
                        let cur = self.current_wave;
                        if let Some(w) = self
                            .waves
                            .get_mut(cur)
                            .filter(|w| w.hosts.iter().any(|h| h == id))
                        {
                            w.deadline_base_ms = Some(now);
                            self.dirty_header = true;
                        }
                    }
                    return;
                } else if h.failure.is_none() {
                    h.phase = h.phase.on_rolled_back();
                    if let Some(o) = h.order.as_mut() {
                        o.done = true;
                    }
                    h.failure = Some(format!("the agent rolled back ({})", detail_of(&out)));
                    h.detail = h.failure.clone().unwrap_or_default();
                    let msg = format!("host {id} failed: {}", h.detail);
                    self.dirty_hosts.insert(id.clone());
                    self.event(now, msg);
                    return;
                } else {
                    h.phase = h.phase.on_rolled_back();
                }
            }
            // A refusal or failure of an order that already has its final result (e.g. a stale
            // refusal arriving after the agent rolled back) changes nothing.
            (OrderPhase::Failed | OrderPhase::Rejected, _) if is_current && order.done => {
                changed = false;
            }
            (OrderPhase::Failed, OrderKind::Activate) if is_current => {
                if out.code == ResultCode::Busy && h.attempts < max_attempts {
                    h.attempts += 1;
                    h.retry_at_ms = Some(now + retry_delay);
                    h.detail = "agent busy; retrying".into();
                } else if h.failure.is_none() {
                    // The agent refuses an activation (busy) while an earlier one is armed;
                    // any other failure means nothing was armed by it.
                    if out.code != ResultCode::Busy {
                        self.seen.disarmed(id);
                    }
                    h.phase = h.phase.on_failed();
                    if let Some(o) = h.order.as_mut() {
                        o.done = true;
                    }
                    let reason = format!("activation failed ({})", detail_of(&out));
                    h.failure = Some(reason.clone());
                    h.detail = reason.clone();
                    self.dirty_hosts.insert(id.clone());
                    self.event(now, format!("host {id} failed: {reason}"));
                    return;
                }
            }
            (OrderPhase::Failed, OrderKind::Confirm) if is_current => {
                fail = Some(format!("confirm failed ({})", detail_of(&out)));
            }
            (OrderPhase::Failed, OrderKind::Rollback) if is_current => {
                if out.code == ResultCode::Busy && h.attempts < max_attempts {
                    h.attempts += 1;
                    h.retry_at_ms = Some(now + retry_delay);
                } else {
                    h.phase = h.phase.on_failed();
                    let reason = format!("rollback failed ({})", detail_of(&out));
                    h.rollback_failed = Some(reason.clone());
                    h.detail = reason;
                    if let Some(o) = h.order.as_mut() {
                        o.done = true;
                    }
                }
            }
            (OrderPhase::Rejected, _) if is_current => {
                let code = out.code;
                if matches!(code, ResultCode::StaleOrder | ResultCode::Busy)
                    && h.attempts < max_attempts
                {
                    h.attempts += 1;
                    // The agent has applied `last_seq` already (a store restored from a backup
                    // can be behind it): the next order must be allocated past it. A stale
                    // refusal is retried at once, a busy one after the retry delay.
                    h.last_seq = h.last_seq.max(out.seq).max(out.last_seq);
                    h.retry_at_ms = Some(if code == ResultCode::StaleOrder {
                        now
                    } else {
                        now + retry_delay
                    });
                    h.detail = format!("order refused ({}); retrying", detail_of(&out));
                } else if kind == OrderKind::Rollback {
                    h.phase = h.phase.on_failed();
                    h.rollback_failed = Some(format!("rollback refused ({})", detail_of(&out)));
                    if let Some(o) = h.order.as_mut() {
                        o.done = true;
                    }
                } else {
                    fail = Some(format!(
                        "{} order refused ({})",
                        order_kind_str(kind),
                        detail_of(&out)
                    ));
                }
            }
            _ => changed = false,
        }
        if changed {
            self.dirty_hosts.insert(id.clone());
        }
        if let Some(reason) = fail {
            self.fail_host(now, id, reason);
        }
    }

    /// The refusal of `action` in the rollout's current state, for a rollout that is not
    /// running (its task is gone, so nothing can change it).
    pub fn refusal(&self, action: OperatorAction) -> ControlError {
        ControlError {
            rollout: self.id.clone(),
            state: self.state.as_str().to_string(),
            action: action.as_str().to_string(),
            applies: action.applies_to().to_string(),
            extra: String::new(),
        }
    }

    pub(super) fn on_operator(
        &mut self,
        now: u64,
        action: OperatorAction,
        actor: &str,
        reason: &str,
    ) -> Result<(), ControlError> {
        let refuse = |s: &Self, extra: String| ControlError {
            rollout: s.id.clone(),
            state: s.state.as_str().to_string(),
            action: action.as_str().to_string(),
            applies: action.applies_to().to_string(),
            extra,
        };
        let why = |default: &str| {
            if reason.is_empty() {
                default.to_string()
            } else {
                reason.to_string()
            }
        };
        let idx = self.current_wave.min(self.waves.len().saturating_sub(1)) as u32;
        match action {
            OperatorAction::Pause => {
                if !matches!(self.state, RolloutState::Running | RolloutState::Waiting) {
                    return Err(refuse(self, String::new()));
                }
                self.state = RolloutState::Paused;
                self.paused_by_failure = false;
                self.paused_for_data = false;
                self.reason = format!("paused by {actor}: {}", why("no reason given"));
                if let Some(w) = self.waves.get_mut(self.current_wave) {
                    w.state = WaveState::Paused;
                    w.bake_ends_ms = None;
                }
                self.decide(
                    now,
                    idx,
                    DecisionKind::Pause,
                    why("operator pause"),
                    BTreeMap::new(),
                    actor,
                );
            }
            OperatorAction::Resume => {
                if !matches!(self.state, RolloutState::Paused | RolloutState::Waiting) {
                    return Err(refuse(self, String::new()));
                }
                let mut evidence = BTreeMap::new();
                if self.paused_by_failure {
                    let waived: Vec<HostId> = self
                        .hosts
                        .values_mut()
                        .filter(|h| h.counts_failed())
                        .map(|h| {
                            h.waived = true;
                            h.id.clone()
                        })
                        .collect();
                    self.dirty_hosts.extend(waived.iter().cloned());
                    if !waived.is_empty() {
                        evidence.insert("waived_failures".into(), join_ids(&waived));
                    }
                }
                if self.state == RolloutState::Waiting
                    && let Some(w) = self.waves.get_mut(self.current_wave)
                {
                    w.accept_unreachable = true;
                    evidence.insert("accepted_unreachable".into(), "true".into());
                }
                self.resume_wave(now);
                self.decide(
                    now,
                    idx,
                    DecisionKind::Resume,
                    why("operator resume"),
                    evidence,
                    actor,
                );
            }
            OperatorAction::Promote => {
                // A wave paused for too few requests may be accepted as it is.
                let for_data = self.state == RolloutState::Paused && self.paused_for_data;
                if !matches!(self.state, RolloutState::Running | RolloutState::Waiting) && !for_data
                {
                    return Err(refuse(self, String::new()));
                }
                if for_data {
                    self.resume_wave(now);
                }
                if self.state == RolloutState::Waiting {
                    if let Some(w) = self.waves.get_mut(self.current_wave) {
                        w.accept_unreachable = true;
                    }
                    self.resume_wave(now);
                }
                let Some(w) = self.waves.get_mut(self.current_wave) else {
                    return Err(refuse(self, "; there is no wave to promote".into()));
                };
                w.promote_by = Some(actor.to_string());
                self.dirty_header = true;
                // The gate records the promote decision itself, with its evidence.
                self.event(
                    now,
                    format!(
                        "{actor} asked to promote wave {} now: {}",
                        idx + 1,
                        why("no reason given")
                    ),
                );
            }
            OperatorAction::Abort => {
                if !matches!(
                    self.state,
                    RolloutState::Running | RolloutState::Paused | RolloutState::Waiting
                ) {
                    return Err(refuse(self, String::new()));
                }
                let r = format!("aborted by {actor}: {}", why("no reason given"));
                if let Some(w) = self.waves.get_mut(self.current_wave) {
                    w.state = WaveState::Failed;
                }
                let evidence = self.touched_evidence();
                self.decide(
                    now,
                    idx,
                    DecisionKind::Abort,
                    why("operator abort"),
                    evidence,
                    actor,
                );
                self.begin_rollback(now, RolloutState::Aborted, r);
            }
            OperatorAction::Retry => {
                if self.state != RolloutState::Paused {
                    return Err(refuse(self, String::new()));
                }
                let wave = self.current_wave as u32;
                let retry: Vec<HostId> = self
                    .hosts
                    .values()
                    .filter(|h| {
                        h.wave == wave
                            && h.failure.is_some()
                            && matches!(h.phase, HostPhase::Failed | HostPhase::RolledBack)
                    })
                    .map(|h| h.id.clone())
                    .collect();
                if retry.is_empty() {
                    return Err(refuse(
                        self,
                        format!(
                            "; wave {} has no failed host that is back on its baseline",
                            wave + 1
                        ),
                    ));
                }
                for id in &retry {
                    if let Some(h) = self.hosts.get_mut(id) {
                        h.failure = None;
                        h.waived = false;
                        h.left_without_baseline = false;
                        h.phase = h.phase.on_retry();
                        h.attempts = 0;
                        h.detail = "retry".into();
                        self.dirty_hosts.insert(id.clone());
                    }
                }
                let mut evidence = BTreeMap::new();
                evidence.insert("hosts".into(), join_ids(&retry));
                self.resume_wave(now);
                self.decide(
                    now,
                    wave,
                    DecisionKind::Retry,
                    why("operator retry"),
                    evidence,
                    actor,
                );
            }
            OperatorAction::Rollback => {
                if self.state != RolloutState::Succeeded {
                    return Err(refuse(self, String::new()));
                }
                let r = format!("rolled back by {actor}: {}", why("no reason given"));
                let evidence = self.touched_evidence();
                self.decide(
                    now,
                    idx,
                    DecisionKind::ManualRollback,
                    why("operator rollback"),
                    evidence,
                    actor,
                );
                self.finished_reported = false;
                self.begin_rollback(now, RolloutState::RolledBack, r);
            }
        }
        Ok(())
    }
}
