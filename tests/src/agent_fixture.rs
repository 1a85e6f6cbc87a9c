//! One agent attached to one fake coordinator: the setting of every `agent_*` test.
//!
//! [`AgentFixture`] bundles a [`FakeCoordinator`] and an [`AgentProc`] and adds the steps the tests
//! share: send an order, wait for a result, install a first release, wait until a release serves,
//! and check that what `current` points at is a complete release that is the one serving. Its
//! [`dump`](AgentFixture::dump) (recorded messages, agent log, disk) goes into every timeout panic.

use std::time::{Duration, Instant};

use serin_proto::wire::{self, OrderPhase, OrderResult};

use crate::agent_proc::{AgentOptions, AgentProc, SERVICE};
use crate::demo_release::DemoRelease;
use crate::fake_coordinator::FakeCoordinator;
use crate::orders::{self, Deadlines};
use crate::wait;

/// Default timeout of the fixture's waits.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A fake coordinator plus an agent attached to it.
pub struct AgentFixture {
    /// The agent under test (dropped first: it kills its processes).
    pub agent: AgentProc,
    /// The coordinator it talks to.
    pub coord: FakeCoordinator,
}

impl AgentFixture {
    /// Starts a coordinator and an agent with default options and waits for the agent to attach.
    pub fn start(name: &str) -> Self {
        Self::start_with(AgentOptions::new(name))
    }

    /// Starts a coordinator and an agent with `opts` and waits for the agent to attach.
    pub fn start_with(opts: AgentOptions) -> Self {
        let coord = FakeCoordinator::start();
        let agent = AgentProc::start(&coord.url(), &opts);
        let fx = Self { agent, coord };
        fx.wait_attached(1);
        fx
    }

    /// The agent's host id.
    pub fn host(&self) -> &str {
        &self.agent.host_id
    }

    /// Everything known about the host: recorded messages, agent log, disk.
    pub fn dump(&self) -> String {
        format!("{}\n{}", self.coord.dump(self.host()), self.agent.dump())
    }

    /// Waits until the agent attached `n` times and is connected; returns its latest Hello.
    pub fn wait_attached(&self, n: u32) -> wire::Hello {
        self.coord
            .wait_attached(self.host(), n, TIMEOUT, &|| self.dump())
    }

    /// Sends `order` to the agent; panics when it is not connected.
    pub fn send(&self, order: wire::Order) {
        if let Err(e) = self.coord.send_order(self.host(), order) {
            panic!("sending an order: {e:#}\n{}", self.dump());
        }
    }

    /// Waits for a result of order `seq` in `phase`.
    pub fn wait_phase(&self, seq: u64, phase: OrderPhase) -> OrderResult {
        self.wait_result(
            &format!("a {} result for order seq {seq}", phase.as_str_name()),
            |r| r.seq == seq && r.phase() == phase,
        )
    }

    /// Waits for a result that `pred` accepts; `what` names it in the timeout panic.
    pub fn wait_result(&self, what: &str, pred: impl Fn(&OrderResult) -> bool) -> OrderResult {
        self.coord
            .wait_result(self.host(), what, TIMEOUT, &|| self.dump(), pred)
    }

    /// Waits for a terminal result of order `seq` (anything but PROGRESS).
    pub fn wait_outcome(&self, seq: u64) -> OrderResult {
        self.wait_result(&format!("an outcome for order seq {seq}"), |r| {
            r.seq == seq && r.phase() != OrderPhase::Progress
        })
    }

    /// Waits for the end of activation `seq`: HEALTHY, or the FAILED, REJECTED or ROLLED_BACK
    /// that ended it instead (so a test asserting HEALTHY fails at once with the reason).
    pub fn wait_activation_end(&self, seq: u64) -> OrderResult {
        self.wait_result(&format!("HEALTHY or a failure for order seq {seq}"), |r| {
            r.seq == seq
                && matches!(
                    r.phase(),
                    OrderPhase::Healthy
                        | OrderPhase::Failed
                        | OrderPhase::Rejected
                        | OrderPhase::RolledBack
                )
        })
    }

    /// Every result recorded for order `seq`.
    pub fn results_for(&self, seq: u64) -> Vec<OrderResult> {
        self.coord
            .results(self.host())
            .into_iter()
            .filter(|r| r.seq == seq)
            .collect()
    }

    /// Puts `release` in the coordinator's artifact store.
    pub fn publish(&self, release: &DemoRelease) {
        self.coord.add_artifact(release.bytes.clone());
    }

    /// Waits until the demo service answers `/version` with `version`.
    pub fn wait_serving(&self, version: &str) {
        wait::wait_for(
            &format!("the service to serve version {version}"),
            TIMEOUT,
            &|| self.dump(),
            || self.agent.version().ok().as_deref() == Some(version),
        );
    }

    /// Installs the first release with order `seq`: activate with quick deadlines and no confirm
    /// needed, then waits for HEALTHY, for it to serve, and for `current` to point at it.
    pub fn install_first(&self, seq: u64, release: &DemoRelease) {
        self.publish(release);
        self.send(orders::activate(
            seq,
            release.wire(SERVICE, ""),
            Deadlines::quick(),
        ));
        let r = self.wait_result("the first release to become healthy", |r| {
            r.seq == seq
                && matches!(
                    r.phase(),
                    OrderPhase::Healthy | OrderPhase::Failed | OrderPhase::Rejected
                )
        });
        assert_eq!(
            r.phase(),
            OrderPhase::Healthy,
            "installing the first release {}: {}\n{}",
            release.id,
            crate::fake_coordinator::describe_result(&r),
            self.dump()
        );
        self.wait_serving(&release.id);
        assert_eq!(
            self.agent.current_release().as_deref(),
            Some(release.id.as_str()),
            "current after installing {}\n{}",
            release.id,
            self.dump()
        );
    }

    /// Activates `release` with order `seq` and `deadlines`; returns when ACTIVATED was reported.
    pub fn activate(&self, seq: u64, release: &DemoRelease, deadlines: Deadlines) -> Instant {
        self.publish(release);
        self.send(orders::activate(seq, release.wire(SERVICE, ""), deadlines));
        self.coord
            .wait_result_at(
                self.host(),
                &format!("ACTIVATED for order seq {seq}"),
                TIMEOUT,
                &|| self.dump(),
                |r| r.seq == seq && r.phase() == OrderPhase::Activated,
            )
            .0
    }

    /// Checks that `current` points at a complete, verified release and that this release is the
    /// one answering `/version`; returns its id.
    pub fn consistent_release(&self) -> Result<String, String> {
        let current = self
            .agent
            .current_release()
            .ok_or_else(|| "no current symlink".to_owned())?;
        self.agent
            .verify_release(&current)
            .map_err(|e| format!("current release {current} is not complete: {e:#}"))?;
        let serving = self
            .agent
            .version()
            .map_err(|e| format!("service not answering: {e:#}"))?;
        if serving != current {
            return Err(format!("current is {current} but {serving} is serving"));
        }
        Ok(current)
    }

    /// Waits until [`consistent_release`](Self::consistent_release) holds; returns the release.
    pub fn wait_consistent(&self) -> String {
        wait::wait_for_value(
            "current to point at a complete release that is the one serving",
            TIMEOUT,
            &|| {
                let problem = self.consistent_release().err().unwrap_or_default();
                format!("last problem: {problem}\n{}", self.dump())
            },
            || self.consistent_release().ok(),
        )
    }
}
