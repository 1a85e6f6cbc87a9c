//! Health checks: probes (HTTP GET, TCP connect, command exit status) and the pure
//! consecutive-result thresholds that turn probe results into a verdict.
//!
//! A check starts with no verdict; `success_threshold` consecutive successes make it passing,
//! `failure_threshold` consecutive failures make it failing. The built-in process check
//! (process alive / unit active, thresholds 1) and the `restarts` checks are fed from the
//! service manager's status rather than probed.

use std::time::{Duration, Instant};

use serin_proto::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::activation::Verdict;
use crate::config::{CheckConfig, CheckKind};

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Probe succeeded.
    pub ok: bool,
    /// How long it took.
    pub latency: Duration,
    /// What it saw, e.g. `HTTP 500` or `connection refused`.
    pub detail: String,
}

/// One check's threshold state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckState {
    /// Check name.
    pub name: String,
    /// Check kind.
    pub kind: wire::CheckKind,
    /// Verdict after thresholds; `None`: not decided yet.
    pub passing: Option<bool>,
    /// Latest probe result.
    pub last_ok: bool,
    /// Latest probe latency.
    pub latency: Duration,
    /// Latest probe detail.
    pub detail: String,
    /// Consecutive failed probes.
    pub consecutive_failures: u32,
    /// Consecutive successful probes.
    pub consecutive_successes: u32,
    failure_threshold: u32,
    success_threshold: u32,
}

impl CheckState {
    /// A check without any result yet.
    pub fn new(
        name: &str,
        kind: wire::CheckKind,
        failure_threshold: u32,
        success_threshold: u32,
    ) -> Self {
        CheckState {
            name: name.to_string(),
            kind,
            passing: None,
            last_ok: false,
            latency: Duration::ZERO,
            detail: String::new(),
            consecutive_failures: 0,
            consecutive_successes: 0,
            failure_threshold: failure_threshold.max(1),
            success_threshold: success_threshold.max(1),
        }
    }

    /// Records a probe result; returns whether the verdict changed.
    pub fn record(&mut self, r: ProbeResult) -> bool {
        let before = self.passing;
        self.last_ok = r.ok;
        self.latency = r.latency;
        self.detail = r.detail;
        if r.ok {
            self.consecutive_successes = self.consecutive_successes.saturating_add(1);
            self.consecutive_failures = 0;
            if self.consecutive_successes >= self.success_threshold {
                self.passing = Some(true);
            }
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.consecutive_successes = 0;
            if self.consecutive_failures >= self.failure_threshold {
                self.passing = Some(false);
            }
        }
        before != self.passing
    }

    /// Forgets all results (a new release starts).
    pub fn reset(&mut self) {
        *self = CheckState::new(
            &self.name,
            self.kind,
            self.failure_threshold,
            self.success_threshold,
        );
    }

    /// The wire form.
    pub fn to_wire(&self) -> wire::CheckResult {
        wire::CheckResult {
            name: self.name.clone(),
            kind: self.kind as i32,
            passing: self.passing == Some(true),
            last_ok: self.last_ok,
            latency_us: self.latency.as_micros() as u64,
            detail: self.detail.clone(),
            consecutive_failures: self.consecutive_failures,
            consecutive_successes: self.consecutive_successes,
        }
    }
}

/// The checks of one service: index 0 is the built-in process check, then the configured ones.
#[derive(Debug, Clone)]
pub struct HealthMonitor {
    /// Every check.
    pub checks: Vec<CheckState>,
}

impl HealthMonitor {
    /// The monitor for `configs`.
    pub fn new(configs: &[CheckConfig]) -> Self {
        let mut checks = vec![CheckState::new("process", wire::CheckKind::Process, 1, 1)];
        for c in configs {
            let kind = match c.kind {
                CheckKind::Http { .. } => wire::CheckKind::Http,
                CheckKind::Tcp { .. } => wire::CheckKind::Tcp,
                CheckKind::Command { .. } => wire::CheckKind::Command,
                CheckKind::Restarts { .. } => wire::CheckKind::Restarts,
            };
            checks.push(CheckState::new(
                &c.name,
                kind,
                c.failure_threshold.get(),
                c.success_threshold.get(),
            ));
        }
        HealthMonitor { checks }
    }

    /// Forgets all results.
    pub fn reset(&mut self) {
        self.checks.iter_mut().for_each(CheckState::reset);
    }

    /// Failing if any check fails, passing if all pass, else unknown.
    pub fn verdict(&self) -> Verdict {
        if self.checks.iter().any(|c| c.passing == Some(false)) {
            Verdict::Failing
        } else if self.checks.iter().all(|c| c.passing == Some(true)) {
            Verdict::Passing
        } else {
            Verdict::Unknown
        }
    }

    /// What is failing, for messages: `http: HTTP 500; tcp: connection refused`.
    pub fn failing_detail(&self) -> String {
        self.checks
            .iter()
            .filter(|c| c.passing == Some(false))
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Runs one probe of `kind` with `timeout`. `Restarts` checks are not probed here.
pub async fn probe(kind: &CheckKind, timeout: Duration) -> ProbeResult {
    let start = Instant::now();
    let outcome = tokio::time::timeout(timeout, probe_inner(kind)).await;
    let latency = start.elapsed();
    match outcome {
        Ok(Ok(detail)) => ProbeResult {
            ok: true,
            latency,
            detail,
        },
        Ok(Err(detail)) => ProbeResult {
            ok: false,
            latency,
            detail,
        },
        Err(_) => ProbeResult {
            ok: false,
            latency,
            detail: format!("timed out after {timeout:?}"),
        },
    }
}

async fn probe_inner(kind: &CheckKind) -> Result<String, String> {
    match kind {
        CheckKind::Http {
            authority, path, ..
        } => http_get(authority, path).await,
        CheckKind::Tcp { address } => tokio::net::TcpStream::connect(address)
            .await
            .map(|_| "connected".to_string())
            .map_err(|e| format!("connect {address}: {e}")),
        CheckKind::Command { argv } => {
            let status = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
            if status.success() {
                Ok("exit 0".into())
            } else {
                Err(format!("{status}"))
            }
        }
        CheckKind::Restarts { .. } => Ok(String::new()),
    }
}

/// A minimal HTTP/1.1 GET; Ok for a 2xx status.
async fn http_get(authority: &str, path: &str) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: serin-agent\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send to {authority}: {e}"))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read from {authority}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {line:?}"))?;
    if (200..300).contains(&code) {
        Ok(format!("HTTP {code}"))
    } else {
        Err(format!("HTTP {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn ok(ok: bool) -> ProbeResult {
        ProbeResult {
            ok,
            latency: Duration::from_millis(1),
            detail: if ok { "fine" } else { "broken" }.into(),
        }
    }

    #[test]
    fn thresholds_need_consecutive_results() {
        let mut c = CheckState::new("http", wire::CheckKind::Http, 3, 2);
        assert_eq!(c.passing, None);
        assert!(!c.record(ok(true)));
        assert!(c.record(ok(true)));
        assert_eq!(c.passing, Some(true));
        assert!(!c.record(ok(false)));
        assert!(!c.record(ok(false)));
        assert!(!c.record(ok(true)), "a success resets the failure streak");
        assert!(!c.record(ok(false)));
        assert!(!c.record(ok(false)));
        assert!(c.record(ok(false)));
        assert_eq!(c.passing, Some(false));
        assert_eq!(c.consecutive_failures, 3);
        assert!(!c.record(ok(true)));
        assert!(c.record(ok(true)));
        assert_eq!(c.passing, Some(true));
        c.reset();
        assert_eq!(c.passing, None);
    }

    #[test]
    fn verdict_is_failing_if_any_fails_and_passing_only_if_all_pass() {
        let cfg = CheckConfig {
            name: "tcp".into(),
            kind: CheckKind::Tcp {
                address: "127.0.0.1:1".parse().unwrap(),
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failure_threshold: NonZeroU32::new(1).unwrap(),
            success_threshold: NonZeroU32::new(1).unwrap(),
        };
        let mut m = HealthMonitor::new(&[cfg]);
        assert_eq!(m.verdict(), Verdict::Unknown);
        m.checks[0].record(ok(true));
        assert_eq!(m.verdict(), Verdict::Unknown);
        m.checks[1].record(ok(true));
        assert_eq!(m.verdict(), Verdict::Passing);
        m.checks[1].record(ok(false));
        assert_eq!(m.verdict(), Verdict::Failing);
        assert_eq!(m.failing_detail(), "tcp: broken");
    }

    #[tokio::test]
    async fn tcp_probe_against_a_real_listener_turns_failing_after_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let kind = CheckKind::Tcp { address };
        let mut c = CheckState::new("tcp", wire::CheckKind::Tcp, 2, 1);
        c.record(probe(&kind, Duration::from_secs(1)).await);
        assert_eq!(c.passing, Some(true));
        drop(listener);
        c.record(probe(&kind, Duration::from_secs(1)).await);
        assert_eq!(c.passing, Some(true), "one failure is below the threshold");
        let r = probe(&kind, Duration::from_secs(1)).await;
        assert!(r.detail.contains("refused"), "{}", r.detail);
        c.record(r);
        assert_eq!(c.passing, Some(false));
    }

    async fn serve_http(status: &'static str) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok").as_bytes(),
                    )
                    .await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_probe_wants_2xx() {
        let good = serve_http("200 OK").await;
        let bad = serve_http("500 Internal Server Error").await;
        let kind = |a: std::net::SocketAddr| CheckKind::Http {
            url: String::new(),
            authority: a.to_string(),
            path: "/healthz".into(),
        };
        let r = probe(&kind(good), Duration::from_secs(2)).await;
        assert!(r.ok, "{r:?}");
        let r = probe(&kind(bad), Duration::from_secs(2)).await;
        assert!(!r.ok);
        assert_eq!(r.detail, "HTTP 500");
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let kind = CheckKind::Http {
            url: String::new(),
            authority: listener.local_addr().unwrap().to_string(),
            path: "/".into(),
        };
        let r = probe(&kind, Duration::from_millis(100)).await;
        assert!(!r.ok);
        assert!(r.detail.contains("timed out"), "{}", r.detail);
    }

    #[tokio::test]
    async fn command_probe_uses_the_exit_status() {
        let t = probe(
            &CheckKind::Command {
                argv: vec!["true".into()],
            },
            Duration::from_secs(2),
        )
        .await;
        assert!(t.ok);
        let f = probe(
            &CheckKind::Command {
                argv: vec!["false".into()],
            },
            Duration::from_secs(2),
        )
        .await;
        assert!(!f.ok);
    }
}
