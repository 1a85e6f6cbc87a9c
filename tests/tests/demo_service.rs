//! The demo service itself: behaviour from its trailer, graceful exit on SIGTERM.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serin_tests::agent_proc::free_port;
use serin_tests::demo_release::{Behaviour, DemoRelease};
use serin_tests::{binaries, http, wait};

/// A demo service process, killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Held while a test writes a binary and while it forks one: a fork of another test's thread
/// while this one's binary is open for writing would hold that descriptor until its exec, and
/// this exec would fail with ETXTBSY ("Text file busy"; seen in CI).
static WRITE_OR_FORK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(release: &DemoRelease, port: u16) -> (tempfile::TempDir, Running) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("demo");
    let _one = WRITE_OR_FORK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    std::fs::write(&exe, &release.bytes).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = Command::new(&exe)
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (dir, Running(child))
}

#[test]
fn releases_differ_and_serve_their_version_until_sigterm() {
    let a = DemoRelease::healthy("demo-1.0");
    let b = DemoRelease::healthy("demo-2.0");
    assert_ne!(a.sha256, b.sha256);
    let port = free_port();
    let (_dir, mut svc) = run(&a, port);
    wait::wait_for(
        "/version to answer",
        Duration::from_secs(10),
        &String::new,
        || http::version(port).is_ok(),
    );
    assert_eq!(http::version(port).unwrap(), "demo-1.0");
    assert_eq!(
        http::get(port, "/healthz", Duration::from_secs(2))
            .unwrap()
            .0,
        200
    );
    assert_eq!(http::pid(port).unwrap(), svc.0.id());
    kill(Pid::from_raw(svc.0.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait::wait_for_value(
        "exit on SIGTERM",
        Duration::from_secs(5),
        &String::new,
        || svc.0.try_wait().unwrap(),
    );
    assert!(status.success(), "SIGTERM exit status {status}");
}

#[test]
fn crash_at_start_exits_1() {
    let r = DemoRelease::build(Behaviour::healthy("demo-x").crashing_at_start());
    let (_dir, mut svc) = run(&r, free_port());
    let status = wait::wait_for_value("exit", Duration::from_secs(5), &String::new, || {
        svc.0.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(1));
}

#[test]
fn unhealthy_after_a_delay_and_slow_health() {
    let r = DemoRelease::build(
        Behaviour::healthy("demo-u")
            .unhealthy_after(1)
            .slow_health(300),
    );
    let port = free_port();
    let (_dir, _svc) = run(&r, port);
    wait::wait_for(
        "/version to answer",
        Duration::from_secs(10),
        &String::new,
        || http::version(port).is_ok(),
    );
    let t = std::time::Instant::now();
    let (status, _) = http::get(port, "/healthz", Duration::from_secs(2)).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "health answered too fast"
    );
    assert_eq!(status, 200);
    wait::wait_for(
        "/healthz to answer 500",
        Duration::from_secs(5),
        &String::new,
        || http::get(port, "/healthz", Duration::from_secs(2)).is_ok_and(|(s, _)| s == 500),
    );
    assert_eq!(http::version(port).unwrap(), "demo-u");
}

#[test]
fn without_a_trailer_it_is_dev() {
    let port = free_port();
    let one = WRITE_OR_FORK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let child = Command::new(binaries::demo_service())
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(one);
    let _svc = Running(child);
    wait::wait_for(
        "/version to answer",
        Duration::from_secs(10),
        &String::new,
        || http::version(port).is_ok(),
    );
    assert_eq!(http::version(port).unwrap(), "dev");
}
