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
//! from the rollout's own status), then per round a timeline per wave (the [`timeline`] module:
//! median/max over the wave's hosts, ms after the CLI started, of each step from the activate
//! order sent to the activation finished, parsed from the coordinator's and every agent's log),
//! and keeps the coordinator's log (debug for the engine) at
//! `SERIN_BENCH_KEEP_LOG` when set (and four agents' logs at `PATH.agentN`), for the per-order
//! timings.
//!
//! `REAL50_ROUNDS` (default 3, at most 10) sets the number of rounds; `REAL50_MIN_HEALTHY`
//! (default `1ms`) the `--min-healthy` of each rollout; `REAL50_STAGE_AHEAD=N` runs the
//! coordinator with `[engine] stage_ahead = N` (0: no staging ahead, for an A/B of one build). The binaries are the profile this example
//! runs under (`--release` for the figures of BENCHMARKS.md).

use std::time::Instant;

use serin_tests::fleet::{self, Fleet, Timings};

/// One round for the timeline: the release, when the CLI started (unix ms), each host's wave.
type Round = (String, u64, Vec<(String, u32)>);

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
    let f = Fleet::start_for_timing("real50", &zones);
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
    // Per round: the release, when the CLI started (unix ms) and each host's wave.
    let mut rounds_seen: Vec<Round> = Vec::new();
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
        rounds_seen.push((
            id.clone(),
            started_ms,
            s.hosts
                .iter()
                .map(|h| (h.host_id.clone(), h.wave))
                .collect(),
        ));
    }
    for i in 0..hosts {
        f.wait_serving(i, &format!("v{}", rounds + 1));
    }
    let walls_in_order = walls.clone();
    walls.sort_by(f64::total_cmp);
    println!(
        "real50: {rounds} rounds, wall time min {:.3} s, median {:.3} s, max {:.3} s",
        walls[0],
        walls[walls.len() / 2],
        walls[walls.len() - 1]
    );
    // The timeline of each round, from the logs.
    let coordinator_log = f.coord.log();
    let agent_logs: std::collections::HashMap<String, String> = f
        .hosts
        .iter()
        .map(|h| (h.agent.host_id.clone(), h.agent.log()))
        .collect();
    for (r, (id, from, hosts_waves)) in rounds_seen.iter().enumerate() {
        let to = rounds_seen
            .get(r + 1)
            .map_or(from + 60_000, |(_, next, _)| *next);
        let mut waves = std::collections::BTreeMap::new();
        for (host, wave) in hosts_waves {
            let steps = timeline::host_steps(
                &coordinator_log,
                host,
                agent_logs.get(host).map_or("", String::as_str),
                id,
                *from,
                to,
            );
            waves.entry(*wave).or_insert_with(Vec::new).push(steps);
        }
        println!(
            "real50 round {} timeline ({id}, CLI exit at {} ms):",
            r + 1,
            (walls_in_order[r] * 1000.0) as u64
        );
        timeline::print(&waves);
    }
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

/// The per-wave timeline of one round, from the coordinator's log (debug: "order sent") and
/// every agent's log (info: order received, staged, swapped, started, first pass, results).
mod timeline {
    use std::collections::BTreeMap;

    /// Unix ms of a log line's RFC 3339 timestamp (`2026-11-28T00:44:23.123456Z …`).
    pub fn line_ms(line: &str) -> Option<u64> {
        let ts = line.split_whitespace().next()?;
        let ts = ts.strip_suffix('Z')?;
        let (date, time) = ts.split_once('T')?;
        let mut d = date.split('-').map(|p| p.parse::<i64>());
        let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
        let mut t = time.split(':');
        let (hh, mm) = (
            t.next()?.parse::<u64>().ok()?,
            t.next()?.parse::<u64>().ok()?,
        );
        let secs: f64 = t.next()?.parse().ok()?;
        // Days since the epoch of a civil date (Howard Hinnant's algorithm).
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + dd - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = (era * 146_097 + doe - 719_468) as u64;
        Some(days * 86_400_000 + (hh * 3600 + mm * 60) * 1000 + (secs * 1000.0) as u64)
    }

    /// The value of `key=` in a log line, quotes removed.
    pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
        let at = line.find(&format!(" {key}="))? + key.len() + 2;
        let rest = &line[at..];
        let v = rest.split_whitespace().next()?;
        Some(v.trim_matches('"'))
    }

    /// The steps of one host's activation, ms after the CLI started.
    pub const STEPS: [&str; 9] = [
        "sent", "received", "staged", "swapped", "started", "passed", "healthy", "confirm",
        "finished",
    ];

    /// The first time each step happened for one host in `[from, to)` (unix ms), as offsets
    /// from `from`.
    pub fn host_steps(
        coordinator: &str,
        host: &str,
        agent: &str,
        release: &str,
        from: u64,
        to: u64,
    ) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        let mut note = |step: &'static str, at: u64| {
            out.entry(step).or_insert(at - from);
        };
        for line in coordinator.lines() {
            let Some(at) = line_ms(line).filter(|t| (from..to).contains(t)) else {
                continue;
            };
            if line.contains("order sent")
                && field(line, "host") == Some(host)
                && field(line, "order") == Some("activate")
            {
                note("sent", at);
            }
        }
        let mut started = false;
        for line in agent.lines() {
            let Some(at) = line_ms(line).filter(|t| (from..to).contains(t)) else {
                continue;
            };
            let is_release = field(line, "release") == Some(release);
            if line.contains("order received") {
                match field(line, "action") {
                    Some("activate") => note("received", at),
                    Some("confirm") => note("confirm", at),
                    _ => {}
                }
            } else if line.contains("release staged") && is_release {
                note("staged", at);
            } else if line.contains("current swapped") && is_release {
                note("swapped", at);
            } else if line.contains("service process started") && is_release {
                started = true;
                note("started", at);
            } else if started
                && line.contains("health changed")
                && field(line, "verdict") == Some("Passing")
            {
                note("passed", at);
            } else if line.contains("order result") && field(line, "phase") == Some("Healthy") {
                note("healthy", at);
            } else if line.contains("activation finished") && is_release {
                note("finished", at);
            }
        }
        out
    }

    /// One line per wave: the median and max of each step over the wave's hosts.
    pub fn print(waves: &BTreeMap<u32, Vec<BTreeMap<&'static str, u64>>>) {
        for (wave, hosts) in waves {
            let mut cells = Vec::new();
            for step in STEPS {
                let mut v: Vec<u64> = hosts.iter().filter_map(|h| h.get(step).copied()).collect();
                if v.is_empty() {
                    cells.push(format!("{step} -"));
                    continue;
                }
                v.sort_unstable();
                cells.push(format!("{step} {}/{}", v[v.len() / 2], v[v.len() - 1]));
            }
            println!(
                "  wave {wave} ({} hosts), ms after the CLI started, median/max: {}",
                hosts.len(),
                cells.join(", ")
            );
        }
    }
}
