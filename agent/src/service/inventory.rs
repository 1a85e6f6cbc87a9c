//! The inventory of the service — current, previous and kept releases, state, health, last
//! applied sequence — published on a watch channel for the connection's Hello.

use serin_proto::wire;

use crate::activation::{self, Phase};
use crate::state::ServiceState;

use super::ServiceTask;

impl ServiceTask {
    /// Publishes the service's inventory if it changed.
    pub(super) fn publish_inventory(&mut self) {
        let current = self.store.current();
        let kept = self.store.list().into_iter().map(|m| m.id).collect();
        let state = match (&self.state.activation, &self.job, &current) {
            (Some(a), _, _) => match a.phase {
                Phase::Journaled | Phase::Swapped => wire::ServiceState::Activating,
                Phase::Armed { .. } => wire::ServiceState::AwaitingConfirm,
                Phase::RollingBack { .. }
                | Phase::RollbackSwapped { .. }
                | Phase::Abandoning { .. } => wire::ServiceState::RollingBack,
            },
            (None, Some(_), _) => wire::ServiceState::Staging,
            (None, None, None) => wire::ServiceState::Empty,
            (None, None, Some(_)) if self.last_status.running => wire::ServiceState::Running,
            (None, None, Some(_)) => wire::ServiceState::Stopped,
        };
        let previous = previous_release(current.as_deref(), &self.state);
        let inv = wire::ServiceInventory {
            service: self.name().to_string(),
            current_release: current.unwrap_or_default(),
            kept_releases: kept,
            state: state as i32,
            healthy: self.monitor.verdict() == activation::Verdict::Passing,
            verdict: self.monitor.verdict().to_wire() as i32,
            previous_release: previous.unwrap_or_default(),
            last_seq: self.state.last_seq,
            last_epoch: self.state.last_epoch,
        };
        self.inventory.send_if_modified(|old| {
            if *old == inv {
                false
            } else {
                *old = inv;
                true
            }
        });
    }
}

/// The release a rollback would restore, as reported in the inventory: while an activation is
/// in flight and `current` already points at its target, the release it came from; otherwise
/// the recorded previous release. Never the same as `current`.
fn previous_release(current: Option<&str>, state: &ServiceState) -> Option<String> {
    let previous = match &state.activation {
        Some(a) if current == Some(a.to.as_str()) => a.from.clone(),
        _ => state.previous.clone(),
    };
    previous.filter(|p| Some(p.as_str()) != current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::test_support::{journal, state};

    #[test]
    fn inventory_previous_is_never_current_during_replay() {
        // Journaled (not swapped yet) from demo-1.0 to demo-2.0, demo-0.9 before that.
        let s = state(
            Some("demo-0.9"),
            Some(journal(Some("demo-1.0"), "demo-2.0", Phase::Journaled)),
        );
        assert_eq!(
            previous_release(Some("demo-1.0"), &s).as_deref(),
            Some("demo-0.9")
        );
        // Swapped: current is the target, so previous is where the activation came from.
        let s = state(
            Some("demo-0.9"),
            Some(journal(Some("demo-1.0"), "demo-2.0", Phase::Swapped)),
        );
        assert_eq!(
            previous_release(Some("demo-2.0"), &s).as_deref(),
            Some("demo-1.0")
        );
        // First activation ever, not swapped: nothing to roll back to.
        let s = state(None, Some(journal(None, "demo-1.0", Phase::Journaled)));
        assert_eq!(previous_release(None, &s), None);
        // No journal: the recorded previous, unless it is current.
        assert_eq!(
            previous_release(Some("demo-2.0"), &state(Some("demo-1.0"), None)).as_deref(),
            Some("demo-1.0")
        );
        assert_eq!(
            previous_release(Some("demo-2.0"), &state(Some("demo-2.0"), None)),
            None
        );
        // Journal whose `from` equals current (re-activation): never previous == current.
        let s = state(
            Some("demo-1.0"),
            Some(journal(Some("demo-2.0"), "demo-2.0", Phase::Swapped)),
        );
        assert_ne!(
            previous_release(Some("demo-2.0"), &s).as_deref(),
            Some("demo-2.0")
        );
    }
}
