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
//!   descriptors kept in reserve and operators can still connect.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use futures::task::AtomicWaker;
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

/// What the services learn about the connection a call came on (`request.extensions()`).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer.
    pub remote: Option<SocketAddr>,
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

/// An accepted TCP connection, counted while it is open.
#[derive(Debug)]
pub struct Accepted {
    stream: TcpStream,
    info: ConnInfo,
    count: Arc<ConnectionCount>,
}

impl Drop for Accepted {
    fn drop(&mut self) {
        self.count.live.fetch_sub(1, Ordering::Relaxed);
    }
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
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Accepted {
    /// The socket (for tests: its options).
    pub fn socket(&self) -> &TcpStream {
        &self.stream
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
    async fn next(&mut self) -> Accepted {
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
                    return Accepted {
                        stream,
                        info: ConnInfo {
                            remote: Some(remote),
                            over_cap,
                            closer: Arc::default(),
                        },
                        count: self.count.clone(),
                    };
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
    futures::stream::unfold(state, |mut s| async move {
        let accepted = s.next().await;
        Some((Ok(accepted), s))
    })
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
        let mut incoming = Box::pin(incoming(listener, 1, count.clone()));
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
        let mut incoming = Box::pin(incoming(listener, 10, Arc::default()));
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
