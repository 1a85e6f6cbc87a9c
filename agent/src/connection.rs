//! The connection to the coordinator: one long-lived `Attach` stream, re-established with
//! jittered exponential backoff.
//!
//! On every connect the agent sends a `Hello` built from the services' current inventories, then
//! health reports and order results, and a heartbeat only when the stream has been silent for the
//! heartbeat interval: any message is a sign of life to the coordinator, so an agent whose health
//! reports go up at least that often sends no heartbeat at all ([`heartbeat_silence`]). Orders
//! coming down are validated and routed to their service's task. Order results produced while
//! disconnected are queued (bounded) and sent after the reconnect; health reports are not queued
//! (fresh ones go up on reconnect).
//!
//! [`channel`] builds the transport from the `[tls]` section: mutual TLS with the serin CA
//! pinned, the coordinator's name verified against the URL's host and this host's certificate
//! presented (checked at start to carry this host id), or plaintext only when explicitly asked
//! for, with a loud warning. A refusal by the coordinator is logged with its reason.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serin_proto::wire::agent_service_client::AgentServiceClient;
use serin_proto::wire::{
    self, OrderPhase, ResultCode, agent_message::Body as Up, coordinator_message::Body as Down,
};
use serin_proto::{HoldConfirm, HostId, Order};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::liveness::Liveness;
use crate::release_store::unix_ms;
use crate::service::{Input, ServiceHandle, Upstream};

/// Largest HTTP/2 frame the agent accepts from the coordinator: one artifact chunk.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// An HTTP/2 ping goes to the coordinator after this long without reading anything from it, to
/// find a connection that stalled or died silently (a partition, a crashed host, a proxy that
/// stopped forwarding) and dial again: such a connection is left within this plus
/// [`KEEPALIVE_TIMEOUT`], 30 s. A steady coordinator sends an agent nothing, so every agent pings
/// at this period, and each ping costs the coordinator a read and an answer about as much as a
/// heartbeat does: at 10 s, 2,000 pings a second at 20,000 agents took ~5 % of a core, as much as
/// their health reports. The coordinator learns of a silent agent from its messages
/// (`unreachable_after`), not from pings.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a keepalive ping may wait for its answer before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most order results kept while disconnected; the oldest are dropped beyond this.
const MAX_QUEUED_RESULTS: usize = 4096;

/// How long the stream must have been silent before a heartbeat goes up: the heartbeat interval,
/// plus a grace of a twentieth of it (at most 250 ms) so that a health report due at the same
/// moment (a report interval equal to the heartbeat interval) goes first and the heartbeat is not
/// sent at all; without it the two race and both go up about half the time. The coordinator
/// hears from the agent at least this often; its `unreachable_after` is several intervals.
pub fn heartbeat_silence(every: Duration) -> Duration {
    every + (every / 20).min(Duration::from_millis(250))
}

/// Who this agent is and how it talks.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Host id.
    pub host_id: HostId,
    /// Hostname.
    pub hostname: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Heartbeat interval until a Welcome says otherwise.
    pub heartbeat_interval: Duration,
    /// First reconnect delay.
    pub reconnect_initial: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// Beaten every [`Liveness::PERIOD`] by this loop, whatever it waits for (systemd's watchdog).
    pub liveness: Liveness,
}

/// The channel to the coordinator, lazily connected, over the transport `config.tls` asks for.
/// The error names the problem: a missing or malformed file, a certificate for another host, a
/// URL scheme that does not match the transport.
pub fn channel(
    config: &crate::config::Config,
    host_id: &HostId,
) -> Result<(Channel, Option<ReloadableCert>), String> {
    use serin_security::tls::{TlsMaterial, TransportSecurity, agent_client_config_reloadable};
    use serin_security::transport::{ClientTransport, endpoint};
    let mut reloadable = None;
    let transport = match &config.tls {
        TransportSecurity::Tls(files) => {
            let material = TlsMaterial::load(files).map_err(|e| format!("tls: {e}"))?;
            let (config, resolver) = agent_client_config_reloadable(&material, host_id)
                .map_err(|e| format!("tls: {e}"))?;
            reloadable = Some(ReloadableCert {
                files: files.clone(),
                resolver,
            });
            ClientTransport::Tls {
                config,
                server_name: None,
            }
        }
        TransportSecurity::InsecurePlaintext => {
            tracing::warn!(
                coordinator = %config.coordinator,
                "INSECURE: talking to the coordinator in plaintext without TLS \
                 (tls.insecure_plaintext): anyone on the network can impersonate it; \
                 development only"
            );
            ClientTransport::Plaintext
        }
    };
    let (endpoint, connector) =
        endpoint(&config.coordinator, &transport).map_err(|e| e.to_string())?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // Artifact chunks (256 KiB) arrive in one HTTP/2 frame each instead of sixteen 16 KiB
        // ones: fewer frames to parse and copy on both sides of a download.
        .max_frame_size(MAX_FRAME_SIZE)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(connector);
    Ok((channel, reloadable))
}

/// The agent's TLS files and the certificate its connections present, replaced after a renewal
/// ([`crate::renew`]).
#[derive(Debug, Clone)]
pub struct ReloadableCert {
    /// Where the certificate and key live.
    pub files: serin_security::tls::TlsFiles,
    /// What the next handshake presents.
    pub resolver: std::sync::Arc<serin_security::tls::ReloadableClientCert>,
}

/// Runs the connection until `shutdown`.
pub async fn run(
    settings: Settings,
    channel: Channel,
    services: HashMap<String, ServiceHandle>,
    mut upstream: mpsc::Receiver<Upstream>,
    shutdown: CancellationToken,
) {
    let mut client = AgentServiceClient::new(channel);
    let mut queued: VecDeque<wire::OrderResult> = VecDeque::new();
    let mut backoff = settings.reconnect_initial;
    let mut beat = tokio::time::interval(Liveness::PERIOD);
    let queue = |queued: &mut VecDeque<wire::OrderResult>, up: Upstream| {
        if let Upstream::Result(r) = up {
            if queued.len() >= MAX_QUEUED_RESULTS {
                tracing::warn!("result queue full; dropping the oldest result");
                queued.pop_front();
            }
            queued.push_back(r);
        }
    };
    loop {
        let (tx, rx) = mpsc::channel::<wire::AgentMessage>(64);
        let hello = hello(&settings, &services);
        let _ = tx.try_send(wire::AgentMessage {
            body: Some(Up::Hello(hello)),
        });
        let attach = client.attach(ReceiverStream::new(rx));
        tokio::pin!(attach);
        let response = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(up) = upstream.recv() => queue(&mut queued, up),
                _ = beat.tick() => settings.liveness.beat(),
                r = &mut attach => break r,
            }
        };
        match response {
            Ok(response) => {
                tracing::info!(host = %settings.host_id, "connected to coordinator");
                backoff = settings.reconnect_initial;
                let mut inbound = response.into_inner();
                let ended = connected(
                    &settings,
                    &services,
                    &tx,
                    &mut inbound,
                    &mut upstream,
                    &mut queued,
                    &shutdown,
                )
                .await;
                match ended {
                    Ended::Shutdown => return,
                    Ended::Lost(why) => {
                        tracing::warn!(error = %why, "connection to coordinator lost")
                    }
                }
            }
            Err(status) => {
                let chain = status_chain(&status);
                match serin_security::transport::explain_failure(&chain) {
                    Some(hint) => {
                        tracing::warn!(code = ?status.code(), error = %chain, reason = hint, retry_in = ?backoff, "cannot attach to coordinator")
                    }
                    None => {
                        tracing::warn!(code = ?status.code(), error = %chain, retry_in = ?backoff, "cannot attach to coordinator")
                    }
                }
            }
        }
        // Full jitter: wait a random time up to the current backoff.
        let wait = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(up) = upstream.recv() => queue(&mut queued, up),
                _ = beat.tick() => settings.liveness.beat(),
                _ = &mut sleep => break,
            }
        }
        backoff = (backoff * 2).min(settings.reconnect_max);
    }
}

/// A status's message and its source chain (where a TLS refusal is named).
fn status_chain(status: &tonic::Status) -> String {
    let mut out = status.message().to_string();
    let mut cur = std::error::Error::source(status);
    while let Some(e) = cur {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = e.source();
    }
    out
}

enum Ended {
    Shutdown,
    Lost(String),
}

fn hello(settings: &Settings, services: &HashMap<String, ServiceHandle>) -> wire::Hello {
    let mut inventories: Vec<wire::ServiceInventory> = services
        .values()
        .map(|h| h.inventory.borrow().clone())
        .collect();
    inventories.sort_by(|a, b| a.service.cmp(&b.service));
    wire::Hello {
        host_id: settings.host_id.to_string(),
        hostname: settings.hostname.clone(),
        labels: settings.labels.clone().into_iter().collect(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        services: inventories,
    }
}

async fn connected(
    settings: &Settings,
    services: &HashMap<String, ServiceHandle>,
    tx: &mpsc::Sender<wire::AgentMessage>,
    inbound: &mut (impl Stream<Item = Result<wire::CoordinatorMessage, tonic::Status>> + Unpin),
    upstream: &mut mpsc::Receiver<Upstream>,
    queued: &mut VecDeque<wire::OrderResult>,
    shutdown: &CancellationToken,
) -> Ended {
    let send = |body: Up| async move {
        tx.send(wire::AgentMessage { body: Some(body) })
            .await
            .map_err(|_| "outgoing stream closed".to_string())
    };
    // Results produced while away go first, then fresh health reports.
    while let Some(r) = queued.pop_front() {
        if let Err(e) = send(Up::Result(r.clone())).await {
            queued.push_front(r);
            return Ended::Lost(e);
        }
    }
    for h in services.values() {
        let _ = h.tx.try_send(Input::ReportNow);
    }
    let mut beat = tokio::time::interval(Liveness::PERIOD);
    // The hello (and the results above) just went up: the first heartbeat is due after a full
    // interval of silence, and every message sent pushes it back.
    let mut every = settings.heartbeat_interval;
    let heartbeat = tokio::time::sleep(heartbeat_silence(every));
    tokio::pin!(heartbeat);
    let rearm = |heartbeat: std::pin::Pin<&mut tokio::time::Sleep>, every: Duration| {
        heartbeat.reset(tokio::time::Instant::now() + heartbeat_silence(every));
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            msg = inbound.next() => match msg {
                Some(Ok(wire::CoordinatorMessage { body: Some(Down::Welcome(w)) })) => {
                    tracing::info!(coordinator = %w.coordinator_id, heartbeat_ms = w.heartbeat_interval_ms, "welcomed by coordinator");
                    if w.heartbeat_interval_ms > 0 {
                        every = Duration::from_millis(u64::from(w.heartbeat_interval_ms)).max(Duration::from_millis(50));
                        rearm(heartbeat.as_mut(), every);
                    }
                }
                Some(Ok(wire::CoordinatorMessage { body: Some(Down::Order(o)) })) => {
                    if let Some(reply) = route(o, services) {
                        if let Err(e) = send(Up::Result(reply)).await {
                            return Ended::Lost(e);
                        }
                        rearm(heartbeat.as_mut(), every);
                    }
                }
                Some(Ok(wire::CoordinatorMessage { body: Some(Down::Hold(h)) })) => route_hold(h, services),
                Some(Ok(wire::CoordinatorMessage { body: None })) => {}
                None => return Ended::Lost("coordinator closed the stream".into()),
                Some(Err(s)) => return Ended::Lost(format!("{} {}", s.code(), s.message())),
            },
            _ = beat.tick() => settings.liveness.beat(),
            () = &mut heartbeat => {
                if let Err(e) = send(Up::Heartbeat(wire::Heartbeat { sent_unix_ms: unix_ms() })).await {
                    return Ended::Lost(e);
                }
                rearm(heartbeat.as_mut(), every);
            }
            Some(up) = upstream.recv() => {
                let body = match up {
                    Upstream::Result(r) => Up::Result(r),
                    Upstream::Health(h) => Up::Health(h),
                };
                let keep = match &body {
                    Up::Result(r) => Some(r.clone()),
                    _ => None,
                };
                if let Err(e) = send(body).await {
                    if let Some(r) = keep {
                        queued.push_back(r);
                    }
                    return Ended::Lost(e);
                }
                rearm(heartbeat.as_mut(), every);
            }
        }
    }
}

/// Validates a hold and hands it to its service; an invalid one or one for a service this agent
/// does not manage is logged and dropped (a hold has no answer).
fn route_hold(h: wire::HoldConfirm, services: &HashMap<String, ServiceHandle>) {
    let raw_service = h.service.clone();
    let hold = match HoldConfirm::try_from(h) {
        Ok(hold) => hold,
        Err(e) => {
            tracing::warn!(service = %raw_service, error = %e, "invalid hold ignored");
            return;
        }
    };
    match services.get(hold.service.as_str()) {
        Some(handle) => {
            // The latest hold per service, outside the service's input queue: a queue full of
            // probe results (a task busy with a slow fsync, say) cannot drop it.
            handle.hold.send_replace(Some(hold));
        }
        None => {
            tracing::warn!(service = %raw_service, "hold for a service this agent does not manage")
        }
    }
}

/// Validates an order and hands it to its service; returns a result to send when it cannot.
fn route(o: wire::Order, services: &HashMap<String, ServiceHandle>) -> Option<wire::OrderResult> {
    let last_seq = services
        .get(&o.service)
        .map(|h| h.inventory.borrow().last_seq)
        .unwrap_or_default();
    let reject =
        |o: &wire::Order, phase: OrderPhase, code: ResultCode, message: String| wire::OrderResult {
            order_id: o.order_id.clone(),
            rollout_id: o.rollout_id.clone(),
            seq: o.seq,
            service: o.service.clone(),
            phase: phase as i32,
            code: code as i32,
            message,
            last_seq,
            ..Default::default()
        };
    let Some(handle) = services.get(&o.service) else {
        let msg = format!("service {:?} is not managed by this agent", o.service);
        tracing::warn!(service = %o.service, seq = o.seq, "order for an unknown service");
        return Some(reject(
            &o,
            OrderPhase::Rejected,
            ResultCode::UnknownService,
            msg,
        ));
    };
    let raw = o.clone();
    let order = match Order::try_from(o) {
        Ok(order) => order,
        Err(e) => {
            tracing::warn!(service = %raw.service, seq = raw.seq, error = %e, "invalid order");
            return Some(reject(
                &raw,
                OrderPhase::Rejected,
                ResultCode::InvalidOrder,
                e.to_string(),
            ));
        }
    };
    match handle.tx.try_send(Input::Order(order)) {
        Ok(()) => None,
        Err(_) => Some(reject(
            &raw,
            OrderPhase::Failed,
            ResultCode::Busy,
            format!("service {} cannot take orders right now", raw.service),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What went up the stream, with when (after the connection started) and what it was.
    async fn traffic(
        every: Duration,
        health_every: Option<Duration>,
        run_for: Duration,
    ) -> Vec<(Duration, &'static str)> {
        let settings = Settings {
            host_id: HostId::new("h1").unwrap(),
            hostname: "h1".into(),
            labels: BTreeMap::new(),
            heartbeat_interval: Duration::from_secs(3600),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(1),
            liveness: Liveness::new(),
        };
        let start = tokio::time::Instant::now();
        let (tx, mut rx) = mpsc::channel::<wire::AgentMessage>(64);
        let recorder = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(m) = rx.recv().await {
                let kind = match m.body {
                    Some(Up::Heartbeat(_)) => "heartbeat",
                    Some(Up::Health(_)) => "health",
                    Some(Up::Result(_)) => "result",
                    _ => "other",
                };
                seen.push((start.elapsed(), kind));
            }
            seen
        });
        // The coordinator's welcome sets the interval (the settings' one is an hour).
        let (down, down_rx) = mpsc::channel(4);
        down.send(Ok(wire::CoordinatorMessage {
            body: Some(Down::Welcome(wire::Welcome {
                coordinator_id: "c".into(),
                heartbeat_interval_ms: every.as_millis() as u32,
            })),
        }))
        .await
        .unwrap();
        let mut inbound = ReceiverStream::new(down_rx);
        // A service task's report interval, as `ServiceTask::run` ticks it: first report at once.
        let (up_tx, mut upstream) = mpsc::channel(16);
        let feeder = tokio::spawn(async move {
            let Some(period) = health_every else {
                return std::future::pending().await;
            };
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let _ = up_tx.try_send(Upstream::Health(wire::HealthReport::default()));
            }
        });
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(run_for).await;
            stop.cancel();
        });
        let ended = connected(
            &settings,
            &HashMap::new(),
            &tx,
            &mut inbound,
            &mut upstream,
            &mut VecDeque::new(),
            &shutdown,
        )
        .await;
        assert!(matches!(ended, Ended::Shutdown));
        feeder.abort();
        drop(tx);
        recorder.await.unwrap()
    }

    /// Longest time the stream was silent, from the start to the end of the run.
    fn longest_silence(seen: &[(Duration, &str)], run_for: Duration) -> Duration {
        let mut times: Vec<Duration> = vec![Duration::ZERO];
        times.extend(seen.iter().map(|(t, _)| *t));
        times.push(run_for);
        times.windows(2).map(|w| w[1] - w[0]).max().unwrap()
    }

    fn count(seen: &[(Duration, &str)], kind: &str) -> usize {
        seen.iter().filter(|(_, k)| *k == kind).count()
    }

    /// Any message is a sign of life: an agent whose health reports go up every heartbeat
    /// interval sends no heartbeat at all (it used to send one per interval besides), one whose
    /// reports are rarer heartbeats only in the silences between them, and a silent one still
    /// heartbeats, never leaving the stream silent for longer than the interval (plus its grace).
    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_goes_up_only_after_an_interval_of_silence() {
        let every = Duration::from_secs(10);
        let run_for = Duration::from_secs(95);
        let limit = heartbeat_silence(every);
        assert!(limit > every && limit <= every + Duration::from_millis(250));

        let seen = traffic(every, Some(every), run_for).await;
        assert_eq!(count(&seen, "health"), 10, "{seen:?}");
        assert_eq!(count(&seen, "heartbeat"), 0, "{seen:?}");

        let seen = traffic(every, None, run_for).await;
        assert_eq!(count(&seen, "heartbeat"), 9, "{seen:?}");
        assert!(longest_silence(&seen, run_for) <= limit, "{seen:?}");

        // Reports every 30 s (the default ratio to a 5 s heartbeat, scaled): two heartbeats in
        // each gap between reports, where an interval timer sent three.
        let seen = traffic(every, Some(Duration::from_secs(30)), run_for).await;
        assert_eq!(count(&seen, "health"), 4, "{seen:?}");
        assert_eq!(count(&seen, "heartbeat"), 6, "{seen:?}");
        assert!(longest_silence(&seen, run_for) <= limit, "{seen:?}");
    }

    /// A service task busy for a while (a slow fsync, prune or `systemctl show`) lets its queue
    /// fill with probe results: a hold arriving then must still reach it, and a later hold
    /// replaces an earlier one rather than queueing behind it.
    #[tokio::test]
    async fn a_hold_reaches_a_service_whose_queue_is_full() {
        let (tx, _rx) = mpsc::channel(4);
        let (_inv_tx, inventory) = tokio::sync::watch::channel(wire::ServiceInventory::default());
        let (hold, mut holds) = tokio::sync::watch::channel(None);
        let handle = ServiceHandle {
            tx,
            inventory,
            hold,
        };
        while handle.tx.try_send(Input::ReportNow).is_ok() {}
        let services = HashMap::from([("web".to_string(), handle)]);
        for ms in [90_000, 120_000] {
            route_hold(
                wire::HoldConfirm {
                    service: "web".into(),
                    release: "web-2".into(),
                    confirm_deadline_ms: ms,
                },
                &services,
            );
        }
        assert!(holds.has_changed().unwrap(), "the hold was dropped");
        let got = holds.borrow_and_update().clone().expect("a hold");
        assert_eq!(got.release.as_str(), "web-2");
        assert_eq!(got.confirm_deadline, Duration::from_millis(120_000));
    }
}
