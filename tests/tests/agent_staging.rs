//! Staging: downloads that must be refused, and releases downloaded from an HTTP URL.
//!
//! A refused release must leave nothing behind (no release directory, no staging leftovers) and
//! must not disturb the release that is serving.

use std::path::Path;
use std::time::Duration;

use serin_proto::wire::{OrderPhase, OrderResult, ResultCode};
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::{AgentOptions, SERVICE};
use serin_tests::demo_release::DemoRelease;
use serin_tests::fake_coordinator::{ArtifactFault, describe_result};
use serin_tests::http::ArtifactServer;
use serin_tests::orders::{self, Deadlines};
use serin_tests::wait;

/// Checks that a refused `release` left nothing behind and that demo-1.0 still serves, from the
/// same process as before (`pid`).
fn assert_refused_cleanly(
    fx: &AgentFixture,
    r: &OrderResult,
    code: &[ResultCode],
    release: &str,
    pid: u32,
) {
    assert_eq!(
        r.phase(),
        OrderPhase::Failed,
        "{}\n{}",
        describe_result(r),
        fx.dump()
    );
    assert!(
        code.contains(&r.code()),
        "expected a code in {code:?}, got {}\n{}",
        describe_result(r),
        fx.dump()
    );
    assert!(
        !r.message.is_empty(),
        "refusal without a message: {}",
        describe_result(r)
    );
    assert_eq!(r.current_release, "demo-1.0", "{}", describe_result(r));
    wait::wait_for(
        "the staging directory to be cleaned up",
        Duration::from_secs(5),
        &|| fx.dump(),
        || fx.agent.staging_entries().is_empty(),
    );
    assert!(
        !fx.agent.releases().contains(&release.to_owned()),
        "refused release {release} is in releases/\n{}",
        fx.dump()
    );
    assert_eq!(
        fx.agent.current_release().as_deref(),
        Some("demo-1.0"),
        "{}",
        fx.dump()
    );
    assert_eq!(
        fx.agent.version().ok().as_deref(),
        Some("demo-1.0"),
        "{}",
        fx.dump()
    );
    assert_eq!(
        fx.agent.service_pid().ok(),
        Some(pid),
        "the serving process changed while a release was refused\n{}",
        fx.dump()
    );
}

#[test]
fn activation_of_an_artifact_with_the_wrong_sha256_is_refused() {
    let fx = AgentFixture::start("wrong-sha");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let pid = fx.agent.service_pid().expect("service pid");
    let v2 = DemoRelease::healthy("demo-2.0");
    fx.publish(&v2);
    // The store serves the right length but different bytes than the release pins.
    fx.coord
        .set_fault(&v2.sha256, Some(ArtifactFault::WrongBytes));
    fx.send(orders::activate(
        2,
        v2.wire(SERVICE, ""),
        Deadlines::quick(),
    ));
    let r = fx.wait_outcome(2);
    assert_refused_cleanly(&fx, &r, &[ResultCode::HashMismatch], "demo-2.0", pid);
    assert!(
        r.message.contains("demo-2.0") || r.message.contains(&v2.sha256),
        "the message should name the release or its sha256: {}",
        describe_result(&r)
    );
}

#[test]
fn truncated_download_is_refused() {
    let fx = AgentFixture::start("truncated");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let pid = fx.agent.service_pid().expect("service pid");
    let v2 = DemoRelease::healthy("demo-2.0");
    fx.publish(&v2);
    fx.coord
        .set_fault(&v2.sha256, Some(ArtifactFault::TruncateAfter(v2.size / 2)));
    fx.send(orders::stage(2, v2.wire(SERVICE, "")));
    let r = fx.wait_outcome(2);
    assert_refused_cleanly(
        &fx,
        &r,
        &[ResultCode::SizeMismatch, ResultCode::DownloadFailed],
        "demo-2.0",
        pid,
    );
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
    st.blocks_available() * st.fragment_size()
}

#[test]
fn release_larger_than_the_free_space_is_refused() {
    // The declared size must exceed the free space yet stay under the protocol's 64 GiB limit, so
    // the agent's state lives on /dev/shm (a tmpfs of half the memory).
    let parent = Path::new("/dev/shm");
    let free = free_bytes(parent);
    let declared = free + free / 2 + (1 << 30);
    assert!(
        declared <= serin_proto::MAX_ARTIFACT_SIZE,
        "/dev/shm has {free} bytes free: cannot declare a release larger than that within the \
         {} byte limit",
        serin_proto::MAX_ARTIFACT_SIZE
    );
    let mut opts = AgentOptions::new("no-space");
    opts.temp_parent = Some(parent.to_path_buf());
    let fx = AgentFixture::start_with(opts);
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let pid = fx.agent.service_pid().expect("service pid");
    let v2 = DemoRelease::healthy("demo-2.0");
    fx.publish(&v2);
    let mut release = v2.wire(SERVICE, "");
    release.size = declared;
    fx.send(orders::stage(2, release));
    let r = fx.wait_outcome(2);
    assert_refused_cleanly(&fx, &r, &[ResultCode::InsufficientSpace], "demo-2.0", pid);
    assert!(
        fx.coord.fetches().iter().all(|f| f.sha256 != v2.sha256),
        "the agent downloaded a release that cannot fit\n{}",
        fx.dump()
    );
}

#[test]
fn release_from_an_http_url_is_staged_and_activated() {
    let fx = AgentFixture::start("url-release");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let server = ArtifactServer::start();
    let v2 = DemoRelease::healthy("demo-2.0");
    let url = server.put("/artifacts/demo-2.0", v2.bytes.clone());
    fx.send(orders::activate(
        2,
        v2.wire(SERVICE, &url),
        Deadlines::quick(),
    ));
    let r = fx.wait_result("HEALTHY or FAILED for order seq 2", |r| {
        r.seq == 2 && matches!(r.phase(), OrderPhase::Healthy | OrderPhase::Failed)
    });
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    fx.wait_serving("demo-2.0");
    fx.agent
        .verify_release("demo-2.0")
        .expect("URL release complete");
    assert_eq!(fx.agent.current_release().as_deref(), Some("demo-2.0"));
    assert!(
        server
            .requests()
            .iter()
            .any(|l| l.contains("/artifacts/demo-2.0")),
        "the artifact server saw no request: {:?}",
        server.requests()
    );
    assert!(
        fx.coord.fetches().iter().all(|f| f.sha256 != v2.sha256),
        "a URL release was fetched from the coordinator instead\n{}",
        fx.dump()
    );
}

#[test]
fn release_from_an_http_url_with_wrong_bytes_is_refused() {
    let fx = AgentFixture::start("url-wrong-bytes");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let pid = fx.agent.service_pid().expect("service pid");
    let server = ArtifactServer::start();
    let v2 = DemoRelease::healthy("demo-2.0");
    let mut tampered = v2.bytes.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x5a;
    let url = server.put("/artifacts/demo-2.0", tampered);
    fx.send(orders::activate(
        2,
        v2.wire(SERVICE, &url),
        Deadlines::quick(),
    ));
    let r = fx.wait_outcome(2);
    assert_refused_cleanly(&fx, &r, &[ResultCode::HashMismatch], "demo-2.0", pid);
}
