//! The coordinator SIGKILLed at each phase of a rollout and restarted on the same port and
//! state directory: the rollout finishes as if nothing happened, and no host gets a second
//! target (or a second activation) for the same rollout.

use std::time::Duration;

use serin_proto::wire;
use serin_tests::demo_release::Behaviour;
use serin_tests::fleet;
use serin_tests::fleet::{BASELINE, Fleet, Timings, describe_status};

const LONG: Duration = Duration::from_secs(90);

/// Asserts that every host of rollout `id` had at most one target release and activated
/// `release` at most once, from the coordinator's status, the agents' state.json and the
/// monitor's history.
fn assert_one_target_per_host(f: &Fleet, s: &wire::RolloutStatus, release: &str) {
    let hist = f.history();
    for h in &s.hosts {
        let i = f.index_of(&h.host_id);
        assert!(
            h.target_release.is_empty()
                || h.target_release == release
                || h.target_release == h.baseline_release,
            "host {} has target {:?}\n{}",
            h.host_id,
            h.target_release,
            describe_status(s)
        );
        assert!(
            hist.activations(i, release) <= 1,
            "host #{i} {} switched to {release} {} times\n{}",
            h.host_id,
            hist.activations(i, release),
            f.dump()
        );
        let seqs = f.agent_activation_seqs(i, &s.rollout_id, release);
        assert!(
            seqs.len() <= 1,
            "host #{i} {} activated {release} under {} order sequences in rollout {}: {:?}",
            h.host_id,
            seqs.len(),
            s.rollout_id,
            f.agent_results(i, &s.rollout_id)
        );
        if h.phase().as_str() == "confirmed" {
            assert_eq!(
                seqs.len(),
                1,
                "confirmed host #{i} {} recorded its activation: {:?}",
                h.host_id,
                f.agent_results(i, &s.rollout_id)
            );
        }
    }
}

/// Kills the coordinator at canary dispatched, canary baking and wave 2 dispatched; the rollout
/// still succeeds with one activation per host.
#[test]
fn coordinator_killed_while_dispatching_and_baking() {
    let f = Fleet::start("crash-healthy", &["a", "b", "c", "a"]);
    f.push(&fleet::healthy("v2"));
    let t = Timings {
        bake: "2s",
        min_healthy: "1s",
        ..Timings::default()
    };
    let id = f.start_rollout("v2", &["--waves", "1,50%,100%"], &t);

    // Canary dispatched (the start answered; the canary is not healthy yet).
    let s = f.status(&id);
    assert_eq!(s.state().as_str(), "running", "{}", describe_status(&s));
    f.coord.restart();

    f.wait_rollout(&id, "the canary baking", LONG, |s| {
        s.waves
            .first()
            .is_some_and(|w| w.state().as_str() == "baking")
    });
    f.coord.restart();

    f.wait_rollout(&id, "wave 1 dispatching", LONG, |s| {
        s.current_wave == 1
            && s.waves
                .get(1)
                .is_some_and(|w| w.state().as_str() == "dispatching")
    });
    f.coord.restart();

    let s = f.wait_finished(&id, LONG);
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
    f.assert_all_serving(0..4, "v2");
    let s = f.wait_rollout(&id, "every host confirmed", Duration::from_secs(15), |s| {
        s.hosts.iter().all(|h| h.phase().as_str() == "confirmed")
    });
    assert_one_target_per_host(&f, &s, "v2");
    let hist = f.history();
    for i in 0..4 {
        assert_eq!(hist.activations(i, "v2"), 1, "host #{i}\n{}", f.dump());
    }
    // Every decision was taken once: one promote per passed wave, one complete.
    for w in 0..s.waves.len() as u32 - 1 {
        let n = s
            .decisions
            .iter()
            .filter(|d| d.kind().as_str() == "promote" && d.wave == w)
            .count();
        assert_eq!(n, 1, "wave {w} promoted {n} times\n{}", describe_status(&s));
    }
    assert_eq!(
        s.decisions
            .iter()
            .filter(|d| d.kind().as_str() == "complete")
            .count(),
        1,
        "{}",
        describe_status(&s)
    );
}

/// Kills the coordinator while it rolls back: the rollback completes after the restart and
/// every touched host is back on its baseline.
#[test]
fn coordinator_killed_while_rolling_back() {
    let f = Fleet::start("crash-rollback", &["a", "b", "c", "a"]);
    // v2 takes longer to stop than the agents' stop timeout, so every host's rollback (stop v2,
    // start v1) lasts a couple of seconds: the rollout is reliably caught in `rolling_back`.
    f.push(&fleet::release(Behaviour::healthy("v2").slow_stop(60_000)));
    let t = Timings {
        bake: "2s",
        min_healthy: "1s",
        ..Timings::default()
    };
    // The canary passes; one host of the second wave fails, so 4 hosts are rolled back.
    let plan = f.plan("v2", &["--waves", "1,100%"], &t);
    let second: Vec<String> = plan["waves"][1]["host_ids"]
        .as_array()
        .expect("a second wave")
        .iter()
        .map(|h| h.as_str().unwrap_or_default().to_owned())
        .collect();
    f.hosts[f.index_of(&second[0])].fail_release("v2");
    let id = f.start_rollout("v2", &["--waves", "1,100%"], &t);
    let s = f.wait_rollout(&id, "rolling back", LONG, |s| {
        s.state().as_str() == "rolling_back" || s.finished
    });
    assert_eq!(
        s.state().as_str(),
        "rolling_back",
        "caught the rollback in flight\n{}",
        describe_status(&s)
    );
    f.coord.restart();
    let s = f.wait_finished(&id, LONG);
    f.assert_contained_and_restored(&s, "rolled_back", "v2", &[0, 1, 2, 3], BASELINE);
    assert_one_target_per_host(&f, &s, "v2");
    assert_eq!(
        s.decisions
            .iter()
            .filter(|d| d.kind().as_str() == "rollback")
            .count(),
        1,
        "one rollback decision\n{}",
        describe_status(&s)
    );
}
