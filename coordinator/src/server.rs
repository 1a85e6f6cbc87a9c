//! The coordinator daemon: opens its state, starts its tasks and serves both gRPC services
//! (agents and operators) on one listener until shutdown.
//!
//! [`run`] takes its I/O (a bound listener) and a shutdown signal, so tests start real servers
//! on port 0. On shutdown it stops accepting calls, closes every agent stream and watch, waits
//! for every task it started (stream pumps, the reaper, the rollout tasks) and returns.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serin_proto::wire::agent_service_server::AgentServiceServer;
use serin_proto::wire::control_service_server::ControlServiceServer;
use serin_proto::wire::enrol_admin_service_server::EnrolAdminServiceServer;
use serin_proto::wire::enrol_service_server::EnrolServiceServer;
use serin_proto::wire::renew_service_server::RenewServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent_service::{AgentServiceImpl, AgentServiceSettings};
use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::config::CoordinatorConfig;
use crate::control_service::{ControlServiceImpl, RolloutApi};
use crate::fleet::Fleet;
use crate::registry::{Registry, RegistrySettings};
use crate::store::{RedbStore, Store, StoreError};
use crate::{limits, listener};
use serin_security::tls::TransportSecurity;

/// Largest gRPC message accepted or sent. Artifact chunks are 1 MiB from the CLI and 256 KiB to
/// agents; a large fleet's host list or a long rollout's status is the biggest other message.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// The coordinator could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is inconsistent.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The state directory could not be created.
    #[error("cannot create state directory {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The artifact store could not be opened.
    #[error("cannot open the artifact store: {0}")]
    Artifacts(#[from] ArtifactError),
    /// The rollout engine could not resume the stored rollouts.
    #[error("cannot start the rollout engine: {0}")]
    Rollouts(String),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A startup task panicked or was cancelled.
    #[error("startup task failed: {0}")]
    Task(String),
    /// The TLS files are missing, malformed or of the wrong kind.
    #[error("tls: {0}")]
    Tls(#[from] serin_security::tls::TlsError),
}

/// A name for this coordinator in welcomes and logs: `<hostname>:<port>`.
fn coordinator_id(addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "serin-coordinator".to_string());
    format!("{host}:{}", addr.port())
}

/// Runs the coordinator on `listener` until `shutdown` is cancelled, then drains and returns.
#[tracing::instrument(skip_all, fields(state_dir = %config.state_dir.display()))]
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    config.validate()?;
    let revoked = Arc::new(serin_security::tls::RevokedSet::default());
    let security = security(&config.tls, revoked.clone())?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Task(e.to_string()))?;
    let connection_cap = open_files_cap();

    std::fs::create_dir_all(&config.state_dir).map_err(|source| ServerError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let store_path = config.state_dir.join("store.redb");
    let store: Arc<dyn Store> = Arc::new(
        tokio::task::spawn_blocking(move || RedbStore::open(store_path))
            .await
            .map_err(|e| ServerError::Task(e.to_string()))??,
    );
    let revocations = crate::audit::load_revocations(store.as_ref(), &revoked)?;
    if revocations > 0 {
        tracing::info!(revocations, "revoked hosts refused at the handshake");
    }
    let enrolment = match &config.enrolment {
        Some(e) => Some(start_enrolment(e, &config.tls, store.clone(), revoked.clone()).await?),
        None => None,
    };
    let artifacts = ArtifactStore::open(&config.state_dir)?;
    let registry = Arc::new(Registry::new(RegistrySettings {
        unreachable_after: config.unreachable_after,
        ..RegistrySettings::default()
    }));
    // A new epoch for this run: every order carries it; agents refuse an older one as a replay.
    registry.set_epoch(crate::store::start_epoch(store.clone()).await?);

    // Everything this function starts stops on `inner`; it is cancelled by `shutdown`, and also
    // on our own way out when serving fails.
    let inner = shutdown.child_token();
    let tasks = TaskTracker::new();
    {
        let registry = registry.clone();
        let inner = inner.clone();
        tasks.spawn(async move { registry.run_reaper(inner).await });
    }
    let enrolment = match enrolment {
        None => None,
        Some((state, listener, tls)) => {
            let service = EnrolServiceServer::new(crate::enrolment::Enroller(state.clone()))
                .max_decoding_message_size(64 * 1024);
            let incoming = serin_security::transport::AnonymousTlsIncoming::new(listener, tls);
            let inner = inner.clone();
            tasks.spawn(async move {
                let served = tonic::transport::Server::builder()
                    .concurrency_limit_per_connection(4)
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, inner.cancelled())
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "the enrolment port failed");
                }
            });
            Some(state)
        }
    };

    let rollouts = match start_rollouts(
        store.clone(),
        registry.clone(),
        config.unreachable_after,
        &config.engine,
        inner.clone(),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            inner.cancel();
            tasks.close();
            tasks.wait().await;
            return Err(e);
        }
    };

    let parts = Parts {
        registry: registry.clone(),
        store,
        artifacts,
        rollouts: rollouts.api(),
        connection_cap,
        security,
        revoked,
        enrolment,
        agent: AgentServiceSettings {
            coordinator_id: coordinator_id(addr),
            heartbeat_interval: config.heartbeat_interval,
            hello_timeout: serin_security::limits::hello_timeout(config.unreachable_after),
        },
    };
    let served = serve(parts, listener, tasks.clone(), inner.clone()).await;

    tracing::info!("coordinator draining");
    inner.cancel();
    registry.kick_all();
    tasks.close();
    tasks.wait().await;
    rollouts.join().await;
    tracing::info!("coordinator stopped");
    served.map_err(|e| {
        tracing::error!(error = %e, "gRPC server failed");
        ServerError::Transport(e)
    })
}

/// The listener's security from the `[tls]` configuration: the coordinator's certificate and
/// key loaded and checked (a client certificate, another CA's key, a missing file: an error
/// naming the file), or a loud warning for plaintext.
fn security(
    tls: &TransportSecurity,
    revocation: Arc<dyn serin_security::tls::Revocation>,
) -> Result<listener::Security, ServerError> {
    match tls {
        TransportSecurity::Tls(files) => {
            let material = serin_security::tls::TlsMaterial::load(files)?;
            let config = serin_security::tls::server_config(&material, revocation)?;
            tracing::info!(ca = %files.ca.display(), cert = %files.cert.display(), "serving mutual TLS (client certificates required)");
            Ok(listener::Security::Tls(config))
        }
        TransportSecurity::InsecurePlaintext => {
            tracing::warn!(
                "INSECURE: serving plaintext gRPC without TLS (insecure_plaintext): anyone who \
                 reaches this port can list hosts, push releases and start rollouts; for \
                 development only"
            );
            Ok(listener::Security::InsecurePlaintext)
        }
    }
}

/// What the enrolment port serves with: the shared state, its bound listener and its TLS.
type EnrolmentParts = (
    Arc<crate::enrolment::Enrolment>,
    TcpListener,
    Arc<rustls::ServerConfig>,
);

/// Loads the issuing CA (`[tls] ca` with `[enrolment] ca_key`) and binds the enrolment port.
async fn start_enrolment(
    e: &crate::config::EnrolmentConfig,
    tls: &TransportSecurity,
    store: Arc<dyn Store>,
    revoked: Arc<serin_security::tls::RevokedSet>,
) -> Result<EnrolmentParts, ServerError> {
    let TransportSecurity::Tls(files) = tls else {
        return Err(ServerError::Task(
            "enrolment needs [tls] (it issues certificates)".to_string(),
        ));
    };
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|err| {
            ServerError::Task(format!("enrolment: cannot read {}: {err}", p.display()))
        })
    };
    let ca = serin_security::pki::Ca::from_pem(&read(&files.ca)?, &read(&e.ca_key)?).map_err(
        |problem| {
            ServerError::Task(format!(
                "enrolment.ca_key {} with tls.ca {}: {problem}",
                e.ca_key.display(),
                files.ca.display()
            ))
        },
    )?;
    let material = serin_security::tls::TlsMaterial::load(files)?;
    let tls = serin_security::tls::enrolment_server_config(&material)?;
    let listener = TcpListener::bind(e.listen).await.map_err(|err| {
        ServerError::Task(format!("enrolment.listen {}: cannot bind: {err}", e.listen))
    })?;
    let addr = listener.local_addr().ok();
    tracing::info!(addr = ?addr, lifetime = ?e.agent_cert_lifetime, "enrolment port serving (join tokens, no client certificate)");
    Ok((
        crate::enrolment::Enrolment::new(store, ca, e.agent_cert_lifetime, revoked),
        listener,
        tls,
    ))
}

/// Raises the soft open-files limit to the hard one and returns the connection cap it allows
/// (see [`crate::listener`]); says so in the log, and warns when the limit is low.
fn open_files_cap() -> usize {
    match limits::raise_nofile_limit() {
        Ok(l) => {
            let cap = limits::connection_cap(l.soft);
            if let Some(from) = l.raised_from {
                tracing::info!(
                    from,
                    to = l.soft,
                    hard = l.hard,
                    connection_cap = cap,
                    "raised the open-files limit"
                );
            } else {
                tracing::info!(
                    soft = l.soft,
                    hard = l.hard,
                    connection_cap = cap,
                    "open-files limit"
                );
            }
            if l.soft < 4096 {
                tracing::warn!(
                    limit = l.soft,
                    connection_cap = cap,
                    "low open-files limit: the coordinator can hold about {cap} agents; set LimitNOFILE= higher"
                );
            }
            cap
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit; connections are not capped");
            usize::MAX
        }
    }
}

/// What [`serve`] serves.
pub(crate) struct Parts {
    pub registry: Arc<Registry>,
    pub store: Arc<dyn Store>,
    pub artifacts: ArtifactStore,
    pub rollouts: Arc<dyn RolloutApi>,
    /// Connections beyond this are served for operators only (see [`crate::listener`]).
    pub connection_cap: usize,
    /// Mutual TLS, or plaintext for development.
    pub security: listener::Security,
    /// Hosts refused at the handshake (filled from the store, extended by `RevokeHost`).
    pub revoked: Arc<serin_security::tls::RevokedSet>,
    /// Join tokens, approval and renewal (`[enrolment]`), when configured.
    pub enrolment: Option<Arc<crate::enrolment::Enrolment>>,
    pub agent: AgentServiceSettings,
}

/// HTTP/2 receive window per stream. Agents send small messages; an operator's `artifact push`
/// sends 1 MiB chunks, so one whole chunk may be in flight without waiting for a window update.
/// Windows are credit, not allocations: memory is only used while the coordinator has not read
/// what arrived, and every stream is read continuously.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 receive window per connection: two chunks of one push, or one per stream of two.
pub const CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
/// Largest HTTP/2 frame the coordinator accepts: a 256 KiB artifact chunk in one frame instead
/// of sixteen 16 KiB ones (h2 buffers a frame only as large as it actually is).
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// HTTP/2 ping interval on idle connections.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// Streams one connection may have open at once: an agent uses two (attach and a fetch), an
/// operator a few; a bound keeps one misbehaving client from holding unbounded state.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Serves both gRPC services on `listener` until `inner` is cancelled. Per-stream tasks are
/// spawned on `tasks`; the caller waits for them.
pub(crate) async fn serve(
    parts: Parts,
    listener: TcpListener,
    tasks: TaskTracker,
    inner: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let addr = listener.local_addr().ok();
    let cap = parts.connection_cap;
    let security = parts.security.clone();
    let enforce = matches!(security, listener::Security::Tls(_));
    let refusals = crate::audit::RefusalAudit::start(parts.store.clone(), &tasks, inner.clone());
    let peer_layer = listener::PeerLayer {
        enforce,
        revoked: parts.revoked.clone(),
        refusals: Some(refusals.clone()),
    };
    let enrol_admin = parts.enrolment.clone().map(|e| {
        EnrolAdminServiceServer::new(crate::enrolment::EnrolAdmin(e))
            .max_decoding_message_size(64 * 1024)
    });
    let renew = parts.enrolment.clone().map(|e| {
        RenewServiceServer::new(crate::enrolment::Renewer(e)).max_decoding_message_size(64 * 1024)
    });
    let agent = AgentServiceImpl::new(
        parts.agent,
        parts.registry.clone(),
        parts.artifacts.clone(),
        tasks,
        inner.clone(),
    )
    .with_refusal_audit(refusals);
    let control = crate::audit::AuditedControl::new(
        ControlServiceImpl::new(
            parts.registry.clone(),
            parts.store.clone(),
            parts.artifacts,
            parts.rollouts,
            inner.clone(),
        ),
        parts.store,
        parts.registry,
        parts.revoked,
    );
    tracing::info!(addr = ?addr, tls = enforce, "coordinator serving");
    tonic::transport::Server::builder()
        // TCP_NODELAY is set by our own accept loop: tonic's setting only reaches listeners
        // tonic binds itself, not `serve_with_incoming*`.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_adaptive_window(Some(false))
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // Agents are watched by their heartbeats (the reaper, `unreachable_after`); HTTP/2 pings
        // only catch half-open idle connections. Every 10 s they were 2,000 pings/s at 20,000
        // agents, a third of the coordinator's steady-state CPU.
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Identity into every request; with TLS, the access policy before any handler.
        .layer(peer_layer)
        .add_service(
            AgentServiceServer::new(agent)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        )
        .add_service(
            ControlServiceServer::new(control)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE),
        )
        .add_optional_service(enrol_admin)
        .add_optional_service(renew)
        .serve_with_incoming_shutdown(
            listener::incoming(listener, cap, Arc::default(), security),
            async move { inner.cancelled().await },
        )
        .await
}

/// The running rollout engine, as the server holds it.
struct Rollouts {
    manager: crate::rollout::RolloutManager,
}

impl Rollouts {
    fn api(&self) -> Arc<dyn RolloutApi> {
        Arc::new(self.manager.clone())
    }

    /// Waits for every rollout task (after shutdown was cancelled).
    async fn join(self) {
        self.manager.join().await;
    }
}

async fn start_rollouts(
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    unreachable_after: std::time::Duration,
    engine: &crate::config::EngineConfig,
    shutdown: CancellationToken,
) -> Result<Rollouts, ServerError> {
    let fleet: Arc<dyn Fleet> = registry;
    // After a restart, hosts are "unknown" (not unreachable) for as long as a live agent can take
    // to be noticed as gone.
    let settings = engine.settings(unreachable_after);
    let manager = crate::rollout::RolloutManager::start(store, fleet, settings, shutdown)
        .await
        .map_err(|e| ServerError::Rollouts(e.to_string()))?;
    Ok(Rollouts { manager })
}

/// A real server on 127.0.0.1:0 with direct access to its parts, for the tests of the services.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::{Duration, Instant};

    use serin_proto::wire;
    use serin_proto::wire::agent_service_client::AgentServiceClient;
    use serin_proto::wire::control_service_client::ControlServiceClient;
    use tokio::sync::{mpsc, watch};
    use tonic::Status;
    use tonic::transport::Channel;

    use super::*;
    use crate::store::MemoryStore;

    /// A rollout engine that knows no rollouts.
    pub(crate) struct NoRollouts;

    #[tonic::async_trait]
    impl RolloutApi for NoRollouts {
        async fn plan(&self, _: wire::RolloutSpec) -> Result<wire::RolloutPlan, Status> {
            Err(Status::unimplemented("no engine in this test"))
        }
        async fn start_rollout(&self, _: wire::RolloutSpec) -> Result<wire::RolloutStatus, Status> {
            Err(Status::unimplemented("no engine in this test"))
        }
        async fn status(&self, id: &str) -> Result<wire::RolloutStatus, Status> {
            Err(Status::not_found(format!("no rollout {id}")))
        }
        fn watch(&self, id: &str) -> Result<watch::Receiver<crate::rollout::RolloutView>, Status> {
            Err(Status::not_found(format!("no rollout {id}")))
        }
        async fn list(&self, _: Option<&str>) -> Result<Vec<wire::RolloutStatus>, Status> {
            Ok(Vec::new())
        }
        async fn control(&self, req: wire::ControlRequest) -> Result<wire::RolloutStatus, Status> {
            Err(Status::not_found(format!("no rollout {}", req.rollout_id)))
        }
        async fn explain(&self, id: &str) -> Result<wire::Explanation, Status> {
            Err(Status::not_found(format!("no rollout {id}")))
        }
    }

    /// Polls `cond` every 20 ms until it holds, failing the test after `timeout`.
    pub(crate) async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) struct TestServer {
        pub addr: SocketAddr,
        pub registry: Arc<Registry>,
        pub store: Arc<dyn Store>,
        pub artifacts: ArtifactStore,
        shutdown: CancellationToken,
        tasks: TaskTracker,
        handle: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
        _dir: tempfile::TempDir,
    }

    impl TestServer {
        pub(crate) async fn start(unreachable_after: Duration) -> Self {
            Self::start_with(unreachable_after, Arc::new(NoRollouts)).await
        }

        pub(crate) async fn start_with(
            unreachable_after: Duration,
            rollouts: Arc<dyn RolloutApi>,
        ) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let registry = Arc::new(Registry::new(RegistrySettings {
                unreachable_after,
                ..RegistrySettings::default()
            }));
            let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
            let artifacts = ArtifactStore::open(dir.path()).expect("artifacts");
            let shutdown = CancellationToken::new();
            let tasks = TaskTracker::new();
            {
                let (registry, shutdown) = (registry.clone(), shutdown.clone());
                tasks.spawn(async move { registry.run_reaper(shutdown).await });
            }
            let parts = Parts {
                registry: registry.clone(),
                store: store.clone(),
                artifacts: artifacts.clone(),
                rollouts,
                connection_cap: usize::MAX,
                security: crate::listener::Security::InsecurePlaintext,
                revoked: Arc::default(),
                enrolment: None,
                agent: AgentServiceSettings {
                    coordinator_id: "test-coordinator".into(),
                    heartbeat_interval: Duration::from_millis(100),
                    hello_timeout: Duration::from_secs(5),
                },
            };
            let handle = tokio::spawn(serve(parts, listener, tasks.clone(), shutdown.clone()));
            Self {
                addr,
                registry,
                store,
                artifacts,
                shutdown,
                tasks,
                handle: Some(handle),
                _dir: dir,
            }
        }

        pub(crate) fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        pub(crate) async fn agent_client(&self) -> AgentServiceClient<Channel> {
            AgentServiceClient::connect(self.url())
                .await
                .expect("connect agent client")
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
        }

        pub(crate) async fn control_client(&self) -> ControlServiceClient<Channel> {
            ControlServiceClient::connect(self.url())
                .await
                .expect("connect control client")
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE)
        }

        /// Shuts down and checks that the server and every task it started stopped in time.
        pub(crate) async fn stop(mut self) {
            self.shutdown.cancel();
            self.registry.kick_all();
            let handle = self.handle.take().expect("running");
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("server stops within 10s of shutdown")
                .expect("server task")
                .expect("server result");
            self.tasks.close();
            tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
                .await
                .expect("every stream task stops within 10s of shutdown");
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    /// An agent's end of an `Attach` stream.
    pub(crate) struct FakeAgent {
        pub tx: mpsc::Sender<wire::AgentMessage>,
        pub inbound: tonic::Streaming<wire::CoordinatorMessage>,
    }

    pub(crate) fn hello(host: &str, labels: &[(&str, &str)]) -> wire::Hello {
        wire::Hello {
            host_id: host.into(),
            hostname: format!("{host}.test"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agent_version: "test".into(),
            services: vec![wire::ServiceInventory {
                service: "web".into(),
                current_release: "web-1".into(),
                kept_releases: vec!["web-1".into()],
                state: wire::ServiceState::Running as i32,
                healthy: true,
                previous_release: String::new(),
                last_seq: 0,
                ..Default::default()
            }],
        }
    }

    impl FakeAgent {
        /// Opens a stream and sends `first`; returns the agent and the welcome.
        pub(crate) async fn attach_with(
            server: &TestServer,
            first: wire::agent_message::Body,
        ) -> Result<(Self, wire::Welcome), Status> {
            let (tx, rx) = mpsc::channel(64);
            tx.send(wire::AgentMessage { body: Some(first) })
                .await
                .expect("queue first message");
            let mut client = server.agent_client().await;
            let mut inbound = client
                .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let msg = tokio::time::timeout(Duration::from_secs(5), inbound.message())
                .await
                .map_err(|_| Status::deadline_exceeded("no welcome within 5s"))??
                .ok_or_else(|| Status::aborted("stream ended before the welcome"))?;
            match msg.body {
                Some(wire::coordinator_message::Body::Welcome(w)) => Ok((Self { tx, inbound }, w)),
                other => panic!("expected a welcome first, got {other:?}"),
            }
        }

        pub(crate) async fn attach(
            server: &TestServer,
            hello: wire::Hello,
        ) -> (Self, wire::Welcome) {
            Self::attach_with(server, wire::agent_message::Body::Hello(hello))
                .await
                .expect("attach")
        }

        /// The next message from the coordinator (or the stream's end / error).
        pub(crate) async fn next(&mut self) -> Result<Option<wire::CoordinatorMessage>, Status> {
            tokio::time::timeout(Duration::from_secs(5), self.inbound.message())
                .await
                .map_err(|_| Status::deadline_exceeded("nothing from the coordinator within 5s"))?
        }

        pub(crate) async fn send(&self, body: wire::agent_message::Body) {
            self.tx
                .send(wire::AgentMessage { body: Some(body) })
                .await
                .expect("send to coordinator");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serin_proto::wire;
    use serin_proto::wire::agent_service_client::AgentServiceClient;
    use serin_proto::wire::control_service_client::ControlServiceClient;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;

    /// `run` on a port-0 listener, cancelled when dropped.
    struct Running {
        shutdown: CancellationToken,
        handle: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
        url: String,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    impl Running {
        async fn start(state_dir: &std::path::Path) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let config = CoordinatorConfig {
                listen: addr,
                state_dir: state_dir.to_path_buf(),
                heartbeat_interval: Duration::from_millis(200),
                unreachable_after: Duration::from_secs(2),
                ..Default::default()
            };
            let shutdown = CancellationToken::new();
            let handle = tokio::spawn(run(config, listener, shutdown.clone()));
            Self {
                shutdown,
                handle: Some(handle),
                url: format!("http://{addr}"),
            }
        }

        async fn stop(mut self) {
            self.shutdown.cancel();
            let handle = self.handle.take().unwrap();
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("run returns within 10s of shutdown")
                .expect("run task")
                .expect("run result");
        }
    }

    #[tokio::test]
    async fn run_serves_both_services_keeps_state_and_stops_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let server = Running::start(dir.path()).await;

        // An agent attaches and is welcomed with the configured heartbeat.
        let (tx, rx) = mpsc::channel(8);
        tx.send(wire::AgentMessage {
            body: Some(wire::agent_message::Body::Hello(testing::hello(
                "h1",
                &[("zone", "a")],
            ))),
        })
        .await
        .unwrap();
        let mut agent = AgentServiceClient::connect(server.url.clone())
            .await
            .unwrap();
        let mut inbound = agent
            .attach(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let welcome = inbound.message().await.unwrap().unwrap();
        assert!(matches!(
            welcome.body,
            Some(wire::coordinator_message::Body::Welcome(w)) if w.heartbeat_interval_ms == 200
        ));

        // An operator pushes a release and plans a rollout through the real engine.
        let mut ctl = ControlServiceClient::connect(server.url.clone())
            .await
            .unwrap();
        let info = ctl
            .push_artifact(futures::stream::iter(vec![wire::PushArtifactChunk {
                manifest: String::new(),
                service: "web".into(),
                release_id: "web-2".into(),
                data: b"new binary".to_vec().into(),
            }]))
            .await
            .unwrap()
            .into_inner();
        assert!(!info.deduplicated);
        let hosts = ctl
            .list_hosts(wire::ListHostsRequest {
                selector: "zone=a".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .hosts;
        assert_eq!(hosts.len(), 1);
        let plan = ctl
            .plan_rollout(wire::RolloutSpec {
                service: "web".into(),
                release: "web-2".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let planned: Vec<_> = plan.waves.iter().flat_map(|w| w.host_ids.clone()).collect();
        assert_eq!(planned, vec!["h1"]);

        // Shutdown returns although an agent stream is still open, and ends that stream.
        server.stop().await;
        let end = inbound.message().await;
        assert!(!matches!(end, Ok(Some(_))), "{end:?}");

        // State survives a restart: the release is still there, its blob still served.
        let server = Running::start(dir.path()).await;
        let mut ctl = ControlServiceClient::connect(server.url.clone())
            .await
            .unwrap();
        let releases = ctl
            .list_releases(wire::ListReleasesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .releases;
        assert_eq!(releases.len(), 1);
        let rel = releases[0].release.clone().unwrap();
        assert_eq!(rel.id, "web-2");
        let mut agent = AgentServiceClient::connect(server.url.clone())
            .await
            .unwrap();
        let mut chunks = agent
            .fetch_artifact(wire::FetchArtifactRequest {
                sha256: rel.sha256,
                offset: 4,
            })
            .await
            .unwrap()
            .into_inner();
        let chunk = chunks.message().await.unwrap().unwrap();
        assert_eq!(chunk.data, &b"binary"[..]);
        server.stop().await;
    }

    /// Nagle's algorithm on an accepted socket holds a small write back while an earlier
    /// segment is unacknowledged, and the agent delays its ACK (~40 ms on Linux): the first
    /// order after the welcome reached a fresh agent ~35 ms late before the accept loop set
    /// `TCP_NODELAY` itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orders_reach_an_agent_without_a_nagle_delay() {
        use crate::fleet::Fleet as _;
        use serin_proto::{HostId, Order, OrderAction, ServiceName};

        let server = testing::TestServer::start(Duration::from_secs(30)).await;
        let mut took = Vec::new();
        for i in 0..7 {
            let id = format!("h{i}");
            let (mut agent, _) =
                testing::FakeAgent::attach(&server, testing::hello(&id, &[])).await;
            let order = Order {
                epoch: 0,
                order_id: format!("o{i}"),
                rollout_id: String::new(),
                seq: 1,
                service: ServiceName::new("web").unwrap(),
                action: OrderAction::Cancel,
            };
            let t = std::time::Instant::now();
            assert!(server.registry.send(&HostId::new(&id).unwrap(), order));
            let msg = agent.next().await.unwrap().unwrap();
            took.push(t.elapsed());
            assert!(matches!(
                msg.body,
                Some(wire::coordinator_message::Body::Order(o)) if o.order_id == format!("o{i}")
            ));
        }
        took.sort();
        let median = took[took.len() / 2];
        assert!(
            median < Duration::from_millis(15),
            "median latency of a first order {median:?} (all: {took:?})"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn run_refuses_an_inconsistent_config() {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = CoordinatorConfig {
            listen: listener.local_addr().unwrap(),
            state_dir: dir.path().to_path_buf(),
            heartbeat_interval: Duration::from_secs(10),
            unreachable_after: Duration::from_secs(5),
            ..Default::default()
        };
        let e = run(config, listener, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("unreachable_after"), "{e}");
    }
}
