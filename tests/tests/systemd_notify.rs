//! The daemons' systemd protocol, without systemd: a test socket stands in for `NOTIFY_SOCKET`.
//!
//! `Type=notify` units are ready only on `READY=1`, and with `WatchdogSec=` systemd kills a daemon
//! whose `WATCHDOG=1` pings stop. Each daemon must send `READY=1` once it can do its job, ping
//! while its main loop turns, and stop pinging when the loop wedges (the agent's test build has a
//! wedge hook; the system suite checks that systemd then restarts it).

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serin_tests::agent_proc::{AgentOptions, config_toml};
use serin_tests::binaries;
use serin_tests::fake_coordinator::FakeCoordinator;

/// Kills the child on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The notification socket a daemon under test talks to.
struct Notify {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Notify {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
        Notify {
            socket,
            _dir: dir,
            path,
        }
    }

    /// The next notification within `timeout`, or `None`.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .expect("setting the read timeout");
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    }

    /// Waits up to `timeout` for a notification equal to `wanted`; returns what came before it.
    fn wait_for(&self, wanted: &str, timeout: Duration, log: &Path) -> Vec<String> {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(msg) if msg == wanted => return seen,
                Some(msg) => seen.push(msg),
                None => break,
            }
        }
        panic!(
            "no {wanted} within {timeout:?}; got {seen:?}\nlog:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// Starts `serin-agent` (`binary`) against `coord` with the notify socket and a 1 s watchdog.
fn start_agent(
    binary: &Path,
    coord: &FakeCoordinator,
    notify: &Notify,
    extra: &[(&str, &Path)],
) -> (Proc, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        config_toml(
            &AgentOptions::new("systemd-notify"),
            &coord.url(),
            &dir.path().join("state"),
            "notify-host",
            serin_tests::agent_proc::free_port(),
        ),
    )
    .expect("writing the config");
    let mut cmd = Command::new(binary);
    cmd.arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.log")).expect("agent log"));
    for (k, v) in extra {
        cmd.env(k, v);
    }
    (Proc(cmd.spawn().expect("starting serin-agent")), dir)
}

#[test]
fn agent_is_ready_once_its_loop_turns_and_feeds_the_watchdog() {
    let coord = FakeCoordinator::start();
    let notify = Notify::new();
    let (_agent, dir) = start_agent(&binaries::agent(), &coord, &notify, &[]);
    let log = dir.path().join("agent.log");
    let before = notify.wait_for("READY=1", Duration::from_secs(20), &log);
    assert!(
        before.is_empty(),
        "notifications before READY=1: {before:?}"
    );
    // A 1 s watchdog: pings every 250 ms.
    for _ in 0..3 {
        notify.wait_for("WATCHDOG=1", Duration::from_secs(2), &log);
    }
}

#[test]
fn a_wedged_agent_loop_stops_feeding_the_watchdog() {
    let coord = FakeCoordinator::start();
    let notify = Notify::new();
    let wedge_dir = tempfile::tempdir().expect("tempdir");
    let wedge = wedge_dir.path().join("wedge");
    let (_agent, dir) = start_agent(
        &binaries::fault_agent(),
        &coord,
        &notify,
        &[("SERIN_AGENT_WEDGE_FILE", &wedge)],
    );
    let log = dir.path().join("agent.log");
    notify.wait_for("READY=1", Duration::from_secs(20), &log);
    notify.wait_for("WATCHDOG=1", Duration::from_secs(2), &log);

    std::fs::write(&wedge, "main-loop").expect("writing the wedge file");
    // The hook removes the file when it wedges the loop.
    serin_tests::wait::wait_for(
        "the agent's main loop to take the wedge",
        Duration::from_secs(5),
        &|| std::fs::read_to_string(&log).unwrap_or_default(),
        || !wedge.exists(),
    );
    // A ping already decided may still arrive within half a period; after that, none.
    let settle = Instant::now() + Duration::from_millis(600);
    while let Some(left) = settle.checked_duration_since(Instant::now()) {
        if notify.next(left).is_none() {
            break;
        }
    }
    let quiet = Instant::now() + Duration::from_millis(1500);
    while let Some(left) = quiet.checked_duration_since(Instant::now()) {
        if let Some(msg) = notify.next(left) {
            assert_ne!(
                msg,
                "WATCHDOG=1",
                "a wedged main loop still fed the watchdog\nlog:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
}

#[test]
fn coordinator_is_ready_once_it_answers_and_feeds_the_watchdog() {
    let notify = Notify::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("serin.log");
    // Mutual TLS: the self-probe presents the coordinator's own certificate.
    let config = dir.path().join("coordinator.toml");
    let tls = serin_tests::tls::pki().coordinator(std::net::Ipv4Addr::LOCALHOST.into());
    std::fs::write(&config, serin_tests::tls::tls_toml(&tls)).expect("writing the config");
    let child = Command::new(binaries::serin())
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("serin log"))
        .spawn()
        .expect("starting serin serve");
    let mut serin = Proc(child);
    notify.wait_for("READY=1", Duration::from_secs(20), &log);
    for _ in 0..3 {
        notify.wait_for("WATCHDOG=1", Duration::from_secs(2), &log);
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(serin.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    notify.wait_for("STOPPING=1", Duration::from_secs(10), &log);
    let status = serin.0.wait().expect("waiting for serin");
    assert!(
        status.success(),
        "serin serve exited {status} after SIGTERM"
    );
}
