//! What the rollout engine persists: a versioned header, compact per-host records and events.
//!
//! Records are JSON (serde) with a `version` field so a newer coordinator can migrate older
//! records forward explicitly; a record with a version this coordinator does not know is refused
//! with [`RecordError::TooNew`] rather than misread. The store treats them as opaque bytes.
//!
//! Only intent is stored (STYLE rule 3): the spec, each wave's state and timers, each host's
//! cohort, baseline, phase, failure and the last order it was given (id and sequence, so the very
//! same order can be re-sent after a restart), and every decision with its evidence. What hosts
//! actually run, whether they are connected and their health samples are observed again from the
//! fleet after a restart.

use serde::{Deserialize, Serialize};

use super::intent::{Decision, HostEntry, RolloutState, Wave};
use crate::store::ReleaseRecord;

/// Version of the records written by this coordinator.
pub const RECORD_VERSION: u32 = 1;

/// A stored record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("rollout record {what} is not valid JSON: {error}")]
    Json { what: String, error: String },
    #[error(
        "rollout record {what} has version {found}, newer than this coordinator supports ({supported})"
    )]
    TooNew {
        what: String,
        found: u32,
        supported: u32,
    },
    #[error("rollout record {what} is inconsistent: {problem}")]
    Invalid { what: String, problem: String },
}

/// The spec as stored: the raw fields, with every default spelled out.
pub use super::spec::RawSpec as SpecRecord;

/// The release of a stored record, validated.
pub fn release_of(
    rec: &ReleaseRecord,
) -> Result<serin_proto::Release, serin_proto::ValidationError> {
    use serin_proto::{ArtifactSource, Release, ReleaseId, ServiceName, Sha256};
    let url = rec.url.trim();
    Ok(Release {
        service: ServiceName::new(&rec.service).map_err(|e| e.within("release"))?,
        id: ReleaseId::new(&rec.id).map_err(|e| e.within("release"))?,
        sha256: Sha256::from_hex("release.sha256", &rec.sha256)?,
        size: rec.size,
        source: if url.is_empty() {
            ArtifactSource::Coordinator
        } else {
            ArtifactSource::Url(url.to_string())
        },
        manifest: (!rec.manifest.is_empty()).then(|| rec.manifest.clone()),
    })
}

/// The rollout-wide record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeaderRecord {
    pub version: u32,
    pub id: String,
    pub spec: SpecRecord,
    pub release: ReleaseRecord,
    pub state: RolloutState,
    pub reason: String,
    pub current_wave: u32,
    pub waves: Vec<Wave>,
    pub decisions: Vec<Decision>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The rollout paused because a gate failed (not because an operator asked).
    pub paused_by_failure: bool,
    /// Paused because the store refused a save (resumes by itself once a save succeeds).
    #[serde(default)]
    pub paused_by_store: bool,
    /// Paused by the request gate ("insufficient data"): an operator may promote the wave.
    #[serde(default)]
    pub paused_for_data: bool,
    /// The state a rollback in progress ends in (rolled_back or aborted).
    pub rollback_final: Option<RolloutState>,
}

/// One host's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub version: u32,
    #[serde(flatten)]
    pub host: HostEntry,
}

/// One line of the rollout's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub version: u32,
    pub at_ms: u64,
    pub text: String,
}

impl EventRecord {
    /// `"<rfc3339> <text>"`, as `serin rollout explain` prints it.
    pub fn display(&self) -> String {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.at_ms);
        format!("{} {}", humantime::format_rfc3339_millis(t), self.text)
    }
}

fn check_version(what: &str, version: u32) -> Result<(), RecordError> {
    if version > RECORD_VERSION {
        return Err(RecordError::TooNew {
            what: what.to_string(),
            found: version,
            supported: RECORD_VERSION,
        });
    }
    // Version 1 is the first; later versions migrate older records here.
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, RecordError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned = serde_json::from_slice(bytes).map_err(|e| RecordError::Json {
        what: what.to_string(),
        error: e.to_string(),
    })?;
    check_version(what, v.version)?;
    serde_json::from_slice(bytes).map_err(|e| RecordError::Json {
        what: what.to_string(),
        error: e.to_string(),
    })
}

/// Encodes a record as JSON.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Serialising plain structs with string keys cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// Decodes a header record.
pub fn decode_header(rollout: &str, bytes: &[u8]) -> Result<HeaderRecord, RecordError> {
    decode(&format!("{rollout}/header"), bytes)
}

/// Decodes a host record.
pub fn decode_host(rollout: &str, host: &str, bytes: &[u8]) -> Result<HostRecord, RecordError> {
    decode(&format!("{rollout}/host/{host}"), bytes)
}

/// Decodes an event record.
pub fn decode_event(rollout: &str, bytes: &[u8]) -> Result<EventRecord, RecordError> {
    decode(&format!("{rollout}/event"), bytes)
}

/// Serde adapters for the validated identifier types (stored as strings, validated on load).
pub(crate) mod ids {
    use serde::{Deserialize, Deserializer, Serializer};
    use serin_proto::{HostId, ReleaseId};

    /// One [`HostId`].
    pub mod host {
        use super::*;

        pub fn serialize<S: Serializer>(v: &HostId, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(v.as_str())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HostId, D::Error> {
            HostId::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
        }
    }

    /// A list of [`HostId`]s.
    pub mod hosts {
        use super::*;

        pub fn serialize<S: Serializer>(v: &[HostId], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(HostId::as_str))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<HostId>, D::Error> {
            Vec::<String>::deserialize(d)?
                .into_iter()
                .map(|h| HostId::new(h).map_err(serde::de::Error::custom))
                .collect()
        }
    }

    /// An optional [`ReleaseId`].
    pub mod release_opt {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<ReleaseId>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(r) => s.serialize_some(r.as_str()),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ReleaseId>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|r| ReleaseId::new(r).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}
