//! Activation, the dead-man switch and order sequencing, against a real agent.
//!
//! Every test installs a first healthy release, then activates another and checks what a user
//! cares about: which release `current` points at, which one answers `/version`, that earlier
//! releases stay on disk, and what the agent reported.

use std::time::{Duration, Instant};

use serin_proto::wire::{OrderPhase, ResultCode};
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::SERVICE;
use serin_tests::demo_release::{Behaviour, DemoRelease};
use serin_tests::fake_coordinator::describe_result;
use serin_tests::orders::{self, Deadlines};
use serin_tests::wait;

#[test]
fn stage_activate_confirm_serves_the_new_release_and_keeps_the_old() {
    let fx = AgentFixture::start("happy-path");
    let v1 = DemoRelease::healthy("demo-1.0");
    let v2 = DemoRelease::healthy("demo-2.0");
    fx.install_first(1, &v1);

    // Stage: on disk and verified, but nothing changes for the running service.
    fx.publish(&v2);
    fx.send(orders::stage(2, v2.wire(SERVICE, "")));
    let staged = fx.wait_outcome(2);
    assert_eq!(
        staged.phase(),
        OrderPhase::Staged,
        "{}\n{}",
        describe_result(&staged),
        fx.dump()
    );
    assert_eq!(
        staged.code(),
        ResultCode::Ok,
        "{}",
        describe_result(&staged)
    );
    fx.agent
        .verify_release("demo-2.0")
        .unwrap_or_else(|e| panic!("staged release is not complete: {e:#}\n{}", fx.dump()));
    assert_eq!(fx.agent.current_release().as_deref(), Some("demo-1.0"));
    assert_eq!(fx.agent.version().ok().as_deref(), Some("demo-1.0"));

    // Activate with a confirm deadline: the new release serves once healthy.
    fx.send(orders::activate(
        3,
        v2.wire(SERVICE, ""),
        Deadlines::quick().confirm_within(30_000),
    ));
    let healthy = fx.wait_phase(3, OrderPhase::Healthy);
    assert_eq!(healthy.release, "demo-2.0", "{}", describe_result(&healthy));
    fx.wait_serving("demo-2.0");
    assert_eq!(
        fx.agent.current_release().as_deref(),
        Some("demo-2.0"),
        "{}",
        fx.dump()
    );

    // Confirm: the dead-man switch is disarmed.
    fx.send(orders::confirm(4, SERVICE, "demo-2.0"));
    let confirmed = fx.wait_outcome(4);
    assert_eq!(
        confirmed.phase(),
        OrderPhase::Confirmed,
        "{}\n{}",
        describe_result(&confirmed),
        fx.dump()
    );
    assert_eq!(
        confirmed.current_release,
        "demo-2.0",
        "{}",
        describe_result(&confirmed)
    );

    // The old release is kept for a fast rollback, and both are complete.
    let releases = fx.agent.releases();
    assert!(
        releases.contains(&"demo-1.0".to_owned()) && releases.contains(&"demo-2.0".to_owned()),
        "releases on disk: {releases:?}\n{}",
        fx.dump()
    );
    fx.agent
        .verify_release("demo-1.0")
        .expect("old release still complete");
    fx.agent
        .verify_release("demo-2.0")
        .expect("new release complete");
    assert_eq!(
        fx.agent.current_target().unwrap().to_string_lossy(),
        "releases/demo-2.0"
    );

    // The agent streams health for the new release.
    wait::wait_for(
        "a healthy health report for demo-2.0",
        Duration::from_secs(10),
        &|| fx.dump(),
        || {
            fx.coord
                .health_reports(fx.host())
                .iter()
                .any(|h| h.service == SERVICE && h.release == "demo-2.0" && h.healthy)
        },
    );
    assert!(
        fx.coord.protocol_errors().is_empty(),
        "{:?}",
        fx.coord.protocol_errors()
    );
}

/// Waits for the outcome of an activation that the agent should roll back locally, and checks
/// the previous release serves again.
fn expect_local_rollback(fx: &AgentFixture, seq: u64, codes: &[ResultCode]) {
    let r = fx.wait_result(&format!("ROLLED_BACK or FAILED for order seq {seq}"), |r| {
        r.seq == seq && matches!(r.phase(), OrderPhase::RolledBack | OrderPhase::Failed)
    });
    assert_eq!(
        r.phase(),
        OrderPhase::RolledBack,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert!(
        codes.contains(&r.code()),
        "rollback reason: expected one of {codes:?}, got {}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert!(
        !r.message.is_empty(),
        "rollback reported without a reason: {}",
        describe_result(&r)
    );
    assert_eq!(r.current_release, "demo-1.0", "{}", describe_result(&r));
    fx.wait_serving("demo-1.0");
    assert_eq!(
        fx.agent.current_release().as_deref(),
        Some("demo-1.0"),
        "{}",
        fx.dump()
    );
    fx.agent
        .verify_release("demo-1.0")
        .expect("restored release complete");
}

#[test]
fn release_crashing_at_start_is_rolled_back_locally() {
    let fx = AgentFixture::start("crash-at-start");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let bad = DemoRelease::build(Behaviour::healthy("demo-2.0").crashing_at_start());
    fx.activate(2, &bad, Deadlines::quick().confirm_within(30_000));
    expect_local_rollback(
        &fx,
        2,
        &[ResultCode::ServiceFailedToStart, ResultCode::Unhealthy],
    );
}

#[test]
fn release_turning_unhealthy_is_rolled_back_locally() {
    let fx = AgentFixture::start("unhealthy-later");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    // Healthy for its first second, then /healthz answers 500; it must stay healthy for 4 s.
    let bad = DemoRelease::build(Behaviour::healthy("demo-2.0").unhealthy_after(1));
    fx.publish(&bad);
    fx.send(orders::activate(
        2,
        bad.wire(SERVICE, ""),
        Deadlines {
            healthy_deadline_ms: 8_000,
            min_healthy_ms: 4_000,
            confirm_deadline_ms: 30_000,
        },
    ));
    // It served before it turned unhealthy.
    fx.wait_serving("demo-2.0");
    expect_local_rollback(&fx, 2, &[ResultCode::Unhealthy]);
    let results = fx.results_for(2);
    assert!(
        !results.iter().any(|r| r.phase() == OrderPhase::Healthy),
        "a release that failed within its minimum healthy time was reported HEALTHY\n{}",
        fx.dump()
    );
}

#[test]
fn release_turning_unhealthy_while_awaiting_confirm_is_rolled_back_locally() {
    let fx = AgentFixture::start("unhealthy-awaiting-confirm");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    // Healthy long enough to be reported HEALTHY, then failing while the confirm is awaited.
    let bad = DemoRelease::build(Behaviour::healthy("demo-2.0").unhealthy_after(2));
    fx.activate(2, &bad, Deadlines::quick().confirm_within(30_000));
    fx.wait_phase(2, OrderPhase::Healthy);
    expect_local_rollback(&fx, 2, &[ResultCode::Unhealthy]);
}

#[test]
fn unconfirmed_activation_rolls_back_at_the_confirm_deadline() {
    let fx = AgentFixture::start("confirm-timeout");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let v2 = DemoRelease::healthy("demo-2.0");
    let activated_at = fx.activate(2, &v2, Deadlines::quick().confirm_within(3_000));
    fx.wait_phase(2, OrderPhase::Healthy);
    fx.wait_serving("demo-2.0");
    let (rolled_back_at, r) = fx.coord.wait_result_at(
        fx.host(),
        "ROLLED_BACK after the confirm deadline",
        Duration::from_secs(20),
        &|| fx.dump(),
        |r| r.seq == 2 && r.phase() == OrderPhase::RolledBack,
    );
    assert_eq!(
        r.code(),
        ResultCode::ConfirmTimeout,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    let after = rolled_back_at.duration_since(activated_at);
    assert!(
        after >= Duration::from_millis(2_500),
        "rolled back {after:?} after ACTIVATED, before the 3 s confirm deadline\n{}",
        fx.dump()
    );
    fx.wait_serving("demo-1.0");
    assert_eq!(
        fx.agent.current_release().as_deref(),
        Some("demo-1.0"),
        "{}",
        fx.dump()
    );
}

#[test]
fn confirm_deadline_holds_across_an_agent_sigkill() {
    let fx = AgentFixture::start("confirm-timeout-kill");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let v2 = DemoRelease::healthy("demo-2.0");
    let activated_at = fx.activate(2, &v2, Deadlines::quick().confirm_within(5_000));
    fx.wait_phase(2, OrderPhase::Healthy);
    fx.wait_serving("demo-2.0");

    // The scenario: the agent dies late in the confirm window (3 s into 5 s) and comes back.
    let kill_at = activated_at + Duration::from_secs(3);
    if let Some(left) = kill_at.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
    fx.agent.kill();
    let restarted_at = Instant::now();
    fx.agent.spawn(None);
    fx.wait_attached(2);

    let (rolled_back_at, r) = fx.coord.wait_result_at(
        fx.host(),
        "ROLLED_BACK after the confirm deadline, despite the agent restart",
        Duration::from_secs(20),
        &|| fx.dump(),
        |r| r.seq == 2 && r.phase() == OrderPhase::RolledBack,
    );
    assert_eq!(
        r.code(),
        ResultCode::ConfirmTimeout,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    // The deadline counts from the activation, not from the restart: a restarted clock would
    // roll back about 5 s after the restart, the right one about 2 s after it.
    let after_restart = rolled_back_at.duration_since(restarted_at);
    assert!(
        after_restart < Duration::from_millis(4_000),
        "rolled back {after_restart:?} after the restart: the confirm deadline was restarted \
         instead of kept\n{}",
        fx.dump()
    );
    fx.wait_serving("demo-1.0");
    assert_eq!(
        fx.agent.current_release().as_deref(),
        Some("demo-1.0"),
        "{}",
        fx.dump()
    );
}

#[test]
fn duplicate_order_is_applied_once_and_stale_order_is_rejected() {
    let fx = AgentFixture::start("dup-stale");
    fx.install_first(5, &DemoRelease::healthy("demo-1.0"));
    let v2 = DemoRelease::healthy("demo-2.0");
    fx.publish(&v2);
    let order = orders::activate(10, v2.wire(SERVICE, ""), Deadlines::quick());
    fx.send(order.clone());
    fx.wait_phase(10, OrderPhase::Healthy);
    fx.wait_serving("demo-2.0");
    let pid = fx.agent.service_pid().expect("service pid");
    let before = fx.results_for(10);

    // The same order again: its result is sent again, the service is not restarted.
    fx.send(order);
    wait::wait_for(
        "the result of order seq 10 to be re-sent",
        Duration::from_secs(10),
        &|| fx.dump(),
        || fx.results_for(10).len() > before.len(),
    );
    let resent = fx.results_for(10).pop().expect("a re-sent result");
    assert!(
        before.iter().any(|r| r.phase() == resent.phase()),
        "re-sent result {} is not one given before: {:?}\n{}",
        describe_result(&resent),
        before.iter().map(describe_result).collect::<Vec<_>>(),
        fx.dump()
    );
    wait::hold_for(
        "the service to keep running without a restart after a duplicate order",
        Duration::from_millis(1_500),
        &|| fx.dump(),
        || match (fx.agent.version(), fx.agent.service_pid()) {
            (Ok(v), Ok(p)) if v == "demo-2.0" && p == pid => Ok(()),
            other => Err(format!("version and pid now {other:?}, pid before {pid}")),
        },
    );

    // A lower sequence number than one already applied: rejected, nothing done.
    let v3 = DemoRelease::healthy("demo-3.0");
    fx.publish(&v3);
    fx.send(orders::stage(7, v3.wire(SERVICE, "")));
    let r = fx.wait_outcome(7);
    assert_eq!(
        r.phase(),
        OrderPhase::Rejected,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert_eq!(r.code(), ResultCode::StaleOrder, "{}", describe_result(&r));
    assert!(
        !fx.agent.releases().contains(&"demo-3.0".to_owned()),
        "{}",
        fx.dump()
    );
    assert!(
        !fx.coord.fetches().iter().any(|f| f.sha256 == v3.sha256),
        "a stale stage order fetched its artifact\n{}",
        fx.dump()
    );
    assert_eq!(fx.agent.current_release().as_deref(), Some("demo-2.0"));
    assert_eq!(fx.agent.version().ok().as_deref(), Some("demo-2.0"));
}

#[test]
fn ordered_rollback_restores_the_previous_release() {
    let fx = AgentFixture::start("ordered-rollback");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    fx.activate(2, &DemoRelease::healthy("demo-2.0"), Deadlines::quick());
    fx.wait_phase(2, OrderPhase::Healthy);
    fx.wait_serving("demo-2.0");
    fx.send(orders::rollback(3, SERVICE, ""));
    let r = fx.wait_outcome(3);
    assert_eq!(
        r.phase(),
        OrderPhase::RolledBack,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert_eq!(r.current_release, "demo-1.0", "{}", describe_result(&r));
    fx.wait_serving("demo-1.0");
    assert_eq!(fx.agent.current_release().as_deref(), Some("demo-1.0"));

    // Rolling back to a release that is not on disk fails and changes nothing.
    fx.send(orders::rollback(4, SERVICE, "demo-9.9"));
    let r = fx.wait_outcome(4);
    assert_eq!(
        r.phase(),
        OrderPhase::Failed,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert_eq!(
        r.code(),
        ResultCode::UnknownRelease,
        "{}",
        describe_result(&r)
    );
    assert_eq!(fx.agent.version().ok().as_deref(), Some("demo-1.0"));
}

#[test]
fn rollback_order_for_the_release_already_running_does_not_restart_it() {
    let fx = AgentFixture::start("rollback-already-current");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    // The host rolls back by itself (the new release crashes at start)...
    let bad = DemoRelease::build(Behaviour::healthy("demo-2.0").crashing_at_start());
    fx.activate(2, &bad, Deadlines::quick().confirm_within(30_000));
    expect_local_rollback(
        &fx,
        2,
        &[ResultCode::ServiceFailedToStart, ResultCode::Unhealthy],
    );
    let pid = fx.agent.service_pid().expect("service pid");
    // ...then the coordinator's rollback order arrives: nothing to do but say so.
    fx.send(orders::rollback(3, SERVICE, "demo-1.0"));
    let r = fx.wait_outcome(3);
    assert_eq!(
        (r.phase(), r.code()),
        (OrderPhase::RolledBack, ResultCode::Ok),
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert_eq!(r.current_release, "demo-1.0", "{}", describe_result(&r));
    assert_eq!(
        fx.agent.service_pid().ok(),
        Some(pid),
        "the release already running was restarted by a rollback to itself\n{}",
        fx.dump()
    );
    assert!(
        !r.message.contains("from demo-1.0"),
        "{}",
        describe_result(&r)
    );
}

/// The armed activation's `confirm_by_unix_ms` in the journal, if any.
fn journaled_confirm_by(fx: &AgentFixture) -> Option<u64> {
    let state = fx.agent.state_json().ok()?;
    state["activation"]["phase"]["confirm_by_unix_ms"].as_u64()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[test]
fn a_hold_keeps_the_dead_man_switch_fed_across_an_agent_restart() {
    let fx = AgentFixture::start("hold-confirm");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let v2 = DemoRelease::healthy("demo-2.0");
    fx.activate(2, &v2, Deadlines::quick().confirm_within(3_000));
    fx.wait_phase(2, OrderPhase::Healthy);
    let first_by = journaled_confirm_by(&fx).expect("an armed journal with a confirm deadline");

    // A hold for another release changes nothing; the one for demo-2.0 moves the deadline to
    // about now + 6 s, journaled.
    let held_at = Instant::now();
    let held_unix = unix_ms();
    fx.coord
        .send_hold(fx.host(), SERVICE, "demo-9.9", 600_000)
        .expect("sending a hold");
    fx.coord
        .send_hold(fx.host(), SERVICE, "demo-2.0", 6_000)
        .expect("sending a hold");
    let by = wait::wait_for_value(
        "the hold to be journaled",
        Duration::from_secs(5),
        &|| fx.dump(),
        || journaled_confirm_by(&fx).filter(|by| *by > first_by),
    );
    assert!(
        by >= held_unix + 6_000 && by < held_unix + 60_000,
        "confirm deadline {by} is not about 6 s after the hold at {held_unix} (the hold for \
         another release must be ignored)\n{}",
        fx.dump()
    );

    // The agent dies and comes back: the held deadline, not the original one, still holds.
    fx.agent.kill();
    fx.agent.spawn(None);
    fx.wait_attached(2);
    let (rolled_back_at, r) = fx.coord.wait_result_at(
        fx.host(),
        "ROLLED_BACK at the held confirm deadline",
        Duration::from_secs(20),
        &|| fx.dump(),
        |r| r.seq == 2 && r.phase() == OrderPhase::RolledBack,
    );
    assert_eq!(
        r.code(),
        ResultCode::ConfirmTimeout,
        "{}",
        describe_result(&r)
    );
    let after = rolled_back_at.duration_since(held_at);
    assert!(
        after >= Duration::from_millis(5_500),
        "rolled back {after:?} after the hold: the held deadline was not kept\n{}",
        fx.dump()
    );
    fx.wait_serving("demo-1.0");
}
