//! The `drain` swap cycle, composed by hand from its parts (the agent-driven cycle is
//! `traffic_wired.rs`): 4 real `serin-demo-service` processes, each under its own process supervisor in
//! plain restart mode, behind a real HAProxy that polls an agent-check responder per host. Under
//! load through HAProxy, every host in turn is drained, waited on until idle
//! ([`DrainWait`] over HAProxy's `scur`), swapped (a plain restart), checked, and put back with
//! `ready`: forward to v2 on all 4 hosts, then back to v1 (a rollback). No request fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serin_agent::durable::replace_symlink;
use serin_agent::service_manager::ServiceManager;
use serin_agent::service_manager::supervisor::{Record, Supervisor, SupervisorSpec};
use serin_agent::traffic::{
    AgentCheckResponder, DrainVerdict, DrainWait, TrafficHandle, TrafficState,
};
use serin_tests::demo_release::DemoRelease;
use serin_tests::haproxy::{Haproxy, Server, free_port};
use serin_tests::load::LoadGen;
use serin_tests::wait::{wait_for, wait_for_value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const HOSTS: usize = 4;

/// Kills every recorded service process group when dropped.
struct KillServices(Vec<PathBuf>);

impl Drop for KillServices {
    fn drop(&mut self) {
        for dir in &self.0 {
            if let Ok(bytes) = std::fs::read(dir.join("supervisor.json"))
                && let Ok(r) = serde_json::from_slice::<Record>(&bytes)
            {
                let _ = killpg(Pid::from_raw(r.pgid() as i32), Signal::SIGKILL);
            }
        }
    }
}

struct Host {
    name: String,
    port: u16,
    service_dir: PathBuf,
    supervisor: Supervisor,
    traffic: TrafficHandle,
}

fn install(service_dir: &Path, releases: &[&DemoRelease]) {
    for r in releases {
        let rel = service_dir.join("releases").join(&r.id);
        std::fs::create_dir_all(&rel).unwrap();
        let bin = rel.join("web");
        std::fs::write(&bin, &r.bytes).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    replace_symlink(
        &service_dir.join("current"),
        Path::new(&format!("releases/{}", releases[0].id)),
    )
    .unwrap();
}

#[test]
fn drain_swap_undrain_over_four_hosts_and_back_fails_no_request_through_haproxy() {
    let v1 = DemoRelease::healthy("drain-1.0");
    let v2 = DemoRelease::healthy("drain-2.0");
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let mut kill = KillServices(Vec::new());
    let mut hosts = Vec::new();
    let mut servers = Vec::new();
    for i in 1..=HOSTS {
        let name = format!("h{i}");
        let service_dir = dir.path().join(&name).join("web");
        install(&service_dir, &[&v1, &v2]);
        kill.0.push(service_dir.clone());
        let port = free_port().unwrap();
        let _g = rt.enter();
        let supervisor = Supervisor::spawn(
            SupervisorSpec {
                service: "web".into(),
                service_dir: service_dir.clone(),
                binary: "web".into(),
                args: vec!["--port".into(), port.to_string()],
                env: Default::default(),
                stop_timeout: Duration::from_secs(5),
                restart_backoff: Duration::from_millis(100),
                restart_backoff_max: Duration::from_secs(1),
            },
            &tracker,
            token.clone(),
        );
        rt.block_on(supervisor.start()).unwrap();
        let traffic = TrafficHandle::new(TrafficState::new(None));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let responder =
            AgentCheckResponder::spawn(name.clone(), listener, &traffic, &tracker, token.clone())
                .unwrap();
        servers.push(Server {
            name: name.clone(),
            addr: ([127, 0, 0, 1], port).into(),
            agent: Some(responder.local_addr()),
        });
        hosts.push(Host {
            name,
            port,
            service_dir,
            supervisor,
            traffic,
        });
    }
    let haproxy = Haproxy::start(dir.path(), &servers, Duration::from_millis(200)).unwrap();
    let dump = || format!("{:?}\n{}", haproxy.stats(), haproxy.log_tail());
    for h in &hosts {
        wait_for(
            &format!("{} to serve", h.name),
            Duration::from_secs(10),
            &dump,
            || serin_tests::http::version(h.port).is_ok_and(|v| v == v1.id),
        );
    }

    let load = LoadGen::new(haproxy.frontend, "/version", 8).start();
    let mut evidence = Vec::new();
    let t0 = Instant::now();
    for (to, phase) in [(&v2, "rollout"), (&v1, "rollback")] {
        for h in &hosts {
            // Drain, and wait until idle (or the drain timeout, which the evidence would say).
            h.traffic.update(TrafficState::drain);
            let wait = DrainWait::new(Instant::now(), Duration::from_secs(5));
            let verdict = wait_for_value(
                &format!("{phase}: {} drained", h.name),
                Duration::from_secs(10),
                &dump,
                || {
                    let s = haproxy.server(&h.name).ok()?;
                    if !s.status.starts_with("DRAIN") {
                        return None;
                    }
                    match wait.decide(Instant::now(), s.scur) {
                        DrainVerdict::Wait => None,
                        v => Some(v),
                    }
                },
            );
            evidence.push(format!("{phase} {}: {}", h.name, verdict.evidence()));
            // Swap: a plain restart, refusing connections, but nobody is sent here.
            replace_symlink(
                &h.service_dir.join("current"),
                Path::new(&format!("releases/{}", to.id)),
            )
            .unwrap();
            rt.block_on(h.supervisor.restart()).unwrap();
            wait_for(
                &format!("{phase}: {} serving {}", h.name, to.id),
                Duration::from_secs(10),
                &dump,
                || serin_tests::http::version(h.port).is_ok_and(|v| v == to.id),
            );
            // Healthy: back in rotation.
            h.traffic.update(TrafficState::ready);
            wait_for(
                &format!("{phase}: {} back in rotation", h.name),
                Duration::from_secs(5),
                &dump,
                || haproxy.server(&h.name).is_ok_and(|s| s.serving()),
            );
        }
    }
    let took = t0.elapsed();
    let tally = load.stop();
    eprintln!(
        "drain cycle over {HOSTS} hosts, forward and back ({} swaps) in {took:?}: {}\n{}",
        HOSTS * 2,
        tally.summary(),
        evidence.join("\n")
    );
    assert_eq!(tally.failed(), 0, "{}\n{}", tally.summary(), dump());
    assert!(
        tally.ok_by_body.contains_key(&v1.id) && tally.ok_by_body.contains_key(&v2.id),
        "{}",
        tally.summary()
    );
    for h in &hosts {
        rt.block_on(h.supervisor.stop()).unwrap();
    }
    token.cancel();
    tracker.close();
    rt.block_on(tracker.wait());
}
