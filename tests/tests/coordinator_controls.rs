//! Operator controls end to end, through the `serin` CLI: pause, resume, promote, abort, retry,
//! and the rollback of a finished rollout.

use std::time::Duration;

use serin_tests::fleet;
use serin_tests::fleet::{BASELINE, Fleet, Timings, decision, describe_status};
use serin_tests::wait;

const LONG: Duration = Duration::from_secs(60);

/// Pause holds the next wave back; resume lets it go; promote skips long bakes; rolling back a
/// succeeded rollout returns every host to its baseline.
#[test]
fn pause_resume_promote_and_rollback_of_a_finished_rollout() {
    let f = Fleet::start("controls", &["a", "b", "c"]);
    let t = Timings::default();

    // pause / resume
    f.push(&fleet::healthy("v2"));
    let id = f.start_rollout("v2", &["--waves", "1,100%"], &t);
    let paused = f.control("pause", &id);
    assert_eq!(paused["state"], "paused", "{paused}");
    let s = f.wait_rollout(&id, "the canary healthy while paused", LONG, |s| {
        s.hosts
            .iter()
            .filter(|h| h.wave == 0)
            .all(|h| matches!(h.phase().as_str(), "healthy" | "confirmed"))
    });
    let rest = f.wave_hosts(&s, 1);
    // Longer than the canary's bake: without the pause, wave 1 would start.
    wait::hold_for(
        "the paused rollout holding wave 1 back",
        Duration::from_secs(3),
        &|| f.dump(),
        || {
            let s = f.status(&id);
            if s.state().as_str() != "paused" {
                return Err(format!("state {}", s.state().as_str()));
            }
            for i in &rest {
                if f.hosts[*i].agent.current_release().as_deref() != Some(BASELINE) {
                    return Err(format!("host #{i} moved while paused"));
                }
            }
            Ok(())
        },
    );
    let resumed = f.control("resume", &id);
    assert_ne!(resumed["state"], "paused", "{resumed}");
    let s = f.wait_finished(&id, LONG);
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
    let pause = decision(&s, "pause", 0).expect("the pause decision is recorded");
    assert!(pause.reason.contains("e2e test pause"), "{pause:?}");
    f.assert_all_serving(0..3, "v2");

    // promote: bakes of a minute end at once when promoted.
    f.push(&fleet::healthy("v3"));
    let slow = Timings {
        bake: "60s",
        ..Timings::default()
    };
    let id = f.start_rollout("v3", &["--waves", "1,100%"], &slow);
    for wave in 0..2usize {
        f.wait_rollout(&id, &format!("wave {wave} baking"), LONG, |s| {
            s.waves
                .get(wave)
                .is_some_and(|w| w.state().as_str() == "baking")
        });
        f.control("promote", &id);
    }
    let s = f.wait_finished(&id, Duration::from_secs(20));
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
    f.assert_all_serving(0..3, "v3");

    // rollback of the finished rollout: back to its baseline, v2.
    let rb = f.control("rollback", &id);
    assert!(
        matches!(rb["state"].as_str(), Some("rolling_back" | "rolled_back")),
        "{rb}"
    );
    let s = f.wait_finished(&id, LONG);
    assert_eq!(
        s.state().as_str(),
        "rolled_back",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
    f.assert_all_serving(0..3, "v2");
    // Rolling back again is refused: there is nothing left to roll back.
    let again = f.cli(&["rollout", "rollback", &id]);
    assert_eq!(again.code, 2, "{again}");
}

/// Abort during the canary's bake: the canary is restored, nobody else ever gets the release.
#[test]
fn abort_restores_the_canary_and_touches_nobody_else() {
    let f = Fleet::start("abort", &["a", "b", "c"]);
    f.push(&fleet::healthy("v2"));
    let t = Timings {
        canary_bake: Some("60s"),
        ..Timings::default()
    };
    let id = f.start_rollout("v2", &["--waves", "1,100%"], &t);
    let s = f.wait_rollout(&id, "the canary baking", LONG, |s| {
        s.waves
            .first()
            .is_some_and(|w| w.state().as_str() == "baking")
    });
    let canary = f.wave_hosts(&s, 0);
    f.wait_serving(canary[0], "v2");
    let out = f.control("abort", &id);
    assert!(
        matches!(out["state"].as_str(), Some("rolling_back" | "aborted")),
        "{out}"
    );
    let s = f.wait_finished(&id, LONG);
    f.assert_contained_and_restored(&s, "aborted", "v2", &canary, BASELINE);
    let abort = decision(&s, "abort", 0).expect("the abort decision is recorded");
    assert!(!abort.actor.is_empty(), "{abort:?}");
}

/// With `--on-failure pause`, a failed canary pauses; once the cause is fixed, `retry`
/// re-dispatches the failed host and the rollout completes.
#[test]
fn retry_after_a_paused_failure_completes_the_rollout() {
    let f = Fleet::start("retry", &["a", "b", "c"]);
    for h in &f.hosts {
        h.fail_release("v2");
    }
    f.push(&fleet::healthy("v2"));
    let id = f.start_rollout(
        "v2",
        &["--waves", "1,100%", "--on-failure", "pause"],
        &Timings::default(),
    );
    let s = f.wait_state(&id, "paused", LONG);
    assert!(
        !s.reason.is_empty(),
        "a paused rollout says why\n{}",
        describe_status(&s)
    );
    let canary = f.wave_hosts(&s, 0);
    for i in f.wave_hosts(&s, 1) {
        f.assert_never_had(i, "v2");
    }
    // `rollout start --wait` style exit code of a paused rollout: `status --watch` exits 5.
    let watch = f.cli(&["rollout", "status", &id, "--watch", "--timeout", "10s"]);
    assert_eq!(watch.code, 5, "{watch}");

    for h in &f.hosts {
        h.heal_release("v2");
    }
    // A retry re-dispatches failed hosts that are back on their baseline: the rollout pauses as
    // soon as the canary fails, a moment before its agent's own rollback is reported. Wait for it
    // as an operator would see it in `status`, or the retry is refused (and says so).
    f.wait_rollout(&id, "the failed canary back on its baseline", LONG, |s| {
        s.hosts
            .iter()
            .filter(|h| h.wave == 0)
            .all(|h| h.current_release == BASELINE)
    });
    let out = f.control("retry", &id);
    assert_ne!(out["state"], "paused", "{out}");
    let s = f.wait_finished(&id, LONG);
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
    f.assert_all_serving(0..3, "v2");
    assert!(
        decision(&s, "retry", 0).is_some(),
        "{}",
        describe_status(&s)
    );
    assert!(!canary.is_empty());
}
