//! The attacks of issue 7 that concern hostile input and URL sources, each tried the way the
//! issue found them working, against the real `serin serve` and `serin-agent` processes:
//!
//! - a hello announcing `last_seq = 2^64-1` (it used to poison the host's order counter);
//! - one agent stream whose health reports each name a new service (the coordinator grew without
//!   bound, then `serin hosts` failed for everyone);
//! - the URL oracle: an agent fetching any URL it is ordered to and reporting the size and sha256
//!   of what came back;
//! - the per-peer limits of `serin_security::limits`: `Attach` streams per host identity, control
//!   calls in flight per operator, the time to say hello, and the size of values echoed back in
//!   errors.

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

/// An `Attach` call from `host`'s certificate whose request stream sends `first` (if any) and
/// then stays open until `hold` is dropped; the call's answer (its first message or its error).
async fn open_attach(
    url: &str,
    host: &str,
    first: Option<wire::AgentMessage>,
) -> (
    tokio::sync::mpsc::Sender<wire::AgentMessage>,
    Result<wire::CoordinatorMessage, tonic::Status>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    if let Some(m) = first {
        tx.send(m).await.expect("queueing the hello");
    }
    let answer = async {
        let mut inbound = agent_client(url, host)
            .await
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        inbound
            .message()
            .await?
            .ok_or_else(|| tonic::Status::unknown("the stream ended without a message"))
    }
    .await;
    (tx, answer)
}

#[test]
fn one_host_identity_holds_at_most_two_attach_streams() {
    let coord = CoordinatorProc::start();
    let url = coord.url();
    let rt = runtime();
    // Two streams from one certificate that never say hello: each holds a slot until the hello
    // timeout ends it.
    let silent: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            rt.spawn(async move { open_attach(&url, "limits-a", None).await })
        })
        .collect();
    // Both silent streams hold their slots before a third is tried. (Counting accepted TLS
    // connections was not enough: the harness's own two connections already made the count, a
    // third stream took a slot first, one silent stream was refused, and no third could ever
    // be refused after that.)
    serin_tests::wait::wait_for(
        "the two silent streams to be admitted",
        Duration::from_secs(4),
        &|| coord.dump(),
        || {
            coord
                .log()
                .lines()
                .filter(|l| l.contains("agent stream admitted") && l.contains("host=limits-a"))
                .count()
                >= 2
        },
    );
    // A third stream from the same identity is refused at once, hello or not. (Until the two
    // silent ones have reached the coordinator, a third may still get in: it is then closed and
    // tried again.)
    let started = Instant::now();
    let refusal = serin_tests::wait::wait_for_value(
        "a third Attach of one host to be refused",
        Duration::from_secs(4),
        &|| coord.dump(),
        || {
            let (tx, answer) = rt.block_on(open_attach(
                &url,
                "limits-a",
                Some(hello("limits-a", &[], 0)),
            ));
            drop(tx);
            answer.err()
        },
    );
    assert_eq!(
        refusal.code(),
        tonic::Code::ResourceExhausted,
        "{refusal:?}"
    );
    assert!(
        refusal
            .message()
            .contains("serin://host/limits-a already has 2 Attach streams open"),
        "{refusal:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refused at once, not after the silent streams' hello timeout"
    );
    // Another host is not affected.
    let (_b, welcome) = rt.block_on(open_attach(
        &url,
        "limits-b",
        Some(hello("limits-b", &[], 0)),
    ));
    assert!(welcome.is_ok(), "{welcome:?}\n{}", coord.dump());
    // The silent streams end at the hello timeout and give their slots back.
    for s in silent {
        let (_tx, answer) = rt.block_on(s).unwrap();
        assert_eq!(
            answer.as_ref().err().map(tonic::Status::code),
            Some(tonic::Code::DeadlineExceeded),
            "{answer:?}"
        );
    }
    serin_tests::wait::wait_for(
        "host a to attach again once its silent streams are gone",
        Duration::from_secs(5),
        &|| coord.dump(),
        || {
            let (_tx, answer) = rt.block_on(open_attach(
                &url,
                "limits-a",
                Some(hello("limits-a", &[], 0)),
            ));
            answer.is_ok()
        },
    );
}

/// Forwards one connection at a time on a new 127.0.0.1 port to `target`; the flag turns true
/// when `target` closes a forwarded connection.
fn watched_forwarder(
    target: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{Read as _, Write as _};
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = std::sync::Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(target) else {
                continue;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = c_in.read(&mut buf) {
                    if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            let (mut s_in, mut c_out) = (server, client);
            let flag = flag.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match s_in.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            flag.store(true, Ordering::SeqCst);
                            break;
                        }
                        Ok(n) => {
                            if c_out.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = c_out.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (addr, closed)
}

#[test]
fn a_stream_that_never_says_hello_is_refused_and_its_connection_closed() {
    use std::sync::atomic::Ordering;
    let coord = CoordinatorProc::start();
    let (via, closed) = watched_forwarder(coord.addr());
    let rt = runtime();
    let started = Instant::now();
    let answer = rt.block_on(async {
        let mut transport = TestPki::client_transport(&pki().agent("silent"));
        if let serin_security::transport::ClientTransport::Tls { server_name, .. } = &mut transport
        {
            // The forwarder's address is not in the coordinator's certificate; its own is.
            *server_name = Some(coord.addr().ip().to_string());
        }
        let ch = channel(
            &format!("https://{via}"),
            &transport,
            Duration::from_secs(5),
        )
        .await
        .expect("an mTLS channel through the forwarder");
        let (_tx, rx) = tokio::sync::mpsc::channel::<wire::AgentMessage>(1);
        let mut client = AgentServiceClient::new(ch);
        let r = client
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        // The client is handed out so its connection stays open: only the coordinator may
        // close it (dropped here, the channel could close it first and the forwarder, whose
        // write to the gone client fails, would never see the coordinator's close).
        (r.map(drop), client)
    });
    let waited = started.elapsed();
    let (answer, _client) = answer;
    let status = answer.expect_err("a stream without a hello is refused");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("no hello within 5s"),
        "{status:?}"
    );
    let timeout = serin_security::limits::MIN_HELLO_TIMEOUT;
    assert!(
        waited >= timeout && waited < timeout + Duration::from_secs(5),
        "refused after {waited:?}"
    );
    // The client keeps its connection; the coordinator closes it.
    serin_tests::wait::wait_for(
        "the coordinator to close the silent connection",
        Duration::from_secs(10),
        &|| coord.dump(),
        || closed.load(Ordering::SeqCst),
    );
}

#[test]
fn one_operator_holds_at_most_its_limit_of_control_calls() {
    let coord = CoordinatorProc::start();
    let url = coord.url();
    let rt = runtime();
    let flooder =
        TestPki::client_transport(&pki().operator("flooder", serin_security::Role::Deployer));
    let limit = serin_security::limits::CONTROL_CALLS_PER_OPERATOR;
    // Uploads that never send a chunk: each holds a call open.
    let ch = rt
        .block_on(channel(&url, &flooder, Duration::from_secs(5)))
        .expect("a channel");
    let mut holds = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..limit {
        let (tx, rx) = tokio::sync::mpsc::channel::<wire::PushArtifactChunk>(1);
        holds.push(tx);
        let mut c = ControlServiceClient::new(ch.clone());
        calls.push(rt.spawn(async move {
            c.push_artifact(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(drop)
        }));
    }
    let list = |t: &serin_security::transport::ClientTransport| {
        rt.block_on(async {
            let ch = channel(&url, t, Duration::from_secs(5))
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            ControlServiceClient::new(ch)
                .list_hosts(wire::ListHostsRequest::default())
                .await
                .map(drop)
        })
    };
    let refusal = serin_tests::wait::wait_for_value(
        "a call beyond the operator's limit to be refused",
        Duration::from_secs(5),
        &|| coord.dump(),
        || list(&flooder).err(),
    );
    assert_eq!(
        refusal.code(),
        tonic::Code::ResourceExhausted,
        "{refusal:?}"
    );
    assert!(
        refusal.message().contains(&format!(
            "serin://operator/deployer/flooder already has {limit} control calls open"
        )),
        "{refusal:?}"
    );
    // Another operator is served.
    let other = TestPki::client_transport(&pki().harness_operator());
    list(&other).expect("another operator is not limited by the flooder");
    // Ending the uploads gives the calls back.
    drop(holds);
    for c in calls {
        let _ = rt.block_on(c).unwrap();
    }
    serin_tests::wait::wait_for(
        "the flooder to be served again",
        Duration::from_secs(5),
        &|| coord.dump(),
        || list(&flooder).is_ok(),
    );
}

#[test]
fn errors_never_echo_a_long_client_value_in_full() {
    let coord = CoordinatorProc::start();
    let url = coord.url();
    let rt = runtime();
    let long = "x".repeat(8 * 1024);
    let admin = TestPki::client_transport(&pki().harness_operator());
    let mut refusals: Vec<(&str, tonic::Status)> = Vec::new();
    rt.block_on(async {
        let ch = channel(&url, &admin, Duration::from_secs(5))
            .await
            .expect("a channel");
        let mut c = ControlServiceClient::new(ch.clone());
        let r = wire::RolloutRef {
            rollout_id: long.clone(),
            ..Default::default()
        };
        let spec = wire::RolloutSpec {
            service: long.clone(),
            release: long.clone(),
            selector: long.clone(),
            waves: vec![long.clone()],
            ..Default::default()
        };
        let release = wire::Release {
            service: "demo".into(),
            id: long.clone(),
            sha256: long.clone(),
            ..Default::default()
        };
        let mut push = vec![];
        push.push(("GetRollout", c.get_rollout(r.clone()).await.map(drop)));
        push.push(("WatchRollout", c.watch_rollout(r.clone()).await.map(drop)));
        push.push((
            "ExplainRollout",
            c.explain_rollout(r.clone()).await.map(drop),
        ));
        push.push(("PlanRollout", c.plan_rollout(spec.clone()).await.map(drop)));
        push.push((
            "StartRollout",
            c.start_rollout(spec.clone()).await.map(drop),
        ));
        push.push((
            "RegisterRelease",
            c.register_release(release).await.map(drop),
        ));
        push.push((
            "ControlRollout",
            c.control_rollout(wire::ControlRequest {
                rollout_id: long.clone(),
                reason: long.clone(),
                ..Default::default()
            })
            .await
            .map(drop),
        ));
        push.push((
            "RevokeHost",
            c.revoke_host(wire::RevokeHostRequest {
                host_id: long.clone(),
                reason: long.clone(),
            })
            .await
            .map(drop),
        ));
        push.push((
            "ListRollouts",
            c.list_rollouts(wire::ListRolloutsRequest {
                service: long.clone(),
            })
            .await
            .map(drop),
        ));
        // A hello with a long host id on the agent API.
        let (_tx, answer) = open_attach(&url, "echo-host", Some(hello(&long, &[&long], 0))).await;
        push.push(("Attach", answer.map(drop)));
        for (what, r) in push {
            match r {
                Ok(()) => panic!("{what} with an 8 KiB value was accepted"),
                Err(s) => refusals.push((what, s)),
            }
        }
    });
    let echoing: Vec<String> = refusals
        .iter()
        .filter(|(_, s)| s.message().len() > 512 || s.message().contains(&"x".repeat(200)))
        .map(|(what, s)| {
            let m = s.message();
            format!("{what}: {} bytes: {:?}", m.len(), &m[..m.len().min(160)])
        })
        .collect();
    assert!(
        echoing.is_empty(),
        "errors echoing the value:\n{}",
        echoing.join("\n")
    );
}
