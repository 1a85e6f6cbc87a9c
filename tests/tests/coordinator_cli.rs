//! The `serin` CLI against a real coordinator: `plan` shows the waves that then run, a second
//! rollout of a service is refused, and bad input or bad specs fail with exit code 2, a message
//! naming the problem, and no change at all.

use std::collections::BTreeSet;
use std::time::Duration;

use serin_tests::fleet;
use serin_tests::fleet::{BASELINE, Fleet, Timings, describe_status};

const LONG: Duration = Duration::from_secs(60);

/// `plan` lists exactly the waves `start` then runs, and a second rollout of the same service
/// is refused with a message naming the active one.
#[test]
fn plan_matches_the_run_and_a_second_rollout_is_refused() {
    let f = Fleet::start("cli-plan", &["a", "b", "c", "a", "b"]);
    f.push(&fleet::healthy("v2"));
    f.push(&fleet::healthy("v3"));
    let t = Timings::default();
    let extra = ["--waves", "1,60%,100%", "--spread-by", "zone"];
    let before = f.list_rollouts();
    let plan = f.plan("v2", &extra, &t);
    let planned = fleet::planned_waves(&plan["waves"]);
    assert_eq!(
        planned.iter().map(BTreeSet::len).collect::<Vec<_>>(),
        vec![1, 2, 2],
        "1, ceil(60% of 5) = 3 in total, then the rest: {plan}"
    );
    assert!(
        plan["skipped"].as_array().is_some_and(Vec::is_empty),
        "{plan}"
    );
    // Planning changed nothing.
    assert_eq!(f.list_rollouts(), before);

    // The text form names every host too.
    let mut text_args: Vec<String> = vec!["rollout".into(), "plan".into()];
    text_args.extend(f.spec_args("v2", &extra, &t));
    let text = f.cli(&text_args);
    assert_eq!(text.code, 0, "{text}");
    for h in &f.hosts {
        assert!(text.stdout.contains(h.id()), "{text}");
    }

    let id = f.start_rollout("v2", &extra, &t);
    let second = f.cli(&f.spec_args("v3", &[], &t).iter().fold(
        vec!["rollout".to_owned(), "start".to_owned()],
        |mut a, s| {
            a.push(s.clone());
            a
        },
    ));
    assert_eq!(second.code, 2, "{second}");
    assert!(
        second.stderr.contains("already has an active rollout") && second.stderr.contains(&id),
        "the refusal names the active rollout {id}: {second}"
    );
    let list = f.list_rollouts();
    assert_eq!(
        list.len(),
        before.len() + 1,
        "only the first start added a rollout: {list:?}"
    );
    assert!(
        list.iter().all(|(_, _, release)| release != "v3"),
        "{list:?}"
    );

    let s = f.wait_finished(&id, LONG);
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
    let ran = fleet::waves_run(&s);
    assert_eq!(planned, ran, "{}", describe_status(&s));
    // The hosts switched in the plan's order: every host of wave k before any of wave k+1.
    let hist = f.history();
    for w in 1..ran.len() {
        let latest_before = ran[w - 1]
            .iter()
            .filter_map(|h| hist.first_activation(f.index_of(h), "v2"))
            .max()
            .expect("earlier wave activated");
        for h in &ran[w] {
            let at = hist
                .first_activation(f.index_of(h), "v2")
                .expect("activated");
            assert!(at > latest_before, "{h} of wave {w} switched too early");
        }
    }

    // After the first rollout ended, the second one is accepted.
    let id3 = f.start_rollout("v3", &["--waves", "100%"], &t);
    let s = f.wait_finished(&id3, LONG);
    assert_eq!(s.state().as_str(), "succeeded", "{}", describe_status(&s));
}

/// Bad flags, bad specs and unknown names: exit 2, a message naming the problem, and nothing
/// changes (no rollout, no host touched).
#[test]
fn bad_input_fails_with_exit_2_and_changes_nothing() {
    let f = Fleet::start_bare("cli-bad", &["a", "b"]);
    f.push(&fleet::healthy(BASELINE));
    let t = Timings::default();

    // (extra flags, release, what stderr must mention)
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (vec!["--waves", "0%,100%"], BASELINE, "0%"),
        (vec!["--waves", "50%,10%,100%"], BASELINE, "grow"),
        (vec!["--waves", "1,abc"], BASELINE, "abc"),
        // Issue 6 finding 5: lists that do not grow on this fleet of two are refused by the
        // coordinator, naming the wave, instead of silently running fewer waves.
        (
            vec!["--waves", "1,40%,100%"],
            BASELINE,
            "waves[1]: \"40%\" is 1 host",
        ),
        (
            vec!["--waves", "10,5%,100%"],
            BASELINE,
            "does not grow on this fleet",
        ),
        (vec!["-l", "zone="], BASELINE, "selector"),
        (vec!["-l", "zone in (a"], BASELINE, "selector"),
        (vec!["--failure-threshold", "150%"], BASELINE, "150%"),
        (vec!["--max-unavailable", "0"], BASELINE, "max_unavailable"),
        (vec![], "v9", "v9"),
    ];
    for verb in ["plan", "start"] {
        for (extra, release, mention) in &cases {
            let mut args: Vec<String> = vec!["rollout".into(), verb.into()];
            args.extend(f.spec_args(release, extra, &t));
            let out = f.cli(&args);
            assert_eq!(out.code, 2, "bad input exits 2\n{out}");
            assert!(
                out.stderr.contains(mention),
                "the error mentions {mention:?}\n{out}"
            );
            assert!(out.stdout.trim().is_empty(), "nothing on stdout\n{out}");
        }
    }
    // Timings that contradict each other, an unknown service, an unparsable duration.
    let specials: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "rollout",
                "start",
                "--service",
                "demo",
                "--release",
                BASELINE,
                "--min-healthy",
                "10s",
                "--healthy-deadline",
                "5s",
            ],
            "min_healthy",
        ),
        (
            vec![
                "rollout",
                "start",
                "--service",
                "nosuch",
                "--release",
                BASELINE,
            ],
            "nosuch",
        ),
        (
            vec![
                "rollout",
                "start",
                "--service",
                "demo",
                "--release",
                BASELINE,
                "--bake",
                "abc",
            ],
            "abc",
        ),
        // Issue 6 finding 5: a duration a spec cannot carry is refused, not truncated to 0
        // (which the coordinator would read as "default: bake 30 s").
        (
            vec![
                "rollout",
                "start",
                "--service",
                "demo",
                "--release",
                BASELINE,
                "--bake",
                "500us",
                "--min-healthy",
                "500us",
            ],
            "whole number of milliseconds",
        ),
        (
            vec!["rollout", "start", "--service", "Bad!", "--release", "v1"],
            "service",
        ),
        (vec!["rollout", "status", "r-nope"], "r-nope"),
        (vec!["rollout", "pause", "r-nope"], "r-nope"),
        (vec!["rollout", "frobnicate"], "frobnicate"),
    ];
    for (args, mention) in &specials {
        let out = f.cli(args);
        assert_eq!(out.code, 2, "bad input exits 2\n{out}");
        assert!(
            out.stderr.contains(mention),
            "the error mentions {mention:?}\n{out}"
        );
    }

    // Nothing changed: no rollout, no host touched.
    assert!(f.list_rollouts().is_empty(), "{:?}", f.list_rollouts());
    for (i, h) in f.hosts.iter().enumerate() {
        assert_eq!(h.agent.current_release(), None, "host #{i}");
        assert!(h.agent.releases().is_empty(), "host #{i}");
    }

    // An unreachable coordinator is exit 1, not 2.
    let out = std::process::Command::new(serin_tests::binaries::serin())
        .args(["--coordinator", "http://127.0.0.1:1", "rollout", "list"])
        .output()
        .expect("running serin");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // And the spec that was refused for its typo works once fixed.
    let id = f.start_rollout(BASELINE, &["--waves", "100%"], &t);
    let s = f.wait_finished(&id, LONG);
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
}

/// The live view as an operator reads it, piped, against a real coordinator and agents: waves
/// count from 1 (the canary is wave 1), a successful rollout ends with every host confirmed (not
/// "healthy": the view waits for the last wave's confirmations), and after a rollback the canary
/// that had passed says it was rolled back instead of "passed … ok 0".
#[test]
fn the_live_view_counts_waves_from_one_and_says_what_happened() {
    let f = Fleet::start("cli-live-view", &["a", "b", "b"]);
    f.push(&fleet::healthy("v2"));
    f.push(&fleet::healthy("v3"));
    let t = Timings::default();
    let extra = ["--waves", "1,100%", "--spread-by", "zone"];
    let start = |release: &str| {
        let mut args: Vec<String> = vec!["rollout".into(), "start".into()];
        args.extend(f.spec_args(release, &extra, &t));
        args.extend(["--wait".into(), "--timeout".into(), "60s".into()]);
        f.cli(&args)
    };
    // The final status the view ends with: from its last "waves" heading on.
    let final_status = |out: &str| -> String {
        out.rsplit_once("\nwaves\n")
            .map(|(_, tail)| tail.to_string())
            .unwrap_or_else(|| panic!("no final status in:\n{out}"))
    };

    let ok = start("v2");
    assert_eq!(ok.code, 0, "{ok}\n{}", f.dump());
    assert!(!ok.stdout.contains("wave 0"), "{ok}");
    assert!(ok.stdout.contains("wave 1 (canary)"), "{ok}");
    let end = final_status(&ok.stdout);
    for h in &f.hosts {
        let row = end
            .lines()
            .find(|l| l.trim_start().starts_with(h.id()))
            .unwrap_or_else(|| panic!("no row for {} in:\n{end}", h.id()));
        assert!(row.contains("confirmed"), "{row}\n{ok}");
    }

    // v3 fails on the zone-b hosts: the zone-a canary passes, wave 2 fails, all roll back.
    for h in f.hosts.iter().filter(|h| h.zone == "b") {
        h.fail_release("v3");
    }
    let bad = start("v3");
    assert_eq!(bad.code, 3, "rolled back: {bad}\n{}", f.dump());
    let end = final_status(&bad.stdout);
    let canary = end
        .lines()
        .find(|l| l.trim_start().starts_with("wave 1 (canary)"))
        .unwrap_or_else(|| panic!("no canary line in:\n{end}"));
    assert!(
        canary.contains("rolled_back") && canary.contains("rolled back 1"),
        "{canary}\n{bad}"
    );
    assert!(!canary.contains("passed"), "{canary}\n{bad}");
    let second = end
        .lines()
        .find(|l| l.trim_start().starts_with("wave 2 "))
        .unwrap_or_else(|| panic!("no wave 2 line in:\n{end}"));
    assert!(second.contains("failed"), "{second}\n{bad}");
}
