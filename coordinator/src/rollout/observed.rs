//! What the coordinator observes of each host of a rollout: whether its agent is connected, the
//! release it serves, its latest health verdict. Never persisted: after a restart every host is
//! [`Reach::Unknown`] until it says hello (or the resume grace passes), and the rest is rebuilt
//! from agent reports (STYLE rule 17: intent and observation are different structs).

use serin_proto::{HostId, ReleaseId};

/// What the coordinator knows about a host's connection (observed, never persisted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reach {
    /// Nothing heard since the coordinator restarted: the host is neither reachable nor
    /// unreachable until it says hello or [`EngineSettings::resume_grace`](super::settings::EngineSettings::resume_grace) passes. Gates and the
    /// end of a rollback wait for unknown hosts instead of counting them as missing.
    #[default]
    Unknown,
    /// The agent is connected.
    Reachable,
    /// The agent's stream closed, its heartbeats stopped, or it did not come back within the
    /// resume grace.
    Unreachable,
}

/// What is observed of one host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub reach: Reach,
    /// The release the host serves, as last reported.
    pub current: Option<ReleaseId>,
    /// The latest health verdict; `None` before the first report.
    pub healthy: Option<bool>,
    /// When the coordinator last sent the host a `HoldConfirm` (unix ms); `None` since it
    /// (re)connected.
    pub held_ms: Option<u64>,
    /// Since when the host's agent may hold an armed dead-man switch for this rollout's release
    /// (unix ms): from its first activate order that no result has shown disarmed since (a
    /// confirm, any rollback, an activation that failed without arming). A re-dispatch keeps
    /// the earlier time: the switch of the first activation may still be running.
    pub armed_since: Option<u64>,
}

/// A host nothing was heard from.
static UNHEARD: Observed = Observed {
    reach: Reach::Unknown,
    current: None,
    healthy: None,
    held_ms: None,
    armed_since: None,
};

/// What is observed of every host of a rollout (a host missing from it is unknown). Hashed:
/// the machine looks hosts up here on every walk over a wave, and never iterates it.
#[derive(Debug, Clone, Default)]
pub struct ObservedHosts(foldhash::HashMap<HostId, Observed>);

impl ObservedHosts {
    /// What is observed of a host.
    pub fn get(&self, id: &HostId) -> &Observed {
        self.0.get(id).unwrap_or(&UNHEARD)
    }

    /// What is observed of a host, to update.
    pub fn entry(&mut self, id: &HostId) -> &mut Observed {
        // Looked up first: the id is cloned only for a host seen for the first time.
        if !self.0.contains_key(id) {
            self.0.insert(id.clone(), Observed::default());
        }
        self.0.get_mut(id).expect("inserted above")
    }

    /// Its connection state.
    pub fn reach(&self, id: &HostId) -> Reach {
        self.get(id).reach
    }

    /// Observed connected.
    pub fn reachable(&self, id: &HostId) -> bool {
        self.reach(id) == Reach::Reachable
    }

    /// The host's agent is known not to be armed for this rollout any more (confirmed, rolled
    /// back, or its activation failed without arming): no more holds.
    pub fn disarmed(&mut self, id: &HostId) {
        let o = self.entry(id);
        o.armed_since = None;
        o.held_ms = None;
    }

    /// Not heard from since the coordinator restarted, and the resume grace has not passed.
    pub fn unknown(&self, id: &HostId) -> bool {
        self.reach(id) == Reach::Unknown
    }
}
