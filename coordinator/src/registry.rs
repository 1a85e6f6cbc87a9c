//! The host registry: every agent the coordinator has heard from, and the way to reach it.
//!
//! Agent streams ([`crate::agent_service`]) feed it validated messages; the rollout engine reads it
//! through the [`Fleet`] trait. Per host it keeps the inventory from the agent's hello, kept up to
//! date by order results and health reports (only the latest report per service), when the host
//! was last heard from, and the sending half of its open stream. Every change that matters to a
//! rollout is broadcast as a [`FleetEvent`], on two channels: every event ([`Interest::Everything`],
//! for running rollouts, which gate on health reports) and only the changes
//! ([`Interest::Changes`], for settled rollouts: a health report that repeats the last is not
//! one). An event no subscriber wants is not even built. Events are sent only with the hosts
//! lock held, so [`Fleet::resubscribe`] cuts a subscription over from one channel to the other
//! exactly, losing and repeating nothing.
//!
//! A host is *connected* while its stream is open and messages keep arriving. When no message
//! arrived for `unreachable_after`, the reaper marks it unreachable ([`FleetEvent::HostDown`]) and
//! closes its stream, so the agent reconnects and says hello with a fresh inventory. A second
//! stream from the same host replaces the first one.
//!
//! Wire types stop here: [`validate_hello`], [`validate_health`] and [`validate_result`] turn
//! them into the domain types of [`crate::fleet`], naming the offending field on failure.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indexmap::IndexMap;
use serin_proto::wire::{self, CheckKind};
use serin_proto::{HoldConfirm, HostId, Order, ReleaseId, ServiceName, ValidationError};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::fleet::{
    Fleet, FleetEvent, HealthSample, HostSnapshot, Interest, OrderOutcome, OrderPhase, ResultCode,
    ServiceSnapshot, ServiceState,
};
use crate::selector::Selector;

/// What goes down an agent's stream: a message, or the error that ends the stream.
///
/// Boxed: a queue's storage is allocated in blocks of 32 slots as soon as the stream opens, and
/// an unboxed message is over 200 bytes; boxed, an idle agent's queue costs 512 bytes, not 6.5 KiB.
pub type Outbound = Result<Box<wire::CoordinatorMessage>, tonic::Status>;

/// How the registry behaves.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// No message for this long: the host is unreachable and its stream is closed.
    pub unreachable_after: Duration,
    /// Messages queued to one agent before the agent counts as stuck and is disconnected.
    pub order_queue: usize,
    /// Events buffered for slow receivers of every event ([`Interest::Everything`], running
    /// rollouts) before they lag.
    pub event_capacity: usize,
    /// Events buffered for slow receivers of the changes only ([`Interest::Changes`], settled
    /// rollouts) before they lag.
    pub change_capacity: usize,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            unreachable_after: Duration::from_secs(6),
            order_queue: 1024,
            // A wave of 20,000 hosts answers with ~40,000 results in well under a second, while
            // the rollout task's forwarder shares two cores with every connection: the buffer
            // holds such a burst (16 Ki made a 19,900-host broadcast lag and resynchronise).
            event_capacity: 64 * 1024,
            // A channel's slots are allocated when it is made (~200 bytes each: 64 Ki slots hold
            // 13 MiB). A settled rollout has nothing in flight, so a lag costs it one snapshot
            // and no re-sends: a small buffer is enough for it.
            change_capacity: 4 * 1024,
        }
    }
}

/// Current time as Unix milliseconds (for display and reports; deadlines use [`Instant`]).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The open stream of a connected host.
struct Connection {
    id: u64,
    tx: mpsc::Sender<Outbound>,
    /// Cancelled when the registry closes the stream (replaced, silent, stuck).
    kick: CancellationToken,
}

/// What the registry keeps per host, compact: a registry holds tens of thousands of these.
///
/// Exact-size slices and vectors instead of maps (a `BTreeMap` allocates room for eleven
/// entries for one service or two labels); [`HostEntry::snapshot`] builds the engine's
/// [`HostSnapshot`] on demand. The host is connected iff `conn` is set.
struct HostEntry {
    hostname: Box<str>,
    /// The hello's labels, sorted by key.
    labels: Box<[(Box<str>, Box<str>)]>,
    agent_version: Box<str>,
    last_seen_unix_ms: u64,
    /// By service name, sorted.
    services: Vec<(ServiceName, ServiceSnapshot)>,
    /// Latest report per service, bounded (for `serin hosts`).
    health: Vec<(ServiceName, wire::HealthReport)>,
    last_seen: Instant,
    /// Whether the host has a deadline in [`Hosts::due`] (at most one).
    queued: bool,
    conn: Option<Connection>,
}

impl HostEntry {
    fn new(s: HostSnapshot, now: Instant) -> Self {
        let mut e = Self {
            hostname: Box::default(),
            labels: Box::default(),
            agent_version: Box::default(),
            last_seen_unix_ms: 0,
            services: Vec::new(),
            health: Vec::new(),
            last_seen: now,
            queued: false,
            conn: None,
        };
        e.take_hello(s);
        e
    }

    /// Replaces what the host said about itself with a new hello's content.
    fn take_hello(&mut self, s: HostSnapshot) {
        self.hostname = s.hostname.into_boxed_str();
        self.labels = s
            .labels
            .into_iter()
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        self.agent_version = s.agent_version.into_boxed_str();
        self.last_seen_unix_ms = s.last_seen_unix_ms;
        let mut services: Vec<_> = s.services.into_iter().collect();
        services.shrink_to_fit();
        self.services = services;
        // Drop health of services the agent no longer manages.
        let services = &self.services;
        self.health
            .retain(|(svc, _)| services.iter().any(|(name, _)| name == svc));
        self.health.shrink_to_fit();
    }

    fn labels(&self) -> BTreeMap<String, String> {
        self.labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn snapshot(&self, id: &HostId) -> HostSnapshot {
        HostSnapshot {
            host_id: id.clone(),
            hostname: self.hostname.to_string(),
            labels: self.labels(),
            connected: self.conn.is_some(),
            last_seen_unix_ms: self.last_seen_unix_ms,
            agent_version: self.agent_version.to_string(),
            services: self.services.iter().cloned().collect(),
        }
    }

    /// The service's snapshot, created empty when the host did not list it.
    fn service_mut(&mut self, name: &ServiceName) -> &mut ServiceSnapshot {
        let i = match self.services.binary_search_by(|(n, _)| n.cmp(name)) {
            Ok(i) => i,
            Err(i) => {
                self.services.insert(i, (name.clone(), empty_service()));
                i
            }
        };
        &mut self.services[i].1
    }

    /// Whether the host's hello listed `name`.
    fn lists(&self, name: &ServiceName) -> bool {
        self.services.binary_search_by(|(n, _)| n.cmp(name)).is_ok()
    }

    fn set_health(&mut self, name: &ServiceName, report: wire::HealthReport) {
        match self.health.binary_search_by(|(n, _)| n.cmp(name)) {
            Ok(i) => self.health[i].1 = report,
            Err(i) => self.health.insert(i, (name.clone(), report)),
        }
    }
}

/// Every host the registry knows, and the indexes over them, behind the registry's one lock.
///
/// Hosts are found by id through a hash table (every message of every agent looks its host up:
/// a `BTreeMap` spent ~15 string comparisons on each) over entries kept densely in arrival order
/// (an `IndexMap`: walks over every host, as `ListHosts` summaries do, read one array); the
/// ordered walks (`ListHosts` pages, [`Fleet::snapshot`]) go through `ordered`. Hosts are never
/// forgotten (nothing is removed, so indexes never move), and `ordered` only grows on a host's
/// first hello.
#[derive(Default)]
struct Hosts {
    by_id: IndexMap<HostId, HostEntry, foldhash::fast::RandomState>,
    /// Every key of `by_id`, in id order.
    ordered: BTreeSet<HostId>,
    /// The reaper's deadline queue, earliest first: at most one entry per host (its
    /// [`HostEntry::queued`]), never later than the host's `last_seen + unreachable_after`.
    /// A message does not move its host's entry (that would cost every message a heap
    /// operation); the reaper re-arms an entry that comes due for a host that has spoken since,
    /// so a reap costs the hosts that came due, about `hosts / unreachable_after` a second,
    /// not the whole registry.
    due: BinaryHeap<Reverse<(Instant, HostId)>>,
}

impl Hosts {
    fn get(&self, id: &HostId) -> Option<&HostEntry> {
        self.by_id.get(id)
    }

    fn get_mut(&mut self, id: &HostId) -> Option<&mut HostEntry> {
        self.by_id.get_mut(id)
    }

    /// Every host, in id order.
    fn iter_ordered(&self) -> impl Iterator<Item = (&HostId, &HostEntry)> {
        self.ordered
            .iter()
            .filter_map(|id| self.by_id.get(id).map(|e| (id, e)))
    }

    /// Queues the reaper's deadline of host `id` at `last_seen + after`, unless it has one.
    fn arm(&mut self, id: &HostId, after: Duration) {
        let Some(entry) = self.by_id.get_mut(id) else {
            return;
        };
        if entry.queued {
            return;
        }
        // An `unreachable_after` beyond the clock's range: never due.
        if let Some(at) = entry.last_seen.checked_add(after) {
            entry.queued = true;
            self.due.push(Reverse((at, id.clone())));
        }
    }
}

/// An agent stream registered with the registry.
#[derive(Debug)]
pub struct Attachment {
    /// The host, as validated from its hello.
    pub host: HostId,
    /// Identifies this stream among the host's successive streams.
    pub conn_id: u64,
    /// Cancelled when the registry wants this stream closed; the reason is in [`Registry::detach`]
    /// logs and in the error sent down the stream.
    pub kicked: CancellationToken,
}

/// A message from an agent could not be taken in.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The stream was replaced or closed by the registry; the caller should end it.
    #[error("stream {conn_id} of host {host} is no longer current")]
    NotCurrent { host: HostId, conn_id: u64 },
    /// The message was invalid; it is dropped, the stream stays open.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

/// The registry of hosts; implements [`Fleet`].
pub struct Registry {
    settings: RegistrySettings,
    hosts: Mutex<Hosts>,
    /// Every event ([`Interest::Everything`]).
    events: broadcast::Sender<FleetEvent>,
    /// Only the changes ([`Interest::Changes`]).
    changes: broadcast::Sender<FleetEvent>,
    next_conn: AtomicU64,
    /// This coordinator run's epoch, stamped on every order sent (0 until set).
    epoch: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new(settings: RegistrySettings) -> Self {
        let (events, _) = broadcast::channel(settings.event_capacity.max(16));
        let (changes, _) = broadcast::channel(settings.change_capacity.max(16));
        Self {
            settings,
            hosts: Mutex::new(Hosts::default()),
            events,
            changes,
            next_conn: AtomicU64::new(1),
            epoch: AtomicU64::new(0),
        }
    }

    /// Sets the epoch stamped on every order from now on.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// The settings in force.
    pub fn settings(&self) -> &RegistrySettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hosts> {
        // Every critical section leaves the map consistent before anything can panic, so a
        // poisoned lock is safe to recover.
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the event `make` builds to the subscribers that want it: all of them when it is a
    /// `change`, else only those of [`Interest::Everything`]. Nothing is built when nobody wants
    /// it (a settled fleet's health reports). Called only with the hosts lock held: the order of
    /// events is the order of the registry's changes, and [`Fleet::resubscribe`] cuts exactly.
    fn emit(&self, change: bool, make: impl FnOnce() -> FleetEvent) {
        // No subscriber is fine: nobody is rolling anything out.
        let everything = self.events.receiver_count() > 0;
        let changes = change && self.changes.receiver_count() > 0;
        match (everything, changes) {
            (false, false) => {}
            (true, false) => {
                let _ = self.events.send(make());
            }
            (false, true) => {
                let _ = self.changes.send(make());
            }
            (true, true) => {
                let event = make();
                let _ = self.changes.send(event.clone());
                let _ = self.events.send(event);
            }
        }
    }

    /// Subscribers of each channel: `(every event, only the changes)` (tests and diagnostics).
    pub fn subscribers(&self) -> (usize, usize) {
        (self.events.receiver_count(), self.changes.receiver_count())
    }

    /// Registers a new stream for the host that sent `hello`. Messages for the agent go into
    /// `tx`. A previous stream of the same host is closed. Emits [`FleetEvent::HostUp`].
    pub fn attach(
        &self,
        hello: wire::Hello,
        tx: mpsc::Sender<Outbound>,
        now: Instant,
        now_ms: u64,
    ) -> Result<Attachment, ValidationError> {
        let snapshot = validate_hello(hello, now_ms)?;
        let host = snapshot.host_id.clone();
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let kick = CancellationToken::new();
        let conn = Connection {
            id: conn_id,
            tx,
            kick: kick.clone(),
        };
        {
            let mut guard = self.lock();
            let hosts = &mut *guard;
            let entry = match hosts.by_id.entry(host.clone()) {
                indexmap::map::Entry::Occupied(o) => o.into_mut(),
                indexmap::map::Entry::Vacant(v) => {
                    hosts.ordered.insert(host.clone());
                    v.insert(HostEntry::new(snapshot.clone(), now))
                }
            };
            if let Some(old) = entry.conn.take() {
                tracing::info!(host = %host, old = old.id, new = conn_id, "agent reconnected; closing its previous stream");
                old.kick.cancel();
            }
            entry.take_hello(snapshot.clone());
            entry.last_seen = entry.last_seen.max(now);
            entry.conn = Some(conn);
            hosts.arm(&host, self.settings.unreachable_after);
            self.emit(true, || FleetEvent::HostUp(snapshot));
        }
        Ok(Attachment {
            host,
            conn_id,
            kicked: kick,
        })
    }

    /// Takes in a message that arrived on stream `conn_id` of `host` (anything but the hello).
    pub fn record(
        &self,
        host: &HostId,
        conn_id: u64,
        body: wire::agent_message::Body,
        now: Instant,
        now_ms: u64,
    ) -> Result<(), RecordError> {
        use wire::agent_message::Body;
        let mut hosts = self.lock();
        let entry = match hosts.get_mut(host) {
            Some(e) if e.conn.as_ref().is_some_and(|c| c.id == conn_id) => e,
            _ => {
                return Err(RecordError::NotCurrent {
                    host: host.clone(),
                    conn_id,
                });
            }
        };
        // Any message is a sign of life, a heartbeat no more than a report or a result (the
        // agent sends a heartbeat only after an interval of silence). Concurrent streams may
        // take the lock out of their clocks' order: the latest time stands.
        entry.last_seen = entry.last_seen.max(now);
        entry.last_seen_unix_ms = now_ms;
        match body {
            Body::Hello(_) => {
                return Err(ValidationError::new(
                    "hello",
                    "only the first message of a stream may be a hello",
                )
                .into());
            }
            Body::Heartbeat(_) => {}
            Body::Health(report) => {
                let sample = validate_health(&report, now_ms)?;
                if !entry.lists(&sample.service) {
                    // Only the services of the hello are kept (hostile input: a stream naming
                    // endless new services must not grow the registry).
                    tracing::debug!(host = %host, service = %sample.service, "health report for a service not in the hello; dropped");
                    return Ok(());
                }
                let svc = entry.service_mut(&sample.service);
                // A late report about a release the service no longer runs says nothing of it.
                let of_current =
                    svc.current_release.is_none() || svc.current_release == sample.release;
                let before = svc.healthy;
                if of_current {
                    svc.healthy = verdict(report.verdict(), report.healthy);
                }
                // A report that repeats the verdict is no change (a steady fleet's reports);
                // one about another release is passed on to whoever listens for changes.
                let change = !of_current || svc.healthy != before;
                entry.set_health(&sample.service, compact_report(report));
                self.emit(change, || FleetEvent::Health {
                    host: host.clone(),
                    sample,
                });
            }
            Body::Result(result) => {
                let outcome = validate_result(result)?;
                // A result about a service the hello did not list (e.g. UNKNOWN_SERVICE) still
                // reaches the engine, but creates no service entry.
                if entry.lists(&outcome.service) {
                    apply_outcome(entry.service_mut(&outcome.service), &outcome);
                }
                self.emit(true, || FleetEvent::Result {
                    host: host.clone(),
                    outcome,
                });
            }
        }
        Ok(())
    }

    /// The stream `conn_id` of `host` ended. If it was the current one, the host is marked
    /// disconnected and [`FleetEvent::HostDown`] is emitted.
    pub fn detach(&self, host: &HostId, conn_id: u64) {
        let mut hosts = self.lock();
        let Some(entry) = hosts.get_mut(host) else {
            return;
        };
        if entry.conn.as_ref().is_some_and(|c| c.id == conn_id) {
            entry.conn = None;
            tracing::info!(host = %host, conn = conn_id, "agent disconnected");
            self.emit(true, || FleetEvent::HostDown { host: host.clone() });
        }
    }

    /// Marks every connected host that sent nothing for `unreachable_after` as unreachable and
    /// closes its stream. Returns the hosts it marked.
    ///
    /// Walks only the deadlines that came due (see [`Hosts::due`]), re-arming those of hosts that
    /// spoke since their deadline was set.
    pub fn reap(&self, now: Instant) -> Vec<HostId> {
        let after = self.settings.unreachable_after;
        let mut guard = self.lock();
        let hosts = &mut *guard;
        let mut reaped = Vec::new();
        // A deadline is never later than its host's `last_seen + after`: once the earliest is
        // not past, no host is silent for longer than `after`.
        while hosts.due.peek().is_some_and(|Reverse((at, _))| *at < now) {
            let Some(Reverse((_, id))) = hosts.due.pop() else {
                break;
            };
            let Some(entry) = hosts.by_id.get_mut(&id) else {
                continue;
            };
            entry.queued = false;
            if entry.conn.is_none() {
                // Disconnected: armed again by its next hello.
                continue;
            }
            let silent = now.saturating_duration_since(entry.last_seen);
            if silent <= after {
                // Spoke since: due again `after` its last message (never past: `silent <= after`).
                if let Some(at) = entry.last_seen.checked_add(after) {
                    entry.queued = true;
                    hosts.due.push(Reverse((at, id)));
                }
                continue;
            }
            if let Some(conn) = entry.conn.take() {
                conn.kick.cancel();
            }
            tracing::warn!(
                host = %id,
                silent_ms = silent.as_millis() as u64,
                "agent unreachable: no message within unreachable_after"
            );
            self.emit(true, || FleetEvent::HostDown { host: id.clone() });
            reaped.push(id);
        }
        reaped
    }

    /// Runs [`Registry::reap`] periodically until `shutdown` is cancelled.
    pub async fn run_reaper(&self, shutdown: CancellationToken) {
        let period = (self.settings.unreachable_after / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    self.reap(Instant::now());
                }
            }
        }
    }

    /// Closes `host`'s stream, if it has one (revocation); true when one was closed.
    pub fn kick(&self, host: &HostId) -> bool {
        match self.lock().get(host).and_then(|e| e.conn.as_ref()) {
            Some(c) => {
                c.kick.cancel();
                true
            }
            None => false,
        }
    }

    /// Closes every open stream (at shutdown).
    pub fn kick_all(&self) {
        for entry in self.lock().by_id.values() {
            if let Some(c) = &entry.conn {
                c.kick.cancel();
            }
        }
    }

    /// Hosts matching `selector`, as the control API shows them, ordered by host id.
    pub fn host_infos(&self, selector: &Selector) -> Vec<wire::HostInfo> {
        self.host_page(selector, None, usize::MAX).0
    }

    /// At most `limit` hosts matching `selector` with ids after `after` (from the first host
    /// without it), ordered by host id, and the id of the last one returned when more hosts may
    /// follow. Costs the page plus the hosts the selector skips, not the whole registry.
    pub fn host_page(
        &self,
        selector: &Selector,
        after: Option<&HostId>,
        limit: usize,
    ) -> (Vec<wire::HostInfo>, Option<HostId>) {
        use std::ops::Bound;
        let hosts = self.lock();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page = Vec::new();
        let mut last = None;
        for id in hosts.ordered.range::<HostId, _>((start, Bound::Unbounded)) {
            let Some(e) = hosts.get(id) else {
                continue;
            };
            if page.len() == limit {
                return (page, last);
            }
            let labels = e.labels();
            if !selector.matches(&labels) {
                continue;
            }
            last = Some(id.clone());
            page.push(host_info(id, e, labels));
        }
        (page, None)
    }

    /// Counts of every host matching `selector`: connected, service states, current releases
    /// and labels, each list the `top` most common keys (ties by key).
    pub fn host_summary(&self, selector: &Selector, top: usize) -> wire::HostsSummary {
        let mut summary = wire::HostsSummary::default();
        let mut states: HashMap<String, u64> = HashMap::new();
        let mut releases: HashMap<String, u64> = HashMap::new();
        let mut labels: HashMap<String, u64> = HashMap::new();
        for e in self.lock().by_id.values() {
            if !selector.is_empty() && !selector.matches(&e.labels()) {
                continue;
            }
            summary.hosts += 1;
            summary.connected += u64::from(e.conn.is_some());
            for (name, svc) in &e.services {
                let state = service_state_to_wire(svc.state).as_str_name();
                let state = state.trim_start_matches("SERVICE_STATE_").to_lowercase();
                *states.entry(format!("{name} {state}")).or_default() += 1;
                if let Some(release) = &svc.current_release {
                    *releases.entry(format!("{name}={release}")).or_default() += 1;
                }
            }
            for (k, v) in &e.labels {
                *labels.entry(format!("{k}={v}")).or_default() += 1;
            }
        }
        (summary.states, summary.states_left_off) = most_common(states, top);
        (summary.releases, summary.releases_left_off) = most_common(releases, top);
        (summary.labels, summary.labels_left_off) = most_common(labels, top);
        summary
    }
}

/// The `top` largest counts, most common first (ties by key), and how many keys were left off.
fn most_common(counts: HashMap<String, u64>, top: usize) -> (Vec<wire::SummaryCount>, u32) {
    let mut all: Vec<_> = counts.into_iter().collect();
    all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let left_off = u32::try_from(all.len().saturating_sub(top)).unwrap_or(u32::MAX);
    all.truncate(top);
    let kept = all
        .into_iter()
        .map(|(key, count)| wire::SummaryCount { key, count })
        .collect();
    (kept, left_off)
}

/// One host as the control API shows it.
fn host_info(id: &HostId, e: &HostEntry, labels: BTreeMap<String, String>) -> wire::HostInfo {
    wire::HostInfo {
        host_id: id.to_string(),
        hostname: e.hostname.to_string(),
        labels: labels.into_iter().collect::<HashMap<_, _>>(),
        connected: e.conn.is_some(),
        last_seen_unix_ms: e.last_seen_unix_ms,
        agent_version: e.agent_version.to_string(),
        services: e
            .services
            .iter()
            .map(|(name, svc)| inventory_of(name, svc))
            .collect(),
        health: e.health.iter().map(|(_, h)| h.clone()).collect(),
    }
}

impl Registry {
    /// Queues one message on a connected host's stream. A full stream means the agent is not
    /// reading it: the stream is closed, the agent reconnects and says hello with its inventory,
    /// and the engine re-sends what is still wanted.
    fn queue(
        &self,
        host: &HostId,
        body: wire::coordinator_message::Body,
        kind: &'static str,
        seq: u64,
    ) -> bool {
        let mut hosts = self.lock();
        let Some(entry) = hosts.get_mut(host) else {
            return false;
        };
        let Some(conn) = &entry.conn else {
            return false;
        };
        let is_order = matches!(body, wire::coordinator_message::Body::Order(_));
        let msg = Box::new(wire::CoordinatorMessage { body: Some(body) });
        if is_order && let Some(chaos) = crate::fault::chaos() {
            // Test builds only: the order may be dropped, duplicated, delayed or reordered on
            // its way, as a lossy network would; the engine must recover by itself.
            let tx = conn.tx.clone();
            chaos.deliver(
                host.as_str(),
                &format!("{kind} order seq {seq}"),
                std::sync::Arc::new(move || {
                    let _ = tx.try_send(Ok(msg.clone()));
                }),
            );
            return true;
        }
        match conn.tx.try_send(Ok(msg)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(host = %host, seq, kind, "agent stream is full; disconnecting the agent");
                if let Some(conn) = entry.conn.take() {
                    conn.kick.cancel();
                }
                self.emit(true, || FleetEvent::HostDown { host: host.clone() });
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl Fleet for Registry {
    /// Every host, in id order (plans are made from it: the same fleet, the same plan).
    fn snapshot(&self) -> Vec<HostSnapshot> {
        self.lock()
            .iter_ordered()
            .map(|(id, e)| e.snapshot(id))
            .collect()
    }

    fn host(&self, id: &HostId) -> Option<HostSnapshot> {
        self.lock().get(id).map(|e| e.snapshot(id))
    }

    fn send(&self, host: &HostId, order: Order) -> bool {
        let (seq, kind, service) = (order.seq, order.action.kind(), order.service.clone());
        let queued = self.queue(
            host,
            wire::coordinator_message::Body::Order(wire::Order {
                epoch: self.epoch.load(Ordering::SeqCst),
                ..order.into()
            }),
            kind,
            seq,
        );
        if queued {
            tracing::debug!(host = %host, service = %service, seq, kind, "order queued");
        }
        queued
    }

    fn hold(&self, host: &HostId, hold: HoldConfirm) -> bool {
        let service = hold.service.clone();
        let queued = self.queue(
            host,
            wire::coordinator_message::Body::Hold(hold.into()),
            "hold",
            0,
        );
        if queued {
            tracing::debug!(host = %host, service = %service, "hold queued");
        }
        queued
    }

    fn queued(&self, host: &HostId) -> usize {
        self.lock()
            .get(host)
            .and_then(|h| h.conn.as_ref())
            .map_or(0, |c| c.tx.max_capacity() - c.tx.capacity())
    }

    fn subscribe(&self) -> broadcast::Receiver<FleetEvent> {
        self.events.subscribe()
    }

    fn resubscribe(
        &self,
        old: &broadcast::Receiver<FleetEvent>,
        interest: Interest,
    ) -> Option<(broadcast::Receiver<FleetEvent>, usize)> {
        // Events are sent only with this lock held: everything before the new receiver starts
        // is among the `old.len()` events `old` still holds, everything after is in the new one.
        let _hosts = self.lock();
        let new = match interest {
            Interest::Everything => self.events.subscribe(),
            Interest::Changes => self.changes.subscribe(),
        };
        Some((new, old.len()))
    }
}

fn empty_service() -> ServiceSnapshot {
    ServiceSnapshot {
        current_release: None,
        previous_release: None,
        kept_releases: Vec::new(),
        state: ServiceState::Unknown,
        healthy: None,
        last_seq: 0,
    }
}

/// Folds an order result into what we know of the service.
fn apply_outcome(svc: &mut ServiceSnapshot, o: &OrderOutcome) {
    if o.phase != OrderPhase::Rejected {
        svc.last_seq = svc.last_seq.max(o.seq);
    }
    let swapped = matches!(o.phase, OrderPhase::Activated | OrderPhase::RolledBack);
    if swapped || o.current_release.is_some() {
        if swapped && svc.current_release != o.current_release {
            svc.previous_release = svc.current_release.take();
        }
        svc.current_release = o.current_release.clone();
    }
    if swapped {
        // The service was restarted on another release: no verdict about the process before it
        // speaks for this one (issue 8 #9). Pending until the agent reports on the new process.
        svc.healthy = None;
    }
    if let Some(r) = &o.release
        && matches!(o.phase, OrderPhase::Staged | OrderPhase::Activated)
        && !svc.kept_releases.contains(r)
    {
        svc.kept_releases.push(r.clone());
    }
    match o.phase {
        OrderPhase::Activated => svc.state = ServiceState::AwaitingConfirm,
        OrderPhase::Confirmed | OrderPhase::RolledBack => svc.state = ServiceState::Running,
        _ => {}
    }
}

fn inventory_of(name: &ServiceName, s: &ServiceSnapshot) -> wire::ServiceInventory {
    wire::ServiceInventory {
        service: name.to_string(),
        current_release: s
            .current_release
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        kept_releases: s.kept_releases.iter().map(ToString::to_string).collect(),
        state: service_state_to_wire(s.state) as i32,
        healthy: s.healthy.unwrap_or(false),
        previous_release: s
            .previous_release
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        last_seq: s.last_seq,
        last_epoch: 0,
        verdict: match s.healthy {
            Some(true) => wire::HealthVerdict::Passing,
            Some(false) => wire::HealthVerdict::Failing,
            None => wire::HealthVerdict::Pending,
        } as i32,
    }
}

/// Printable text of at most `max` bytes.
fn text(field: &str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.len() > max {
        return Err(ValidationError::new(
            field,
            format!("is {} bytes long, at most {max} allowed", s.len()),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Cuts `s` to at most `max` bytes on a character boundary (for free-form messages, which are
/// shown, never interpreted).
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn opt_release(field: &str, s: &str) -> Result<Option<ReleaseId>, ValidationError> {
    if s.is_empty() {
        Ok(None)
    } else {
        ReleaseId::new(s).map(Some).map_err(|e| e.within(field))
    }
}

/// Checks of one health report kept for display; the sample keeps the counts of all of them.
pub const MAX_KEPT_CHECKS: usize = 32;
/// Bytes of a check's detail kept for display.
pub const MAX_CHECK_DETAIL: usize = 256;

/// The part of a health report worth keeping per host: bounded check list and details.
fn compact_report(mut r: wire::HealthReport) -> wire::HealthReport {
    r.checks.truncate(MAX_KEPT_CHECKS);
    for c in &mut r.checks {
        c.name = truncate(std::mem::take(&mut c.name), MAX_CHECK_DETAIL);
        c.detail = truncate(std::mem::take(&mut c.detail), MAX_CHECK_DETAIL);
    }
    r
}

/// Most services one hello may list; a larger inventory is a bug or an attack.
pub const MAX_SERVICES_PER_HOST: usize = 256;
/// Most labels one host may carry.
pub const MAX_LABELS_PER_HOST: usize = 64;
/// Most kept releases one service may list.
pub const MAX_KEPT_RELEASES: usize = 64;

/// Validates an agent's hello into a connected [`HostSnapshot`].
pub fn validate_hello(h: wire::Hello, now_ms: u64) -> Result<HostSnapshot, ValidationError> {
    let host_id = HostId::new(h.host_id).map_err(|e| e.within("hello"))?;
    text("hello.hostname", &h.hostname, 253)?;
    text("hello.agent_version", &h.agent_version, 64)?;
    if h.labels.len() > MAX_LABELS_PER_HOST {
        return Err(ValidationError::new(
            "hello.labels",
            format!(
                "{} labels, at most {MAX_LABELS_PER_HOST} allowed",
                h.labels.len()
            ),
        ));
    }
    let mut labels = BTreeMap::new();
    for (k, v) in h.labels {
        serin_proto::validate_label("hello.labels", &k, &v)?;
        labels.insert(k, v);
    }
    if h.services.len() > MAX_SERVICES_PER_HOST {
        return Err(ValidationError::new(
            "hello.services",
            format!(
                "{} services, at most {MAX_SERVICES_PER_HOST} allowed",
                h.services.len()
            ),
        ));
    }
    let mut services = BTreeMap::new();
    for (i, inv) in h.services.into_iter().enumerate() {
        let field = format!("hello.services[{i}]");
        let name = ServiceName::new(&inv.service).map_err(|e| e.within(&field))?;
        let state = wire::ServiceState::try_from(inv.state)
            .map(service_state_from_wire)
            .map_err(|_| {
                ValidationError::new(
                    format!("{field}.state"),
                    format!("unknown state {}", inv.state),
                )
            })?;
        if inv.kept_releases.len() > MAX_KEPT_RELEASES {
            return Err(ValidationError::new(
                format!("{field}.kept_releases"),
                format!("at most {MAX_KEPT_RELEASES} allowed"),
            ));
        }
        let kept_releases = inv
            .kept_releases
            .iter()
            .map(|r| ReleaseId::new(r).map_err(|e| e.within(&format!("{field}.kept_releases"))))
            .collect::<Result<Vec<_>, _>>()?;
        let snap = ServiceSnapshot {
            current_release: opt_release(
                &format!("{field}.current_release"),
                &inv.current_release,
            )?,
            previous_release: opt_release(
                &format!("{field}.previous_release"),
                &inv.previous_release,
            )?,
            kept_releases,
            state,
            healthy: verdict(inv.verdict(), inv.healthy),
            last_seq: bounded_seq(&format!("{field}.last_seq"), inv.last_seq)?,
        };
        if services.insert(name.clone(), snap).is_some() {
            return Err(ValidationError::new(
                format!("{field}.service"),
                format!("service {name} is listed twice"),
            ));
        }
    }
    let hostname = if h.hostname.is_empty() {
        host_id.to_string()
    } else {
        h.hostname
    };
    Ok(HostSnapshot {
        host_id,
        hostname,
        labels,
        connected: true,
        last_seen_unix_ms: now_ms,
        agent_version: h.agent_version,
        services,
    })
}

/// A service's health as the engine reads it: `None` while the agent has no verdict yet (its checks
/// have not all reported since the process started), so a host that has just restarted its release
/// is never taken for unhealthy. An older agent sends no verdict: its `healthy` flag stands.
fn verdict(verdict: wire::HealthVerdict, healthy: bool) -> Option<bool> {
    match verdict {
        wire::HealthVerdict::Passing => Some(true),
        wire::HealthVerdict::Failing => Some(false),
        wire::HealthVerdict::Pending => None,
        wire::HealthVerdict::Unspecified => Some(healthy),
    }
}

/// Validates a health report into a [`HealthSample`]; a report without a time gets `now_ms`.
pub fn validate_health(
    r: &wire::HealthReport,
    now_ms: u64,
) -> Result<HealthSample, ValidationError> {
    let service = ServiceName::new(&r.service).map_err(|e| e.within("health"))?;
    let release = opt_release("health.release", &r.release)?;
    if r.checks.len() > 1024 {
        return Err(ValidationError::new(
            "health.checks",
            "at most 1024 checks allowed",
        ));
    }
    let checks_passing = r.checks.iter().filter(|c| c.passing).count() as u32;
    let probe_latency_us = r
        .checks
        .iter()
        .find(|c| matches!(c.kind(), CheckKind::Http | CheckKind::Tcp) && c.latency_us > 0)
        .map(|c| c.latency_us);
    let process = r.process.unwrap_or_default();
    let cpu_percent = if process.cpu_percent.is_finite() {
        process.cpu_percent.max(0.0)
    } else {
        0.0
    };
    Ok(HealthSample {
        service,
        release,
        healthy: r.healthy,
        checks_passing,
        checks_total: r.checks.len() as u32,
        probe_latency_us,
        restarts: process.restarts,
        cpu_percent,
        rss_bytes: process.rss_bytes,
        observed_unix_ms: if r.observed_unix_ms == 0 {
            now_ms
        } else {
            r.observed_unix_ms
        },
        requests_total: r.requests_total,
    })
}

/// Validates an order result into an [`OrderOutcome`].
pub fn validate_result(r: wire::OrderResult) -> Result<OrderOutcome, ValidationError> {
    text("result.order_id", &r.order_id, 128)?;
    text("result.rollout_id", &r.rollout_id, 128)?;
    let service = ServiceName::new(&r.service).map_err(|e| e.within("result"))?;
    let release = opt_release("result.release", &r.release)?;
    let current_release = opt_release("result.current_release", &r.current_release)?;
    let phase = wire::OrderPhase::try_from(r.phase)
        .map_err(|_| ValidationError::new("result.phase", format!("unknown phase {}", r.phase)))?;
    let phase = order_phase_from_wire(phase)
        .ok_or_else(|| ValidationError::new("result.phase", "must be set"))?;
    let code = wire::ResultCode::try_from(r.code)
        .map(result_code_from_wire)
        .map_err(|_| ValidationError::new("result.code", format!("unknown code {}", r.code)))?;
    Ok(OrderOutcome {
        order_id: r.order_id,
        rollout_id: r.rollout_id,
        seq: r.seq,
        service,
        release,
        phase,
        code,
        message: truncate(r.message, 4096),
        current_release,
        last_seq: bounded_seq("result.last_seq", r.last_seq)?,
    })
}

/// The engine's [`OrderPhase`] for a wire phase; `None` for "unspecified" (refused).
fn order_phase_from_wire(p: wire::OrderPhase) -> Option<OrderPhase> {
    Some(match p {
        wire::OrderPhase::Unspecified => return None,
        wire::OrderPhase::Progress => OrderPhase::Progress,
        wire::OrderPhase::Staged => OrderPhase::Staged,
        wire::OrderPhase::Activated => OrderPhase::Activated,
        wire::OrderPhase::Healthy => OrderPhase::Healthy,
        wire::OrderPhase::Confirmed => OrderPhase::Confirmed,
        wire::OrderPhase::RolledBack => OrderPhase::RolledBack,
        wire::OrderPhase::Cancelled => OrderPhase::Cancelled,
        wire::OrderPhase::Failed => OrderPhase::Failed,
        wire::OrderPhase::Rejected => OrderPhase::Rejected,
    })
}

/// The engine's [`ResultCode`] for a wire code.
fn result_code_from_wire(c: wire::ResultCode) -> ResultCode {
    match c {
        wire::ResultCode::Unspecified => ResultCode::Unspecified,
        wire::ResultCode::Ok => ResultCode::Ok,
        wire::ResultCode::HashMismatch => ResultCode::HashMismatch,
        wire::ResultCode::SizeMismatch => ResultCode::SizeMismatch,
        wire::ResultCode::InsufficientSpace => ResultCode::InsufficientSpace,
        wire::ResultCode::DownloadFailed => ResultCode::DownloadFailed,
        wire::ResultCode::UnknownService => ResultCode::UnknownService,
        wire::ResultCode::UnknownRelease => ResultCode::UnknownRelease,
        wire::ResultCode::ServiceFailedToStart => ResultCode::ServiceFailedToStart,
        wire::ResultCode::Unhealthy => ResultCode::Unhealthy,
        wire::ResultCode::ConfirmTimeout => ResultCode::ConfirmTimeout,
        wire::ResultCode::StaleOrder => ResultCode::StaleOrder,
        wire::ResultCode::InvalidOrder => ResultCode::InvalidOrder,
        wire::ResultCode::IoError => ResultCode::IoError,
        wire::ResultCode::Busy => ResultCode::Busy,
        wire::ResultCode::Cancelled => ResultCode::Cancelled,
        wire::ResultCode::Unsigned => ResultCode::Unsigned,
        wire::ResultCode::MalformedManifest => ResultCode::MalformedManifest,
        wire::ResultCode::UnknownKey => ResultCode::UnknownKey,
        wire::ResultCode::BadSignature => ResultCode::BadSignature,
        wire::ResultCode::OtherService => ResultCode::OtherService,
        wire::ResultCode::OtherRelease => ResultCode::OtherRelease,
        wire::ResultCode::SignedHashMismatch => ResultCode::SignedHashMismatch,
        wire::ResultCode::SignedSizeMismatch => ResultCode::SignedSizeMismatch,
        wire::ResultCode::Expired => ResultCode::Expired,
        wire::ResultCode::BelowFloor => ResultCode::BelowFloor,
        wire::ResultCode::ReplayedOrder => ResultCode::ReplayedOrder,
        wire::ResultCode::UrlNotAllowed => ResultCode::UrlNotAllowed,
        wire::ResultCode::LastServingServer => ResultCode::LastServingServer,
        wire::ResultCode::HookFailed => ResultCode::HookFailed,
        wire::ResultCode::BadBundle => ResultCode::BadBundle,
    }
}

/// The fleet's [`ServiceState`] for a wire state ("unspecified" is [`ServiceState::Unknown`]).
fn service_state_from_wire(s: wire::ServiceState) -> ServiceState {
    match s {
        wire::ServiceState::Unspecified => ServiceState::Unknown,
        wire::ServiceState::Empty => ServiceState::Empty,
        wire::ServiceState::Running => ServiceState::Running,
        wire::ServiceState::Stopped => ServiceState::Stopped,
        wire::ServiceState::Staging => ServiceState::Staging,
        wire::ServiceState::Activating => ServiceState::Activating,
        wire::ServiceState::AwaitingConfirm => ServiceState::AwaitingConfirm,
        wire::ServiceState::RollingBack => ServiceState::RollingBack,
    }
}

/// The wire state of a fleet [`ServiceState`] (for `ListHosts`).
fn service_state_to_wire(s: ServiceState) -> wire::ServiceState {
    match s {
        ServiceState::Unknown => wire::ServiceState::Unspecified,
        ServiceState::Empty => wire::ServiceState::Empty,
        ServiceState::Running => wire::ServiceState::Running,
        ServiceState::Stopped => wire::ServiceState::Stopped,
        ServiceState::Staging => wire::ServiceState::Staging,
        ServiceState::Activating => wire::ServiceState::Activating,
        ServiceState::AwaitingConfirm => wire::ServiceState::AwaitingConfirm,
        ServiceState::RollingBack => wire::ServiceState::RollingBack,
    }
}

/// A sequence reported by an agent: at most [`serin_proto::MAX_ORDER_SEQ`]. A value near the
/// type's end would push the host's order counter where no later order fits (issue 7).
fn bounded_seq(field: &str, seq: u64) -> Result<u64, ValidationError> {
    if seq > serin_proto::MAX_ORDER_SEQ {
        return Err(ValidationError::new(
            field,
            format!("{seq} exceeds the limit of {}", serin_proto::MAX_ORDER_SEQ),
        ));
    }
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serin_proto::OrderAction;
    use serin_proto::wire::agent_message::Body;
    use std::sync::Arc;

    fn hello(host: &str, labels: &[(&str, &str)]) -> wire::Hello {
        wire::Hello {
            host_id: host.into(),
            hostname: format!("{host}.example"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agent_version: "0.1.0".into(),
            services: vec![wire::ServiceInventory {
                service: "web".into(),
                current_release: "web-1".into(),
                kept_releases: vec!["web-1".into()],
                state: wire::ServiceState::Running as i32,
                healthy: true,
                previous_release: String::new(),
                last_seq: 4,
                ..Default::default()
            }],
        }
    }

    fn registry(unreachable_ms: u64) -> Registry {
        Registry::new(RegistrySettings {
            unreachable_after: Duration::from_millis(unreachable_ms),
            ..RegistrySettings::default()
        })
    }

    #[test]
    fn hello_becomes_a_snapshot_and_host_up() {
        let reg = registry(1000);
        let mut events = reg.subscribe();
        let (tx, _rx) = mpsc::channel(8);
        let a = reg
            .attach(hello("h1", &[("role", "web")]), tx, Instant::now(), 5)
            .unwrap();
        assert_eq!(a.host.as_str(), "h1");
        let snap = reg.host(&a.host).unwrap();
        assert!(snap.connected);
        assert_eq!(snap.labels["role"], "web");
        let web = &snap.services[&ServiceName::new("web").unwrap()];
        assert_eq!(web.current_release.as_ref().unwrap().as_str(), "web-1");
        assert_eq!(web.last_seq, 4);
        assert!(matches!(events.try_recv().unwrap(), FleetEvent::HostUp(s) if s == snap));
    }

    #[test]
    fn a_hold_goes_down_the_hosts_stream_and_not_to_an_unknown_host() {
        let reg = registry(1000);
        let (tx, mut rx) = mpsc::channel(8);
        let a = reg.attach(hello("h1", &[]), tx, Instant::now(), 5).unwrap();
        let hold = HoldConfirm {
            service: ServiceName::new("web").unwrap(),
            release: ReleaseId::new("web-2").unwrap(),
            confirm_deadline: Duration::from_secs(90),
        };
        assert!(reg.hold(&a.host, hold.clone()));
        let msg = rx.try_recv().unwrap().unwrap();
        match msg.body {
            Some(wire::coordinator_message::Body::Hold(h)) => {
                assert_eq!(HoldConfirm::try_from(h).unwrap(), hold);
            }
            b => panic!("expected a hold, got {b:?}"),
        }
        assert!(!reg.hold(&HostId::new("h9").unwrap(), hold));
    }

    #[test]
    fn bad_hello_names_the_field() {
        let mut h = hello("h1", &[]);
        h.host_id = "../etc".into();
        assert_eq!(validate_hello(h, 0).unwrap_err().field, "hello.host id");
        let h = hello("h1", &[("zone", "eu 1")]);
        assert_eq!(validate_hello(h, 0).unwrap_err().field, "hello.labels");
        let mut h = hello("h1", &[]);
        h.services[0].current_release = "a/b".into();
        let e = validate_hello(h, 0).unwrap_err();
        assert!(
            e.field.starts_with("hello.services[0].current_release"),
            "{e}"
        );
        let mut h = hello("h1", &[]);
        h.services.push(h.services[0].clone());
        assert!(validate_hello(h, 0).unwrap_err().problem.contains("twice"));
    }

    #[test]
    fn results_update_the_inventory_and_are_broadcast() {
        let reg = registry(1000);
        let (tx, _rx) = mpsc::channel(8);
        let a = reg.attach(hello("h1", &[]), tx, Instant::now(), 0).unwrap();
        let mut events = reg.subscribe();
        let result = wire::OrderResult {
            last_epoch: 0,
            order_id: "o1".into(),
            rollout_id: "r1".into(),
            seq: 7,
            service: "web".into(),
            release: "web-2".into(),
            phase: wire::OrderPhase::Activated as i32,
            code: wire::ResultCode::Ok as i32,
            message: String::new(),
            current_release: "web-2".into(),
            bytes_done: 0,
            last_seq: 7,
        };
        reg.record(&a.host, a.conn_id, Body::Result(result), Instant::now(), 1)
            .unwrap();
        let web = reg.host(&a.host).unwrap().services[&ServiceName::new("web").unwrap()].clone();
        assert_eq!(web.current_release.unwrap().as_str(), "web-2");
        assert_eq!(web.previous_release.unwrap().as_str(), "web-1");
        assert_eq!(web.last_seq, 7);
        match events.try_recv().unwrap() {
            FleetEvent::Result { host, outcome } => {
                assert_eq!(host, a.host);
                assert_eq!(outcome.phase, OrderPhase::Activated);
            }
            e => panic!("unexpected {e:?}"),
        }
        // An invalid message is refused without touching the stream.
        let bad = wire::HealthReport {
            service: "Web!".into(),
            ..Default::default()
        };
        assert!(matches!(
            reg.record(&a.host, a.conn_id, Body::Health(bad), Instant::now(), 1),
            Err(RecordError::Invalid(_))
        ));
        assert!(reg.host(&a.host).unwrap().connected);
    }

    #[test]
    fn reaper_marks_silent_hosts_down_and_closes_their_stream() {
        let reg = registry(100);
        let t0 = Instant::now();
        let (tx, _rx) = mpsc::channel(8);
        let a = reg.attach(hello("h1", &[]), tx, t0, 0).unwrap();
        let mut events = reg.subscribe();
        assert!(reg.reap(t0 + Duration::from_millis(100)).is_empty());
        reg.record(
            &a.host,
            a.conn_id,
            Body::Heartbeat(wire::Heartbeat::default()),
            t0 + Duration::from_millis(90),
            0,
        )
        .unwrap();
        assert!(reg.reap(t0 + Duration::from_millis(150)).is_empty());
        assert_eq!(
            reg.reap(t0 + Duration::from_millis(191)),
            vec![a.host.clone()]
        );
        assert!(a.kicked.is_cancelled());
        assert!(!reg.host(&a.host).unwrap().connected);
        assert_eq!(
            events.try_recv().unwrap(),
            FleetEvent::HostDown {
                host: a.host.clone()
            }
        );
        // The closed stream's late messages are refused.
        assert!(matches!(
            reg.record(
                &a.host,
                a.conn_id,
                Body::Heartbeat(wire::Heartbeat::default()),
                t0,
                0
            ),
            Err(RecordError::NotCurrent { .. })
        ));
    }

    /// The reaper walks only the deadlines that came due and re-arms those of hosts that spoke
    /// since: a host that goes silent after its deadline was re-armed (others' too) is still
    /// reaped on time, and one that keeps speaking never is.
    #[test]
    fn reaper_catches_a_host_that_goes_silent_after_being_re_armed() {
        let ms = Duration::from_millis;
        let reg = registry(100);
        let t0 = Instant::now();
        let mut streams = Vec::new();
        let mut attached = Vec::new();
        for h in ["h1", "h2", "h3"] {
            let (tx, rx) = mpsc::channel(8);
            streams.push(rx);
            attached.push(reg.attach(hello(h, &[]), tx, t0, 0).unwrap());
        }
        let beat = |a: &Attachment, at: Duration| {
            reg.record(
                &a.host,
                a.conn_id,
                Body::Heartbeat(wire::Heartbeat::default()),
                t0 + at,
                0,
            )
            .unwrap();
        };
        let [h1, h2, h3] = &attached[..] else {
            unreachable!()
        };
        beat(h1, ms(50));
        beat(h2, ms(60));
        // h3 said nothing after its hello; h1 and h2 are re-armed at 150 and 160.
        assert_eq!(reg.reap(t0 + ms(101)), vec![h3.host.clone()]);
        beat(h2, ms(140));
        assert!(reg.reap(t0 + ms(150)).is_empty());
        // h1's re-armed deadline (150) has passed: silent for 101 ms.
        assert_eq!(reg.reap(t0 + ms(151)), vec![h1.host.clone()]);
        // h2's deadline (160) comes due and is re-armed at 240.
        assert!(reg.reap(t0 + ms(161)).is_empty());
        assert!(reg.host(&h2.host).unwrap().connected);
        assert_eq!(reg.reap(t0 + ms(241)), vec![h2.host.clone()]);
        assert!(attached.iter().all(|a| a.kicked.is_cancelled()));
        // A host that comes back is armed again by its hello.
        let (tx, _rx) = mpsc::channel(8);
        let again = reg.attach(hello("h1", &[]), tx, t0 + ms(300), 0).unwrap();
        assert!(reg.reap(t0 + ms(400)).is_empty());
        assert_eq!(reg.reap(t0 + ms(401)), vec![again.host.clone()]);
    }

    /// Random traffic from 40 hosts (messages, silences, disconnects and reconnects) against a
    /// reference that walks every host: the reaper marks exactly the hosts silent for longer than
    /// `unreachable_after`, at the first reap after they became so.
    #[test]
    fn reaper_marks_exactly_the_silent_hosts_under_random_traffic() {
        let seed = 0x5eed_u64;
        println!("seed {seed:#x}");
        let mut rng = seed;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let after = Duration::from_millis(100);
        let reg = registry(100);
        let t0 = Instant::now();
        let n = 40;
        // Per host: its attachment and when it last spoke (the reference), or None when down.
        let mut hosts: Vec<(Attachment, Option<Instant>)> = Vec::new();
        let mut keep = Vec::new();
        for i in 0..n {
            let (tx, rx) = mpsc::channel(8);
            keep.push(rx);
            let a = reg
                .attach(hello(&format!("h{i:02}"), &[]), tx, t0, 0)
                .unwrap();
            hosts.push((a, Some(t0)));
        }
        for step in 1..=2_000u64 {
            let now = t0 + Duration::from_millis(step);
            for (i, (a, last)) in hosts.iter_mut().enumerate() {
                let roll = next() % 1000;
                match last {
                    // Mostly chatty, some long silences (the silence lasts as long as `roll`
                    // keeps this host quiet).
                    Some(l) if roll < 30 => {
                        reg.record(
                            &a.host,
                            a.conn_id,
                            Body::Heartbeat(wire::Heartbeat::default()),
                            now,
                            0,
                        )
                        .unwrap();
                        *l = now;
                    }
                    Some(_) if roll == 999 => {
                        reg.detach(&a.host, a.conn_id);
                        *last = None;
                    }
                    None if roll < 20 => {
                        let (tx, rx) = mpsc::channel(8);
                        keep.push(rx);
                        *a = reg
                            .attach(hello(&format!("h{i:02}"), &[]), tx, now, 0)
                            .unwrap();
                        *last = Some(now);
                    }
                    _ => {}
                }
            }
            if step % 7 == 0 {
                let mut expected: Vec<HostId> = hosts
                    .iter_mut()
                    .filter(|(_, l)| l.is_some_and(|l| now.duration_since(l) > after))
                    .map(|(a, l)| {
                        *l = None;
                        a.host.clone()
                    })
                    .collect();
                let mut got = reg.reap(now);
                expected.sort();
                got.sort();
                assert_eq!(got, expected, "step {step} (seed {seed:#x})");
            }
        }
        // The random walk did exercise the reaper.
        assert!(hosts.iter().any(|(a, _)| a.kicked.is_cancelled()));
    }

    #[test]
    fn a_second_stream_replaces_the_first() {
        let reg = registry(1000);
        let (tx1, _rx1) = mpsc::channel(8);
        let (tx2, mut rx2) = mpsc::channel(8);
        let a1 = reg
            .attach(hello("h1", &[]), tx1, Instant::now(), 0)
            .unwrap();
        let a2 = reg
            .attach(hello("h1", &[]), tx2, Instant::now(), 0)
            .unwrap();
        assert!(a1.kicked.is_cancelled());
        assert!(!a2.kicked.is_cancelled());
        let mut events = reg.subscribe();
        // The old stream ending does not mark the host down.
        reg.detach(&a1.host, a1.conn_id);
        assert!(reg.host(&a1.host).unwrap().connected);
        assert!(events.try_recv().is_err());
        // Orders go to the new stream.
        let order = Order {
            epoch: 0,
            order_id: "o".into(),
            rollout_id: String::new(),
            seq: 1,
            service: ServiceName::new("web").unwrap(),
            action: serin_proto::OrderAction::Cancel,
        };
        assert!(reg.send(&a2.host, order.clone()));
        assert!(rx2.try_recv().is_ok());
        reg.detach(&a2.host, a2.conn_id);
        assert!(!reg.send(&a2.host, order));
        assert_eq!(
            events.try_recv().unwrap(),
            FleetEvent::HostDown { host: a2.host }
        );
    }

    #[test]
    fn kept_health_reports_are_bounded() {
        let reg = registry(1000);
        let (tx, _rx) = mpsc::channel(8);
        let a = reg.attach(hello("h1", &[]), tx, Instant::now(), 0).unwrap();
        let check = wire::CheckResult {
            name: "http".into(),
            passing: true,
            detail: "x".repeat(10_000),
            ..Default::default()
        };
        let report = wire::HealthReport {
            service: "web".into(),
            healthy: true,
            checks: vec![check; 100],
            ..Default::default()
        };
        let mut events = reg.subscribe();
        reg.record(&a.host, a.conn_id, Body::Health(report), Instant::now(), 1)
            .unwrap();
        // The sample counts every check ...
        match events.try_recv().unwrap() {
            FleetEvent::Health { sample, .. } => {
                assert_eq!((sample.checks_passing, sample.checks_total), (100, 100));
            }
            e => panic!("unexpected {e:?}"),
        }
        // ... but what is kept per host stays small.
        let info = &reg.host_infos(&Selector::everything())[0];
        assert_eq!(info.health[0].checks.len(), MAX_KEPT_CHECKS);
        assert!(info.health[0].checks[0].detail.len() <= MAX_CHECK_DETAIL + 3);
    }

    #[test]
    fn a_queued_message_costs_a_pointer() {
        // The order queue of every stream allocates 32 slots up front: keep a slot small.
        assert!(std::mem::size_of::<Outbound>() <= 16);
    }

    #[test]
    fn one_health_report_is_kept_per_managed_service() {
        let reg = registry(1000);
        let (tx, _rx) = mpsc::channel(8);
        let mut h = hello("h1", &[]);
        let mut api = h.services[0].clone();
        api.service = "api".into();
        h.services.push(api);
        let a = reg.attach(h, tx, Instant::now(), 0).unwrap();
        for (svc, healthy) in [("web", true), ("api", true), ("web", false)] {
            let report = wire::HealthReport {
                service: svc.into(),
                release: "web-1".into(),
                healthy,
                ..Default::default()
            };
            reg.record(&a.host, a.conn_id, Body::Health(report), Instant::now(), 1)
                .unwrap();
        }
        let info = &reg.host_infos(&Selector::everything())[0];
        let kept: Vec<_> = info
            .health
            .iter()
            .map(|r| (r.service.as_str(), r.healthy))
            .collect();
        assert_eq!(kept, vec![("api", true), ("web", false)]);
        let snap = reg.host(&a.host).unwrap();
        assert_eq!(
            snap.services[&ServiceName::new("web").unwrap()].healthy,
            Some(false)
        );
        // A new hello without `api` drops its report.
        let (tx, _rx2) = mpsc::channel(8);
        reg.attach(hello("h1", &[]), tx, Instant::now(), 2).unwrap();
        let info = &reg.host_infos(&Selector::everything())[0];
        assert_eq!(info.health.len(), 1);
        assert_eq!(info.health[0].service, "web");
        assert_eq!(info.services.len(), 1);
    }

    /// The flake of issue 8 #9: right after a rollback the agent's checks have not reported on the
    /// restarted release yet; that is no verdict, and must not read as "unhealthy" (which made the
    /// next rollout skip the host).
    #[test]
    fn a_pending_verdict_is_neither_healthy_nor_unhealthy() {
        let reg = registry(1000);
        let (tx, _rx) = mpsc::channel(8);
        let mut h = hello("h1", &[]);
        h.services[0].healthy = false;
        h.services[0].verdict = wire::HealthVerdict::Pending as i32;
        let a = reg.attach(h, tx, Instant::now(), 0).unwrap();
        let web = ServiceName::new("web").unwrap();
        assert_eq!(reg.host(&a.host).unwrap().services[&web].healthy, None);
        for (verdict, healthy, expect) in [
            (wire::HealthVerdict::Failing, false, Some(false)),
            (wire::HealthVerdict::Pending, false, None),
            (wire::HealthVerdict::Passing, true, Some(true)),
            // An older agent sends no verdict: its flag stands.
            (wire::HealthVerdict::Unspecified, false, Some(false)),
        ] {
            let report = wire::HealthReport {
                service: "web".into(),
                release: "web-1".into(),
                healthy,
                verdict: verdict as i32,
                ..Default::default()
            };
            reg.record(&a.host, a.conn_id, Body::Health(report), Instant::now(), 1)
                .unwrap();
            assert_eq!(
                reg.host(&a.host).unwrap().services[&web].healthy,
                expect,
                "{verdict:?}"
            );
        }
    }

    /// Issue 8 #9 on the coordinator's side: a host that rolled back still carried the failing
    /// verdict of the release it left, so the next rollout skipped it as unhealthy.
    #[test]
    fn a_swap_forgets_the_verdict_and_late_reports_of_another_release_are_ignored() {
        let reg = registry(1000);
        let (tx, _rx) = mpsc::channel(8);
        let a = reg.attach(hello("h1", &[]), tx, Instant::now(), 0).unwrap();
        let web = ServiceName::new("web").unwrap();
        let health = |release: &str, verdict: wire::HealthVerdict| wire::HealthReport {
            service: "web".into(),
            release: release.into(),
            healthy: verdict == wire::HealthVerdict::Passing,
            verdict: verdict as i32,
            ..Default::default()
        };
        let result = |seq: u64, phase: wire::OrderPhase, current: &str| wire::OrderResult {
            order_id: format!("o{seq}"),
            rollout_id: "r1".into(),
            seq,
            service: "web".into(),
            release: "web-2".into(),
            phase: phase as i32,
            code: wire::ResultCode::Ok as i32,
            current_release: current.into(),
            ..Default::default()
        };
        let healthy = || reg.host(&a.host).unwrap().services[&web].healthy;
        reg.record(
            &a.host,
            a.conn_id,
            Body::Result(result(5, wire::OrderPhase::Activated, "web-2")),
            Instant::now(),
            1,
        )
        .unwrap();
        assert_eq!(healthy(), None, "a new process has no verdict yet");
        reg.record(
            &a.host,
            a.conn_id,
            Body::Health(health("web-2", wire::HealthVerdict::Failing)),
            Instant::now(),
            2,
        )
        .unwrap();
        assert_eq!(healthy(), Some(false));
        reg.record(
            &a.host,
            a.conn_id,
            Body::Result(result(5, wire::OrderPhase::RolledBack, "web-1")),
            Instant::now(),
            3,
        )
        .unwrap();
        assert_eq!(
            healthy(),
            None,
            "web-2's failing verdict must not speak for web-1"
        );
        reg.record(
            &a.host,
            a.conn_id,
            Body::Health(health("web-2", wire::HealthVerdict::Failing)),
            Instant::now(),
            4,
        )
        .unwrap();
        assert_eq!(
            healthy(),
            None,
            "a late report about web-2 says nothing of web-1"
        );
        reg.record(
            &a.host,
            a.conn_id,
            Body::Health(health("web-1", wire::HealthVerdict::Passing)),
            Instant::now(),
            5,
        )
        .unwrap();
        assert_eq!(healthy(), Some(true));
    }

    /// Issue 10: a subscriber of [`Interest::Changes`] hears hosts come and go, results, and
    /// only the health reports that change a verdict or speak of another release; a settled
    /// fleet's reports, which repeat the last, are not delivered to it. Moving a subscription
    /// from one channel to the other loses and repeats no event.
    #[test]
    fn a_changes_subscriber_hears_no_repeated_verdict_and_a_move_loses_nothing() {
        let reg = registry(1000);
        let health = report;
        let mut all = reg.subscribe();
        let (mut changes, before) = reg.resubscribe(&all, Interest::Changes).unwrap();
        assert_eq!((before, reg.subscribers()), (0, (1, 1)));
        let (tx, _rx) = mpsc::channel(8);
        let a = reg.attach(hello("h1", &[]), tx, Instant::now(), 0).unwrap();
        let record = |body| {
            reg.record(&a.host, a.conn_id, body, Instant::now(), 1)
                .unwrap()
        };
        // The hello said passing: three more passing reports change nothing.
        for _ in 0..3 {
            record(health("web-1", wire::HealthVerdict::Passing));
        }
        record(health("web-1", wire::HealthVerdict::Failing));
        record(health("web-1", wire::HealthVerdict::Failing));
        record(health("web-0", wire::HealthVerdict::Passing));
        record(health("web-1", wire::HealthVerdict::Passing));
        let kinds = |rx: &mut broadcast::Receiver<FleetEvent>| {
            let mut out = Vec::new();
            while let Ok(e) = rx.try_recv() {
                out.push(match e {
                    FleetEvent::HostUp(_) => "up".to_string(),
                    FleetEvent::HostDown { .. } => "down".to_string(),
                    FleetEvent::Result { .. } => "result".to_string(),
                    FleetEvent::Health { sample, .. } => format!(
                        "{} {}",
                        sample.release.map(|r| r.to_string()).unwrap_or_default(),
                        if sample.healthy { "passing" } else { "failing" }
                    ),
                });
            }
            out
        };
        assert_eq!(all.len(), 8, "every event goes to every-event subscribers");
        assert_eq!(
            kinds(&mut changes),
            ["up", "web-1 failing", "web-0 passing", "web-1 passing"]
        );
        kinds(&mut all);

        // A move from every event to the changes: the old subscription holds exactly what came
        // before the cut, the new one exactly what came after.
        record(health("web-1", wire::HealthVerdict::Passing));
        record(Body::Result(wire::OrderResult {
            order_id: "o1".into(),
            rollout_id: "r1".into(),
            seq: 5,
            service: "web".into(),
            phase: wire::OrderPhase::Progress as i32,
            code: wire::ResultCode::Unspecified as i32,
            ..Default::default()
        }));
        let (mut moved, before) = reg.resubscribe(&all, Interest::Changes).unwrap();
        assert_eq!(before, 2);
        record(health("web-1", wire::HealthVerdict::Passing));
        reg.detach(&a.host, a.conn_id);
        let old: Vec<_> = kinds(&mut all).into_iter().take(before).collect();
        assert_eq!(old, ["web-1 passing", "result"]);
        assert_eq!(kinds(&mut moved), ["down"]);
        drop(all);
        drop(changes);
        assert_eq!(reg.subscribers(), (0, 1));
    }

    /// Lets spawned tasks run (paused time: nothing else moves).
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    /// An agent of the real registry: says hello as a healthy host on web-1 and answers every
    /// order as a healthy agent would, through [`Registry::record`].
    fn agent(reg: &Arc<Registry>, id: &str, verdict: wire::HealthVerdict) -> Attachment {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Outbound>(64);
        let mut hello = hello(id, &[("role", "web"), ("zone", "eu-1")]);
        let web = &mut hello.services[0];
        web.healthy = verdict == wire::HealthVerdict::Passing;
        web.verdict = verdict as i32;
        web.last_seq = 3;
        let a = reg.attach(hello, tx, Instant::now(), 1).unwrap();
        let (reg, host, conn) = (reg.clone(), a.host.clone(), a.conn_id);
        tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.recv().await {
                let Some(wire::coordinator_message::Body::Order(o)) = msg.body else {
                    continue;
                };
                let order = Order::try_from(o).unwrap();
                let phases: &[wire::OrderPhase] = match &order.action {
                    OrderAction::Activate { .. } => {
                        &[wire::OrderPhase::Activated, wire::OrderPhase::Healthy]
                    }
                    OrderAction::Confirm { .. } => &[wire::OrderPhase::Confirmed],
                    OrderAction::Rollback { .. } => &[wire::OrderPhase::RolledBack],
                    _ => &[],
                };
                for &phase in phases {
                    let result = wire::OrderResult {
                        order_id: order.order_id.clone(),
                        rollout_id: order.rollout_id.clone(),
                        seq: order.seq,
                        service: "web".into(),
                        release: "web-2".into(),
                        phase: phase as i32,
                        code: wire::ResultCode::Ok as i32,
                        current_release: "web-2".into(),
                        last_seq: order.seq,
                        ..Default::default()
                    };
                    let _ = reg.record(&host, conn, Body::Result(result), Instant::now(), 2);
                    if phase == wire::OrderPhase::Activated {
                        // Its checks pass on the new process at once.
                        let passing = report("web-2", wire::HealthVerdict::Passing);
                        let _ = reg.record(&host, conn, passing, Instant::now(), 2);
                    }
                }
            }
        });
        a
    }

    /// A health report as the agent sends it.
    fn report(release: &str, verdict: wire::HealthVerdict) -> Body {
        Body::Health(wire::HealthReport {
            service: "web".into(),
            release: release.into(),
            healthy: verdict == wire::HealthVerdict::Passing,
            verdict: verdict as i32,
            ..Default::default()
        })
    }

    /// Issue 10: with a settled rollout, a coordinator of 10,000 hosts used 4–6 % of a core more
    /// than with none: every health report was broadcast to the rollout's forwarder, woken
    /// (1,000 times a second) just to drop it. Over the real registry, a settled rollout's task
    /// subscribes to the fleet's changes only: a settled fleet's health reports, which repeat
    /// what is known, reach no task and are not even built as events; a host that passes after
    /// its hello still joins and is converged. The changes channel is small (its slots are
    /// allocated up front): a burst larger than it makes the settled rollout lag, resynchronise
    /// from a snapshot, and converge every host of the burst all the same.
    #[tokio::test(start_paused = true)]
    async fn a_settled_rollout_is_not_woken_by_health_reports_that_change_nothing() {
        let store = Arc::new(crate::store::MemoryStore::new());
        crate::store::Store::put_release(&*store, &crate::rollout::testing::release_record())
            .unwrap();
        let reg = Arc::new(Registry::new(RegistrySettings {
            change_capacity: 16,
            ..RegistrySettings::default()
        }));
        assert!(
            RegistrySettings::default().change_capacity <= 4 * 1024,
            "the changes channel holds 200 bytes a slot from the start"
        );
        let agents: Vec<_> = (0..50)
            .map(|i| agent(&reg, &format!("h{i:03}"), wire::HealthVerdict::Passing))
            .collect();
        let shutdown = CancellationToken::new();
        let mgr = crate::rollout::manager::RolloutManager::start_with_clock(
            store.clone(),
            reg.clone(),
            crate::rollout::settings::EngineSettings::default(),
            shutdown.clone(),
            crate::rollout::task::Clock::at(1_700_000_000_000),
        )
        .await
        .unwrap();
        let api: &dyn crate::control_service::RolloutApi = &mgr;
        let id = api
            .start_rollout(crate::engine_tests::wire_spec(&["100%"]))
            .await
            .unwrap()
            .rollout_id;
        // While it runs, the task hears every event.
        assert_eq!(reg.subscribers(), (1, 0));
        let mut settled = false;
        for _ in 0..600 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let s = mgr.status(&id).await.unwrap();
            settled = s.state == crate::rollout::RolloutState::Succeeded
                && s.hosts.iter().all(|h| {
                    h.phase
                        == crate::rollout::ShownPhase::Phase(
                            crate::rollout::intent::HostPhase::Confirmed,
                        )
                })
                && reg.subscribers() == (0, 1);
            if settled {
                break;
            }
        }
        assert!(
            settled,
            "the rollout did not succeed on every host and settle: subscribers {:?}",
            reg.subscribers()
        );
        settle().await;
        let stats = mgr.task_stats();
        let (_, steps0, _, _) = stats.read();
        let heard0 = stats
            .fleet_events
            .load(std::sync::atomic::Ordering::Relaxed);

        // Six rounds of a settled fleet's reports: each repeats the host's passing verdict.
        for round in 0..6 {
            for a in &agents {
                reg.record(
                    &a.host,
                    a.conn_id,
                    report("web-2", wire::HealthVerdict::Passing),
                    Instant::now(),
                    10 + round,
                )
                .unwrap();
            }
            settle().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        settle().await;
        let heard1 = stats
            .fleet_events
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            heard1 - heard0,
            0,
            "the settled rollout's forwarder took {} health reports that changed nothing",
            heard1 - heard0
        );
        assert_eq!(
            stats.read().1,
            steps0,
            "a settled rollout took machine steps"
        );

        // A selected host that says hello before its first passing verdict is not sent the
        // release until it passes; its first passing report is a change, heard and acted on.
        let late = agent(&reg, "h900", wire::HealthVerdict::Pending);
        reg.record(
            &late.host,
            late.conn_id,
            report("web-1", wire::HealthVerdict::Passing),
            Instant::now(),
            100,
        )
        .unwrap();
        let converged = |hosts: &[&Attachment]| {
            hosts.iter().all(|a| {
                let web =
                    reg.host(&a.host).unwrap().services[&ServiceName::new("web").unwrap()].clone();
                web.current_release.as_ref().map(ReleaseId::as_str) == Some("web-2")
                    && web.state == crate::fleet::ServiceState::Running
            })
        };
        let wait = async |hosts: &[&Attachment]| {
            for _ in 0..120 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                settle().await;
                if converged(hosts) && reg.subscribers() == (0, 1) {
                    return true;
                }
            }
            false
        };
        assert!(
            wait(&[&late]).await,
            "the host that passed after its hello was not converged and settled"
        );

        // 40 hosts say hello and pass before the forwarder runs again: 80 changes, five times
        // what the channel holds.
        let resyncs0 = stats.resyncs.load(std::sync::atomic::Ordering::Relaxed);
        let burst: Vec<_> = (0..40)
            .map(|i| {
                agent(
                    &reg,
                    &format!("h{:03}", 910 + i),
                    wire::HealthVerdict::Pending,
                )
            })
            .collect();
        for a in &burst {
            reg.record(
                &a.host,
                a.conn_id,
                report("web-1", wire::HealthVerdict::Passing),
                Instant::now(),
                200,
            )
            .unwrap();
        }
        assert!(
            wait(&burst.iter().collect::<Vec<_>>()).await,
            "a host of the burst was not converged"
        );
        assert!(
            stats.resyncs.load(std::sync::atomic::Ordering::Relaxed) > resyncs0,
            "the burst did not overflow the changes channel: the test proves nothing"
        );
        shutdown.cancel();
        mgr.join().await;
    }

    /// What a host's stream has not taken from its queue yet is counted, and only that.
    #[test]
    fn queued_counts_the_messages_a_hosts_stream_has_not_taken() {
        let reg = registry(1000);
        let (tx, mut rx) = mpsc::channel(8);
        let a = reg.attach(hello("h1", &[]), tx, Instant::now(), 0).unwrap();
        let order = |seq| Order {
            order_id: format!("r1/1/{seq}"),
            rollout_id: "r1".into(),
            seq,
            epoch: 0,
            service: ServiceName::new("web").unwrap(),
            action: OrderAction::Confirm {
                release: ReleaseId::new("web-2").unwrap(),
                traffic_weight: None,
            },
        };
        assert_eq!(reg.queued(&a.host), 0);
        assert!(reg.send(&a.host, order(4)));
        assert!(reg.send(&a.host, order(5)));
        assert_eq!(reg.queued(&a.host), 2);
        rx.try_recv().unwrap().unwrap();
        assert_eq!(reg.queued(&a.host), 1);
        rx.try_recv().unwrap().unwrap();
        assert_eq!(reg.queued(&a.host), 0);
        reg.detach(&a.host, a.conn_id);
        assert_eq!(reg.queued(&a.host), 0, "a host not connected has no queue");
        assert_eq!(reg.queued(&HostId::new("nobody").unwrap()), 0);
    }

    #[test]
    fn host_infos_filter_by_selector() {
        let reg = registry(1000);
        for (h, zone) in [("h1", "eu-1"), ("h2", "eu-2"), ("h3", "eu-1")] {
            let (tx, _rx) = mpsc::channel(8);
            reg.attach(hello(h, &[("zone", zone)]), tx, Instant::now(), 0)
                .unwrap();
        }
        let ids: Vec<_> = reg
            .host_infos(&Selector::parse("zone=eu-1").unwrap())
            .into_iter()
            .map(|h| h.host_id)
            .collect();
        assert_eq!(ids, vec!["h1", "h3"]);
        assert_eq!(reg.host_infos(&Selector::everything()).len(), 3);
    }

    /// Hosts are kept in arrival order behind a hash table, yet every ordered walk is by host id:
    /// the snapshot the engine plans from (the same fleet, the same plan) and `ListHosts` pages
    /// resumed from a token, a host arriving later included exactly once.
    #[test]
    fn snapshots_and_pages_are_in_host_id_order_whatever_the_arrival_order() {
        let reg = registry(1000);
        let mut keep = Vec::new();
        let mut attach = |h: &str| {
            let (tx, rx) = mpsc::channel(8);
            keep.push(rx);
            reg.attach(hello(h, &[]), tx, Instant::now(), 0).unwrap();
        };
        for h in ["h5", "h2", "h9", "h1", "h7"] {
            attach(h);
        }
        let snapshot: Vec<String> = reg
            .snapshot()
            .into_iter()
            .map(|s| s.host_id.to_string())
            .collect();
        assert_eq!(snapshot, ["h1", "h2", "h5", "h7", "h9"]);
        let everything = Selector::everything();
        let (page, token) = reg.host_page(&everything, None, 2);
        let ids: Vec<_> = page.into_iter().map(|h| h.host_id).collect();
        assert_eq!(ids, ["h1", "h2"]);
        let token = token.expect("more hosts follow");
        // A host arriving between two pages lands in its place.
        attach("h3");
        attach("h0");
        let (page, token) = reg.host_page(&everything, Some(&token), 10);
        let ids: Vec<_> = page.into_iter().map(|h| h.host_id).collect();
        assert_eq!(ids, ["h3", "h5", "h7", "h9"]);
        assert_eq!(token, None);
    }
}
