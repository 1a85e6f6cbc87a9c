//! Whole-rollout scenarios driving the pure machine with a fake clock and scripted agents.

use std::collections::{BTreeMap, BTreeSet};

use crate::fleet::{OrderPhase, ResultCode};
use serin_proto::{HostId, Order, OrderAction, ReleaseId, ServiceName, wire};

use super::{wire_spec, wire_status};
use crate::fleet::{HealthSample, HostSnapshot, OrderOutcome};
use crate::rollout::machine::{
    Command, ControlError, HostPhase, Input, OperatorAction, Rollout, RolloutState, WaveState,
};
use crate::rollout::plan::{self, Plan};
use crate::rollout::record::{self, HostRecord};
use crate::rollout::settings::EngineSettings;
use crate::rollout::spec::RolloutSpec;
use crate::rollout::testing::{host, release};

const T0: u64 = 1_700_000_000_000;

fn hid(s: &str) -> HostId {
    HostId::new(s).unwrap()
}

/// The machine plus a fake store (records as bytes), a seq allocator and a send log.
#[derive(Clone)]
struct Sim {
    m: Rollout,
    now: u64,
    seqs: BTreeMap<HostId, u64>,
    header: Vec<u8>,
    hosts: BTreeMap<HostId, Vec<u8>>,
    events: Vec<String>,
    sent: Vec<(u64, HostId, Order)>,
    holds: Vec<(u64, HostId, serin_proto::HoldConfirm)>,
    answered: BTreeSet<String>,
    finished: Vec<RolloutState>,
    refused: Option<ControlError>,
    fleet: Vec<HostSnapshot>,
    settings: EngineSettings,
}

impl Sim {
    fn new(fleet: Vec<HostSnapshot>, spec: wire::RolloutSpec) -> Self {
        Self::with_settings(fleet, spec, EngineSettings::default())
    }

    fn with_settings(
        fleet: Vec<HostSnapshot>,
        spec: wire::RolloutSpec,
        settings: EngineSettings,
    ) -> Self {
        let spec = RolloutSpec::try_from(crate::control_service::raw_spec_from_wire(spec)).unwrap();
        let p = plan::plan(&spec, &fleet);
        let m = Rollout::new("r-1", spec, release(), &p, settings.clone(), T0);
        let mut s = Sim {
            m,
            now: T0,
            seqs: BTreeMap::new(),
            header: Vec::new(),
            hosts: BTreeMap::new(),
            events: Vec::new(),
            sent: Vec::new(),
            holds: Vec::new(),
            answered: BTreeSet::new(),
            finished: Vec::new(),
            refused: None,
            fleet,
            settings,
        };
        s.feed(Input::Tick);
        s
    }

    fn plan(&self) -> Plan {
        plan::plan(self.m.spec(), &self.fleet)
    }

    fn feed(&mut self, input: Input) {
        let cmds = self.m.step(self.now, input);
        self.run(cmds);
    }

    fn run(&mut self, cmds: Vec<Command>) {
        for c in cmds {
            match c {
                Command::Persist(p) => {
                    self.header = record::encode(&p.header);
                    for id in p.hosts {
                        let h = self.m.host(&id).expect("a saved host is in the rollout");
                        self.hosts.insert(id, record::encode_host(h));
                    }
                    self.events.extend(p.events.into_iter().map(|e| e.text));
                }
                Command::AllocateSeqs(reqs) => {
                    let got = crate::rollout::testing::allocate_seqs(&mut self.seqs, reqs);
                    let more = self.m.step(self.now, Input::SeqsAllocated(got));
                    self.run(more);
                }
                Command::Send { host, order } => {
                    // Invariant: what is sent was persisted first, with the same id and seq.
                    let rec: HostRecord =
                        record::decode_host("r-1", host.as_str(), &self.hosts[&host]).unwrap();
                    let o = rec.host.order.expect("order persisted before it is sent");
                    assert_eq!(o.order_id, order.order_id);
                    assert_eq!(o.seq, Some(order.seq));
                    self.sent.push((self.now, host, order));
                }
                Command::Hold { host, hold } => self.holds.push((self.now, host, hold)),
                Command::Refused(e) => self.refused = Some(e),
                Command::Finished(s) => self.finished.push(s),
            }
        }
    }

    /// Advance the clock by `ms`, ticking at every deadline on the way.
    fn advance(&mut self, ms: u64) {
        let end = self.now + ms;
        while let Some(d) = self.m.next_deadline().filter(|d| *d <= end) {
            self.now = d.max(self.now);
            self.feed(Input::Tick);
            if self.m.next_deadline() == Some(d) {
                break;
            }
        }
        self.now = end;
        self.feed(Input::Tick);
    }

    fn outcome(
        &self,
        order: &Order,
        phase: OrderPhase,
        code: ResultCode,
        current: &str,
    ) -> OrderOutcome {
        OrderOutcome {
            order_id: order.order_id.clone(),
            rollout_id: order.rollout_id.clone(),
            seq: order.seq,
            service: ServiceName::new("web").unwrap(),
            release: None,
            phase,
            code,
            message: String::new(),
            current_release: Some(ReleaseId::new(current).unwrap()),
            last_seq: 0,
        }
    }

    fn reply(
        &mut self,
        host: &HostId,
        order: &Order,
        phase: OrderPhase,
        code: ResultCode,
        current: &str,
    ) {
        let outcome = self.outcome(order, phase, code, current);
        self.feed(Input::OrderResult {
            host: host.clone(),
            outcome,
        });
    }

    /// Unanswered orders, oldest first.
    fn pending(&self) -> Vec<(HostId, Order)> {
        self.sent
            .iter()
            .filter(|(_, _, o)| !self.answered.contains(&o.order_id))
            .map(|(_, h, o)| (h.clone(), o.clone()))
            .collect()
    }

    /// Every agent answers every pending order successfully, except `bad` hosts, whose
    /// activation fails with `bad_code` (FAILED) or a dead-man rollback.
    fn agents(&mut self, bad: &[&str], dead_man: bool) {
        for (h, o) in self.pending() {
            self.answered.insert(o.order_id.clone());
            match &o.action {
                OrderAction::Activate { .. } if bad.contains(&h.as_str()) => {
                    if dead_man {
                        self.reply(&h, &o, OrderPhase::Activated, ResultCode::Ok, "web-2");
                        self.reply(
                            &h,
                            &o,
                            OrderPhase::RolledBack,
                            ResultCode::ServiceFailedToStart,
                            "web-1",
                        );
                    } else {
                        self.reply(
                            &h,
                            &o,
                            OrderPhase::Failed,
                            ResultCode::HashMismatch,
                            "web-1",
                        );
                    }
                }
                OrderAction::Activate { .. } => {
                    self.reply(&h, &o, OrderPhase::Activated, ResultCode::Ok, "web-2");
                    self.reply(&h, &o, OrderPhase::Healthy, ResultCode::Ok, "web-2");
                }
                OrderAction::Confirm { .. } => {
                    self.reply(&h, &o, OrderPhase::Confirmed, ResultCode::Ok, "web-2")
                }
                OrderAction::Rollback { to } => {
                    let to = to.as_ref().map_or("web-1", ReleaseId::as_str).to_string();
                    self.reply(&h, &o, OrderPhase::RolledBack, ResultCode::Ok, &to)
                }
                // A stage or a cancel leaves what runs alone.
                OrderAction::Stage { .. } => {
                    self.reply(&h, &o, OrderPhase::Staged, ResultCode::Ok, "web-1")
                }
                OrderAction::Cancel => {
                    self.reply(&h, &o, OrderPhase::Cancelled, ResultCode::Ok, "web-1")
                }
            }
        }
    }

    fn sent_kinds(&self, kind: &str) -> Vec<String> {
        self.sent
            .iter()
            .filter(|(_, _, o)| o.action.kind() == kind)
            .map(|(_, h, _)| h.to_string())
            .collect()
    }

    fn operator(&mut self, action: OperatorAction) -> Result<(), ControlError> {
        self.refused = None;
        self.feed(Input::Operator {
            action,
            actor: "alice".into(),
            reason: "test".into(),
        });
        match self.refused.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn phase(&self, h: &str) -> HostPhase {
        self.m.host(&hid(h)).unwrap().phase
    }

    fn decision_kinds(&self) -> Vec<String> {
        self.m
            .decisions()
            .iter()
            .map(|d| d.kind.as_str().to_string())
            .collect()
    }

    /// A coordinator crash and restart now: the machine is rebuilt from what was persisted and
    /// the send log starts afresh.
    fn restart(&mut self) {
        let hosts: Vec<_> = self.hosts.clone().into_iter().collect();
        let d = record::decode_rollout("r-1", &self.header, &hosts).unwrap();
        self.m = Rollout::restore(d.header, d.hosts, self.settings.clone(), self.now).unwrap();
        self.sent.clear();
        self.answered.clear();
    }

    /// A health sample of service web from `h` now, with one check passing or failing.
    fn health(&mut self, h: &str, release: &str, passing: bool) {
        self.feed(Input::Health {
            host: hid(h),
            sample: HealthSample {
                service: ServiceName::new("web").unwrap(),
                release: Some(ReleaseId::new(release).unwrap()),
                healthy: passing,
                checks_passing: u32::from(passing),
                checks_total: 1,
                probe_latency_us: Some(1_000),
                restarts: 0,
                cpu_percent: 1.0,
                rss_bytes: 1,
                observed_unix_ms: self.now,
                requests_total: None,
            },
        });
    }

    fn status_of(&self, h: &str) -> wire::HostProgress {
        wire_status(&self.m)
            .hosts
            .into_iter()
            .find(|p| p.host_id == h)
            .unwrap()
    }
}

fn fleet(n: usize) -> Vec<HostSnapshot> {
    (1..=n)
        .map(|i| host(&format!("h{i:02}"), "eu-1", "web-1"))
        .collect()
}

fn zoned() -> Vec<HostSnapshot> {
    let mut f = Vec::new();
    for z in ["eu-1", "eu-2", "eu-3"] {
        for i in 1..=3 {
            f.push(host(&format!("{z}-h{i}"), z, "web-1"));
        }
    }
    f
}

#[test]
fn healthy_rollout_passes_every_wave_and_no_wave_starts_before_the_previous_gate() {
    let mut s = Sim::new(fleet(10), wire_spec(&["1", "50%", "100%"]));
    let p = s.plan();
    assert_eq!(
        s.sent_kinds("activate"),
        vec!["h01"],
        "only the canary is dispatched first"
    );
    // Dispatch order per wave must equal the plan.
    for (wi, w) in p.waves.iter().enumerate() {
        let before = s.sent_kinds("activate").len();
        s.agents(&[], false);
        assert_eq!(s.m.waves()[wi].state, WaveState::Baking);
        let bake_ends = s.m.waves()[wi].bake_ends_ms.unwrap();
        // Just before the bake ends nothing new is dispatched.
        s.advance(bake_ends - s.now - 1);
        assert_eq!(
            s.sent_kinds("activate").len(),
            before,
            "wave {} started before the gate",
            wi + 1
        );
        s.advance(1);
        assert_eq!(s.m.waves()[wi].state, WaveState::Passed);
        let planned: Vec<String> = w.hosts.iter().map(|h| h.host_id.to_string()).collect();
        let confirms_for_wave: Vec<String> = s
            .sent
            .iter()
            .filter(|(_, h, o)| o.action.kind() == "confirm" && planned.contains(&h.to_string()))
            .map(|(_, h, _)| h.to_string())
            .collect();
        assert_eq!(
            confirms_for_wave, planned,
            "confirm orders go to the wave's hosts at its gate"
        );
    }
    s.agents(&[], false);
    assert_eq!(s.m.state(), RolloutState::Succeeded);
    assert_eq!(s.finished, vec![RolloutState::Succeeded]);
    assert_eq!(
        s.decision_kinds(),
        vec!["promote", "promote", "promote", "complete"]
    );
    for h in wire_status(&s.m).hosts {
        assert_eq!(h.phase().as_str(), "confirmed", "{h:?}");
    }
    // Activates went out wave by wave, exactly the planned cohorts.
    let planned: Vec<String> = p.hosts().map(|h| h.host_id.to_string()).collect();
    assert_eq!(s.sent_kinds("activate"), planned);
    // Each activation carries a confirm deadline beyond healthy deadline + bake.
    let (_, _, o) = &s.sent[0];
    match &o.action {
        OrderAction::Activate {
            confirm_deadline,
            healthy_deadline,
            ..
        } => {
            assert_eq!(*healthy_deadline, std::time::Duration::from_secs(20));
            assert_eq!(
                *confirm_deadline,
                Some(std::time::Duration::from_secs(20 + 10 + 60))
            );
        }
        a => panic!("unexpected {a:?}"),
    }
    assert!(s.m.is_quiescent());
}

#[test]
fn plan_is_exactly_what_runs_with_spread_and_domain_limits() {
    let mut w = wire_spec(&["3", "100%"]);
    w.spread_label = "zone".into();
    w.max_domains_in_flight = 1;
    let mut s = Sim::new(zoned(), w);
    let p = s.plan();
    // With one domain in flight at a time, the canary goes zone by zone.
    assert_eq!(s.sent_kinds("activate"), vec!["eu-1-h1"]);
    for _ in 0..20 {
        s.agents(&[], false);
        s.advance(10_000);
    }
    assert_eq!(s.m.state(), RolloutState::Succeeded);
    let planned: Vec<String> = p.hosts().map(|h| h.host_id.to_string()).collect();
    assert_eq!(&planned[..3], &["eu-1-h1", "eu-2-h1", "eu-3-h1"]);
    let sent = s.sent_kinds("activate");
    // The canary went out one domain at a time, in plan order.
    assert_eq!(&sent[..3], &planned[..3]);
    // Later waves keep their planned membership; within a wave the domain limit groups hosts
    // of the domain in flight together.
    let mut a: Vec<String> = sent[3..].to_vec();
    let mut b: Vec<String> = planned[3..].to_vec();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(&sent[3..5], &["eu-1-h2", "eu-1-h3"]);
    // Wave membership in status matches the plan.
    let st = wire_status(&s.m);
    for (wi, w) in p.waves.iter().enumerate() {
        for h in &w.hosts {
            let hp = st
                .hosts
                .iter()
                .find(|x| x.host_id == h.host_id.as_str())
                .unwrap();
            assert_eq!(hp.wave as usize, wi);
        }
    }
}

#[test]
fn crash_at_start_canary_rolls_back_only_canary_hosts() {
    let mut s = Sim::new(fleet(10), wire_spec(&["2", "100%"]));
    assert_eq!(s.sent_kinds("activate"), vec!["h01", "h02"]);
    // h01 crashes at start; its agent's dead-man switch rolls it back. h02 is healthy.
    s.agents(&["h01"], true);
    assert_eq!(
        s.m.state(),
        RolloutState::RollingBack,
        "fails fast, without waiting for the bake"
    );
    assert_eq!(
        s.sent_kinds("rollback"),
        vec!["h02"],
        "only the touched canary host is rolled back"
    );
    s.agents(&[], false);
    assert_eq!(s.m.state(), RolloutState::RolledBack);
    assert_eq!(s.finished, vec![RolloutState::RolledBack]);
    assert_eq!(
        s.sent_kinds("activate"),
        vec!["h01", "h02"],
        "no other host was touched"
    );
    let d =
        s.m.decisions()
            .iter()
            .find(|d| d.kind.as_str() == "rollback")
            .unwrap();
    assert_eq!(d.evidence["failed"], "1");
    assert_eq!(d.evidence["failures_allowed"], "0");
    assert_eq!(d.actor, "engine");
    assert!(
        wire_status(&s.m).reason.contains("failure threshold"),
        "{}",
        wire_status(&s.m).reason
    );
    // The rollback goes to the baseline release.
    let (_, _, o) = s
        .sent
        .iter()
        .find(|(_, _, o)| o.action.kind() == "rollback")
        .unwrap();
    assert_eq!(
        o.action,
        OrderAction::Rollback {
            to: Some(ReleaseId::new("web-1").unwrap())
        }
    );
    assert_eq!(s.phase("h01"), HostPhase::RolledBack);
    assert_eq!(s.phase("h03"), HostPhase::Pending);
}

#[test]
fn one_zone_failing_rolls_back_every_touched_host() {
    let mut w = wire_spec(&["3", "100%"]);
    w.spread_label = "zone".into();
    w.failure_threshold = "1".into();
    let mut s = Sim::new(zoned(), w);
    s.agents(&[], false);
    s.advance(10_000);
    assert_eq!(s.m.current_wave(), 1);
    // Zone eu-2's remaining two hosts fail to activate: 2 > 1 allowed.
    s.agents(&["eu-2-h2", "eu-2-h3"], false);
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    let mut rolled = s.sent_kinds("rollback");
    rolled.sort();
    let mut expected: Vec<String> = zoned()
        .iter()
        .map(|h| h.host_id.to_string())
        .filter(|h| h != "eu-2-h2" && h != "eu-2-h3")
        .collect();
    expected.sort();
    assert_eq!(
        rolled, expected,
        "every touched host (canary included) is rolled back at once"
    );
    s.agents(&[], false);
    assert_eq!(s.m.state(), RolloutState::RolledBack);
}

fn boundary(n: usize, threshold: &str, failures: usize) -> RolloutState {
    let mut w = wire_spec(&["100%"]);
    w.failure_threshold = threshold.into();
    let mut s = Sim::new(fleet(n), w);
    let bad: Vec<String> = (1..=failures).map(|i| format!("h{i:02}")).collect();
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    s.agents(&bad, false);
    s.advance(10_000);
    s.agents(&[], false);
    s.m.state()
}

#[test]
fn failure_thresholds_pass_exactly_at_the_limit_and_fail_one_past() {
    // Counts.
    assert_eq!(boundary(4, "0", 0), RolloutState::Succeeded);
    assert_eq!(boundary(4, "0", 1), RolloutState::RolledBack);
    assert_eq!(boundary(4, "2", 2), RolloutState::Succeeded);
    assert_eq!(boundary(4, "2", 3), RolloutState::RolledBack);
    // Percents: floor(P * n / 100).
    assert_eq!(boundary(10, "10%", 1), RolloutState::Succeeded);
    assert_eq!(boundary(10, "10%", 2), RolloutState::RolledBack);
    assert_eq!(
        boundary(7, "10%", 1),
        RolloutState::RolledBack,
        "10% of 7 allows 0"
    );
    assert_eq!(boundary(20, "15%", 3), RolloutState::Succeeded);
    assert_eq!(boundary(20, "15%", 4), RolloutState::RolledBack);
}

#[test]
fn cumulative_threshold_counts_across_waves() {
    let mut w = wire_spec(&["2", "100%"]);
    w.failure_threshold = "1".into();
    w.cumulative_failure_threshold = "1".into();
    let mut s = Sim::new(fleet(6), w);
    s.agents(&["h01"], false);
    s.advance(10_000);
    assert_eq!(
        s.m.current_wave(),
        1,
        "one failure is within both thresholds"
    );
    s.agents(&["h03"], false);
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    let d =
        s.m.decisions()
            .iter()
            .find(|d| d.kind.as_str() == "rollback")
            .unwrap();
    assert!(d.reason.contains("cumulative"), "{}", d.reason);
}

#[test]
fn unreachable_host_makes_the_wave_wait_and_it_resumes_when_the_host_returns() {
    let mut s = Sim::new(fleet(6), wire_spec(&["3", "100%"]));
    // h02 goes away before it answers.
    s.answered.insert(s.sent[1].2.order_id.clone());
    s.feed(Input::HostDown(hid("h02")));
    s.agents(&[], false);
    s.advance(10_000);
    assert_eq!(
        s.m.state(),
        RolloutState::Waiting,
        "never promoted on missing data"
    );
    assert_eq!(s.m.waves()[0].state, WaveState::Waiting);
    let d = s.m.decisions().last().unwrap();
    assert_eq!(d.kind.as_str(), "wait");
    assert_eq!(d.evidence["unreachable"], "1");
    assert_eq!(d.evidence["unreachable_hosts"], "h02");
    assert_eq!(d.evidence["failed"], "0");
    let reason = wire_status(&s.m).reason;
    assert!(
        reason.ends_with("waiting for them to return: h02"),
        "the reason names the host waited for: {reason}"
    );
    assert_eq!(wire_status(&s.m).waves[0].unreachable, 1);
    assert_eq!(
        wire_status(&s.m).waves[0].failed,
        0,
        "unreachable is not failed"
    );
    // Still waiting later: no promotion by timeout.
    s.advance(600_000);
    assert_eq!(s.m.state(), RolloutState::Waiting);
    let activates_before = s.sent_kinds("activate").len();
    // h02 returns; its order is re-sent with the same id and seq.
    let first = s.sent[1].2.clone();
    s.feed(Input::HostUp(host("h02", "eu-1", "web-1")));
    assert_eq!(s.m.state(), RolloutState::Running);
    let (_, h, again) = s.sent.last().unwrap().clone();
    assert_eq!(h.as_str(), "h02");
    assert_eq!(again, first, "the same order, same seq");
    assert_eq!(s.decision_kinds().last().unwrap(), "resume");
    s.answered.remove(&first.order_id);
    s.agents(&[], false);
    s.advance(10_000);
    assert_eq!(s.m.current_wave(), 1);
    assert!(s.sent_kinds("activate").len() > activates_before);
}

#[test]
fn progress_deadline_fails_reachable_stragglers() {
    let mut s = Sim::new(fleet(4), wire_spec(&["2", "100%"]));
    // h01 healthy; h02 activates but never reports healthy or anything else.
    let o2 = s.sent[1].2.clone();
    s.answered.insert(o2.order_id.clone());
    s.reply(
        &hid("h02"),
        &o2,
        OrderPhase::Progress,
        ResultCode::Ok,
        "web-1",
    );
    s.agents(&[], false);
    s.advance(59_000);
    assert_eq!(s.m.state(), RolloutState::Running);
    s.advance(1_000);
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    assert!(
        s.m.host(&hid("h02"))
            .unwrap()
            .failure
            .as_ref()
            .unwrap()
            .contains("progress deadline")
    );
}

#[test]
fn healthy_host_turning_unhealthy_during_bake_fails() {
    let mut s = Sim::new(fleet(4), wire_spec(&["1", "100%"]));
    s.agents(&[], false);
    assert_eq!(s.m.waves()[0].state, WaveState::Baking);
    s.feed(Input::Health {
        host: hid("h01"),
        sample: HealthSample {
            service: ServiceName::new("web").unwrap(),
            release: Some(ReleaseId::new("web-2").unwrap()),
            healthy: false,
            checks_passing: 0,
            checks_total: 1,
            probe_latency_us: None,
            restarts: 1,
            cpu_percent: 0.0,
            rss_bytes: 0,
            observed_unix_ms: s.now,
            requests_total: None,
        },
    });
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    // Its agent, still armed, reverts by itself for the same verdict: the rollback order waits
    // the self-revert grace for that, and goes out when the agent says nothing.
    assert!(s.sent_kinds("rollback").is_empty());
    s.advance(EngineSettings::default().self_revert_grace.as_millis() as u64);
    assert_eq!(s.sent_kinds("rollback"), vec!["h01"]);
}

#[test]
fn on_failure_pause_then_retry_and_resume() {
    let mut w = wire_spec(&["2", "100%"]);
    w.on_failure = wire::OnFailure::Pause as i32;
    let mut s = Sim::new(fleet(4), w);
    s.agents(&["h02"], false);
    assert_eq!(s.m.state(), RolloutState::Paused);
    assert_eq!(s.decision_kinds(), vec!["pause"]);
    // Invalid controls are refused with a clear message.
    let e = s.operator(OperatorAction::Rollback).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rollout r-1 is paused; rollback applies to a succeeded rollout"
    );
    // Retry re-dispatches the failed host with a new order.
    s.operator(OperatorAction::Retry).unwrap();
    assert_eq!(s.m.state(), RolloutState::Running);
    assert_eq!(s.sent_kinds("activate"), vec!["h01", "h02", "h02"]);
    let seqs: Vec<u64> = s
        .sent
        .iter()
        .filter(|(_, h, _)| h.as_str() == "h02")
        .map(|(_, _, o)| o.seq)
        .collect();
    assert!(
        seqs[1] > seqs[0],
        "a retry is a new order with a higher seq: {seqs:?}"
    );
    s.agents(&[], false);
    s.advance(10_000);
    assert_eq!(s.m.current_wave(), 1);
    assert_eq!(s.decision_kinds(), vec!["pause", "retry", "promote"]);
    let d = &s.m.decisions()[1];
    assert_eq!(d.actor, "alice");
    assert_eq!(d.evidence["hosts"], "h02");
}

#[test]
fn resume_after_a_failure_pause_waives_those_failures() {
    let mut w = wire_spec(&["2", "100%"]);
    w.on_failure = wire::OnFailure::Pause as i32;
    let mut s = Sim::new(fleet(4), w);
    s.agents(&["h02"], false);
    assert_eq!(s.m.state(), RolloutState::Paused);
    s.operator(OperatorAction::Resume).unwrap();
    let d = s.m.decisions().last().unwrap();
    assert_eq!(d.kind.as_str(), "resume");
    assert_eq!(d.evidence["waived_failures"], "h02");
    s.advance(10_000);
    assert_eq!(s.m.current_wave(), 1);
    s.agents(&[], false);
    s.advance(10_000);
    s.agents(&[], false);
    assert_eq!(s.m.state(), RolloutState::Succeeded);
}

#[test]
fn operator_pause_resume_promote_abort() {
    let mut s = Sim::new(fleet(6), wire_spec(&["1", "50%", "100%"]));
    s.agents(&[], false);
    assert_eq!(s.m.waves()[0].state, WaveState::Baking);
    // Promote ends the bake now.
    s.operator(OperatorAction::Promote).unwrap();
    assert_eq!(s.m.waves()[0].state, WaveState::Passed);
    let d = s.m.decisions().last().unwrap();
    assert_eq!((d.kind.as_str(), d.actor.as_str()), ("promote", "alice"));
    assert!(d.evidence.contains_key("bake_skipped_ms"));
    // Pause stops everything, also past deadlines.
    s.operator(OperatorAction::Pause).unwrap();
    assert_eq!(s.m.state(), RolloutState::Paused);
    let e = s.operator(OperatorAction::Pause).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rollout r-1 is paused; pause applies to a running or waiting rollout"
    );
    s.agents(&[], false);
    s.advance(3_600_000);
    assert_eq!(s.m.state(), RolloutState::Paused);
    assert_eq!(s.m.current_wave(), 1);
    s.operator(OperatorAction::Resume).unwrap();
    assert_eq!(s.m.state(), RolloutState::Running);
    s.agents(&[], false);
    // Abort rolls back every touched host and ends aborted.
    s.operator(OperatorAction::Abort).unwrap();
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    let mut rolled = s.sent_kinds("rollback");
    rolled.sort();
    assert_eq!(rolled, vec!["h01", "h02", "h03"]);
    s.agents(&[], false);
    assert_eq!(s.m.state(), RolloutState::Aborted);
    let e = s.operator(OperatorAction::Resume).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rollout r-1 is aborted; resume applies to a paused or waiting rollout"
    );
}

#[test]
fn manual_rollback_of_a_succeeded_rollout() {
    let mut s = Sim::new(fleet(3), wire_spec(&["1", "100%"]));
    for _ in 0..3 {
        s.agents(&[], false);
        s.advance(10_000);
    }
    s.agents(&[], false);
    assert_eq!(s.m.state(), RolloutState::Succeeded);
    let e = s.operator(OperatorAction::Retry).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("rollout r-1 is succeeded; retry applies to"),
        "{e}"
    );
    s.operator(OperatorAction::Rollback).unwrap();
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    assert_eq!(s.sent_kinds("rollback").len(), 3);
    s.agents(&[], false);
    assert_eq!(s.m.state(), RolloutState::RolledBack);
    assert_eq!(
        s.finished,
        vec![RolloutState::Succeeded, RolloutState::RolledBack]
    );
    assert!(s.decision_kinds().contains(&"manual_rollback".to_string()));
    assert!(
        wire_status(&s.m).reason.contains("rolled back by alice"),
        "{}",
        wire_status(&s.m).reason
    );
}

#[test]
fn a_host_joining_mid_rollout_lands_in_the_last_wave() {
    let mut s = Sim::new(fleet(4), wire_spec(&["1", "100%"]));
    s.feed(Input::HostUp(host("h99", "eu-1", "web-1")));
    // A host that does not match the selector is ignored.
    let mut other = host("db1", "eu-1", "web-1");
    other.labels.insert("role".into(), "db".into());
    s.feed(Input::HostUp(other));
    assert_eq!(s.m.host(&hid("h99")).unwrap().wave, 1);
    assert!(s.m.host(&hid("db1")).is_none());
    assert_eq!(s.sent_kinds("activate"), vec!["h01"]);
    s.agents(&[], false);
    s.advance(10_000);
    assert!(s.sent_kinds("activate").contains(&"h99".to_string()));
    s.agents(&[], false);
    s.advance(10_000);
    s.agents(&[], false);
    assert_eq!(s.m.state(), RolloutState::Succeeded);
    // After success, a late joiner is activated and confirmed right away.
    s.feed(Input::HostUp(host("h100", "eu-1", "web-1")));
    assert_eq!(s.sent.last().unwrap().1.as_str(), "h100");
    s.agents(&[], false);
    s.agents(&[], false);
    assert_eq!(s.phase("h100"), HostPhase::Confirmed);
}

#[test]
fn rebuild_from_records_mid_wave_gives_the_same_next_commands() {
    let mut s = Sim::new(fleet(6), wire_spec(&["2", "100%"]));
    // h01 healthy, h02 still activating: mid-wave.
    let o2 = s.sent[1].2.clone();
    s.answered.insert(o2.order_id.clone());
    s.agents(&[], false);
    s.reply(
        &hid("h02"),
        &o2,
        OrderPhase::Activated,
        ResultCode::Ok,
        "web-2",
    );
    s.advance(3_000);

    // Crash: rebuild from what was persisted.
    let hosts: Vec<_> = s.hosts.clone().into_iter().collect();
    let d = record::decode_rollout("r-1", &s.header, &hosts).unwrap();
    let restored = Rollout::restore(d.header, d.hosts, EngineSettings::default(), s.now).unwrap();
    let mut r = s.clone();
    r.m = restored;
    r.sent.clear();
    s.sent.clear();
    let snapshot: Vec<HostSnapshot> = s.fleet.clone();
    s.feed(Input::Resync(snapshot.clone()));
    r.feed(Input::Resync(snapshot));
    // The restored machine re-sends the unfinished order, same id and seq, and nothing else
    // (but the stages ahead of the next wave that were not answered, unchanged too).
    let r_sent: Vec<&Order> = r
        .sent
        .iter()
        .map(|(_, _, o)| o)
        .filter(|o| o.action.kind() != "stage")
        .collect();
    assert_eq!(r_sent, vec![&o2]);
    assert_eq!(r.m.state(), RolloutState::Running);
    assert_eq!(r.m.current_wave(), 0);
    // From here both take the same decisions and send the same orders.
    s.sent.clear();
    r.sent.clear();
    for sim in [&mut s, &mut r] {
        sim.reply(
            &hid("h02"),
            &o2,
            OrderPhase::Healthy,
            ResultCode::Ok,
            "web-2",
        );
        sim.advance(10_000);
    }
    assert!(!s.sent.is_empty());
    assert_eq!(s.sent, r.sent);
    assert_eq!(s.decision_kinds(), r.decision_kinds());
    assert_eq!(
        r.decision_kinds(),
        vec!["promote"],
        "no decision is made twice"
    );
}

#[test]
fn restore_refuses_records_from_the_future() {
    let s = Sim::new(fleet(2), wire_spec(&["1", "100%"]));
    // A binary record: the magic, then the version as a varint (99 fits in one byte).
    assert_eq!(s.header[..2], record::MAGIC);
    let mut future = s.header.clone();
    future[2] = 99;
    let e = record::decode_header("r-1", &future).unwrap_err();
    assert!(e.to_string().contains("version 99"), "{e}");
    // A JSON record (the first encoding) from the future.
    let e = record::decode_header("r-1", br#"{"version": 99}"#).unwrap_err();
    assert!(e.to_string().contains("version 99"), "{e}");
}

#[test]
fn max_in_flight_paces_a_wave() {
    let mut w = wire_spec(&["100%"]);
    w.max_in_flight = "2".into();
    let mut s = Sim::new(fleet(5), w);
    assert_eq!(s.sent_kinds("activate").len(), 2);
    s.agents(&[], false);
    assert_eq!(s.sent_kinds("activate").len(), 4);
    s.agents(&[], false);
    assert_eq!(s.sent_kinds("activate").len(), 5);
    s.agents(&[], false);
    s.advance(10_000);
    s.agents(&[], false);
    assert_eq!(s.m.state(), RolloutState::Succeeded);
}

#[test]
fn after_a_restart_a_rollback_waits_for_unknown_hosts_until_the_resume_grace() {
    let mut s = Sim::new(fleet(4), wire_spec(&["1", "100%"]));
    s.agents(&[], false);
    s.advance(10_000);
    assert_eq!(s.m.current_wave(), 1);
    // h02 fails in wave 1: h01, h03 and h04 get rollback orders, not answered yet.
    s.agents(&["h02"], false);
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    let mut rollbacks = s.sent_kinds("rollback");
    rollbacks.sort();
    assert_eq!(rollbacks, vec!["h01", "h03", "h04"]);
    let h01_rollback = s
        .sent
        .iter()
        .find(|(_, h, o)| h.as_str() == "h01" && o.action.kind() == "rollback")
        .unwrap()
        .2
        .clone();

    // The coordinator restarts; no agent has reconnected yet.
    s.restart();
    s.feed(Input::Resync(Vec::new()));
    assert_eq!(
        s.m.state(),
        RolloutState::RollingBack,
        "hosts not heard from since the restart are unknown, not unreachable: {}",
        wire_status(&s.m).reason
    );
    let p = s.status_of("h01");
    assert_eq!(p.phase().as_str(), "rolling_back", "{p:?}");
    assert!(
        p.detail
            .contains("not heard from since the coordinator restarted"),
        "{p:?}"
    );

    // h01 says hello: its rollback is re-sent unchanged and it answers.
    s.advance(1_000);
    s.feed(Input::HostUp(host("h01", "eu-1", "web-2")));
    assert_eq!(s.sent.len(), 1);
    assert_eq!(s.sent[0].2, h01_rollback, "the same order, same seq");
    s.agents(&[], false);
    assert_eq!(s.phase("h01"), HostPhase::RolledBack);
    assert_eq!(
        s.m.state(),
        RolloutState::RollingBack,
        "h03 and h04 are still unknown"
    );

    // h03 and h04 stay silent past the grace: now they are unreachable and the rollback ends.
    s.advance(8_000);
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    s.advance(1_000);
    assert_eq!(s.m.state(), RolloutState::RolledBack);
    assert!(
        wire_status(&s.m)
            .reason
            .contains("2 unreachable hosts are rolled back when they reconnect"),
        "{}",
        wire_status(&s.m).reason
    );
    assert_eq!(s.status_of("h03").phase().as_str(), "unreachable");
    assert!(
        s.events
            .iter()
            .any(|e| e.contains("did not reconnect within 10s")),
        "{:?}",
        s.events
    );
}

#[test]
fn after_a_restart_a_gate_does_not_wait_on_hosts_that_are_merely_unknown() {
    let mut s = Sim::new(fleet(4), wire_spec(&["1", "100%"]));
    s.agents(&[], false);
    assert_eq!(s.m.waves()[0].state, WaveState::Baking);
    s.advance(9_000);
    s.restart();
    s.feed(Input::Resync(Vec::new()));
    // The bake ends while h01 has not reconnected yet: no verdict on missing data either way.
    s.advance(2_000);
    assert_eq!(
        s.m.state(),
        RolloutState::Running,
        "{}",
        wire_status(&s.m).reason
    );
    assert!(s.decision_kinds().is_empty(), "{:?}", s.decision_kinds());

    // Nobody comes back within the grace: then the wave waits, as for any unreachable host.
    let mut silent = s.clone();
    silent.advance(8_000);
    assert_eq!(silent.m.state(), RolloutState::Waiting);

    // h01 reconnects in time: the gate passes.
    s.feed(Input::HostUp(host("h01", "eu-1", "web-2")));
    for i in 2..=4 {
        s.feed(Input::HostUp(host(&format!("h{i:02}"), "eu-1", "web-1")));
    }
    assert_eq!(s.decision_kinds(), vec!["promote"]);
    assert_eq!(s.m.current_wave(), 1);
}

#[test]
fn a_retried_canary_is_judged_only_on_samples_since_it_became_healthy_again() {
    let mut w = wire_spec(&["1", "100%"]);
    w.on_failure = wire::OnFailure::Pause as i32;
    let mut s = Sim::new(fleet(4), w);
    // First attempt: h01's checks fail while the baseline passes; its agent rolls it back.
    for _ in 0..15 {
        s.health("h01", "web-2", false);
        for b in ["h02", "h03", "h04"] {
            s.health(b, "web-1", true);
        }
        s.advance(200);
    }
    s.agents(&["h01"], true);
    assert_eq!(s.m.state(), RolloutState::Paused);
    // The release is healed; the operator retries.
    s.operator(OperatorAction::Retry).unwrap();
    // The restart itself fails a couple of probes (connection refused) before it is healthy.
    for _ in 0..2 {
        s.health("h01", "web-2", false);
        s.advance(200);
    }
    s.agents(&[], false);
    assert_eq!(s.m.waves()[0].state, WaveState::Baking);
    for _ in 0..25 {
        s.health("h01", "web-2", true);
        for b in ["h02", "h03", "h04"] {
            s.health(b, "web-1", true);
        }
        s.advance(200);
    }
    s.advance(10_000);
    assert_eq!(
        s.decision_kinds(),
        vec!["pause", "retry", "promote"],
        "{}",
        wire_status(&s.m).reason
    );
    assert_eq!(s.m.current_wave(), 1);
    let d = s.m.decisions().last().unwrap();
    assert_eq!(d.evidence["analysis"], "canary healthy", "{:?}", d.evidence);
    assert_eq!(d.evidence["canary_checks_failed"], "0/25");
    assert_eq!(d.evidence["baseline_checks_failed"], "0/75");
}

/// A host where service web is installed but has never had a release.
fn fresh(id: &str) -> HostSnapshot {
    let mut h = host(id, "eu-1", "web-1");
    if let Some(svc) = h.services.values_mut().next() {
        svc.current_release = None;
        svc.kept_releases.clear();
        svc.healthy = None;
    }
    h
}

#[test]
fn a_failed_first_install_leaves_hosts_without_a_baseline_and_ends_rolled_back() {
    // h01-h03 are first installs; h04 runs web-1.
    let mut f: Vec<HostSnapshot> = ["h01", "h02", "h03"].iter().map(|h| fresh(h)).collect();
    f.push(host("h04", "eu-1", "web-1"));
    let mut s = Sim::new(f, wire_spec(&["100%"]));
    assert_eq!(s.sent_kinds("activate").len(), 4);
    // h02 fails to activate: every touched host is rolled back where there is a baseline.
    s.agents(&["h02"], false);
    assert_eq!(
        s.sent_kinds("rollback"),
        vec!["h04"],
        "only a host with a baseline gets a rollback order"
    );
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    s.agents(&[], false);
    assert_eq!(
        s.m.state(),
        RolloutState::RolledBack,
        "{}",
        wire_status(&s.m).reason
    );
    assert_eq!(s.finished, vec![RolloutState::RolledBack]);
    for h in ["h01", "h03"] {
        let p = s.status_of(h);
        assert_eq!(p.phase().as_str(), "skipped", "{p:?}");
        assert_eq!(p.detail, "no baseline release to restore; left on web-2");
        assert_eq!(p.target_release, "web-2");
    }
    assert_eq!(s.phase("h02"), HostPhase::Failed);
    assert_eq!(s.phase("h04"), HostPhase::RolledBack);
    let reason = wire_status(&s.m).reason;
    assert!(
        reason.contains("2 hosts had no baseline release to restore and were left on web-2"),
        "{reason}"
    );
    assert!(!reason.contains("rollback failed"), "{reason}");
    let d = s.m.decisions().last().unwrap();
    assert_eq!(d.kind.as_str(), "rollback_finished");
    assert_eq!(d.evidence["no_baseline_hosts"], "h01,h03");
    assert_eq!(d.evidence["left_on_release"], "web-2");
    assert!(
        s.m.is_quiescent(),
        "no order is left to deliver to the hosts without a baseline"
    );
    // A late result of a withdrawn activate order changes nothing.
    let sent_before = s.sent.len();
    s.advance(600_000);
    assert_eq!(s.sent.len(), sent_before);
    assert_eq!(s.phase("h01"), HostPhase::Skipped);
}

mod requests;
mod staging;
mod verdicts;
