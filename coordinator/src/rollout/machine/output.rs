//! Output projections: the orders to send, the commands of a step (persist, allocate, send),
//! and the status operators see.

use super::*;

impl Rollout {
    pub(super) fn order_for(&self, h: &HostEntry) -> Option<Order> {
        let o = h.order.as_ref()?;
        let seq = o.seq?;
        let action = match o.kind {
            OrderKind::Activate => OrderAction::Activate {
                release: self.release.clone(),
                healthy_deadline: self.spec.healthy_deadline,
                min_healthy: self.spec.min_healthy,
                confirm_deadline: Some(self.confirm_deadline(h.wave as usize)),
                traffic_weight: self.traffic_weight(h.wave as usize),
            },
            OrderKind::Confirm => OrderAction::Confirm {
                release: self.spec.release.clone(),
                // A weighted wave's hosts go to full weight once it passed.
                traffic_weight: self.spec.weights.as_ref().map(|_| 100),
            },
            OrderKind::Rollback => OrderAction::Rollback { to: o.to.clone() },
            OrderKind::Stage => OrderAction::Stage {
                release: self.release.clone(),
            },
            OrderKind::Cancel => OrderAction::Cancel,
        };
        Some(Order {
            order_id: o.order_id.clone(),
            rollout_id: self.id.clone(),
            seq,
            // Stamped by the registry when the order is sent: the epoch of this coordinator run.
            epoch: 0,
            service: self.spec.service.clone(),
            action,
        })
    }

    /// The traffic weight an activate order gives a host of plan wave `wave` (see the spec's
    /// traffic weights); `None`: the spec gives none.
    fn traffic_weight(&self, wave: usize) -> Option<u8> {
        self.waves
            .get(wave)
            .and_then(|w| self.spec.weight_for_wave(&w.size_expr))
    }

    /// How long an agent waits for a confirm after activating: the time the coordinator may
    /// legitimately need (becoming healthy, then the bake) plus [`EngineSettings::confirm_grace`].
    /// When the wave is paced (in-flight, unavailability or domain budgets), early hosts also
    /// wait for later ones, so the progress deadline bounds the first part instead.
    pub fn confirm_deadline(&self, wave: usize) -> Duration {
        let paced = self.spec.max_in_flight.is_some()
            || self.spec.max_unavailable.is_some()
            || self.spec.max_domains_in_flight.is_some();
        let first = if paced {
            self.spec.progress_deadline
        } else {
            self.spec.healthy_deadline
        };
        (first + self.spec.bake_for(wave) + self.settings.confirm_grace)
            .min(serin_proto::MAX_ORDER_DEADLINE)
    }

    /// How often an activated, unconfirmed host is held: a third of its confirm deadline, so
    /// one or two lost holds still leave the agent's switch fed.
    fn hold_interval(&self, h: &HostEntry) -> u64 {
        (ms(self.confirm_deadline(h.wave as usize)) / 3).max(1)
    }

    /// When `h` needs its next `HoldConfirm`, if it needs one: its agent may be armed for this
    /// rollout ([`Observed::armed_since`]: dispatched and not seen confirmed, rolled back or
    /// failed without arming — failed, paused, rolling back and re-dispatched hosts included),
    /// it is reachable, and the rollout is live: running, waiting or paused (the coordinator is
    /// still deciding what the host runs), or converging after success (then only the hosts it
    /// still means to confirm; a failed host is left to its switch, which reverts it, the way
    /// the rollout wanted it to go). A rollout rolling back or finished holds nothing. The first
    /// hold is due a third of the confirm deadline after the first dispatch, well before the
    /// agent's switch (armed later than that) can fire, and again at once on a reconnect.
    pub(super) fn hold_due(&self, h: &HostEntry) -> Option<u64> {
        let live = match self.state {
            RolloutState::Running | RolloutState::Waiting | RolloutState::Paused => true,
            RolloutState::Succeeded => {
                h.failure.is_none()
                    && matches!(
                        h.phase,
                        HostPhase::Dispatched | HostPhase::Activated | HostPhase::Healthy
                    )
            }
            _ => false,
        };
        let seen = self.seen.get(&h.id);
        if !live || seen.reach != Reach::Reachable {
            return None;
        }
        let armed_since = seen.armed_since?;
        Some(seen.held_ms.unwrap_or(armed_since) + self.hold_interval(h))
    }

    /// The holds due at `now`; each host's next one is due an interval later.
    fn holds(&mut self, now: u64) -> Vec<Command> {
        if now < self.holds_from_ms {
            return Vec::new();
        }
        let mut due: Vec<(HostId, usize)> = Vec::new();
        let mut next = u64::MAX;
        for h in self.hosts.values() {
            match self.hold_due(h) {
                Some(t) if t <= now => {
                    due.push((h.id.clone(), h.wave as usize));
                    next = next.min(now + self.hold_interval(h));
                }
                Some(t) => next = next.min(t),
                None => {}
            }
        }
        self.holds_from_ms = next;
        due.into_iter()
            .map(|(host, wave)| {
                self.seen.entry(&host).held_ms = Some(now);
                Command::Hold {
                    hold: HoldConfirm {
                        service: self.spec.service.clone(),
                        release: self.spec.release.clone(),
                        confirm_deadline: self.confirm_deadline(wave),
                    },
                    host,
                }
            })
            .collect()
    }

    pub(super) fn drain(&mut self, now: u64, refused: Option<ControlError>) -> Vec<Command> {
        // Holds first: they need no save, so a save that fails must not keep them back.
        let mut out = self.holds(now);
        if self.dirty_header || !self.dirty_hosts.is_empty() || !self.events.is_empty() {
            self.status_changed = true;
            self.updated_ms = now;
            let hosts = std::mem::take(&mut self.dirty_hosts)
                .into_iter()
                .filter(|id| self.hosts.contains_key(id))
                .collect();
            out.push(Command::Persist(Persist {
                header: self.save_header(),
                hosts,
                events: std::mem::take(&mut self.events),
            }));
            self.dirty_header = false;
        }
        let mut alloc = Vec::new();
        let scan = std::mem::take(&mut self.alloc_scan);
        for h in self.hosts.values().filter(|_| scan) {
            if let Some(o) = &h.order
                && o.seq.is_none()
                && !o.done
                && !self.requested.contains(&o.order_id)
            {
                alloc.push(SeqRequest {
                    host: h.id.clone(),
                    order_id: o.order_id.clone(),
                    at_least: h.last_seq,
                });
            }
        }
        for r in &alloc {
            self.requested.insert(r.order_id.clone());
        }
        if !alloc.is_empty() {
            out.push(Command::AllocateSeqs(alloc));
        }
        let mut sent = foldhash::HashSet::default();
        for id in std::mem::take(&mut self.sends) {
            if sent.contains(&id) {
                continue;
            }
            sent.insert(id.clone());
            // An order that became done within the step (withdrawn, say: a stage of a host
            // that failed, or once a rollback was decided) is not sent.
            if let Some(h) = self.hosts.get(&id)
                && h.order.as_ref().is_some_and(|o| !o.done)
                && let Some(order) = self.order_for(h)
            {
                out.push(Command::Send { host: id, order });
            }
        }
        for id in &sent {
            if let Some(o) = self.hosts.get_mut(id).and_then(|h| h.order.as_mut()) {
                o.sent_ms = Some(now);
            }
        }
        if let Some(e) = refused {
            out.push(Command::Refused(e));
        }
        if self.state.is_finished() && !self.finished_reported {
            self.finished_reported = true;
            out.push(Command::Finished(self.state));
        }
        out
    }

    /// The rollout as operators see it.
    pub fn status(&self) -> RolloutView {
        self.status_with(true)
    }

    /// [`Rollout::status`] without the hosts' views (their waves' counts say how they fare):
    /// what a new rollout's status channel starts with until its first step publishes the
    /// whole status, so that nothing walks every host before the canary's orders are out.
    pub fn status_of_waves(&self) -> RolloutView {
        self.status_with(false)
    }

    fn status_with(&self, with_hosts: bool) -> RolloutView {
        let waves = (0..self.waves.len())
            .map(|i| {
                let w = &self.waves[i];
                let c = self.counts(i);
                WaveView {
                    index: w.index,
                    size: c.size,
                    state: w.state,
                    succeeded: c.healthy,
                    failed: c.failed,
                    unreachable: c.unreachable,
                    in_progress: c.in_progress,
                    started_ms: w.started_ms,
                    bake_ends_ms: w.bake_ends_ms,
                }
            })
            .collect();
        let mut hosts: Vec<&HostEntry> = if with_hosts {
            self.hosts.values().collect()
        } else {
            Vec::new()
        };
        hosts.sort_by(|a, b| (a.wave, &a.id).cmp(&(b.wave, &b.id)));
        let hosts = hosts
            .into_iter()
            .map(|h| {
                let final_phase = matches!(
                    h.phase,
                    HostPhase::Confirmed
                        | HostPhase::Failed
                        | HostPhase::RolledBack
                        | HostPhase::Skipped
                );
                // An unknown host (just after a restart) keeps its last known phase; the detail
                // says that it has not been heard from yet.
                let seen = self.seen.get(&h.id);
                let phase = if seen.reach == Reach::Unreachable && !final_phase {
                    ShownPhase::Unreachable
                } else {
                    ShownPhase::Phase(h.phase)
                };
                let target = if matches!(h.phase, HostPhase::RollingBack | HostPhase::RolledBack) {
                    h.baseline.clone()
                } else {
                    Some(self.spec.release.clone())
                };
                let mut detail = match (&h.rollback_failed, &h.failure) {
                    (Some(r), _) => r.clone(),
                    (None, Some(f)) if h.detail != *f => format!("{f}; {}", h.detail),
                    _ => h.detail.clone(),
                };
                if let Some(w) = h
                    .stage_warning
                    .as_ref()
                    .filter(|_| matches!(h.phase, HostPhase::Pending | HostPhase::Dispatched))
                    .filter(|w| !detail.contains(w.as_str()))
                {
                    detail = format!("{detail}; warning: {w}");
                }
                if seen.reach == Reach::Unknown && !final_phase {
                    detail = format!("not heard from since the coordinator restarted; {detail}");
                }
                HostView {
                    id: h.id.clone(),
                    hostname: h.hostname.clone(),
                    wave: h.wave,
                    phase,
                    baseline: h.baseline.clone(),
                    target,
                    current: seen.current.clone(),
                    healthy: seen.healthy.unwrap_or(false),
                    detail,
                    labels: h.labels.clone(),
                }
            })
            .collect();
        RolloutView {
            id: self.id.clone(),
            spec: self.spec.clone(),
            state: self.state,
            reason: self.reason.clone(),
            current_wave: self.current_wave as u32,
            waves,
            hosts,
            comparison: self.comparison.clone(),
            decisions: self.decisions.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
        }
    }
}
