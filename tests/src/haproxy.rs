//! HAProxy (Debian's package) on loopback for the traffic tests, and backends that say who they are.
//!
//! [`Haproxy::start`] writes a config of the test's own — one HTTP frontend on a free loopback
//! port, one backend whose servers may each be polled through an agent-check port — and runs
//! `haproxy -db` in the foreground with an admin stats socket, so the test reads weights and
//! session counts through the runtime API ([`serin_coordinator::haproxy::RuntimeApi`]). The
//! process is SIGKILLed when the value is dropped. [`NamedBackends`] are HTTP servers answering
//! `200 <name>`, so a load generator can count who served each request.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serin_coordinator::haproxy::{RuntimeApi, ServerStat};

/// The backend's name in every test config.
pub const BACKEND: &str = "be";

/// Where HAProxy is installed by Debian's package (`apt-get install -y haproxy`).
pub const HAPROXY_BIN: &str = "/usr/sbin/haproxy";

/// One server line of the backend.
#[derive(Debug, Clone)]
pub struct Server {
    /// Server name (`s1`).
    pub name: String,
    /// Where it serves.
    pub addr: SocketAddr,
    /// Its agent-check responder, if HAProxy should poll one.
    pub agent: Option<SocketAddr>,
}

/// A running HAProxy.
#[derive(Debug)]
pub struct Haproxy {
    child: Child,
    /// The frontend address the load goes to.
    pub frontend: SocketAddr,
    /// The admin stats socket.
    pub socket: PathBuf,
    log: PathBuf,
    rt: tokio::runtime::Runtime,
}

/// A free loopback port (bound, read, released: HAProxy binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Haproxy {
    /// Writes the config into `dir` and starts HAProxy; returns once its runtime API answers
    /// with every server of the backend.
    pub fn start(dir: &Path, servers: &[Server], agent_inter: Duration) -> anyhow::Result<Self> {
        if !Path::new(HAPROXY_BIN).exists() {
            bail!("{HAPROXY_BIN} not found: install Debian's haproxy (apt-get install -y haproxy)");
        }
        let socket = dir.join("admin.sock");
        let port = free_port()?;
        let mut cfg = format!(
            "global\n  stats socket {} level admin\n  maxconn 4000\n\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend {BACKEND}\n\n\
             backend {BACKEND}\n  balance roundrobin\n",
            socket.display()
        );
        for s in servers {
            write!(cfg, "  server {} {} weight 100", s.name, s.addr)?;
            if let Some(agent) = s.agent {
                write!(
                    cfg,
                    " check inter 1s agent-check agent-addr {} agent-port {} agent-inter {}ms",
                    agent.ip(),
                    agent.port(),
                    agent_inter.as_millis()
                )?;
            }
            cfg.push('\n');
        }
        let cfg_path = dir.join("haproxy.cfg");
        std::fs::write(&cfg_path, &cfg)?;
        let log = dir.join("haproxy.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(HAPROXY_BIN)
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting haproxy")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let me = Haproxy {
            child,
            frontend: SocketAddr::from(([127, 0, 0, 1], port)),
            socket,
            log,
            rt,
        };
        let n = servers.len();
        crate::wait::wait_for(
            "haproxy's runtime API to list every server",
            Duration::from_secs(10),
            &|| me.log_tail(),
            || me.stats().map(|s| s.len() == n).unwrap_or(false),
        );
        Ok(me)
    }

    /// The runtime API client (the coordinator's).
    pub fn api(&self) -> RuntimeApi {
        RuntimeApi::new(&self.socket)
    }

    /// Runs an async runtime API call to completion.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// `show stat`, server lines.
    pub fn stats(&self) -> anyhow::Result<Vec<ServerStat>> {
        Ok(self.block_on(self.api().show_stat())?)
    }

    /// One server's `show stat` line.
    pub fn server(&self, name: &str) -> anyhow::Result<ServerStat> {
        Ok(self.block_on(self.api().server(BACKEND, name))?)
    }

    /// HAProxy's output, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- haproxy log ---\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long [`NamedBackends`] take to answer `GET /hold`.
pub const HOLD: Duration = Duration::from_secs(3);

/// HTTP servers in the test process answering `200 <name>` after an optional delay (`GET /hold`:
/// after [`HOLD`]).
#[derive(Debug)]
pub struct NamedBackends {
    /// `(name, address)` of each.
    pub servers: Vec<(String, SocketAddr)>,
    _rt: tokio::runtime::Runtime,
}

impl NamedBackends {
    /// Starts one server per name on a free loopback port; each answer waits `delay`, so
    /// sessions overlap and HAProxy's session counts are above 0 under load.
    pub fn start(names: &[&str], delay: Duration) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let mut servers = Vec::new();
        for name in names {
            let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
            servers.push((name.to_string(), listener.local_addr()?));
            let name = name.to_string();
            rt.spawn(async move {
                loop {
                    let Ok((mut s, _)) = listener.accept().await else {
                        continue;
                    };
                    let name = name.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 1024];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        // `GET /hold` is a client holding its session open for a while.
                        let hold = buf.starts_with(b"GET /hold ");
                        tokio::time::sleep(if hold { HOLD } else { delay }).await;
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                            name.len()
                        );
                        let _ = s.write_all(answer.as_bytes()).await;
                        let _ = s.shutdown().await;
                    });
                }
            });
        }
        Ok(NamedBackends { servers, _rt: rt })
    }
}
