//! Minimal blocking HTTP/1.1 on loopback: a client for the demo service and an artifact server.
//!
//! [`get`] asks the demo service for `/version`, `/healthz` or `/pid`. [`ArtifactServer`] serves
//! release artifacts by path for the agent's URL downloads (`Release.url`), so tests need no
//! external web server.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};

/// Sends `GET path` to 127.0.0.1:`port` and returns the status code and body.
pub fn get(port: u16, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to GET {path} from {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("answer to GET {path} from {addr} has no end of head: {text:?}");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("answer to GET {path} from {addr} has no status: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// `GET /version` from the demo service on `port`: its version when it answers 200.
pub fn version(port: u16) -> anyhow::Result<String> {
    match get(port, "/version", Duration::from_secs(2))? {
        (200, body) => Ok(body),
        (status, body) => bail!("GET /version answered {status}: {body}"),
    }
}

/// `GET /pid` from the demo service on `port`: the pid of the process answering.
pub fn pid(port: u16) -> anyhow::Result<u32> {
    match get(port, "/pid", Duration::from_secs(2))? {
        (200, body) => body
            .trim()
            .parse()
            .with_context(|| format!("GET /pid answered {body:?}")),
        (status, body) => bail!("GET /pid answered {status}: {body}"),
    }
}

/// A tiny HTTP server on 127.0.0.1 (port 0) serving fixed bodies by path; stops on drop.
pub struct ArtifactServer {
    addr: SocketAddr,
    files: Arc<Mutex<HashMap<String, Served>>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ArtifactServer {
    /// Starts the server on a free loopback port.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the artifact server");
        let addr = listener.local_addr().expect("artifact server address");
        let files: Arc<Mutex<HashMap<String, Served>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (files, requests, stop) = (files.clone(), requests.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (files, requests) = (files.clone(), requests.clone());
                    std::thread::spawn(move || {
                        let _ = serve_one(conn, &files, &requests);
                    });
                }
            })
        };
        Self {
            addr,
            files,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// Serves `body` at `path` (e.g. "/web-2.0"); returns the full URL.
    pub fn put(&self, path: &str, body: Vec<u8>) -> String {
        self.files.lock().expect("artifact server lock").insert(
            path.to_owned(),
            Served {
                body,
                trickle: None,
                cut: None,
            },
        );
        self.url(path)
    }

    /// Serves `body` at `path` but closes every connection after `after` bytes of it (the
    /// headers announce the whole length, and a Range is not honoured). Returns the full URL.
    pub fn put_cut(&self, path: &str, body: Vec<u8>, after: usize) -> String {
        self.files.lock().expect("artifact server lock").insert(
            path.to_owned(),
            Served {
                body,
                trickle: None,
                cut: Some(after),
            },
        );
        self.url(path)
    }

    /// Serves `body` at `path` slowly: `per` bytes, then a pause of `every`, and so on (the
    /// headers announce the whole length at once). Returns the full URL.
    pub fn put_trickle(&self, path: &str, body: Vec<u8>, per: usize, every: Duration) -> String {
        self.files.lock().expect("artifact server lock").insert(
            path.to_owned(),
            Served {
                body,
                trickle: Some((per.max(1), every)),
                cut: None,
            },
        );
        self.url(path)
    }

    /// The URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request line received so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("artifact server lock").clone()
    }
}

/// What the server answers for one path.
#[derive(Clone)]
struct Served {
    body: Vec<u8>,
    /// Write this many bytes, then pause this long, until done.
    trickle: Option<(usize, Duration)>,
    /// Close the connection after this many bytes of the body.
    cut: Option<usize>,
}

fn serve_one(
    mut conn: TcpStream,
    files: &Mutex<HashMap<String, Served>>,
    requests: &Mutex<Vec<String>>,
) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk)?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let line = head.lines().next().unwrap_or_default().to_owned();
    requests
        .lock()
        .expect("artifact server lock")
        .push(line.clone());
    let path = line.split_whitespace().nth(1).unwrap_or_default();
    let body = files
        .lock()
        .expect("artifact server lock")
        .get(path)
        .cloned();
    match body {
        Some(Served { body, trickle, cut }) => {
            write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )?;
            match (trickle, cut) {
                (_, Some(after)) => {
                    conn.write_all(&body[..after.min(body.len())])?;
                    conn.flush()?;
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                    return Ok(());
                }
                (None, None) => conn.write_all(&body)?,
                (Some((per, every)), None) => {
                    // Ends when the client hangs up (the write fails) or the body is out.
                    for piece in body.chunks(per) {
                        conn.write_all(piece)?;
                        conn.flush()?;
                        std::thread::sleep(every);
                    }
                }
            }
        }
        None => {
            write!(
                conn,
                "HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot found"
            )?;
        }
    }
    conn.flush()?;
    Ok(())
}

impl Drop for ArtifactServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the stop flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
