//! Hand-written fakes of the fleet and the store, and builders for tests of the engine.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serin_proto::{HoldConfirm, HostId, Order, ReleaseId, ServiceName};

use super::spec::{RawSpec, RolloutSpec};
use crate::fleet::{
    Fleet, FleetEvent, HostSnapshot, OrderOutcome, OrderPhase, ResultCode, ServiceSnapshot,
    ServiceState,
};
use crate::store::{MemoryStore, ReleaseRecord, Store, StoreError, StoredRollout};

/// A host in zone `zone` with role=web, connected, running `release` of service web, healthy.
pub fn host(id: &str, zone: &str, release: &str) -> HostSnapshot {
    let mut labels = BTreeMap::new();
    labels.insert("role".to_string(), "web".to_string());
    labels.insert("zone".to_string(), zone.to_string());
    let mut services = BTreeMap::new();
    services.insert(
        ServiceName::new("web").unwrap(),
        ServiceSnapshot {
            current_release: Some(ReleaseId::new(release).unwrap()),
            previous_release: None,
            kept_releases: vec![ReleaseId::new(release).unwrap()],
            state: ServiceState::Running,
            healthy: Some(true),
            last_seq: 3,
        },
    );
    HostSnapshot {
        host_id: HostId::new(id).unwrap(),
        hostname: id.to_string(),
        labels,
        connected: true,
        last_seen_unix_ms: 0,
        agent_version: "test".into(),
        services,
    }
}

/// A raw spec for service web, release web-2, role=web, with the given waves.
pub fn raw_spec(waves: &[&str]) -> RawSpec {
    RawSpec {
        service: "web".into(),
        release: "web-2".into(),
        selector: "role=web".into(),
        waves: waves.iter().map(|s| s.to_string()).collect(),
        bake_ms: 10_000,
        min_healthy_ms: 1_000,
        healthy_deadline_ms: 20_000,
        progress_deadline_ms: 60_000,
        ..Default::default()
    }
}

/// The validated form of [`raw_spec`].
pub fn spec(waves: &[&str]) -> RolloutSpec {
    RolloutSpec::try_from(raw_spec(waves)).unwrap()
}

/// The release record of web-2.
pub fn release_record() -> ReleaseRecord {
    ReleaseRecord {
        service: "web".into(),
        id: "web-2".into(),
        sha256: "ab".repeat(32),
        size: 100,
        url: String::new(),
        created_unix_ms: 1,
        manifest: String::new(),
    }
}

/// The release web-2.
pub fn release() -> serin_proto::Release {
    super::record::release_of(&release_record()).unwrap()
}

/// A scripted [`Fleet`]: hosts are set by the test, sent orders are recorded, events are
/// broadcast with [`FakeFleet::emit`].
pub struct FakeFleet {
    hosts: Mutex<BTreeMap<HostId, HostSnapshot>>,
    sent: Mutex<Vec<(HostId, Order)>>,
    holds: Mutex<Vec<(HostId, HoldConfirm)>>,
    events: tokio::sync::broadcast::Sender<FleetEvent>,
    responder: Mutex<Option<Responder>>,
    /// [`Fleet::queued`] per host (set by tests).
    queued: Mutex<BTreeMap<HostId, usize>>,
}

impl FakeFleet {
    /// A fleet with these hosts.
    pub fn new(hosts: Vec<HostSnapshot>) -> Self {
        let (events, _) = tokio::sync::broadcast::channel(1024);
        Self {
            hosts: Mutex::new(hosts.into_iter().map(|h| (h.host_id.clone(), h)).collect()),
            sent: Mutex::new(Vec::new()),
            holds: Mutex::new(Vec::new()),
            events,
            responder: Mutex::new(None),
            queued: Mutex::default(),
        }
    }

    /// What [`Fleet::queued`] says of `host` from now on: messages its stream has not taken.
    pub fn set_queued(&self, host: &HostId, n: usize) {
        self.queued.lock().unwrap().insert(host.clone(), n);
    }

    /// Updates the host table (and broadcasts HostUp/HostDown accordingly).
    pub fn set_host(&self, h: HostSnapshot) {
        self.hosts
            .lock()
            .unwrap()
            .insert(h.host_id.clone(), h.clone());
        if h.connected {
            self.emit(FleetEvent::HostUp(h));
        } else {
            self.emit(FleetEvent::HostDown { host: h.host_id });
        }
    }

    /// Broadcasts an event.
    pub fn emit(&self, e: FleetEvent) {
        let _ = self.events.send(e);
    }

    /// Every order sent so far.
    pub fn sent(&self) -> Vec<(HostId, Order)> {
        self.sent.lock().unwrap().clone()
    }

    /// Every hold sent so far.
    pub fn holds(&self) -> Vec<(HostId, HoldConfirm)> {
        self.holds.lock().unwrap().clone()
    }
}

impl Fleet for FakeFleet {
    fn snapshot(&self) -> Vec<HostSnapshot> {
        self.hosts.lock().unwrap().values().cloned().collect()
    }

    fn host(&self, id: &HostId) -> Option<HostSnapshot> {
        self.hosts.lock().unwrap().get(id).cloned()
    }

    fn send(&self, host: &HostId, order: Order) -> bool {
        let connected = self
            .hosts
            .lock()
            .unwrap()
            .get(host)
            .is_some_and(|h| h.connected);
        if connected {
            self.sent
                .lock()
                .unwrap()
                .push((host.clone(), order.clone()));
            let answer = self
                .responder
                .lock()
                .unwrap()
                .as_ref()
                .map(|r| r(host, &order))
                .unwrap_or_default();
            for e in answer {
                self.emit(e);
            }
        }
        connected
    }

    fn hold(&self, host: &HostId, hold: HoldConfirm) -> bool {
        let connected = self
            .hosts
            .lock()
            .unwrap()
            .get(host)
            .is_some_and(|h| h.connected);
        if connected {
            self.holds.lock().unwrap().push((host.clone(), hold));
        }
        connected
    }

    fn queued(&self, host: &HostId) -> usize {
        self.queued.lock().unwrap().get(host).copied().unwrap_or(0)
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FleetEvent> {
        self.events.subscribe()
    }
}

/// Builds the result an agent would send for `order`.
pub fn outcome(order: &Order, phase: OrderPhase, code: ResultCode) -> OrderOutcome {
    OrderOutcome {
        order_id: order.order_id.clone(),
        rollout_id: order.rollout_id.clone(),
        seq: order.seq,
        service: order.service.clone(),
        release: None,
        phase,
        code,
        message: String::new(),
        current_release: None,
        last_seq: order.seq,
    }
}

/// What a [`FakeFleet`] responder answers to one sent order: events emitted at once, as a fast
/// agent (or a connection dropping right away) would.
pub type Responder = Box<dyn Fn(&HostId, &Order) -> Vec<FleetEvent> + Send + Sync>;

impl FakeFleet {
    /// Emits the responder's events for every order sent from now on, right as it is sent.
    pub fn respond_with(&self, r: Responder) {
        *self.responder.lock().unwrap() = Some(r);
    }
}

/// A [`MemoryStore`] whose rollout saves can be made to fail, or to block until released.
#[derive(Default)]
pub struct TestStore {
    pub inner: MemoryStore,
    /// Saves that succeed before the failing ones start.
    pass_saves: std::sync::atomic::AtomicUsize,
    /// Saves left to fail (each failing save decrements it).
    fail_saves: std::sync::atomic::AtomicUsize,
    /// Saves of rollouts other than this one block until [`TestStore::open_gate`].
    gate: Mutex<Option<String>>,
    gate_cv: std::sync::Condvar,
    /// Saves currently blocked at the gate.
    blocked: std::sync::atomic::AtomicUsize,
    /// Sequence allocations fail while this is set.
    pub fail_seqs: std::sync::atomic::AtomicBool,
}

impl TestStore {
    /// A store with web-2 registered.
    pub fn new() -> Self {
        let s = Self::default();
        s.inner.put_release(&release_record()).unwrap();
        s
    }

    /// After `ok` more successful rollout saves, the next `n` fail with an i/o error.
    pub fn fail_after_saves(&self, ok: usize, n: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        self.pass_saves.store(ok, SeqCst);
        self.fail_saves.store(n, SeqCst);
    }

    /// Saves of every rollout but `except` block until the gate opens.
    pub fn close_gate(&self, except: &str) {
        *self.gate.lock().unwrap() = Some(except.to_string());
    }

    /// Lets blocked saves through.
    pub fn open_gate(&self) {
        *self.gate.lock().unwrap() = None;
        self.gate_cv.notify_all();
    }

    /// Saves waiting at the gate now.
    pub fn blocked(&self) -> usize {
        self.blocked.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Store for TestStore {
    fn put_release(&self, rec: &ReleaseRecord) -> Result<(), StoreError> {
        self.inner.put_release(rec)
    }
    fn release(
        &self,
        service: &ServiceName,
        id: &ReleaseId,
    ) -> Result<Option<ReleaseRecord>, StoreError> {
        self.inner.release(service, id)
    }
    fn releases(&self, service: Option<&ServiceName>) -> Result<Vec<ReleaseRecord>, StoreError> {
        self.inner.releases(service)
    }
    fn save_rollout(
        &self,
        rollout_id: &str,
        header: &[u8],
        hosts: &[(HostId, Vec<u8>)],
        events: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        {
            let mut g = self.gate.lock().unwrap();
            if g.as_deref().is_some_and(|e| e != rollout_id) {
                self.blocked.fetch_add(1, SeqCst);
                while g.as_deref().is_some_and(|e| e != rollout_id) {
                    g = self.gate_cv.wait(g).unwrap();
                }
                self.blocked.fetch_sub(1, SeqCst);
            }
        }
        if self
            .pass_saves
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_err()
            && self
                .fail_saves
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(StoreError::Io("injected save failure".into()));
        }
        self.inner.save_rollout(rollout_id, header, hosts, events)
    }
    fn load_rollout(&self, rollout_id: &str) -> Result<Option<StoredRollout>, StoreError> {
        self.inner.load_rollout(rollout_id)
    }
    fn rollout_ids(&self) -> Result<Vec<String>, StoreError> {
        self.inner.rollout_ids()
    }
    fn next_seq(
        &self,
        host: &HostId,
        service: &ServiceName,
        at_least: u64,
    ) -> Result<u64, StoreError> {
        if self.fail_seqs.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io(
                "injected sequence allocation failure".into(),
            ));
        }
        self.inner.next_seq(host, service, at_least)
    }
}

/// A rollout manager over `store` and `fleet` with the default engine settings and a clock that
/// reads 1,700,000,000,000 ms at the start (tokio's paused time moves it), stopped by `shutdown`.
pub(crate) async fn manager<S: Store + 'static>(
    store: &std::sync::Arc<S>,
    fleet: &std::sync::Arc<FakeFleet>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> super::manager::RolloutManager {
    super::manager::RolloutManager::start_with_clock(
        store.clone(),
        fleet.clone(),
        super::settings::EngineSettings::default(),
        shutdown.clone(),
        super::task::Clock::at(1_700_000_000_000),
    )
    .await
    .expect("the manager starts")
}

/// Hands out sequences as the store does (`Store::next_seqs`): each host's next one, above what
/// the request asks for. For the harnesses that drive the machine in process, without a store.
pub fn allocate_seqs(
    seqs: &mut BTreeMap<HostId, u64>,
    reqs: Vec<super::machine::SeqRequest>,
) -> Vec<(String, u64)> {
    reqs.into_iter()
        .map(|r| {
            let s = seqs.entry(r.host).or_insert(0);
            *s = (*s).max(r.at_least) + 1;
            (r.order_id, *s)
        })
        .collect()
}
