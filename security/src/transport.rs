//! mTLS for tonic: the coordinator's accepting side, the clients' connecting side, and who may
//! call what.
//!
//! TLS is terminated here with tokio-rustls (ring), not by tonic's own TLS support, so that the
//! handshake runs serin's [`crate::tls::server_config`] verifier (identity, revocation) and every
//! accepted connection carries its verified [`PeerInfo`]:
//!
//! - [`TlsIncoming`]: a stream of accepted, handshaken connections for
//!   `Server::serve_with_incoming_shutdown`. Handshakes run concurrently, each bounded by a timeout;
//!   a refused connection is logged with its reason (and reported on an optional channel), never
//!   handed to tonic. A plaintext client on the TLS port is recognised by its first byte.
//! - [`peer_identity`]: the verified identity behind a tonic request.
//! - [`AuthorizeLayer`]: a tower layer for `Server::builder().layer(..)` that refuses, before any
//!   handler runs, an agent on the operator API, an operator on the agent API, and an operator
//!   whose role is below what the method needs ([`required_access`], default deny).
//! - [`ClientTransport`] and [`connect`]: a tonic `Channel` over TLS with the pinned CA and the
//!   coordinator's name verified, or plaintext only when explicitly asked for; the URL scheme must
//!   match (`https://` with TLS, `http://` without), never a silent downgrade.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, Stream, StreamExt as _};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity::{PeerIdentity, Role};

/// How long a client waits, after its handshake, for the coordinator's first bytes (which prove
/// that the coordinator accepted its certificate).
pub const PROOF_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has to complete the TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many handshakes in progress; further connections wait in the kernel's backlog.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// What the coordinator knows about the peer of a connection; in every request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote_addr: SocketAddr,
    /// Our address of the connection.
    pub local_addr: Option<SocketAddr>,
    /// The identity its verified certificate carries.
    pub identity: PeerIdentity,
    /// The certificate's serial number (for revocation and the audit log).
    pub serial: Vec<u8>,
}

/// A connection refused before it reached tonic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Who tried.
    pub remote_addr: SocketAddr,
    /// Why it was refused.
    pub reason: RefusalReason,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefusalReason {
    /// The first byte was not a TLS handshake record: a plaintext client on the TLS port.
    #[error("not a TLS client (first byte {0:#04x}; a plaintext client on the TLS port?)")]
    NotTls(u8),
    /// The TLS handshake failed: no, untrusted, expired, revoked or wrong-kind certificate, ...
    #[error("tls handshake failed: {0}")]
    Handshake(String),
    /// The client did not finish the handshake in time.
    #[error("tls handshake not finished within {0:?}")]
    Timeout(Duration),
    /// The connection closed before anything was sent.
    #[error("closed before the tls handshake")]
    Closed,
}

/// A server-side TLS connection with its verified peer.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("info", &self.info).finish()
    }
}

impl TlsConn {
    /// The verified peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.info
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Runs the server side of one TLS handshake on an accepted `tcp` connection, bounded by `limit`:
/// a plaintext client is recognised by its first byte; the verified peer comes back with the
/// stream. Used by [`TlsIncoming`] and by the coordinator's own accept loop.
pub async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    remote_addr: SocketAddr,
    limit: Duration,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, PeerInfo), Refusal> {
    let refuse = move |reason| Refusal {
        remote_addr,
        reason,
    };
    let run = async move {
        let _ = tcp.set_nodelay(true);
        let local_addr = tcp.local_addr().ok();
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(0) | Err(_) => return Err(RefusalReason::Closed),
            Ok(_) if first[0] != 0x16 => return Err(RefusalReason::NotTls(first[0])),
            Ok(_) => {}
        }
        let tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| RefusalReason::Handshake(e.to_string()))?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| RefusalReason::Handshake("no client certificate".to_string()))?;
        // The verifier already parsed this identity; parsing again cannot fail, but is
        // handled rather than assumed.
        let identity = PeerIdentity::from_certificate(leaf)
            .map_err(|e| RefusalReason::Handshake(e.to_string()))?;
        let serial = crate::tls::certificate_serial(leaf).unwrap_or_default();
        let info = PeerInfo {
            remote_addr,
            local_addr,
            identity,
            serial,
        };
        Ok((tls, info))
    };
    match tokio::time::timeout(limit, run).await {
        Ok(result) => result.map_err(refuse),
        Err(_) => Err(refuse(RefusalReason::Timeout(limit))),
    }
}

/// Accepted and verified TLS connections from a listener, for tonic's `serve_with_incoming*`.
///
/// All work happens inside `poll_next` (no spawned task), so dropping the stream, as tonic does at
/// shutdown, closes the listener and abandons the handshakes in progress.
pub struct TlsIncoming {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
    pending: FuturesUnordered<BoxFuture<'static, Result<TlsConn, Refusal>>>,
    refusals: Option<mpsc::Sender<Refusal>>,
}

impl std::fmt::Debug for TlsIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIncoming")
            .field("listener", &self.listener)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl TlsIncoming {
    /// Serves TLS with `config` (from [`crate::tls::server_config`]) on `listener`.
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            pending: FuturesUnordered::new(),
            refusals: None,
        }
    }

    /// Bounds the time a client has to complete its handshake.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Also reports every refused connection on `tx` (dropped when the channel is full), e.g. for
    /// metrics or tests.
    pub fn with_refusal_reports(mut self, tx: mpsc::Sender<Refusal>) -> Self {
        self.refusals = Some(tx);
        self
    }

    fn start_handshake(&self, tcp: TcpStream, remote_addr: SocketAddr) {
        let acceptor = self.acceptor.clone();
        let limit = self.handshake_timeout;
        let handshake = async move {
            let (inner, info) = handshake(&acceptor, tcp, remote_addr, limit).await?;
            Ok(TlsConn { inner, info })
        };
        self.pending.push(handshake.boxed());
    }

    fn report(&self, refusal: Refusal) {
        tracing::warn!(
            peer = %refusal.remote_addr,
            reason = %refusal.reason,
            "connection refused"
        );
        if let Some(tx) = &self.refusals {
            let _ = tx.try_send(refusal);
        }
    }
}

impl Stream for TlsIncoming {
    type Item = Result<TlsConn, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            while self.pending.len() < MAX_PENDING_HANDSHAKES {
                match self.listener.poll_accept(cx) {
                    Poll::Ready(Ok((tcp, addr))) => self.start_handshake(tcp, addr),
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(error = %e, "cannot accept a connection");
                        return Poll::Ready(Some(Err(e)));
                    }
                    Poll::Pending => break,
                }
            }
            match self.pending.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(conn))) => {
                    tracing::debug!(peer = %conn.info.remote_addr, identity = %conn.info.identity, "tls connection accepted");
                    return Poll::Ready(Some(Ok(conn)));
                }
                Poll::Ready(Some(Err(refusal))) => self.report(refusal),
                // Empty: the listener is registered for wake-ups (its poll returned Pending).
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A server-authenticated TLS connection without a client identity: the enrolment port.
pub struct AnonymousTlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    remote_addr: SocketAddr,
    local_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for AnonymousTlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnonymousTlsConn")
            .field("remote_addr", &self.remote_addr)
            .finish()
    }
}

impl Connected for AnonymousTlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local_addr,
            remote_addr: Some(self.remote_addr),
        }
    }
}

impl AsyncRead for AnonymousTlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AnonymousTlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepted server-authenticated TLS connections (no client certificate), for the enrolment
/// port only ([`crate::tls::enrolment_server_config`]). Like [`TlsIncoming`]: handshakes run
/// concurrently, bounded in number and time; a refused one is logged and dropped.
pub struct AnonymousTlsIncoming {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    pending: FuturesUnordered<BoxFuture<'static, Result<AnonymousTlsConn, Refusal>>>,
}

impl std::fmt::Debug for AnonymousTlsIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnonymousTlsIncoming")
            .field("listener", &self.listener)
            .finish()
    }
}

impl AnonymousTlsIncoming {
    /// Serves TLS with `config` on `listener`.
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        Self {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            pending: FuturesUnordered::new(),
        }
    }
}

impl Stream for AnonymousTlsIncoming {
    type Item = Result<AnonymousTlsConn, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            while self.pending.len() < MAX_PENDING_HANDSHAKES {
                match self.listener.poll_accept(cx) {
                    Poll::Ready(Ok((tcp, remote_addr))) => {
                        let acceptor = self.acceptor.clone();
                        let run = async move {
                            let _ = tcp.set_nodelay(true);
                            let local_addr = tcp.local_addr().ok();
                            let accept = acceptor.accept(tcp);
                            match tokio::time::timeout(DEFAULT_HANDSHAKE_TIMEOUT, accept).await {
                                Ok(Ok(inner)) => Ok(AnonymousTlsConn {
                                    inner,
                                    remote_addr,
                                    local_addr,
                                }),
                                Ok(Err(e)) => Err(Refusal {
                                    remote_addr,
                                    reason: RefusalReason::Handshake(e.to_string()),
                                }),
                                Err(_) => Err(Refusal {
                                    remote_addr,
                                    reason: RefusalReason::Timeout(DEFAULT_HANDSHAKE_TIMEOUT),
                                }),
                            }
                        };
                        self.pending.push(run.boxed());
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(error = %e, "cannot accept a connection");
                        return Poll::Ready(Some(Err(e)));
                    }
                    Poll::Pending => break,
                }
            }
            match self.pending.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(conn))) => return Poll::Ready(Some(Ok(conn))),
                Poll::Ready(Some(Err(refusal))) => {
                    tracing::warn!(peer = %refusal.remote_addr, reason = %refusal.reason, "enrolment connection refused");
                }
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The verified identity behind a request served through [`TlsIncoming`];
/// `unauthenticated` when the connection carries none (a plaintext development server).
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<&PeerIdentity, tonic::Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| &p.identity)
        .ok_or_else(|| {
            tonic::Status::unauthenticated("no verified client certificate on this connection")
        })
}

/// The host id of the agent behind `request`; `permission_denied` for any other identity.
pub fn agent_host<T>(request: &tonic::Request<T>) -> Result<&serin_proto::HostId, tonic::Status> {
    match peer_identity(request)? {
        PeerIdentity::Agent { host_id } => Ok(host_id),
        other => Err(tonic::Status::permission_denied(format!(
            "{other} is not an agent identity"
        ))),
    }
}

/// Checks the host id an agent claims (in its hello) against the one in its certificate.
pub fn check_claimed_host(
    certified: &serin_proto::HostId,
    claimed: &serin_proto::HostId,
) -> Result<(), tonic::Status> {
    if certified == claimed {
        Ok(())
    } else {
        Err(tonic::Status::permission_denied(format!(
            "the hello claims host {claimed}, but this agent's certificate is for host {certified}"
        )))
    }
}

/// The operator behind `request` (name and role), e.g. for the audit log.
pub fn operator<T>(
    request: &tonic::Request<T>,
) -> Result<(&crate::identity::OperatorName, Role), tonic::Status> {
    match peer_identity(request)? {
        PeerIdentity::Operator { name, role } => Ok((name, *role)),
        other => Err(tonic::Status::permission_denied(format!(
            "{other} is not an operator identity"
        ))),
    }
}

/// A human explanation of a failed connection or call, from the text of its error chain (the TLS
/// alert a refusing coordinator sends, or the verification error of our own side); `None` when
/// nothing is recognised. For the CLI and the agent's logs.
pub fn explain_failure(error_text: &str) -> Option<&'static str> {
    const HINTS: &[(&str, &str)] = &[
        (
            "CertificateRequired",
            "the coordinator requires a client certificate and none was presented",
        ),
        (
            "UnknownCA",
            "the coordinator does not trust the CA that issued this certificate",
        ),
        (
            "CertificateExpired",
            "the coordinator refused this certificate as expired or not yet valid (check its dates and the clocks)",
        ),
        (
            "CertificateRevoked",
            "this certificate has been revoked by the coordinator",
        ),
        (
            "BadCertificate",
            "the coordinator refused this certificate (no serin identity, or the wrong kind)",
        ),
        (
            "not valid for name",
            "the coordinator's certificate is not valid for the name dialled (use a name or address it was issued for)",
        ),
        (
            "UnknownIssuer",
            "the coordinator's certificate is not issued by the pinned serin CA",
        ),
        (
            "connection reset",
            "the connection was reset; a coordinator serving TLS resets plaintext clients (use https:// with a CA and a certificate)",
        ),
    ];
    HINTS
        .iter()
        .find(|(needle, _)| error_text.contains(needle))
        .map(|(_, hint)| *hint)
}

/// Who may call a gRPC method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Agents only (the agent API).
    Agent,
    /// Operators holding at least this role.
    Operator(Role),
    /// Any verified identity (gRPC health).
    AnyPeer,
}

/// The access rule of a gRPC method path (`/serin.v1.ControlService/StartRollout`); `None` for
/// every path not listed: default deny.
pub fn required_access(path: &str) -> Option<Access> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    match service {
        "serin.v1.AgentService" => match method {
            "Attach" | "FetchArtifact" => Some(Access::Agent),
            _ => None,
        },
        "serin.v1.ControlService" => match method {
            "ListHosts" | "ListReleases" | "PlanRollout" | "GetRollout" | "WatchRollout"
            | "ListRollouts" | "ExplainRollout" => Some(Access::Operator(Role::Viewer)),
            "PushArtifact" | "RegisterRelease" | "StartRollout" | "ControlRollout" => {
                Some(Access::Operator(Role::Deployer))
            }
            "ListAudit" => Some(Access::Operator(Role::Viewer)),
            "RevokeHost" => Some(Access::Operator(Role::Admin)),
            _ => None,
        },
        // Enrolment (issue 7): tokens and approval are admin calls; listing held enrolments
        // is a read. `EnrolService` is served on the enrolment port only, never here.
        "serin.v1.EnrolAdminService" => match method {
            "CreateToken" | "ApproveHost" => Some(Access::Operator(Role::Admin)),
            "ListPending" => Some(Access::Operator(Role::Viewer)),
            _ => None,
        },
        "serin.v1.RenewService" => match method {
            "Renew" => Some(Access::Agent),
            _ => None,
        },
        "grpc.health.v1.Health" => Some(Access::AnyPeer),
        _ => None,
    }
}

/// Whether `identity` may call `path`; the error is the `permission_denied` message.
pub fn authorize(path: &str, identity: &PeerIdentity) -> Result<(), String> {
    let access = required_access(path).ok_or_else(|| {
        format!(
            "{} is not in serin's access policy (default deny)",
            serin_proto::truncated(path)
        )
    })?;
    match (access, identity) {
        (Access::AnyPeer, _) => Ok(()),
        // The coordinator's own certificate: its readiness/watchdog self-probe reads, nothing more.
        (Access::Operator(Role::Viewer), PeerIdentity::Coordinator) => Ok(()),
        (Access::Agent, PeerIdentity::Agent { .. }) => Ok(()),
        (Access::Agent, other) => Err(format!(
            "{path} is the agent API; {other} is {} certificate, not an agent's",
            article(other.kind())
        )),
        (Access::Operator(needed), PeerIdentity::Operator { role, .. }) => {
            if role.allows(needed) {
                Ok(())
            } else {
                Err(format!(
                    "{path} needs the {needed} role; {identity} has the {role} role"
                ))
            }
        }
        (Access::Operator(_), other) => Err(format!(
            "{path} is the operator API; {other} is {} certificate, not an operator's",
            article(other.kind())
        )),
    }
}

fn article(kind: &str) -> String {
    match kind.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {kind}"),
        _ => format!("a {kind}"),
    }
}

/// A tower layer enforcing [`authorize`] on every request before it reaches a service; install
/// with `Server::builder().layer(AuthorizeLayer)` on a server fed by [`TlsIncoming`].
/// A request with no [`PeerInfo`] (not served through [`TlsIncoming`]) is `unauthenticated`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthorizeLayer;

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner }
    }
}

/// The service made by [`AuthorizeLayer`].
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::Ready<Result<http::Response<RB>, S::Error>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        // Keep `Request::remote_addr()` working for handlers and their tracing spans.
        if let Some(peer) = req.extensions().get::<PeerInfo>() {
            let tcp = tonic::transport::server::TcpConnectInfo {
                local_addr: peer.local_addr,
                remote_addr: Some(peer.remote_addr),
            };
            req.extensions_mut().insert(tcp);
        }
        let verdict = match req.extensions().get::<PeerInfo>() {
            None => Err(tonic::Status::unauthenticated(
                "no verified client certificate on this connection",
            )),
            Some(peer) => authorize(&path, &peer.identity).map_err(|msg| {
                tracing::warn!(peer = %peer.remote_addr, identity = %peer.identity, method = %path, "call refused");
                tonic::Status::permission_denied(msg)
            }),
        };
        match verdict {
            Ok(()) => futures::future::Either::Right(self.inner.call(req)),
            Err(status) => {
                futures::future::Either::Left(futures::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// How a client reaches the coordinator.
#[derive(Debug, Clone)]
pub enum ClientTransport {
    /// Mutual TLS; the URL must be `https://`.
    Tls {
        /// From [`crate::tls::agent_client_config`] or [`crate::tls::operator_client_config`].
        config: Arc<rustls::ClientConfig>,
        /// The name to verify in the coordinator's certificate; default: the URL's host.
        server_name: Option<String>,
    },
    /// Cleartext, for development only; the URL must be `http://`.
    Plaintext,
}

/// Why a client cannot connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse or has no host.
    #[error("invalid coordinator URL {url:?}: {problem}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong.
        problem: String,
    },
    /// The URL's scheme does not match the transport.
    #[error("{0}")]
    SchemeMismatch(String),
    /// The server name to verify is not a valid DNS name or IP address.
    #[error("invalid coordinator name {0:?} to verify")]
    BadServerName(String),
    /// The connection or the handshake failed.
    #[error("cannot reach the coordinator at {url}: {source}")]
    Transport {
        /// The URL dialled.
        url: String,
        /// tonic's error (its source chain names the TLS problem).
        source: tonic::transport::Error,
    },
}

/// The tonic endpoint and connector for `url` over `transport`, for callers that build their
/// own channel (e.g. lazily). The scheme must match the transport.
pub fn endpoint(
    url: &str,
    transport: &ClientTransport,
) -> Result<(Endpoint, Connector), ConnectError> {
    let bad = |problem: &str| ConnectError::BadUrl {
        url: url.to_string(),
        problem: problem.to_string(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    let host = uri.host().ok_or_else(|| bad("no host"))?.to_string();
    match (uri.scheme_str(), transport) {
        (Some("https"), ClientTransport::Tls { .. })
        | (Some("http"), ClientTransport::Plaintext) => {}
        (Some("http"), ClientTransport::Tls { .. }) => {
            return Err(ConnectError::SchemeMismatch(format!(
                "{url} is plaintext http:// but TLS is configured; use https://"
            )));
        }
        (Some("https"), ClientTransport::Plaintext) => {
            return Err(ConnectError::SchemeMismatch(format!(
                "{url} asks for https:// but no TLS is configured (CA, certificate and key); \
                 refusing to talk cleartext"
            )));
        }
        _ => {
            return Err(bad(
                "the scheme must be https:// (or http:// in plaintext development mode)",
            ));
        }
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let tls = match transport {
        ClientTransport::Plaintext => None,
        ClientTransport::Tls {
            config,
            server_name,
        } => {
            let name = server_name.clone().unwrap_or_else(|| {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            });
            let server_name = ServerName::try_from(name.clone())
                .map_err(|_| ConnectError::BadServerName(name))?;
            Some((
                tokio_rustls::TlsConnector::from(config.clone()),
                server_name,
            ))
        }
    };
    // tonic sees an http:// URI, so its own TLS support (if ever enabled by another crate) never
    // wraps our stream a second time; requests still carry the caller's scheme and authority.
    let dial: Uri = format!(
        "http://{}",
        uri.authority().map(|a| a.as_str()).unwrap_or(&host)
    )
    .parse()
    .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    let origin: Uri = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map(|a| a.as_str()).unwrap_or(&host)
    )
    .parse()
    .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    Ok((
        Endpoint::from(dial).origin(origin),
        Connector { host, port, tls },
    ))
}

/// Connects to `url` over `transport` (see [`endpoint`]).
pub async fn connect(
    url: &str,
    transport: &ClientTransport,
    connect_timeout: Duration,
) -> Result<Channel, ConnectError> {
    let (endpoint, connector) = endpoint(url, transport)?;
    endpoint
        .connect_timeout(connect_timeout)
        .connect_with_connector(connector)
        .await
        .map_err(|source| ConnectError::Transport {
            url: url.to_string(),
            source,
        })
}

/// Dials the coordinator and, with TLS, runs the handshake; for `Endpoint::connect_with_connector`.
#[derive(Clone)]
pub struct Connector {
    host: String,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// The connection a [`Connector`] makes.
pub type ClientIo = hyper_util::rt::TokioIo<ClientStream>;

/// A client connection, TLS or (development) plaintext.
#[derive(Debug)]
pub enum ClientStream {
    /// Mutual TLS, with the first bytes the coordinator sent already read (see
    /// [`Connector`]: they prove it accepted our certificate), handed out first.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>, Prefetched),
    /// Cleartext.
    Plain(TcpStream),
}

/// Bytes read from a connection before its user asked for them.
#[derive(Debug, Default)]
pub struct Prefetched {
    bytes: Vec<u8>,
    at: usize,
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tls(s, pre) => {
                if pre.at < pre.bytes.len() {
                    let n = buf.remaining().min(pre.bytes.len() - pre.at);
                    buf.put_slice(&pre.bytes[pre.at..pre.at + n]);
                    pre.at += n;
                    return Poll::Ready(Ok(()));
                }
                Pin::new(s.as_mut()).poll_read(cx, buf)
            }
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl tower::Service<Uri> for Connector {
    type Response = ClientIo;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, Result<ClientIo, std::io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        async move {
            let tcp = TcpStream::connect((
                this.host.trim_start_matches('[').trim_end_matches(']'),
                this.port,
            ))
            .await?;
            let _ = tcp.set_nodelay(true);
            let stream = match this.tls {
                None => ClientStream::Plain(tcp),
                Some((connector, name)) => {
                    let mut tls = connector.connect(name, tcp).await?;
                    // Under TLS 1.3 our side of the handshake completes before the coordinator
                    // has verified our certificate; its refusal (an alert) only arrives with the
                    // next read, and would surface as a bare "connection closed" in whichever
                    // call comes first. The coordinator speaks first (its HTTP/2 settings), so
                    // wait for those bytes here: a refusal becomes this connection's error, with
                    // the alert's name (e.g. CertificateExpired) for the caller to explain.
                    let mut first = vec![0u8; 4096];
                    let n = tokio::time::timeout(
                        PROOF_TIMEOUT,
                        tokio::io::AsyncReadExt::read(&mut tls, &mut first),
                    )
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the coordinator sent nothing after the TLS handshake",
                        )
                    })??;
                    if n == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the coordinator closed the connection after the TLS handshake",
                        ));
                    }
                    first.truncate(n);
                    ClientStream::Tls(
                        Box::new(tls),
                        Prefetched {
                            bytes: first,
                            at: 0,
                        },
                    )
                }
            };
            Ok(hyper_util::rt::TokioIo::new(stream))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::OperatorName;

    fn operator(role: Role) -> PeerIdentity {
        PeerIdentity::Operator {
            name: OperatorName::new("alice").unwrap(),
            role,
        }
    }

    #[test]
    fn every_control_method_has_a_policy_entry() {
        for (proto, service) in [
            (
                include_str!("../../proto/proto/serin/v1/control.proto"),
                "serin.v1.ControlService",
            ),
            (
                include_str!("../../proto/proto/serin/v1/agent.proto"),
                "serin.v1.AgentService",
            ),
        ] {
            let methods: Vec<&str> = proto
                .lines()
                .filter_map(|l| l.trim().strip_prefix("rpc "))
                .filter_map(|l| l.split('(').next())
                .map(str::trim)
                .collect();
            assert!(!methods.is_empty());
            for m in methods {
                let path = format!("/{service}/{m}");
                assert!(
                    required_access(&path).is_some(),
                    "{path} has no entry in transport::required_access: add one"
                );
            }
        }
    }

    #[test]
    fn every_enrolment_method_has_its_policy() {
        let proto = include_str!("../../proto/proto/serin/v1/enrol.proto");
        let mut service = "";
        let mut seen = 0;
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().unwrap_or_default();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap_or_default().trim();
                let path = format!("/serin.v1.{service}/{method}");
                seen += 1;
                // The enrolment call is never served on the main port: it stays default-deny.
                assert_eq!(
                    required_access(&path).is_none(),
                    service == "EnrolService",
                    "{path}: add it to transport::required_access"
                );
            }
        }
        assert_eq!(seen, 5);
        let create = "/serin.v1.EnrolAdminService/CreateToken";
        assert!(authorize(create, &operator(Role::Deployer)).is_err());
        assert!(authorize(create, &operator(Role::Admin)).is_ok());
    }

    #[test]
    fn the_policy_table_by_role() {
        let agent = PeerIdentity::Agent {
            host_id: serin_proto::HostId::new("h1").unwrap(),
        };
        let list = "/serin.v1.ControlService/ListHosts";
        let start = "/serin.v1.ControlService/StartRollout";
        let attach = "/serin.v1.AgentService/Attach";
        assert!(authorize(list, &operator(Role::Viewer)).is_ok());
        assert!(authorize(start, &operator(Role::Viewer)).is_err());
        assert!(authorize(start, &operator(Role::Deployer)).is_ok());
        assert!(authorize(start, &operator(Role::Admin)).is_ok());
        let e = authorize(list, &agent).unwrap_err();
        assert!(
            e.contains("operator API") && e.contains("an agent certificate"),
            "{e}"
        );
        let e = authorize(attach, &operator(Role::Admin)).unwrap_err();
        assert!(
            e.contains("agent API") && e.contains("an operator certificate"),
            "{e}"
        );
        assert!(authorize(attach, &agent).is_ok());
        let e = authorize(
            "/serin.v1.ControlService/DropDatabase",
            &operator(Role::Admin),
        )
        .unwrap_err();
        assert!(e.contains("default deny"), "{e}");
    }

    #[test]
    fn default_deny_never_echoes_a_long_path_in_full() {
        let path = format!("/serin.v1.ControlService/{}", "X".repeat(4000));
        let e = authorize(&path, &PeerIdentity::Coordinator).unwrap_err();
        assert!(e.len() < 200, "{} bytes: {e}", e.len());
        assert!(
            e.contains("is not in serin's access policy (default deny)"),
            "{e}"
        );
    }

    #[test]
    fn the_scheme_must_match_the_transport() {
        let e = endpoint("https://127.0.0.1:1", &ClientTransport::Plaintext).unwrap_err();
        assert!(e.to_string().contains("refusing to talk cleartext"), "{e}");
        let e = endpoint("ftp://127.0.0.1:1", &ClientTransport::Plaintext).unwrap_err();
        assert!(e.to_string().contains("scheme"), "{e}");
        assert!(endpoint("http://127.0.0.1:1", &ClientTransport::Plaintext).is_ok());
    }
}
