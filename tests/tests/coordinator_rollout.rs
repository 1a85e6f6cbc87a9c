//! End-to-end rollouts on a real fleet (`serin serve` + `serin-agent`s + the demo service):
//! a healthy release wave by wave, bad releases contained to the canary and rolled back,
//! failure thresholds at and one past their boundary, and a host that disappears mid-rollout.

use std::collections::BTreeSet;
use std::time::Duration;

use serin_tests::demo_release::{Behaviour, DemoRelease};
use serin_tests::fleet;
use serin_tests::fleet::{BASELINE, Fleet, Timings, decision, describe_status};
use serin_tests::wait;

const LONG: Duration = Duration::from_secs(60);

/// A healthy release reaches every selected host, wave by wave, and no wave starts before the
/// previous wave's gate passed.
#[test]
fn healthy_release_reaches_every_host_wave_by_wave() {
    let f = Fleet::start("healthy", &["a", "a", "b", "b", "c", "c"]);
    f.push(&fleet::healthy("v2"));
    let t = Timings::default();
    let extra = ["--waves", "1,50%,100%", "--spread-by", "zone"];
    let plan = f.plan("v2", &extra, &t);
    let id = f.start_rollout("v2", &extra, &t);
    let s = f.wait_finished(&id, LONG);
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
    assert_eq!(s.waves.len(), 3, "{}", describe_status(&s));

    // Every host of the fleet was selected and serves v2.
    assert_eq!(f.rollout_hosts(&s).len(), 6, "{}", describe_status(&s));
    f.assert_all_serving(0..6, "v2");

    // The waves that ran are the plan's waves.
    let planned = fleet::planned_waves(&plan["waves"]);
    let ran = fleet::waves_run(&s);
    assert_eq!(planned, ran, "plan {plan}\n{}", describe_status(&s));
    // The canary spread over zones: the first wave has one host; the second covers 3 hosts
    // in total, one per zone.
    assert_eq!(ran[0].len(), 1);
    let zones_of_first_two: BTreeSet<&str> = ran[0]
        .iter()
        .chain(ran[1].iter())
        .map(|h| f.hosts[f.index_of(h)].zone.as_str())
        .collect();
    assert_eq!(
        zones_of_first_two.len(),
        3,
        "waves spread over zones: {ran:?}"
    );

    // Wave k's hosts switched only after wave k-1's gate passed, and all of wave k-1 had
    // switched before that gate.
    let hist = f.history();
    for w in 1..s.waves.len() as u32 {
        let gate = decision(&s, "promote", w - 1).unwrap_or_else(|| {
            panic!(
                "no promote decision for wave {}\n{}",
                w - 1,
                describe_status(&s)
            )
        });
        assert!(
            s.waves[w as usize].started_unix_ms >= gate.at_unix_ms,
            "wave {w} started at {} before wave {}'s gate at {}\n{}",
            s.waves[w as usize].started_unix_ms,
            w - 1,
            gate.at_unix_ms,
            describe_status(&s)
        );
        for i in f.wave_hosts(&s, w) {
            let at = hist.first_activation(i, "v2").expect("host activated v2");
            assert!(
                at >= gate.at_unix_ms,
                "host #{i} of wave {w} switched to v2 at {at}, before wave {}'s gate at {}\n{}",
                w - 1,
                gate.at_unix_ms,
                f.dump()
            );
        }
        for i in f.wave_hosts(&s, w - 1) {
            let at = hist.first_activation(i, "v2").expect("host activated v2");
            assert!(
                at <= gate.at_unix_ms,
                "host #{i} of wave {} switched at {at}, after its gate at {}",
                w - 1,
                gate.at_unix_ms
            );
        }
    }
    for i in 0..6 {
        assert_eq!(hist.activations(i, "v2"), 1, "host #{i}\n{}", f.dump());
    }
    // Every host ends confirmed, so no agent's dead-man switch reverts it later.
    f.wait_rollout(&id, "every host confirmed", Duration::from_secs(15), |s| {
        s.hosts.iter().all(|h| h.phase().as_str() == "confirmed")
    });
    f.assert_all_serving(0..6, "v2");
}

/// Starts a rollout of `release` (waves 1,100%) and waits for it to end.
fn roll_bad(f: &Fleet, release: &DemoRelease, extra: &[&str], t: &Timings) -> String {
    f.push(release);
    let mut e = vec!["--waves", "1,100%"];
    e.extend_from_slice(extra);
    f.start_rollout(&release.id, &e, t)
}

/// A release that crashes at start: only the canary ever runs it, it is restored, and
/// `rollout start --wait` exits 3.
#[test]
fn crashing_release_is_contained_to_the_canary() {
    let f = Fleet::start("crash", &["a", "b", "c"]);
    let bad = fleet::release(Behaviour::healthy("v2-crash").crashing_at_start());
    f.push(&bad);
    let mut args: Vec<String> = vec!["rollout".into(), "start".into(), "--wait".into()];
    args.extend(f.spec_args(
        "v2-crash",
        &["--waves", "1,100%", "--timeout", "60s"],
        &Timings::default(),
    ));
    let out = f.cli(&args);
    assert_eq!(
        out.code,
        3,
        "a rolled-back rollout exits 3\n{out}\n{}",
        f.dump()
    );
    let (id, _, _) = f
        .list_rollouts()
        .into_iter()
        .find(|(_, _, release)| release == "v2-crash")
        .expect("the rollout of v2-crash is listed");
    let s = f.wait_finished(&id, LONG);
    let canary = f.wave_hosts(&s, 0);
    assert_eq!(canary.len(), 1);
    f.assert_contained_and_restored(&s, "rolled_back", "v2-crash", &canary, BASELINE);
    assert!(
        decision(&s, "rollback", 0).is_some(),
        "a rollback decision on the canary wave\n{}",
        describe_status(&s)
    );
}

/// A release that turns unhealthy a moment after start fails during the canary's bake.
#[test]
fn release_unhealthy_after_a_delay_is_rolled_back() {
    let f = Fleet::start("unhealthy-later", &["a", "b", "c"]);
    let bad = fleet::release(Behaviour::healthy("v2-sick").unhealthy_after(2));
    let t = Timings {
        canary_bake: Some("5s"),
        ..Timings::default()
    };
    let id = roll_bad(&f, &bad, &[], &t);
    let s = f.wait_finished(&id, LONG);
    let canary = f.wave_hosts(&s, 0);
    assert_eq!(canary.len(), 1);
    f.assert_contained_and_restored(&s, "rolled_back", "v2-sick", &canary, BASELINE);
    // It was healthy first: the canary got through its activation before failing.
    let hist = f.history();
    assert!(
        hist.versions_seen[canary[0]].contains("v2-sick"),
        "the canary served v2-sick for a while: {:?}",
        hist.versions_seen[canary[0]]
    );
}

/// A release that only fails in zone c: the canary spreads over the zones, so the zone-c canary
/// host fails the gate, and no host outside the canary ever gets the release.
#[test]
fn release_failing_in_one_zone_is_stopped_at_the_canary() {
    let f = Fleet::start("zone-c", &["a", "a", "b", "b", "c", "c"]);
    for h in f.hosts.iter().filter(|h| h.zone == "c") {
        h.fail_release("v2");
    }
    f.push(&fleet::healthy("v2"));
    let id = f.start_rollout(
        "v2",
        &["--waves", "3,100%", "--spread-by", "zone"],
        &Timings::default(),
    );
    let s = f.wait_finished(&id, LONG);
    let canary = f.wave_hosts(&s, 0);
    let zones: BTreeSet<&str> = canary.iter().map(|i| f.hosts[*i].zone.as_str()).collect();
    assert_eq!(
        zones,
        BTreeSet::from(["a", "b", "c"]),
        "{}",
        describe_status(&s)
    );
    f.assert_contained_and_restored(&s, "rolled_back", "v2", &canary, BASELINE);
    let failed_host = s
        .hosts
        .iter()
        .find(|h| f.hosts[f.index_of(&h.host_id)].zone == "c" && h.wave == 0)
        .expect("a zone-c canary host");
    assert!(
        s.reason.contains("fail") || s.reason.contains(&failed_host.host_id),
        "the reason names the failure: {:?}",
        s.reason
    );
}

/// Count threshold: 1 failure allowed in a wave of 4. Two failures roll back; exactly one
/// failure still promotes.
#[test]
fn count_failure_threshold_is_exact() {
    let f = Fleet::start("threshold-count", &["a", "a", "a", "a"]);
    let t = Timings::default();
    let extra = ["--waves", "100%", "--failure-threshold", "1"];

    // One past the boundary: 2 of 4 fail.
    f.hosts[0].fail_release("v2");
    f.hosts[1].fail_release("v2");
    f.push(&fleet::healthy("v2"));
    let id = f.start_rollout("v2", &extra, &t);
    let s = f.wait_finished(&id, LONG);
    f.assert_contained_and_restored(&s, "rolled_back", "v2", &[0, 1, 2, 3], BASELINE);
    assert!(
        s.waves[0].failed >= 2,
        "two failed hosts counted\n{}",
        describe_status(&s)
    );

    // Exactly at the boundary: 1 of 4 fails.
    f.hosts[2].fail_release("v3");
    f.push(&fleet::healthy("v3"));
    let id = f.start_rollout("v3", &extra, &t);
    let s = f.wait_finished(&id, LONG);
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "1 failure with threshold 1 promotes\n{}\n{}",
        describe_status(&s),
        f.dump()
    );
    assert_eq!(s.waves[0].failed, 1, "{}", describe_status(&s));
    f.assert_all_serving([0, 1, 3], "v3");
}

/// Percent threshold: 40% of a wave of 5 allows exactly 2 failures. Three roll back; two
/// promote.
#[test]
fn percent_failure_threshold_is_exact() {
    let f = Fleet::start("threshold-pct", &["a", "a", "a", "a", "a"]);
    let t = Timings::default();
    let extra = ["--waves", "100%", "--failure-threshold", "40%"];

    for i in [0, 1, 2] {
        f.hosts[i].fail_release("v2");
    }
    f.push(&fleet::healthy("v2"));
    let id = f.start_rollout("v2", &extra, &t);
    let s = f.wait_finished(&id, LONG);
    f.assert_contained_and_restored(&s, "rolled_back", "v2", &[0, 1, 2, 3, 4], BASELINE);

    for i in [3, 4] {
        f.hosts[i].fail_release("v3");
    }
    f.push(&fleet::healthy("v3"));
    let id = f.start_rollout("v3", &extra, &t);
    let s = f.wait_finished(&id, LONG);
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "2 failures of 5 with threshold 40% promote\n{}\n{}",
        describe_status(&s),
        f.dump()
    );
    assert_eq!(s.waves[0].failed, 2, "{}", describe_status(&s));
    f.assert_all_serving([0, 1, 2], "v3");
}

/// A host of the second wave disappears (agent and service killed): the rollout waits instead
/// of promoting or failing, and finishes once the agent is back.
#[test]
fn unreachable_host_makes_the_wave_wait_until_it_returns() {
    let f = Fleet::start("unreachable", &["a", "b", "c"]);
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
    let gone = f.wave_hosts(&s, 1)[0];
    f.hosts[gone].kill();
    f.wait_host_connected(gone, false);
    f.control("promote", &id);
    let s = f.wait_state(&id, "waiting", LONG);
    assert!(!s.finished);
    // It stays waiting: the missing host counts neither as failed nor as done.
    wait::hold_for(
        "the rollout waiting with no failure",
        Duration::from_secs(2),
        &|| f.dump(),
        || {
            let s = f.status(&id);
            if s.state().as_str() == "waiting" && s.waves[1].failed == 0 {
                Ok(())
            } else {
                Err(describe_status(&s))
            }
        },
    );

    f.hosts[gone].revive();
    let s = f.wait_finished(&id, LONG);
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
    f.assert_all_serving(0..3, "v2");
}
