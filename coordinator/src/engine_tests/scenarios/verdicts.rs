//! Issue 8's coordinator-side findings (no false verdicts, no stuck rollouts), each a scenario
//! that failed before its fix: the dead-man switch kept fed, a self-revert caused by the
//! coordinator's silence never blamed on the release, a rollback that cannot finish ends, no
//! rollback order to a host that already rolled back, late joiners reconsidered on their health,
//! and staging hosts preempted by the rollback.

use super::*;

/// The confirm deadline an activation of the canary carries (healthy 20 s + bake 10 s + 60 s).
const CONFIRM_MS: u64 = 90_000;

#[test]
fn a_wave_waiting_for_an_unreachable_host_keeps_its_healthy_hosts_held_and_blames_nobody() {
    let mut s = Sim::new(fleet(4), wire_spec(&["2", "100%"]));
    assert_eq!(s.sent_kinds("activate"), vec!["h01", "h02"]);
    let dispatched = s.now;
    // h02 activates, then is cut off before it is healthy; h01 becomes healthy.
    let (_, o2) = s
        .pending()
        .into_iter()
        .find(|(h, _)| h.as_str() == "h02")
        .unwrap();
    s.answered.insert(o2.order_id.clone());
    s.reply(
        &hid("h02"),
        &o2,
        OrderPhase::Activated,
        ResultCode::Ok,
        "web-2",
    );
    s.feed(Input::HostDown(hid("h02")));
    s.agents(&[], false);
    assert_eq!(s.phase("h01"), HostPhase::Healthy);
    // Ten minutes pass: the canary bakes, then waits for h02 (never promoted on missing data).
    s.advance(600_000);
    assert_eq!(s.m.state(), RolloutState::Waiting);
    // h01's dead-man switch never starves: its first hold comes well before the deadline its
    // activation carried, and each later one well before the deadline the previous one set.
    let h01: Vec<u64> = s
        .holds
        .iter()
        .filter(|(_, h, _)| h.as_str() == "h01")
        .map(|(t, _, hold)| {
            assert_eq!(hold.release.as_str(), "web-2");
            assert_eq!(hold.service.as_str(), "web");
            assert_eq!(hold.confirm_deadline.as_millis() as u64, CONFIRM_MS);
            *t
        })
        .collect();
    assert!(!h01.is_empty(), "h01 was never held");
    assert!(
        h01[0] - dispatched <= CONFIRM_MS / 2,
        "first hold too late: {h01:?}"
    );
    for w in h01.windows(2) {
        assert!(
            w[1] - w[0] <= CONFIRM_MS / 2,
            "holds too far apart: {h01:?}"
        );
    }
    assert!(s.now - h01[h01.len() - 1] <= CONFIRM_MS / 2);
    // Nothing is held that cannot be reached.
    assert!(s.holds.iter().all(|(_, h, _)| h.as_str() != "h02"));

    // h02's agent reverted by itself meanwhile (nobody could hold it). It reconnects on its
    // baseline and replays the result: CONFIRM_TIMEOUT is the coordinator's silence, not the
    // release's fault.
    s.feed(Input::HostUp(host("h02", "eu-1", "web-1")));
    // (The hello makes the coordinator re-send the same activation; the agent replays.)
    let before = s.sent_kinds("activate").len();
    s.reply(
        &hid("h02"),
        &o2,
        OrderPhase::RolledBack,
        ResultCode::ConfirmTimeout,
        "web-1",
    );
    assert!(s.m.host(&hid("h02")).unwrap().failure.is_none());
    assert_ne!(s.m.state(), RolloutState::RollingBack);
    assert!(
        !s.decision_kinds().iter().any(|d| d == "rollback"),
        "{:?}",
        s.decision_kinds()
    );
    assert!(
        s.events.iter().any(|e| e.contains("h02")
            && e.contains("dead-man switch (confirm_timeout)")
            && e.contains("not a release failure")),
        "the record says why: {:?}",
        s.events
    );
    // It is dispatched again and the rollout goes on to success.
    assert_eq!(s.sent_kinds("activate").len(), before + 1);
    assert_eq!(s.sent_kinds("activate").last().unwrap(), "h02");
    for _ in 0..10 {
        s.agents(&[], false);
        s.advance(30_000);
    }
    assert_eq!(
        s.m.state(),
        RolloutState::Succeeded,
        "{:?}",
        s.m.status().reason
    );
}

#[test]
fn no_hold_once_confirmed_failed_or_rolling_back() {
    let mut s = Sim::new(fleet(2), wire_spec(&["1", "100%"]));
    s.agents(&["h01"], true);
    assert_eq!(s.m.state(), RolloutState::RolledBack);
    s.holds.clear();
    s.advance(CONFIRM_MS * 3);
    assert!(s.holds.is_empty(), "{:?}", s.holds);

    let mut s = Sim::new(fleet(2), wire_spec(&["100%"]));
    for _ in 0..5 {
        s.agents(&[], false);
        s.advance(30_000);
    }
    assert_eq!(s.m.state(), RolloutState::Succeeded);
    s.holds.clear();
    s.advance(CONFIRM_MS * 3);
    assert!(
        s.holds.is_empty(),
        "confirmed hosts need no hold: {:?}",
        s.holds
    );
}
