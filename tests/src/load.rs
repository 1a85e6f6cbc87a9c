//! A bounded HTTP load generator that counts every failure by kind.
//!
//! A fixed number of client threads each send `GET path` on a fresh connection
//! (`connection: close`), read the whole answer, and tally it: answers by body (the server's
//! name, pid or version), and failures as refused (nothing listening), reset (the peer dropped
//! the connection), closed without an answer, HTTP errors by status, timeouts, other. Either a
//! fixed number of requests ([`LoadGen::run`]) or until stopped ([`LoadGen::start`]).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the load generator saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// 200 answers, by body.
    pub ok_by_body: BTreeMap<String, u64>,
    /// Connections refused (nothing was listening).
    pub refused: u64,
    /// Connections reset by the peer (or broken pipes).
    pub reset: u64,
    /// Connections closed before a complete answer.
    pub closed: u64,
    /// Non-200 answers, by status.
    pub http_errors: BTreeMap<u16, u64>,
    /// Connect or read timeouts.
    pub timeouts: u64,
    /// Anything else, with the first few messages kept in `samples`.
    pub other: u64,
    /// Up to 10 failure descriptions, for the assertion message.
    pub samples: Vec<String>,
}

impl Tally {
    /// Answers with status 200.
    pub fn ok(&self) -> u64 {
        self.ok_by_body.values().sum()
    }

    /// Every request that did not get a 200.
    pub fn failed(&self) -> u64 {
        self.refused
            + self.reset
            + self.closed
            + self.http_errors.values().sum::<u64>()
            + self.timeouts
            + self.other
    }

    /// All requests.
    pub fn total(&self) -> u64 {
        self.ok() + self.failed()
    }

    fn merge(&mut self, other: Tally) {
        for (k, v) in other.ok_by_body {
            *self.ok_by_body.entry(k).or_default() += v;
        }
        for (k, v) in other.http_errors {
            *self.http_errors.entry(k).or_default() += v;
        }
        self.refused += other.refused;
        self.reset += other.reset;
        self.closed += other.closed;
        self.timeouts += other.timeouts;
        self.other += other.other;
        for s in other.samples {
            if self.samples.len() < 10 {
                self.samples.push(s);
            }
        }
    }

    fn fail(&mut self, what: String) {
        if self.samples.len() < 10 {
            self.samples.push(what);
        }
    }

    /// One line: `2000 requests, 2000 ok, 0 failed (refused 0, reset 0, …)`.
    pub fn summary(&self) -> String {
        format!(
            "{} requests, {} ok, {} failed (refused {}, reset {}, closed {}, http {:?}, timeouts {}, other {}); samples {:?}",
            self.total(),
            self.ok(),
            self.failed(),
            self.refused,
            self.reset,
            self.closed,
            self.http_errors,
            self.timeouts,
            self.other,
            self.samples
        )
    }
}

/// The load generator's settings.
#[derive(Debug, Clone)]
pub struct LoadGen {
    /// Where to send requests.
    pub addr: SocketAddr,
    /// The path to `GET`.
    pub path: String,
    /// Client threads (the bound on concurrent connections).
    pub clients: usize,
    /// Connect and read timeout per request.
    pub timeout: Duration,
}

/// A load generator running until [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Tally>>,
}

impl LoadGen {
    /// `clients` threads sending `GET path` to `addr`, 5 s timeout per request.
    pub fn new(addr: SocketAddr, path: &str, clients: usize) -> Self {
        LoadGen {
            addr,
            path: path.to_owned(),
            clients,
            timeout: Duration::from_secs(5),
        }
    }

    /// Sends exactly `requests` requests and returns the tally.
    pub fn run(&self, requests: u64) -> Tally {
        let left = Arc::new(AtomicU64::new(requests));
        let tally = Arc::new(Mutex::new(Tally::default()));
        std::thread::scope(|scope| {
            for _ in 0..self.clients {
                let (left, tally) = (left.clone(), tally.clone());
                scope.spawn(move || {
                    let mut mine = Tally::default();
                    while left
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        self.one(&mut mine);
                    }
                    tally.lock().unwrap().merge(mine);
                });
            }
        });
        tally.lock().unwrap().clone()
    }

    /// Starts sending requests until [`Running::stop`].
    pub fn start(&self) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let threads = (0..self.clients)
            .map(|_| {
                let (me, stop, sent) = (self.clone(), stop.clone(), sent.clone());
                std::thread::spawn(move || {
                    let mut mine = Tally::default();
                    while !stop.load(Ordering::SeqCst) {
                        me.one(&mut mine);
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                    mine
                })
            })
            .collect();
        Running {
            stop,
            sent,
            threads,
        }
    }

    fn one(&self, tally: &mut Tally) {
        match self.request() {
            Ok((200, body)) => *tally.ok_by_body.entry(body).or_default() += 1,
            Ok((status, body)) => {
                *tally.http_errors.entry(status).or_default() += 1;
                tally.fail(format!("HTTP {status}: {body}"));
            }
            Err(Failure::Io(e)) => {
                match e.kind() {
                    ErrorKind::ConnectionRefused => tally.refused += 1,
                    ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => tally.reset += 1,
                    ErrorKind::TimedOut | ErrorKind::WouldBlock => tally.timeouts += 1,
                    _ => tally.other += 1,
                }
                tally.fail(format!("{:?}: {e}", e.kind()));
            }
            Err(Failure::Closed(raw)) => {
                tally.closed += 1;
                tally.fail(format!("closed after {raw:?}"));
            }
        }
    }

    fn request(&self) -> Result<(u16, String), Failure> {
        let mut stream = TcpStream::connect_timeout(&self.addr, self.timeout)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        stream.set_nodelay(true)?;
        // One write: a request in pieces waits for delayed ACKs (Nagle), 40 ms each.
        let request = format!(
            "GET {} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            self.path, self.addr
        );
        stream.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return Err(Failure::Closed(text.into_owned()));
        };
        match head.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            Some(status) => Ok((status, body.to_owned())),
            None => Err(Failure::Closed(text.into_owned())),
        }
    }
}

enum Failure {
    Io(std::io::Error),
    Closed(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

impl Running {
    /// Requests sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Stops the clients and returns what they saw.
    pub fn stop(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        let mut tally = Tally::default();
        for t in self.threads {
            tally.merge(t.join().expect("load generator thread panicked"));
        }
        tally
    }
}
