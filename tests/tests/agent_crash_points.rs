//! The agent SIGKILLed at every fault-injection point of stage, activate and local rollback.
//!
//! Each test installs demo-1.0, restarts the agent with `SERIN_AGENT_CRASH_AT=<point>`, sends the
//! order that reaches the point, waits for the agent to die of SIGKILL, and starts it again
//! without the variable. Then `current` must point at a complete, verified release (its artifact
//! matches its release.json) that is the one answering `/version`, exactly one service process
//! may run, and the agent must still work: after confirming demo-2.0 if the agent completed its
//! activation, a fresh activation of demo-3.0 succeeds.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use serin_proto::wire::OrderPhase;
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::SERVICE;
use serin_tests::demo_release::{Behaviour, DemoRelease};
use serin_tests::fake_coordinator::describe_result;
use serin_tests::orders::{self, Deadlines};
use serin_tests::wait;

/// Which order reaches a crash point.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// A stage order of a healthy demo-2.0.
    Stage,
    /// An activate order of a healthy demo-2.0 that needs a confirm.
    Activate,
    /// An activate order of a demo-2.0 that crashes at start, so the agent rolls back locally.
    LocalRollback,
}

fn crash_and_recover(point: &str, via: Via) {
    let fx = AgentFixture::start(&format!("crash-{point}"));
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));

    fx.agent.restart(Some(point));
    fx.wait_attached(2);
    let v2 = match via {
        Via::LocalRollback => {
            DemoRelease::build(Behaviour::healthy("demo-2.0").crashing_at_start())
        }
        Via::Stage | Via::Activate => DemoRelease::healthy("demo-2.0"),
    };
    fx.publish(&v2);
    let order = match via {
        Via::Stage => orders::stage(2, v2.wire(SERVICE, "")),
        Via::Activate | Via::LocalRollback => orders::activate(
            2,
            v2.wire(SERVICE, ""),
            Deadlines::quick().confirm_within(30_000),
        ),
    };
    fx.send(order);
    let status = fx.agent.wait_exit(Duration::from_secs(30), &|| fx.dump());
    assert_eq!(
        status.signal(),
        Some(9),
        "agent should have SIGKILLed itself at {point}, exited with {status}\n{}",
        fx.dump()
    );

    fx.agent.spawn(None);
    fx.wait_attached(3);
    let serving = fx.wait_consistent();
    match via {
        Via::Stage => assert_eq!(
            serving, "demo-1.0",
            "a stage order changed the serving release"
        ),
        Via::LocalRollback => assert_eq!(
            serving, "demo-1.0",
            "a release crashing at start is current"
        ),
        Via::Activate => assert!(
            serving == "demo-1.0" || serving == "demo-2.0",
            "serving {serving}"
        ),
    }
    wait::wait_for(
        "exactly one service process",
        Duration::from_secs(10),
        &|| fx.dump(),
        || fx.agent.service_processes().len() == 1,
    );
    // Every release directory left on disk is complete (no half-installed release).
    for id in fx.agent.releases() {
        if let Err(e) = fx.agent.verify_release(&id) {
            panic!(
                "release {id} on disk is not complete after a crash at {point}: {e:#}\n{}",
                fx.dump()
            );
        }
    }

    // The agent still works. If it completed the activation, it awaits a confirm: give it.
    let mut seq = 3;
    if serving == "demo-2.0" {
        fx.send(orders::confirm(seq, SERVICE, "demo-2.0"));
        let r = fx.wait_outcome(seq);
        assert_eq!(
            r.phase(),
            OrderPhase::Confirmed,
            "{}\n{}",
            describe_result(&r),
            fx.dump()
        );
        seq += 1;
    }
    // A fresh activation goes through.
    let v3 = DemoRelease::healthy("demo-3.0");
    fx.activate(seq, &v3, Deadlines::quick());
    let r = fx.wait_result(
        &format!("HEALTHY for order seq {seq} after the crash"),
        |r| r.seq == seq && r.phase() == OrderPhase::Healthy,
    );
    assert_eq!(r.current_release, "demo-3.0", "{}", describe_result(&r));
    fx.wait_serving("demo-3.0");
    assert_eq!(fx.wait_consistent(), "demo-3.0");
}

macro_rules! crash_point_tests {
    ($($name:ident: $point:literal via $via:ident;)*) => {$(
        #[test]
        fn $name() {
            crash_and_recover($point, Via::$via);
        }
    )*};
}

crash_point_tests! {
    crash_at_stage_downloaded: "stage-downloaded" via Stage;
    crash_at_stage_verified: "stage-verified" via Stage;
    crash_at_stage_installed: "stage-installed" via Stage;
    crash_at_activate_journaled: "activate-journaled" via Activate;
    crash_at_activate_swapped: "activate-swapped" via Activate;
    crash_at_activate_restarted: "activate-restarted" via Activate;
    crash_at_confirm_wait: "confirm-wait" via Activate;
    crash_at_rollback_swapped: "rollback-swapped" via LocalRollback;
}
