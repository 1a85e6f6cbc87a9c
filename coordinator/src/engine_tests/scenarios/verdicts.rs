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

/// The rollback timeout of the default engine settings.
const ROLLBACK_MS: u64 = 120_000;

/// A rollout with h01 and h02 activated and healthy, then aborted: both get a rollback order.
fn aborted() -> Sim {
    let mut s = Sim::new(fleet(4), wire_spec(&["2", "100%"]));
    s.agents(&[], false);
    s.operator(OperatorAction::Abort).unwrap();
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    assert_eq!(s.sent_kinds("rollback"), vec!["h01", "h02"]);
    // The next wave's stages (sent once the canary swapped) are cancelled, and say so.
    for (h, o) in s.pending() {
        if o.action.kind() == "cancel" {
            s.answered.insert(o.order_id.clone());
            s.reply(&h, &o, OrderPhase::Cancelled, ResultCode::Ok, "web-1");
        }
    }
    s
}

/// h02 answers its rollback; h01 never does and its agent opens a new stream every 50 s (a new
/// stream replaces the old one without the host ever counting as down; each hello re-sends the
/// order, which used to restart its timeout, forever).
fn h02_restored_h01_flapping(s: &mut Sim, for_ms: u64) {
    for (h, o) in s.pending() {
        if h.as_str() == "h02" {
            s.answered.insert(o.order_id.clone());
            s.reply(&h, &o, OrderPhase::RolledBack, ResultCode::Ok, "web-1");
        }
    }
    let end = s.now + for_ms;
    while s.now < end && s.m.state() == RolloutState::RollingBack {
        s.feed(Input::HostUp(host("h01", "eu-1", "web-2")));
        s.advance(50_000);
    }
}

fn assert_failed_naming_h01(s: &Sim) {
    assert_eq!(s.m.state(), RolloutState::Failed, "{}", s.m.status().reason);
    let reason = s.m.status().reason;
    assert!(reason.contains("h01"), "{reason}");
    assert!(!reason.contains("h02"), "{reason}");
    let d = s.m.decisions().last().unwrap();
    assert_eq!(d.kind.as_str(), "rollback_finished");
    assert_eq!(d.evidence["rollback_failed"], "h01");
    assert_eq!(s.phase("h02"), HostPhase::RolledBack);
    let detail = s.status_of("h01").detail;
    assert!(detail.contains("rollback timeout"), "{detail}");
}

#[test]
fn a_rollback_that_cannot_finish_ends_failed_naming_the_host_it_could_not_restore() {
    let mut s = aborted();
    let aborted_at = s.now;
    h02_restored_h01_flapping(&mut s, 10 * ROLLBACK_MS);
    assert_failed_naming_h01(&s);
    assert!(s.now - aborted_at <= ROLLBACK_MS + 50_000, "ended late");
    // Finished: the service is free (the manager only refuses a new rollout while one is not
    // finished), and the task may stop once nothing is left to deliver.
    assert!(s.m.state().is_finished());
    assert!(s.m.is_quiescent());
}

#[test]
fn a_rollback_resumed_after_a_coordinator_restart_still_ends() {
    let mut s = aborted();
    h02_restored_h01_flapping(&mut s, 60_000);
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    // The coordinator restarts long after the rollback timeout passed.
    s.now += 10 * ROLLBACK_MS;
    s.restart();
    s.feed(Input::Resync(s.fleet.clone()));
    let restarted = s.now;
    assert_eq!(
        s.m.state(),
        RolloutState::RollingBack,
        "h01 gets its chance"
    );
    h02_restored_h01_flapping(&mut s, 10 * ROLLBACK_MS);
    assert_failed_naming_h01(&s);
    assert!(s.now - restarted <= ROLLBACK_MS + 50_000, "ended late");
}

/// h01 activates but never becomes healthy; h02 is healthy. Returns at h01's healthy deadline.
fn h01_never_healthy() -> (Sim, Order) {
    let mut s = Sim::new(fleet(4), wire_spec(&["2", "100%"]));
    let (_, o1) = s
        .pending()
        .into_iter()
        .find(|(h, _)| h.as_str() == "h01")
        .unwrap();
    s.answered.insert(o1.order_id.clone());
    s.reply(
        &hid("h01"),
        &o1,
        OrderPhase::Activated,
        ResultCode::Ok,
        "web-2",
    );
    s.agents(&[], false);
    assert_eq!(s.phase("h02"), HostPhase::Healthy);
    // The healthy deadline (20 s) passes on the coordinator.
    s.advance(20_000);
    assert!(s.m.host(&hid("h01")).unwrap().failure.is_some());
    assert_eq!(s.m.state(), RolloutState::RollingBack);
    (s, o1)
}

#[test]
fn no_rollback_order_to_a_host_that_rolled_back_by_itself() {
    let (mut s, o1) = h01_never_healthy();
    // h01's agent hit the same deadline and reverted by itself; its result is 80 ms behind.
    s.advance(80);
    s.reply(
        &hid("h01"),
        &o1,
        OrderPhase::RolledBack,
        ResultCode::Unhealthy,
        "web-1",
    );
    for _ in 0..10 {
        s.agents(&[], false);
        s.advance(10_000);
    }
    assert_eq!(s.m.state(), RolloutState::RolledBack);
    assert_eq!(
        s.sent_kinds("rollback"),
        vec!["h02"],
        "h01 already rolled back: no order restarts its baseline"
    );
    assert_eq!(s.phase("h01"), HostPhase::RolledBack);
    let h = s.status_of("h01");
    assert!(h.detail.contains("rolled back to web-1"), "{}", h.detail);
    assert!(h.detail.contains("healthy deadline"), "{}", h.detail);
}

#[test]
fn a_host_whose_agent_does_not_roll_back_by_itself_is_ordered_after_the_grace() {
    let (mut s, _) = h01_never_healthy();
    assert_eq!(s.sent_kinds("rollback"), vec!["h02"]);
    s.advance(EngineSettings::default().self_revert_grace.as_millis() as u64);
    assert_eq!(s.sent_kinds("rollback"), vec!["h02", "h01"]);
    s.agents(&[], false);
    assert_eq!(s.m.state(), RolloutState::RolledBack);
    assert_eq!(s.phase("h01"), HostPhase::RolledBack);
}

#[test]
fn a_host_that_joins_on_the_baseline_is_added_on_its_first_passing_health_verdict() {
    let mut s = Sim::new(fleet(3), wire_spec(&["1", "100%"]));
    // An agent restarted with labels that now match: its hello carries the baseline and no
    // passing verdict yet, so it cannot join on the hello.
    let mut h9 = host("h09", "eu-1", "web-1");
    h9.services
        .get_mut(&ServiceName::new("web").unwrap())
        .unwrap()
        .healthy = Some(false);
    s.feed(Input::HostUp(h9));
    assert!(s.m.host(&hid("h09")).is_none(), "not healthy yet");
    // A failing verdict changes nothing; the first passing one adds it to the last wave.
    s.health("h09", "web-1", false);
    assert!(s.m.host(&hid("h09")).is_none());
    s.health("h09", "web-1", true);
    let h =
        s.m.host(&hid("h09"))
            .expect("joined on its passing verdict");
    assert_eq!(h.wave, 1);
    assert_eq!(h.baseline.as_ref().unwrap().as_str(), "web-1");
    assert!(s.events.iter().any(|e| e.contains("host h09 joined")));
    for _ in 0..10 {
        s.agents(&[], false);
        s.advance(30_000);
    }
    assert_eq!(s.m.state(), RolloutState::Succeeded);
    assert_eq!(s.phase("h09"), HostPhase::Confirmed);
}

#[test]
fn a_host_that_went_away_before_its_verdict_does_not_join() {
    let mut s = Sim::new(fleet(3), wire_spec(&["1", "100%"]));
    let mut h9 = host("h09", "eu-1", "web-1");
    h9.services
        .get_mut(&ServiceName::new("web").unwrap())
        .unwrap()
        .healthy = Some(false);
    s.feed(Input::HostUp(h9));
    s.feed(Input::HostDown(hid("h09")));
    s.health("h09", "web-1", true);
    assert!(s.m.host(&hid("h09")).is_none());
}

#[test]
fn a_host_still_staging_gets_the_rollback_at_once_and_it_preempts_the_stage() {
    let mut s = Sim::new(fleet(4), wire_spec(&["2", "100%"]));
    // h02 is still downloading (a trickling source); h01 is healthy.
    let (_, o2) = s
        .pending()
        .into_iter()
        .find(|(h, _)| h.as_str() == "h02")
        .unwrap();
    s.answered.insert(o2.order_id.clone());
    s.reply(
        &hid("h02"),
        &o2,
        OrderPhase::Progress,
        ResultCode::Ok,
        "web-1",
    );
    s.agents(&[], false);
    s.operator(OperatorAction::Abort).unwrap();
    // The staging host is not skipped: its rollback goes out with h01's, in the same step.
    assert_eq!(s.sent_kinds("rollback"), vec!["h01", "h02"]);
    // Its agent preempts the stage and answers that the baseline is current and running.
    s.agents(&[], false);
    assert_eq!(
        s.m.state(),
        RolloutState::Aborted,
        "{}",
        s.m.status().reason
    );
    assert_eq!(s.phase("h02"), HostPhase::RolledBack);
    assert!(s.m.host(&hid("h02")).unwrap().rollback_failed.is_none());
}

#[test]
fn a_host_waiting_to_retry_a_busy_activation_gets_one_rollback_order() {
    let mut s = Sim::new(fleet(4), wire_spec(&["2", "100%"]));
    let (_, o2) = s
        .pending()
        .into_iter()
        .find(|(h, _)| h.as_str() == "h02")
        .unwrap();
    s.answered.insert(o2.order_id.clone());
    s.reply(
        &hid("h02"),
        &o2,
        OrderPhase::Rejected,
        ResultCode::Busy,
        "web-1",
    );
    s.agents(&[], false);
    s.operator(OperatorAction::Abort).unwrap();
    assert_eq!(s.sent_kinds("rollback"), vec!["h01", "h02"]);
    // The activation's busy retry is not carried over to the rollback: no second order.
    s.advance(10_000);
    assert_eq!(s.sent_kinds("rollback"), vec!["h01", "h02"]);
    s.agents(&[], false);
    assert_eq!(
        s.m.state(),
        RolloutState::Aborted,
        "{}",
        s.m.status().reason
    );
}

#[test]
fn a_host_skipped_at_the_start_on_a_stale_failing_verdict_joins_on_its_passing_one() {
    // h03 just rolled back to web-1; the registry still holds the failing verdict about the
    // release it left, so the plan skips it as unhealthy.
    let mut f = fleet(3);
    f[2].services
        .get_mut(&ServiceName::new("web").unwrap())
        .unwrap()
        .healthy = Some(false);
    let mut s = Sim::new(f.clone(), wire_spec(&["100%"]));
    assert!(s.m.host(&hid("h03")).is_none());
    s.m.watch_skipped(&f);
    s.health("h03", "web-1", true);
    assert_eq!(s.m.host(&hid("h03")).map(|h| h.wave), Some(0));
    for _ in 0..5 {
        s.agents(&[], false);
        s.advance(30_000);
    }
    assert_eq!(s.m.state(), RolloutState::Succeeded);
    assert_eq!(s.phase("h03"), HostPhase::Confirmed);
}

/// The gaps between consecutive holds of `h`, from `since`, must stay within half the confirm
/// deadline (the machine holds every third of it), up to `until`.
fn assert_held_throughout(s: &Sim, h: &str, since: u64, until: u64) {
    let times: Vec<u64> = s
        .holds
        .iter()
        .filter(|(t, host, _)| host.as_str() == h && *t >= since && *t <= until)
        .map(|(t, _, _)| *t)
        .collect();
    let mut last = since;
    for t in times.iter().copied().chain([until]) {
        assert!(
            t - last <= CONFIRM_MS / 2,
            "{h} went {} ms without a hold (at {}): holds {:?}",
            t - last,
            last - T0,
            times.iter().map(|t| t - T0).collect::<Vec<_>>()
        );
        last = t;
    }
}

/// The model test's seed 1795788725345680586: a host whose ordered rollback failed (IO_ERROR)
/// still runs the release with its agent's switch armed; the rollout pauses (on_failure = pause)
/// and an operator retries it much later. Its switch must not fire meanwhile, nor after the
/// retry (a re-dispatch must not restart the hold schedule).
#[test]
fn a_host_whose_rollback_failed_is_held_while_paused_and_after_its_retry() {
    let mut w = wire_spec(&["2", "100%"]);
    w.on_failure = wire::OnFailure::Pause as i32;
    let mut s = Sim::new(fleet(4), w);
    let dispatched = s.now;
    s.agents(&[], false);
    assert_eq!(s.phase("h01"), HostPhase::Healthy);
    // h01 turns unhealthy during the bake: failed, its rollback waits for the grace, and the
    // gate pauses the rollout.
    s.health("h01", "web-2", false);
    assert_eq!(s.m.state(), RolloutState::Paused);
    s.advance(EngineSettings::default().self_revert_grace.as_millis() as u64);
    let (_, rb) = s
        .pending()
        .into_iter()
        .find(|(h, o)| h.as_str() == "h01" && o.action.kind() == "rollback")
        .expect("h01's rollback order");
    s.answered.insert(rb.order_id.clone());
    s.reply(
        &hid("h01"),
        &rb,
        OrderPhase::Failed,
        ResultCode::IoError,
        "web-2",
    );
    assert_eq!(s.phase("h01"), HostPhase::Failed);
    assert!(s.m.host(&hid("h01")).unwrap().rollback_failed.is_some());
    // Ten minutes paused: h01's agent is still armed on web-2, and so is h02's.
    s.advance(600_000);
    assert_eq!(s.m.state(), RolloutState::Paused);
    assert_held_throughout(&s, "h01", dispatched, s.now);
    assert_held_throughout(&s, "h02", dispatched, s.now);
    // The operator retries h01; it is re-dispatched and its agent stays held until the end.
    s.operator(OperatorAction::Retry).unwrap();
    assert_eq!(s.phase("h01"), HostPhase::Dispatched);
    s.advance(CONFIRM_MS / 3);
    assert_held_throughout(&s, "h01", dispatched, s.now);
    for _ in 0..10 {
        s.agents(&[], false);
        s.advance(30_000);
    }
    assert_eq!(
        s.m.state(),
        RolloutState::Succeeded,
        "{}",
        s.m.status().reason
    );
    // Once confirmed, nothing is held any more.
    s.holds.clear();
    s.advance(CONFIRM_MS * 3);
    assert!(s.holds.is_empty(), "{:?}", s.holds);
}
