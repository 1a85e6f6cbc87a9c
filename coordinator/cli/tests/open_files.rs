//! The coordinator at its open-files limit, in a child process whose limit is lowered with
//! `prlimit`: it raises its soft limit to the hard one at start; agents beyond its connection
//! cap are refused and their connections closed while operators are still served; running out
//! of descriptors in `accept` backs off with a warning instead of spinning a core.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serin_proto::wire;
use serin_proto::wire::agent_service_client::AgentServiceClient;
use serin_proto::wire::control_service_client::ControlServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// `serin serve` under `prlimit --nofile=SOFT:HARD`, killed on drop.
struct Limited {
    child: Child,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Limited {
    fn start(soft: u64, hard: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("coordinator.log");
        let mut child = Command::new("prlimit")
            .arg(format!("--nofile={soft}:{hard}"))
            .arg(env!("CARGO_BIN_EXE_serin"))
            .arg("serve")
            .arg("--config")
            .arg(dir.path().join("none.toml"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            // No config file: the explicit development switch (this test is about limits).
            .arg("--insecure-plaintext")
            .env("SERIN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("prlimit (util-linux) and the serin binary");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log_path = log.clone();
        std::thread::spawn(move || {
            use std::io::Write as _;
            let mut file = std::fs::File::create(log_path).unwrap();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("serin coordinator listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
                let _ = writeln!(file, "{line}");
                let _ = file.flush();
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("serin serve did not start:\n{}", read(&log)));
        Self {
            child,
            url: format!("http://{addr}"),
            log,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        read(&self.log)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// User + system CPU seconds so far.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }

    async fn list_hosts(&self) -> Result<Vec<wire::HostInfo>, String> {
        let ch = tonic::transport::Endpoint::from_shared(self.url.clone())
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        ControlServiceClient::new(ch)
            .list_hosts(wire::ListHostsRequest::default())
            .await
            .map(|r| r.into_inner().hosts)
            .map_err(|e| format!("ListHosts: {e}"))
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, dump: impl Fn() -> String, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}\n{}",
            dump()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One agent's attach on its own connection: the welcome, or the refusal.
async fn attach(
    url: &str,
    i: usize,
) -> Result<
    (
        mpsc::Sender<wire::AgentMessage>,
        tonic::Streaming<wire::CoordinatorMessage>,
    ),
    tonic::Status,
> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(8);
    tx.send(wire::AgentMessage {
        body: Some(wire::agent_message::Body::Hello(wire::Hello {
            host_id: format!("h{i:04}"),
            hostname: format!("h{i:04}"),
            agent_version: "test".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = AgentServiceClient::new(ch)
        .attach(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match inbound.message().await? {
        Some(wire::CoordinatorMessage {
            body: Some(wire::coordinator_message::Body::Welcome(_)),
        }) => Ok((tx, inbound)),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_raises_its_soft_open_files_limit_to_the_hard_one() {
    let c = Limited::start(256, 2048);
    // `serin serve` announces its address before `server::run` starts; wait for run's own line.
    wait_until(
        "the coordinator to log its open-files limit",
        Duration::from_secs(10),
        || c.log(),
        || {
            let log = c.log();
            async move { log.contains("open-files limit") }
        },
    )
    .await;
    assert!(
        c.log().contains("raised the open-files limit"),
        "{}",
        c.log()
    );
    assert_eq!(soft_nofile(c.pid()), 2048, "{}", c.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_open_files_limit_agents_are_refused_operators_served_and_accept_backs_off() {
    // 128 descriptors: a cap of 128 - 16 - 32 = 80 connections.
    let c = Limited::start(128, 128);
    let cap = 80;
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    for i in 0..cap + 10 {
        match attach(&c.url, i).await {
            Ok(a) => admitted.push(a),
            Err(s) => refused.push(s),
        }
    }
    // Operators have not been counted out: every connection so far is an agent's.
    assert!(
        admitted.len() >= cap - 2 && admitted.len() <= cap,
        "{} agents admitted with a cap of {cap}\n{}",
        admitted.len(),
        c.log()
    );
    assert!(!refused.is_empty(), "no agent was refused beyond the cap");
    for s in &refused {
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("open-files limit"), "{s:?}");
    }
    assert!(c.log().contains("connection cap reached"), "{}", c.log());
    // The refused agents' connections are closed by the coordinator, so their descriptors are
    // back, and an operator gets in and sees the admitted agents.
    let hosts = c
        .list_hosts()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log()));
    assert_eq!(hosts.iter().filter(|h| h.connected).count(), admitted.len());
    wait_until(
        "the refused connections to be closed",
        Duration::from_secs(10),
        || c.log(),
        || {
            let fds = c.fds();
            async move { fds < 128 - 8 }
        },
    )
    .await;

    // Now exhaust the descriptors with raw connections that never speak HTTP/2.
    let addr = c.url.trim_start_matches("http://").to_string();
    let mut raw = Vec::new();
    for _ in 0..80 {
        match tokio::net::TcpStream::connect(&addr).await {
            Ok(s) => raw.push(s),
            Err(_) => break,
        }
    }
    wait_until(
        "the accept loop to hit EMFILE and say so",
        Duration::from_secs(10),
        || c.log(),
        || {
            let log = c.log();
            async move { log.contains("out of file descriptors; backing off") }
        },
    )
    .await;
    // No spin: a busy accept loop would burn a whole core.
    let before = c.cpu_seconds();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = (c.cpu_seconds() - before) / t.elapsed().as_secs_f64();
    assert!(
        used < 0.3,
        "the coordinator used {:.0} % of a core while out of descriptors\n{}",
        used * 100.0,
        c.log()
    );
    // Descriptors come back: operators are served again.
    drop(raw);
    wait_until(
        "an operator to be served again",
        Duration::from_secs(10),
        || c.log(),
        || async { c.list_hosts().await.is_ok() },
    )
    .await;
    // The agents admitted before are still attached.
    let hosts = c.list_hosts().await.unwrap();
    assert_eq!(hosts.iter().filter(|h| h.connected).count(), admitted.len());
}
