//! The coordinator's accept loop: every accepted socket gets `TCP_NODELAY`, is counted, and can
//! be closed by the server; running out of descriptors backs off with a warning instead of
//! spinning.
//!
//! tonic's own `serve_with_incoming*` takes sockets as they come: the `tcp_nodelay` setting of
//! its builder only applies to listeners it binds itself, and an `accept` error (EMFILE at the
//! open-files limit) is logged at trace level and retried at once, burning a core. [`incoming`]
//! replaces that loop:
//!
//! - `TCP_NODELAY` on every accepted socket, so an order or a small answer is never held back by
//!   Nagle's algorithm waiting for the previous segment's ACK (~40 ms on loopback);
//! - EMFILE / ENFILE / ENOBUFS / ENOMEM: one warning per [`WARN_EVERY`] and an exponential pause
//!   (5 ms up to 1 s) before the next `accept`, while connections already open are served;
//! - a connection cap ([`crate::limits::connection_cap`]): connections accepted beyond it are
//!   marked [`ConnInfo::over_cap`]; the agent service refuses their `Attach` with
//!   `resource_exhausted` and closes them ([`ConnInfo::close`]), so agents cannot take the
//!   descriptors kept in reserve and operators can still connect;
//! - mutual TLS ([`Security::Tls`]): every accepted socket runs its handshake concurrently with
//!   the others (bounded in time and number, `serin_security::transport::handshake`); a refused
//!   handshake is logged with its reason and never reaches tonic. The verified peer rides in
//!   [`ConnInfo::peer`], and [`PeerLayer`] puts it into every request and enforces the access
//!   policy (`serin_security::transport::authorize`, default deny) before any handler runs.
//!   Plaintext ([`Security::InsecurePlaintext`]) exists for development only and has no
//!   identities, hence no policy.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use futures::{Stream, StreamExt as _};
use serin_security::transport::{Authorize, AuthorizeLayer, PeerInfo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Least time between two warnings about the same accept condition.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Accepted connections, shared by the accept loop and every open connection.
#[derive(Debug, Default)]
pub struct ConnectionCount {
    live: AtomicUsize,
}

impl ConnectionCount {
    /// Connections open right now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct Closer {
    closed: AtomicBool,
    waker: AtomicWaker,
}

/// How the coordinator's listener secures its connections.
#[derive(Clone)]
pub enum Security {
    /// Mutual TLS with this configuration (`serin_security::tls::server_config`).
    Tls(Arc<rustls::ServerConfig>),
    /// Cleartext, no identities: development only, explicitly asked for.
    InsecurePlaintext,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Tls(_) => f.write_str("Tls"),
            Security::InsecurePlaintext => f.write_str("InsecurePlaintext"),
        }
    }
}

/// What the services learn about the connection a call came on (`request.extensions()`).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer.
    pub remote: Option<SocketAddr>,
    /// The verified peer of a TLS connection; `None` in plaintext development mode. Shared:
    /// the connection and tonic's per-connection service each hold a `ConnInfo`, and the
    /// identity is needed once per connected agent, not twice.
    pub peer: Option<Arc<PeerInfo>>,
    over_cap: bool,
    closer: Arc<Closer>,
}

impl ConnInfo {
    /// The connection was accepted beyond the connection cap: serve operators, refuse agents.
    pub fn over_cap(&self) -> bool {
        self.over_cap
    }

    /// Closes the connection: its next read fails, and the HTTP/2 server drops it.
    pub fn close(&self) {
        self.closer.closed.store(true, Ordering::Release);
        self.closer.waker.wake();
    }
}

/// Counts one open connection until dropped.
#[derive(Debug)]
struct Counted(Arc<ConnectionCount>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The byte stream of a connection.
#[derive(Debug)]
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection (TLS handshake done, when TLS is on), counted while it is open.
#[derive(Debug)]
pub struct Accepted {
    stream: Conn,
    info: ConnInfo,
    _counted: Counted,
}

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.info.closer.waker.register(cx.waker());
        if self.info.closer.closed.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by the coordinator",
            )));
        }
        match &mut self.stream {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.stream {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Accepted {
    /// The socket (for tests: its options).
    pub fn socket(&self) -> &TcpStream {
        match &self.stream {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }
}

/// Whether an `accept` error means "out of descriptors or memory": back off, do not spin.
fn is_exhaustion(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
}

struct AcceptLoop {
    listener: TcpListener,
    cap: usize,
    count: Arc<ConnectionCount>,
    backoff: Duration,
    last_exhausted_warn: Option<Instant>,
    exhausted_since_warn: u64,
    last_cap_warn: Option<Instant>,
    over_cap_since_warn: u64,
}

fn due(last: Option<Instant>) -> bool {
    last.is_none_or(|t| t.elapsed() >= WARN_EVERY)
}

impl AcceptLoop {
    async fn next(&mut self) -> (TcpStream, ConnInfo, Counted) {
        loop {
            match self.listener.accept().await {
                Ok((stream, remote)) => {
                    self.backoff = Duration::ZERO;
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(peer = %remote, error = %e, "cannot set TCP_NODELAY");
                    }
                    let before = self.count.live.fetch_add(1, Ordering::Relaxed);
                    let over_cap = before >= self.cap;
                    if over_cap {
                        self.over_cap_since_warn += 1;
                        if due(self.last_cap_warn) {
                            tracing::warn!(
                                connections = before + 1,
                                cap = self.cap,
                                refused_since_last_warning = self.over_cap_since_warn,
                                "connection cap reached (open-files limit): new agent streams are refused until connections close; operators are still served"
                            );
                            self.last_cap_warn = Some(Instant::now());
                            self.over_cap_since_warn = 0;
                        }
                    }
                    let info = ConnInfo {
                        remote: Some(remote),
                        peer: None,
                        over_cap,
                        closer: Arc::default(),
                    };
                    return (stream, info, Counted(self.count.clone()));
                }
                Err(e) if is_exhaustion(&e) => {
                    self.exhausted_since_warn += 1;
                    self.backoff =
                        (self.backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    if due(self.last_exhausted_warn) {
                        tracing::warn!(
                            error = %e,
                            connections = self.count.live(),
                            failed_accepts = self.exhausted_since_warn,
                            retry_in_ms = self.backoff.as_millis() as u64,
                            "cannot accept connections: out of file descriptors; backing off (raise LimitNOFILE or add coordinators)"
                        );
                        self.last_exhausted_warn = Some(Instant::now());
                        self.exhausted_since_warn = 0;
                    }
                    tokio::time::sleep(self.backoff).await;
                }
                Err(e) => {
                    // ECONNABORTED and friends: that one connection is gone, the listener is fine.
                    tracing::debug!(error = %e, "accept failed");
                }
            }
        }
    }
}

/// The stream of accepted connections tonic serves: never yields an error (see the module doc).
pub fn incoming(
    listener: TcpListener,
    cap: usize,
    count: Arc<ConnectionCount>,
    security: Security,
) -> impl Stream<Item = Result<Accepted, io::Error>> + Send + 'static {
    let state = AcceptLoop {
        listener,
        cap,
        count,
        backoff: Duration::ZERO,
        last_exhausted_warn: None,
        exhausted_since_warn: 0,
        last_cap_warn: None,
        over_cap_since_warn: 0,
    };
    let tcp = futures::stream::unfold(state, |mut s| async move {
        let accepted = s.next().await;
        Some((accepted, s))
    });
    let acceptor = match security {
        Security::Tls(config) => Some(tokio_rustls::TlsAcceptor::from(config)),
        Security::InsecurePlaintext => None,
    };
    tcp.map(move |(stream, mut info, counted)| {
        let acceptor = acceptor.clone();
        async move {
            let Some(acceptor) = acceptor else {
                return Some(Ok(Accepted {
                    stream: Conn::Plain(stream),
                    info,
                    _counted: counted,
                }));
            };
            let remote = info
                .remote
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
            match serin_security::transport::handshake(&acceptor, stream, remote, HANDSHAKE_TIMEOUT)
                .await
            {
                Ok((tls, peer)) => {
                    tracing::debug!(peer = %remote, identity = %peer.identity, "tls connection accepted");
                    info.peer = Some(Arc::new(peer));
                    Some(Ok(Accepted {
                        stream: Conn::Tls(Box::new(tls)),
                        info,
                        _counted: counted,
                    }))
                }
                Err(refusal) => {
                    tracing::warn!(peer = %refusal.remote_addr, reason = %refusal.reason, "connection refused");
                    None
                }
            }
        }
    })
    // Handshakes run concurrently; a slow or silent client holds one slot for at most
    // HANDSHAKE_TIMEOUT, and beyond MAX_PENDING_HANDSHAKES new sockets wait in the backlog.
    .buffer_unordered(serin_security::transport::MAX_PENDING_HANDSHAKES)
    .filter_map(futures::future::ready)
}

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = serin_security::transport::DEFAULT_HANDSHAKE_TIMEOUT;

/// A tower layer for the coordinator's gRPC server: puts the verified [`PeerInfo`] of the
/// connection into every request, and with TLS enforces the access policy
/// ([`AuthorizeLayer`]: an agent only on the agent API, an operator only on the control API
/// and only as its role allows, default deny) before any handler runs.
///
/// Every call it refuses is handed to the audit log ([`crate::audit::RefusalAudit`]).
///
/// It also refuses every call from a certificate revoked since its connection was accepted,
/// and closes that connection, so the peer's next try needs a new handshake, which the
/// revocation hook refuses (`serin hosts revoke` takes effect on connections already open).
#[derive(Debug, Clone)]
pub struct PeerLayer {
    /// False only in plaintext development mode (no identities to check).
    pub enforce: bool,
    /// The revoked identities and certificates.
    pub revoked: Arc<dyn serin_security::tls::Revocation>,
    /// Where refused calls are audited (none in unit tests).
    pub refusals: Option<crate::audit::RefusalAudit>,
}

impl<S: Clone> tower::Layer<S> for PeerLayer {
    type Service = PeerService<S>;
    fn layer(&self, inner: S) -> PeerService<S> {
        PeerService {
            authorized: tower::Layer::layer(&AuthorizeLayer, inner.clone()),
            plain: inner,
            enforce: self.enforce,
            revoked: self.revoked.clone(),
            refusals: self.refusals.clone(),
        }
    }
}

/// The service made by [`PeerLayer`].
#[derive(Clone)]
pub struct PeerService<S> {
    authorized: Authorize<S>,
    plain: S,
    enforce: bool,
    revoked: Arc<dyn serin_security::tls::Revocation>,
    refusals: Option<crate::audit::RefusalAudit>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for PeerService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerService")
            .field("plain", &self.plain)
            .field("enforce", &self.enforce)
            .finish()
    }
}

impl<S> PeerService<S> {
    fn audit_refusal(&self, peer: &PeerInfo, path: &str, status: &tonic::Status) {
        if let Some(r) = &self.refusals {
            r.refused(&peer.identity, peer.remote_addr, path, status);
        }
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for PeerService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::Ready<Result<http::Response<RB>, S::Error>>,
        futures::future::Either<
            <Authorize<S> as tower::Service<http::Request<B>>>::Future,
            S::Future,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.enforce {
            self.authorized.poll_ready(cx)
        } else {
            self.plain.poll_ready(cx)
        }
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        use futures::future::Either;
        let conn = req.extensions().get::<ConnInfo>().cloned();
        if let Some(conn) = conn
            && let Some(peer) = conn.peer.clone()
        {
            if let Err(reason) = self.revoked.check(&peer.identity, &peer.serial) {
                tracing::warn!(peer = %peer.remote_addr, identity = %peer.identity, %reason, "call on a revoked certificate's connection refused; closing it");
                conn.close();
                let status = tonic::Status::permission_denied(format!(
                    "this certificate has been revoked: {reason}"
                ));
                self.audit_refusal(&peer, req.uri().path(), &status);
                return Either::Left(futures::future::ready(Ok(status.into_http())));
            }
            if self.enforce
                && let Err(msg) =
                    serin_security::transport::authorize(req.uri().path(), &peer.identity)
            {
                // The same verdict `Authorize` would give, answered here so it is audited.
                tracing::warn!(peer = %peer.remote_addr, identity = %peer.identity, method = %serin_security::limits::truncated(req.uri().path()), "call refused");
                let status = tonic::Status::permission_denied(msg);
                self.audit_refusal(&peer, req.uri().path(), &status);
                return Either::Left(futures::future::ready(Ok(status.into_http())));
            }
            req.extensions_mut().insert(PeerInfo::clone(&peer));
        }
        if self.enforce {
            Either::Right(Either::Left(self.authorized.call(req)))
        } else {
            Either::Right(Either::Right(self.plain.call(req)))
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn accepted_sockets_have_nodelay_and_are_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(ConnectionCount::default());
        let mut incoming = Box::pin(incoming(
            listener,
            1,
            count.clone(),
            Security::InsecurePlaintext,
        ));
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let a1 = incoming.next().await.unwrap().unwrap();
        // Read back from the kernel: the option is on the accepted socket itself.
        assert!(
            a1.socket().nodelay().unwrap(),
            "TCP_NODELAY not set on an accepted socket"
        );
        assert!(!a1.info.over_cap());
        assert_eq!(count.live(), 1);
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let a2 = incoming.next().await.unwrap().unwrap();
        assert!(
            a2.info.over_cap(),
            "the second connection is beyond a cap of 1"
        );
        drop(a1);
        drop(a2);
        assert_eq!(count.live(), 0);
    }

    #[tokio::test]
    async fn a_closed_connection_fails_its_next_read() {
        use tokio::io::AsyncReadExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(incoming(
            listener,
            10,
            Arc::default(),
            Security::InsecurePlaintext,
        ));
        let _client = TcpStream::connect(addr).await.unwrap();
        let mut a = incoming.next().await.unwrap().unwrap();
        let info = a.info.clone();
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            a.read(&mut buf).await
        });
        info.close();
        let r = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("a pending read wakes up when the connection is closed")
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    }
}
