//! Slow starters and slow stoppers (issue 8 #1 and #9): a healthy release that listens only
//! seconds after its start, or whose predecessor drains for seconds on SIGTERM, is never rolled
//! back within its healthy deadline, whatever kind of health check watches it; and after a swap
//! or a rollback no verdict about the previous process speaks for the new one.
//!
//! Each case runs a real agent supervising the demo service, built with `listen_after` (it
//! binds its port only after a delay) and `slow_stop` (it keeps serving for a while after
//! SIGTERM), and checks what the agent reported and what serves afterwards.

use std::time::Duration;

use serin_proto::wire::{OrderPhase, ResultCode};
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::{AgentOptions, SERVICE};
use serin_tests::demo_release::{Behaviour, DemoRelease};
use serin_tests::fake_coordinator::describe_result;
use serin_tests::orders::{self, Deadlines};

/// The `[[service.check]]` table of one check kind, probing every 200 ms.
fn check_toml(kind: &str) -> String {
    let body = match kind {
        "http" => "kind = \"http\"\nurl = \"http://127.0.0.1:{port}/healthz\"".to_owned(),
        "tcp" => "kind = \"tcp\"\naddress = \"127.0.0.1:{port}\"".to_owned(),
        // A command that succeeds only while something listens on the port.
        "command" => {
            "kind = \"command\"\ncommand = [\"bash\", \"-c\", \"exec 3<>/dev/tcp/127.0.0.1/{port}\"]"
                .to_owned()
        }
        "restarts" => "kind = \"restarts\"\nmax = 0".to_owned(),
        other => panic!("unknown check kind {other}"),
    };
    format!(
        "\n[[service.check]]\nname = \"{kind}\"\n{body}\ninterval = \"200ms\"\ntimeout = \"500ms\"\nfailure_threshold = 2\nsuccess_threshold = 1\n"
    )
}

/// Installs a slow-stopping v1, then activates a v2 that listens only after `listen_after_ms`
/// and stops slowly too, then a v3 that listens after half a second: each must become HEALTHY
/// and be kept, never rolled back.
fn slow_start_and_stop_is_not_a_failure(kind: &str, listen_after_ms: u64) {
    let mut opts = AgentOptions::new(&format!("slow-{kind}"));
    opts.checks_toml = check_toml(kind);
    let fx = AgentFixture::start_with(opts);
    let v1 = DemoRelease::build(Behaviour::healthy("demo-1.0").slow_stop(1_500));
    fx.install_first(1, &v1);

    let deadlines = Deadlines {
        healthy_deadline_ms: listen_after_ms + 10_000,
        min_healthy_ms: 1_000,
        confirm_deadline_ms: 0,
    };
    let v2 = DemoRelease::build(
        Behaviour::healthy("demo-2.0")
            .listen_after(listen_after_ms)
            .slow_stop(1_500),
    );
    let v3 = DemoRelease::build(Behaviour::healthy("demo-3.0").listen_after(500));
    for (seq, release) in [(2, &v2), (3, &v3)] {
        fx.publish(release);
        fx.send(orders::activate(seq, release.wire(SERVICE, ""), deadlines));
        let r = fx.wait_result(
            &format!("HEALTHY, ROLLED_BACK or FAILED for order seq {seq}"),
            |r| {
                r.seq == seq
                    && matches!(
                        r.phase(),
                        OrderPhase::Healthy | OrderPhase::RolledBack | OrderPhase::Failed
                    )
            },
        );
        assert_eq!(
            r.phase(),
            OrderPhase::Healthy,
            "check kind {kind}: a healthy slow release {} was not reported healthy: {}\n{}",
            release.id,
            describe_result(&r),
            fx.dump()
        );
        fx.wait_serving(&release.id);
        assert_eq!(
            fx.agent.current_release().as_deref(),
            Some(release.id.as_str()),
            "check kind {kind}\n{}",
            fx.dump()
        );
    }
    // No result of either activation ever said rolled back.
    for seq in [2, 3] {
        let rolled_back: Vec<_> = fx
            .results_for(seq)
            .into_iter()
            .filter(|r| matches!(r.phase(), OrderPhase::RolledBack | OrderPhase::Failed))
            .map(|r| describe_result(&r))
            .collect();
        assert!(
            rolled_back.is_empty(),
            "check kind {kind}: {rolled_back:?}\n{}",
            fx.dump()
        );
    }
}

#[test]
fn slow_start_and_stop_http() {
    slow_start_and_stop_is_not_a_failure("http", 3_000);
}

#[test]
fn slow_start_and_stop_tcp() {
    slow_start_and_stop_is_not_a_failure("tcp", 3_000);
}

#[test]
fn slow_start_and_stop_command() {
    slow_start_and_stop_is_not_a_failure("command", 3_000);
}

#[test]
fn slow_start_and_stop_restarts() {
    slow_start_and_stop_is_not_a_failure("restarts", 3_000);
}

#[test]
fn slow_start_five_seconds_http() {
    slow_start_and_stop_is_not_a_failure("http", 5_000);
}

/// After a local rollback from a release that answered 500 while it drained, the verdicts the
/// agent reports for the restored release never carry the failed release's probe results.
#[test]
fn rolled_back_release_does_not_inherit_the_failing_verdict() {
    let fx = AgentFixture::start("stale-verdict-after-rollback");
    let v1 = DemoRelease::healthy("demo-1.0");
    fx.install_first(1, &v1);
    // Unhealthy from the start (500 after 0 s), draining slowly on SIGTERM while still
    // answering 500: plenty of failing probes about it are taken during the rollback.
    let bad = DemoRelease::build(
        Behaviour::healthy("demo-2.0")
            .unhealthy_after(0)
            .slow_stop(1_500),
    );
    fx.publish(&bad);
    fx.send(orders::activate(
        2,
        bad.wire(SERVICE, ""),
        Deadlines {
            healthy_deadline_ms: 3_000,
            min_healthy_ms: 500,
            confirm_deadline_ms: 0,
        },
    ));
    let r = fx.wait_result("ROLLED_BACK, FAILED or HEALTHY for order seq 2", |r| {
        r.seq == 2
            && matches!(
                r.phase(),
                OrderPhase::RolledBack | OrderPhase::Failed | OrderPhase::Healthy
            )
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
    // The restored release becomes healthy, and nothing reported about it ever quoted demo-2.0's
    // failures.
    serin_tests::wait::wait_for(
        "a healthy report for demo-1.0 after the rollback",
        Duration::from_secs(10),
        &|| fx.dump(),
        || {
            fx.coord
                .health_reports(fx.host())
                .iter()
                .rev()
                .take_while(|h| h.release == "demo-1.0")
                .any(|h| h.healthy)
        },
    );
    let stale: Vec<_> = fx
        .coord
        .health_reports(fx.host())
        .into_iter()
        .filter(|h| h.release == "demo-1.0")
        .filter(|h| h.checks.iter().any(|c| c.detail.contains("HTTP 500")))
        .collect();
    assert!(
        stale.is_empty(),
        "health reports about demo-1.0 carried demo-2.0's failures: {stale:?}\n{}",
        fx.dump()
    );
}
