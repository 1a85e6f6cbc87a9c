//! Builders for the orders a test sends to an agent.
//!
//! Each order gets the id `<kind>-<seq>` and the rollout id [`ROLLOUT`], so results are easy to
//! match up in a dump.

use serin_proto::wire::{self, order::Action};

/// Rollout id put on every order built here.
pub const ROLLOUT: &str = "test-rollout";

/// Deadlines of an activate order, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// The release must pass its checks within this time.
    pub healthy_deadline_ms: u64,
    /// It must stay healthy this long before it is reported healthy.
    pub min_healthy_ms: u64,
    /// A confirm must arrive within this time; 0: confirmed once healthy.
    pub confirm_deadline_ms: u64,
}

impl Deadlines {
    /// Short deadlines for tests: healthy within 4 s, healthy for 500 ms, no confirm needed.
    pub fn quick() -> Self {
        Self {
            healthy_deadline_ms: 4_000,
            min_healthy_ms: 500,
            confirm_deadline_ms: 0,
        }
    }

    /// The same deadlines, with a confirm needed within `ms`.
    pub fn confirm_within(mut self, ms: u64) -> Self {
        self.confirm_deadline_ms = ms;
        self
    }

    /// The same deadlines with another minimum healthy time.
    pub fn min_healthy(mut self, ms: u64) -> Self {
        self.min_healthy_ms = ms;
        self
    }
}

fn order(kind: &str, seq: u64, service: &str, action: Action) -> wire::Order {
    wire::Order {
        epoch: 0,
        order_id: format!("{kind}-{seq}"),
        rollout_id: ROLLOUT.to_owned(),
        seq,
        service: service.to_owned(),
        action: Some(action),
    }
}

/// Stage `release` (download and verify, no activation).
pub fn stage(seq: u64, release: wire::Release) -> wire::Order {
    let service = release.service.clone();
    order(
        "stage",
        seq,
        &service,
        Action::Stage(wire::StageOrder {
            release: Some(release),
        }),
    )
}

/// Activate `release` with `deadlines`.
pub fn activate(seq: u64, release: wire::Release, deadlines: Deadlines) -> wire::Order {
    let service = release.service.clone();
    order(
        "activate",
        seq,
        &service,
        Action::Activate(wire::ActivateOrder {
            release: Some(release),
            healthy_deadline_ms: deadlines.healthy_deadline_ms,
            min_healthy_ms: deadlines.min_healthy_ms,
            confirm_deadline_ms: deadlines.confirm_deadline_ms,
            traffic_weight_percent: None,
        }),
    )
}

/// [`activate`] with a traffic weight for the release once healthy (percent).
pub fn activate_weighted(
    seq: u64,
    release: wire::Release,
    deadlines: Deadlines,
    weight_percent: u32,
) -> wire::Order {
    let mut o = activate(seq, release, deadlines);
    if let Some(Action::Activate(a)) = &mut o.action {
        a.traffic_weight_percent = Some(weight_percent);
    }
    o
}

/// Roll `service` back to `to` (empty: the previous release).
pub fn rollback(seq: u64, service: &str, to: &str) -> wire::Order {
    order(
        "rollback",
        seq,
        service,
        Action::Rollback(wire::RollbackOrder {
            to_release: to.to_owned(),
        }),
    )
}

/// Confirm `release` of `service`.
pub fn confirm(seq: u64, service: &str, release: &str) -> wire::Order {
    order(
        "confirm",
        seq,
        service,
        Action::Confirm(wire::ConfirmOrder {
            release: release.to_owned(),
            traffic_weight_percent: None,
        }),
    )
}

/// Cancel a stage in progress on `service`.
pub fn cancel(seq: u64, service: &str) -> wire::Order {
    order("cancel", seq, service, Action::Cancel(wire::CancelOrder {}))
}
