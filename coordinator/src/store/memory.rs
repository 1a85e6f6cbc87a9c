//! An in-memory [`Store`] for tests of the modules built on top of it.
//!
//! Same semantics as [`super::RedbStore`] (checked by the same conformance tests), nothing
//! survives the process. Not for production: a coordinator restart would forget every rollout.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serin_proto::{HostId, ReleaseId, ServiceName};

use super::{
    AuditRecord, EnrolmentWrite, ReleaseRecord, RevocationRecord, Store, StoreError, StoredRollout,
    block,
};

#[derive(Default)]
struct Inner {
    releases: BTreeMap<(String, String), ReleaseRecord>,
    rollouts: BTreeMap<String, StoredRollout>,
    order: Vec<String>,
    seqs: BTreeMap<(HostId, ServiceName), u64>,
    saves: usize,
    seq_commits: usize,
    audit: Vec<(u64, AuditRecord)>,
    revoked: BTreeMap<String, RevocationRecord>,
    enrolment: BTreeMap<String, Vec<u8>>,
}

/// A [`Store`] that lives in memory only.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many `save_rollout` calls succeeded, for tests that check what gets persisted.
    pub fn saves(&self) -> usize {
        self.lock().saves
    }

    /// How many sequence allocations or reservations were committed (each one transaction).
    pub fn seq_commits(&self) -> usize {
        self.lock().seq_commits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave Inner half-updated in a way that matters
        // for tests, so a poisoned lock is recovered rather than propagated.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    fn enrolment_update(
        &self,
        key: &str,
        update: &mut dyn FnMut(Option<Vec<u8>>) -> EnrolmentWrite,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        match update(inner.enrolment.get(key).cloned()) {
            EnrolmentWrite::Keep => {}
            EnrolmentWrite::Put(v) => {
                inner.enrolment.insert(key.to_string(), v);
            }
            EnrolmentWrite::Delete => {
                inner.enrolment.remove(key);
            }
        }
        Ok(())
    }

    fn enrolment_entries(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self
            .lock()
            .enrolment
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn append_audit(&self, rec: &AuditRecord) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let seq = inner.audit.last().map_or(1, |(s, _)| s + 1);
        inner.audit.push((seq, rec.clone()));
        Ok(seq)
    }

    fn audit(&self, since_unix_ms: u64) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        Ok(self
            .lock()
            .audit
            .iter()
            .filter(|(_, r)| r.at_unix_ms >= since_unix_ms)
            .cloned()
            .collect())
    }

    fn revoke_host(&self, rec: &RevocationRecord) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        if inner.revoked.contains_key(&rec.host_id) {
            return Ok(false);
        }
        inner.revoked.insert(rec.host_id.clone(), rec.clone());
        Ok(true)
    }

    fn revoked_hosts(&self) -> Result<Vec<RevocationRecord>, StoreError> {
        Ok(self.lock().revoked.values().cloned().collect())
    }

    fn put_release(&self, rec: &ReleaseRecord) -> Result<(), StoreError> {
        self.lock()
            .releases
            .insert((rec.service.clone(), rec.id.clone()), rec.clone());
        Ok(())
    }

    fn release(
        &self,
        service: &ServiceName,
        id: &ReleaseId,
    ) -> Result<Option<ReleaseRecord>, StoreError> {
        Ok(self
            .lock()
            .releases
            .get(&(service.to_string(), id.to_string()))
            .cloned())
    }

    fn releases(&self, service: Option<&ServiceName>) -> Result<Vec<ReleaseRecord>, StoreError> {
        Ok(self
            .lock()
            .releases
            .values()
            .filter(|r| service.is_none_or(|s| r.service == s.as_str()))
            .cloned()
            .collect())
    }

    fn save_rollout(
        &self,
        rollout_id: &str,
        header: &[u8],
        hosts: &[(HostId, Vec<u8>)],
        events: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let r = inner
            .rollouts
            .entry(rollout_id.to_string())
            .or_insert_with(|| {
                inner.order.push(rollout_id.to_string());
                StoredRollout::default()
            });
        r.header = header.to_vec();
        for (host, blob) in hosts {
            match r.hosts.binary_search_by(|(h, _)| h.cmp(host)) {
                Ok(i) => r.hosts[i].1 = blob.clone(),
                Err(i) => r.hosts.insert(i, (host.clone(), blob.clone())),
            }
        }
        r.events.extend(events.iter().cloned());
        inner.saves += 1;
        Ok(())
    }

    fn load_rollout(&self, rollout_id: &str) -> Result<Option<StoredRollout>, StoreError> {
        Ok(self.lock().rollouts.get(rollout_id).cloned())
    }

    fn rollout_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock().order.clone())
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
        let mut inner = self.lock();
        // All or nothing: worked out on a copy of the counters it touches.
        let mut next: BTreeMap<&HostId, u64> = BTreeMap::new();
        let mut out = Vec::with_capacity(requests.len());
        for (host, at_least) in requests {
            let last = next.get(host).copied().unwrap_or_else(|| {
                inner
                    .seqs
                    .get(&(host.clone(), service.clone()))
                    .copied()
                    .unwrap_or(0)
            });
            let (first, end) = block(host, service, last, *at_least, count)?;
            next.insert(host, end);
            out.push(first);
        }
        if !requests.is_empty() {
            inner.seq_commits += 1;
        }
        for (host, end) in next {
            inner.seqs.insert((host.clone(), service.clone()), end);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[test]
    fn conforms() {
        conformance::check_all(&MemoryStore::new());
    }
}
