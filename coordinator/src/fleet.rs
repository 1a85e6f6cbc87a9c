//! The seam between the agent-facing side of the coordinator and the rollout engine.
//!
//! The registry (fed by agent streams) implements [`Fleet`]; rollout tasks read host snapshots,
//! send orders and subscribe to [`FleetEvent`]s through it, never touching gRPC themselves.
//!
//! The three plain enums of results and inventory ([`OrderPhase`], [`ResultCode`],
//! [`ServiceState`]) are re-exported from the protocol crate for now: the registry builds these
//! types from validated messages and the engine reads them only through this module.

use std::collections::BTreeMap;

pub use serin_proto::wire::{OrderPhase, ResultCode, ServiceState};
use serin_proto::{HoldConfirm, HostId, Order, ReleaseId, ServiceName};

/// What the coordinator knows of one service on one host, from the agent's hello and results.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSnapshot {
    /// Release `current` points at; `None` when nothing is installed.
    pub current_release: Option<ReleaseId>,
    /// The release a rollback without a target would restore.
    pub previous_release: Option<ReleaseId>,
    /// Complete, verified releases on disk.
    pub kept_releases: Vec<ReleaseId>,
    pub state: ServiceState,
    /// Latest health verdict; `None` when no report arrived yet.
    pub healthy: Option<bool>,
    /// Highest order sequence the agent has applied for this service.
    pub last_seq: u64,
}

/// What the coordinator knows of one host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSnapshot {
    pub host_id: HostId,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    /// The agent's stream is open and its heartbeats are on time.
    pub connected: bool,
    pub last_seen_unix_ms: u64,
    pub agent_version: String,
    pub services: BTreeMap<ServiceName, ServiceSnapshot>,
}

/// One health report, reduced to what gates and canary analysis compare.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSample {
    pub service: ServiceName,
    pub release: Option<ReleaseId>,
    pub healthy: bool,
    pub checks_passing: u32,
    pub checks_total: u32,
    /// Latency of the latest HTTP/TCP probe, when there is one.
    pub probe_latency_us: Option<u64>,
    pub restarts: u32,
    pub cpu_percent: f32,
    pub rss_bytes: u64,
    pub observed_unix_ms: u64,
}

/// A validated order result from an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderOutcome {
    pub order_id: String,
    pub rollout_id: String,
    pub seq: u64,
    pub service: ServiceName,
    pub release: Option<ReleaseId>,
    pub phase: OrderPhase,
    pub code: ResultCode,
    pub message: String,
    pub current_release: Option<ReleaseId>,
    /// The highest sequence the agent has applied for this service (0 from agents that do not
    /// report it). After a `STALE_ORDER` refusal the coordinator allocates past it.
    pub last_seq: u64,
}

/// Something that happened in the fleet.
#[derive(Debug, Clone, PartialEq)]
pub enum FleetEvent {
    /// An agent said hello (first connect or reconnect), with its full inventory.
    HostUp(HostSnapshot),
    /// An agent's stream closed or its heartbeats stopped.
    HostDown { host: HostId },
    /// A health report arrived.
    Health { host: HostId, sample: HealthSample },
    /// An order result arrived.
    Result { host: HostId, outcome: OrderOutcome },
}

/// The fleet as the rollout engine sees it.
pub trait Fleet: Send + Sync + 'static {
    /// Every known host, connected or not.
    fn snapshot(&self) -> Vec<HostSnapshot>;
    /// One host.
    fn host(&self, id: &HostId) -> Option<HostSnapshot>;
    /// Queue an order to a connected host. Returns false when the host is not connected (the
    /// order is not queued; the caller re-sends when the host comes back).
    fn send(&self, host: &HostId, order: Order) -> bool;
    /// Queue a `HoldConfirm` to a connected host (unsequenced; nothing is re-sent later).
    /// Returns false when the host is not connected.
    fn hold(&self, host: &HostId, hold: HoldConfirm) -> bool;
    /// Every event from now on. A receiver that lags must resynchronise from [`Fleet::snapshot`].
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FleetEvent>;
}
