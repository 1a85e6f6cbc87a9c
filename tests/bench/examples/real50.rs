//! `real50`: the 50-real-agent job of BENCHMARKS.md, a documented command rather than a timed
//! test (an example of the bench crate: `cargo test` compiles it, nothing runs it in CI):
//!
//! ```text
//! cargo build --release -p serin-cli -p serin-agent -p serin-tests --bins
//! SERIN_TESTS_SKIP_BUILD=1 cargo run --release -p serin-bench --example real50
//! ```
//!
//! (Without `SERIN_TESTS_SKIP_BUILD=1` the harness builds every binary of the workspace in the
//! example's profile first.)
//!
//! One real `serin serve` and 50 real `serin-agent` processes on loopback, every connection mTLS
//! (the harness's test PKI), each agent supervising the demo service ([`serin_tests::fleet`]).
//! After the fleet is up on its baseline release, each round pushes a new release of the demo
//! service (the stripped demo image, ~1–2 MB) and times `serin rollout start … --waves
//! 1,10%,50%,100% --bake 1ms --wait` (the CLI refuses a zero bake; 1 ms is the least) from the CLI's start to its exit, as an operator would see
//! it. It prints, per round, the wall time and when each wave started (ms after the CLI started,
//! from the rollout's own status), and keeps the coordinator's log (debug for the engine) at
//! `SERIN_BENCH_KEEP_LOG` when set (and four agents' logs at `PATH.agentN`), for the per-order
//! timings.
//!
//! `REAL50_ROUNDS` (default 3, at most 10) sets the number of rounds; `REAL50_MIN_HEALTHY`
//! (default `1ms`) the `--min-healthy` of each rollout; `REAL50_STAGE_AHEAD=N` runs the
//! coordinator with `[engine] stage_ahead = N` (0: no staging ahead, for an A/B of one build). The binaries are the profile this example
//! runs under (`--release` for the figures of BENCHMARKS.md).

use std::time::Instant;

use serin_tests::fleet::{self, Fleet, Timings};

fn main() {
    let hosts = 50;
    let rounds: usize = std::env::var("REAL50_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .clamp(1, 10);
    let min_healthy: &'static str = std::env::var("REAL50_MIN_HEALTHY")
        .ok()
        .map(|v| &*Box::leak(v.into_boxed_str()))
        .unwrap_or("1ms");
    let zones: Vec<String> = (0..hosts).map(|i| format!("z{}", i % 5)).collect();
    let zones: Vec<&str> = zones.iter().map(String::as_str).collect();
    let up = Instant::now();
    let f = Fleet::start("real50", &zones);
    if let Some(n) = std::env::var("REAL50_STAGE_AHEAD")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        let path = f.coord.config_path();
        let mut config = std::fs::read_to_string(path).expect("the coordinator's config");
        config.push_str(&format!("\n[engine]\nstage_ahead = {n}\n"));
        std::fs::write(path, config).expect("writing the coordinator's config");
        f.coord.restart();
        f.wait_connected(hosts);
        println!("real50: coordinator restarted with [engine] stage_ahead = {n}");
    }
    println!(
        "real50: {hosts} agents connected and on {} in {:.2} s",
        fleet::BASELINE,
        up.elapsed().as_secs_f64()
    );

    let timings = Timings {
        bake: "1ms",
        canary_bake: None,
        min_healthy,
        healthy_deadline: "20s",
        progress_deadline: "30s",
    };
    let mut walls = Vec::new();
    for round in 0..rounds {
        let id = format!("v{}", round + 2);
        let release = fleet::healthy(&id);
        f.push(&release);
        let mut args: Vec<String> = vec!["rollout".into(), "start".into()];
        args.extend(f.spec_args(&id, &["--waves", "1,10%,50%,100%", "--wait"], &timings));
        let started_ms = fleet::now_ms();
        let t = Instant::now();
        let out = f.cli(&args);
        let wall = t.elapsed();
        assert_eq!(out.code, 0, "rollout of {id} failed: {out}\n{}", f.dump());
        let rollout = f
            .list_rollouts()
            .into_iter()
            .find(|(_, _, release)| release == &id)
            .map(|(rid, _, _)| rid)
            .unwrap_or_else(|| panic!("no rollout of {id} listed"));
        let s = f
            .try_status(&rollout)
            .expect("the finished rollout's status");
        assert_eq!(s.state().as_str(), "succeeded", "{out}");
        let waves: Vec<String> = s
            .waves
            .iter()
            .map(|w| {
                format!(
                    "{}:{}h@{}ms",
                    w.index,
                    w.size,
                    w.started_unix_ms.saturating_sub(started_ms)
                )
            })
            .collect();
        println!(
            "real50 round {}: {id} ({} bytes) to {hosts} hosts in {:.3} s; waves started {}",
            round + 1,
            release.bytes.len(),
            wall.as_secs_f64(),
            waves.join(" ")
        );
        walls.push(wall.as_secs_f64());
    }
    for i in 0..hosts {
        f.wait_serving(i, &format!("v{}", rounds + 1));
    }
    walls.sort_by(f64::total_cmp);
    println!(
        "real50: {rounds} rounds, wall time min {:.3} s, median {:.3} s, max {:.3} s",
        walls[0],
        walls[walls.len() / 2],
        walls[walls.len() - 1]
    );
    if let Some(path) = std::env::var_os("SERIN_BENCH_KEEP_LOG") {
        std::fs::write(&path, f.coord.log()).expect("keeping the coordinator log");
        // One host of each wave's log beside it, for the agent's side of the timings.
        for i in [0, 1, hosts / 2, hosts - 1] {
            let mut p = std::path::PathBuf::from(&path).into_os_string();
            p.push(format!(".agent{i}"));
            std::fs::write(&p, f.hosts[i].agent.log()).expect("keeping an agent log");
        }
    }
}
