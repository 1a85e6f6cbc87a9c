//! Order sequences and re-synchronisation (issue 8 #6, issue 6 #4): every result carries the
//! agent's `last_seq`, so a coordinator whose counter is behind can move past it; a `last_seq`
//! poisoned beyond `MAX_ORDER_SEQ` by an old agent is repaired when the state is loaded.

use serin_proto::wire::{OrderPhase, ResultCode};
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::{AgentOptions, AgentProc, SERVICE};
use serin_tests::demo_release::DemoRelease;
use serin_tests::fake_coordinator::{FakeCoordinator, describe_result};
use serin_tests::orders;

#[test]
fn every_result_carries_last_seq_and_a_stale_refusal_says_where_to_move_past() {
    let fx = AgentFixture::start("last-seq-in-results");
    fx.install_first(40, &DemoRelease::healthy("demo-1.0"));
    let results = fx.results_for(40);
    assert!(!results.is_empty());
    for r in &results {
        assert_eq!(
            r.last_seq,
            40,
            "result without the agent's last_seq: {}",
            describe_result(r)
        );
    }

    // A coordinator whose counter is behind (a store restored from a backup) sends seq 7.
    fx.send(orders::confirm(7, SERVICE, "demo-1.0"));
    let r = fx.wait_outcome(7);
    assert_eq!(
        (r.phase(), r.code()),
        (OrderPhase::Rejected, ResultCode::StaleOrder),
        "{}",
        describe_result(&r)
    );
    assert_eq!(r.last_seq, 40, "{}", describe_result(&r));
    // It moves past the reported sequence, and the agent takes the order.
    fx.send(orders::confirm(r.last_seq + 1, SERVICE, "demo-1.0"));
    let r = fx.wait_outcome(41);
    assert_eq!(
        (r.phase(), r.code()),
        (OrderPhase::Confirmed, ResultCode::Ok),
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert_eq!(r.last_seq, 41, "{}", describe_result(&r));

    // A sequence beyond the wire's limit is refused without touching the agent's sequence.
    fx.send(orders::confirm(u64::MAX, SERVICE, "demo-1.0"));
    let r = fx.wait_result("a refusal of the order with seq 2^64-1", |r| {
        r.seq == u64::MAX
    });
    assert_eq!(
        (r.phase(), r.code()),
        (OrderPhase::Rejected, ResultCode::InvalidOrder),
        "{}",
        describe_result(&r)
    );
    assert_eq!(r.last_seq, 41, "{}", describe_result(&r));
    fx.send(orders::confirm(42, SERVICE, "demo-1.0"));
    assert_eq!(fx.wait_outcome(42).phase(), OrderPhase::Confirmed);
}

#[test]
fn a_last_seq_poisoned_by_an_old_agent_is_repaired_at_load() {
    let coord = FakeCoordinator::start();
    let agent = AgentProc::configure(&coord.url(), &AgentOptions::new("poisoned-last-seq"));
    // What an old agent that accepted seq 2^64-1 left behind.
    std::fs::create_dir_all(agent.service_dir()).expect("creating the service dir");
    std::fs::write(
        agent.service_dir().join("state.json"),
        format!(
            r#"{{"version": 1, "last_seq": {}, "results": [
                {{"order_id": "o", "rollout_id": "r", "seq": 12, "service": "{SERVICE}",
                  "release": "", "phase": 0, "code": 0, "message": "", "current_release": ""}}
            ]}}"#,
            u64::MAX
        ),
    )
    .expect("writing a poisoned state.json");
    agent.spawn(None);
    let fx = AgentFixture { agent, coord };
    let hello = fx.wait_attached(1);
    let inv = hello
        .services
        .iter()
        .find(|s| s.service == SERVICE)
        .expect("the service in the hello");
    assert_eq!(
        inv.last_seq,
        12,
        "the poisoned last_seq should be repaired to the highest valid stored sequence\n{}",
        fx.dump()
    );
    assert!(
        fx.agent.log().contains("repaired"),
        "no warning about the repair in the log\n{}",
        fx.dump()
    );
    let state = fx.agent.state_json().expect("state.json parses");
    assert_eq!(
        state["last_seq"].as_u64(),
        Some(12),
        "the repair is persisted: {state}"
    );
    // Orders are taken again.
    fx.install_first(13, &DemoRelease::healthy("demo-1.0"));
}
