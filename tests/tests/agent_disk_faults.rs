//! Disk faults on the agent's side: a journal write that fails stops the activation before any
//! step (issue 8 #8), and the release serving keeps serving.
//!
//! The journal write is made to fail for real: while the download of the new release is held
//! open by the fake coordinator (so the order's sequence is already persisted), a directory is
//! put where the state file's spare goes (the file its next version is written into before the
//! two are exchanged), so the next durable write of `state.json` fails with `EISDIR`. Then the
//! download is let finish.

use serin_proto::wire::{OrderPhase, ResultCode};
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::SERVICE;
use serin_tests::demo_release::DemoRelease;
use serin_tests::fake_coordinator::{ArtifactFault, describe_result};
use serin_tests::orders::{self, Deadlines};

#[test]
fn failed_journal_write_stops_the_swap_and_the_current_release_keeps_serving() {
    let fx = AgentFixture::start("journal-write-fails");
    let v1 = DemoRelease::healthy("demo-1.0");
    fx.install_first(1, &v1);
    let pid_before = fx.agent.service_pid().expect("service pid");

    let v2 = DemoRelease::healthy("demo-2.0");
    fx.publish(&v2);
    fx.coord
        .set_fault(&v2.sha256, Some(ArtifactFault::HoldAfter(v2.size - 1)));
    fx.send(orders::activate(
        2,
        v2.wire(SERVICE, ""),
        Deadlines::quick(),
    ));
    // Downloading: the order's sequence was persisted before the download began.
    fx.wait_phase(2, OrderPhase::Progress);
    let blocker = serin_agent::durable::spare_of(&fx.agent.service_dir().join("state.json"))
        .expect("state.json has a file name");
    // state.json has been written more than once by now: its spare is there, a file.
    std::fs::remove_file(&blocker).expect("removing the state file's spare");
    std::fs::create_dir(&blocker).expect("creating the blocker directory");
    fx.coord.set_fault(&v2.sha256, None);

    let r = fx.wait_outcome(2);
    assert_eq!(
        (r.phase(), r.code()),
        (OrderPhase::Failed, ResultCode::IoError),
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert!(
        r.message.contains("journal"),
        "the message should say the journal could not be written: {}",
        describe_result(&r)
    );
    assert_eq!(r.current_release, "demo-1.0", "{}", describe_result(&r));
    // Nothing was swapped or restarted.
    assert_eq!(
        fx.agent.current_release().as_deref(),
        Some("demo-1.0"),
        "{}",
        fx.dump()
    );
    assert_eq!(fx.agent.version().ok().as_deref(), Some("demo-1.0"));
    assert_eq!(
        fx.agent.service_pid().ok(),
        Some(pid_before),
        "the service was restarted although its journal record was never written\n{}",
        fx.dump()
    );
    assert!(
        !fx.results_for(2)
            .iter()
            .any(|r| r.phase() == OrderPhase::Activated),
        "ACTIVATED reported for an activation whose journal was never written\n{}",
        fx.dump()
    );
    let state = fx.agent.state_json().expect("state.json parses");
    assert!(
        state
            .get("activation")
            .is_none_or(serde_json::Value::is_null),
        "a journal entry is left in state.json: {state}"
    );

    // Once the disk works again, a retry succeeds without any repair.
    std::fs::remove_dir(&blocker).expect("removing the blocker directory");
    fx.send(orders::activate(
        3,
        v2.wire(SERVICE, ""),
        Deadlines::quick(),
    ));
    let r = fx.wait_activation_end(3);
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    fx.wait_serving("demo-2.0");
}
