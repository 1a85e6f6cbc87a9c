//! A network link the test can cut and heal: a small TCP proxy in the test process between one
//! agent and the coordinator.
//!
//! [`Link::start`] listens on a free loopback port and forwards every connection to the target
//! (the coordinator's address, also across its restarts). [`Link::cut`] is a partition: every
//! connection through the link is shut down at once (both ends see it close) and new ones are
//! accepted and closed straight away, as a refused connection would be, until [`Link::heal`].
//! The agent on the other side sees exactly what a real partition with resets shows it: its
//! stream ends, its reconnects fail, and once healed its next reconnect gets through.
//!
//! Threads, not tasks: the harness is synchronous, and a link carries one or two connections.
//! Every thread is joined when the link is dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One forwarded connection: both sockets, to shut them down on a cut.
struct Conn {
    id: u64,
    client: TcpStream,
    server: TcpStream,
}

impl Conn {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

#[derive(Default)]
struct State {
    cut: bool,
    conns: Vec<Conn>,
}

struct Inner {
    target: SocketAddr,
    /// The cut flag and the open connections, under one lock: a connection accepted while the
    /// link is being cut is either closed by the cut or refused by the flag, never missed.
    state: Mutex<State>,
    stop: AtomicBool,
    next_id: AtomicU64,
    /// Connections refused while cut.
    refused: AtomicU64,
    /// Connections shut down by a cut.
    severed: AtomicU64,
    /// Connections forwarded.
    forwarded: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A cuttable TCP link to one target; see the module docs.
pub struct Link {
    inner: Arc<Inner>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl Link {
    /// Listens on a free port of the target's own address and forwards every connection to
    /// `target`. Sharing the address keeps a TLS peer's name check true: the certificate the
    /// target presents is for the address the peer dials.
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind((target.ip(), 0)).expect("binding the link's listener");
        let addr = listener.local_addr().expect("the link's address");
        let inner = Arc::new(Inner {
            target,
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            severed: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let inner = inner.clone();
            std::thread::spawn(move || accept_loop(&inner, &listener))
        };
        Self {
            inner,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// The address to dial instead of the target's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to dial instead of `target_url` (same scheme, the link's address).
    pub fn url(&self, target_url: &str) -> String {
        let scheme = target_url.split_once("://").map_or("http", |(s, _)| s);
        format!("{scheme}://{}", self.addr)
    }

    /// Partitions the link: shuts down every connection through it and refuses new ones.
    pub fn cut(&self) {
        let mut s = lock(&self.inner.state);
        s.cut = true;
        for c in s.conns.drain(..) {
            c.close();
            self.inner.severed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Ends the partition: new connections are forwarded again.
    pub fn heal(&self) {
        lock(&self.inner.state).cut = false;
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        lock(&self.inner.state).cut
    }

    /// Connections refused while cut, so far.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::SeqCst)
    }

    /// Connections shut down by cuts, so far.
    pub fn severed(&self) -> u64 {
        self.inner.severed.load(Ordering::SeqCst)
    }

    /// Connections forwarded, so far.
    pub fn forwarded(&self) -> u64 {
        self.inner.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the acceptor up so that it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let threads = std::mem::take(&mut *lock(&self.inner.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(inner: &Arc<Inner>, listener: &TcpListener) {
    for client in listener.incoming() {
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if lock(&inner.state).cut {
            inner.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&inner.target, Duration::from_secs(2)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            continue;
        };
        let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
        {
            let mut s = lock(&inner.state);
            if s.cut {
                // Cut while this one was being connected: it never gets through.
                inner.refused.fetch_add(1, Ordering::SeqCst);
                let _ = client.shutdown(Shutdown::Both);
                let _ = server.shutdown(Shutdown::Both);
                continue;
            }
            s.conns.push(Conn { id, client, server });
        }
        inner.forwarded.fetch_add(1, Ordering::SeqCst);
        let up = {
            let inner = inner.clone();
            std::thread::spawn(move || pump(&inner, id, c2, s2))
        };
        let down = {
            let inner = inner.clone();
            std::thread::spawn(move || pump(&inner, id, s3, c3))
        };
        let mut threads = lock(&inner.threads);
        threads.retain(|t| !t.is_finished());
        threads.push(up);
        threads.push(down);
    }
}

/// Copies `from` → `to` until either side ends, then closes the whole connection.
fn pump(inner: &Inner, id: u64, mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    lock(&inner.state).conns.retain(|c| c.id != id);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server, one connection at a time, until its listener is dropped.
    fn echo() -> SocketAddr {
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn roundtrip(s: &mut TcpStream) -> std::io::Result<()> {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"ping")?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        assert_eq!(&b, b"ping");
        Ok(())
    }

    #[test]
    fn a_cut_closes_open_connections_and_refuses_new_ones_until_healed() {
        let link = Link::start(echo());
        let addr = link.addr();
        let mut open = TcpStream::connect(addr).unwrap();
        roundtrip(&mut open).unwrap();
        link.cut();
        assert!(
            roundtrip(&mut open).is_err(),
            "an open connection survived the cut"
        );
        let mut new = TcpStream::connect(addr).unwrap();
        assert!(
            roundtrip(&mut new).is_err(),
            "a new connection got through the cut"
        );
        assert_eq!(link.severed(), 1);
        assert!(link.refused() >= 1);
        link.heal();
        let mut healed = TcpStream::connect(addr).unwrap();
        roundtrip(&mut healed).unwrap();
    }
}
