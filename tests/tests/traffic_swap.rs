//! Swap modes of the process supervisor under load, on one host: 20 swaps each of a real
//! `serin-demo-service` between two releases while a bounded load generator sends requests
//! straight at the service's port. `socket` (the supervisor holds the listening socket) and
//! `reload` (the application re-execs itself keeping its socket) refuse and reset nothing; the
//! plain restart in the same test refuses connections, so the test can tell the difference.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serin_agent::durable::replace_symlink;
use serin_agent::service_manager::ServiceManager;
use serin_agent::service_manager::supervisor::{Record, Supervisor, SupervisorSpec, SwapMode};
use serin_tests::demo_release::DemoRelease;
use serin_tests::haproxy::free_port;
use serin_tests::load::{LoadGen, Tally};
use serin_tests::wait::wait_for;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const SWAPS: usize = 20;
const REQUESTS_BETWEEN_SWAPS: u64 = 25;

/// Kills whatever the supervisor recorded (the whole process group) when dropped.
struct KillService(PathBuf);

impl Drop for KillService {
    fn drop(&mut self) {
        if let Ok(bytes) = std::fs::read(self.0.join("supervisor.json"))
            && let Ok(r) = serde_json::from_slice::<Record>(&bytes)
        {
            let _ = killpg(Pid::from_raw(r.pgid() as i32), Signal::SIGKILL);
        }
    }
}

struct Outcome {
    tally: Tally,
    pids: BTreeSet<u32>,
    took: Duration,
}

fn service_log(service_dir: &Path) -> String {
    let text = std::fs::read_to_string(service_dir.join("service.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "--- service.log ---\n{}",
        lines[lines.len().saturating_sub(30)..].join("\n")
    )
}

fn swaps_under_load(
    name: &str,
    releases: &[DemoRelease; 2],
    swap: impl Fn(u16) -> SwapMode,
) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let service_dir = dir.path().join("web");
    for r in releases {
        let rel = service_dir.join("releases").join(&r.id);
        std::fs::create_dir_all(&rel).unwrap();
        let bin = rel.join("web");
        std::fs::write(&bin, &r.bytes).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let current = service_dir.join("current");
    replace_symlink(&current, Path::new(&format!("releases/{}", releases[0].id))).unwrap();
    let _kill = KillService(service_dir.clone());
    let port = free_port().unwrap();
    let spec = SupervisorSpec {
        service: "web".into(),
        service_dir: service_dir.clone(),
        binary: "web".into(),
        args: vec!["--port".into(), port.to_string()],
        env: Default::default(),
        stop_timeout: Duration::from_secs(5),
        restart_backoff: Duration::from_millis(100),
        restart_backoff_max: Duration::from_secs(1),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    let sup = {
        let _g = rt.enter();
        Supervisor::spawn_with_swap(spec, swap(port), &tracker, token.clone())
    };
    let dump = || service_log(&service_dir);
    let answers = |version: &str| serin_tests::http::version(port).is_ok_and(|v| v == version);
    rt.block_on(sup.start()).unwrap();
    wait_for(
        "the first release to answer",
        Duration::from_secs(10),
        &dump,
        || answers(&releases[0].id),
    );

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let load = LoadGen::new(addr, "/version", 8).start();
    let mut pids = BTreeSet::new();
    let t0 = Instant::now();
    for i in 1..=SWAPS {
        // Every swap happens under load: some requests go through between any two swaps.
        let mark = load.sent();
        wait_for(
            &format!("{name}: load before swap {i}"),
            Duration::from_secs(10),
            &dump,
            || load.sent() >= mark + REQUESTS_BETWEEN_SWAPS,
        );
        let to = &releases[i % 2];
        replace_symlink(&current, Path::new(&format!("releases/{}", to.id))).unwrap();
        rt.block_on(sup.restart())
            .unwrap_or_else(|e| panic!("{name}: swap {i} failed: {e}\n{}", dump()));
        wait_for(
            &format!("{name}: swap {i} to {}", to.id),
            Duration::from_secs(10),
            &dump,
            || answers(&to.id),
        );
        let status = rt.block_on(sup.status()).unwrap();
        pids.insert(status.pid.unwrap());
    }
    let took = t0.elapsed();
    let tally = load.stop();
    rt.block_on(sup.stop()).unwrap();
    token.cancel();
    tracker.close();
    rt.block_on(tracker.wait());
    eprintln!("{name:>8}: {SWAPS} swaps in {took:?}: {}", tally.summary());
    Outcome { tally, pids, took }
}

#[test]
fn socket_and_reload_swaps_refuse_nothing_where_a_plain_restart_does() {
    let releases = [DemoRelease::healthy("v1"), DemoRelease::healthy("v2")];

    let socket = swaps_under_load("socket", &releases, |port| SwapMode::Socket {
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
    });
    let reload = swaps_under_load("reload", &releases, |_| SwapMode::Reload {
        ready_timeout: Duration::from_secs(10),
    });
    let restart = swaps_under_load("restart", &releases, |_| SwapMode::Restart);

    for (name, o) in [("socket", &socket), ("reload", &reload)] {
        assert_eq!(o.tally.failed(), 0, "{name}: {}", o.tally.summary());
        // Every swap was a new process, and both releases served requests under load.
        assert_eq!(o.pids.len(), SWAPS, "{name}: main pids {:?}", o.pids);
        assert!(
            o.tally.ok_by_body.len() == 2 && o.tally.ok_by_body.values().all(|n| *n > 0),
            "{name}: {}",
            o.tally.summary()
        );
        assert!(
            o.tally.ok() > 500,
            "{name}: too little load: {}",
            o.tally.summary()
        );
        eprintln!("{name}: {SWAPS} swaps in {:?}", o.took);
    }
    assert!(
        restart.tally.refused > 0,
        "the plain restart refused nothing, so this test cannot tell the modes apart: {}",
        restart.tally.summary()
    );
}
