//! Living with a service: pruning old releases, slow health checks, a service that dies, and
//! the agent's own shutdown.

use std::time::Duration;

use serin_proto::wire::{OrderPhase, ResultCode};
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::{AgentOptions, SERVICE};
use serin_tests::demo_release::{Behaviour, DemoRelease};
use serin_tests::fake_coordinator::describe_result;
use serin_tests::orders::{self, Deadlines};
use serin_tests::wait;

#[test]
fn old_releases_beyond_keep_releases_are_pruned_but_current_and_previous_stay() {
    let mut opts = AgentOptions::new("prune");
    opts.keep_releases = 2;
    let fx = AgentFixture::start_with(opts);
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    for (seq, id) in [(2, "demo-2.0"), (3, "demo-3.0")] {
        fx.activate(seq, &DemoRelease::healthy(id), Deadlines::quick());
        fx.wait_phase(seq, OrderPhase::Healthy);
        fx.wait_serving(id);
    }
    wait::wait_for(
        "releases/ to hold exactly demo-2.0 and demo-3.0",
        Duration::from_secs(10),
        &|| fx.dump(),
        || fx.agent.releases() == ["demo-2.0", "demo-3.0"],
    );
    // The kept previous release is still a working rollback target.
    fx.send(orders::rollback(4, SERVICE, ""));
    let r = fx.wait_outcome(4);
    assert_eq!(
        r.phase(),
        OrderPhase::RolledBack,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    fx.wait_serving("demo-2.0");
}

#[test]
fn health_answers_slower_than_the_check_timeout_fail_the_release() {
    let fx = AgentFixture::start("slow-health");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    // The HTTP check times out after 500 ms; this release answers /healthz after 1.5 s.
    let slow = DemoRelease::build(Behaviour::healthy("demo-2.0").slow_health(1_500));
    fx.activate(
        2,
        &slow,
        Deadlines {
            healthy_deadline_ms: 3_000,
            min_healthy_ms: 500,
            confirm_deadline_ms: 30_000,
        },
    );
    let r = fx.wait_result("ROLLED_BACK or HEALTHY for order seq 2", |r| {
        r.seq == 2 && matches!(r.phase(), OrderPhase::RolledBack | OrderPhase::Healthy)
    });
    assert_eq!(
        r.phase(),
        OrderPhase::RolledBack,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert_eq!(r.code(), ResultCode::Unhealthy, "{}", describe_result(&r));
    fx.wait_serving("demo-1.0");
}

#[test]
fn a_service_that_dies_is_started_again() {
    let fx = AgentFixture::start("service-dies");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let pid = fx.agent.service_pid().expect("service pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("killing the service");
    wait::wait_for(
        "a new service process serving demo-1.0",
        Duration::from_secs(15),
        &|| fx.dump(),
        || {
            fx.agent.service_pid().is_ok_and(|p| p != pid)
                && fx.agent.version().is_ok_and(|v| v == "demo-1.0")
        },
    );
    assert_eq!(fx.agent.current_release().as_deref(), Some("demo-1.0"));
}

#[test]
fn sigterm_stops_the_agent_but_not_the_service_and_a_new_agent_adopts_it() {
    let fx = AgentFixture::start("sigterm");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let pid = fx.agent.service_pid().expect("service pid");
    let status = fx
        .agent
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", fx.dump()));
    assert!(
        status.success(),
        "agent exit status on SIGTERM: {status}\n{}",
        fx.dump()
    );
    assert_eq!(
        fx.agent.version().ok().as_deref(),
        Some("demo-1.0"),
        "{}",
        fx.dump()
    );

    fx.agent.spawn(None);
    let hello = fx.wait_attached(2);
    let inv = hello
        .services
        .iter()
        .find(|s| s.service == SERVICE)
        .expect("inventory");
    assert_eq!(inv.current_release, "demo-1.0");
    wait::hold_for(
        "the adopted service to keep serving from the same process",
        Duration::from_secs(2),
        &|| fx.dump(),
        || match (fx.agent.version(), fx.agent.service_pid()) {
            (Ok(v), Ok(p)) if v == "demo-1.0" && p == pid => Ok(()),
            other => Err(format!(
                "version and pid now {other:?}, before demo-1.0 and {pid}"
            )),
        },
    );
    assert_eq!(fx.agent.service_processes().len(), 1, "{}", fx.dump());
}
