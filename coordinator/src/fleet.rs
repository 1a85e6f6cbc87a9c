//! The seam between the agent-facing side of the coordinator and the rollout engine.
//!
//! The registry (fed by agent streams) implements [`Fleet`]; rollout tasks read host snapshots,
//! send orders and subscribe to [`FleetEvent`]s through it, never touching gRPC themselves.
//!
//! Everything here is a domain type: the registry converts the agents' wire messages into them
//! (`registry.rs`, the edge) and the engine reads only these. The plain enums of results and
//! inventory ([`OrderPhase`], [`ResultCode`], [`ServiceState`]) mirror the protocol's enums
//! without its "unspecified" zero where a value is required; no generated type crosses this seam
//! (the engine's tidy test checks both this file and `rollout/`).

use std::collections::BTreeMap;

use serin_proto::{HoldConfirm, HostId, Order, ReleaseId, ServiceName};

/// Where an order stands, as its agent reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderPhase {
    /// Work is under way (a download, say).
    Progress,
    /// Stage order done: the release is on disk and verified.
    Staged,
    /// Activate order done: `current` points at the release and the service was restarted.
    Activated,
    /// The activated release passed its checks for the minimum healthy time.
    Healthy,
    /// Confirm order done: the dead-man switch is disarmed.
    Confirmed,
    /// The service was restored to an earlier release (ordered, or by the dead-man switch).
    RolledBack,
    /// Cancel order done.
    Cancelled,
    /// The order failed; the current release keeps serving. The [`ResultCode`] says why.
    Failed,
    /// The order was not applied: stale or duplicate sequence, busy, or invalid.
    Rejected,
}

/// Why an order ended as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultCode {
    /// No code given (progress reports).
    Unspecified,
    Ok,
    HashMismatch,
    SizeMismatch,
    InsufficientSpace,
    DownloadFailed,
    UnknownService,
    /// A rollback named a release that is not on disk.
    UnknownRelease,
    ServiceFailedToStart,
    /// The dead-man switch restored the previous release: the new one failed its checks.
    Unhealthy,
    /// The dead-man switch restored the previous release: no confirm before the deadline.
    ConfirmTimeout,
    /// The order's sequence is lower than one the agent already applied.
    StaleOrder,
    InvalidOrder,
    IoError,
    /// Another order for the service is in progress.
    Busy,
    Cancelled,
    /// Signed releases: the release is not signed by a key this host pins (no manifest).
    Unsigned,
    /// Signed releases: the release's manifest does not parse.
    MalformedManifest,
    /// Signed releases: the manifest is signed by a key this host does not pin for the service.
    UnknownKey,
    /// Signed releases: the manifest's signature does not verify.
    BadSignature,
    /// Signed releases: the manifest is for another service.
    OtherService,
    /// Signed releases: the manifest is for another release.
    OtherRelease,
    /// Signed releases: the artifact's sha256 differs from the manifest's.
    SignedHashMismatch,
    /// Signed releases: the artifact's size differs from the manifest's.
    SignedSizeMismatch,
    /// Signed releases: the manifest has expired.
    Expired,
    /// Signed releases: the manifest's release counter is below the host's floor for the service.
    BelowFloor,
    /// The order's coordinator epoch is older than one the host already accepted.
    ReplayedOrder,
    /// The release's URL is not under a prefix the agent allows.
    UrlNotAllowed,
    /// Draining the host would leave its load-balancer backend with no serving server.
    LastServingServer,
    /// A hook of the incoming release failed: `validate` (nothing was swapped) or `post-start`
    /// (the host rolled back).
    HookFailed,
    /// The artifact is a release bundle the agent refuses (unsafe path, link, no binary, …).
    BadBundle,
}

impl ResultCode {
    /// The code as operators read it in host details: `busy`, `stale_order`, `unhealthy`, …
    pub fn as_str(self) -> &'static str {
        match self {
            ResultCode::Unspecified => "unspecified",
            ResultCode::Ok => "ok",
            ResultCode::HashMismatch => "hash_mismatch",
            ResultCode::SizeMismatch => "size_mismatch",
            ResultCode::InsufficientSpace => "insufficient_space",
            ResultCode::DownloadFailed => "download_failed",
            ResultCode::UnknownService => "unknown_service",
            ResultCode::UnknownRelease => "unknown_release",
            ResultCode::ServiceFailedToStart => "service_failed_to_start",
            ResultCode::Unhealthy => "unhealthy",
            ResultCode::ConfirmTimeout => "confirm_timeout",
            ResultCode::StaleOrder => "stale_order",
            ResultCode::InvalidOrder => "invalid_order",
            ResultCode::IoError => "io_error",
            ResultCode::Busy => "busy",
            ResultCode::Cancelled => "cancelled",
            ResultCode::Unsigned => "unsigned",
            ResultCode::MalformedManifest => "malformed_manifest",
            ResultCode::UnknownKey => "unknown_key",
            ResultCode::BadSignature => "bad_signature",
            ResultCode::OtherService => "other_service",
            ResultCode::OtherRelease => "other_release",
            ResultCode::SignedHashMismatch => "signed_hash_mismatch",
            ResultCode::SignedSizeMismatch => "signed_size_mismatch",
            ResultCode::Expired => "expired",
            ResultCode::BelowFloor => "below_floor",
            ResultCode::ReplayedOrder => "replayed_order",
            ResultCode::UrlNotAllowed => "url_not_allowed",
            ResultCode::LastServingServer => "last_serving_server",
            ResultCode::HookFailed => "hook_failed",
            ResultCode::BadBundle => "bad_bundle",
        }
    }
}

/// What a service on a host is doing, from the agent's inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceState {
    /// Not reported (a service the coordinator only learnt of from an order result).
    Unknown,
    /// No release installed yet.
    Empty,
    /// The current release is running (and confirmed, if it was activated recently).
    Running,
    /// The current release is not running.
    Stopped,
    /// A release is being staged.
    Staging,
    /// A release is being swapped in.
    Activating,
    /// A release was activated and waits for a confirm order.
    AwaitingConfirm,
    /// The agent is restoring an earlier release.
    RollingBack,
}

/// What the coordinator knows of one service on one host, from the agent's hello and results.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSnapshot {
    /// Release `current` points at; `None` when nothing is installed.
    pub current_release: Option<ReleaseId>,
    /// The release a rollback without a target would restore.
    pub previous_release: Option<ReleaseId>,
    /// Complete, verified releases on disk.
    pub kept_releases: Vec<ReleaseId>,
    /// What the service is doing, as last reported.
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
    /// The service's request counter (only grows; HAProxy's `stot` of the host's server), when
    /// its agent has one: the request gate counts its increase during a bake.
    pub requests_total: Option<u64>,
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

/// Which [`FleetEvent`]s a subscriber wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Every event, every health report included: a running rollout gates on them.
    Everything,
    /// Hosts up and down, order results, and only the health reports that change what the
    /// fleet knows of a service (its verdict), or that are about another release than the one
    /// the host is known to run. A settled rollout needs nothing more: in a steady fleet, where
    /// every report repeats the last, such a subscriber is never woken.
    Changes,
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
    /// Messages queued to a connected host that its stream has not taken yet (0 when it is not
    /// connected). An order sent again while its first copy still waits there would only reach
    /// the agent twice.
    fn queued(&self, host: &HostId) -> usize {
        let _ = host;
        0
    }
    /// Every event from now on. A receiver that lags must resynchronise from [`Fleet::snapshot`].
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FleetEvent>;
    /// Moves the subscription `old` to the events of `interest`, losing and repeating none:
    /// returns the new receiver and how many events `old` still holds from before the new one
    /// starts. Read exactly those from `old`, then drop it and read the new one. `None`: this
    /// fleet has a single stream of events (keep reading `old`).
    fn resubscribe(
        &self,
        old: &tokio::sync::broadcast::Receiver<FleetEvent>,
        interest: Interest,
    ) -> Option<(tokio::sync::broadcast::Receiver<FleetEvent>, usize)> {
        let _ = (old, interest);
        None
    }
}
