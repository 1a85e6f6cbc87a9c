//! The gRPC service agents talk to: `Attach` (the long-lived bidirectional stream) and
//! `FetchArtifact` (resumable chunked download from the artifact store).
//!
//! An `Attach` stream starts with the agent's hello, answered by a welcome; the stream is then
//! registered with the [`Registry`], which queues orders straight into the stream's outbound
//! channel. One task per stream reads what the agent sends and hands it to the registry; it ends
//! when the agent hangs up, when the registry closes the stream (replaced by a newer stream,
//! silent past `unreachable_after`, or not reading its orders), or at shutdown. Every such task
//! is tracked so the server can wait for all of them.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use serin_proto::Sha256;
use serin_proto::wire::{self, agent_message::Body};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::artifacts::ArtifactStore;
use crate::listener::ConnInfo;
use crate::registry::{Outbound, RecordError, Registry, unix_ms_now};
use serin_security::PeerIdentity;
use serin_security::limits::{self, PeerSlots};
use serin_security::transport::{PeerInfo, check_claimed_host};

/// How the agent service behaves.
#[derive(Debug, Clone)]
pub struct AgentServiceSettings {
    /// Sent to agents in the welcome.
    pub coordinator_id: String,
    /// How often agents should send a heartbeat (sent in the welcome).
    pub heartbeat_interval: Duration,
    /// How long a new stream may take to send its hello.
    pub hello_timeout: Duration,
}

/// Artifact chunks being read or sent at once, over all `FetchArtifact` calls.
///
/// A chunk read for a download stays in memory until HTTP/2 has sent it; without a bound, a
/// hundred agents fetching at once cost a hundred chunks in flight and more (1.5 MiB each seen).
/// Each call holds one permit from reading a chunk until it asks for the next one (by then the
/// HTTP/2 layer has flushed the previous chunk), so the coordinator's memory for downloads stays
/// near `FETCH_CHUNKS_IN_FLIGHT × 3 × 256 KiB` (~24 MiB) whatever the artifact size or the number
/// of agents. 32 concurrent senders still fill a loopback or a 10 Gbit/s link. The price: a
/// client that stops reading keeps its permit until its window opens or the connection's HTTP/2
/// keepalive (20 s) drops it, so 32 stalled clients at once would stall other downloads that long.
pub const FETCH_CHUNKS_IN_FLIGHT: usize = 32;

/// Implements `serin.v1.AgentService`.
pub struct AgentServiceImpl {
    settings: AgentServiceSettings,
    registry: Arc<Registry>,
    artifacts: ArtifactStore,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    fetch_permits: Arc<Semaphore>,
    /// `Attach` streams held per agent identity ([`limits::ATTACH_STREAMS_PER_HOST`]).
    attach_slots: Arc<PeerSlots>,
    /// Where a hello refused by its certificate is audited.
    refusals: Option<crate::audit::RefusalAudit>,
}

impl std::fmt::Debug for AgentServiceImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentServiceImpl")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl AgentServiceImpl {
    /// A service whose per-stream tasks are spawned on `tasks` and end when `shutdown` is
    /// cancelled.
    pub fn new(
        settings: AgentServiceSettings,
        registry: Arc<Registry>,
        artifacts: ArtifactStore,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            settings,
            registry,
            artifacts,
            tasks,
            shutdown,
            fetch_permits: Arc::new(Semaphore::new(FETCH_CHUNKS_IN_FLIGHT)),
            attach_slots: PeerSlots::new(limits::ATTACH_STREAMS_PER_HOST, "Attach streams"),
            refusals: None,
        }
    }

    /// Audits every hello refused because it claims another host than its certificate's.
    pub fn with_refusal_audit(mut self, refusals: crate::audit::RefusalAudit) -> Self {
        self.refusals = Some(refusals);
        self
    }

    /// Closes `conn` once a refusal sent on it had time to go out ([`REFUSAL_CLOSE_AFTER`]).
    fn close_soon(&self, conn: ConnInfo) {
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(REFUSAL_CLOSE_AFTER) => {}
            }
            conn.close();
        });
    }

    /// Waits for the agent's first message, which must be a hello.
    async fn read_hello(
        &self,
        inbound: &mut Streaming<wire::AgentMessage>,
    ) -> Result<wire::Hello, Status> {
        let first = tokio::time::timeout(self.settings.hello_timeout, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no hello within {}",
                    humantime::format_duration(self.settings.hello_timeout)
                ))
            })??;
        match first.and_then(|m| m.body) {
            Some(Body::Hello(h)) => Ok(h),
            Some(other) => Err(Status::invalid_argument(format!(
                "the first message of a stream must be a hello, got {}",
                body_kind(&other)
            ))),
            None => Err(Status::invalid_argument(
                "the stream ended or sent an empty message before its hello",
            )),
        }
    }
}

/// Takes a queued message out of its box for the encoder.
fn unbox(m: Outbound) -> Result<wire::CoordinatorMessage, Status> {
    m.map(|b| *b)
}

/// How long a refused connection (over the cap, or silent past the hello timeout) stays open so
/// the refusal reaches the agent.
const REFUSAL_CLOSE_AFTER: Duration = Duration::from_millis(200);

/// The peer of a call, from the accept loop's connection info.
fn peer<T>(request: &Request<T>) -> Option<std::net::SocketAddr> {
    request
        .extensions()
        .get::<ConnInfo>()
        .and_then(|c| c.remote)
        .or_else(|| request.remote_addr())
}

fn body_kind(b: &Body) -> &'static str {
    match b {
        Body::Hello(_) => "a hello",
        Body::Heartbeat(_) => "a heartbeat",
        Body::Health(_) => "a health report",
        Body::Result(_) => "an order result",
    }
}

/// Reads one agent stream until it ends, feeding the registry.
async fn pump(
    registry: Arc<Registry>,
    host: serin_proto::HostId,
    conn_id: u64,
    mut inbound: Streaming<wire::AgentMessage>,
    tx: mpsc::Sender<Outbound>,
    kicked: CancellationToken,
    shutdown: CancellationToken,
) {
    let ending = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Some(Status::unavailable("coordinator is shutting down")),
            () = kicked.cancelled() => break Some(Status::unavailable(
                "stream closed by the coordinator (a newer stream replaced it, or it was silent \
                 longer than unreachable_after); reconnect and say hello",
            )),
            msg = inbound.message() => match msg {
                Ok(Some(wire::AgentMessage { body: Some(body) })) => {
                    match registry.record(&host, conn_id, body, Instant::now(), unix_ms_now()) {
                        Ok(()) => {}
                        Err(RecordError::Invalid(e)) => {
                            tracing::warn!(host = %host, error = %e, "dropped an invalid message from an agent");
                        }
                        Err(e @ RecordError::NotCurrent { .. }) => {
                            break Some(Status::unavailable(e.to_string()));
                        }
                    }
                }
                Ok(Some(wire::AgentMessage { body: None })) => {
                    tracing::warn!(host = %host, "dropped an empty message from an agent");
                }
                Ok(None) => {
                    tracing::debug!(host = %host, conn = conn_id, "agent closed its stream");
                    break None;
                }
                Err(status) => {
                    tracing::info!(host = %host, conn = conn_id, error = %status, "agent stream failed");
                    break None;
                }
            },
        }
    };
    if let Some(status) = ending {
        // Best effort: the agent may be gone or its queue full; the stream ends either way.
        let _ = tx.try_send(Err(status));
    }
    registry.detach(&host, conn_id);
}

/// The task held for as long as an agent stays attached: `pumped`, then `slot` is given back.
///
/// A combinator rather than `async move { pumped.await; drop(slot) }`: such a block keeps the
/// captured future and the future it awaits as two fields of its state, and the task holding
/// it was twice the pump's size, once per connected agent.
fn pump_task(
    pumped: impl Future<Output = ()> + Send,
    slot: Option<limits::PeerSlot>,
) -> impl Future<Output = ()> + Send {
    futures::FutureExt::map(pumped, move |()| drop(slot))
}

type ArtifactStream = Pin<Box<dyn Stream<Item = Result<wire::ArtifactChunk, Status>> + Send>>;

#[tonic::async_trait]
impl wire::agent_service_server::AgentService for AgentServiceImpl {
    type AttachStream = futures::stream::Map<
        ReceiverStream<Outbound>,
        fn(Outbound) -> Result<wire::CoordinatorMessage, Status>,
    >;

    #[tracing::instrument(skip_all, fields(peer = ?peer(&request)))]
    async fn attach(
        &self,
        request: Request<Streaming<wire::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("coordinator is shutting down"));
        }
        if let Some(conn) = request.extensions().get::<ConnInfo>()
            && conn.over_cap()
        {
            // The accept loop already warned (rate-limited). Close the connection once the
            // refusal had time to go out, so the agent's descriptor comes back to us.
            tracing::debug!("refused an agent stream beyond the connection cap");
            self.close_soon(conn.clone());
            return Err(Status::resource_exhausted(
                "the coordinator is at its open-files limit and takes no more agents; retry later",
            ));
        }
        // With TLS the host id is the certificate's (the policy layer already refused any other
        // identity on this API); in plaintext development mode there is none to check.
        let certified = match request.extensions().get::<PeerInfo>() {
            Some(peer) => match &peer.identity {
                PeerIdentity::Agent { host_id } => Some(host_id.clone()),
                other => {
                    return Err(Status::permission_denied(format!(
                        "the agent API needs an agent certificate; {other} is not one"
                    )));
                }
            },
            None => None,
        };
        // Held from here until the stream's pump ends, hello phase included.
        let slot = match &certified {
            Some(host) => Some(
                self.attach_slots
                    .try_acquire(&PeerIdentity::Agent { host_id: host.clone() }.uri())
                    .map_err(|e| {
                        tracing::warn!(host = %host, error = %e, "refused an agent stream over the per-host limit");
                        Status::resource_exhausted(e.to_string())
                    })?,
            ),
            None => None,
        };
        if let Some(host) = &certified {
            tracing::debug!(host = %host, "agent stream admitted; waiting for its hello");
        }
        let conn = request.extensions().get::<ConnInfo>().cloned();
        let remote = request
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.remote_addr);
        let mut inbound = request.into_inner();
        let hello = match self.read_hello(&mut inbound).await {
            Ok(hello) => hello,
            Err(e) => {
                tracing::warn!(error = %e, "refused an agent stream");
                if e.code() == tonic::Code::DeadlineExceeded
                    && let Some(conn) = conn
                {
                    // A peer that opens a stream and never says who it is loses its connection
                    // too, once the refusal had time to go out.
                    self.close_soon(conn);
                }
                return Err(e);
            }
        };
        if let Some(certified) = &certified {
            // A hello claiming another host is refused before it reaches the registry: it can
            // neither replace that host's stream nor appear as a host of its own.
            let claimed = serin_proto::HostId::new(hello.host_id.clone())
                .map_err(|e| Status::invalid_argument(format!("hello.host id: {}", e.problem)))?;
            check_claimed_host(certified, &claimed).inspect_err(|e| {
                tracing::warn!(certified = %certified, claimed = %claimed, error = %e.message(), "refused a hello claiming another host");
                if let (Some(r), Some(remote)) = (&self.refusals, remote) {
                    let identity = PeerIdentity::Agent {
                        host_id: certified.clone(),
                    };
                    r.refused(&identity, remote, "/serin.v1.AgentService/Attach", e);
                }
            })?;
        }
        let (tx, rx) = mpsc::channel(self.registry.settings().order_queue.max(2));
        let welcome = Box::new(wire::CoordinatorMessage {
            body: Some(wire::coordinator_message::Body::Welcome(wire::Welcome {
                coordinator_id: self.settings.coordinator_id.clone(),
                heartbeat_interval_ms: u32::try_from(self.settings.heartbeat_interval.as_millis())
                    .unwrap_or(u32::MAX),
            })),
        });
        // The welcome goes first, before the registry can queue any order behind it.
        tx.try_send(Ok(welcome))
            .map_err(|_| Status::internal("cannot queue the welcome"))?;
        let attachment = self
            .registry
            .attach(hello, tx.clone(), Instant::now(), unix_ms_now())
            .map_err(|e| {
                tracing::warn!(error = %e, "refused an agent hello");
                Status::from(e)
            })?;
        tracing::info!(host = %attachment.host, conn = attachment.conn_id, "agent attached");
        let pumped = pump(
            self.registry.clone(),
            attachment.host,
            attachment.conn_id,
            inbound,
            tx,
            attachment.kicked,
            self.shutdown.clone(),
        );
        // The per-host slot is given back when the stream's pump ends.
        self.tasks.spawn(pump_task(pumped, slot));
        Ok(Response::new(
            ReceiverStream::new(rx).map(unbox as fn(_) -> _),
        ))
    }

    type FetchArtifactStream = ArtifactStream;

    #[tracing::instrument(skip_all, fields(sha256 = %request.get_ref().sha256, offset = request.get_ref().offset))]
    async fn fetch_artifact(
        &self,
        request: Request<wire::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let req = request.into_inner();
        let sha = Sha256::from_hex("sha256", &req.sha256)?;
        let (total_size, chunks) = self.artifacts.read_from(&sha, req.offset).await?;
        let stream = chunks.map(move |c| match c {
            Ok((offset, data)) => Ok(wire::ArtifactChunk {
                offset,
                data,
                total_size,
            }),
            Err(e) => {
                tracing::error!(sha256 = %sha, error = %e, "artifact read failed mid-stream");
                Err(Status::from(e))
            }
        });
        Ok(Response::new(Box::pin(bounded(
            Box::pin(stream),
            self.fetch_permits.clone(),
        ))))
    }
}

/// `inner`, polled only while holding a permit of `permits`: the permit taken for an item is
/// kept until the next item is asked for (see [`FETCH_CHUNKS_IN_FLIGHT`]).
fn bounded<S>(inner: S, permits: Arc<Semaphore>) -> impl Stream<Item = S::Item> + Send + 'static
where
    S: Stream + Send + Unpin + 'static,
    S::Item: Send,
{
    futures::stream::unfold(
        (inner, permits, None::<OwnedSemaphorePermit>),
        |(mut inner, permits, held)| async move {
            drop(held);
            // The semaphore is never closed.
            let permit = permits.clone().acquire_owned().await.ok()?;
            let item = inner.next().await?;
            Some((item, (inner, permits, Some(permit))))
        },
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serin_proto::wire::agent_message::Body;
    use serin_proto::wire::coordinator_message;
    use serin_proto::{HostId, Order, OrderAction, ServiceName};
    use sha2::Digest;

    use super::*;
    use crate::fleet::{Fleet, FleetEvent};
    use crate::server::testing::{FakeAgent, TestServer, hello, wait_for};

    const LONG: Duration = Duration::from_secs(30);
    const WAIT: Duration = Duration::from_secs(5);

    fn connected(server: &TestServer, host: &str) -> bool {
        server
            .registry
            .host(&HostId::new(host).unwrap())
            .is_some_and(|h| h.connected)
    }

    fn cancel_order(seq: u64) -> Order {
        Order {
            epoch: 0,
            order_id: format!("o-{seq}"),
            rollout_id: "r-1".into(),
            seq,
            service: ServiceName::new("web").unwrap(),
            action: OrderAction::Cancel,
        }
    }

    /// The task held per connected agent for as long as it stays attached: its pump future
    /// (and the wrapper that holds the per-host slot) is allocated once per agent, so its size is
    /// part of the coordinator's memory per agent (BENCHMARKS.md, "Memory per agent").
    #[tokio::test]
    async fn the_per_agent_pump_future_stays_small() {
        use tonic::codec::Codec as _;
        let registry = Arc::new(Registry::new(crate::registry::RegistrySettings::default()));
        let inbound = Streaming::new_request(
            serin_proto::codec::SerinCodec::<wire::CoordinatorMessage, wire::AgentMessage>::default()
                .decoder(),
            tonic::body::Body::empty(),
            None,
            None,
        );
        let (tx, _rx) = mpsc::channel(2);
        let pumped = pump(
            registry,
            HostId::new("h1").unwrap(),
            1,
            inbound,
            tx,
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&pumped);
        let task = pump_task(pumped, None);
        let task_size = std::mem::size_of_val(&task);
        eprintln!("pump future: {size} bytes; the spawned task's future: {task_size} bytes");
        assert!(size <= 1024, "the pump future grew to {size} bytes");
        assert!(
            task_size <= size + 64,
            "the task holds the pump future twice: {task_size} bytes for a {size}-byte pump"
        );
    }

    #[tokio::test]
    async fn hello_gets_a_welcome_then_orders_flow_down_and_results_up() {
        let server = TestServer::start(LONG).await;
        let mut events = server.registry.subscribe();
        let (mut agent, welcome) =
            FakeAgent::attach(&server, hello("h1", &[("role", "web")])).await;
        assert_eq!(welcome.coordinator_id, "test-coordinator");
        assert_eq!(welcome.heartbeat_interval_ms, 100);
        match events.recv().await.unwrap() {
            FleetEvent::HostUp(s) => {
                assert_eq!(s.host_id.as_str(), "h1");
                assert_eq!(s.labels["role"], "web");
            }
            e => panic!("expected HostUp, got {e:?}"),
        }

        let host = HostId::new("h1").unwrap();
        assert!(server.registry.send(&host, cancel_order(7)));
        match agent.next().await.unwrap().and_then(|m| m.body) {
            Some(coordinator_message::Body::Order(o)) => {
                assert_eq!(o.seq, 7);
                assert_eq!(o.service, "web");
                assert!(matches!(o.action, Some(wire::order::Action::Cancel(_))));
            }
            other => panic!("expected the order, got {other:?}"),
        }

        agent
            .send(Body::Result(wire::OrderResult {
                order_id: "o-7".into(),
                rollout_id: "r-1".into(),
                seq: 7,
                service: "web".into(),
                phase: wire::OrderPhase::Cancelled as i32,
                code: wire::ResultCode::Ok as i32,
                current_release: "web-1".into(),
                ..Default::default()
            }))
            .await;
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            FleetEvent::Result { host: h, outcome } => {
                assert_eq!(h, host);
                assert_eq!(outcome.seq, 7);
                assert_eq!(outcome.phase, crate::fleet::OrderPhase::Cancelled);
            }
            e => panic!("expected Result, got {e:?}"),
        }
        agent
            .send(Body::Health(wire::HealthReport {
                service: "web".into(),
                release: "web-1".into(),
                healthy: false,
                ..Default::default()
            }))
            .await;
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            FleetEvent::Health { sample, .. } => assert!(!sample.healthy),
            e => panic!("expected Health, got {e:?}"),
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn closing_the_stream_marks_the_host_down() {
        let server = TestServer::start(LONG).await;
        let (agent, _) = FakeAgent::attach(&server, hello("h1", &[])).await;
        assert!(connected(&server, "h1"));
        let mut events = server.registry.subscribe();
        drop(agent);
        wait_for("h1 to be disconnected", WAIT, || !connected(&server, "h1")).await;
        assert_eq!(
            events.recv().await.unwrap(),
            FleetEvent::HostDown {
                host: HostId::new("h1").unwrap()
            }
        );
        assert!(
            !server
                .registry
                .send(&HostId::new("h1").unwrap(), cancel_order(1))
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn a_silent_agent_is_marked_unreachable_and_its_stream_closed() {
        let server = TestServer::start(Duration::from_millis(300)).await;
        let (mut agent, _) = FakeAgent::attach(&server, hello("h1", &[])).await;
        let mut events = server.registry.subscribe();
        // The stream stays open but nothing more is sent.
        wait_for("h1 to be unreachable", WAIT, || !connected(&server, "h1")).await;
        assert_eq!(
            events.recv().await.unwrap(),
            FleetEvent::HostDown {
                host: HostId::new("h1").unwrap()
            }
        );
        let status = agent
            .next()
            .await
            .expect_err("the stream ends with an error");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(status.message().contains("unreachable_after"), "{status}");
        server.stop().await;
    }

    #[tokio::test]
    async fn heartbeats_keep_an_agent_connected() {
        let unreachable = Duration::from_millis(300);
        let server = TestServer::start(unreachable).await;
        let (agent, _) = FakeAgent::attach(&server, hello("h1", &[])).await;
        let start = std::time::Instant::now();
        while start.elapsed() < unreachable * 3 {
            agent
                .send(Body::Heartbeat(wire::Heartbeat { sent_unix_ms: 1 }))
                .await;
            assert!(connected(&server, "h1"), "h1 dropped despite heartbeats");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn a_second_stream_replaces_the_first() {
        let server = TestServer::start(LONG).await;
        let (mut first, _) = FakeAgent::attach(&server, hello("h1", &[])).await;
        let (mut second, _) = FakeAgent::attach(&server, hello("h1", &[])).await;
        let status = first.next().await.expect_err("the first stream is closed");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        // The host stays connected, and orders go to the new stream.
        assert!(connected(&server, "h1"));
        assert!(
            server
                .registry
                .send(&HostId::new("h1").unwrap(), cancel_order(2))
        );
        let msg = second.next().await.unwrap().unwrap();
        assert!(matches!(msg.body, Some(coordinator_message::Body::Order(o)) if o.seq == 2));
        server.stop().await;
    }

    #[tokio::test]
    async fn a_bad_hello_is_rejected_naming_the_field() {
        let server = TestServer::start(LONG).await;
        let mut bad = hello("h1", &[]);
        bad.host_id = "../etc/passwd".into();
        let e = FakeAgent::attach_with(&server, Body::Hello(bad))
            .await
            .err()
            .expect("rejected");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("hello.host id"), "{e}");

        let bad = hello("h1", &[("zone", "eu 1")]);
        let e = FakeAgent::attach_with(&server, Body::Hello(bad))
            .await
            .err()
            .expect("rejected");
        assert!(e.message().contains("hello.labels"), "{e}");

        let e = FakeAgent::attach_with(&server, Body::Heartbeat(wire::Heartbeat::default()))
            .await
            .err()
            .expect("rejected");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("must be a hello"), "{e}");
        assert!(server.registry.snapshot().is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_ends_open_streams() {
        let server = TestServer::start(LONG).await;
        let (mut agent, _) = FakeAgent::attach(&server, hello("h1", &[])).await;
        server.stop().await;
        // Either an unavailable status or a closed connection, but not a hang.
        let r = agent.next().await;
        assert!(!matches!(r, Ok(Some(_))), "{r:?}");
    }

    async fn fetch(
        server: &TestServer,
        sha256: &str,
        offset: u64,
    ) -> Result<Vec<wire::ArtifactChunk>, tonic::Status> {
        let mut client = server.agent_client().await;
        let mut stream = client
            .fetch_artifact(wire::FetchArtifactRequest {
                sha256: sha256.into(),
                offset,
            })
            .await?
            .into_inner();
        let mut chunks = Vec::new();
        while let Some(c) = stream.message().await? {
            chunks.push(c);
        }
        Ok(chunks)
    }

    #[tokio::test]
    async fn fetch_streams_hold_one_permit_each_until_they_ask_for_more() {
        let permits = Arc::new(Semaphore::new(1));
        let mut a = Box::pin(bounded(futures::stream::iter(0..3), permits.clone()));
        assert_eq!(a.next().await, Some(0));
        // A's chunk is still in flight: B, polled on its own task as hyper does, may not read.
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let b = bounded(futures::stream::iter(10..13), permits.clone())
            .inspect(move |i| {
                let _ = seen_tx.send(*i);
            })
            .collect::<Vec<_>>();
        let b = tokio::spawn(b);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            seen.try_recv().is_err(),
            "a second stream read a chunk while the only permit was held"
        );
        assert_eq!(permits.available_permits(), 0);
        // A going away lets B go, and B gets all its items.
        drop(a);
        let rest = tokio::time::timeout(WAIT, b)
            .await
            .expect("B finishes")
            .unwrap();
        assert_eq!(rest, vec![10, 11, 12]);
        assert_eq!(permits.available_permits(), 1);
    }

    #[tokio::test]
    async fn fetch_artifact_streams_chunks_and_resumes_from_an_offset() {
        let server = TestServer::start(LONG).await;
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
        let (sha, _) = server.artifacts.put(&data).await.unwrap();
        assert_eq!(sha.to_hex(), hex::encode(sha2::Sha256::digest(&data)));

        let chunks = fetch(&server, &sha.to_hex(), 0).await.unwrap();
        assert!(chunks.len() >= 3, "chunked: {} chunks", chunks.len());
        assert!(chunks.iter().all(|c| c.total_size == data.len() as u64));
        let got: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(got, data);

        let resume = 300_001;
        let chunks = fetch(&server, &sha.to_hex(), resume).await.unwrap();
        assert_eq!(chunks[0].offset, resume);
        let got: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(got, data[resume as usize..]);

        let e = fetch(&server, &sha.to_hex(), data.len() as u64 + 1)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
        let e = fetch(&server, &"0".repeat(64), 0).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
        assert!(e.message().contains(&"0".repeat(64)), "{e}");
        let e = fetch(&server, "xyz", 0).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        server.stop().await;
    }
}
