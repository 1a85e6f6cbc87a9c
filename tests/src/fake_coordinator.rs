//! A scripted coordinator: a real tonic `AgentService` server that tests drive by hand.
//!
//! It listens on 127.0.0.1 (port 0 the first time), answers every agent's `Hello` with a
//! `Welcome`, records every `AgentMessage` per host (with the time it arrived and which connection
//! carried it), sends the orders a test gives it to a connected host, and serves artifacts from an
//! in-memory map by sha256 with faults a test can set ([`ArtifactFault`]).
//!
//! The server runs on its own tokio runtime, so the API is blocking and tests are plain `#[test]`
//! functions. [`FakeCoordinator::stop`] drops that runtime, closing every connection at once (the
//! coordinator is gone); [`FakeCoordinator::restart`] listens again on the same port.
//!
//! It serves mutual TLS with a certificate from the harness PKI ([`crate::tls`]), and its
//! [`FakeCoordinator::url`] is `https://`, so agents under test run their TLS code path. It also
//! answers plaintext on the same port (told apart by the first byte), so a test can put a
//! byte-level proxy in front and configure the agent with an `http://` URL and explicit
//! development plaintext.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serin_proto::wire::{
    self, AgentMessage, ArtifactChunk, CoordinatorMessage, FetchArtifactRequest, HealthReport,
    Hello, OrderResult, Welcome, agent_message, agent_service_server, coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::wait;

/// Size of the chunks artifacts are streamed in.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// How the artifact store misbehaves for one sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactFault {
    /// Serve the right length but with one byte changed.
    WrongBytes,
    /// End the stream (successfully) after this many bytes of the artifact.
    TruncateAfter(u64),
    /// Answer every fetch with `UNAVAILABLE`.
    Fail,
    /// Send the artifact up to this many bytes, then hold the stream open (sending nothing)
    /// until the fault is changed or cleared; then send the rest.
    HoldAfter(u64),
    /// Send the artifact, then go on sending more chunks for ever (an endless source).
    Endless,
    /// Send `bytes` bytes every `every`, for ever if need be (a trickling source).
    Trickle {
        /// Bytes per message.
        bytes: usize,
        /// Pause between messages.
        every: Duration,
    },
}

/// One message an agent sent, as recorded.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// When it arrived.
    pub at: Instant,
    /// Which connection of the host carried it (1 for the first `Attach`).
    pub connection: u32,
    /// The message.
    pub body: agent_message::Body,
}

/// One `FetchArtifact` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRecord {
    /// The sha256 asked for.
    pub sha256: String,
    /// The offset asked for.
    pub offset: u64,
}

#[derive(Default)]
struct HostRecord {
    connections: u32,
    /// Sender of the live connection's response stream, and that connection's number.
    live: Option<(
        u32,
        mpsc::UnboundedSender<Result<CoordinatorMessage, Status>>,
    )>,
    messages: Vec<Recorded>,
}

#[derive(Default)]
struct Shared {
    hosts: Mutex<HashMap<String, HostRecord>>,
    artifacts: Mutex<HashMap<String, Vec<u8>>>,
    faults: Mutex<HashMap<String, ArtifactFault>>,
    fetches: Mutex<Vec<FetchRecord>>,
    /// Protocol violations seen (e.g. a first message that is not a Hello).
    errors: Mutex<Vec<String>>,
    heartbeat_interval_ms: AtomicU32,
    /// Notified whenever a fault changes (releases [`ArtifactFault::HoldAfter`]).
    faults_changed: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the recorded messages from the next dump.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fake coordinator; see the module docs.
pub struct FakeCoordinator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl FakeCoordinator {
    /// Starts a fake coordinator on a free loopback port, asking agents for a heartbeat every
    /// 500 ms.
    pub fn start() -> Self {
        let shared = Arc::new(Shared::default());
        shared.heartbeat_interval_ms.store(500, Ordering::SeqCst);
        let (runtime, addr) = serve(SocketAddr::from(([127, 0, 0, 1], 0)), shared.clone());
        Self {
            addr,
            shared,
            runtime: Mutex::new(Some(runtime)),
        }
    }

    /// The address agents dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`, for the agent's `coordinator` key (mutual TLS).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Sets the heartbeat interval sent in later `Welcome`s.
    pub fn set_heartbeat_interval(&self, interval: Duration) {
        let ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
        self.shared
            .heartbeat_interval_ms
            .store(ms, Ordering::SeqCst);
    }

    /// Stops the server and closes every connection (the coordinator is gone).
    pub fn stop(&self) {
        if let Some(rt) = lock(&self.runtime).take() {
            rt.shutdown_background();
        }
        for host in lock(&self.shared.hosts).values_mut() {
            host.live = None;
        }
    }

    /// Listens again on the same port after [`stop`](Self::stop); a no-op while running.
    pub fn restart(&self) {
        let mut runtime = lock(&self.runtime);
        if runtime.is_none() {
            let (rt, _) = serve(self.addr, self.shared.clone());
            *runtime = Some(rt);
        }
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        lock(&self.runtime).is_some()
    }

    /// Puts `bytes` in the artifact store; returns their sha256.
    pub fn add_artifact(&self, bytes: Vec<u8>) -> String {
        let sha = crate::demo_release::sha256_hex(&bytes);
        lock(&self.shared.artifacts).insert(sha.clone(), bytes);
        sha
    }

    /// Makes fetches of `sha256` misbehave; `None` clears the fault.
    pub fn set_fault(&self, sha256: &str, fault: Option<ArtifactFault>) {
        let mut faults = lock(&self.shared.faults);
        match fault {
            Some(f) => faults.insert(sha256.to_owned(), f),
            None => faults.remove(sha256),
        };
        self.shared.faults_changed.notify_waiters();
    }

    /// Every `FetchArtifact` call so far.
    pub fn fetches(&self) -> Vec<FetchRecord> {
        lock(&self.shared.fetches).clone()
    }

    /// Protocol violations seen so far (should stay empty).
    pub fn protocol_errors(&self) -> Vec<String> {
        lock(&self.shared.errors).clone()
    }

    /// Sends `order` to `host` on its live connection.
    pub fn send_order(&self, host: &str, order: wire::Order) -> anyhow::Result<()> {
        self.send_message(host, coordinator_message::Body::Order(order))
    }

    /// Sends a `HoldConfirm` to `host`: keep the armed activation of `release` of `service`
    /// from reverting for lack of a confirm for `confirm_deadline_ms` more.
    pub fn send_hold(
        &self,
        host: &str,
        service: &str,
        release: &str,
        confirm_deadline_ms: u64,
    ) -> anyhow::Result<()> {
        self.send_message(
            host,
            coordinator_message::Body::Hold(wire::HoldConfirm {
                service: service.to_owned(),
                release: release.to_owned(),
                confirm_deadline_ms,
            }),
        )
    }

    fn send_message(&self, host: &str, body: coordinator_message::Body) -> anyhow::Result<()> {
        let hosts = lock(&self.shared.hosts);
        let Some((_, tx)) = hosts.get(host).and_then(|h| h.live.as_ref()) else {
            anyhow::bail!("host {host} is not connected to the fake coordinator");
        };
        let msg = CoordinatorMessage { body: Some(body) };
        tx.send(Ok(msg))
            .map_err(|_| anyhow::anyhow!("connection of host {host} closed"))
    }

    /// Whether `host` has a live connection.
    pub fn is_connected(&self, host: &str) -> bool {
        lock(&self.shared.hosts)
            .get(host)
            .is_some_and(|h| h.live.as_ref().is_some_and(|(_, tx)| !tx.is_closed()))
    }

    /// How many times `host` attached (sent a Hello).
    pub fn connections(&self, host: &str) -> u32 {
        lock(&self.shared.hosts)
            .get(host)
            .map_or(0, |h| h.connections)
    }

    /// Every message `host` sent, in arrival order.
    pub fn messages(&self, host: &str) -> Vec<Recorded> {
        lock(&self.shared.hosts)
            .get(host)
            .map(|h| h.messages.clone())
            .unwrap_or_default()
    }

    /// Every `Hello` of `host`, oldest first.
    pub fn hellos(&self, host: &str) -> Vec<Hello> {
        self.messages(host)
            .into_iter()
            .filter_map(|m| match m.body {
                agent_message::Body::Hello(h) => Some(h),
                _ => None,
            })
            .collect()
    }

    /// Every `OrderResult` of `host`, oldest first, with its arrival time.
    pub fn results_at(&self, host: &str) -> Vec<(Instant, OrderResult)> {
        self.messages(host)
            .into_iter()
            .filter_map(|m| match m.body {
                agent_message::Body::Result(r) => Some((m.at, r)),
                _ => None,
            })
            .collect()
    }

    /// Every `OrderResult` of `host`, oldest first.
    pub fn results(&self, host: &str) -> Vec<OrderResult> {
        self.results_at(host).into_iter().map(|(_, r)| r).collect()
    }

    /// Every `HealthReport` of `host`, oldest first.
    pub fn health_reports(&self, host: &str) -> Vec<HealthReport> {
        self.messages(host)
            .into_iter()
            .filter_map(|m| match m.body {
                agent_message::Body::Health(h) => Some(h),
                _ => None,
            })
            .collect()
    }

    /// How many heartbeats `host` sent.
    pub fn heartbeats(&self, host: &str) -> usize {
        self.messages(host)
            .iter()
            .filter(|m| matches!(m.body, agent_message::Body::Heartbeat(_)))
            .count()
    }

    /// Waits until `host` has attached at least `n` times and is connected; returns its latest
    /// Hello.
    pub fn wait_attached(
        &self,
        host: &str,
        n: u32,
        timeout: Duration,
        dump: &dyn Fn() -> String,
    ) -> Hello {
        wait::wait_for_value(
            &format!("host {host} to attach to the coordinator (connection #{n})"),
            timeout,
            dump,
            || {
                (self.connections(host) >= n && self.is_connected(host))
                    .then(|| self.hellos(host).pop())
                    .flatten()
            },
        )
    }

    /// Waits for a result of `host` for order `seq` that `pred` accepts, and returns it.
    pub fn wait_result(
        &self,
        host: &str,
        what: &str,
        timeout: Duration,
        dump: &dyn Fn() -> String,
        pred: impl Fn(&OrderResult) -> bool,
    ) -> OrderResult {
        self.wait_result_at(host, what, timeout, dump, pred).1
    }

    /// Like [`wait_result`](Self::wait_result), with the result's arrival time.
    pub fn wait_result_at(
        &self,
        host: &str,
        what: &str,
        timeout: Duration,
        dump: &dyn Fn() -> String,
        pred: impl Fn(&OrderResult) -> bool,
    ) -> (Instant, OrderResult) {
        wait::wait_for_value(what, timeout, dump, || {
            self.results_at(host).into_iter().find(|(_, r)| pred(r))
        })
    }

    /// A readable account of what `host` sent: every hello and result, and a count of the
    /// heartbeats and health reports with the latest health verdicts.
    pub fn dump(&self, host: &str) -> String {
        let msgs = self.messages(host);
        let start = msgs.first().map(|m| m.at);
        let mut out = format!(
            "--- messages from host {host} ({} connections, connected: {}) ---\n",
            self.connections(host),
            self.is_connected(host)
        );
        let mut last_health: Option<(bool, String)> = None;
        for m in &msgs {
            let t = start.map_or(0.0, |s| m.at.duration_since(s).as_secs_f64());
            match &m.body {
                agent_message::Body::Hello(h) => {
                    let _ = writeln!(
                        out,
                        "{t:7.3}s #{} hello {}",
                        m.connection,
                        describe_hello(h)
                    );
                }
                agent_message::Body::Result(r) => {
                    let _ = writeln!(
                        out,
                        "{t:7.3}s #{} result {}",
                        m.connection,
                        describe_result(r)
                    );
                }
                agent_message::Body::Health(h) => {
                    let verdict = (h.healthy, h.release.clone());
                    if last_health.as_ref() != Some(&verdict) {
                        let checks: Vec<String> = h
                            .checks
                            .iter()
                            .map(|c| format!("{}={}({})", c.name, c.passing, c.detail))
                            .collect();
                        let _ = writeln!(
                            out,
                            "{t:7.3}s #{} health release={} healthy={} checks=[{}]",
                            m.connection,
                            h.release,
                            h.healthy,
                            checks.join(", ")
                        );
                        last_health = Some(verdict);
                    }
                }
                agent_message::Body::Heartbeat(_) => {}
            }
        }
        let _ = writeln!(out, "heartbeats: {}", self.heartbeats(host));
        let errors = self.protocol_errors();
        if !errors.is_empty() {
            let _ = writeln!(out, "protocol errors: {errors:?}");
        }
        let fetches = self.fetches();
        if !fetches.is_empty() {
            let _ = writeln!(out, "artifact fetches: {fetches:?}");
        }
        out
    }
}

impl Drop for FakeCoordinator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One line describing an order result.
pub fn describe_result(r: &OrderResult) -> String {
    format!(
        "seq={} order={} release={} phase={} code={} current={:?} bytes={} message={:?}",
        r.seq,
        r.order_id,
        r.release,
        r.phase().as_str_name(),
        r.code().as_str_name(),
        r.current_release,
        r.bytes_done,
        r.message
    )
}

/// One line describing a hello and its inventory.
pub fn describe_hello(h: &Hello) -> String {
    let services: Vec<String> = h
        .services
        .iter()
        .map(|s| {
            format!(
                "{}: current={:?} previous={:?} kept={:?} state={} healthy={} last_seq={}",
                s.service,
                s.current_release,
                s.previous_release,
                s.kept_releases,
                s.state().as_str_name(),
                s.healthy,
                s.last_seq
            )
        })
        .collect();
    format!(
        "host_id={} hostname={} agent={} services=[{}]",
        h.host_id,
        h.hostname,
        h.agent_version,
        services.join("; ")
    )
}

/// Binds `addr` (retrying briefly while the old socket lets go) and serves on a new runtime.
fn serve(addr: SocketAddr, shared: Arc<Shared>) -> (tokio::runtime::Runtime, SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("fake-coordinator")
        .build()
        .expect("building the fake coordinator's runtime");
    let deadline = Instant::now() + Duration::from_secs(5);
    let std_listener = loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => break l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(wait::POLL);
            }
            Err(e) => panic!("fake coordinator cannot listen on {addr}: {e}"),
        }
    };
    let local = std_listener.local_addr().expect("fake coordinator address");
    std_listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    runtime.spawn(async move {
        let listener =
            tokio::net::TcpListener::from_std(std_listener).expect("tokio listener from std");
        let incoming = incoming(listener, tls_config());
        let service = agent_service_server::AgentServiceServer::new(Service { shared });
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            eprintln!("fake coordinator server ended: {e}");
        }
    });
    (runtime, local)
}

/// The fake's TLS configuration: the harness PKI's coordinator certificate for 127.0.0.1.
fn tls_config() -> Arc<rustls::ServerConfig> {
    let files = crate::tls::pki().coordinator(std::net::Ipv4Addr::LOCALHOST.into());
    let material = serin_security::tls::TlsMaterial::load(&files).expect("the fake's TLS files");
    serin_security::tls::server_config(&material, Arc::new(serin_security::tls::NoRevocation))
        .expect("the fake's TLS configuration")
}

/// A connection to the fake: TLS, or plaintext when the client's first byte is not a TLS
/// handshake record.
enum FakeConn {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl tonic::transport::server::Connected for FakeConn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for FakeConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            FakeConn::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            FakeConn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for FakeConn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            FakeConn::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            FakeConn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            FakeConn::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            FakeConn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            FakeConn::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            FakeConn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepted connections, TLS handshakes run concurrently; a refused handshake is printed and
/// dropped.
fn incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl tokio_stream::Stream<Item = Result<FakeConn, std::io::Error>> {
    use futures::StreamExt as _;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio_stream::wrappers::TcpListenerStream::new(listener)
        .filter_map(|r| futures::future::ready(r.ok()))
        .map(move |tcp| {
            let acceptor = acceptor.clone();
            let accept = async move {
                let _ = tcp.set_nodelay(true);
                let mut first = [0u8; 1];
                match tcp.peek(&mut first).await {
                    Ok(1) if first[0] != 0x16 => return Some(Ok(FakeConn::Plain(tcp))),
                    Ok(1) => {}
                    _ => return None,
                }
                let remote = tcp.peer_addr().ok()?;
                match serin_security::transport::handshake(
                    &acceptor,
                    tcp,
                    remote,
                    Duration::from_secs(10),
                )
                .await
                {
                    Ok((tls, _peer)) => Some(Ok(FakeConn::Tls(Box::new(tls)))),
                    Err(refusal) => {
                        eprintln!("fake coordinator refused a connection: {}", refusal.reason);
                        None
                    }
                }
            };
            // A client that never sends its first byte gives its slot back.
            async move {
                tokio::time::timeout(Duration::from_secs(10), accept)
                    .await
                    .ok()
                    .flatten()
            }
        })
        .buffer_unordered(64)
        .filter_map(futures::future::ready)
}

struct Service {
    shared: Arc<Shared>,
}

static NEXT_CONNECTION: AtomicU32 = AtomicU32::new(1);

type ChunkStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<ArtifactChunk, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl agent_service_server::AgentService for Service {
    type AttachStream = UnboundedReceiverStream<Result<CoordinatorMessage, Status>>;
    type FetchArtifactStream = ChunkStream;

    async fn attach(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = self.shared.clone();
        let conn_id = NEXT_CONNECTION.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut host: Option<String> = None;
            let mut connection = 0;
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => break,
                };
                let Some(body) = msg.body else {
                    lock(&shared.errors).push("agent message without a body".to_owned());
                    continue;
                };
                let at = Instant::now();
                let mut hosts = lock(&shared.hosts);
                if let agent_message::Body::Hello(hello) = &body {
                    if host.is_some() {
                        lock(&shared.errors)
                            .push(format!("second hello on one connection: {hello:?}"));
                    }
                    let rec = hosts.entry(hello.host_id.clone()).or_default();
                    rec.connections += 1;
                    connection = rec.connections;
                    rec.live = Some((conn_id, tx.clone()));
                    host = Some(hello.host_id.clone());
                    let welcome = CoordinatorMessage {
                        body: Some(coordinator_message::Body::Welcome(Welcome {
                            coordinator_id: "fake-coordinator".to_owned(),
                            heartbeat_interval_ms: shared
                                .heartbeat_interval_ms
                                .load(Ordering::SeqCst),
                        })),
                    };
                    let _ = tx.send(Ok(welcome));
                }
                let Some(h) = &host else {
                    lock(&shared.errors).push(format!("first message is not a hello: {body:?}"));
                    continue;
                };
                if let Some(rec) = hosts.get_mut(h) {
                    rec.messages.push(Recorded {
                        at,
                        connection,
                        body,
                    });
                }
            }
            if let Some(h) = host {
                let mut hosts = lock(&shared.hosts);
                if let Some(rec) = hosts.get_mut(&h)
                    && rec.live.as_ref().is_some_and(|(id, _)| *id == conn_id)
                {
                    rec.live = None;
                }
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn fetch_artifact(
        &self,
        request: Request<FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let req = request.into_inner();
        lock(&self.shared.fetches).push(FetchRecord {
            sha256: req.sha256.clone(),
            offset: req.offset,
        });
        let Some(mut bytes) = lock(&self.shared.artifacts).get(&req.sha256).cloned() else {
            return Err(Status::not_found(format!(
                "no artifact with sha256 {} in the fake store",
                req.sha256
            )));
        };
        let total_size = bytes.len() as u64;
        let mut end = bytes.len();
        let fault = lock(&self.shared.faults).get(&req.sha256).cloned();
        let mut pacing = None;
        match &fault {
            Some(ArtifactFault::Fail) => {
                return Err(Status::unavailable(
                    "injected fault: artifact store unavailable",
                ));
            }
            Some(ArtifactFault::WrongBytes) => {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0xff;
            }
            Some(ArtifactFault::TruncateAfter(n)) => {
                end = end.min(usize::try_from(*n).unwrap_or(usize::MAX));
            }
            Some(ArtifactFault::HoldAfter(_)) => {}
            Some(ArtifactFault::Endless) => {
                let (tx, rx) = mpsc::channel(2);
                let start = usize::try_from(req.offset).unwrap_or(usize::MAX);
                tokio::spawn(async move {
                    for c in chunks_of(&bytes, start.min(bytes.len()), bytes.len()) {
                        if tx.send(c).await.is_err() {
                            return;
                        }
                    }
                    let mut at = total_size;
                    loop {
                        let chunk = ArtifactChunk {
                            offset: at,
                            data: vec![0x42; CHUNK_SIZE].into(),
                            total_size,
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                        at += CHUNK_SIZE as u64;
                    }
                });
                return Ok(Response::new(Box::pin(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                )));
            }
            Some(ArtifactFault::Trickle { bytes, every }) => pacing = Some((*bytes, *every)),
            None => {}
        }
        let offset = usize::try_from(req.offset).unwrap_or(usize::MAX);
        if offset > bytes.len() {
            return Err(Status::out_of_range(format!(
                "offset {offset} is beyond the artifact's {total_size} bytes"
            )));
        }
        if let Some(ArtifactFault::HoldAfter(n)) = fault {
            return Ok(Response::new(self.held_stream(
                req.sha256,
                bytes,
                offset,
                usize::try_from(n).unwrap_or(usize::MAX),
            )));
        }
        if let Some((per, every)) = pacing {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                let mut at = offset;
                while at < end {
                    let to = (at + per.max(1)).min(end);
                    let chunk = ArtifactChunk {
                        offset: at as u64,
                        data: bytes[at..to].to_vec().into(),
                        total_size,
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                    at = to;
                    tokio::time::sleep(every).await;
                }
            });
            return Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )));
        }
        let chunks = chunks_of(&bytes, offset, end);
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

/// The chunks of `bytes[offset..end]`.
fn chunks_of(bytes: &[u8], offset: usize, end: usize) -> Vec<Result<ArtifactChunk, Status>> {
    let mut chunks = Vec::new();
    let mut at = offset;
    while at < end {
        let to = (at + CHUNK_SIZE).min(end);
        chunks.push(Ok(ArtifactChunk {
            offset: at as u64,
            data: bytes[at..to].to_vec().into(),
            total_size: bytes.len() as u64,
        }));
        at = to;
    }
    chunks
}

impl Service {
    /// A stream of `bytes` from `offset` that stops after `hold` bytes until the fault of
    /// `sha256` is no longer that hold, then sends the rest.
    fn held_stream(
        &self,
        sha256: String,
        bytes: Vec<u8>,
        offset: usize,
        hold: usize,
    ) -> ChunkStream {
        let shared = self.shared.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let hold = hold.clamp(offset, bytes.len());
            for c in chunks_of(&bytes, offset, hold) {
                if tx.send(c).await.is_err() {
                    return;
                }
            }
            loop {
                let changed = shared.faults_changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let held = matches!(
                    lock(&shared.faults).get(&sha256),
                    Some(ArtifactFault::HoldAfter(_))
                );
                if !held {
                    break;
                }
                tokio::select! {
                    _ = changed => {}
                    _ = tx.closed() => return,
                }
            }
            for c in chunks_of(&bytes, hold, bytes.len()) {
                if tx.send(c).await.is_err() {
                    return;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}
