//! End-to-end tests of the operator commands against a scripted ControlService on a real
//! loopback socket: argument parsing, the gRPC calls, the live view and the exit codes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use serin_proto::wire;
use serin_proto::wire::control_service_server::{ControlService, ControlServiceServer};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::args::Cli;
use super::exit::Exit;
use super::render::tests::sample_status;

/// What the fake coordinator answers, and what it saw.
#[derive(Default)]
struct Script {
    /// Statuses `WatchRollout` streams, 10 ms apart.
    watch: Vec<wire::RolloutStatus>,
    /// Keep the watch stream open after the last status (for the timeout test).
    hold_open: bool,
    /// `StartRollout` fails with this.
    start_error: Option<Status>,
    /// `PushArtifact` reports this sha256 instead of the real one.
    lie_about_sha: bool,
    /// Sizes of the pushed chunks, and the service/release of the first.
    pushed: Vec<usize>,
    pushed_names: Option<(String, String)>,
    /// Specs received by StartRollout.
    started: Vec<wire::RolloutSpec>,
    /// Control requests received.
    controls: Vec<wire::ControlRequest>,
    /// What `GetRollout` answers (else the last watched status), and how often it was asked.
    get: Option<wire::RolloutStatus>,
    gets: usize,
    /// Hosts `ListHosts` pages through (one host `web-01` when empty), and the requests seen.
    hosts: Vec<String>,
    host_requests: Vec<wire::ListHostsRequest>,
    /// `(call, request)` of every `GetRollout` and `WatchRollout`, in order.
    rollout_refs: Vec<(&'static str, wire::RolloutRef)>,
}

/// `s` as the coordinator serves it for `r`: `hosts_total` of every host, then the page.
fn paged(mut s: wire::RolloutStatus, r: &wire::RolloutRef) -> wire::RolloutStatus {
    s.hosts_total = s.hosts.len() as u32;
    let offset = (r.host_offset as usize).min(s.hosts.len());
    s.hosts.drain(..offset);
    if r.host_limit > 0 {
        s.hosts.truncate(r.host_limit as usize);
    }
    s
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Script>>);

impl Fake {
    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl ControlService for Fake {
    async fn list_hosts(
        &self,
        request: Request<wire::ListHostsRequest>,
    ) -> Result<Response<wire::ListHostsResponse>, Status> {
        let req = request.into_inner();
        let mut s = self.lock();
        s.host_requests.push(req.clone());
        if s.hosts.is_empty() {
            s.hosts.push("web-01".into());
        }
        // Pages in host id order after the token, as the coordinator serves them.
        let rest: Vec<&String> = s.hosts.iter().filter(|h| **h > req.page_token).collect();
        let size = (req.page_size as usize).max(1);
        let page: Vec<wire::HostInfo> = rest
            .iter()
            .take(size)
            .map(|h| wire::HostInfo {
                host_id: (*h).clone(),
                connected: true,
                ..Default::default()
            })
            .collect();
        let next_page_token = if rest.len() > size {
            page.last().map(|h| h.host_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let summary = req.summary.then(|| wire::HostsSummary {
            hosts: s.hosts.len() as u64,
            connected: s.hosts.len() as u64,
            ..Default::default()
        });
        Ok(Response::new(wire::ListHostsResponse {
            hosts: page,
            next_page_token,
            summary,
        }))
    }

    async fn push_artifact(
        &self,
        request: Request<tonic::Streaming<wire::PushArtifactChunk>>,
    ) -> Result<Response<wire::ReleaseInfo>, Status> {
        let mut stream = request.into_inner();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut names = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if names.is_none() {
                names = Some((chunk.service.clone(), chunk.release_id.clone()));
            }
            hasher.update(&chunk.data);
            size += chunk.data.len() as u64;
            self.lock().pushed.push(chunk.data.len());
        }
        let (service, id) = names.ok_or_else(|| Status::invalid_argument("no chunk"))?;
        let mut sha = hex::encode(hasher.finalize());
        if self.lock().lie_about_sha {
            sha = "0".repeat(64);
        }
        self.lock().pushed_names = Some((service.clone(), id.clone()));
        Ok(Response::new(wire::ReleaseInfo {
            release: Some(wire::Release {
                manifest: String::new(),
                service,
                id,
                sha256: sha,
                size,
                url: String::new(),
            }),
            created_unix_ms: 1,
            deduplicated: false,
        }))
    }

    async fn register_release(
        &self,
        request: Request<wire::Release>,
    ) -> Result<Response<wire::ReleaseInfo>, Status> {
        Ok(Response::new(wire::ReleaseInfo {
            release: Some(request.into_inner()),
            created_unix_ms: 1,
            deduplicated: false,
        }))
    }

    async fn list_releases(
        &self,
        _: Request<wire::ListReleasesRequest>,
    ) -> Result<Response<wire::ListReleasesResponse>, Status> {
        Ok(Response::new(wire::ListReleasesResponse::default()))
    }

    async fn plan_rollout(
        &self,
        request: Request<wire::RolloutSpec>,
    ) -> Result<Response<wire::RolloutPlan>, Status> {
        Ok(Response::new(wire::RolloutPlan {
            spec: Some(request.into_inner()),
            ..Default::default()
        }))
    }

    async fn start_rollout(
        &self,
        request: Request<wire::RolloutSpec>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        let mut s = self.lock();
        if let Some(e) = s.start_error.clone() {
            return Err(e);
        }
        s.started.push(request.into_inner());
        let mut first = sample_status();
        first.state = wire::RolloutState::from_word("running").unwrap() as i32;
        Ok(Response::new(first))
    }

    async fn get_rollout(
        &self,
        request: Request<wire::RolloutRef>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        let r = request.into_inner();
        if r.rollout_id != "r-42" {
            return Err(Status::not_found(format!("no rollout {}", r.rollout_id)));
        }
        let mut s = self.lock();
        s.gets += 1;
        s.rollout_refs.push(("get", r.clone()));
        let answer = s.get.clone().or_else(|| s.watch.last().cloned());
        Ok(Response::new(paged(
            answer.unwrap_or_else(sample_status),
            &r,
        )))
    }

    type WatchRolloutStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<wire::RolloutStatus, Status>> + Send>,
    >;

    async fn watch_rollout(
        &self,
        request: Request<wire::RolloutRef>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let r = request.into_inner();
        let (items, hold) = {
            let mut s = self.lock();
            s.rollout_refs.push(("watch", r.clone()));
            let items: Vec<wire::RolloutStatus> =
                s.watch.iter().map(|st| paged(st.clone(), &r)).collect();
            (items, s.hold_open)
        };
        let items = futures::stream::iter(items).then(|s| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(s)
        });
        // After the script: end the stream, or hold it open forever.
        let tail = futures::stream::unfold((), move |()| async move {
            if hold {
                std::future::pending::<()>().await;
            }
            None
        });
        let stream = items.chain(tail);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_rollouts(
        &self,
        _: Request<wire::ListRolloutsRequest>,
    ) -> Result<Response<wire::ListRolloutsResponse>, Status> {
        Ok(Response::new(wire::ListRolloutsResponse {
            rollouts: vec![sample_status()],
        }))
    }

    async fn control_rollout(
        &self,
        request: Request<wire::ControlRequest>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        self.lock().controls.push(request.into_inner());
        let mut s = sample_status();
        s.state = wire::RolloutState::from_word("paused").unwrap() as i32;
        Ok(Response::new(s))
    }

    async fn explain_rollout(
        &self,
        _: Request<wire::RolloutRef>,
    ) -> Result<Response<wire::Explanation>, Status> {
        Ok(Response::new(wire::Explanation {
            status: Some(sample_status()),
            decisions: sample_status().decisions,
            events: vec!["created".into()],
        }))
    }

    async fn revoke_host(
        &self,
        _: Request<wire::RevokeHostRequest>,
    ) -> Result<Response<wire::RevokeHostResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn list_audit(
        &self,
        _: Request<wire::ListAuditRequest>,
    ) -> Result<Response<wire::ListAuditResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

/// A fake coordinator on a loopback port; stops when dropped.
struct Server {
    url: String,
    fake: Fake,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(script: Script) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let fake = Fake(Arc::new(Mutex::new(script)));
    let stop = CancellationToken::new();
    let svc = ControlServiceServer::new(fake.clone());
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                // As the coordinator does (`listener.rs`): without TCP_NODELAY on the accepted
                // socket an answer waits ~40 ms for the client's delayed ACK (Nagle).
                tokio_stream::wrappers::TcpListenerStream::new(listener).map(|tcp| {
                    tcp.inspect(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    })
                }),
                s.cancelled_owned(),
            )
            .await;
    });
    Server {
        url: format!("http://{addr}"),
        fake,
        stop,
    }
}

/// Parses `serin --coordinator URL -o json ARGS` and runs it; the exit code it maps to.
async fn run(server: &Server, args: &[&str]) -> (Exit, String) {
    let cli = Cli::try_parse_from(
        ["serin", "--coordinator", &server.url, "-o", "json"]
            .iter()
            .copied()
            .chain(args.iter().copied()),
    )
    .expect("valid command line");
    match super::run_operator(&cli.coordinator, cli.output, cli.command).await {
        Ok(exit) => (exit, String::new()),
        Err(e) => (e.exit(), e.to_string()),
    }
}

fn ending(state: &str) -> Vec<wire::RolloutStatus> {
    let mut running = sample_status();
    running.state = wire::RolloutState::from_word("running").unwrap() as i32;
    let mut last = sample_status();
    last.state = wire::RolloutState::from_word(state).unwrap() as i32;
    last.finished = matches!(state, "succeeded" | "rolled_back" | "aborted" | "failed");
    if state == "succeeded" {
        confirm_all(&mut last);
    }
    vec![running.clone(), running, last]
}

/// Every host of `s` on the new release and confirmed.
fn confirm_all(s: &mut wire::RolloutStatus) {
    for h in &mut s.hosts {
        h.phase = wire::HostPhase::from_word("confirmed").unwrap() as i32;
        h.current_release = "2.0.0".into();
    }
}

/// A host that never confirms (gone after its HEALTHY): the view asks again quickly at first
/// (confirmations are usually a few ms away), then slows down, so its wait costs the coordinator
/// a few dozen status calls, not one every few ms until the view gives up; and it still ends
/// on its deadline with the rollout's own exit code.
#[tokio::test]
async fn a_succeeded_rollout_missing_a_confirmation_is_asked_for_quickly_then_slowly() {
    let mut running = sample_status();
    running.state = wire::RolloutState::from_word("running").unwrap() as i32;
    let mut succeeded = running.clone();
    succeeded.state = wire::RolloutState::from_word("succeeded").unwrap() as i32;
    succeeded.finished = true;
    confirm_all(&mut succeeded);
    succeeded.hosts[2].phase = wire::HostPhase::from_word("healthy").unwrap() as i32;
    let server = serve(Script {
        watch: vec![running, succeeded.clone()],
        get: Some(succeeded),
        ..Default::default()
    })
    .await;
    let mut control = super::client::Control::connect(&server.url)
        .await
        .expect("connect to the fake coordinator");
    let t0 = std::time::Instant::now();
    let exit = super::watch::follow_captured(
        &mut control,
        "r-42",
        None,
        Some(Duration::from_secs(2)),
        super::watch::Captured::default(),
        super::watch::HostPage::default(),
    )
    .await
    .expect("the watch ends");
    assert_eq!(exit, Exit::Success);
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    let gets = server.fake.lock().gets;
    // 100 ms every 5 ms, then doubling up to 100 ms: 28 in the two seconds (debug build);
    // every 20 ms was 85.
    assert!((2..=50).contains(&gets), "{gets} status calls");
}

/// The watch stream ends at the first finished status, while the last wave's confirmations are
/// still on their way: the view asks again and ends on "confirmed", not "healthy".
#[tokio::test]
async fn a_succeeded_rollout_ends_on_its_hosts_confirmations() {
    let mut running = sample_status();
    running.state = wire::RolloutState::from_word("running").unwrap() as i32;
    let mut succeeded = running.clone();
    succeeded.state = wire::RolloutState::from_word("succeeded").unwrap() as i32;
    succeeded.finished = true;
    succeeded.current_wave = 2;
    for w in &mut succeeded.waves {
        w.state = wire::WaveState::from_word("passed").unwrap() as i32;
        w.succeeded = 1;
    }
    succeeded.hosts[2].phase = wire::HostPhase::from_word("healthy").unwrap() as i32;
    succeeded.hosts[2].current_release = "2.0.0".into();
    let mut confirmed = succeeded.clone();
    confirm_all(&mut confirmed);
    let server = serve(Script {
        watch: vec![running, succeeded],
        get: Some(confirmed),
        ..Default::default()
    })
    .await;
    let mut control = super::client::Control::connect(&server.url)
        .await
        .expect("connect to the fake coordinator");
    let sink = super::watch::Captured::default();
    let exit = super::watch::follow_captured(
        &mut control,
        "r-42",
        None,
        Some(Duration::from_secs(20)),
        sink.clone(),
        super::watch::HostPage::default(),
    )
    .await
    .expect("the watch ends");
    assert_eq!(exit, Exit::Success);
    let text = String::from_utf8(sink.lock().unwrap().clone()).expect("utf-8");
    assert!(
        server.fake.lock().gets >= 1,
        "the view never asked again:\n{text}"
    );
    assert!(
        text.contains("host web-03 (wave 3): healthy → confirmed"),
        "{text}"
    );
    // The final hosts table: every host's phase is confirmed.
    let final_status = text
        .rsplit_once("\nhosts\n")
        .map(|(_, t)| t)
        .expect("a hosts table at the end");
    for host in ["web-01", "web-02", "web-03"] {
        let row = final_status
            .lines()
            .find(|l| l.trim_start().starts_with(host))
            .unwrap_or_else(|| panic!("no row for {host}:\n{text}"));
        assert!(row.contains("confirmed"), "{row}");
    }
    assert!(
        text.contains("rollout r-42 of web 2.0.0 succeeded"),
        "{text}"
    );
}

#[tokio::test]
async fn start_wait_exit_codes_follow_the_final_state() {
    for (state, code) in [
        ("succeeded", 0),
        ("rolled_back", 3),
        ("aborted", 3),
        ("failed", 3),
        ("paused", 5),
    ] {
        let server = serve(Script {
            watch: ending(state),
            ..Default::default()
        })
        .await;
        let (exit, err) = run(
            &server,
            &["rollout", "start", "-s", "web", "-r", "2.0.0", "--wait"],
        )
        .await;
        assert_eq!(exit.code(), code, "final state {state}: {err}");
        assert_eq!(server.fake.lock().started.len(), 1);
    }
}

#[tokio::test]
async fn status_watch_ends_when_the_stream_ends_with_a_final_state() {
    let server = serve(Script {
        watch: ending("rolled_back"),
        ..Default::default()
    })
    .await;
    let (exit, err) = run(&server, &["rollout", "status", "r-42", "--watch"]).await;
    assert_eq!(exit, Exit::RolloutFailed, "{err}");
}

/// The `(host_offset, host_limit)` of every GetRollout/WatchRollout the command made.
fn pages_asked(server: &Server, call: &str) -> Vec<(u32, u32)> {
    server
        .fake
        .lock()
        .rollout_refs
        .iter()
        .filter(|(c, _)| *c == call)
        .map(|(_, r)| (r.host_offset, r.host_limit))
        .collect()
}

#[tokio::test]
async fn status_asks_for_a_page_of_hosts_unless_told_all() {
    let page = super::args::DEFAULT_HOST_PAGE;
    for (args, want) in [
        (&["rollout", "status", "r-42"][..], (0, page)),
        (
            &[
                "rollout",
                "status",
                "r-42",
                "--page-size",
                "2",
                "--offset",
                "4",
            ][..],
            (4, 2),
        ),
        (&["rollout", "status", "r-42", "--all"][..], (0, 0)),
    ] {
        let server = serve(Script::default()).await;
        let (exit, err) = run(&server, args).await;
        assert_eq!(exit, Exit::Success, "{args:?}: {err}");
        assert_eq!(pages_asked(&server, "get"), vec![want], "{args:?}");
    }
    // A page and --all contradict each other; a page of 0 hosts is no page.
    for bad in [
        &[
            "serin",
            "rollout",
            "status",
            "r-42",
            "--all",
            "--page-size",
            "5",
        ][..],
        &["serin", "rollout", "status", "r-42", "--page-size", "0"][..],
    ] {
        assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} parsed");
    }
}

#[tokio::test]
async fn watching_a_rollout_asks_for_a_page_of_hosts_unless_told_all() {
    let page = super::args::DEFAULT_HOST_PAGE;
    for (args, want) in [
        (&["rollout", "status", "r-42", "--watch"][..], (0, page)),
        (
            &["rollout", "status", "r-42", "--watch", "--all"][..],
            (0, 0),
        ),
        (
            &["rollout", "status", "r-42", "--watch", "--page-size", "1"][..],
            (0, 1),
        ),
    ] {
        let server = serve(Script {
            watch: ending("succeeded"),
            ..Default::default()
        })
        .await;
        let (exit, err) = run(&server, args).await;
        assert_eq!(exit, Exit::Success, "{args:?}: {err}");
        let asked = pages_asked(&server, "watch");
        assert!(!asked.is_empty(), "{args:?}: no WatchRollout");
        assert!(asked.iter().all(|p| *p == want), "{args:?}: {asked:?}");
        assert!(
            pages_asked(&server, "get").iter().all(|p| *p == want),
            "{args:?}"
        );
    }
    // `start --wait` follows with the default page.
    let server = serve(Script {
        watch: ending("succeeded"),
        ..Default::default()
    })
    .await;
    let (exit, err) = run(
        &server,
        &["rollout", "start", "-s", "web", "-r", "2.0.0", "--wait"],
    )
    .await;
    assert_eq!(exit, Exit::Success, "{err}");
    assert_eq!(pages_asked(&server, "watch").first(), Some(&(0, page)));
}

#[tokio::test]
async fn wait_gives_up_after_the_timeout_with_exit_4() {
    let server = serve(Script {
        watch: vec![sample_status()],
        hold_open: true,
        ..Default::default()
    })
    .await;
    let started = std::time::Instant::now();
    let (exit, err) = run(
        &server,
        &[
            "rollout",
            "start",
            "-s",
            "web",
            "-r",
            "2.0.0",
            "--wait",
            "--timeout",
            "300ms",
        ],
    )
    .await;
    assert_eq!(exit, Exit::Timeout, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_rejected_spec_is_exit_2_with_the_servers_message() {
    let server = serve(Script {
        start_error: Some(Status::failed_precondition(
            "service web already has an active rollout r-1",
        )),
        ..Default::default()
    })
    .await;
    let (exit, err) = run(&server, &["rollout", "start", "-s", "web", "-r", "2.0.0"]).await;
    assert_eq!(exit, Exit::Usage);
    assert!(err.contains("already has an active rollout r-1"), "{err}");
    let (exit, err) = run(&server, &["rollout", "status", "r-404"]).await;
    assert_eq!(exit, Exit::Usage);
    assert!(err.contains("no rollout r-404"), "{err}");
}

#[tokio::test]
async fn push_streams_one_mib_chunks_and_checks_the_stored_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("web");
    let data: Vec<u8> = (0..(2 * 1024 * 1024 + 512 * 1024))
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(&file, &data).expect("write artifact");
    let path = file.display().to_string();

    let server = serve(Script::default()).await;
    let (exit, err) = run(
        &server,
        &["artifact", "push", &path, "-s", "web", "-r", "1.4.2"],
    )
    .await;
    assert_eq!(exit, Exit::Success, "{err}");
    {
        let s = server.fake.lock();
        assert_eq!(s.pushed, [1024 * 1024, 1024 * 1024, 512 * 1024]);
        assert_eq!(
            s.pushed_names,
            Some(("web".to_string(), "1.4.2".to_string()))
        );
    }

    let liar = serve(Script {
        lie_about_sha: true,
        ..Default::default()
    })
    .await;
    let (exit, err) = run(
        &liar,
        &["artifact", "push", &path, "-s", "web", "-r", "1.4.2"],
    )
    .await;
    assert_eq!(exit, Exit::Error);
    assert!(err.contains("sha256"), "{err}");

    let (exit, err) = run(
        &server,
        &[
            "artifact",
            "push",
            "/nonexistent/file",
            "-s",
            "web",
            "-r",
            "1",
        ],
    )
    .await;
    assert_eq!(exit, Exit::Usage);
    assert!(err.contains("/nonexistent/file"), "{err}");
}

#[tokio::test]
async fn every_read_command_and_control_action_succeeds_against_a_coordinator() {
    let server = serve(Script::default()).await;
    for args in [
        &["hosts", "-l", "zone=a"][..],
        &["release", "list"][..],
        &[
            "release",
            "add",
            "-s",
            "web",
            "-r",
            "1",
            "--url",
            "https://example.invalid/web",
            "--sha256",
            &"ab".repeat(32),
            "--size",
            "10",
        ][..],
        &["rollout", "plan", "-s", "web", "-r", "2"][..],
        &["rollout", "list"][..],
        &["rollout", "status", "r-42"][..],
        &["rollout", "explain", "r-42"][..],
        &["rollout", "pause", "r-42", "--reason", "lunch"][..],
    ] {
        let (exit, err) = run(&server, args).await;
        assert_eq!(exit, Exit::Success, "{args:?}: {err}");
    }
    let controls = server.fake.lock().controls.clone();
    assert_eq!(controls.len(), 1);
    assert_eq!(controls[0].action, wire::ControlAction::Pause as i32);
    assert_eq!(controls[0].reason, "lunch");
}

#[tokio::test]
async fn hosts_asks_for_a_summary_and_one_page_and_all_follows_every_page() {
    let hosts: Vec<String> = (1..=5).map(|i| format!("h{i:02}")).collect();
    let server = serve(Script {
        hosts: hosts.clone(),
        ..Script::default()
    })
    .await;
    let (exit, err) = run(&server, &["hosts", "--page-size", "2"]).await;
    assert_eq!(exit, Exit::Success, "{err}");
    let first = std::mem::take(&mut server.fake.lock().host_requests);
    assert_eq!(first.len(), 1, "without --all: one page only");
    assert!(first[0].summary, "without --all: with the summary");
    assert_eq!(first[0].page_size, 2);

    for args in [
        &["hosts", "--all", "--page-size", "2"][..],
        &["hosts", "--all", "--page-size", "2", "-l", "a"][..],
    ] {
        let (exit, err) = run(&server, args).await;
        assert_eq!(exit, Exit::Success, "{err}");
        let seen = std::mem::take(&mut server.fake.lock().host_requests);
        let tokens: Vec<&str> = seen.iter().map(|r| r.page_token.as_str()).collect();
        assert_eq!(
            tokens,
            ["", "h02", "h04"],
            "--all follows every next_page_token"
        );
        assert!(seen.iter().all(|r| !r.summary && r.page_size == 2));
    }
}
