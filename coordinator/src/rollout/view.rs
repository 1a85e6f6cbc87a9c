//! What operators see of a rollout: the projections [`Rollout::status`](super::Rollout::status)
//! builds from intent and observation. Domain types only; the control service turns them into
//! wire messages at the edge.

use std::collections::BTreeMap;

use serin_proto::{HostId, ReleaseId};

use super::analysis::Comparison;
use super::machine::{Decision, HostPhase, RolloutState, WaveState};
use super::spec::RolloutSpec;

/// A rollout's status (`RolloutStatus` on the wire).
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutView {
    pub id: String,
    pub spec: RolloutSpec,
    pub state: RolloutState,
    pub reason: String,
    pub current_wave: u32,
    pub waves: Vec<WaveView>,
    /// Sorted by wave, then host id.
    pub hosts: Vec<HostView>,
    /// The latest canary analysis, if a gate ran one.
    pub comparison: Option<Comparison>,
    pub decisions: Vec<Decision>,
    pub created_ms: u64,
    pub updated_ms: u64,
}

impl RolloutView {
    /// Succeeded, rolled back, aborted or failed.
    pub fn finished(&self) -> bool {
        self.state.is_finished()
    }
}

/// One wave's status and gate numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct WaveView {
    pub index: u32,
    pub size: u32,
    pub state: WaveState,
    pub succeeded: u32,
    pub failed: u32,
    pub unreachable: u32,
    pub in_progress: u32,
    pub started_ms: Option<u64>,
    pub bake_ends_ms: Option<u64>,
}

/// The phase shown for a host: its phase, or unreachable while it is disconnected in a
/// non-final phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShownPhase {
    Phase(HostPhase),
    Unreachable,
}

impl ShownPhase {
    /// The phase as shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            ShownPhase::Phase(p) => p.as_str(),
            ShownPhase::Unreachable => "unreachable",
        }
    }
}

/// One host's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    pub id: HostId,
    pub hostname: String,
    pub wave: u32,
    pub phase: ShownPhase,
    pub baseline: Option<ReleaseId>,
    /// The release the rollout wants on the host now (its baseline while rolling back).
    pub target: Option<ReleaseId>,
    /// What the host was last seen running.
    pub current: Option<ReleaseId>,
    pub healthy: bool,
    pub detail: String,
    pub labels: BTreeMap<String, String>,
}

/// A rollout's status, decisions and event log (`Explanation` on the wire).
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    pub status: RolloutView,
    pub events: Vec<String>,
}
