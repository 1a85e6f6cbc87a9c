//! Durable state of the coordinator behind a narrow interface.
//!
//! The store keeps intent: releases, and per rollout an opaque versioned header, a record per host
//! and an append-only event log, plus the per-host order sequence counters. It knows nothing of
//! what the blobs mean, so the rollout engine's records can evolve without touching it, and a
//! distributed store can replace the embedded one later.
//!
//! It also keeps the security record: the audit log of every mutating control call
//! ([`AuditRecord`]) and the revoked hosts ([`RevocationRecord`]), whose certificates the
//! coordinator refuses from then on.
//!
//! And the enrolment record ([`Store::enrolment_update`]): join tokens (hashed), the key each
//! host enrolled with, and enrolments held for approval, as opaque entries the enrolment module
//! encodes (`coordinator::enrolment`).

pub mod memory;
pub mod redb;

pub use self::memory::MemoryStore;
pub use self::redb::RedbStore;

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
    /// The release's signed manifest, verbatim; empty when unsigned. Records written before
    /// manifests existed read as unsigned.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub manifest: String,
}

/// Everything stored for one rollout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredRollout {
    pub header: Vec<u8>,
    pub hosts: Vec<(HostId, Vec<u8>)>,
    pub events: Vec<Vec<u8>>,
}

/// One entry of the audit log: a mutating control call, who made it and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// When the call was answered (unix ms).
    pub at_unix_ms: u64,
    /// The caller's certificate identity (`serin://operator/<role>/<name>`), or `plaintext`.
    pub who: String,
    /// The method, e.g. `StartRollout`.
    pub what: String,
    /// The call's arguments as `key=value` text.
    pub arguments: String,
    /// `ok`, or the status code and message of the refusal.
    pub result: String,
}

/// A revoked host: every certificate carrying its host id is refused from then on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevocationRecord {
    /// The host id.
    pub host_id: String,
    /// When (unix ms).
    pub at_unix_ms: u64,
    /// Who revoked it (certificate identity).
    pub by: String,
    /// Why, as given.
    pub reason: String,
}

/// A store operation failed.
/// What [`Store::enrolment_update`] does with the entry it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrolmentWrite {
    /// Leave it as it is (nothing is written).
    Keep,
    /// Write this value.
    Put(Vec<u8>),
    /// Remove the entry.
    Delete,
}

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

    /// [`next_seq`](Store::next_seq) for many hosts of one service in one durable transaction
    /// (one commit for all the orders of a step, not one per order): `requests` are
    /// `(host, at_least)`, the answer the allocated sequences in the same order. All or nothing.
    fn next_seqs(
        &self,
        service: &ServiceName,
        requests: &[(HostId, u64)],
    ) -> Result<Vec<u64>, StoreError> {
        self.reserve_seqs(service, requests, 1)
    }

    /// Reserves a block of `count` (at least 1) order sequences for each of many hosts of one
    /// service, in one durable transaction: for each `(host, at_least)` the answer is the
    /// block's first sequence `first`, strictly greater than any sequence handed out or reserved
    /// before for that pair and than `at_least`, and the block is `first..first + count`; once
    /// this returns, no later call hands out or reserves any sequence of it again (across
    /// restarts too). All or nothing. The caller hands the block's sequences out from memory:
    /// orders then need no commit of their own for their sequences (issue 10). The default
    /// reserves host by host through [`next_seq`](Store::next_seq) (stores written for tests).
    fn reserve_seqs(
        &self,
        service: &ServiceName,
        requests: &[(HostId, u64)],
        count: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let count = count.max(1);
        requests
            .iter()
            .map(|(host, at_least)| {
                let first = self.next_seq(host, service, *at_least)?;
                if count > 1 {
                    self.next_seq(host, service, first + count - 2)?;
                }
                Ok(first)
            })
            .collect()
    }

    /// Appends an entry to the audit log, durably; returns its sequence number (strictly
    /// increasing). The default (stores written for tests of other modules) keeps none.
    fn append_audit(&self, _rec: &AuditRecord) -> Result<u64, StoreError> {
        Err(StoreError::Io("this store keeps no audit log".into()))
    }

    /// The audit log's entries at or after `since_unix_ms`, oldest first.
    fn audit(&self, _since_unix_ms: u64) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        Ok(Vec::new())
    }

    /// Records a revoked host, durably; `false` when it was already revoked (nothing written).
    fn revoke_host(&self, _rec: &RevocationRecord) -> Result<bool, StoreError> {
        Err(StoreError::Io("this store keeps no revocations".into()))
    }

    /// Every revoked host.
    fn revoked_hosts(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        Ok(Vec::new())
    }

    /// Starts a new coordinator epoch (orders carry it; agents refuse orders of an older one as
    /// replays): strictly greater than every epoch returned before by this store, and at least
    /// `at_least`. The caller passes the wall clock in seconds, so that a store restored from a
    /// backup still starts an epoch newer than any the agents saw. A store that keeps nothing
    /// across restarts returns `at_least` (at least 1).
    /// Reads the enrolment entry `key` and replaces it with what `update` decides, in one
    /// durable transaction: a join token is consumed exactly once even under concurrent calls.
    fn enrolment_update(
        &self,
        _key: &str,
        _update: &mut dyn FnMut(Option<Vec<u8>>) -> EnrolmentWrite,
    ) -> Result<(), StoreError> {
        Err(StoreError::Io(
            "this store keeps no enrolment record".into(),
        ))
    }

    /// Every enrolment entry whose key starts with `prefix`, in key order.
    fn enrolment_entries(&self, _prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(Vec::new())
    }

    fn bump_epoch(&self, at_least: u64) -> Result<u64, StoreError> {
        Ok(at_least.max(1))
    }
}

/// The block of `count` (at least 1) sequences a reservation takes for `host`/`service` when the
/// highest sequence handed out or reserved so far is `last`: its first sequence and its last
/// (the new counter).
fn block(
    host: &HostId,
    service: &ServiceName,
    last: u64,
    at_least: u64,
    count: u64,
) -> Result<(u64, u64), StoreError> {
    let first = last.max(at_least).checked_add(1);
    let end = first.and_then(|f| f.checked_add(count.max(1) - 1));
    match (first, end) {
        (Some(first), Some(end)) => Ok((first, end)),
        _ => Err(StoreError::Corrupt(format!(
            "order sequence for {host}/{service} is exhausted"
        ))),
    }
}

/// Starts this coordinator run's epoch ([`Store::bump_epoch`], at least the wall clock in seconds)
/// on a blocking thread, and logs it.
pub async fn start_epoch(store: std::sync::Arc<dyn Store>) -> Result<u64, StoreError> {
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let epoch = tokio::task::spawn_blocking(move || store.bump_epoch(now_secs))
        .await
        .map_err(|e| StoreError::Io(format!("epoch task failed: {e}")))??;
    tracing::info!(epoch, "coordinator epoch started");
    Ok(epoch)
}

/// Behaviour every [`Store`] implementation must show; run by each implementation's tests.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    fn host(s: &str) -> HostId {
        HostId::new(s).unwrap()
    }

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn release(service: &str, id: &str) -> ReleaseRecord {
        ReleaseRecord {
            service: service.into(),
            id: id.into(),
            sha256: "ab".repeat(32),
            size: 42,
            url: String::new(),
            manifest: String::new(),
            created_unix_ms: 1_700_000_000_000,
        }
    }

    /// What [`fill`] wrote, to compare after a reopen.
    pub(crate) struct Filled {
        releases: Vec<ReleaseRecord>,
        rollouts: Vec<(String, StoredRollout)>,
    }

    /// Writes a little of everything.
    pub(crate) fn fill(store: &dyn Store) -> Filled {
        let releases = vec![
            release("db", "db-1"),
            release("web", "web-1"),
            release("web", "web-2"),
        ];
        for r in &releases {
            store.put_release(r).unwrap();
        }
        store
            .save_rollout(
                "r-b",
                b"hdr-b1",
                &[(host("h2"), b"h2".to_vec())],
                &[b"e0".to_vec()],
            )
            .unwrap();
        store
            .save_rollout("r-a", b"hdr-a", &[(host("h1"), b"h1".to_vec())], &[])
            .unwrap();
        store
            .save_rollout(
                "r-b",
                b"hdr-b2",
                &[
                    (host("h1"), b"h1".to_vec()),
                    (host("h2"), b"h2-v2".to_vec()),
                ],
                &[b"e1".to_vec(), b"e2".to_vec()],
            )
            .unwrap();
        let rollouts = ["r-b", "r-a"]
            .into_iter()
            .map(|id| (id.to_string(), store.load_rollout(id).unwrap().unwrap()))
            .collect();
        Filled { releases, rollouts }
    }

    /// Checks that `store` holds what [`fill`] wrote.
    pub(crate) fn verify_filled(store: &dyn Store, f: &Filled) {
        assert_eq!(store.releases(None).unwrap(), f.releases);
        assert_eq!(store.rollout_ids().unwrap(), vec!["r-b", "r-a"]);
        for (id, r) in &f.rollouts {
            assert_eq!(
                store.load_rollout(id).unwrap().as_ref(),
                Some(r),
                "rollout {id}"
            );
        }
    }

    /// Runs every conformance check on an empty store.
    pub(crate) fn check_all(store: &dyn Store) {
        assert!(store.releases(None).unwrap().is_empty());
        assert!(store.rollout_ids().unwrap().is_empty());
        assert_eq!(store.load_rollout("r-x").unwrap(), None);
        assert_eq!(
            store
                .release(&svc("web"), &"web-1".parse().unwrap())
                .unwrap(),
            None
        );

        let filled = fill(store);
        verify_filled(store, &filled);

        // Releases: lookup and per-service listing, with a service name that is a prefix of
        // another one.
        store.put_release(&release("web2", "web2-1")).unwrap();
        let web: Vec<_> = store
            .releases(Some(&svc("web")))
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(web, vec!["web-1", "web-2"]);
        assert_eq!(
            store
                .release(&svc("web"), &"web-2".parse().unwrap())
                .unwrap(),
            Some(release("web", "web-2"))
        );
        assert!(store.releases(Some(&svc("nope"))).unwrap().is_empty());

        // Rollouts: header replaced, hosts upserted in host order, events appended in order.
        let b = store.load_rollout("r-b").unwrap().unwrap();
        assert_eq!(b.header, b"hdr-b2");
        assert_eq!(
            b.hosts,
            vec![
                (host("h1"), b"h1".to_vec()),
                (host("h2"), b"h2-v2".to_vec())
            ]
        );
        assert_eq!(
            b.events,
            vec![b"e0".to_vec(), b"e1".to_vec(), b"e2".to_vec()]
        );
        // A rollout id that is a prefix of another does not see the other's rows.
        store
            .save_rollout("r-b-2", b"x", &[(host("h9"), vec![])], &[b"z".to_vec()])
            .unwrap();
        let b = store.load_rollout("r-b").unwrap().unwrap();
        assert_eq!(b.hosts.len(), 2);
        assert_eq!(b.events.len(), 3);
        assert_eq!(store.rollout_ids().unwrap(), vec!["r-b", "r-a", "r-b-2"]);

        // Sequences: strictly increasing per pair, independent between pairs, above at_least.
        let (h1, web) = (host("h1"), svc("web"));
        assert_eq!(store.next_seq(&h1, &web, 0).unwrap(), 1);
        assert_eq!(store.next_seq(&h1, &web, 0).unwrap(), 2);
        assert_eq!(store.next_seq(&h1, &svc("db"), 0).unwrap(), 1);
        assert_eq!(store.next_seq(&host("h2"), &web, 0).unwrap(), 1);
        assert_eq!(store.next_seq(&h1, &web, 10).unwrap(), 11);
        assert_eq!(store.next_seq(&h1, &web, 3).unwrap(), 12);

        // Blocks: each starts above everything handed out or reserved before (and above
        // at_least), and nothing of a block is handed out again.
        let h3 = host("h3");
        assert_eq!(
            store
                .reserve_seqs(&web, &[(h1.clone(), 0), (h3.clone(), 40)], 8)
                .unwrap(),
            vec![13, 41]
        );
        assert_eq!(store.next_seq(&h1, &web, 0).unwrap(), 21);
        assert_eq!(store.next_seqs(&web, &[(h3.clone(), 0)]).unwrap(), vec![49]);
        assert_eq!(
            store.reserve_seqs(&web, &[(h3.clone(), 100)], 1).unwrap(),
            vec![101]
        );
        assert!(store.reserve_seqs(&web, &[], 8).unwrap().is_empty());
    }
}
