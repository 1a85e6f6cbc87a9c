//! Model-based tests of the rollout machine: random interleavings of agent results (success,
//! failure, refusals, stale sequences, duplicates, late results), health changes, hosts going
//! down and up, failing saves, coordinator restarts rebuilt from the persisted records, operator
//! calls and clock advances, with the engine's promises checked after every step.
//!
//! The harness plays the driver's contract exactly (persist, then allocate, then send; a failed
//! save holds back the orders after it and is followed by [`Input::StoreFailed`]; the next good
//! save sends the machine's current order of each held host and is followed by
//! [`Input::StoreRecovered`]), a store that keeps encoded records and sequence counters, and one
//! agent per host that applies sequences in order.
//!
//! Checked after every step and at every send:
//!
//! 1. hosts in flight never exceed `max_in_flight`;
//! 2. no host of wave k+1 gets an activation before wave k's gate passed (and no host of a later
//!    wave than the current one has been touched);
//! 3. after a rollback is decided (and persisted) no activation is ordered;
//! 4. rolled back, aborted and failed are final; succeeded only leaves through a manual rollback;
//! 5. at the end (store healed, every host back, agents answering), every touched host is rolled
//!    back, on the new release, or its rollback failed and says so;
//! 6. each host gets one target per rollout (activations of the release, rollbacks to its
//!    baseline), and one order id always carries one sequence, increasing per host;
//! 7. every decision, and the order itself, is persisted before an order is sent;
//! 8. an agent's dead-man switch never fires while the agent is up and the coordinator runs the
//!    rollout (running, waiting, paused; after success, for the hosts it still converges) and
//!    reaches it, whatever phase the host is in (failed, rolling back, re-dispatched): it is
//!    held in time; and a CONFIRM_TIMEOUT self-revert never makes a host count as failed;
//! 9. stage orders (prepare, then activate; `stage_ahead` 0, 1, 2 or every host) go only to
//!    pending hosts of a running rollout, never after a rollback is decided, never after the
//!    host's activation, and never change what a host serves: a host that got no activation
//!    ends on its baseline.
//!
//! CI runs `SERIN_MODEL_CASES` cases (default 10,000) with a random seed, printing both; set
//! `SERIN_MODEL_SEED` to replay a seed, and e.g. `SERIN_MODEL_CASES=1000000` for the long mode.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serin_proto::{HostId, Order, OrderAction, ReleaseId, ServiceName};

use super::machine::{Command, HostPhase, Input, OperatorAction, Rollout, RolloutState, WaveState};
use super::plan;
use super::record::{self, HeaderRecord, HostRecord};
use super::settings::EngineSettings;
use super::spec::RolloutSpec;
use super::testing::{host, release};
use crate::fleet::{HealthSample, OrderOutcome, OrderPhase, ResultCode};

/// What the agents and the world may do next.
#[derive(Debug, Clone)]
enum Action {
    /// The host's agent answers its latest order in one of several ways.
    Reply(usize, Reply),
    Health(usize, bool),
    Down(usize),
    Up(usize),
    /// The next n saves fail.
    FailSaves(u8),
    /// The coordinator restarts: the machine is rebuilt from the persisted records.
    Restart,
    Operator(u8),
    Advance(u32),
}

#[derive(Debug, Clone, Copy)]
enum Reply {
    Good,
    Fail,
    Busy,
    Stale(u8),
    Duplicate,
    Late,
}

#[derive(Debug, Clone)]
struct Case {
    hosts: usize,
    waves: &'static [&'static str],
    on_pause: bool,
    failure_threshold: &'static str,
    max_in_flight: &'static str,
    stage_ahead: u32,
    actions: Vec<Action>,
}

fn case() -> impl Strategy<Value = Case> {
    let reply = prop_oneof![
        4 => Just(Reply::Good),
        1 => Just(Reply::Fail),
        1 => Just(Reply::Busy),
        1 => (0u8..4).prop_map(Reply::Stale),
        1 => Just(Reply::Duplicate),
        1 => Just(Reply::Late),
    ];
    let action = prop_oneof![
        10 => (0usize..8, reply).prop_map(|(h, r)| Action::Reply(h, r)),
        2 => (0usize..8, any::<bool>()).prop_map(|(h, ok)| Action::Health(h, ok)),
        1 => (0usize..8).prop_map(Action::Down),
        2 => (0usize..8).prop_map(Action::Up),
        1 => (1u8..3).prop_map(Action::FailSaves),
        1 => Just(Action::Restart),
        1 => (0u8..6).prop_map(Action::Operator),
        4 => (0u32..40_000).prop_map(Action::Advance),
    ];
    (
        2usize..7,
        prop_oneof![
            Just(&["1", "100%"][..]),
            Just(&["1", "50%", "100%"][..]),
            Just(&["100%"][..]),
            Just(&["2", "100%"][..]),
        ],
        any::<bool>(),
        prop_oneof![Just("0"), Just("1"), Just("50%")],
        prop_oneof![Just(""), Just("1"), Just("2")],
        prop_oneof![Just(0u32), Just(1), Just(2), Just(100)],
        prop::collection::vec(action, 1..45),
    )
        .prop_map(
            |(hosts, waves, on_pause, failure_threshold, max_in_flight, stage_ahead, actions)| {
                Case {
                    hosts,
                    waves,
                    on_pause,
                    failure_threshold,
                    max_in_flight,
                    stage_ahead,
                    actions,
                }
            },
        )
}

const T0: u64 = 1_700_000_000_000;

/// The durable store of the model. Records are kept as values and go through their JSON
/// encoding when a restart reads them back (what serde skips is lost, as in the real store).
#[derive(Default)]
struct Durable {
    header: Option<HeaderRecord>,
    hosts: BTreeMap<HostId, HostRecord>,
    seqs: BTreeMap<HostId, u64>,
    /// Saves left to fail.
    fail: u8,
}

impl Durable {
    fn header(&self) -> Option<&HeaderRecord> {
        self.header.as_ref()
    }

    fn host(&self, id: &HostId) -> Option<&HostRecord> {
        self.hosts.get(id)
    }

    /// The records as a restarted coordinator reads them.
    fn read_back(&self) -> Option<(HeaderRecord, Vec<HostRecord>)> {
        let h = self.header.as_ref()?;
        let hosts: Vec<_> = self
            .hosts
            .iter()
            .map(|(id, r)| (id.clone(), record::encode(r)))
            .collect();
        let d =
            record::decode_rollout("model", &record::encode(h), &hosts).expect("readable records");
        Some((d.header, d.hosts))
    }
}

/// One agent.
#[derive(Default, Clone)]
struct Agent {
    up: bool,
    current: String,
    last_seq: u64,
    /// Every order delivered, oldest first, with the results it got.
    orders: Vec<(Order, Vec<OrderOutcome>)>,
    /// The dead-man switch of an activation it applied and nobody confirmed: it reverts by
    /// itself (CONFIRM_TIMEOUT) at this time unless a confirm or a hold comes first.
    armed_until: Option<u64>,
}

struct World {
    now: u64,
    settings: EngineSettings,
    spec: RolloutSpec,
    m: Rollout,
    store: Durable,
    unsaved: bool,
    held: BTreeSet<HostId>,
    agents: BTreeMap<HostId, Agent>,
    baseline: BTreeMap<HostId, String>,
    /// Order id → sequence, and the last sequence sent per host.
    seq_of: BTreeMap<String, u64>,
    last_sent_seq: BTreeMap<HostId, u64>,
    prev_state: RolloutState,
    /// The last steps, formatted only when a case fails.
    trace: std::collections::VecDeque<Step>,
}

/// One entry of the trace printed with a failing case.
#[derive(Debug)]
enum Step {
    Input(u64, Input),
    Send(HostId, String, u64),
    Hold(HostId),
    Restart(u64),
}

impl Step {
    fn show(&self) -> String {
        match self {
            Step::Input(t, i) => format!("{t} {i:?}"),
            Step::Send(h, id, seq) => format!("  send {h} {id} seq {seq}"),
            Step::Hold(h) => format!("  hold {h}"),
            Step::Restart(t) => format!("{t} restart"),
        }
    }
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

impl World {
    fn new(c: &Case) -> Self {
        let ids: Vec<HostId> = (0..c.hosts)
            .map(|i| HostId::new(format!("h{i}")).unwrap())
            .collect();
        let snapshot: Vec<_> = ids
            .iter()
            .map(|h| host(h.as_str(), "eu-1", "web-1"))
            .collect();
        let mut w = super::testing::raw_spec(c.waves);
        w.on_failure = if c.on_pause {
            super::spec::ON_FAILURE_PAUSE
        } else {
            super::spec::ON_FAILURE_ROLLBACK
        };
        w.failure_threshold = c.failure_threshold.into();
        w.max_in_flight = c.max_in_flight.into();
        let spec = RolloutSpec::try_from(w).expect("a valid spec");
        let p = plan::plan(&spec, &snapshot);
        let settings = EngineSettings {
            stage_ahead: c.stage_ahead,
            ..EngineSettings::default()
        };
        let m = Rollout::new("model", spec.clone(), release(), &p, settings.clone(), T0);
        let agents = ids
            .iter()
            .map(|h| {
                (
                    h.clone(),
                    Agent {
                        up: true,
                        current: "web-1".into(),
                        last_seq: 3,
                        orders: Vec::new(),
                        armed_until: None,
                    },
                )
            })
            .collect();
        let store = Durable {
            seqs: ids.iter().map(|h| (h.clone(), 3)).collect(),
            ..Default::default()
        };
        Self {
            now: T0,
            settings,
            spec,
            m,
            store,
            unsaved: false,
            held: BTreeSet::new(),
            agents,
            baseline: ids.iter().map(|h| (h.clone(), "web-1".into())).collect(),
            seq_of: BTreeMap::new(),
            last_sent_seq: BTreeMap::new(),
            prev_state: RolloutState::Running,
            trace: std::collections::VecDeque::new(),
        }
    }

    fn log(&mut self, s: Step) {
        if self.trace.len() == 40 {
            self.trace.pop_front();
        }
        self.trace.push_back(s);
    }

    fn ids(&self) -> Vec<HostId> {
        self.agents.keys().cloned().collect()
    }

    fn pick(&self, i: usize) -> HostId {
        let ids = self.ids();
        ids[i % ids.len()].clone()
    }

    fn snapshot(&self, id: &HostId) -> crate::fleet::HostSnapshot {
        let a = &self.agents[id];
        let mut s = host(id.as_str(), "eu-1", &a.current);
        s.connected = a.up;
        if let Some(svc) = s.services.get_mut(&ServiceName::new("web").unwrap()) {
            svc.last_seq = a.last_seq;
        }
        s
    }

    /// Feeds an input and executes its commands as the driver does.
    fn feed(&mut self, input: Input) -> Result<(), TestCaseError> {
        self.log(Step::Input(self.now - T0, input.clone()));
        let cmds = self.m.step(self.now, input);
        self.execute(cmds, 0)
    }

    fn execute(&mut self, cmds: Vec<Command>, depth: u32) -> Result<(), TestCaseError> {
        let mut queue: std::collections::VecDeque<Command> = cmds.into();
        while let Some(c) = queue.pop_front() {
            match c {
                Command::Persist(_) => {
                    if self.store.fail > 0 {
                        self.store.fail -= 1;
                        self.unsaved = true;
                        let mut holds = Vec::new();
                        for c in queue.drain(..) {
                            match c {
                                Command::Send { host, .. } => {
                                    self.held.insert(host);
                                }
                                // Holds need no save: the driver sends them anyway.
                                Command::Hold { host, hold } => holds.push((host, hold)),
                                _ => {}
                            }
                        }
                        for (host, hold) in holds {
                            self.hold(&host, hold.confirm_deadline);
                        }
                        if depth < 3 {
                            let more = self.m.step(
                                self.now,
                                Input::StoreFailed {
                                    error: "injected".into(),
                                },
                            );
                            self.execute(more, depth + 1)?;
                        }
                        return Ok(());
                    }
                    self.save_all();
                    if self.unsaved {
                        self.unsaved = false;
                        for h in std::mem::take(&mut self.held) {
                            if let Some(o) = self.m.order_to_send(&h) {
                                self.deliver(h, o)?;
                            }
                        }
                        if depth < 3 {
                            let more = self.m.step(self.now, Input::StoreRecovered);
                            self.execute(more, depth + 1)?;
                        }
                    }
                }
                Command::AllocateSeqs(reqs) => {
                    let got = reqs
                        .into_iter()
                        .map(|r| {
                            let slot = self.store.seqs.entry(r.host.clone()).or_insert(0);
                            *slot = (*slot).max(r.at_least) + 1;
                            (r.order_id, *slot)
                        })
                        .collect();
                    if depth < 8 {
                        let more = self.m.step(self.now, Input::SeqsAllocated(got));
                        queue.extend(more);
                    }
                }
                Command::Send { host, order } => {
                    if self.unsaved {
                        self.held.insert(host);
                    } else {
                        self.deliver(host, order)?;
                    }
                }
                Command::Hold { host, hold } => self.hold(&host, hold.confirm_deadline),
                Command::Refused(_) | Command::Finished(_) => {}
            }
        }
        Ok(())
    }

    /// A `HoldConfirm` reached the host's agent (if it is up): an armed switch moves to at
    /// least `confirm_deadline` from now.
    fn hold(&mut self, host: &HostId, confirm_deadline: Duration) {
        self.log(Step::Hold(host.clone()));
        let now = self.now;
        if let Some(a) = self.agents.get_mut(host).filter(|a| a.up)
            && let Some(t) = a.armed_until.as_mut()
        {
            *t = (*t).max(now + confirm_deadline.as_millis() as u64);
        }
    }

    /// Promise 8: the agents' dead-man switches that fire by `t`. One that fires while its agent
    /// is up and the coordinator should be holding it (the rollout runs and the host may run
    /// the release unconfirmed) is a violation. Otherwise the agent reverts by itself and says
    /// CONFIRM_TIMEOUT (now if it is up, as a replay later if not), which must never make the
    /// host count as failed.
    fn switches(&mut self, t: u64) -> Result<(), TestCaseError> {
        for id in self.ids() {
            let a = &self.agents[&id];
            let Some(until) = a.armed_until.filter(|u| *u <= t) else {
                continue;
            };
            let Some((order, results)) = a.orders.last().cloned() else {
                continue;
            };
            if !matches!(order.action, OrderAction::Activate { .. }) {
                // A newer order is on its way in; the model agent applies it first.
                continue;
            }
            let up = a.up;
            // The agent is armed for this rollout (the model agent arms only on its
            // activations): whatever phase the coordinator gives the host — failed, rolling
            // back, re-dispatched — it must be held while the rollout is live. After success
            // only the hosts still to be confirmed are: a failed one is left to its switch.
            let live = match self.m.state() {
                RolloutState::Running | RolloutState::Waiting | RolloutState::Paused => true,
                RolloutState::Succeeded => self.m.host(&id).is_some_and(|h| {
                    h.failure.is_none()
                        && matches!(
                            h.phase,
                            HostPhase::Dispatched | HostPhase::Activated | HostPhase::Healthy
                        )
                }),
                _ => false,
            };
            let reached = self.m.observed(&id).reach == super::machine::Reach::Reachable;
            if up && live && reached {
                return Err(fail(format!(
                    "{id}: its dead-man switch fired at {} while the coordinator ran the rollout and reached it",
                    until - T0
                )));
            }
            let base = self.baseline[&id].clone();
            let outcome = OrderOutcome {
                order_id: order.order_id.clone(),
                rollout_id: order.rollout_id.clone(),
                seq: order.seq,
                service: order.service.clone(),
                release: None,
                phase: OrderPhase::RolledBack,
                code: ResultCode::ConfirmTimeout,
                message: String::new(),
                current_release: Some(ReleaseId::new(&base).unwrap()),
                last_seq: order.seq,
            };
            let ag = self.agents.get_mut(&id).unwrap();
            ag.armed_until = None;
            ag.current = base;
            if let Some(last) = ag.orders.last_mut() {
                last.1.push(outcome.clone());
            }
            let failed_before = self.m.host(&id).is_some_and(|h| h.failure.is_some());
            if up && !results.iter().any(|r| r.phase == OrderPhase::RolledBack) {
                self.feed(Input::OrderResult {
                    host: id.clone(),
                    outcome,
                })?;
                if !failed_before && self.m.host(&id).is_some_and(|h| h.failure.is_some()) {
                    return Err(fail(format!(
                        "{id}: a CONFIRM_TIMEOUT self-revert counted as a failure"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Saves the machine's full records (a superset of what the driver saves).
    fn save_all(&mut self) {
        let (h, hosts) = self.m.records();
        self.store.header = Some(h);
        for r in hosts {
            self.store.hosts.insert(r.host.id.clone(), r);
        }
    }

    /// An order reaches the fleet: promises 2, 3, 6 and 7 are checked here.
    fn deliver(&mut self, host: HostId, order: Order) -> Result<(), TestCaseError> {
        self.log(Step::Send(host.clone(), order.order_id.clone(), order.seq));
        // 7: the order and every decision are durable.
        let rec = self.store.host(&host).ok_or_else(|| {
            fail(format!(
                "{host}: order sent before its host record was saved"
            ))
        })?;
        let o = rec.host.order.as_ref().ok_or_else(|| {
            fail(format!(
                "{host}: order {} sent but not persisted",
                order.order_id
            ))
        })?;
        if o.order_id != order.order_id || o.seq != Some(order.seq) {
            return Err(fail(format!(
                "{host}: sent {} seq {} but persisted {} {:?}",
                order.order_id, order.seq, o.order_id, o.seq
            )));
        }
        let header = self.store.header().expect("a header before any order");
        let rollback_decided = header.decisions.iter().any(|d| d.kind.rolls_back());
        if header.decisions.len() != self.m.decisions().len() {
            return Err(fail(format!(
                "{host}: order sent with {} decisions in memory but {} persisted",
                self.m.decisions().len(),
                header.decisions.len()
            )));
        }
        // 6: one sequence per order id, increasing per host; one target per host.
        match self.seq_of.get(&order.order_id) {
            Some(s) if *s != order.seq => {
                return Err(fail(format!(
                    "order {} sent with seq {} and {s}",
                    order.order_id, order.seq
                )));
            }
            Some(_) => {}
            None => {
                let last = self.last_sent_seq.get(&host).copied().unwrap_or(0);
                if order.seq <= last {
                    return Err(fail(format!(
                        "{host}: new order {} has seq {} after {last}",
                        order.order_id, order.seq
                    )));
                }
                self.seq_of.insert(order.order_id.clone(), order.seq);
                self.last_sent_seq.insert(host.clone(), order.seq);
            }
        }
        match &order.action {
            OrderAction::Activate { release, .. } => {
                if release.id != self.spec.release {
                    return Err(fail(format!("{host}: activation of {}", release.id)));
                }
                // 3: no activation once a rollback is decided and persisted.
                if rollback_decided {
                    return Err(fail(format!(
                        "{host}: activation {} ordered after a rollback was decided",
                        order.order_id
                    )));
                }
                // 2: earlier waves passed their gates.
                let wave = self.m.host(&host).map_or(0, |h| h.wave) as usize;
                if let Some(j) = (0..wave).find(|j| self.m.waves()[*j].state != WaveState::Passed) {
                    return Err(fail(format!(
                        "{host} of wave {wave} activated while wave {j} is {:?}",
                        self.m.waves()[j].state
                    )));
                }
            }
            OrderAction::Rollback { to } => {
                let want = ReleaseId::new(self.baseline[&host].as_str()).unwrap();
                if to.as_ref() != Some(&want) {
                    return Err(fail(format!("{host}: rollback to {to:?}, not {want}")));
                }
            }
            OrderAction::Stage { release } => {
                // 9: a stage is of the release, for a pending host of a running rollout,
                // never after a rollback was decided nor after the host's activation.
                if release.id != self.spec.release {
                    return Err(fail(format!("{host}: stage of {}", release.id)));
                }
                if rollback_decided {
                    return Err(fail(format!(
                        "{host}: stage {} ordered after a rollback was decided",
                        order.order_id
                    )));
                }
                let phase = self.m.host(&host).map(|h| h.phase);
                if phase != Some(HostPhase::Pending)
                    || !matches!(
                        self.m.state(),
                        RolloutState::Running | RolloutState::Waiting | RolloutState::Paused
                    )
                {
                    return Err(fail(format!(
                        "{host}: stage {} sent while the host is {phase:?} and the rollout {}",
                        order.order_id,
                        self.m.state()
                    )));
                }
                let activated = self.agents.get(&host).is_some_and(|a| {
                    a.orders
                        .iter()
                        .any(|(o, _)| matches!(o.action, OrderAction::Activate { .. }))
                });
                if activated {
                    return Err(fail(format!(
                        "{host}: stage {} sent after the host's activation",
                        order.order_id
                    )));
                }
            }
            _ => {}
        }
        if let Some(a) = self.agents.get_mut(&host)
            && a.up
        {
            a.orders.push((order, Vec::new()));
        }
        Ok(())
    }

    /// Promises 1, 2 and 4, after every step.
    fn check(&mut self) -> Result<(), TestCaseError> {
        let m = &self.m;
        let total = m.hosts().count() as u32;
        if let Some(l) = self.spec.max_in_flight {
            let cap = l.allowed_at_least_one(total);
            let n = m
                .hosts()
                .filter(|h| {
                    h.failure.is_none()
                        && matches!(h.phase, HostPhase::Dispatched | HostPhase::Activated)
                })
                .count() as u32;
            if n > cap {
                return Err(fail(format!("{n} hosts in flight, cap {cap}")));
            }
        }
        for h in m.hosts() {
            if h.wave as usize > m.current_wave() && h.phase != HostPhase::Pending {
                return Err(fail(format!(
                    "{} of wave {} is {:?} while the rollout is at wave {}",
                    h.id,
                    h.wave,
                    h.phase,
                    m.current_wave()
                )));
            }
        }
        let (prev, now) = (self.prev_state, m.state());
        let ok = match prev {
            RolloutState::RolledBack | RolloutState::Aborted | RolloutState::Failed => now == prev,
            RolloutState::Succeeded => {
                now == prev
                    || (matches!(
                        now,
                        RolloutState::RollingBack | RolloutState::RolledBack | RolloutState::Failed
                    ) && m
                        .decisions()
                        .iter()
                        .any(|d| d.kind == super::intent::DecisionKind::ManualRollback))
            }
            _ => true,
        };
        // A restart rebuilds from the records: a state that was never saved may be forgotten,
        // but a saved final state never is.
        if !ok {
            return Err(fail(format!("state went from {prev} to {now}")));
        }
        self.prev_state = now;
        Ok(())
    }

    fn reply(&mut self, id: &HostId, how: Reply) -> Result<(), TestCaseError> {
        let Some(a) = self.agents.get(id).cloned() else {
            return Ok(());
        };
        if !a.up {
            return Ok(());
        }
        let Some((order, results)) = a.orders.last().cloned() else {
            return Ok(());
        };
        let out =
            |phase: OrderPhase, code: ResultCode, current: &str, last_seq: u64| OrderOutcome {
                order_id: order.order_id.clone(),
                rollout_id: order.rollout_id.clone(),
                seq: order.seq,
                service: order.service.clone(),
                release: None,
                phase,
                code,
                message: String::new(),
                current_release: Some(ReleaseId::new(current).unwrap()),
                last_seq,
            };
        let base = self.baseline[id].clone();
        let target = self.spec.release.to_string();
        let outs: Vec<OrderOutcome> = match how {
            // An agent applies each sequence once: anything asked of an order it already
            // answered replays what it said (as the agent deduplicates by sequence).
            Reply::Duplicate => results.clone(),
            Reply::Good | Reply::Fail | Reply::Busy if !results.is_empty() => results.clone(),
            Reply::Late => {
                let old = a.orders.iter().rev().nth(1).cloned();
                old.map(|(_, r)| r).unwrap_or_default()
            }
            Reply::Stale(ahead) => {
                let last = order.seq + u64::from(ahead);
                vec![out(
                    OrderPhase::Rejected,
                    ResultCode::StaleOrder,
                    &a.current,
                    last,
                )]
            }
            Reply::Busy => vec![out(
                OrderPhase::Rejected,
                ResultCode::Busy,
                &a.current,
                a.last_seq,
            )],
            Reply::Good | Reply::Fail if order.seq <= a.last_seq && results.is_empty() => {
                // The agent has applied a higher sequence already.
                vec![out(
                    OrderPhase::Rejected,
                    ResultCode::StaleOrder,
                    &a.current,
                    a.last_seq,
                )]
            }
            Reply::Good => match &order.action {
                OrderAction::Activate { .. } => vec![
                    out(OrderPhase::Activated, ResultCode::Ok, &target, order.seq),
                    out(OrderPhase::Healthy, ResultCode::Ok, &target, order.seq),
                ],
                OrderAction::Confirm { .. } => {
                    vec![out(
                        OrderPhase::Confirmed,
                        ResultCode::Ok,
                        &a.current,
                        order.seq,
                    )]
                }
                OrderAction::Rollback { .. } => {
                    vec![out(
                        OrderPhase::RolledBack,
                        ResultCode::Ok,
                        &base,
                        order.seq,
                    )]
                }
                // A stage leaves what runs alone.
                OrderAction::Stage { .. } => {
                    vec![out(
                        OrderPhase::Staged,
                        ResultCode::Ok,
                        &a.current,
                        order.seq,
                    )]
                }
                OrderAction::Cancel => vec![out(
                    OrderPhase::Cancelled,
                    ResultCode::Ok,
                    &a.current,
                    order.seq,
                )],
            },
            Reply::Fail => match &order.action {
                OrderAction::Activate { .. } => vec![out(
                    OrderPhase::RolledBack,
                    ResultCode::Unhealthy,
                    &base,
                    order.seq,
                )],
                OrderAction::Stage { .. } => vec![out(
                    OrderPhase::Failed,
                    ResultCode::DownloadFailed,
                    &a.current,
                    order.seq,
                )],
                _ => vec![out(
                    OrderPhase::Failed,
                    ResultCode::IoError,
                    &a.current,
                    order.seq,
                )],
            },
        };
        // Replays (duplicates, late results, answers to an order already answered) tell the
        // coordinator nothing new about what the agent runs.
        let replay = !results.is_empty() || matches!(how, Reply::Duplicate | Reply::Late);
        if let Some(ag) = self.agents.get_mut(id).filter(|_| !replay) {
            for o in &outs {
                ag.last_seq = ag
                    .last_seq
                    .max(o.last_seq)
                    .max(if o.phase == OrderPhase::Rejected {
                        0
                    } else {
                        o.seq
                    });
                if let Some(c) = &o.current_release {
                    ag.current = c.to_string();
                }
                match (o.phase, &order.action) {
                    (
                        OrderPhase::Activated,
                        OrderAction::Activate {
                            confirm_deadline: Some(cd),
                            traffic_weight: None,
                            ..
                        },
                    ) => ag.armed_until = Some(self.now + cd.as_millis() as u64),
                    (OrderPhase::Confirmed | OrderPhase::RolledBack, _) => ag.armed_until = None,
                    _ => {}
                }
            }
            if let Some(last) = ag.orders.last_mut() {
                last.1.extend(outs.iter().cloned());
            }
        }
        for o in outs {
            let self_revert = o.code == ResultCode::ConfirmTimeout;
            let failed_before = self.m.host(id).is_some_and(|h| h.failure.is_some());
            self.feed(Input::OrderResult {
                host: id.clone(),
                outcome: o,
            })?;
            // 8: a CONFIRM_TIMEOUT self-revert (replayed) never makes a host count as failed.
            if self_revert && !failed_before && self.m.host(id).is_some_and(|h| h.failure.is_some())
            {
                return Err(fail(format!(
                    "{id}: a replayed CONFIRM_TIMEOUT self-revert counted as a failure: {:?}",
                    self.m.host(id).map(|h| (h.phase, h.failure.clone()))
                )));
            }
        }
        Ok(())
    }

    fn act(&mut self, a: &Action) -> Result<(), TestCaseError> {
        match a {
            Action::Reply(i, how) => {
                let id = self.pick(*i);
                self.reply(&id, *how)?;
            }
            Action::Health(i, ok) => {
                let id = self.pick(*i);
                let current = self.agents[&id].current.clone();
                self.feed(Input::Health {
                    host: id,
                    sample: HealthSample {
                        service: ServiceName::new("web").unwrap(),
                        release: Some(ReleaseId::new(current).unwrap()),
                        healthy: *ok,
                        checks_passing: u32::from(*ok),
                        checks_total: 1,
                        probe_latency_us: None,
                        restarts: 0,
                        cpu_percent: 1.0,
                        rss_bytes: 1,
                        observed_unix_ms: self.now,
                        requests_total: None,
                    },
                })?;
            }
            Action::Down(i) => {
                let id = self.pick(*i);
                if let Some(a) = self.agents.get_mut(&id) {
                    a.up = false;
                }
                self.feed(Input::HostDown(id))?;
            }
            Action::Up(i) => {
                let id = self.pick(*i);
                if let Some(a) = self.agents.get_mut(&id) {
                    a.up = true;
                }
                let s = self.snapshot(&id);
                self.feed(Input::HostUp(s))?;
            }
            Action::FailSaves(n) => self.store.fail = *n,
            Action::Restart => self.restart()?,
            Action::Operator(k) => {
                let action = [
                    OperatorAction::Pause,
                    OperatorAction::Resume,
                    OperatorAction::Promote,
                    OperatorAction::Abort,
                    OperatorAction::Retry,
                    OperatorAction::Rollback,
                ][usize::from(*k) % 6];
                self.feed(Input::Operator {
                    action,
                    actor: "op".into(),
                    reason: String::new(),
                })?;
            }
            Action::Advance(ms) => {
                // As the task does: wake at every deadline of the machine on the way.
                let end = self.now + u64::from(*ms);
                for _ in 0..64 {
                    let Some(d) = self
                        .m
                        .next_deadline()
                        .filter(|d| *d > self.now && *d <= end)
                    else {
                        break;
                    };
                    self.switches(d)?;
                    self.now = d;
                    self.feed(Input::Tick)?;
                }
                self.switches(end)?;
                self.now = end;
                self.feed(Input::Tick)?;
            }
        }
        self.check()
    }

    fn restart(&mut self) -> Result<(), TestCaseError> {
        let Some((header, hosts)) = self.store.read_back() else {
            return Ok(());
        };
        self.log(Step::Restart(self.now - T0));
        self.m = Rollout::restore(header, hosts, self.settings.clone(), self.now)
            .map_err(|e| fail(format!("restore failed: {e}")))?;
        self.unsaved = false;
        self.held.clear();
        // The state a restart resumes from is the persisted one.
        self.prev_state = self.m.state();
        let snaps = self.ids().iter().map(|h| self.snapshot(h)).collect();
        self.feed(Input::Resync(snaps))
    }

    /// Heals everything and lets the rollout finish; promise 5.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        self.store.fail = 0;
        if self.unsaved {
            self.feed(Input::Tick)?;
        }
        for id in self.ids() {
            if !self.agents[&id].up {
                self.agents.get_mut(&id).unwrap().up = true;
                let s = self.snapshot(&id);
                self.feed(Input::HostUp(s))?;
            }
        }
        let mut rounds = 0;
        while !(self.m.state().is_finished() && self.m.is_quiescent()) {
            rounds += 1;
            if rounds > 60 {
                return Err(fail(format!(
                    "no end after healing: {} ({})",
                    self.m.state(),
                    self.m.status().reason
                )));
            }
            if matches!(self.m.state(), RolloutState::Paused | RolloutState::Waiting) {
                self.feed(Input::Operator {
                    action: OperatorAction::Resume,
                    actor: "op".into(),
                    reason: String::new(),
                })?;
            }
            for id in self.ids() {
                self.reply(&id, Reply::Good)?;
            }
            self.now += 31_000;
            self.feed(Input::Tick)?;
            self.check()?;
        }
        let state = self.m.state();
        for h in self.m.hosts() {
            let ok = match state {
                RolloutState::Succeeded => matches!(
                    h.phase,
                    HostPhase::Confirmed | HostPhase::Failed | HostPhase::RolledBack
                ),
                // A host whose rollback failed after the rollout ended (it was unreachable
                // then) is failed and says why; the final state stays final.
                RolloutState::RolledBack | RolloutState::Aborted => matches!(
                    h.phase,
                    HostPhase::Pending | HostPhase::RolledBack | HostPhase::Failed
                ),
                RolloutState::Failed => !matches!(
                    h.phase,
                    HostPhase::Dispatched | HostPhase::Activated | HostPhase::RollingBack
                ),
                _ => false,
            };
            if !ok {
                return Err(fail(format!(
                    "rollout ended {state} with {} {:?} ({})",
                    h.id, h.phase, h.detail
                )));
            }
            let current = &self.agents[&h.id].current;
            let on_new = current == self.spec.release.as_str();
            let on_base = *current == self.baseline[&h.id];
            if matches!(state, RolloutState::RolledBack | RolloutState::Aborted)
                && on_new
                && h.rollback_failed.is_none()
            {
                return Err(fail(format!(
                    "rollout ended {state} but {} still runs {current}",
                    h.id
                )));
            }
            if !(on_new || on_base || h.rollback_failed.is_some()) {
                return Err(fail(format!("{} runs {current}", h.id)));
            }
            // 9: stages never change what a host serves.
            let activated = self.agents[&h.id]
                .orders
                .iter()
                .any(|(o, _)| matches!(o.action, OrderAction::Activate { .. }));
            if !activated && !on_base {
                return Err(fail(format!(
                    "{} was never activated but runs {current}",
                    h.id
                )));
            }
        }
        Ok(())
    }
}

fn run_case(c: &Case) -> Result<(), TestCaseError> {
    let mut w = World::new(c);
    let r = (|| {
        w.feed(Input::Tick)?;
        w.check()?;
        for a in &c.actions {
            w.act(a)?;
        }
        w.settle()
    })();
    r.map_err(|e| {
        let tail: Vec<String> = w.trace.iter().map(Step::show).collect();
        fail(format!("{e}\nlast steps:\n{}", tail.join("\n")))
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn the_rollout_machine_keeps_its_promises_under_random_interleavings() {
    let cases = env_u64("SERIN_MODEL_CASES").unwrap_or(10_000) as u32;
    let seed = env_u64("SERIN_MODEL_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!(
        "model test: {cases} cases, seed {seed} (replay with SERIN_MODEL_SEED={seed}, more with SERIN_MODEL_CASES)"
    );
    let started = std::time::Instant::now();
    let mut runner = TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..Config::default()
    });
    let result = runner.run(&case(), |c| run_case(&c));
    println!("model test: {cases} cases in {:.1?}", started.elapsed());
    if let Err(e) = result {
        panic!("seed {seed}: {e}");
    }
    let _ = Duration::ZERO;
}
