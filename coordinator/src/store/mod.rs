//! Durable state of the coordinator behind a narrow interface.
//!
//! The store keeps intent: releases, and per rollout an opaque versioned header, a record per host
//! and an append-only event log, plus the per-host order sequence counters. It knows nothing of
//! what the blobs mean, so the rollout engine's records can evolve without touching it, and a
//! distributed store can replace the embedded one later.

use serin_proto::{HostId, ReleaseId, ServiceName};

/// A release the coordinator knows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReleaseRecord {
    pub service: String,
    pub id: String,
    pub sha256: String,
    pub size: u64,
    /// Empty: served from the coordinator's artifact store.
    pub url: String,
    pub created_unix_ms: u64,
}

/// Everything stored for one rollout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredRollout {
    pub header: Vec<u8>,
    pub hosts: Vec<(HostId, Vec<u8>)>,
    pub events: Vec<Vec<u8>>,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o failed: {0}")]
    Io(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("store schema version {found} is newer than this coordinator supports ({supported})")]
    TooNew { found: u32, supported: u32 },
}

/// The coordinator's durable state.
pub trait Store: Send + Sync + 'static {
    fn put_release(&self, rec: &ReleaseRecord) -> Result<(), StoreError>;
    fn release(
        &self,
        service: &ServiceName,
        id: &ReleaseId,
    ) -> Result<Option<ReleaseRecord>, StoreError>;
    fn releases(&self, service: Option<&ServiceName>) -> Result<Vec<ReleaseRecord>, StoreError>;

    /// In one durable transaction: replace the rollout's header, upsert the given host records and
    /// append the given events.
    fn save_rollout(
        &self,
        rollout_id: &str,
        header: &[u8],
        hosts: &[(HostId, Vec<u8>)],
        events: &[Vec<u8>],
    ) -> Result<(), StoreError>;
    fn load_rollout(&self, rollout_id: &str) -> Result<Option<StoredRollout>, StoreError>;
    /// Ids of every stored rollout, oldest first.
    fn rollout_ids(&self) -> Result<Vec<String>, StoreError>;

    /// Allocate the next order sequence number for a host's service: strictly greater than any
    /// returned before for that pair and than `at_least`.
    fn next_seq(
        &self,
        host: &HostId,
        service: &ServiceName,
        at_least: u64,
    ) -> Result<u64, StoreError>;
}
