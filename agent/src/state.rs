//! Durable per-service state (`<state_dir>/<service>/state.json`): the last applied order
//! sequence, recent order results (re-sent for duplicate orders), the previous and confirmed
//! releases, and the activation journal.
//!
//! The file is versioned; a file written by a newer agent is refused rather than misread.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serin_proto::{MAX_ORDER_SEQ, wire};

use crate::activation::Activation;
use crate::durable;

/// The version this agent writes.
pub const STATE_VERSION: u32 = 1;

/// How many order results are kept for duplicate re-sends.
const KEPT_RESULTS: usize = 64;

/// An order result as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResult {
    /// Order id.
    pub order_id: String,
    /// Rollout id.
    pub rollout_id: String,
    /// Order sequence.
    pub seq: u64,
    /// Service.
    pub service: String,
    /// Release the order was about.
    pub release: String,
    /// `wire::OrderPhase` as a number.
    pub phase: i32,
    /// `wire::ResultCode` as a number.
    pub code: i32,
    /// Human explanation.
    pub message: String,
    /// What `current` pointed at.
    pub current_release: String,
}

impl From<&wire::OrderResult> for StoredResult {
    fn from(r: &wire::OrderResult) -> Self {
        StoredResult {
            order_id: r.order_id.clone(),
            rollout_id: r.rollout_id.clone(),
            seq: r.seq,
            service: r.service.clone(),
            release: r.release.clone(),
            phase: r.phase,
            code: r.code,
            message: r.message.clone(),
            current_release: r.current_release.clone(),
        }
    }
}

impl From<&StoredResult> for wire::OrderResult {
    fn from(r: &StoredResult) -> Self {
        wire::OrderResult {
            order_id: r.order_id.clone(),
            rollout_id: r.rollout_id.clone(),
            seq: r.seq,
            service: r.service.clone(),
            release: r.release.clone(),
            phase: r.phase,
            code: r.code,
            message: r.message.clone(),
            current_release: r.current_release.clone(),
            bytes_done: 0,
            last_seq: 0,
            last_epoch: 0,
        }
    }
}

/// The durable state of one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// Format version.
    pub version: u32,
    /// Highest order sequence applied.
    pub last_seq: u64,
    /// Highest coordinator epoch an order was accepted from; an order of a lower epoch is a
    /// replay (`REPLAYED_ORDER`). Absent in files of older agents: 0.
    #[serde(default)]
    pub last_epoch: u64,
    /// The release-counter floor of the service: a signed release whose counter is below it is
    /// refused (`BELOW_FLOOR`), also as a rollback target. Raised by a confirmed activation of a
    /// manifest that carries a higher `floor`; never lowered. Absent in older files: 0.
    #[serde(default)]
    pub floor: u64,
    /// Recent results, oldest first.
    #[serde(default)]
    pub results: Vec<StoredResult>,
    /// The release a rollback without a target restores.
    #[serde(default)]
    pub previous: Option<String>,
    /// The last release confirmed (or healthy without a confirm needed).
    #[serde(default)]
    pub confirmed: Option<String>,
    /// The activation in flight, if any: the journal.
    #[serde(default)]
    pub activation: Option<Activation>,
}

impl Default for ServiceState {
    fn default() -> Self {
        ServiceState {
            version: STATE_VERSION,
            last_seq: 0,
            last_epoch: 0,
            floor: 0,
            results: Vec::new(),
            previous: None,
            confirmed: None,
            activation: None,
        }
    }
}

impl ServiceState {
    /// Records a result (kept for duplicate re-sends).
    pub fn record(&mut self, result: &wire::OrderResult) {
        self.results.push(result.into());
        if self.results.len() > KEPT_RESULTS {
            let excess = self.results.len() - KEPT_RESULTS;
            self.results.drain(..excess);
        }
    }

    /// A `last_seq` beyond [`MAX_ORDER_SEQ`] can only have been left by an older agent that
    /// accepted such an order; no valid order could follow it. It is brought back to the highest
    /// valid sequence among the stored results (0 if none), and results beyond the limit are
    /// dropped. Returns what was changed, if anything.
    pub fn repair_last_seq(&mut self) -> Option<SeqRepair> {
        if self.last_seq <= MAX_ORDER_SEQ {
            return None;
        }
        let poisoned = self.last_seq;
        self.results.retain(|r| r.seq <= MAX_ORDER_SEQ);
        self.last_seq = self.results.iter().map(|r| r.seq).max().unwrap_or(0);
        Some(SeqRepair {
            poisoned,
            now: self.last_seq,
        })
    }

    /// The stored results of order `seq`, oldest first.
    pub fn results_for(&self, seq: u64) -> Vec<wire::OrderResult> {
        self.results
            .iter()
            .filter(|r| r.seq == seq)
            .map(wire::OrderResult::from)
            .collect()
    }
}

/// A repair of a poisoned `last_seq` ([`ServiceState::repair_last_seq`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRepair {
    /// The sequence found.
    pub poisoned: u64,
    /// The sequence now.
    pub now: u64,
}

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is not valid.
    #[error("state file {path} is corrupt: {problem}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Parses the bytes of a state file (no I/O): refuses what is not JSON of a known version, migrates
/// forward, and repairs a poisoned `last_seq` (returned, so the caller can persist the repair).
/// Fuzzed by `fuzz/fuzz_targets/agent_state.rs`.
pub fn parse(bytes: &[u8]) -> Result<(ServiceState, Option<SeqRepair>), String> {
    let state: ServiceState = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if state.version > STATE_VERSION {
        return Err(format!(
            "version {} was written by a newer agent (this one knows up to {STATE_VERSION})",
            state.version
        ));
    }
    // Version 1 is the first; later versions migrate forward here. Fields added to version 1
    // later (`last_epoch`, `floor`) read as 0 from older files.
    let mut state = ServiceState {
        version: STATE_VERSION,
        ..state
    };
    let repair = state.repair_last_seq();
    Ok((state, repair))
}

/// The state file of one service.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file in `service_dir`.
    pub fn new(service_dir: &Path) -> Self {
        StateFile {
            path: service_dir.join("state.json"),
        }
    }

    /// Loads the state; a missing file is a fresh default state.
    pub fn load(&self) -> Result<ServiceState, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ServiceState::default()),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let (state, repair) = parse(&bytes).map_err(|problem| StateError::Corrupt {
            path: self.path.clone(),
            problem,
        })?;
        if let Some(repaired) = repair {
            tracing::warn!(
                path = %self.path.display(),
                poisoned = repaired.poisoned,
                repaired = repaired.now,
                "last applied order sequence is beyond the wire's limit (left by an older agent); repaired it"
            );
            if let Err(e) = self.save(&state) {
                tracing::warn!(error = %e, "cannot persist the repaired order sequence; repairing again at the next start");
            }
        }
        Ok(state)
    }

    /// Writes the state durably.
    pub fn save(&self, state: &ServiceState) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StateError::Corrupt {
            path: self.path.clone(),
            problem: e.to_string(),
        })?;
        durable::write_atomic(&self.path, &bytes).map_err(|source| StateError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::{Activation, Deadlines, OrderRef};

    #[test]
    fn state_round_trips_with_journal_and_results() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        assert_eq!(file.load().unwrap(), ServiceState::default());
        let mut s = ServiceState {
            last_seq: 4,
            previous: Some("web-1".into()),
            ..Default::default()
        };
        let (a, _) = Activation::begin(
            OrderRef {
                order_id: "o".into(),
                rollout_id: "r".into(),
                seq: 4,
            },
            Some("web-1".into()),
            "web-2".into(),
            Deadlines {
                healthy_deadline_ms: 1,
                min_healthy_ms: 1,
                confirm_deadline_ms: None,
            },
        );
        s.activation = a;
        for seq in 0..100 {
            s.record(&wire::OrderResult {
                seq,
                message: format!("m{seq}"),
                ..Default::default()
            });
        }
        file.save(&s).unwrap();
        let back = file.load().unwrap();
        assert_eq!(back, s);
        assert_eq!(back.results.len(), KEPT_RESULTS);
        assert_eq!(back.results_for(99)[0].message, "m99");
        assert!(back.results_for(1).is_empty());
    }

    #[test]
    fn poisoned_last_seq_is_repaired_at_load_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        let mut s = ServiceState {
            last_seq: u64::MAX,
            ..Default::default()
        };
        for seq in [3, 9, u64::MAX] {
            s.record(&wire::OrderResult {
                seq,
                ..Default::default()
            });
        }
        file.save(&s).unwrap();
        let back = file.load().unwrap();
        assert_eq!(back.last_seq, 9);
        assert_eq!(back.results.len(), 2);
        let raw: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
        assert_eq!(raw["last_seq"], 9, "the repair is persisted");
        // A sane sequence is left alone; nothing at all gives 0.
        let mut ok = ServiceState {
            last_seq: MAX_ORDER_SEQ,
            ..Default::default()
        };
        assert_eq!(ok.repair_last_seq(), None);
        ok.last_seq = MAX_ORDER_SEQ + 1;
        assert_eq!(
            ok.repair_last_seq(),
            Some(SeqRepair {
                poisoned: MAX_ORDER_SEQ + 1,
                now: 0
            })
        );
    }

    #[test]
    fn newer_or_garbled_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        std::fs::write(
            dir.path().join("state.json"),
            r#"{"version": 9, "last_seq": 1}"#,
        )
        .unwrap();
        assert!(file.load().unwrap_err().to_string().contains("newer agent"));
        std::fs::write(dir.path().join("state.json"), "{").unwrap();
        assert!(matches!(file.load(), Err(StateError::Corrupt { .. })));
    }
}
