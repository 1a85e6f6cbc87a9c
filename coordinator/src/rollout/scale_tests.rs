//! The machine's cost at fleet scale, driven as the rollout task drives it under load: a
//! broadcast (one `100%` wave) and a no-op rollout (waves `1,1%,10%,50%,100%`, 1 ms bakes) over
//! many hosts whose agents answer every order at once, the answers taken in batches of at most
//! [`MAX_BATCH`] inputs (one machine step each) and `next_deadline` asked after every step.
//!
//! Each run checks what a user cares about (every host activated exactly once and confirmed, the
//! rollout succeeded). It prints what the machine cost: steps, time in
//! `step_many`, in `next_deadline`, in encoding the records it asks to save, and how long after
//! the rollout was created the first and the last order of the first wave were ready.
//!
//! CI runs 2,000 hosts on a debug build. For the figures: `SERIN_SCALE_HOSTS=19900 cargo test
//! --release -p serin-coordinator --lib scale_tests -- --nocapture` (or under
//! `valgrind --tool=callgrind` for instruction counts that a shared machine's load does not move).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serin_proto::{HostId, Order, OrderAction};

use super::machine::{Command, Input, Rollout, RolloutState};
use super::plan;
use super::record;
use super::settings::EngineSettings;
use super::spec::RolloutSpec;
use super::task::MAX_BATCH;
use super::testing::{host, outcome, raw_spec, release};
use crate::fleet::{OrderPhase, ResultCode};

/// What one run cost.
#[derive(Debug, Default)]
struct Cost {
    steps: u32,
    step: Duration,
    deadline: Duration,
    encode: Duration,
    saved_hosts: usize,
    saved_bytes: usize,
    first_order: Option<Duration>,
    last_first_wave_order: Option<Duration>,
    orders: usize,
}

/// Plays the driver: saves (encoded, to count their cost), allocations, sends; answers every
/// order at once; feeds the answers back in batches.
struct Sim {
    m: Rollout,
    now: u64,
    seqs: BTreeMap<HostId, u64>,
    /// Orders sent and not answered yet.
    outbox: Vec<(HostId, Order)>,
    activations: BTreeMap<HostId, u32>,
    confirmed: BTreeMap<HostId, u32>,
    cost: Cost,
    started: Instant,
    first_wave: usize,
}

impl Sim {
    fn new(hosts: usize, waves: &[&str]) -> Self {
        let fleet: Vec<_> = (0..hosts)
            .map(|i| host(&format!("host-{i:05}"), &format!("z{}", i % 3), "web-1"))
            .collect();
        let mut raw = raw_spec(waves);
        raw.bake_ms = 1;
        raw.canary_bake_ms = 1;
        raw.min_healthy_ms = 1;
        let spec = RolloutSpec::try_from(raw).unwrap();
        let started = Instant::now();
        let p = plan::plan(&spec, &fleet);
        let first_wave = p.waves[0].hosts.len();
        let now = 1_700_000_000_000;
        let m = Rollout::new("r1", spec, release(), &p, EngineSettings::default(), now);
        Self {
            m,
            now,
            seqs: BTreeMap::new(),
            outbox: Vec::new(),
            activations: BTreeMap::new(),
            confirmed: BTreeMap::new(),
            cost: Cost::default(),
            started,
            first_wave,
        }
    }

    fn step(&mut self, inputs: Vec<Input>) {
        let t = Instant::now();
        let cmds = self.m.step_many(self.now, inputs);
        self.cost.step += t.elapsed();
        self.cost.steps += 1;
        self.execute(cmds);
        let t = Instant::now();
        let _ = self.m.next_deadline();
        self.cost.deadline += t.elapsed();
    }

    fn execute(&mut self, cmds: Vec<Command>) {
        let mut queue: std::collections::VecDeque<Command> = cmds.into();
        while let Some(c) = queue.pop_front() {
            match c {
                Command::Persist(p) => {
                    let t = Instant::now();
                    let mut bytes = record::encode(&p.header).len();
                    for id in &p.hosts {
                        let h = self.m.host(id).expect("a saved host is in the rollout");
                        bytes += record::encode_host(h).len();
                    }
                    self.cost.encode += t.elapsed();
                    self.cost.saved_hosts += p.hosts.len();
                    self.cost.saved_bytes += bytes;
                }
                Command::AllocateSeqs(reqs) => {
                    let got = crate::rollout::testing::allocate_seqs(&mut self.seqs, reqs);
                    let t = Instant::now();
                    let more = self.m.step(self.now, Input::SeqsAllocated(got));
                    self.cost.step += t.elapsed();
                    self.cost.steps += 1;
                    queue.extend(more);
                }
                Command::Send { host, order } => {
                    self.cost.orders += 1;
                    let at = self.started.elapsed();
                    self.cost.first_order.get_or_insert(at);
                    match &order.action {
                        OrderAction::Activate { .. } => {
                            *self.activations.entry(host.clone()).or_default() += 1;
                            if self.activations.len() == self.first_wave {
                                self.cost.last_first_wave_order.get_or_insert(at);
                            }
                        }
                        OrderAction::Confirm { .. } => {
                            *self.confirmed.entry(host.clone()).or_default() += 1;
                        }
                        _ => {}
                    }
                    self.outbox.push((host, order));
                }
                Command::Hold { .. } | Command::Refused(_) | Command::Finished(_) => {}
            }
        }
    }

    /// Runs the rollout to its end; panics if it does not succeed within `max_steps`.
    fn run(mut self, max_steps: u32) -> Self {
        self.step(vec![Input::Tick]);
        while !self.m.state().is_finished() || !self.outbox.is_empty() {
            assert!(
                self.cost.steps < max_steps,
                "no end after {} steps: rollout {}",
                self.cost.steps,
                self.m.state()
            );
            if self.outbox.is_empty() {
                // Nothing to answer: time passes to the machine's next deadline.
                let next = self
                    .m
                    .next_deadline()
                    .expect("a running rollout has a deadline");
                self.now = self.now.max(next);
                self.step(vec![Input::Tick]);
                continue;
            }
            let answers: Vec<Input> = std::mem::take(&mut self.outbox)
                .into_iter()
                .flat_map(|(host, order)| {
                    let phases: &[OrderPhase] = match &order.action {
                        OrderAction::Activate { .. } => {
                            &[OrderPhase::Activated, OrderPhase::Healthy]
                        }
                        OrderAction::Confirm { .. } => &[OrderPhase::Confirmed],
                        _ => &[],
                    };
                    phases
                        .iter()
                        .map(|p| Input::OrderResult {
                            host: host.clone(),
                            outcome: outcome(&order, *p, ResultCode::Ok),
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            self.now += 1;
            let mut answers = answers.into_iter().peekable();
            while answers.peek().is_some() {
                let batch: Vec<Input> = answers.by_ref().take(MAX_BATCH).collect();
                self.step(batch);
            }
        }
        self
    }

    fn report(&self, what: &str) {
        let c = &self.cost;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{what}: {} hosts, {} steps: step_many {:.1} ms, next_deadline {:.1} ms, encoding {:.1} ms ({} host records, {} bytes); first order at {:.1} ms, last of wave 1 at {:.1} ms; {} orders",
            self.m.hosts().count(),
            c.steps,
            ms(c.step),
            ms(c.deadline),
            ms(c.encode),
            c.saved_hosts,
            c.saved_bytes,
            c.first_order.map_or(f64::NAN, ms),
            c.last_first_wave_order.map_or(f64::NAN, ms),
            c.orders,
        );
    }

    fn assert_everyone_once(&self, hosts: usize) {
        assert_eq!(
            self.m.state(),
            RolloutState::Succeeded,
            "{}",
            self.m.status().reason
        );
        assert_eq!(self.activations.len(), hosts, "hosts activated");
        assert!(
            self.activations.values().all(|&n| n == 1),
            "a host was activated twice"
        );
        assert_eq!(self.confirmed.len(), hosts, "hosts confirmed");
    }
}

fn hosts() -> usize {
    std::env::var("SERIN_SCALE_HOSTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000)
}

#[test]
fn a_broadcast_activates_and_confirms_every_host_once() {
    let n = hosts();
    let sim = Sim::new(n, &["100%"]).run(1_000);
    sim.report("broadcast");
    sim.assert_everyone_once(n);
}

#[test]
fn a_no_op_rollout_over_five_waves_activates_and_confirms_every_host_once() {
    let n = hosts();
    let sim = Sim::new(n, &["1", "1%", "10%", "50%", "100%"]).run(2_000);
    sim.report("no-op rollout");
    sim.assert_everyone_once(n);
}
