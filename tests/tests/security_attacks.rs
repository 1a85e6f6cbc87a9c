//! The attacks of issue 7 that concern hostile input and URL sources, each tried the way the
//! issue found them working, against the real `serin serve` and `serin-agent` processes:
//!
//! - a hello announcing `last_seq = 2^64-1` (it used to poison the host's order counter);
//! - one agent stream whose health reports each name a new service (the coordinator grew without
//!   bound, then `serin hosts` failed for everyone);
//! - the URL oracle: an agent fetching any URL it is ordered to and reporting the size and sha256
//!   of what came back.

use std::path::Path;
use std::time::{Duration, Instant};

use serin_proto::wire::agent_message::Body;
use serin_proto::wire::agent_service_client::AgentServiceClient;
use serin_proto::wire::control_service_client::ControlServiceClient;
use serin_proto::wire::{self, OrderPhase, ResultCode};
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::{AgentOptions, SERVICE};
use serin_tests::demo_release::{DemoRelease, sha256_hex};
use serin_tests::fake_coordinator::describe_result;
use serin_tests::fleet::CoordinatorProc;
use serin_tests::http::ArtifactServer;
use serin_tests::orders;
use serin_tests::tls::{TestPki, channel, pki};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

fn hello(host: &str, services: &[&str], last_seq: u64) -> wire::AgentMessage {
    wire::AgentMessage {
        body: Some(Body::Hello(wire::Hello {
            host_id: host.into(),
            hostname: host.into(),
            labels: Default::default(),
            agent_version: "attacker".into(),
            services: services
                .iter()
                .map(|s| wire::ServiceInventory {
                    service: (*s).into(),
                    state: wire::ServiceState::Empty as i32,
                    last_seq,
                    ..Default::default()
                })
                .collect(),
        })),
    }
}

/// An agent-API client presenting the certificate of `host_id` (mutual TLS, as a real agent).
async fn agent_client(url: &str, host_id: &str) -> AgentServiceClient<tonic::transport::Channel> {
    let transport = TestPki::client_transport(&pki().agent(host_id));
    let ch = channel(url, &transport, Duration::from_secs(5))
        .await
        .expect("an mTLS channel to the coordinator");
    AgentServiceClient::new(ch)
}

async fn hosts(url: &str) -> Result<Vec<wire::HostInfo>, tonic::Status> {
    let transport = TestPki::client_transport(&pki().harness_operator());
    let ch = channel(url, &transport, Duration::from_secs(5))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut c = ControlServiceClient::new(ch).max_decoding_message_size(4 << 20);
    Ok(c.list_hosts(wire::ListHostsRequest::default())
        .await?
        .into_inner()
        .hosts)
}

#[test]
fn a_hello_with_last_seq_at_the_end_of_the_type_is_refused_and_registers_nothing() {
    let coord = CoordinatorProc::start();
    let url = coord.url();
    runtime().block_on(async {
        let mut client = agent_client(&url, "poisoner").await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(hello("poisoner", &["web"], u64::MAX))
            .await
            .unwrap();
        let outcome = match client
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Err(status) => Err(status),
            Ok(resp) => resp.into_inner().message().await.map(|_| ()),
        };
        let status = outcome.expect_err("a hello with last_seq 2^64-1 was accepted");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        assert!(status.message().contains("last_seq"), "{status}");
        let listed = hosts(&url).await.unwrap();
        assert!(
            listed.iter().all(|h| h.host_id != "poisoner"),
            "the refused host was registered: {listed:?}\n{}",
            coord.log_tail(40)
        );
        // The same hello with a sequence in range is welcome: the refusal was about the value.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(hello("poisoner", &["web"], 7)).await.unwrap();
        let mut inbound = client
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let welcome = inbound.message().await.unwrap().expect("a welcome");
        assert!(matches!(
            welcome.body,
            Some(wire::coordinator_message::Body::Welcome(_))
        ));
        drop(tx);
    });
}

/// Resident memory of the process whose command line names `config`, in KiB.
fn rss_kib_of(config: &Path) -> u64 {
    let needle = config.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&needle) {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("VmRSS:")) {
            return line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    panic!("no process runs with {needle}");
}

#[test]
fn health_reports_naming_endless_new_services_do_not_grow_the_coordinator() {
    const REPORTS: usize = 100_000;
    const BOUND_KIB: u64 = 48 * 1024;
    let coord = CoordinatorProc::start();
    let url = coord.url();
    let config = coord.root().join("coordinator.toml");
    runtime().block_on(async {
        let mut client = agent_client(&url, "flooder").await;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tx.send(hello("flooder", &["web"], 0)).await.unwrap();
        let mut inbound = client
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        inbound.message().await.unwrap().expect("a welcome");
        let before = rss_kib_of(&config);
        let started = Instant::now();
        let detail = "x".repeat(200);
        for i in 0..REPORTS {
            let report = wire::HealthReport {
                service: format!("svc-{i}"),
                release: "r1".into(),
                healthy: true,
                verdict: wire::HealthVerdict::Passing as i32,
                checks: (0..8)
                    .map(|c| wire::CheckResult {
                        name: format!("check-{c}"),
                        kind: wire::CheckKind::Http as i32,
                        passing: true,
                        last_ok: true,
                        detail: detail.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            };
            tx.send(wire::AgentMessage {
                body: Some(Body::Health(report)),
            })
            .await
            .expect("the coordinator closed the stream");
        }
        // One stream is processed in order: once its end is, every report before it was. Close
        // it and wait until the host shows as disconnected.
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(60);
        let listed = loop {
            let listed = hosts(&url).await.expect("serin hosts works after the flood");
            if listed.iter().any(|h| h.host_id == "flooder" && !h.connected) {
                break listed;
            }
            assert!(
                Instant::now() < deadline,
                "the flooding stream was not processed to its end within 60 s\n{}",
                coord.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let after = rss_kib_of(&config);
        let me = listed
            .iter()
            .find(|h| h.host_id == "flooder")
            .expect("the flooding host is listed");
        let services: Vec<&str> = me.services.iter().map(|s| s.service.as_str()).collect();
        eprintln!(
            "{REPORTS} reports in {:?}; coordinator RSS {before} KiB -> {after} KiB; services {services:?}",
            started.elapsed()
        );
        assert_eq!(services, vec!["web"], "services the hello did not list were kept");
        assert!(
            after.saturating_sub(before) < BOUND_KIB,
            "the coordinator grew by {} KiB (bound {BOUND_KIB} KiB)",
            after.saturating_sub(before)
        );
    });
}

#[test]
fn a_url_outside_the_allowed_prefixes_is_refused_before_any_connection() {
    let server = ArtifactServer::start();
    let secret = b"internal admin page: hunter2".to_vec();
    let url = server.put("/internal/secret", secret.clone());
    let mut opts = AgentOptions::new("url-allow-list");
    opts.extra_top_toml = format!(
        "[download]\nallowed_url_prefixes = [\"{}\"]\n",
        server.url("/releases/")
    );
    let fx = AgentFixture::start_with(opts);
    let v1 = DemoRelease::healthy("demo-1.0");
    fx.install_first(1, &v1);

    let probe = wire::Release {
        service: SERVICE.into(),
        id: "probe-1".into(),
        sha256: "00".repeat(32),
        size: 1,
        url,
        manifest: String::new(),
    };
    fx.send(orders::stage(2, probe));
    let r = fx.wait_outcome(2);
    let ctx = || format!("{}\n{}", describe_result(&r), fx.dump());
    assert_eq!(r.phase(), OrderPhase::Failed, "{}", ctx());
    assert_eq!(r.code(), ResultCode::UrlNotAllowed, "{}", ctx());
    assert!(
        server.requests().is_empty(),
        "the agent connected: {:?}\n{}",
        server.requests(),
        ctx()
    );
    assert_eq!(
        fx.agent.current_release().as_deref(),
        Some("demo-1.0"),
        "{}",
        ctx()
    );
}

#[test]
fn a_mismatching_url_download_never_describes_the_foreign_content() {
    let server = ArtifactServer::start();
    let secret = b"internal admin page: hunter2 hunter2 hunter2".to_vec();
    let (secret_sha, secret_len) = (sha256_hex(&secret), secret.len());
    let url = server.put("/internal/secret", secret);
    // No allow-list: the compatible default, where an oracle would have worked.
    let fx = AgentFixture::start("url-oracle");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));

    for (seq, size) in [(2, 1_000_000), (3, secret_len as u64), (4, 5)] {
        let probe = wire::Release {
            service: SERVICE.into(),
            id: format!("probe-{seq}"),
            sha256: "00".repeat(32),
            size,
            url: url.clone(),
            manifest: String::new(),
        };
        fx.send(orders::stage(seq, probe));
        let r = fx.wait_outcome(seq);
        let ctx = || format!("{}\n{}", describe_result(&r), fx.dump());
        assert_eq!(r.phase(), OrderPhase::Failed, "{}", ctx());
        let everything: String = fx
            .coord
            .results(fx.host())
            .iter()
            .filter(|r| r.seq == seq && r.phase() != OrderPhase::Progress)
            .map(|r| r.message.clone())
            .collect();
        assert!(
            !everything.contains(&secret_sha),
            "the foreign sha256 was reported: {}",
            ctx()
        );
        assert!(
            !everything.contains(&format!("{secret_len} ")),
            "the foreign size was reported: {}",
            ctx()
        );
    }
    assert_eq!(
        fx.agent.version().ok().as_deref(),
        Some("demo-1.0"),
        "{}",
        fx.dump()
    );
}
