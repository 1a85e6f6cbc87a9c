//! Reproductions of the ordering holes found in issue 6 (findings 1–4), each failing on the
//! engine as it was before the fix. They run the real manager and tasks over the scripted
//! [`FakeFleet`] and a [`TestStore`] that can fail or hold saves, with tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use crate::fleet::{OrderPhase, ResultCode};
use serin_proto::{HostId, OrderAction, wire};
use tokio_util::sync::CancellationToken;

use crate::control_service::RolloutApi;
use crate::rollout::manager::RolloutManager;

/// The engine as the control service calls it (wire types in and out).
fn api(m: &RolloutManager) -> &dyn RolloutApi {
    m
}
use super::wire_spec;
use crate::fleet::FleetEvent;
use crate::rollout::testing::{FakeFleet, TestStore, host, manager, outcome};
use crate::store::Store;

fn fleet(n: usize) -> Arc<FakeFleet> {
    Arc::new(FakeFleet::new(
        (1..=n)
            .map(|i| host(&format!("h{i}"), "eu-1", "web-1"))
            .collect(),
    ))
}

/// Two hosts (`h1`, `h2`) answering as healthy agents do, and a manager over them on a
/// [`TestStore`], stopped by the token.
async fn two_healthy_hosts() -> (
    Arc<TestStore>,
    Arc<FakeFleet>,
    CancellationToken,
    RolloutManager,
) {
    let store = Arc::new(TestStore::new());
    let fleet = fleet(2);
    fleet.respond_with(healthy_agent());
    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    (store, fleet, shutdown, mgr)
}

/// A responder that answers every order as a healthy agent does.
fn healthy_agent() -> crate::rollout::testing::Responder {
    Box::new(|h: &HostId, o: &serin_proto::Order| {
        let phases: &[OrderPhase] = match &o.action {
            OrderAction::Activate { .. } => &[OrderPhase::Activated, OrderPhase::Healthy],
            OrderAction::Confirm { .. } => &[OrderPhase::Confirmed],
            OrderAction::Rollback { .. } => &[OrderPhase::RolledBack],
            _ => &[],
        };
        phases
            .iter()
            .map(|p| FleetEvent::Result {
                host: h.clone(),
                outcome: outcome(o, *p, ResultCode::Ok),
            })
            .collect()
    })
}

async fn wait_status(
    rx: &mut super::WireWatch,
    what: &str,
    f: impl Fn(&wire::RolloutStatus) -> bool,
) {
    let r = tokio::time::timeout(Duration::from_secs(3600), async {
        loop {
            if f(&rx.borrow_and_update()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        r.is_ok() && f(&rx.borrow()),
        "{what}: never happened; status: {:#?}",
        rx.borrow()
    );
}

fn failed_hosts(s: &wire::RolloutStatus) -> Vec<String> {
    s.hosts
        .iter()
        .filter(|h| h.phase().as_str() == "failed" || h.detail.contains("failed"))
        .map(|h| format!("{}: {}", h.host_id, h.detail))
        .collect()
}

/// Finding 1: a save that fails after the canary's sequence was allocated must not lose the
/// order. Before the fix the order was marked sent, never sent, and the canary "failed" its
/// progress deadline: a store hiccup blamed on the release.
#[tokio::test(start_paused = true)]
async fn a_failed_save_never_loses_an_order_nor_fails_a_host() {
    let (store, fleet, shutdown, mgr) = two_healthy_hosts().await;
    // The first save (the rollout with its canary's order, written once the order's sequence
    // was allocated) succeeds, the next one fails, and so does the retry after it: whatever
    // follows them (the second wave's orders among it) is held back until a save works.
    store.fail_after_saves(1, 2);
    let st = api(&mgr)
        .start_rollout(wire_spec(&["1", "100%"]))
        .await
        .unwrap();
    let mut rx = super::WireWatch(api(&mgr).watch(&st.rollout_id).unwrap());
    wait_status(&mut rx, "the rollout finishes", |s| s.finished).await;
    let s = rx.borrow().clone();
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "reason: {}; failed: {:?}",
        s.reason,
        failed_hosts(&s)
    );
    assert!(failed_hosts(&s).is_empty(), "{:?}", failed_hosts(&s));
    let sent = fleet.sent();
    assert!(
        sent.iter()
            .any(|(h, o)| h.as_str() == "h1" && o.action.kind() == "activate"),
        "the canary's activate order went out: {sent:?}"
    );
    // Everything the machine decided reached the store.
    let stored = store.load_rollout(&st.rollout_id).unwrap().unwrap();
    let header = crate::rollout::record::decode_header(&st.rollout_id, &stored.header).unwrap();
    assert_eq!(header.state, crate::rollout::RolloutState::Succeeded);
    shutdown.cancel();
    mgr.join().await;
}

/// Issue 8 (found by the coordinator's disk fault case): a sequence allocation the store
/// refuses (a full disk) left the order unsent while the rollout ran on, and the hosts "failed"
/// their progress deadline: a store error blamed on the release. It now pauses the rollout like
/// a failed save, and it resumes by itself once allocations work again.
#[tokio::test(start_paused = true)]
async fn a_failed_sequence_allocation_pauses_and_never_fails_a_host() {
    use std::sync::atomic::Ordering::SeqCst;
    let (store, _fleet, shutdown, mgr) = two_healthy_hosts().await;
    store.fail_seqs.store(true, SeqCst);
    let st = api(&mgr)
        .start_rollout(wire_spec(&["1", "100%"]))
        .await
        .unwrap();
    let mut rx = super::WireWatch(api(&mgr).watch(&st.rollout_id).unwrap());
    wait_status(&mut rx, "the rollout pauses on the store", |s| {
        s.state().as_str() == "paused"
    })
    .await;
    let s = rx.borrow().clone();
    assert!(s.reason.contains("store"), "{}", s.reason);
    // Far past the progress deadline: still paused, nobody failed.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let s = rx.borrow().clone();
    assert_eq!(s.state().as_str(), "paused", "{}", s.reason);
    assert!(failed_hosts(&s).is_empty(), "{:?}", failed_hosts(&s));
    store.fail_seqs.store(false, SeqCst);
    wait_status(&mut rx, "the rollout finishes", |s| s.finished).await;
    let s = rx.borrow().clone();
    assert_eq!(s.state().as_str(), "succeeded", "{}", s.reason);
    assert!(failed_hosts(&s).is_empty(), "{:?}", failed_hosts(&s));
    shutdown.cancel();
    mgr.join().await;
}

/// Found by the coordinator's disk fault case (flaky in CI): the store fails first on an
/// operator's pause (the rollout is paused by the operator; the failure is an event), then the
/// operator resumes while the store still refuses every save. The rollout ran on in memory,
/// "running" while nothing it decided could be kept, because only the first failure of a run of
/// them paused the machine. It now pauses on the store, and resumes by itself once the store
/// accepts writes again.
#[tokio::test(start_paused = true)]
async fn a_resume_while_the_store_still_fails_pauses_on_the_store() {
    let (store, _fleet, shutdown, mgr) = two_healthy_hosts().await;
    let st = api(&mgr)
        .start_rollout(wire_spec(&["1", "100%"]))
        .await
        .unwrap();
    let mut rx = super::WireWatch(api(&mgr).watch(&st.rollout_id).unwrap());
    wait_status(&mut rx, "the canary bakes", |s| {
        s.waves[0].state().as_str() == "baking"
    })
    .await;
    let control = |action: wire::ControlAction| {
        let (mgr, id) = (mgr.clone(), st.rollout_id.clone());
        async move {
            api(&mgr)
                .control(wire::ControlRequest {
                    rollout_id: id,
                    action: action as i32,
                    reason: "disk test".into(),
                })
                .await
        }
    };
    store.fail_after_saves(0, usize::MAX);
    let e = control(wire::ControlAction::Pause).await.unwrap_err();
    assert!(e.message().contains("store"), "{}", e.message());
    let s = rx.borrow();
    assert_eq!(s.state().as_str(), "paused", "{}", s.reason);
    let e = control(wire::ControlAction::Resume).await.unwrap_err();
    assert!(e.message().contains("store"), "{}", e.message());
    let s = rx.borrow();
    assert_eq!(
        (
            s.state().as_str(),
            s.reason.contains("saving the rollout failed")
        ),
        ("paused", true),
        "a resume the store could not keep leaves the rollout paused on the store: {}",
        s.reason
    );
    // Far past every deadline: still paused, nobody failed. The hour passes (the clock is
    // paused: it advances only while every task waits) within seconds of real time: a task
    // that woke again and again for a re-send it could not make (it used to) never lets it.
    let (tx, timed_out) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        let _ = tx.send(());
    });
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        _ = timed_out => panic!("an hour of a paused rollout on a failing store never passed: its task spins"),
    }
    let s = rx.borrow();
    assert_eq!(s.state().as_str(), "paused", "{}", s.reason);
    assert!(failed_hosts(&s).is_empty(), "{:?}", failed_hosts(&s));
    store.fail_after_saves(0, 0);
    wait_status(&mut rx, "the rollout finishes", |s| s.finished).await;
    let s = rx.borrow();
    assert_eq!(s.state().as_str(), "succeeded", "{}", s.reason);
    assert!(failed_hosts(&s).is_empty(), "{:?}", failed_hosts(&s));
    shutdown.cancel();
    mgr.join().await;
}

/// Finding 2: a refusal that arrives as fast as the order goes out is not lost. Before the fix
/// the task subscribed to fleet events after the canary was dispatched, the refusal was
/// missed and the canary "failed" its progress deadline a minute later instead.
#[tokio::test(start_paused = true)]
async fn a_refusal_arriving_before_start_returns_is_seen() {
    let store = Arc::new(TestStore::new());
    let fleet = fleet(3);
    fleet.respond_with(Box::new(|h: &HostId, o: &serin_proto::Order| {
        let mut r = outcome(o, OrderPhase::Rejected, ResultCode::InsufficientSpace);
        r.message = "12 MiB free, 100 MiB needed".into();
        vec![FleetEvent::Result {
            host: h.clone(),
            outcome: r,
        }]
    }));
    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    let st = api(&mgr)
        .start_rollout(wire_spec(&["1", "100%"]))
        .await
        .unwrap();
    let mut rx = super::WireWatch(api(&mgr).watch(&st.rollout_id).unwrap());
    wait_status(&mut rx, "the rollout finishes", |s| s.finished).await;
    let s = rx.borrow().clone();
    let h1 = s.hosts.iter().find(|h| h.host_id == "h1").unwrap();
    assert!(
        h1.detail.contains("insufficient_space"),
        "the canary failed for the reason its agent gave: {h1:?}"
    );
    let decision = s
        .decisions
        .iter()
        .find(|d| d.kind().as_str() == "rollback")
        .unwrap();
    assert!(
        decision.at_unix_ms < s.created_unix_ms + 10_000,
        "the refusal was acted on at once, not at the progress deadline: {decision:?}"
    );
    shutdown.cancel();
    mgr.join().await;
}

/// Finding 3: a manual rollback of the previous rollout racing a new start cannot leave two
/// live rollouts of one service. Before the fix, the rollback reached the old rollout's task
/// (operator calls never took the start lock) while the new start was between its check and the
/// cancellation of the old task: both calls succeeded and `rolling_back` was persisted beside the
/// new rollout.
#[tokio::test(start_paused = true)]
async fn a_rollback_racing_a_start_cannot_make_two_live_rollouts() {
    let store = Arc::new(TestStore::new());
    let fleet = fleet(2);
    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    let a = api(&mgr).start_rollout(wire_spec(&["100%"])).await.unwrap();
    let mut rx = super::WireWatch(api(&mgr).watch(&a.rollout_id).unwrap());
    // Answer what went out before start returned, then answer as it goes.
    let agent = healthy_agent();
    for (h, o) in fleet.sent() {
        for e in agent(&h, &o) {
            fleet.emit(e);
        }
    }
    fleet.respond_with(agent);
    wait_status(&mut rx, "rollout A succeeds", |s| {
        s.state().as_str() == "succeeded"
    })
    .await;

    // Hold every save but A's: the start of B stops in the middle.
    store.close_gate(&a.rollout_id);
    let mut spec = wire_spec(&["100%"]);
    spec.release = "web-2".into();
    let m2 = mgr.clone();
    let start = tokio::spawn(async move { api(&m2).start_rollout(spec).await });
    // A blocked save stops tokio's paused clock, so wait in real time, yielding.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.blocked() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the start of B reached its first save"
        );
        tokio::task::yield_now().await;
    }
    let m3 = mgr.clone();
    let id = a.rollout_id.clone();
    let rollback = tokio::spawn(async move {
        api(&m3)
            .control(wire::ControlRequest {
                rollout_id: id,
                action: wire::ControlAction::Rollback as i32,
                reason: "racing".into(),
            })
            .await
    });
    // Give the rollback every chance to run while B's start is held.
    let until = std::time::Instant::now() + Duration::from_millis(300);
    while std::time::Instant::now() < until && !rollback.is_finished() {
        tokio::task::yield_now().await;
    }
    store.open_gate();
    let started = start.await.unwrap();
    let rolled = rollback.await.unwrap();
    assert!(
        !(started.is_ok() && rolled.is_ok()),
        "both the start of B and the rollback of A succeeded: {started:?} / {rolled:?}"
    );
    // Whatever won, after a restart at most one rollout of the service is live.
    shutdown.cancel();
    mgr.join().await;
    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    let unfinished: Vec<_> = api(&mgr)
        .list(Some("web"))
        .await
        .unwrap()
        .into_iter()
        .filter(|s| !s.finished)
        .map(|s| (s.state().as_str(), s.rollout_id))
        .collect();
    assert!(unfinished.len() <= 1, "live rollouts: {unfinished:?}");
    shutdown.cancel();
    mgr.join().await;
}

/// Finding 4: when the store's sequence counter is behind the agent's (a store restored from a
/// backup), the agent refuses with `STALE_ORDER` and its `last_seq`; the coordinator allocates
/// past it and the host is updated. Before the fix each retry reused a sequence the agent had
/// already passed and the host failed after five tries.
#[tokio::test(start_paused = true)]
async fn stale_order_refusals_catch_up_with_the_agents_sequence() {
    let store = Arc::new(TestStore::new());
    let fleet = fleet(2);
    let agent_seq = 500;
    let healthy = healthy_agent();
    fleet.respond_with(Box::new(move |h: &HostId, o: &serin_proto::Order| {
        if o.seq <= agent_seq {
            let mut r = outcome(o, OrderPhase::Rejected, ResultCode::StaleOrder);
            r.last_seq = agent_seq;
            vec![FleetEvent::Result {
                host: h.clone(),
                outcome: r,
            }]
        } else {
            healthy(h, o)
        }
    }));
    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    let st = api(&mgr)
        .start_rollout(wire_spec(&["1", "100%"]))
        .await
        .unwrap();
    let mut rx = super::WireWatch(api(&mgr).watch(&st.rollout_id).unwrap());
    wait_status(&mut rx, "the rollout finishes", |s| s.finished).await;
    let s = rx.borrow().clone();
    assert_eq!(s.state().as_str(), "succeeded", "{:?}", failed_hosts(&s));
    let activates: Vec<(String, u64)> = fleet
        .sent()
        .iter()
        .filter(|(_, o)| o.action.kind() == "activate" && o.seq > agent_seq)
        .map(|(h, o)| (h.to_string(), o.seq))
        .collect();
    assert_eq!(
        activates.len(),
        2,
        "one fresh activate per host: {activates:?}"
    );
    shutdown.cancel();
    mgr.join().await;
}

/// Finding 5 (the coordinator's half): a wave list that does not grow on this fleet is refused
/// with a message naming the wave, instead of silently running fewer waves than listed. The
/// default list still adapts to small fleets.
#[tokio::test(start_paused = true)]
async fn a_wave_list_that_does_not_grow_on_this_fleet_is_refused() {
    let store = Arc::new(TestStore::new());
    let fleet = fleet(8);
    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    for (waves, field, shown) in [
        (&["1", "5%", "100%"][..], "waves[1]", "\"5%\" is 1 host"),
        (&["10", "5%", "100%"][..], "waves[1]", "\"5%\" is 1 host"),
        (&["2", "25%", "100%"][..], "waves[1]", "\"25%\" is 2 hosts"),
    ] {
        for call in ["plan", "start"] {
            let e = match call {
                "plan" => api(&mgr).plan(wire_spec(waves)).await.unwrap_err(),
                _ => api(&mgr).start_rollout(wire_spec(waves)).await.unwrap_err(),
            };
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{waves:?}: {e:?}");
            assert!(
                e.message().contains(field)
                    && e.message().contains(shown)
                    && e.message().contains("does not grow"),
                "{call} {waves:?}: {}",
                e.message()
            );
        }
    }
    assert!(fleet.sent().is_empty(), "nothing was started");
    // The server takes the same grammar as the CLI: "10 %" is a percentage.
    let p = api(&mgr)
        .plan(wire_spec(&["1", "50 %", "100%"]))
        .await
        .unwrap();
    assert_eq!(p.waves.len(), 3);
    // The default list on a fleet of two: 1, 1 (dropped), 2.
    let small = self::fleet(2);
    let mgr2 = manager(&store, &small, &shutdown).await;
    let p = api(&mgr2).plan(wire_spec(&[])).await.unwrap();
    assert_eq!(p.waves.len(), 2);
    shutdown.cancel();
    mgr.join().await;
    mgr2.join().await;
}
