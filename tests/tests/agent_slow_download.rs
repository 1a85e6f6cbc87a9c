//! A slow download never wedges a host (issue 8 #4): a trickling source is abandoned by the
//! minimum rate, a rollback or a newer order preempts a stage in progress, a cancel order
//! cancels it, and nothing is left in `staging/` afterwards.
//!
//! The trickling source is a real HTTP server ([`ArtifactServer::put_trickle`]) that sends the
//! artifact a byte at a time.

use std::time::Duration;

use serin_proto::wire::{OrderPhase, ResultCode};
use serin_tests::agent_fixture::{AgentFixture, TIMEOUT};
use serin_tests::agent_proc::{AgentOptions, SERVICE};
use serin_tests::demo_release::DemoRelease;
use serin_tests::fake_coordinator::describe_result;
use serin_tests::http::ArtifactServer;
use serin_tests::orders::{self, Deadlines};
use serin_tests::wait;

/// A fixture whose agent gives up on downloads slower than 64 KiB/s over 1 s.
fn fixture(name: &str, strict: bool) -> AgentFixture {
    let mut opts = AgentOptions::new(name);
    if strict {
        opts.extra_top_toml =
            "[download]\nmin_bytes_per_sec = 65536\nrate_window = \"1s\"\ndeadline = \"60s\"\n"
                .to_owned();
    }
    AgentFixture::start_with(opts)
}

/// Serves `release` from `server` one byte every 200 ms; returns its URL.
fn trickle(server: &ArtifactServer, release: &DemoRelease) -> String {
    server.put_trickle(
        &format!("/{}", release.id),
        release.bytes.clone(),
        1,
        Duration::from_millis(200),
    )
}

/// Waits until the agent has asked `server` for `release` (its stage is under way).
fn wait_download_started(fx: &AgentFixture, server: &ArtifactServer, release: &DemoRelease) {
    wait::wait_for(
        &format!("the agent to request {}", release.id),
        TIMEOUT,
        &|| format!("requests: {:?}\n{}", server.requests(), fx.dump()),
        || {
            server
                .requests()
                .iter()
                .any(|r| r.contains(&format!("/{} ", release.id)))
        },
    );
}

fn assert_staging_empty(fx: &AgentFixture) {
    let left = fx.agent.staging_entries();
    assert!(left.is_empty(), "left in staging: {left:?}\n{}", fx.dump());
}

#[test]
fn a_trickling_download_is_abandoned_below_the_minimum_rate() {
    let fx = fixture("trickle-abandoned", true);
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let server = ArtifactServer::start();
    let v2 = DemoRelease::healthy("demo-2.0");
    let url = trickle(&server, &v2);
    fx.send(orders::activate(
        2,
        v2.wire(SERVICE, &url),
        Deadlines::quick(),
    ));
    let r = fx.wait_outcome(2);
    assert_eq!(
        (r.phase(), r.code()),
        (OrderPhase::Failed, ResultCode::DownloadFailed),
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert!(r.message.contains("too slow"), "{}", describe_result(&r));
    assert_staging_empty(&fx);
    assert_eq!(fx.agent.version().ok().as_deref(), Some("demo-1.0"));
    assert!(!fx.agent.releases().contains(&v2.id));
}

#[test]
fn a_rollback_preempts_a_stage_in_progress() {
    let fx = fixture("rollback-preempts-stage", false);
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let v2 = DemoRelease::healthy("demo-2.0");
    fx.activate(2, &v2, Deadlines::quick());
    fx.wait_phase(2, OrderPhase::Healthy);
    fx.wait_serving("demo-2.0");

    let server = ArtifactServer::start();
    let v3 = DemoRelease::healthy("demo-3.0");
    let url = trickle(&server, &v3);
    fx.send(orders::activate(
        3,
        v3.wire(SERVICE, &url),
        Deadlines::quick(),
    ));
    wait_download_started(&fx, &server, &v3);

    fx.send(orders::rollback(4, SERVICE, "demo-1.0"));
    let r = fx.wait_outcome(4);
    assert_eq!(
        (r.phase(), r.code()),
        (OrderPhase::RolledBack, ResultCode::Ok),
        "the rollback must not be refused while staging: {}\n{}",
        describe_result(&r),
        fx.dump()
    );
    let stage = fx.wait_outcome(3);
    assert_eq!(
        stage.phase(),
        OrderPhase::Cancelled,
        "{}\n{}",
        describe_result(&stage),
        fx.dump()
    );
    assert_staging_empty(&fx);
    fx.wait_serving("demo-1.0");
    assert!(!fx.agent.releases().contains(&v3.id), "{}", fx.dump());
}

#[test]
fn a_newer_activation_preempts_a_stage_and_a_cancel_cancels_one() {
    let fx = fixture("newer-order-preempts-stage", false);
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let server = ArtifactServer::start();

    // A cancel order cancels the stage; its answer comes once staging is clean.
    let v2 = DemoRelease::healthy("demo-2.0");
    let url = trickle(&server, &v2);
    fx.send(orders::stage(2, v2.wire(SERVICE, &url)));
    wait_download_started(&fx, &server, &v2);
    fx.send(orders::cancel(3, SERVICE));
    let r = fx.wait_outcome(3);
    assert_eq!(r.phase(), OrderPhase::Cancelled, "{}", describe_result(&r));
    assert!(r.message.contains("demo-2.0"), "{}", describe_result(&r));
    assert_staging_empty(&fx);
    assert_eq!(fx.wait_outcome(2).phase(), OrderPhase::Cancelled);

    // A newer activation (from the coordinator, fast) preempts a trickling stage.
    let v3 = DemoRelease::healthy("demo-3.0");
    let url = trickle(&server, &v3);
    fx.send(orders::stage(4, v3.wire(SERVICE, &url)));
    wait::wait_for(
        "the second request for demo-3.0's stage",
        TIMEOUT,
        &|| fx.dump(),
        || server.requests().iter().any(|r| r.contains("/demo-3.0 ")),
    );
    let v4 = DemoRelease::healthy("demo-4.0");
    fx.publish(&v4);
    fx.send(orders::activate(
        5,
        v4.wire(SERVICE, ""),
        Deadlines::quick(),
    ));
    let r = fx.wait_activation_end(5);
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert_eq!(fx.wait_outcome(4).phase(), OrderPhase::Cancelled);
    fx.wait_serving("demo-4.0");
    assert_staging_empty(&fx);
}

/// Prepare, then activate (issue 10): the activation of the very release a stage is
/// downloading takes that download over. Before, it cancelled the stage, removed its partial
/// download and fetched the whole release again.
#[test]
fn an_activation_of_the_release_being_staged_takes_its_download_over() {
    let fx = fixture("activation-takes-over-stage", false);
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let server = ArtifactServer::start();
    let v2 = DemoRelease::healthy("demo-2.0");
    // About a second for the whole artifact: long enough to activate while it downloads.
    let url = server.put_trickle(
        &format!("/{}", v2.id),
        v2.bytes.clone(),
        v2.bytes.len() / 10 + 1,
        Duration::from_millis(100),
    );
    fx.send(orders::stage(2, v2.wire(SERVICE, &url)));
    wait_download_started(&fx, &server, &v2);
    fx.send(orders::activate(
        3,
        v2.wire(SERVICE, &url),
        Deadlines::quick(),
    ));
    let stage = fx.wait_outcome(2);
    assert_eq!(
        (stage.phase(), stage.code()),
        (OrderPhase::Cancelled, ResultCode::Cancelled),
        "{}\n{}",
        describe_result(&stage),
        fx.dump()
    );
    assert!(
        stage.message.contains("takes over"),
        "{}",
        describe_result(&stage)
    );
    let r = fx.wait_activation_end(3);
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    fx.wait_serving("demo-2.0");
    let fetched = server
        .requests()
        .iter()
        .filter(|r| r.contains("/demo-2.0 "))
        .count();
    assert_eq!(
        fetched,
        1,
        "the release was downloaded again: {:?}\n{}",
        server.requests(),
        fx.dump()
    );
    assert_staging_empty(&fx);
}
