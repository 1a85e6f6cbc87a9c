//! Message chaos (issue 8): orders (coordinator → agent) and results (agent → coordinator) are
//! dropped, duplicated, held back so that later ones overtake them, and delayed, by the test
//! builds of both daemons (`SERIN_CHAOS`, seeded by `SERIN_CHAOS_SEED`). The product's own
//! logic must absorb it: the agent deduplicates orders by sequence and answers a repeated order
//! with its results again, and the coordinator sends an order again when neither a send nor an
//! answer about it happened for a while (`rollout/task.rs`).
//!
//! Per seed, a fleet of four agents is bootstrapped cleanly, then every daemon is restarted as
//! its test build with the chaos on, and two rollouts run: a healthy release (succeeds) and a
//! release that fails on one host of the second wave (rolls back). Then, for each:
//!
//! - the end equals a clean run's: the same rollout state, every host on the same release
//!   (`current` complete and verified, the service answering it), the bad release never on a
//!   host past the second wave;
//! - each order took effect at most once on each agent: one activation sequence per host and
//!   rollout in the agent's journal (`state.json`), and `current` switched to the release at most
//!   once (and back at most once);
//! - every decision was taken once.
//!
//! CI runs the seeds in `SERIN_CHAOS_SEEDS` (default `1,2`), two at a time (`SERIN_FAULT_JOBS`):
//! one round on CI's two cores; `SERIN_CHAOS_LONG=N` runs N seeds from 1000 on instead, and
//! `SERIN_CHAOS_SPEC` replaces the default spec. At the end the test prints, always, the
//! injections of each kind counted in the daemons' logs, the runs and the violations, and the
//! seeds.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serin_tests::fleet::{self, Fleet, Timings, describe_status};
use serin_tests::{binaries, wait};

/// The chaos of a CI run, on both directions.
const DEFAULT_SPEC: &str = "dup:0.2,drop:0.1,delay:0-300ms,reorder:0.2";

const LONG: Duration = Duration::from_secs(120);

const TIMINGS: Timings = Timings {
    bake: "500ms",
    canary_bake: None,
    min_healthy: "300ms",
    // Lost results are recovered by re-sending the order (2 s, then 4 s, 8 s, ...): leave room.
    healthy_deadline: "30s",
    progress_deadline: "60s",
};

const SPEC: &[&str] = &["--waves", "1,50%,100%"];

const KINDS: [&str; 4] = ["drop", "dup", "reorder", "delay"];

fn seeds() -> Vec<u64> {
    if let Some(n) = std::env::var("SERIN_CHAOS_LONG")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return (1000..1000 + n).collect();
    }
    std::env::var("SERIN_CHAOS_SEEDS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Injections counted in one log, per direction and kind.
fn count_injections(log: &str, direction: &'static str, into: &mut BTreeMap<String, usize>) {
    for line in log.lines().filter(|l| l.contains("chaos injection")) {
        for kind in KINDS {
            if line.contains(&format!("chaos=\"{kind}\""))
                || line.contains(&format!("chaos={kind} "))
            {
                *into.entry(format!("{direction}-{kind}")).or_default() += 1;
            }
        }
    }
}

/// One seed's run: its injections, and its violation if any.
struct Run {
    seed: u64,
    injections: BTreeMap<String, usize>,
    result: Result<(), String>,
}

#[test]
fn message_chaos() {
    let spec = std::env::var("SERIN_CHAOS_SPEC").unwrap_or_else(|_| DEFAULT_SPEC.into());
    let jobs = std::env::var("SERIN_FAULT_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize)
        .max(1);
    let seeds = seeds();
    binaries::fault_coordinator();
    binaries::fault_agent();
    binaries::serin();
    let started = Instant::now();
    let queue = Mutex::new(seeds.clone());
    let runs: Mutex<Vec<Run>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let Some(seed) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
                        break;
                    };
                    let t = Instant::now();
                    let injections = Mutex::new(BTreeMap::new());
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        chaos_run(&spec, seed, &injections)
                    }))
                    .map_err(|p| {
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                            .unwrap_or_else(|| "panicked".to_owned())
                    });
                    eprintln!(
                        "message chaos: seed {seed:<6} {} in {:.1?}",
                        if result.is_ok() { "ok" } else { "VIOLATION" },
                        t.elapsed()
                    );
                    runs.lock().unwrap_or_else(|e| e.into_inner()).push(Run {
                        seed,
                        injections: injections.into_inner().unwrap_or_else(|e| e.into_inner()),
                        result,
                    });
                }
            });
        }
    });
    let mut runs = runs.into_inner().unwrap_or_else(|e| e.into_inner());
    runs.sort_by_key(|r| r.seed);
    let violating = runs.iter().filter(|r| r.result.is_err()).count();
    let mut summary = format!(
        "\nmessage chaos: {} seed(s) {:?}, spec {spec:?}, {jobs} at a time, {:.0?}\n  {:<14} {:>10} {:>6} {:>10}\n",
        runs.len(),
        runs.iter().map(|r| r.seed).collect::<Vec<_>>(),
        started.elapsed(),
        "kind",
        "injections",
        "runs",
        "violations"
    );
    let mut total = 0;
    for direction in ["order", "result"] {
        for kind in KINDS {
            let key = format!("{direction}-{kind}");
            let n: usize = runs
                .iter()
                .map(|r| r.injections.get(&key).copied().unwrap_or(0))
                .sum();
            total += n;
            summary += &format!("  {key:<14} {n:>10} {:>6} {violating:>10}\n", runs.len());
        }
    }
    summary += &format!(
        "  {:<14} {total:>10} {:>6} {violating:>10}\n",
        "total",
        runs.len()
    );
    {
        use std::io::Write;
        let _ = std::io::stderr().write_all(summary.as_bytes());
    }
    let violations: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            r.result
                .as_ref()
                .err()
                .map(|e| format!("=== seed {}: {e}", r.seed))
        })
        .collect();
    assert!(
        violations.is_empty(),
        "{} run(s) with violations:\n{}\n{summary}",
        violations.len(),
        violations.join("\n\n")
    );
    assert!(
        total > 0,
        "no chaos was injected: the check proves nothing\n{summary}"
    );
}

/// Turns the chaos on in every daemon of `f` (test builds), each host with its own seed.
fn chaos_on(f: &Fleet, spec: &str, seed: u64) {
    f.coord.set_binary(Some(binaries::fault_coordinator()));
    f.coord.set_env("SERIN_CHAOS", Some(spec));
    f.coord.set_env("SERIN_CHAOS_SEED", Some(&seed.to_string()));
    f.coord.restart();
    for (i, h) in f.hosts.iter().enumerate() {
        h.agent.set_env("SERIN_CHAOS", Some(spec));
        h.agent.set_env(
            "SERIN_CHAOS_SEED",
            Some(&(seed * 1000 + i as u64).to_string()),
        );
        h.agent.kill();
        h.agent.spawn_binary(&binaries::fault_agent(), None);
    }
    f.wait_connected(f.hosts.len());
}

fn chaos_run(spec: &str, seed: u64, injections: &Mutex<BTreeMap<String, usize>>) {
    let f = Fleet::start(&format!("chaos{seed}"), &["a", "b", "c", "a"]);
    chaos_on(&f, spec, seed);
    let count = || {
        let mut m = BTreeMap::new();
        count_injections(&f.coord.log(), "order", &mut m);
        for h in &f.hosts {
            count_injections(&h.agent.log(), "result", &mut m);
        }
        *injections.lock().unwrap_or_else(|e| e.into_inner()) = m;
    };

    // A healthy release: the clean run succeeds with every host on it.
    f.push(&fleet::healthy("v2"));
    let t0 = fleet::now_ms();
    let id = f.start_rollout("v2", SPEC, &TIMINGS);
    let s = f.wait_finished(&id, LONG);
    count();
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
    let s = f.wait_rollout(&id, "every host confirmed", LONG, |s| {
        s.hosts.iter().all(|h| h.phase().as_str() == "confirmed")
    });
    check_once(&f, &s, "v2", t0, &["v2"]);
    for i in 0..f.hosts.len() {
        f.wait_serving(i, "v2");
        f.hosts[i]
            .agent
            .verify_release("v2")
            .unwrap_or_else(|e| panic!("host #{i}: v2 incomplete: {e:#}"));
    }

    // A release failing on one host of the second wave: the clean run rolls back the canary and
    // the second wave, and every host serves v2 again.
    f.push(&fleet::healthy("v3"));
    let plan = f.plan("v3", SPEC, &TIMINGS);
    let waves = fleet::planned_waves(&plan["waves"]);
    let victim = f.index_of(waves[1].iter().next().expect("a second wave"));
    f.hosts[victim].fail_release("v3");
    let t1 = fleet::now_ms();
    let id3 = f.start_rollout("v3", SPEC, &TIMINGS);
    let s = f.wait_finished(&id3, LONG);
    count();
    let allowed: Vec<usize> = waves[0]
        .iter()
        .chain(waves[1].iter())
        .map(|h| f.index_of(h))
        .collect();
    assert_eq!(
        s.state().as_str(),
        "rolled_back",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
    for i in 0..f.hosts.len() {
        f.wait_serving(i, "v2");
        f.hosts[i]
            .agent
            .verify_release("v2")
            .unwrap_or_else(|e| panic!("host #{i}: v2 incomplete: {e:#}"));
        // Contained: the hosts past the failing wave never ran the release (they may have
        // staged it ahead of their wave: prepare, then activate).
        if !allowed.contains(&i) {
            let hist = f.history();
            assert!(
                !hist.ever_ran(i, "v3"),
                "host #{i} ran v3 though its wave never started\n{}",
                f.dump()
            );
        }
    }
    let s = f.wait_rollout(&id3, "every touched host rolled back", LONG, |s| {
        s.hosts
            .iter()
            .all(|h| matches!(h.phase().as_str(), "rolled_back" | "pending" | "skipped"))
    });
    check_once(&f, &s, "v3", t1, &["v3", "v2"]);
    assert_eq!(
        s.decisions
            .iter()
            .filter(|d| d.kind().as_str() == "rollback")
            .count(),
        1,
        "{}",
        describe_status(&s)
    );
    count();
    wait::wait_for(
        "the agents still attached",
        Duration::from_secs(10),
        &|| f.dump(),
        || {
            f.list_hosts()
                .is_ok_and(|hs| hs.iter().filter(|h| h.connected).count() == f.hosts.len())
        },
    );
}

/// Each order of rollout `s` took effect at most once on each host: one activation sequence of
/// `release` in the agent's journal, and since `since_ms` `current` switched to each of
/// `releases` at most once; every promote and the complete were decided once.
fn check_once(
    f: &Fleet,
    s: &serin_proto::wire::RolloutStatus,
    release: &str,
    since_ms: u64,
    releases: &[&str],
) {
    let hist = f.history();
    for h in &s.hosts {
        let i = f.index_of(&h.host_id);
        let seqs = f.agent_activation_seqs(i, &s.rollout_id, release);
        assert!(
            seqs.len() <= 1,
            "host #{i} activated {release} under sequences {seqs:?}: {:?}\n{}",
            f.agent_results(i, &s.rollout_id),
            f.dump()
        );
        for r in releases {
            let n = hist
                .transitions
                .iter()
                .filter(|t| {
                    t.host == i && t.at_unix_ms >= since_ms && t.current.as_deref() == Some(*r)
                })
                .count();
            assert!(
                n <= 1,
                "host #{i} switched to {r} {n} times in rollout {}\n{}",
                s.rollout_id,
                f.dump()
            );
        }
    }
    for w in 0..s.waves.len() as u32 {
        let n = s
            .decisions
            .iter()
            .filter(|d| d.kind().as_str() == "promote" && d.wave == w)
            .count();
        assert!(
            n <= 1,
            "wave {w} promoted {n} times\n{}",
            describe_status(s)
        );
    }
    let complete = s
        .decisions
        .iter()
        .filter(|d| d.kind().as_str() == "complete")
        .count();
    assert!(complete <= 1, "{}", describe_status(s));
}
