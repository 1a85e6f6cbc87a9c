//! The activation state machine: swap a release in, restart the service, watch it through the
//! dead-man switch, and roll back locally when it fails.
//!
//! The machine is pure: [`Activation::step`] takes an [`Input`] (with the wall-clock time passed
//! in where it matters) and returns the [`Command`]s the driver must execute, in order. It does
//! no I/O and never reads the clock. The whole [`Activation`] is the journal persisted in
//! `state.json` before each step, so an agent restarted in any phase can finish the job: deadlines
//! are absolute Unix milliseconds and hold across restarts.
//!
//! ```text
//! Journaled --Swapped--> Swapped --Started--> Armed --(healthy for min_healthy, confirmed)--> done
//!                           |                   |
//!               StartFailed/HookFailed  unhealthy / no confirm / died
//!                           v                   v
//!                      RollingBack --Swapped--> RollbackSwapped --Started/StartFailed--> done
//! ```
//!
//! A service behind a load balancer ([`Activation::drain`]) has every swap wrapped in the
//! drain cycle: before each [`Command::Swap`] of an activation or a rollback the machine asks for
//! a [`Command::Drain`] (the driver answers `drain` on the agent-check port and waits until the
//! server is idle or the drain timeout passed, then feeds [`Input::Drained`]); once the new
//! release is healthy (or the restored one restarted) it asks for a [`Command::Undrain`] (`ready`
//! at the target weight, slow start from a low weight). So: drain → wait until idle → swap →
//! healthy → undrain.

use serde::{Deserialize, Serialize};
use serin_proto::wire::{OrderPhase, ResultCode};

/// The order an activation answers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRef {
    /// The order's id.
    pub order_id: String,
    /// The rollout it belongs to.
    pub rollout_id: String,
    /// Its sequence number.
    pub seq: u64,
}

/// Timing of an activation, from the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadlines {
    /// The new release must be healthy for `min_healthy_ms` within this time after its start.
    pub healthy_deadline_ms: u64,
    /// How long the release must stay healthy before it is reported healthy.
    pub min_healthy_ms: u64,
    /// A confirm must arrive within this time after the start; `None`: confirmed once healthy.
    pub confirm_deadline_ms: Option<u64>,
}

/// Why the dead-man switch restored the previous release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RollbackCause {
    /// The new release did not start or did not stay up.
    FailedToStart,
    /// The new release failed its health checks, or was not healthy in time.
    Unhealthy,
    /// No confirm arrived before the confirm deadline.
    ConfirmTimeout,
    /// The new release started but its `post-start` hook failed or timed out.
    HookFailed,
}

impl RollbackCause {
    /// The result code reported for this cause.
    pub fn code(self) -> ResultCode {
        match self {
            RollbackCause::FailedToStart => ResultCode::ServiceFailedToStart,
            RollbackCause::Unhealthy => ResultCode::Unhealthy,
            RollbackCause::ConfirmTimeout => ResultCode::ConfirmTimeout,
            RollbackCause::HookFailed => ResultCode::HookFailed,
        }
    }
}

/// Where an activation is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// The intent "activate `to` instead of `from`" is journaled; `current` may still point at
    /// `from` (or already at `to`, if the agent died right after the swap).
    Journaled,
    /// `current` points at `to`; the service still runs (or is being restarted into) the old code.
    Swapped,
    /// The new release was started; the dead-man switch is armed with absolute deadlines.
    Armed {
        /// When the service was started with the new release.
        started_unix_ms: u64,
        /// The release must have been healthy for `min_healthy` by then.
        healthy_by_unix_ms: u64,
        /// A confirm must arrive by then; `None`: no confirm needed.
        confirm_by_unix_ms: Option<u64>,
        /// Since when the checks have been passing without interruption; `None`: not passing.
        healthy_since_unix_ms: Option<u64>,
        /// HEALTHY was reported; only the confirm is awaited now.
        reported_healthy: bool,
    },
    /// The new release failed; `current` is being pointed back at `from`.
    RollingBack {
        /// Why.
        cause: RollbackCause,
        /// Human explanation, reported with ROLLED_BACK.
        message: String,
    },
    /// The journal record of a forward step could not be written after `current` was swapped:
    /// `current` is being pointed back at `from`, the old process never stopped. Never
    /// restarts anything.
    Abandoning {
        /// Why, reported with FAILED / IO_ERROR.
        message: String,
    },
    /// `current` points at `from` again; the service is being restarted with it.
    RollbackSwapped {
        /// Why.
        cause: RollbackCause,
        /// Human explanation, reported with ROLLED_BACK.
        message: String,
    },
}

/// One activation in flight: the journal entry of `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    /// The order being carried out.
    pub order: OrderRef,
    /// The release `current` pointed at before; `None`: none.
    pub from: Option<String>,
    /// The release being activated.
    pub to: String,
    /// Timing from the order.
    pub deadlines: Deadlines,
    /// Where the activation is.
    pub phase: Phase,
    /// The service sits behind a load balancer: each swap is drained first and undrained once
    /// healthy. Absent in journals written before the drain cycle existed.
    #[serde(default)]
    pub drain: bool,
    /// The order's traffic weight for the new release, applied when it is undrained.
    #[serde(default)]
    pub weight: Option<u8>,
}

/// What health monitoring concluded at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not enough probes yet to say.
    Unknown,
    /// Every check passes.
    Passing,
    /// At least one check fails.
    Failing,
}

impl Verdict {
    /// The verdict as the protocol carries it (`Unknown` is `PENDING`: no verdict yet).
    pub fn to_wire(self) -> serin_proto::wire::HealthVerdict {
        use serin_proto::wire::HealthVerdict;
        match self {
            Verdict::Unknown => HealthVerdict::Pending,
            Verdict::Passing => HealthVerdict::Passing,
            Verdict::Failing => HealthVerdict::Failing,
        }
    }
}

/// A health observation of the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The checks' verdict.
    pub verdict: Verdict,
    /// Whether the service's process (or unit) is up.
    pub running: bool,
    /// Restarts since the release was started.
    pub restarts: u32,
    /// What failed, for messages.
    pub detail: String,
}

/// An input to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The driver pointed `current` where the last [`Command::Swap`] said.
    Swapped,
    /// The service was (re)started successfully at `now_ms`.
    Started {
        /// Wall-clock time, Unix ms.
        now_ms: u64,
    },
    /// Starting the service failed.
    StartFailed {
        /// Why.
        message: String,
    },
    /// The service started, but the incoming release's `post-start` hook failed.
    HookFailed {
        /// The hook's evidence (exit status, output tail).
        message: String,
    },
    /// A health observation at `now_ms`.
    Health {
        /// Wall-clock time, Unix ms.
        now_ms: u64,
        /// What was observed.
        observation: Observation,
    },
    /// Time passed.
    Tick {
        /// Wall-clock time, Unix ms.
        now_ms: u64,
    },
    /// The driver could not write the journal record of a forward step ([`Phase::Journaled`] or
    /// [`Phase::Swapped`], see [`Activation::journal_required`]); the step after it must not
    /// run.
    JournalFailed {
        /// The write error.
        message: String,
    },
    /// The coordinator is alive and still deciding (a `HoldConfirm` for this activation's
    /// release): the confirm deadline moves to at least `now_ms + confirm_deadline_ms`.
    Hold {
        /// Wall-clock time the hold arrived, Unix ms.
        now_ms: u64,
        /// How long from now a confirm may still come.
        confirm_deadline_ms: u64,
    },
    /// A confirm order for the activated release arrived.
    Confirm {
        /// The confirm order (the CONFIRMED result answers it).
        order: OrderRef,
    },
    /// The last [`Command::Drain`] is done: the server is idle, or the drain timeout passed
    /// (the driver records which, with its timing, in the evidence).
    Drained,
}

/// Something the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Write the activation (the journal) durably before anything else.
    Persist,
    /// Point `current` at this release atomically.
    Swap(String),
    /// Take the server out of the load balancer's rotation (`drain`) and wait until it is idle
    /// or the drain timeout passed, then feed back [`Input::Drained`].
    Drain,
    /// Put the server back into rotation (`ready` at the target weight, with the slow-start
    /// ramp if one is configured) once the service passes its checks.
    Undrain {
        /// The order's traffic weight for the new release (forward only); `None` on a rollback:
        /// the weight from before the activation.
        weight: Option<u8>,
        /// Undrained after a rollback's restart rather than the new release's HEALTHY.
        rollback: bool,
    },
    /// Restart the service, then feed back [`Input::Started`] or [`Input::StartFailed`].
    Restart,
    /// Send an order result.
    Report {
        /// The order it answers.
        order: OrderRef,
        /// The release activated.
        release: String,
        /// Its phase.
        phase: OrderPhase,
        /// Its code.
        code: ResultCode,
        /// Human explanation.
        message: String,
        /// What `current` points at now.
        current: Option<String>,
    },
    /// The activation is over; clear the journal.
    Finish {
        /// How it ended.
        outcome: Outcome,
        /// The release current pointed at before.
        from: Option<String>,
        /// The release that was activated.
        to: String,
    },
}

/// How an activation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new release stays (confirmed, or healthy without a confirm needed).
    Kept,
    /// The previous release was restored.
    RolledBack,
    /// The new release failed and there was nothing to restore; it stays in place.
    FailedInPlace,
    /// The activation stopped before the new release ran (its journal could not be written);
    /// the release that ran before still runs.
    Abandoned,
}

/// A transition's result: the next state (`None`: finished) and the commands to execute.
pub type Step = (Option<Activation>, Vec<Command>);

impl Activation {
    /// Starts an activation: the journal must be persisted, then `current` swapped to `to`.
    pub fn begin(order: OrderRef, from: Option<String>, to: String, deadlines: Deadlines) -> Step {
        Self::begin_with(order, from, to, deadlines, false, None)
    }

    /// Starts an activation; with `drain`, the service sits behind a load balancer and the swap
    /// waits for a drain (journal, drain, then swap); `weight` is the order's traffic weight,
    /// applied with the undrain.
    pub fn begin_with(
        order: OrderRef,
        from: Option<String>,
        to: String,
        deadlines: Deadlines,
        drain: bool,
        weight: Option<u8>,
    ) -> Step {
        let a = Activation {
            order,
            from,
            to: to.clone(),
            deadlines,
            phase: Phase::Journaled,
            drain,
            weight,
        };
        let mut commands = vec![Command::Persist];
        commands.extend(a.swap_to(to));
        (Some(a), commands)
    }

    /// The commands that swap `current` to `release`: a drain first when behind a load
    /// balancer (the swap follows [`Input::Drained`]), else the swap at once.
    fn swap_to(&self, release: String) -> Vec<Command> {
        if self.drain {
            vec![Command::Drain]
        } else {
            vec![Command::Swap(release)]
        }
    }

    /// The [`Command::Undrain`] before `commands`, when behind a load balancer.
    fn undrain_then(&self, rollback: bool, commands: Vec<Command>) -> Vec<Command> {
        if self.drain {
            let weight = if rollback { None } else { self.weight };
            std::iter::once(Command::Undrain { weight, rollback })
                .chain(commands)
                .collect()
        } else {
            commands
        }
    }

    /// What the driver must do after an agent restart found this activation in the journal.
    /// `target_intact`: the release being activated is still complete and verified on disk.
    pub fn resume(self, target_intact: bool) -> Step {
        match &self.phase {
            Phase::Journaled | Phase::Swapped if !target_intact => {
                let message = format!(
                    "release {} is no longer intact on disk after an agent restart",
                    self.to
                );
                self.roll_back(RollbackCause::FailedToStart, message)
            }
            // A drain that was under way starts over: the restarted agent's responder
            // answered `ready` again.
            Phase::Journaled => {
                let cmds = self.swap_to(self.to.clone());
                (Some(self), cmds)
            }
            Phase::Swapped => (Some(self), vec![Command::Restart]),
            // The deadlines are absolute and still hold; the health history starts over.
            Phase::Armed { .. } => {
                let mut a = self;
                if let Phase::Armed {
                    healthy_since_unix_ms,
                    ..
                } = &mut a.phase
                {
                    *healthy_since_unix_ms = None;
                }
                (Some(a), vec![Command::Persist])
            }
            Phase::RollingBack { .. } => {
                let from = self.from.clone();
                match from {
                    Some(f) => {
                        let cmds = self.swap_to(f);
                        (Some(self), cmds)
                    }
                    None => (Some(self), vec![]),
                }
            }
            Phase::RollbackSwapped { .. } => (Some(self), vec![Command::Restart]),
            Phase::Abandoning { .. } => match self.from.clone() {
                Some(f) => (Some(self), vec![Command::Swap(f)]),
                None => (Some(self), vec![]),
            },
        }
    }

    /// Whether this phase's journal record must be durable before the next step runs. True for
    /// the forward steps (swap, restart into the new release); the record of later phases
    /// (armed, rolling back) only refines what a restarted agent would do, and a rollback to
    /// the release that ran before goes on even when the disk refuses writes.
    pub fn journal_required(&self) -> bool {
        matches!(self.phase, Phase::Journaled | Phase::Swapped)
    }

    /// Whether the dead-man switch is armed (the activation awaits health and/or confirm).
    pub fn is_armed(&self) -> bool {
        matches!(self.phase, Phase::Armed { .. })
    }

    /// The next wall-clock time at which a [`Input::Tick`] could change something.
    pub fn next_deadline(&self) -> Option<u64> {
        match &self.phase {
            Phase::Armed {
                healthy_by_unix_ms,
                confirm_by_unix_ms,
                healthy_since_unix_ms,
                reported_healthy,
                ..
            } => {
                let mut next = confirm_by_unix_ms.unwrap_or(u64::MAX);
                if !reported_healthy {
                    next = next.min(*healthy_by_unix_ms);
                    if let Some(since) = healthy_since_unix_ms {
                        next = next.min(since.saturating_add(self.deadlines.min_healthy_ms));
                    }
                }
                (next != u64::MAX).then_some(next)
            }
            _ => None,
        }
    }

    /// Applies one input.
    pub fn step(self, input: Input) -> Step {
        match (&self.phase, input) {
            (Phase::Journaled, Input::Drained) if self.drain => {
                let to = self.to.clone();
                (Some(self), vec![Command::Swap(to)])
            }
            (Phase::RollingBack { .. }, Input::Drained) if self.drain => match self.from.clone() {
                Some(from) => (Some(self), vec![Command::Swap(from)]),
                None => (Some(self), vec![]),
            },
            (Phase::Journaled, Input::Swapped) => {
                let mut a = self;
                a.phase = Phase::Swapped;
                (Some(a), vec![Command::Persist, Command::Restart])
            }
            (Phase::Swapped, Input::Started { now_ms }) => {
                let d = self.deadlines;
                let mut a = self;
                a.phase = Phase::Armed {
                    started_unix_ms: now_ms,
                    healthy_by_unix_ms: now_ms.saturating_add(d.healthy_deadline_ms),
                    confirm_by_unix_ms: d.confirm_deadline_ms.map(|c| now_ms.saturating_add(c)),
                    healthy_since_unix_ms: None,
                    reported_healthy: false,
                };
                let report = Command::Report {
                    order: a.order.clone(),
                    release: a.to.clone(),
                    phase: OrderPhase::Activated,
                    code: ResultCode::Ok,
                    message: format!("release {} is current and was started", a.to),
                    current: Some(a.to.clone()),
                };
                (Some(a), vec![Command::Persist, report])
            }
            (Phase::Swapped, Input::StartFailed { message }) => {
                let message = format!("release {} failed to start: {message}", self.to);
                self.roll_back(RollbackCause::FailedToStart, message)
            }
            (Phase::Swapped, Input::HookFailed { message }) => {
                let message = format!("release {} failed its post-start hook: {message}", self.to);
                self.roll_back(RollbackCause::HookFailed, message)
            }
            (
                Phase::Armed { .. },
                Input::Health {
                    now_ms,
                    observation,
                },
            ) => self.observe(now_ms, observation),
            (Phase::Armed { .. }, Input::Tick { now_ms }) => self.tick(now_ms),
            (
                Phase::Armed { .. },
                Input::Hold {
                    now_ms,
                    confirm_deadline_ms,
                },
            ) => {
                let mut a = self;
                let mut moved = false;
                if let Phase::Armed {
                    confirm_by_unix_ms: Some(by),
                    ..
                } = &mut a.phase
                {
                    let held = now_ms.saturating_add(confirm_deadline_ms);
                    if held > *by {
                        *by = held;
                        moved = true;
                    }
                }
                // Journaled, so the later deadline holds across an agent restart.
                (
                    Some(a),
                    if moved {
                        vec![Command::Persist]
                    } else {
                        vec![]
                    },
                )
            }
            (Phase::Armed { .. }, Input::Confirm { order }) => {
                let report = Command::Report {
                    order,
                    release: self.to.clone(),
                    phase: OrderPhase::Confirmed,
                    code: ResultCode::Ok,
                    message: format!("release {} confirmed", self.to),
                    current: Some(self.to.clone()),
                };
                (None, vec![report, self.finish(Outcome::Kept)])
            }
            (Phase::RollingBack { cause, message }, Input::Swapped) => {
                let (cause, message) = (*cause, message.clone());
                let mut a = self;
                a.phase = Phase::RollbackSwapped { cause, message };
                (Some(a), vec![Command::Persist, Command::Restart])
            }
            (Phase::RollbackSwapped { cause, message }, Input::Started { .. }) => {
                let report = Command::Report {
                    order: self.order.clone(),
                    release: self.to.clone(),
                    phase: OrderPhase::RolledBack,
                    code: cause.code(),
                    message: message.clone(),
                    current: self.from.clone(),
                };
                let cmds = self.undrain_then(true, vec![report, self.finish(Outcome::RolledBack)]);
                (None, cmds)
            }
            (Phase::RollbackSwapped { cause, message }, Input::StartFailed { message: why }) => {
                let from = self.from.clone().unwrap_or_default();
                let report = Command::Report {
                    order: self.order.clone(),
                    release: self.to.clone(),
                    phase: OrderPhase::RolledBack,
                    code: cause.code(),
                    message: format!(
                        "{message}; restored release {from} but it failed to start too: {why}"
                    ),
                    current: self.from.clone(),
                };
                (None, vec![report, self.finish(Outcome::RolledBack)])
            }
            (Phase::Journaled, Input::JournalFailed { message }) => {
                let report = self.abandoned_report(&message, self.from.clone());
                (None, vec![report, self.finish(Outcome::Abandoned)])
            }
            (Phase::Swapped, Input::JournalFailed { message }) => match self.from.clone() {
                Some(from) => {
                    let mut a = self;
                    a.phase = Phase::Abandoning { message };
                    (Some(a), vec![Command::Swap(from)])
                }
                None => {
                    let report = self.abandoned_report(&message, Some(self.to.clone()));
                    (None, vec![report, self.finish(Outcome::Abandoned)])
                }
            },
            (Phase::Abandoning { message }, Input::Swapped) => {
                let report = self.abandoned_report(message, self.from.clone());
                (None, vec![report, self.finish(Outcome::Abandoned)])
            }
            // Anything else is not meaningful in this phase and changes nothing.
            (_, _) => (Some(self), vec![]),
        }
    }

    fn observe(self, now_ms: u64, o: Observation) -> Step {
        let Phase::Armed {
            healthy_by_unix_ms,
            healthy_since_unix_ms,
            reported_healthy,
            ..
        } = self.phase
        else {
            return (Some(self), vec![]);
        };
        let never_healthy = healthy_since_unix_ms.is_none() && !reported_healthy;
        // A process that exits or restarts before the release completed its minimum healthy
        // time did not start, even if a check passed for a moment in between.
        if !reported_healthy && (!o.running || o.restarts > 0) {
            let message = format!(
                "release {} did not stay up after start (running: {}, restarts: {}){}",
                self.to,
                o.running,
                o.restarts,
                detail_suffix(&o.detail)
            );
            return self.roll_back(RollbackCause::FailedToStart, message);
        }
        if !o.running {
            let message = format!(
                "release {} stopped running before it was confirmed{}",
                self.to,
                detail_suffix(&o.detail)
            );
            return self.roll_back(RollbackCause::Unhealthy, message);
        }
        match o.verdict {
            // Not healthy *yet*: a starting service (still running, not restarted) gets until
            // the healthy deadline to start passing its checks; failing fast is only for a
            // release that was healthy once.
            Verdict::Failing if never_healthy => {
                if now_ms >= healthy_by_unix_ms {
                    let message = format!(
                        "release {} was not healthy within the healthy deadline of {} ms{}",
                        self.to,
                        self.deadlines.healthy_deadline_ms,
                        detail_suffix(&o.detail)
                    );
                    return self.roll_back(RollbackCause::Unhealthy, message);
                }
                self.tick(now_ms)
            }
            Verdict::Failing => {
                let message = format!(
                    "release {} failed its health checks before it was confirmed{}",
                    self.to,
                    detail_suffix(&o.detail)
                );
                self.roll_back(RollbackCause::Unhealthy, message)
            }
            Verdict::Passing => {
                let mut a = self;
                if let Phase::Armed {
                    healthy_since_unix_ms: since @ None,
                    ..
                } = &mut a.phase
                {
                    *since = Some(now_ms);
                }
                a.tick(now_ms)
            }
            Verdict::Unknown => {
                let mut a = self;
                if let Phase::Armed {
                    healthy_since_unix_ms: since,
                    ..
                } = &mut a.phase
                {
                    *since = None;
                }
                a.tick(now_ms)
            }
        }
    }

    fn tick(self, now_ms: u64) -> Step {
        let Phase::Armed {
            started_unix_ms,
            healthy_by_unix_ms,
            confirm_by_unix_ms,
            healthy_since_unix_ms,
            reported_healthy,
        } = self.phase
        else {
            return (Some(self), vec![]);
        };
        let d = self.deadlines;
        if !reported_healthy {
            let healthy_long_enough = healthy_since_unix_ms
                .is_some_and(|since| now_ms.saturating_sub(since) >= d.min_healthy_ms);
            if healthy_long_enough {
                let report = Command::Report {
                    order: self.order.clone(),
                    release: self.to.clone(),
                    phase: OrderPhase::Healthy,
                    code: ResultCode::Ok,
                    message: format!(
                        "release {} has been healthy for {} ms",
                        self.to, d.min_healthy_ms
                    ),
                    current: Some(self.to.clone()),
                };
                if confirm_by_unix_ms.is_none() {
                    let cmds = self.undrain_then(false, vec![report, self.finish(Outcome::Kept)]);
                    return (None, cmds);
                }
                let report = self.undrain_then(false, vec![report]);
                let mut a = self;
                a.phase = Phase::Armed {
                    started_unix_ms,
                    healthy_by_unix_ms,
                    confirm_by_unix_ms,
                    healthy_since_unix_ms,
                    reported_healthy: true,
                };
                let mut cmds = vec![Command::Persist];
                cmds.extend(report);
                return a.tick_confirm(now_ms, cmds);
            }
            if now_ms >= healthy_by_unix_ms {
                let message = format!(
                    "release {} was not healthy for {} ms within the healthy deadline of {} ms",
                    self.to, d.min_healthy_ms, d.healthy_deadline_ms
                );
                return self.roll_back(RollbackCause::Unhealthy, message);
            }
        }
        self.tick_confirm(now_ms, vec![])
    }

    fn tick_confirm(self, now_ms: u64, mut commands: Vec<Command>) -> Step {
        if let Phase::Armed {
            confirm_by_unix_ms: Some(by),
            ..
        } = self.phase
            && now_ms >= by
        {
            let message = format!(
                "no confirm for release {} arrived within {} ms",
                self.to,
                self.deadlines.confirm_deadline_ms.unwrap_or_default()
            );
            let (next, more) = self.roll_back(RollbackCause::ConfirmTimeout, message);
            commands.extend(more);
            return (next, commands);
        }
        (Some(self), commands)
    }

    fn roll_back(self, cause: RollbackCause, message: String) -> Step {
        match self.from.clone() {
            Some(from) => {
                let mut a = self;
                a.phase = Phase::RollingBack { cause, message };
                let mut cmds = vec![Command::Persist];
                cmds.extend(a.swap_to(from));
                (Some(a), cmds)
            }
            None => {
                let report = Command::Report {
                    order: self.order.clone(),
                    release: self.to.clone(),
                    phase: OrderPhase::Failed,
                    code: cause.code(),
                    message: format!("{message}; no previous release to restore"),
                    current: Some(self.to.clone()),
                };
                (None, vec![report, self.finish(Outcome::FailedInPlace)])
            }
        }
    }
}

impl Activation {
    fn abandoned_report(&self, message: &str, current: Option<String>) -> Command {
        Command::Report {
            order: self.order.clone(),
            release: self.to.clone(),
            phase: OrderPhase::Failed,
            code: ResultCode::IoError,
            message: format!(
                "cannot write the activation journal, so release {} was not activated: {message}",
                self.to
            ),
            current,
        }
    }

    fn finish(&self, outcome: Outcome) -> Command {
        Command::Finish {
            outcome,
            from: self.from.clone(),
            to: self.to.clone(),
        }
    }
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Deadlines = Deadlines {
        healthy_deadline_ms: 10_000,
        min_healthy_ms: 2_000,
        confirm_deadline_ms: Some(30_000),
    };

    fn order() -> OrderRef {
        OrderRef {
            order_id: "o1".into(),
            rollout_id: "r1".into(),
            seq: 7,
        }
    }

    fn confirm_order() -> OrderRef {
        OrderRef {
            order_id: "o8".into(),
            rollout_id: "r1".into(),
            seq: 8,
        }
    }

    fn healthy(now_ms: u64) -> Input {
        Input::Health {
            now_ms,
            observation: Observation {
                verdict: Verdict::Passing,
                running: true,
                restarts: 0,
                detail: String::new(),
            },
        }
    }

    fn obs(now_ms: u64, verdict: Verdict, running: bool, restarts: u32) -> Input {
        Input::Health {
            now_ms,
            observation: Observation {
                verdict,
                running,
                restarts,
                detail: "http: 500".into(),
            },
        }
    }

    #[test]
    fn hold_moves_the_confirm_deadline_later_but_never_earlier_or_past_health() {
        let confirm_by = |a: &Activation| match a.phase {
            Phase::Armed {
                confirm_by_unix_ms, ..
            } => confirm_by_unix_ms,
            _ => panic!("not armed: {:?}", a.phase),
        };
        // Started at 1_000, confirm by 31_000; healthy from 1_500, reported at 3_500.
        let (a, _) = armed(D).step(healthy(1_500));
        let (a, cmds) = a.unwrap().step(Input::Tick { now_ms: 3_500 });
        assert!(
            cmds.iter().any(|c| matches!(
                c,
                Command::Report {
                    phase: OrderPhase::Healthy,
                    ..
                }
            )),
            "{cmds:?}"
        );
        let a = a.unwrap();
        assert_eq!(confirm_by(&a), Some(31_000));
        let (a, cmds) = a.step(Input::Hold {
            now_ms: 20_000,
            confirm_deadline_ms: 30_000,
        });
        let a = a.unwrap();
        assert_eq!(cmds, vec![Command::Persist]);
        assert_eq!(confirm_by(&a), Some(50_000));
        // A shorter hold never brings the deadline closer.
        let (a, cmds) = a.step(Input::Hold {
            now_ms: 21_000,
            confirm_deadline_ms: 1_000,
        });
        let a = a.unwrap();
        assert!(cmds.is_empty());
        assert_eq!(confirm_by(&a), Some(50_000));
        // At the old deadline nothing happens; at the new one the switch fires.
        let (a, cmds) = a.step(Input::Tick { now_ms: 31_000 });
        let a = a.unwrap();
        assert!(cmds.is_empty(), "{cmds:?}");
        let (a, cmds) = a.step(Input::Tick { now_ms: 50_000 });
        assert!(
            matches!(
                a.unwrap().phase,
                Phase::RollingBack {
                    cause: RollbackCause::ConfirmTimeout,
                    ..
                }
            ),
            "{cmds:?}"
        );
        // A hold does not save a release failing its checks.
        let a = armed(D);
        let (a, _) = a.step(healthy(1_500));
        let (a, _) = a.unwrap().step(Input::Hold {
            now_ms: 2_000,
            confirm_deadline_ms: 60_000,
        });
        let (a, _) = a.unwrap().step(obs(2_500, Verdict::Failing, true, 0));
        assert!(matches!(
            a.unwrap().phase,
            Phase::RollingBack {
                cause: RollbackCause::Unhealthy,
                ..
            }
        ));
    }

    fn journal_failed() -> Input {
        Input::JournalFailed {
            message: "disk full".into(),
        }
    }

    fn is_io_failure(c: &Command, expected_current: Option<&str>) -> bool {
        matches!(c, Command::Report { phase: OrderPhase::Failed, code: ResultCode::IoError, current, message, .. }
            if current.as_deref() == expected_current && message.contains("journal"))
    }

    #[test]
    fn journal_failure_before_the_swap_abandons_without_touching_anything() {
        let (a, _) = Activation::begin(order(), Some("A".into()), "B".into(), D);
        let a = a.unwrap();
        assert!(a.journal_required());
        let (next, cmds) = a.step(journal_failed());
        assert_eq!(next, None);
        assert_eq!(cmds.len(), 2, "{cmds:?}");
        assert!(is_io_failure(&cmds[0], Some("A")), "{cmds:?}");
        assert!(matches!(
            &cmds[1],
            Command::Finish {
                outcome: Outcome::Abandoned,
                ..
            }
        ));
    }

    #[test]
    fn journal_failure_after_the_swap_swaps_back_and_never_restarts() {
        let (a, _) = Activation::begin(order(), Some("A".into()), "B".into(), D);
        let (a, _) = a.unwrap().step(Input::Swapped);
        let a = a.unwrap();
        assert!(a.journal_required());
        let (a, cmds) = a.step(journal_failed());
        assert_eq!(cmds, vec![Command::Swap("A".into())]);
        let (next, cmds) = a.unwrap().step(Input::Swapped);
        assert_eq!(next, None);
        assert!(is_io_failure(&cmds[0], Some("A")), "{cmds:?}");
        assert!(!cmds.contains(&Command::Restart), "{cmds:?}");
        assert!(matches!(
            &cmds[1],
            Command::Finish {
                outcome: Outcome::Abandoned,
                ..
            }
        ));
        // A first activation has nothing to swap back to: it stops, not started.
        let (a, _) = Activation::begin(order(), None, "B".into(), D);
        let (a, _) = a.unwrap().step(Input::Swapped);
        let (next, cmds) = a.unwrap().step(journal_failed());
        assert_eq!(next, None);
        assert!(is_io_failure(&cmds[0], Some("B")), "{cmds:?}");
        assert!(!cmds.contains(&Command::Restart), "{cmds:?}");
    }

    #[test]
    fn journal_is_required_only_for_forward_steps() {
        let a = armed(D);
        assert!(!a.journal_required());
        let (a, _) = a.step(obs(2_000, Verdict::Failing, false, 0));
        let a = a.unwrap();
        assert!(matches!(a.phase, Phase::RollingBack { .. }));
        assert!(
            !a.journal_required(),
            "a rollback goes on even if the disk refuses writes"
        );
    }

    /// Drives an activation to Armed, started at t=1000.
    fn armed(d: Deadlines) -> Activation {
        let (a, cmds) = Activation::begin(order(), Some("A".into()), "B".into(), d);
        assert_eq!(cmds, vec![Command::Persist, Command::Swap("B".into())]);
        let a = a.unwrap();
        assert_eq!(a.phase, Phase::Journaled);
        let (a, cmds) = a.step(Input::Swapped);
        assert_eq!(cmds, vec![Command::Persist, Command::Restart]);
        let a = a.unwrap();
        assert_eq!(a.phase, Phase::Swapped);
        let (a, cmds) = a.step(Input::Started { now_ms: 1_000 });
        let a = a.unwrap();
        assert_eq!(cmds[0], Command::Persist);
        assert!(
            matches!(&cmds[1], Command::Report { phase: OrderPhase::Activated, current: Some(c), .. } if c == "B")
        );
        assert_eq!(
            a.phase,
            Phase::Armed {
                started_unix_ms: 1_000,
                healthy_by_unix_ms: 11_000,
                confirm_by_unix_ms: d.confirm_deadline_ms.map(|c| 1_000 + c),
                healthy_since_unix_ms: None,
                reported_healthy: false,
            }
        );
        a
    }

    fn finished(cmds: &[Command]) -> Option<Outcome> {
        match cmds.last() {
            Some(Command::Finish { outcome, .. }) => Some(outcome.clone()),
            _ => None,
        }
    }

    fn reports(cmds: &[Command]) -> Vec<(OrderPhase, ResultCode)> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Report { phase, code, .. } => Some((*phase, *code)),
                _ => None,
            })
            .collect()
    }

    fn expect_rollback(step: Step, cause: RollbackCause) -> Activation {
        let (a, cmds) = step;
        let a = a.expect("activation should continue with a rollback");
        assert!(
            matches!(&a.phase, Phase::RollingBack { cause: c, .. } if *c == cause),
            "{:?}",
            a.phase
        );
        assert_eq!(cmds, vec![Command::Persist, Command::Swap("A".into())]);
        a
    }

    #[test]
    fn healthy_then_confirmed_keeps_the_release() {
        let a = armed(D);
        let (a, cmds) = a.step(healthy(2_000));
        assert!(cmds.is_empty(), "{cmds:?}");
        let a = a.unwrap();
        assert_eq!(a.next_deadline(), Some(4_000));
        let (a, cmds) = a.step(Input::Tick { now_ms: 3_999 });
        assert!(cmds.is_empty());
        let (a, cmds) = a.unwrap().step(Input::Tick { now_ms: 4_000 });
        assert_eq!(reports(&cmds), vec![(OrderPhase::Healthy, ResultCode::Ok)]);
        assert_eq!(cmds[0], Command::Persist);
        let a = a.unwrap();
        assert_eq!(a.next_deadline(), Some(31_000));
        let (a, cmds) = a.step(Input::Confirm {
            order: confirm_order(),
        });
        assert!(a.is_none());
        assert_eq!(
            reports(&cmds),
            vec![(OrderPhase::Confirmed, ResultCode::Ok)]
        );
        assert!(
            matches!(&cmds[0], Command::Report { order, .. } if order.seq == 8),
            "CONFIRMED must answer the confirm order"
        );
        assert_eq!(finished(&cmds), Some(Outcome::Kept));
    }

    #[test]
    fn without_confirm_deadline_healthy_finishes() {
        let a = armed(Deadlines {
            confirm_deadline_ms: None,
            ..D
        });
        assert_eq!(a.next_deadline(), Some(11_000));
        let (a, _) = a.step(healthy(1_500));
        let (a, cmds) = a.unwrap().step(healthy(3_500));
        assert!(a.is_none());
        assert_eq!(reports(&cmds), vec![(OrderPhase::Healthy, ResultCode::Ok)]);
        assert_eq!(finished(&cmds), Some(Outcome::Kept));
    }

    #[test]
    fn zero_min_healthy_reports_healthy_on_first_pass() {
        let a = armed(Deadlines {
            min_healthy_ms: 0,
            ..D
        });
        let (_, cmds) = a.step(healthy(1_001));
        assert_eq!(reports(&cmds), vec![(OrderPhase::Healthy, ResultCode::Ok)]);
    }

    #[test]
    fn failing_checks_roll_back_as_unhealthy() {
        let a = armed(D);
        let (a, _) = a.step(healthy(2_000));
        let a = expect_rollback(
            a.unwrap().step(obs(2_500, Verdict::Failing, true, 0)),
            RollbackCause::Unhealthy,
        );
        let (a, cmds) = a.step(Input::Swapped);
        assert_eq!(cmds, vec![Command::Persist, Command::Restart]);
        let (a, cmds) = a.unwrap().step(Input::Started { now_ms: 3_000 });
        assert!(a.is_none());
        assert_eq!(
            reports(&cmds),
            vec![(OrderPhase::RolledBack, ResultCode::Unhealthy)]
        );
        match &cmds[0] {
            Command::Report {
                message, current, ..
            } => {
                assert!(
                    message.contains("failed its health checks") && message.contains("http: 500"),
                    "{message}"
                );
                assert_eq!(current.as_deref(), Some("A"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(finished(&cmds), Some(Outcome::RolledBack));
    }

    #[test]
    fn failing_before_ever_healthy_waits_for_the_healthy_deadline() {
        // A slow starter: connection refused for a while, then healthy.
        let a = armed(D);
        let (a, cmds) = a.step(obs(1_100, Verdict::Failing, true, 0));
        assert!(cmds.is_empty(), "rolled back before the deadline: {cmds:?}");
        let (a, cmds) = a.unwrap().step(obs(6_000, Verdict::Failing, true, 0));
        assert!(cmds.is_empty(), "rolled back before the deadline: {cmds:?}");
        let (a, _) = a.unwrap().step(healthy(7_000));
        let (_, cmds) = a.unwrap().step(Input::Tick { now_ms: 9_000 });
        assert_eq!(reports(&cmds), vec![(OrderPhase::Healthy, ResultCode::Ok)]);

        // Never passing: rolled back at the deadline, naming the failing check.
        let a = armed(D);
        let (a, _) = a.step(obs(1_100, Verdict::Failing, true, 0));
        let a = expect_rollback(
            a.unwrap().step(obs(11_000, Verdict::Failing, true, 0)),
            RollbackCause::Unhealthy,
        );
        match a.phase {
            Phase::RollingBack { message, .. } => assert!(
                message.contains("healthy deadline of 10000 ms") && message.contains("http: 500"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }

        // A crash at start still fails fast.
        let a = armed(D);
        expect_rollback(
            a.step(obs(1_100, Verdict::Failing, false, 0)),
            RollbackCause::FailedToStart,
        );
    }

    #[test]
    fn failing_after_healthy_but_before_confirm_still_rolls_back() {
        let a = armed(D);
        let (a, _) = a.step(healthy(1_000));
        let (a, cmds) = a.unwrap().step(Input::Tick { now_ms: 3_000 });
        assert_eq!(reports(&cmds), vec![(OrderPhase::Healthy, ResultCode::Ok)]);
        expect_rollback(
            a.unwrap().step(obs(5_000, Verdict::Failing, true, 0)),
            RollbackCause::Unhealthy,
        );
    }

    #[test]
    fn not_healthy_by_the_deadline_rolls_back() {
        let a = armed(D);
        let (a, _) = a.step(obs(2_000, Verdict::Unknown, true, 0));
        let a = a.unwrap();
        assert_eq!(a.next_deadline(), Some(11_000));
        let (a, cmds) = a.step(Input::Tick { now_ms: 10_999 });
        assert!(cmds.is_empty());
        let a = expect_rollback(
            a.unwrap().step(Input::Tick { now_ms: 11_000 }),
            RollbackCause::Unhealthy,
        );
        match a.phase {
            Phase::RollingBack { message, .. } => {
                assert!(message.contains("not healthy for 2000 ms"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn healthy_streak_interrupted_by_unknown_starts_over() {
        let a = armed(D);
        let (a, _) = a.step(healthy(2_000));
        let (a, _) = a.unwrap().step(obs(3_000, Verdict::Unknown, true, 0));
        let (a, cmds) = a.unwrap().step(Input::Tick { now_ms: 4_500 });
        assert!(cmds.is_empty(), "streak should have restarted: {cmds:?}");
        let (_, cmds) = a.unwrap().step(healthy(5_000));
        assert!(cmds.is_empty());
    }

    #[test]
    fn confirm_timeout_rolls_back() {
        let a = armed(D);
        let (a, _) = a.step(healthy(1_000));
        let (a, _) = a.unwrap().step(Input::Tick { now_ms: 3_000 });
        let (a, cmds) = a.unwrap().step(Input::Tick { now_ms: 30_999 });
        assert!(cmds.is_empty());
        let a = expect_rollback(
            a.unwrap().step(Input::Tick { now_ms: 31_000 }),
            RollbackCause::ConfirmTimeout,
        );
        let (a, _) = a.step(Input::Swapped);
        let (_, cmds) = a.unwrap().step(Input::Started { now_ms: 31_100 });
        assert_eq!(
            reports(&cmds),
            vec![(OrderPhase::RolledBack, ResultCode::ConfirmTimeout)]
        );
    }

    #[test]
    fn confirm_deadline_shorter_than_healthy_time_times_out_while_waiting() {
        let a = armed(Deadlines {
            confirm_deadline_ms: Some(1_500),
            ..D
        });
        expect_rollback(
            a.step(Input::Tick { now_ms: 2_500 }),
            RollbackCause::ConfirmTimeout,
        );
    }

    #[test]
    fn early_confirm_disarms() {
        let a = armed(D);
        let (a, cmds) = a.step(Input::Confirm {
            order: confirm_order(),
        });
        assert!(a.is_none());
        assert_eq!(
            reports(&cmds),
            vec![(OrderPhase::Confirmed, ResultCode::Ok)]
        );
    }

    #[test]
    fn dying_before_healthy_is_a_failed_start() {
        let a = armed(D);
        expect_rollback(
            a.clone().step(obs(1_200, Verdict::Unknown, false, 0)),
            RollbackCause::FailedToStart,
        );
        expect_rollback(
            a.step(obs(1_200, Verdict::Unknown, true, 1)),
            RollbackCause::FailedToStart,
        );
    }

    #[test]
    fn dying_after_healthy_is_unhealthy() {
        let a = armed(D);
        let (a, _) = a.step(healthy(1_100));
        // Healthy for min_healthy (2 s): reported HEALTHY, then the process dies.
        let (a, cmds) = a.unwrap().step(healthy(3_200));
        assert_eq!(reports(&cmds), vec![(OrderPhase::Healthy, ResultCode::Ok)]);
        expect_rollback(
            a.unwrap().step(obs(3_500, Verdict::Passing, false, 0)),
            RollbackCause::Unhealthy,
        );
    }

    #[test]
    fn dying_before_min_healthy_is_a_failed_start_even_after_a_passing_check() {
        let a = armed(D);
        // A check passed for a moment, but the process exits long before min_healthy (2 s).
        let (a, _) = a.step(healthy(1_001));
        expect_rollback(
            a.unwrap().step(obs(1_002, Verdict::Passing, false, 0)),
            RollbackCause::FailedToStart,
        );
    }

    #[test]
    fn start_failure_rolls_back_as_failed_to_start() {
        let (a, _) = Activation::begin(order(), Some("A".into()), "B".into(), D);
        let (a, _) = a.unwrap().step(Input::Swapped);
        let a = expect_rollback(
            a.unwrap().step(Input::StartFailed {
                message: "exec format error".into(),
            }),
            RollbackCause::FailedToStart,
        );
        let (a, _) = a.step(Input::Swapped);
        let (_, cmds) = a.unwrap().step(Input::StartFailed {
            message: "also broken".into(),
        });
        assert_eq!(
            reports(&cmds),
            vec![(OrderPhase::RolledBack, ResultCode::ServiceFailedToStart)]
        );
        match &cmds[0] {
            Command::Report { message, .. } => {
                assert!(message.contains("also broken"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_post_start_hook_rolls_back_as_hook_failed() {
        let (a, _) = Activation::begin(order(), Some("A".into()), "B".into(), D);
        let (a, _) = a.unwrap().step(Input::Swapped);
        let a = expect_rollback(
            a.unwrap().step(Input::HookFailed {
                message: "post-start hook failed: exit status: 1; output: \"cold cache\"".into(),
            }),
            RollbackCause::HookFailed,
        );
        let (a, _) = a.step(Input::Swapped);
        let (_, cmds) = a.unwrap().step(Input::Started { now_ms: 5 });
        assert_eq!(
            reports(&cmds),
            vec![(OrderPhase::RolledBack, ResultCode::HookFailed)]
        );
        let message = cmds
            .iter()
            .find_map(|c| match c {
                Command::Report { message, .. } => Some(message.clone()),
                _ => None,
            })
            .unwrap();
        assert!(
            message.contains("release B failed its post-start hook")
                && message.contains("cold cache"),
            "{message}"
        );
    }

    #[test]
    fn failure_without_previous_release_fails_in_place() {
        let (a, _) = Activation::begin(order(), None, "B".into(), D);
        let (a, _) = a.unwrap().step(Input::Swapped);
        let (a, cmds) = a.unwrap().step(Input::StartFailed {
            message: "boom".into(),
        });
        assert!(a.is_none());
        assert_eq!(
            reports(&cmds),
            vec![(OrderPhase::Failed, ResultCode::ServiceFailedToStart)]
        );
        assert_eq!(finished(&cmds), Some(Outcome::FailedInPlace));
    }

    #[test]
    fn irrelevant_inputs_change_nothing() {
        let (a, _) = Activation::begin(order(), Some("A".into()), "B".into(), D);
        let a = a.unwrap();
        for input in [
            Input::Confirm {
                order: confirm_order(),
            },
            Input::Tick { now_ms: 99_999 },
            healthy(5),
            Input::Started { now_ms: 1 },
        ] {
            let (next, cmds) = a.clone().step(input);
            assert_eq!(next.as_ref(), Some(&a));
            assert!(cmds.is_empty());
        }
    }

    #[test]
    fn resume_completes_or_restores_each_phase() {
        let (j, _) = Activation::begin(order(), Some("A".into()), "B".into(), D);
        let j = j.unwrap();
        assert_eq!(j.clone().resume(true).1, vec![Command::Swap("B".into())]);
        let (r, cmds) = j.clone().resume(false);
        assert!(matches!(
            r.unwrap().phase,
            Phase::RollingBack {
                cause: RollbackCause::FailedToStart,
                ..
            }
        ));
        assert_eq!(cmds, vec![Command::Persist, Command::Swap("A".into())]);

        let (s, _) = j.step(Input::Swapped);
        let s = s.unwrap();
        assert_eq!(s.clone().resume(true).1, vec![Command::Restart]);

        let a = armed(D);
        let (a, _) = a.step(healthy(2_000));
        let (a, cmds) = a.unwrap().resume(true);
        let a = a.unwrap();
        assert_eq!(cmds, vec![Command::Persist]);
        assert!(matches!(
            a.phase,
            Phase::Armed {
                healthy_since_unix_ms: None,
                healthy_by_unix_ms: 11_000,
                ..
            }
        ));
        // Deadlines persisted before the restart still fire after it.
        expect_rollback(
            a.step(Input::Tick { now_ms: 11_000 }),
            RollbackCause::Unhealthy,
        );

        let (a, _) = armed(D).step(healthy(1_500));
        let rb = expect_rollback(
            a.unwrap().step(obs(2_000, Verdict::Failing, true, 0)),
            RollbackCause::Unhealthy,
        );
        assert_eq!(rb.clone().resume(true).1, vec![Command::Swap("A".into())]);
        let (rs, _) = rb.step(Input::Swapped);
        assert_eq!(rs.unwrap().resume(true).1, vec![Command::Restart]);
    }

    #[test]
    fn journal_round_trips_through_json() {
        let a = armed(D);
        let json = serde_json::to_string(&a).unwrap();
        let back: Activation = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn behind_a_load_balancer_each_swap_is_drained_first_and_undrained_once_healthy() {
        let d = Deadlines {
            confirm_deadline_ms: None,
            ..D
        };
        let (a, cmds) =
            Activation::begin_with(order(), Some("A".into()), "B".into(), d, true, Some(10));
        assert_eq!(cmds, vec![Command::Persist, Command::Drain]);
        // The swap comes only once the drain is done.
        let (a, cmds) = a.unwrap().step(Input::Drained);
        assert_eq!(cmds, vec![Command::Swap("B".into())]);
        let (a, cmds) = a.unwrap().step(Input::Swapped);
        assert_eq!(cmds, vec![Command::Persist, Command::Restart]);
        let (a, _) = a.unwrap().step(Input::Started { now_ms: 1_000 });
        // Still drained while health gating runs; undrained with the HEALTHY report.
        let (a, cmds) = a.unwrap().step(healthy(1_500));
        assert!(
            !cmds.iter().any(|c| matches!(c, Command::Undrain { .. })),
            "{cmds:?}"
        );
        let (a, cmds) = a.unwrap().step(healthy(3_500));
        assert!(a.is_none());
        assert_eq!(
            cmds[0],
            Command::Undrain {
                weight: Some(10),
                rollback: false
            },
            "the order's weight comes with the undrain: {cmds:?}"
        );
        assert_eq!(reports(&cmds), vec![(OrderPhase::Healthy, ResultCode::Ok)]);
        assert_eq!(finished(&cmds), Some(Outcome::Kept));

        // With a confirm: undrained at HEALTHY, not at the confirm.
        let (a, _) =
            Activation::begin_with(order(), Some("A".into()), "B".into(), D, true, Some(10));
        let (a, _) = a.unwrap().step(Input::Drained);
        let (a, _) = a.unwrap().step(Input::Swapped);
        let (a, _) = a.unwrap().step(Input::Started { now_ms: 1_000 });
        let (a, _) = a.unwrap().step(healthy(1_500));
        let (a, cmds) = a.unwrap().step(Input::Tick { now_ms: 3_500 });
        assert_eq!(
            cmds[..2],
            [
                Command::Persist,
                Command::Undrain {
                    weight: Some(10),
                    rollback: false
                }
            ],
            "{cmds:?}"
        );
        // A confirm timeout after that drains again before swapping back.
        let (a, cmds) = a.unwrap().step(Input::Tick { now_ms: 31_000 });
        assert_eq!(cmds, vec![Command::Persist, Command::Drain]);
        let a = a.unwrap();
        assert!(matches!(a.phase, Phase::RollingBack { .. }));
        assert_eq!(
            a.clone().resume(true).1,
            vec![Command::Drain],
            "a restarted agent drains again before the rollback's swap"
        );
        let (a, cmds) = a.step(Input::Drained);
        assert_eq!(cmds, vec![Command::Swap("A".into())]);
        let (a, _) = a.unwrap().step(Input::Swapped);
        let (a, cmds) = a.unwrap().step(Input::Started { now_ms: 31_500 });
        assert!(a.is_none());
        assert_eq!(
            cmds[0],
            Command::Undrain {
                weight: None,
                rollback: true
            },
            "a rollback undrains without the new release's weight: {cmds:?}"
        );
        assert_eq!(
            reports(&cmds),
            vec![(OrderPhase::RolledBack, ResultCode::ConfirmTimeout)]
        );
    }

    #[test]
    fn journals_without_the_drain_flag_load_as_not_drained() {
        let a = armed(D);
        let mut json = serde_json::to_value(&a).unwrap();
        json.as_object_mut().unwrap().remove("drain");
        let back: Activation = serde_json::from_value(json).unwrap();
        assert!(!back.drain);
        let (j, _) = Activation::begin_with(order(), None, "B".into(), D, true, None);
        assert_eq!(j.unwrap().resume(true).1, vec![Command::Drain]);
    }
}
