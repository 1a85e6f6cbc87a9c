//! The embedded [`Store`]: one redb file, `<state_dir>/store.redb`.
//!
//! Why redb: it is pure Rust (no C toolchain, no system library, cross-compiles like the rest of
//! the binary), ACID with copy-on-write B-trees and a commit that fsyncs before it returns
//! ([`Durability::Immediate`]), keeps everything in a single file that an operator can back up
//! by copying it while the coordinator is stopped, and needs no schema language: keys and values
//! are plain Rust types. The coordinator's write rate is a few commits per second at most (one per
//! rollout step), far below what a durable commit costs (about a millisecond here).
//!
//! Tables (schema version [`SCHEMA_VERSION`]):
//!
//! | table            | key                      | value                          |
//! |------------------|--------------------------|--------------------------------|
//! | `meta`           | `"schema_version"`       | u64                            |
//! | `meta`           | `"epoch"`                | u64, the coordinator epoch (absent: 0) |
//! | `releases`       | (service, release id)    | JSON [`ReleaseRecord`]         |
//! | `rollouts`       | rollout id               | opaque header blob             |
//! | `rollout_hosts`  | (rollout id, host id)    | opaque host record blob        |
//! | `rollout_events` | (rollout id, event no.)  | opaque event blob              |
//! | `rollout_order`  | ordinal (creation order) | rollout id                     |
//! | `order_seqs`     | (host id, service)       | highest order sequence handed out or reserved |
//! | `audit`          | sequence number          | JSON [`AuditRecord`] (since v2)  |
//! | `revoked_hosts`  | host id                  | JSON [`RevocationRecord`] (since v2) |
//! | `enrolment`      | `token/<sha256>`, `key/<host>`, `pending/<host>` | JSON (since v3, see `crate::enrolment`) |
//!
//! A file written by a newer coordinator (higher schema version) is refused with
//! [`StoreError::TooNew`] rather than misread; older versions are migrated forward by
//! [`migrate`], one explicit step per version, inside the same transaction that records the new
//! version.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use ::redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serin_proto::{HostId, ReleaseId, ServiceName};

use super::{
    AuditRecord, EnrolmentWrite, ReleaseRecord, RevocationRecord, Store, StoreError, StoredRollout,
};

/// The schema version this coordinator writes and understands.
pub const SCHEMA_VERSION: u32 = 3;

const SCHEMA_VERSION_KEY: &str = "schema_version";
/// `meta` key of the coordinator epoch ([`Store::bump_epoch`]).
const EPOCH_KEY: &str = "epoch";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RELEASES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("releases");
const ROLLOUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("rollouts");
const ROLLOUT_HOSTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("rollout_hosts");
const ROLLOUT_EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("rollout_events");
const ROLLOUT_ORDER: TableDefinition<u64, &str> = TableDefinition::new("rollout_order");
const ORDER_SEQS: TableDefinition<(&str, &str), u64> = TableDefinition::new("order_seqs");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const REVOKED_HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("revoked_hosts");
const ENROLMENT: TableDefinition<&str, &[u8]> = TableDefinition::new("enrolment");

/// The coordinator's durable state in a redb file.
///
/// redb latches an I/O error (a full disk during a commit, say): every later operation on that
/// handle fails with `PreviousIo` until the file is closed and opened again. So a failed
/// operation marks the handle failed, and the next operation closes it and opens the file again
/// (redb repairs it from its last durable commit); while that fails (the disk still full) each
/// operation fails with the reason, and a later one tries again.
pub struct RedbStore {
    /// `None` once a failed handle was closed and opening the file again did not work yet.
    db: RwLock<Option<Database>>,
    failed: AtomicBool,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Wraps any redb error with what we were doing and which file it was.
fn io(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{what} in {}: {e}", path.display()))
}

impl RedbStore {
    /// Opens (creating if needed) the store at `path`, migrating an older schema forward and
    /// refusing a newer one.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = Database::create(&path).map_err(|e| io(&path, "opening the store", e))?;
        let store = Self {
            db: RwLock::new(Some(db)),
            failed: AtomicBool::new(false),
            path,
        };
        store.upgrade()?;
        Ok(store)
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the schema version and migrates forward to [`SCHEMA_VERSION`] in one transaction.
    fn upgrade(&self) -> Result<(), StoreError> {
        let txn = self.begin_write("starting the schema check")?;
        let found = {
            let meta = txn
                .open_table(META)
                .map_err(|e| self.io("opening table meta", e))?;
            meta.get(SCHEMA_VERSION_KEY)
                .map_err(|e| self.io("reading the schema version", e))?
                .map(|g| g.value())
        };
        let found = match found {
            None => 0,
            Some(v) => u32::try_from(v).map_err(|_| {
                StoreError::Corrupt(format!(
                    "schema version {v} in {} is out of range",
                    self.path.display()
                ))
            })?,
        };
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            tracing::info!(
                path = %self.path.display(),
                from = found,
                to = SCHEMA_VERSION,
                "migrating store schema"
            );
            migrate(&txn, found).map_err(|e| self.io("migrating the schema", e))?;
            let mut meta = txn
                .open_table(META)
                .map_err(|e| self.io("opening table meta", e))?;
            meta.insert(SCHEMA_VERSION_KEY, u64::from(SCHEMA_VERSION))
                .map_err(|e| self.io("writing the schema version", e))?;
        }
        self.commit(txn, "committing the schema version")
    }

    fn io(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        io(&self.path, what, e)
    }

    /// `e` happened on the database: the handle may be latched, reopen it before the next use.
    fn failed(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        self.failed.store(true, Ordering::SeqCst);
        self.io(what, e)
    }

    /// The database handle, reopened first if an earlier operation failed.
    fn handle(&self, what: &str) -> Result<RwLockReadGuard<'_, Option<Database>>, StoreError> {
        if self.failed.load(Ordering::SeqCst) {
            let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
            if self.failed.load(Ordering::SeqCst) {
                // Close the latched handle first: it holds the file's lock.
                *db = None;
                let reopened = Database::create(&self.path).map_err(|e| {
                    self.io(&format!("{what}: reopening the store after an error"), e)
                })?;
                *db = Some(reopened);
                self.failed.store(false, Ordering::SeqCst);
                tracing::info!(path = %self.path.display(), "store reopened after an error");
            }
        }
        Ok(self.db.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn begin_write(&self, what: &str) -> Result<WriteTransaction, StoreError> {
        let db = self.handle(what)?;
        let db = db
            .as_ref()
            .ok_or_else(|| self.failed(what, "the store is closed"))?;
        let mut txn = db.begin_write().map_err(|e| self.failed(what, e))?;
        // The default, made explicit: commit() returns only once the data is fsync'd.
        txn.set_durability(Durability::Immediate)
            .map_err(|e| self.io(what, e))?;
        Ok(txn)
    }

    fn commit(&self, txn: WriteTransaction, what: &str) -> Result<(), StoreError> {
        txn.commit().map_err(|e| self.failed(what, e))
    }

    fn read_txn(&self, what: &str) -> Result<::redb::ReadTransaction, StoreError> {
        let db = self.handle(what)?;
        let db = db
            .as_ref()
            .ok_or_else(|| self.failed(what, "the store is closed"))?;
        db.begin_read().map_err(|e| self.failed(what, e))
    }
}

/// Moves a schema at version `from` to [`SCHEMA_VERSION`], one explicit step per version.
///
/// Every step runs in the caller's transaction, so a crash mid-migration leaves the old version
/// intact. To change the schema: bump [`SCHEMA_VERSION`] and add a `from == N` step here that
/// rewrites version N's tables into version N+1's.
pub fn migrate(txn: &WriteTransaction, from: u32) -> Result<(), ::redb::Error> {
    let mut version = from;
    while version < SCHEMA_VERSION {
        match version {
            // 0: a fresh file. Create every table so readers never meet a missing one.
            0 => {
                txn.open_table(META)?;
                txn.open_table(RELEASES)?;
                txn.open_table(ROLLOUTS)?;
                txn.open_table(ROLLOUT_HOSTS)?;
                txn.open_table(ROLLOUT_EVENTS)?;
                txn.open_table(ROLLOUT_ORDER)?;
                txn.open_table(ORDER_SEQS)?;
            }
            // 1 -> 2: the security record (audit log, revoked hosts), new empty tables.
            1 => {
                txn.open_table(AUDIT)?;
                txn.open_table(REVOKED_HOSTS)?;
            }
            // 2 -> 3: the enrolment record (tokens, enrolled keys, held enrolments).
            2 => {
                txn.open_table(ENROLMENT)?;
            }
            _ => unreachable!("no migration step from schema version {version}"),
        }
        version += 1;
    }
    Ok(())
}

impl Store for RedbStore {
    fn append_audit(&self, rec: &AuditRecord) -> Result<u64, StoreError> {
        let blob = serde_json::to_vec(rec)
            .map_err(|e| StoreError::Corrupt(format!("encoding an audit entry: {e}")))?;
        let txn = self.begin_write("starting append_audit")?;
        let seq = {
            let mut t = txn
                .open_table(AUDIT)
                .map_err(|e| self.io("opening table audit", e))?;
            let last = t
                .last()
                .map_err(|e| self.io("reading the audit log's end", e))?
                .map_or(0, |(k, _)| k.value());
            let seq = last + 1;
            t.insert(seq, blob.as_slice())
                .map_err(|e| self.io("writing an audit entry", e))?;
            seq
        };
        self.commit(txn, "committing an audit entry")?;
        Ok(seq)
    }

    fn audit(&self, since_unix_ms: u64) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        let txn = self.read_txn("starting an audit read")?;
        let t = txn
            .open_table(AUDIT)
            .map_err(|e| self.io("opening table audit", e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| self.io("reading the audit log", e))? {
            let (k, v) = entry.map_err(|e| self.io("reading the audit log", e))?;
            let rec: AuditRecord = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Corrupt(format!("audit entry {}: {e}", k.value())))?;
            if rec.at_unix_ms >= since_unix_ms {
                out.push((k.value(), rec));
            }
        }
        Ok(out)
    }

    fn revoke_host(&self, rec: &RevocationRecord) -> Result<bool, StoreError> {
        let blob = serde_json::to_vec(rec)
            .map_err(|e| StoreError::Corrupt(format!("encoding a revocation: {e}")))?;
        let txn = self.begin_write("starting revoke_host")?;
        {
            let mut t = txn
                .open_table(REVOKED_HOSTS)
                .map_err(|e| self.io("opening table revoked_hosts", e))?;
            if t.get(rec.host_id.as_str())
                .map_err(|e| self.io("reading a revocation", e))?
                .is_some()
            {
                return Ok(false);
            }
            t.insert(rec.host_id.as_str(), blob.as_slice())
                .map_err(|e| self.io("writing a revocation", e))?;
        }
        self.commit(txn, "committing a revocation")?;
        Ok(true)
    }

    fn enrolment_update(
        &self,
        key: &str,
        update: &mut dyn FnMut(Option<Vec<u8>>) -> EnrolmentWrite,
    ) -> Result<(), StoreError> {
        let txn = self.begin_write("starting an enrolment update")?;
        let write = {
            let t = txn
                .open_table(ENROLMENT)
                .map_err(|e| self.io("opening table enrolment", e))?;
            let current = t
                .get(key)
                .map_err(|e| self.io("reading an enrolment entry", e))?
                .map(|v| v.value().to_vec());
            update(current)
        };
        {
            let mut t = txn
                .open_table(ENROLMENT)
                .map_err(|e| self.io("opening table enrolment", e))?;
            match &write {
                EnrolmentWrite::Keep => return Ok(()),
                EnrolmentWrite::Put(v) => {
                    t.insert(key, v.as_slice())
                        .map_err(|e| self.io("writing an enrolment entry", e))?;
                }
                EnrolmentWrite::Delete => {
                    t.remove(key)
                        .map_err(|e| self.io("removing an enrolment entry", e))?;
                }
            }
        }
        self.commit(txn, "committing an enrolment update")
    }

    fn enrolment_entries(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.read_txn("starting an enrolment read")?;
        let t = txn
            .open_table(ENROLMENT)
            .map_err(|e| self.io("opening table enrolment", e))?;
        let mut out = Vec::new();
        for entry in t
            .range(prefix..)
            .map_err(|e| self.io("reading enrolment entries", e))?
        {
            let (k, v) = entry.map_err(|e| self.io("reading enrolment entries", e))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn revoked_hosts(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        let txn = self.read_txn("starting a revocation read")?;
        let t = txn
            .open_table(REVOKED_HOSTS)
            .map_err(|e| self.io("opening table revoked_hosts", e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| self.io("reading revocations", e))? {
            let (k, v) = entry.map_err(|e| self.io("reading revocations", e))?;
            out.push(
                serde_json::from_slice(v.value()).map_err(|e| {
                    StoreError::Corrupt(format!("revocation of {}: {e}", k.value()))
                })?,
            );
        }
        Ok(out)
    }

    fn put_release(&self, rec: &ReleaseRecord) -> Result<(), StoreError> {
        let blob = serde_json::to_vec(rec)
            .map_err(|e| StoreError::Corrupt(format!("encoding release {}: {e}", rec.id)))?;
        let txn = self.begin_write("starting put_release")?;
        {
            let mut t = txn
                .open_table(RELEASES)
                .map_err(|e| self.io("opening table releases", e))?;
            t.insert((rec.service.as_str(), rec.id.as_str()), blob.as_slice())
                .map_err(|e| self.io("writing a release", e))?;
        }
        crate::fault::point("store-release-before-commit");
        self.commit(txn, "committing a release")?;
        crate::fault::point("store-release-committed");
        Ok(())
    }

    fn release(
        &self,
        service: &ServiceName,
        id: &ReleaseId,
    ) -> Result<Option<ReleaseRecord>, StoreError> {
        let txn = self.read_txn("starting a release read")?;
        let t = txn
            .open_table(RELEASES)
            .map_err(|e| self.io("opening table releases", e))?;
        let Some(guard) = t
            .get((service.as_str(), id.as_str()))
            .map_err(|e| self.io("reading a release", e))?
        else {
            return Ok(None);
        };
        decode_release(guard.value()).map(Some)
    }

    fn releases(&self, service: Option<&ServiceName>) -> Result<Vec<ReleaseRecord>, StoreError> {
        let txn = self.read_txn("starting a release listing")?;
        let t = txn
            .open_table(RELEASES)
            .map_err(|e| self.io("opening table releases", e))?;
        let mut out = Vec::new();
        let start = (service.map_or("", ServiceName::as_str), "");
        for entry in t
            .range(start..)
            .map_err(|e| self.io("listing releases", e))?
        {
            let (k, v) = entry.map_err(|e| self.io("listing releases", e))?;
            if let Some(service) = service
                && k.value().0 != service.as_str()
            {
                break;
            }
            out.push(decode_release(v.value())?);
        }
        Ok(out)
    }

    fn save_rollout(
        &self,
        rollout_id: &str,
        header: &[u8],
        hosts: &[(HostId, Vec<u8>)],
        events: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        let txn = self.begin_write("starting save_rollout")?;
        {
            let mut rollouts = txn
                .open_table(ROLLOUTS)
                .map_err(|e| self.io("opening table rollouts", e))?;
            let is_new = rollouts
                .insert(rollout_id, header)
                .map_err(|e| self.io("writing a rollout header", e))?
                .is_none();
            if is_new {
                let mut order = txn
                    .open_table(ROLLOUT_ORDER)
                    .map_err(|e| self.io("opening table rollout_order", e))?;
                let next = order
                    .last()
                    .map_err(|e| self.io("reading the rollout order", e))?
                    .map_or(0, |(k, _)| k.value() + 1);
                order
                    .insert(next, rollout_id)
                    .map_err(|e| self.io("writing the rollout order", e))?;
            }
            let mut host_table = txn
                .open_table(ROLLOUT_HOSTS)
                .map_err(|e| self.io("opening table rollout_hosts", e))?;
            for (host, blob) in hosts {
                host_table
                    .insert((rollout_id, host.as_str()), blob.as_slice())
                    .map_err(|e| self.io("writing a rollout host record", e))?;
            }
            if !events.is_empty() {
                let mut ev = txn
                    .open_table(ROLLOUT_EVENTS)
                    .map_err(|e| self.io("opening table rollout_events", e))?;
                let next = ev
                    .range((rollout_id, 0u64)..=(rollout_id, u64::MAX))
                    .map_err(|e| self.io("reading rollout events", e))?
                    .next_back()
                    .transpose()
                    .map_err(|e| self.io("reading rollout events", e))?
                    .map_or(0, |(k, _)| k.value().1 + 1);
                for (n, blob) in (next..).zip(events) {
                    ev.insert((rollout_id, n), blob.as_slice())
                        .map_err(|e| self.io("appending a rollout event", e))?;
                }
            }
        }
        crate::fault::point("store-rollout-before-commit");
        self.commit(txn, "committing a rollout")?;
        crate::fault::point("store-rollout-committed");
        Ok(())
    }

    fn load_rollout(&self, rollout_id: &str) -> Result<Option<StoredRollout>, StoreError> {
        let txn = self.read_txn("starting a rollout read")?;
        let rollouts = txn
            .open_table(ROLLOUTS)
            .map_err(|e| self.io("opening table rollouts", e))?;
        let Some(header) = rollouts
            .get(rollout_id)
            .map_err(|e| self.io("reading a rollout header", e))?
        else {
            return Ok(None);
        };
        let header = header.value().to_vec();

        let host_table = txn
            .open_table(ROLLOUT_HOSTS)
            .map_err(|e| self.io("opening table rollout_hosts", e))?;
        let mut hosts = Vec::new();
        for entry in host_table
            .range((rollout_id, "")..)
            .map_err(|e| self.io("reading rollout hosts", e))?
        {
            let (k, v) = entry.map_err(|e| self.io("reading rollout hosts", e))?;
            let (rid, host) = k.value();
            if rid != rollout_id {
                break;
            }
            let host = HostId::new(host).map_err(|e| {
                StoreError::Corrupt(format!("rollout {rollout_id} has a bad host key: {e}"))
            })?;
            hosts.push((host, v.value().to_vec()));
        }

        let ev = txn
            .open_table(ROLLOUT_EVENTS)
            .map_err(|e| self.io("opening table rollout_events", e))?;
        let mut events = Vec::new();
        for entry in ev
            .range((rollout_id, 0u64)..=(rollout_id, u64::MAX))
            .map_err(|e| self.io("reading rollout events", e))?
        {
            let (_, v) = entry.map_err(|e| self.io("reading rollout events", e))?;
            events.push(v.value().to_vec());
        }
        Ok(Some(StoredRollout {
            header,
            hosts,
            events,
        }))
    }

    fn rollout_ids(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.read_txn("starting a rollout listing")?;
        let order = txn
            .open_table(ROLLOUT_ORDER)
            .map_err(|e| self.io("opening table rollout_order", e))?;
        let mut out = Vec::new();
        for entry in order.iter().map_err(|e| self.io("listing rollouts", e))? {
            let (_, v) = entry.map_err(|e| self.io("listing rollouts", e))?;
            out.push(v.value().to_string());
        }
        Ok(out)
    }

    fn next_seq(
        &self,
        host: &HostId,
        service: &ServiceName,
        at_least: u64,
    ) -> Result<u64, StoreError> {
        Ok(self.reserve_seqs(service, &[(host.clone(), at_least)], 1)?[0])
    }

    fn reserve_seqs(
        &self,
        service: &ServiceName,
        requests: &[(HostId, u64)],
        count: u64,
    ) -> Result<Vec<u64>, StoreError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.begin_write("starting reserve_seqs")?;
        let out = {
            let mut t = txn
                .open_table(ORDER_SEQS)
                .map_err(|e| self.io("opening table order_seqs", e))?;
            let mut out = Vec::with_capacity(requests.len());
            for (host, at_least) in requests {
                let key = (host.as_str(), service.as_str());
                let last = t
                    .get(key)
                    .map_err(|e| self.io("reading an order sequence", e))?
                    .map_or(0, |g| g.value());
                let (first, end) = super::block(host, service, last, *at_least, count)?;
                t.insert(key, end)
                    .map_err(|e| self.io("writing an order sequence", e))?;
                out.push(first);
            }
            out
        };
        crate::fault::point("store-seq-before-commit");
        self.commit(txn, "committing order sequences")?;
        crate::fault::point("store-seq-committed");
        Ok(out)
    }

    fn bump_epoch(&self, at_least: u64) -> Result<u64, StoreError> {
        let txn = self.begin_write("starting bump_epoch")?;
        let next = {
            let mut t = txn
                .open_table(META)
                .map_err(|e| self.io("opening table meta", e))?;
            let last = t
                .get(EPOCH_KEY)
                .map_err(|e| self.io("reading the epoch", e))?
                .map_or(0, |g| g.value());
            let next = last.saturating_add(1).max(at_least);
            t.insert(EPOCH_KEY, next)
                .map_err(|e| self.io("writing the epoch", e))?;
            next
        };
        self.commit(txn, "committing the epoch")?;
        Ok(next)
    }
}

fn decode_release(blob: &[u8]) -> Result<ReleaseRecord, StoreError> {
    serde_json::from_slice(blob)
        .map_err(|e| StoreError::Corrupt(format!("undecodable release record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[test]
    fn conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("store.redb")).unwrap();
        conformance::check_all(&store);
    }

    #[test]
    fn reopen_after_drop_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let written = {
            let store = RedbStore::open(&path).unwrap();
            conformance::fill(&store)
        };
        let store = RedbStore::open(&path).unwrap();
        conformance::verify_filled(&store, &written);
    }

    #[test]
    fn next_seq_is_monotonic_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let host = HostId::new("h1").unwrap();
        let web = ServiceName::new("web").unwrap();
        let first = {
            let store = RedbStore::open(&path).unwrap();
            assert_eq!(store.next_seq(&host, &web, 0).unwrap(), 1);
            store.next_seq(&host, &web, 0).unwrap()
        };
        assert_eq!(first, 2);
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.next_seq(&host, &web, 0).unwrap(), 3);
        // An agent that reports a higher applied sequence than we remember pushes us past it.
        assert_eq!(store.next_seq(&host, &web, 40).unwrap(), 41);
        assert_eq!(store.next_seq(&host, &web, 5).unwrap(), 42);
    }

    /// One transaction allocates for many hosts: each gets the next of its own sequence, past
    /// `at_least`, and the allocations survive a reopen like single ones.
    #[test]
    fn next_seqs_allocates_many_hosts_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (h1, h2) = (HostId::new("h1").unwrap(), HostId::new("h2").unwrap());
        let web = ServiceName::new("web").unwrap();
        {
            let store = RedbStore::open(&path).unwrap();
            assert_eq!(store.next_seq(&h1, &web, 0).unwrap(), 1);
            let got = store
                .next_seqs(&web, &[(h1.clone(), 0), (h2.clone(), 7)])
                .unwrap();
            assert_eq!(got, vec![2, 8]);
            assert_eq!(store.next_seqs(&web, &[]).unwrap(), Vec::<u64>::new());
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.next_seq(&h1, &web, 0).unwrap(), 3);
        assert_eq!(store.next_seq(&h2, &web, 0).unwrap(), 9);
    }

    #[test]
    fn the_epoch_grows_on_every_bump_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let first = {
            let store = RedbStore::open(&path).unwrap();
            assert_eq!(store.bump_epoch(0).unwrap(), 1);
            store.bump_epoch(0).unwrap()
        };
        assert_eq!(first, 2);
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.bump_epoch(0).unwrap(), 3);
        // The wall clock (what the coordinator passes) moves it ahead, a stale clock never back.
        assert_eq!(store.bump_epoch(1_000).unwrap(), 1_000);
        assert_eq!(store.bump_epoch(5).unwrap(), 1_001);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        drop(RedbStore::open(&path).unwrap());
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_VERSION_KEY, u64::from(SCHEMA_VERSION) + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        match RedbStore::open(&path) {
            Err(StoreError::TooNew { found, supported }) => {
                assert_eq!(found, SCHEMA_VERSION + 1);
                assert_eq!(supported, SCHEMA_VERSION);
            }
            other => panic!("expected TooNew, got {other:?}"),
        }
    }

    #[test]
    fn an_enrolment_entry_is_read_and_replaced_in_one_transaction_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            store
                .enrolment_update("token/a", &mut |cur| {
                    assert_eq!(cur, None);
                    EnrolmentWrite::Put(b"fresh".to_vec())
                })
                .unwrap();
            store
                .enrolment_update("key/h1", &mut |_| EnrolmentWrite::Put(b"k".to_vec()))
                .unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        // Consumed once: the second reader sees the first one's write.
        let mut seen = Vec::new();
        for _ in 0..2 {
            store
                .enrolment_update("token/a", &mut |cur| {
                    seen.push(cur.clone());
                    match cur.as_deref() {
                        Some(b"fresh") => EnrolmentWrite::Put(b"used".to_vec()),
                        _ => EnrolmentWrite::Keep,
                    }
                })
                .unwrap();
        }
        assert_eq!(seen, vec![Some(b"fresh".to_vec()), Some(b"used".to_vec())]);
        assert_eq!(
            store.enrolment_entries("token/").unwrap(),
            vec![("token/a".to_string(), b"used".to_vec())]
        );
        store
            .enrolment_update("token/a", &mut |_| EnrolmentWrite::Delete)
            .unwrap();
        assert!(store.enrolment_entries("token/").unwrap().is_empty());
        assert_eq!(store.enrolment_entries("key/").unwrap().len(), 1);
    }

    #[test]
    fn a_fresh_file_records_the_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        drop(RedbStore::open(&path).unwrap());
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let v = txn
            .open_table(META)
            .unwrap()
            .get(SCHEMA_VERSION_KEY)
            .unwrap()
            .map(|g| g.value());
        assert_eq!(v, Some(u64::from(SCHEMA_VERSION)));
    }

    #[test]
    fn a_garbage_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        std::fs::write(&path, b"this is not a redb file at all, not even close").unwrap();
        let e = RedbStore::open(&path).unwrap_err();
        assert!(e.to_string().contains("store.redb"), "{e}");
    }
}
