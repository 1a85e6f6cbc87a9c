//! RolloutManager tests over the in-memory fakes, with tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use crate::fleet::{OrderPhase, ResultCode};
use serin_proto::{OrderAction, ServiceName, wire};
use tokio_util::sync::CancellationToken;

use crate::control_service::RolloutApi;
use crate::rollout::manager::RolloutManager;

/// The engine as the control service calls it (wire types in and out).
fn api(m: &RolloutManager) -> &dyn RolloutApi {
    m
}
use super::wire_spec;
use crate::fleet::{FleetEvent, OrderOutcome};
use crate::rollout::testing::{FakeFleet, host, manager, release_record};
use crate::store::Store;
use crate::store::memory::MemoryStore;

fn setup(n: usize) -> (Arc<MemoryStore>, Arc<FakeFleet>) {
    let store = Arc::new(MemoryStore::new());
    store.put_release(&release_record()).unwrap();
    let fleet = Arc::new(FakeFleet::new(
        (1..=n)
            .map(|i| host(&format!("h{i}"), "eu-1", "web-1"))
            .collect(),
    ));
    (store, fleet)
}

/// Answers every order the fleet has received and not yet answered, successfully.
fn agents(fleet: &FakeFleet, answered: &mut usize) {
    let sent = fleet.sent();
    for (h, o) in &sent[*answered..] {
        let phases: &[OrderPhase] = match &o.action {
            OrderAction::Activate { .. } => &[OrderPhase::Activated, OrderPhase::Healthy],
            OrderAction::Confirm { .. } => &[OrderPhase::Confirmed],
            OrderAction::Rollback { .. } => &[OrderPhase::RolledBack],
            _ => &[],
        };
        for p in phases {
            fleet.emit(FleetEvent::Result {
                host: h.clone(),
                outcome: OrderOutcome {
                    order_id: o.order_id.clone(),
                    rollout_id: o.rollout_id.clone(),
                    seq: o.seq,
                    service: ServiceName::new("web").unwrap(),
                    release: None,
                    phase: *p,
                    code: ResultCode::Ok,
                    message: String::new(),
                    current_release: None,
                    last_seq: 0,
                },
            });
        }
    }
    *answered = sent.len();
}

async fn wait_for(rx: &mut super::WireWatch, f: impl Fn(&wire::RolloutStatus) -> bool) {
    tokio::time::timeout(Duration::from_secs(3600), async {
        loop {
            if f(&rx.borrow_and_update()) {
                return;
            }
            if rx.changed().await.is_err() {
                assert!(f(&rx.borrow()), "status never matched: {:?}", rx.borrow());
                return;
            }
        }
    })
    .await
    .expect("condition within an hour of (paused) time");
}

#[tokio::test(start_paused = true)]
async fn a_rollout_runs_to_success_through_the_manager() {
    let (store, fleet) = setup(4);
    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    let plan = api(&mgr).plan(wire_spec(&["1", "100%"])).await.unwrap();
    assert_eq!(plan.waves.len(), 2);
    assert_eq!(plan.waves[0].host_ids, vec!["h1"]);
    let st = api(&mgr)
        .start_rollout(wire_spec(&["1", "100%"]))
        .await
        .unwrap();
    assert_eq!(st.state().as_str(), "running");
    let activations = |fleet: &crate::rollout::testing::FakeFleet| {
        fleet
            .sent()
            .into_iter()
            .filter(|(_, o)| o.action.kind() == "activate")
            .count()
    };
    assert_eq!(
        activations(&fleet),
        1,
        "the canary is dispatched before start returns"
    );
    // A second rollout for the same service is refused.
    let e = api(&mgr)
        .start_rollout(wire_spec(&["1", "100%"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message()
            .contains(&format!("already has an active rollout {}", st.rollout_id)),
        "{}",
        e.message()
    );
    let mut rx = super::WireWatch(api(&mgr).watch(&st.rollout_id).unwrap());
    let mut answered = 0;
    for _ in 0..50 {
        agents(&fleet, &mut answered);
        tokio::time::sleep(Duration::from_secs(1)).await;
        if rx.borrow().finished {
            break;
        }
    }
    wait_for(&mut rx, |s| s.state().as_str() == "succeeded").await;
    let ex = api(&mgr).explain(&st.rollout_id).await.unwrap();
    assert!(ex.decisions.iter().any(|d| d.kind().as_str() == "complete"));
    assert!(
        ex.events.iter().any(|e| e.contains("wave 1 started")),
        "{:?}",
        ex.events
    );
    let list = api(&mgr).list(Some("web")).await.unwrap();
    assert_eq!(list.len(), 1);
    assert!(store.saves() > 4, "every step with a change is saved");
    shutdown.cancel();
    mgr.join().await;
}

#[tokio::test(start_paused = true)]
async fn validation_and_unknown_things_map_to_the_right_codes() {
    let (store, fleet) = setup(2);
    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    let e = api(&mgr)
        .plan(wire_spec(&["0%", "100%"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("waves[0]"), "{}", e.message());
    let mut w = wire_spec(&[]);
    w.release = "web-9".into();
    let e = api(&mgr).start_rollout(w).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = api(&mgr).status("r-nope").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let mut w = wire_spec(&[]);
    w.selector = "role=db".into();
    let e = api(&mgr).start_rollout(w).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("selects no host"), "{}", e.message());
    shutdown.cancel();
    mgr.join().await;
}

/// The agents answer for a minute, until the rollout has succeeded: the hosts activated, in
/// the order their activate orders were sent.
async fn answer_until_succeeded(
    fleet: &FakeFleet,
    answered: &mut usize,
    rx: &mut super::WireWatch,
) -> Vec<String> {
    for _ in 0..60 {
        agents(fleet, answered);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_for(rx, |s| s.state().as_str() == "succeeded").await;
    fleet
        .sent()
        .iter()
        .filter(|(_, o)| o.action.kind() == "activate")
        .map(|(h, _)| h.to_string())
        .collect()
}

/// Three hosts and a rollout of waves `1,100%` whose canary is baking, then a coordinator
/// "crash" (the manager stops): the store and fleet it leaves, the rollout, and how many of the
/// fleet's orders were answered.
async fn crashed_while_the_canary_bakes() -> (
    Arc<MemoryStore>,
    Arc<FakeFleet>,
    serin_proto::wire::RolloutStatus,
    usize,
) {
    let (store, fleet) = setup(3);
    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    let st = api(&mgr)
        .start_rollout(wire_spec(&["1", "100%"]))
        .await
        .unwrap();
    let mut answered = 0;
    agents(&fleet, &mut answered);
    let mut rx = super::WireWatch(api(&mgr).watch(&st.rollout_id).unwrap());
    wait_for(&mut rx, |s| s.waves[0].state().as_str() == "baking").await;
    shutdown.cancel();
    mgr.join().await;
    (store, fleet, st, answered)
}

#[tokio::test(start_paused = true)]
async fn a_restarted_manager_resumes_the_rollout_where_it_was() {
    let (store, fleet, st, mut answered) = crashed_while_the_canary_bakes().await;

    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    let before = fleet.sent().len();
    let mut rx = super::WireWatch(api(&mgr).watch(&st.rollout_id).unwrap());
    assert_eq!(
        rx.borrow().waves[0].state().as_str(),
        "baking",
        "resumed in the same wave"
    );
    let activates = answer_until_succeeded(&fleet, &mut answered, &mut rx).await;
    assert_eq!(
        activates,
        vec!["h1", "h2", "h3"],
        "no host was activated twice"
    );
    assert!(fleet.sent().len() > before);
    // Controls on a finished rollout are refused with the state named.
    let e = api(&mgr)
        .control(wire::ControlRequest {
            rollout_id: st.rollout_id.clone(),
            action: wire::ControlAction::Pause as i32,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("is succeeded; pause applies to"),
        "{}",
        e.message()
    );
    // Manual rollback works through the manager.
    let st2 = api(&mgr)
        .control(wire::ControlRequest {
            rollout_id: st.rollout_id.clone(),
            action: wire::ControlAction::Rollback as i32,
            reason: "bad release".into(),
        })
        .await
        .unwrap();
    assert_eq!(st2.state().as_str(), "rolling_back");
    agents(&fleet, &mut answered);
    wait_for(&mut rx, |s| s.state().as_str() == "rolled_back").await;
    shutdown.cancel();
    mgr.join().await;
}

/// A store written by a coordinator of JSON records (record version 1, every wave's host ids in
/// the header) is migrated when the manager opens it: the rollout resumes where it was and its
/// records are binary from then on.
#[tokio::test(start_paused = true)]
async fn json_records_are_migrated_when_the_store_is_opened() {
    use crate::rollout::record;
    let (store, fleet, st, mut answered) = crashed_while_the_canary_bakes().await;

    // Rewrite the records as the JSON coordinator wrote them.
    let id = st.rollout_id.as_str();
    let s = store.load_rollout(id).unwrap().unwrap();
    let mut d = record::decode_rollout(id, &s.header, &s.hosts).unwrap();
    d.header.version = record::JSON_VERSION;
    let hosts: Vec<_> = d
        .hosts
        .iter_mut()
        .map(|h| {
            h.version = record::JSON_VERSION;
            (h.host.id.clone(), serde_json::to_vec(&*h).unwrap())
        })
        .collect();
    let header = serde_json::to_vec(&d.header).unwrap();
    assert!(
        header.windows(2).any(|w| w == b"h3"),
        "host ids in the header"
    );
    store.save_rollout(id, &header, &hosts, &[]).unwrap();

    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    let s = store.load_rollout(id).unwrap().unwrap();
    assert_eq!(s.header[..2], record::MAGIC, "the header is binary now");
    assert!(
        !s.header.windows(2).any(|w| w == b"h3"),
        "and lists no host"
    );
    for (h, b) in &s.hosts {
        assert_eq!(b[..2], record::MAGIC, "host {h} is binary now");
    }
    let mut rx = super::WireWatch(api(&mgr).watch(id).unwrap());
    assert_eq!(
        rx.borrow().waves[0].state().as_str(),
        "baking",
        "resumed in the same wave"
    );
    assert_eq!(rx.borrow().waves[1].size, 2, "with its waves' hosts");
    let activates = answer_until_succeeded(&fleet, &mut answered, &mut rx).await;
    assert_eq!(activates, vec!["h1", "h2", "h3"], "no host activated twice");
    shutdown.cancel();
    mgr.join().await;
}

#[tokio::test(start_paused = true)]
async fn a_host_going_down_makes_the_rollout_wait_until_it_returns() {
    let (store, fleet) = setup(4);
    let shutdown = CancellationToken::new();
    let mgr = manager(&store, &fleet, &shutdown).await;
    let st = api(&mgr)
        .start_rollout(wire_spec(&["2", "100%"]))
        .await
        .unwrap();
    let mut rx = super::WireWatch(api(&mgr).watch(&st.rollout_id).unwrap());
    // h2 disappears before answering; h1 becomes healthy.
    let mut down = host("h2", "eu-1", "web-1");
    down.connected = false;
    fleet.set_host(down);
    wait_for(&mut rx, |s| {
        s.hosts
            .iter()
            .any(|h| h.host_id == "h2" && h.phase().as_str() == "unreachable")
    })
    .await;
    let first: Vec<_> = fleet
        .sent()
        .into_iter()
        .filter(|(h, _)| h.as_str() == "h1")
        .collect();
    answer(&fleet, &first);
    wait_for(&mut rx, |s| s.state().as_str() == "waiting").await;
    // While it waits (five minutes of paused time, longer than the confirm deadline h1's
    // activation carried), the task keeps h1's dead-man switch fed through the fleet; h2 is
    // not connected, so nothing is sent to it.
    let confirm = match &first[0].1.action {
        OrderAction::Activate {
            confirm_deadline: Some(c),
            traffic_weight: None,
            ..
        } => *c,
        a => panic!("unexpected {a:?}"),
    };
    tokio::time::sleep(Duration::from_secs(300)).await;
    let holds = fleet.holds();
    assert!(
        holds.len() as u64 >= 300 / (confirm.as_secs() / 3),
        "{} holds in 300 s with a confirm deadline of {confirm:?}",
        holds.len()
    );
    for (h, hold) in &holds {
        assert_eq!(h.as_str(), "h1");
        assert_eq!(hold.release.as_str(), "web-2");
        assert_eq!(hold.confirm_deadline, confirm);
    }
    // h2 returns: the very same order is re-sent and the rollout resumes by itself.
    fleet.set_host(host("h2", "eu-1", "web-1"));
    wait_for(&mut rx, |s| s.state().as_str() == "running").await;
    let to_h2: Vec<_> = fleet
        .sent()
        .into_iter()
        .filter(|(h, _)| h.as_str() == "h2")
        .collect();
    assert_eq!(to_h2.len(), 2);
    assert_eq!(to_h2[0].1, to_h2[1].1, "same order id and seq");
    let mut answered = 0;
    for _ in 0..60 {
        agents(&fleet, &mut answered);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_for(&mut rx, |s| s.state().as_str() == "succeeded").await;
    let d: Vec<_> = rx
        .borrow()
        .decisions
        .iter()
        .map(|d| d.kind().as_str().to_string())
        .collect();
    assert_eq!(d, vec!["wait", "resume", "promote", "promote", "complete"]);
    shutdown.cancel();
    mgr.join().await;
}

/// Answers the given activate orders with activated + healthy.
fn answer(fleet: &FakeFleet, orders: &[(serin_proto::HostId, serin_proto::Order)]) {
    for (h, o) in orders {
        for p in [OrderPhase::Activated, OrderPhase::Healthy] {
            fleet.emit(FleetEvent::Result {
                host: h.clone(),
                outcome: OrderOutcome {
                    order_id: o.order_id.clone(),
                    rollout_id: o.rollout_id.clone(),
                    seq: o.seq,
                    service: ServiceName::new("web").unwrap(),
                    release: None,
                    phase: p,
                    code: ResultCode::Ok,
                    message: String::new(),
                    current_release: None,
                    last_seq: 0,
                },
            });
        }
    }
}
