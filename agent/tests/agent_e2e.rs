//! End-to-end: a real agent (library `run`) against an in-process scripted coordinator, with the
//! process supervisor running shell-script "releases". Covers stage + activate + confirm, the
//! dead-man switch (failed start, confirm timeout), duplicate and stale orders, and a restart of
//! the agent that adopts the running service.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use serin_proto::wire::agent_service_server::{AgentService, AgentServiceServer};
use serin_proto::wire::{self, OrderPhase, ResultCode};
use sha2::Digest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
struct Shared {
    artifacts: HashMap<String, Vec<u8>>,
    results: Vec<wire::OrderResult>,
    hellos: Vec<wire::Hello>,
    orders: Option<mpsc::Sender<Result<wire::CoordinatorMessage, Status>>>,
}

#[derive(Clone, Default)]
struct FakeCoordinator(Arc<Mutex<Shared>>);

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for FakeCoordinator {
    type AttachStream = Out<wire::CoordinatorMessage>;
    type FetchArtifactStream = Out<wire::ArtifactChunk>;

    async fn attach(
        &self,
        req: Request<Streaming<wire::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tx.send(Ok(wire::CoordinatorMessage {
            body: Some(wire::coordinator_message::Body::Welcome(wire::Welcome {
                coordinator_id: "fake".into(),
                heartbeat_interval_ms: 200,
            })),
        }))
        .await
        .unwrap();
        self.0.lock().unwrap().orders = Some(tx);
        let shared = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let mut s = shared.lock().unwrap();
                match msg.body {
                    Some(wire::agent_message::Body::Hello(h)) => s.hellos.push(h),
                    Some(wire::agent_message::Body::Result(r)) => s.results.push(r),
                    _ => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_artifact(
        &self,
        req: Request<wire::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let req = req.into_inner();
        let data = self
            .0
            .lock()
            .unwrap()
            .artifacts
            .get(&req.sha256)
            .cloned()
            .ok_or_else(|| Status::not_found("no such artifact"))?;
        let total = data.len() as u64;
        let chunks: Vec<Result<wire::ArtifactChunk, Status>> = data[req.offset as usize..]
            .chunks(16)
            .enumerate()
            .map(|(i, c)| {
                Ok(wire::ArtifactChunk {
                    offset: req.offset + (i * 16) as u64,
                    data: c.to_vec().into(),
                    total_size: total,
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

impl FakeCoordinator {
    fn add(&self, id: &str, script: &str) -> wire::Release {
        let data = script.as_bytes().to_vec();
        let sha = hex::encode(sha2::Sha256::digest(&data));
        let r = wire::Release {
            service: "web".into(),
            id: id.into(),
            sha256: sha.clone(),
            size: data.len() as u64,
            url: String::new(),
            manifest: String::new(),
        };
        self.0.lock().unwrap().artifacts.insert(sha, data);
        r
    }

    async fn send(&self, seq: u64, action: wire::order::Action) {
        let tx = self
            .0
            .lock()
            .unwrap()
            .orders
            .clone()
            .expect("agent not attached");
        tx.send(Ok(wire::CoordinatorMessage {
            body: Some(wire::coordinator_message::Body::Order(wire::Order {
                epoch: 0,
                order_id: format!("o{seq}"),
                rollout_id: "r1".into(),
                seq,
                service: "web".into(),
                action: Some(action),
            })),
        }))
        .await
        .unwrap();
    }

    fn results_for(&self, seq: u64) -> Vec<wire::OrderResult> {
        self.0
            .lock()
            .unwrap()
            .results
            .iter()
            .filter(|r| r.seq == seq && r.phase != OrderPhase::Progress as i32)
            .cloned()
            .collect()
    }

    async fn wait_result(&self, seq: u64, phase: OrderPhase) -> wire::OrderResult {
        wait_for(&format!("seq {seq} {phase:?}"), || {
            self.results_for(seq)
                .into_iter()
                .find(|r| r.phase == phase as i32)
        })
        .await
    }
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills the supervised service when the test ends, even on failure.
struct KillService(std::path::PathBuf);
impl Drop for KillService {
    fn drop(&mut self) {
        if let Ok(bytes) = std::fs::read(self.0.join("web/supervisor.json"))
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && let Some(pid) = v["pid"].as_i64()
        {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn config(addr: std::net::SocketAddr, state: &Path) -> serin_agent::Config {
    config_keeping(addr, state, 3)
}

fn config_keeping(addr: std::net::SocketAddr, state: &Path, keep: usize) -> serin_agent::Config {
    let text = format!(
        r#"
coordinator = "http://{addr}"
tls = {{ insecure_plaintext = true }}
state_dir = "{}"
host_id = "host-1"
heartbeat_interval = "1s"
report_interval = "1s"
reconnect_initial = "50ms"
reconnect_max = "200ms"
[[service]]
name = "web"
binary = "web"
stop_timeout = "1s"
keep_releases = {keep}
[service.run]
kind = "process"
[[service.check]]
kind = "command"
command = ["/bin/sh", "-c", "test -f {}/web/current/ok"]
interval = "100ms"
timeout = "1s"
failure_threshold = 2
"#,
        state.display(),
        state.display(),
        keep = keep,
    );
    serin_agent::Config::parse(&text).unwrap().config
}

fn activate(r: &wire::Release, confirm_ms: u64) -> wire::order::Action {
    wire::order::Action::Activate(wire::ActivateOrder {
        release: Some(r.clone()),
        healthy_deadline_ms: 5_000,
        min_healthy_ms: 200,
        confirm_deadline_ms: confirm_ms,
        traffic_weight_percent: None,
    })
}

fn current(state: &Path) -> String {
    std::fs::read_link(state.join("web/current"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// The tests of this file run one at a time: `durable_writes_of_one_activation` counts the
/// process's durable writes, which another test's agent would add to.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_activate_confirm_dead_man_switch_and_restart() {
    let _one = ONE_AT_A_TIME.lock().await;
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _kill = KillService(state.clone());
    let fake = FakeCoordinator::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(fake.clone()))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                server_stop.clone().cancelled_owned(),
            ),
    );

    // A healthy release writes the marker its check looks for; a broken one exits at once.
    let good = "#!/bin/sh\ntouch ok\nexec sleep 60\n";
    let a = fake.add("web-1", good);
    let b = fake.add("web-2", "#!/bin/sh\nexit 3\n");
    let c = fake.add("web-3", &format!("{good}# c\n"));

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(serin_agent::run(config(addr, &state), shutdown.clone()));
    wait_for("hello", || fake.0.lock().unwrap().orders.clone()).await;
    {
        // The stream is open before its first message is recorded: wait for the hello itself.
        let hello = wait_for("the first hello", || {
            fake.0.lock().unwrap().hellos.first().cloned()
        })
        .await;
        assert_eq!(hello.host_id, "host-1");
        assert_eq!(hello.services[0].state, wire::ServiceState::Empty as i32);
    }

    // Stage, then activate with a confirm.
    fake.send(
        1,
        wire::order::Action::Stage(wire::StageOrder {
            release: Some(a.clone()),
        }),
    )
    .await;
    fake.wait_result(1, OrderPhase::Staged).await;
    fake.send(2, activate(&a, 10_000)).await;
    let r = fake.wait_result(2, OrderPhase::Activated).await;
    assert_eq!(r.current_release, "web-1");
    fake.wait_result(2, OrderPhase::Healthy).await;
    fake.send(
        3,
        wire::order::Action::Confirm(wire::ConfirmOrder {
            release: "web-1".into(),
            traffic_weight_percent: None,
        }),
    )
    .await;
    fake.wait_result(3, OrderPhase::Confirmed).await;
    assert_eq!(current(&state), "releases/web-1");

    // Duplicate and stale sequences.
    fake.send(
        3,
        wire::order::Action::Confirm(wire::ConfirmOrder {
            release: "web-1".into(),
            traffic_weight_percent: None,
        }),
    )
    .await;
    wait_for("duplicate re-sent", || {
        (fake.results_for(3).len() == 2).then_some(())
    })
    .await;
    fake.send(
        1,
        wire::order::Action::Stage(wire::StageOrder {
            release: Some(a.clone()),
        }),
    )
    .await;
    wait_for("stale rejected", || {
        fake.results_for(1)
            .into_iter()
            .find(|r| r.code == ResultCode::StaleOrder as i32)
    })
    .await;

    // A release that fails to start is rolled back (downloaded as part of the activate).
    fake.send(4, activate(&b, 10_000)).await;
    let r = fake.wait_result(4, OrderPhase::RolledBack).await;
    assert_eq!(
        r.code,
        ResultCode::ServiceFailedToStart as i32,
        "{}",
        r.message
    );
    assert_eq!(r.current_release, "web-1");
    assert_eq!(current(&state), "releases/web-1");

    // A healthy release nobody confirms is rolled back at the confirm deadline.
    fake.send(5, activate(&c, 1_000)).await;
    fake.wait_result(5, OrderPhase::Healthy).await;
    let r = fake.wait_result(5, OrderPhase::RolledBack).await;
    assert_eq!(r.code, ResultCode::ConfirmTimeout as i32, "{}", r.message);
    assert_eq!(current(&state), "releases/web-1");

    // Hash mismatch: the coordinator serves other bytes than declared.
    let mut bad = fake.add("web-4", "#!/bin/sh\nexec sleep 60\n# four\n");
    bad.sha256 = a.sha256.clone();
    fake.0
        .lock()
        .unwrap()
        .artifacts
        .insert(a.sha256.clone(), vec![b'x'; bad.size as usize]);
    fake.send(
        6,
        wire::order::Action::Stage(wire::StageOrder { release: Some(bad) }),
    )
    .await;
    let r = fake.wait_result(6, OrderPhase::Failed).await;
    assert_eq!(r.code, ResultCode::HashMismatch as i32, "{}", r.message);
    assert!(r.message.contains(&a.sha256), "{}", r.message);

    // Restart the agent: the service keeps running and is adopted, the inventory is right.
    let pid_before = std::fs::read_to_string(state.join("web/supervisor.json")).unwrap();
    shutdown.cancel();
    agent.await.unwrap().unwrap();
    let shutdown = CancellationToken::new();
    fake.0.lock().unwrap().orders = None;
    let agent = tokio::spawn(serin_agent::run(config(addr, &state), shutdown.clone()));
    wait_for("second hello", || fake.0.lock().unwrap().orders.clone()).await;
    let hello = wait_for("the second hello", || {
        fake.0.lock().unwrap().hellos.get(1).cloned()
    })
    .await;
    let inv = &hello.services[0];
    assert_eq!(inv.current_release, "web-1");
    assert_eq!(inv.last_seq, 6);
    assert!(inv.kept_releases.contains(&"web-1".to_string()));
    assert_eq!(
        std::fs::read_to_string(state.join("web/supervisor.json")).unwrap(),
        pid_before,
        "service was restarted instead of adopted"
    );

    // The dead-man switch holds across an agent restart: the confirm deadline is in the journal.
    fake.send(7, activate(&c, 2_000)).await;
    fake.wait_result(7, OrderPhase::Healthy).await;
    shutdown.cancel();
    agent.await.unwrap().unwrap();
    let journal = std::fs::read_to_string(state.join("web/state.json")).unwrap();
    assert!(
        journal.contains("\"armed\""),
        "journal not armed: {journal}"
    );
    assert_eq!(current(&state), "releases/web-3");
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(serin_agent::run(config(addr, &state), shutdown.clone()));
    let r = fake.wait_result(7, OrderPhase::RolledBack).await;
    assert_eq!(r.code, ResultCode::ConfirmTimeout as i32, "{}", r.message);
    assert_eq!(r.current_release, "web-1");
    assert_eq!(current(&state), "releases/web-1");
    wait_for("web-1 running again", || {
        let rec = std::fs::read_to_string(state.join("web/supervisor.json")).ok()?;
        rec.contains("\"web-1\"").then_some(())
    })
    .await;

    shutdown.cancel();
    agent.await.unwrap().unwrap();
    server_stop.cancel();
    let _ = server.await;
}

fn releases_on_disk(state: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(state.join("web/releases"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    ids.sort();
    ids
}

/// Starts the fake coordinator on port 0; returns it, its address and its stop token.
async fn start_fake() -> (FakeCoordinator, std::net::SocketAddr, CancellationToken) {
    let fake = FakeCoordinator::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(fake.clone()))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    (fake, addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_keeps_current_previous_and_the_release_about_to_be_activated() {
    let _one = ONE_AT_A_TIME.lock().await;
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _kill = KillService(state.clone());
    let (fake, addr, server_stop) = start_fake().await;
    let good = "#!/bin/sh\ntouch ok\nexec sleep 60\n";
    let releases: Vec<wire::Release> = (1..=3)
        .map(|i| fake.add(&format!("web-{i}"), &format!("{good}# {i}\n")))
        .collect();
    let staged_only = fake.add("web-4", &format!("{good}# 4\n"));
    let broken = fake.add("web-5", "#!/bin/sh\nexit 3\n");

    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(serin_agent::run(
        config_keeping(addr, &state, 2),
        shutdown.clone(),
    ));
    wait_for("hello", || fake.0.lock().unwrap().orders.clone()).await;

    // keep_releases = 2: each activation downloads its release and must still find it on disk.
    for (i, r) in releases.iter().enumerate() {
        let seq = i as u64 + 1;
        fake.send(seq, activate(r, 0)).await;
        let res = fake.wait_result(seq, OrderPhase::Healthy).await;
        assert_eq!(res.current_release, r.id, "{}", res.message);
    }
    assert_eq!(current(&state), "releases/web-3");
    wait_for("web-1 pruned", || {
        (releases_on_disk(&state) == ["web-2", "web-3"]).then_some(())
    })
    .await;

    // A staged release survives the pruning after a later, failed activation.
    fake.send(
        4,
        wire::order::Action::Stage(wire::StageOrder {
            release: Some(staged_only.clone()),
        }),
    )
    .await;
    fake.wait_result(4, OrderPhase::Staged).await;
    fake.send(5, activate(&broken, 0)).await;
    let r = fake.wait_result(5, OrderPhase::RolledBack).await;
    assert_eq!(r.current_release, "web-3", "{}", r.message);
    wait_for("the failed release pruned", || {
        (releases_on_disk(&state) == ["web-2", "web-3", "web-4"]).then_some(())
    })
    .await;
    fake.send(6, activate(&staged_only, 0)).await;
    let r = fake.wait_result(6, OrderPhase::Healthy).await;
    assert_eq!(r.current_release, "web-4", "{}", r.message);
    wait_for("web-2 pruned", || {
        (releases_on_disk(&state) == ["web-3", "web-4"]).then_some(())
    })
    .await;

    shutdown.cancel();
    agent.await.unwrap().unwrap();
    server_stop.cancel();
}

/// Issue 10: the durable writes of one activation of a staged release, from the activate order
/// to the confirmed end (the 50-real-agent job's agents made about ten, two fsyncs each, on the
/// path of every wave). A journal record and the result reported right after it are one write,
/// and so are a confirm's sequence, its answer and the activation's end: the order's admission,
/// the journal before the swap, after the swap, armed (with `activated`), healthy (with
/// `healthy`), and the confirmed end; the process supervisor records the new process once.
/// What a crash at any point leaves is covered by the
/// agent's fault suite (`agent_fault_suite`: every crash point of an activation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_writes_of_one_activation() {
    let _one = ONE_AT_A_TIME.lock().await;
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _kill = KillService(state.clone());
    let (fake, addr, server_stop) = start_fake().await;
    let good = "#!/bin/sh\ntouch ok\nexec sleep 60\n";
    let a = fake.add("web-1", good);
    let b = fake.add("web-2", &format!("{good}# 2\n"));
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(serin_agent::run(config(addr, &state), shutdown.clone()));
    wait_for("hello", || fake.0.lock().unwrap().orders.clone()).await;
    let confirm = |r: &wire::Release| {
        wire::order::Action::Confirm(wire::ConfirmOrder {
            release: r.id.clone(),
            traffic_weight_percent: None,
        })
    };
    let stage = |r: &wire::Release| {
        wire::order::Action::Stage(wire::StageOrder {
            release: Some(r.clone()),
        })
    };
    // A baseline, then the next release staged ahead (prepare, then activate).
    fake.send(1, activate(&a, 10_000)).await;
    fake.wait_result(1, OrderPhase::Healthy).await;
    fake.send(2, confirm(&a)).await;
    fake.wait_result(2, OrderPhase::Confirmed).await;
    fake.send(3, stage(&b)).await;
    fake.wait_result(3, OrderPhase::Staged).await;

    let (writes0, fsyncs0) = serin_agent::durable::counters();
    fake.send(4, activate(&b, 10_000)).await;
    fake.wait_result(4, OrderPhase::Healthy).await;
    fake.send(5, confirm(&b)).await;
    fake.wait_result(5, OrderPhase::Confirmed).await;
    // The end is written before the confirmed result goes out.
    let (writes, fsyncs) = serin_agent::durable::counters();
    let (writes, fsyncs) = (writes - writes0, fsyncs - fsyncs0);
    assert_eq!(current(&state), "releases/web-2");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("web/state.json")).unwrap()).unwrap();
    assert!(
        saved
            .get("activation")
            .is_none_or(serde_json::Value::is_null),
        "the activation's end is on disk: {saved}"
    );
    eprintln!("one activation: {writes} durable writes, {fsyncs} fsyncs");
    // Six writes of the state, one of the process supervisor's record (two fsyncs each) and
    // the swap of `current` (one): were ten of the state, 23 fsyncs.
    assert_eq!(writes, 7, "durable writes of one activation");
    assert_eq!(fsyncs, 15, "fsyncs of one activation");

    shutdown.cancel();
    agent.await.unwrap().unwrap();
    server_stop.cancel();
}
