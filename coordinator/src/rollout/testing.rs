//! Hand-written fakes of the fleet and the store, and builders for tests of the engine.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serin_proto::wire::ServiceState;
use serin_proto::{HostId, Order, ReleaseId, ServiceName, wire};

use super::spec::RolloutSpec;
use crate::fleet::{Fleet, FleetEvent, HostSnapshot, ServiceSnapshot};
use crate::store::ReleaseRecord;

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

/// A wire spec for service web, release web-2, role=web, with the given waves.
pub fn wire_spec(waves: &[&str]) -> wire::RolloutSpec {
    wire::RolloutSpec {
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

/// The validated form of [`wire_spec`].
pub fn spec(waves: &[&str]) -> RolloutSpec {
    RolloutSpec::try_from(wire_spec(waves)).unwrap()
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
    }
}

/// The release web-2.
pub fn release() -> serin_proto::Release {
    let r = release_record();
    serin_proto::Release::try_from(wire::Release {
        service: r.service,
        id: r.id,
        sha256: r.sha256,
        size: r.size,
        url: r.url,
    })
    .unwrap()
}

/// A scripted [`Fleet`]: hosts are set by the test, sent orders are recorded, events are
/// broadcast with [`FakeFleet::emit`].
pub struct FakeFleet {
    hosts: Mutex<BTreeMap<HostId, HostSnapshot>>,
    sent: Mutex<Vec<(HostId, Order)>>,
    events: tokio::sync::broadcast::Sender<FleetEvent>,
}

impl FakeFleet {
    /// A fleet with these hosts.
    pub fn new(hosts: Vec<HostSnapshot>) -> Self {
        let (events, _) = tokio::sync::broadcast::channel(1024);
        Self {
            hosts: Mutex::new(hosts.into_iter().map(|h| (h.host_id.clone(), h)).collect()),
            sent: Mutex::new(Vec::new()),
            events,
        }
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
            self.sent.lock().unwrap().push((host.clone(), order));
        }
        connected
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FleetEvent> {
        self.events.subscribe()
    }
}
