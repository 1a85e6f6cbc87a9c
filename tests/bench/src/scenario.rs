//! The scenarios, one command each: `connect`, `broadcast`, `rollout`, `fanout`, `smoke`.
//!
//! Every scenario starts its own `serin serve` process with a fresh state directory, runs the
//! simulated fleet against it, and returns a [`Report`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::connect::{Connector, Transport};
use crate::control::Operator;
use crate::coordinator::{Coordinator, CoordinatorSettings, PeakRss, ProcSample};
use crate::fanout;
use crate::report::Report;
use crate::sim_agent::{Command, SimConfig};
use crate::stats::percentiles;
use crate::swarm::{Swarm, SwarmPlan};

/// What every fleet scenario needs.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The `serin` binary to run.
    pub serin: PathBuf,
    /// This executable (for worker processes).
    pub exe: PathBuf,
    /// Agents in all.
    pub agents: u32,
    /// Most agents per simulator process.
    pub per_process: u32,
    /// Coordinator timings.
    pub coordinator: CoordinatorSettings,
    /// Agent behaviour.
    pub sim: SimConfig,
    /// The same behaviour as worker arguments.
    pub sim_args: Vec<String>,
    /// Longest a connect or a rollout may take.
    pub timeout: Duration,
}

/// A coordinator with a connected fleet.
struct Running {
    coordinator: Coordinator,
    operator: Operator,
    swarm: Swarm,
    idle: ProcSample,
    connect_time: Duration,
}

impl Setup {
    fn params(&self, extra: serde_json::Value) -> serde_json::Value {
        let mut p = serde_json::json!({
            "agents": self.agents,
            "per_process": self.per_process,
            "heartbeat_ms": self.coordinator.heartbeat_interval.as_millis() as u64,
            "unreachable_after_ms": self.coordinator.unreachable_after.as_millis() as u64,
            "health_interval_ms": self.sim.health_interval.as_millis() as u64,
            "activate_delay_ms": self.sim.activate_delay.as_millis() as u64,
            "fetch": self.sim.fetch,
            "fail_rate": self.sim.fail_rate,
            "unhealthy_rate": self.sim.unhealthy_rate,
            "seed": self.sim.seed,
            "serin": self.serin.display().to_string(),
        });
        if let (Some(p), serde_json::Value::Object(e)) = (p.as_object_mut(), extra) {
            p.extend(e);
        }
        p
    }

    /// Starts the coordinator, measures it idle, starts the fleet and waits for every agent.
    async fn bring_up(&self) -> anyhow::Result<Running> {
        let coordinator = Coordinator::start(&self.serin, &self.coordinator)?;
        let connector = coordinator.connector();
        let operator = Operator::connect(&connector).await?;
        // Let start-up allocations settle before the idle sample.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = coordinator.sample()?;
        let plan = SwarmPlan {
            agents: self.agents,
            per_process: self.per_process,
        };
        let mut swarm = Swarm::start(
            &plan,
            &connector,
            Arc::new(self.sim.clone()),
            &self.exe,
            &self.sim_args,
        )?;
        let connect_time = match swarm
            .wait_connected(u64::from(self.agents), self.timeout)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                let tail = coordinator.log_tail(20);
                swarm.stop().await;
                return Err(e.context(format!("coordinator log tail:\n{tail}")));
            }
        };
        Ok(Running {
            coordinator,
            operator,
            swarm,
            idle,
            connect_time,
        })
    }
}

fn add_connect(report: &mut Report, setup: &Setup, run: &Running, loaded: &ProcSample) {
    let n = f64::from(setup.agents.max(1));
    report.add(
        "agents",
        "agents connected",
        f64::from(setup.agents),
        "",
        Some("19,900 measured; 50,000 projected"),
    );
    report.add(
        "processes",
        "simulator processes",
        run.swarm.processes() as f64,
        "",
        None,
    );
    report.add(
        "connect_s",
        "time to connect all agents",
        run.connect_time.as_secs_f64(),
        "s",
        None,
    );
    report.add(
        "rss_idle_mib",
        "coordinator RSS, no agents",
        run.idle.rss_bytes as f64 / 1048576.0,
        "MiB",
        None,
    );
    report.add(
        "rss_loaded_mib",
        "coordinator RSS, all agents",
        loaded.rss_bytes as f64 / 1048576.0,
        "MiB",
        None,
    );
    let per = loaded.rss_bytes.saturating_sub(run.idle.rss_bytes) as f64 / 1024.0 / n;
    report.add(
        "rss_per_agent_kib",
        "coordinator memory per agent",
        per,
        "KiB",
        Some("<= 24 KiB"),
    );
    report.add("fds", "coordinator open files", loaded.fds as f64, "", None);
    report.add(
        "rss_50k_projected_mib",
        "projected RSS at 50,000 agents",
        (run.idle.rss_bytes as f64 + per * 1024.0 * 50_000.0) / 1048576.0,
        "MiB",
        None,
    );
}

/// `connect`: attach the fleet; memory per agent, steady-state CPU, `ListHosts`, health ingest.
pub async fn connect(setup: &Setup, steady: Duration, burst: u32) -> anyhow::Result<Report> {
    let mut report = Report::new(
        "connect",
        setup.params(serde_json::json!({ "steady_s": steady.as_secs(), "burst": burst })),
    );
    let mut run = setup.bring_up().await?;
    // Connection set-up garbage, the first health round and every agent's first keepalive ping
    // settle first: the last agents attached ping one period after their welcome, and a window
    // that opens before would count only the pings of the agents attached early.
    tokio::time::sleep(Connector::KEEPALIVE_INTERVAL + Duration::from_secs(3)).await;
    let loaded = run.coordinator.sample()?;
    add_connect(&mut report, setup, &run, &loaded);
    let before = run.swarm.snapshot(false).await?;
    let cpu = run.coordinator.cpu_over(steady).await?;
    let after = run.swarm.snapshot(false).await?;
    report.add(
        "cpu_steady_pct",
        "coordinator CPU at steady state",
        cpu,
        "% core",
        Some("<= 10 %"),
    );
    // What the coordinator took in meanwhile: each message costs it a trip through h2, tonic
    // and rustls, so the rate bounds its steady CPU.
    let per_s = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / steady.as_secs_f64();
    report.add(
        "steady_heartbeats_per_s",
        "heartbeats sent/s at steady state",
        per_s(before.heartbeats, after.heartbeats),
        "/s",
        None,
    );
    report.add(
        "steady_health_per_s",
        "health reports sent/s at steady state",
        per_s(before.health_reports, after.health_reports),
        "/s",
        None,
    );
    let (hosts, took, bytes) = run.operator.list_hosts_summary().await?;
    anyhow::ensure!(
        hosts == setup.agents as usize,
        "the ListHosts summary counted {hosts} hosts of {}",
        setup.agents
    );
    report.add(
        "list_hosts_ms",
        "serin hosts (ListHosts: summary and first page)",
        took.as_secs_f64() * 1000.0,
        "ms",
        Some("< 500 ms"),
    );
    report.add(
        "list_hosts_kib",
        "serin hosts response size",
        bytes as f64 / 1024.0,
        "KiB",
        Some("never the 16 MiB limit"),
    );
    let (hosts, took, bytes) = run.operator.list_hosts().await?;
    anyhow::ensure!(
        hosts == setup.agents as usize,
        "ListHosts pages returned {hosts} hosts of {}",
        setup.agents
    );
    report.add(
        "list_hosts_all_ms",
        "serin hosts --all (every page of 2,000)",
        took.as_secs_f64() * 1000.0,
        "ms",
        None,
    );
    report.add(
        "list_hosts_page_mib",
        "largest ListHosts page",
        bytes as f64 / 1048576.0,
        "MiB",
        Some("never the 16 MiB limit"),
    );

    if burst > 0 {
        let before = run.swarm.snapshot(false).await?;
        let a = run.coordinator.sample()?;
        let t = Instant::now();
        run.swarm
            .command(Command::HealthBurst {
                round: 1,
                reports: burst,
            })
            .await?;
        // Sent when every agent finished its burst; ingested when the coordinator's CPU drops
        // back to its steady level (it reads what HTTP/2 flow control let through).
        let target = before.bursts_done + u64::from(setup.agents);
        loop {
            let s = run.swarm.snapshot(false).await?;
            if s.bursts_done >= target {
                break;
            }
            anyhow::ensure!(t.elapsed() < setup.timeout, "health burst did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sent = t.elapsed();
        let mut prev = run.coordinator.sample()?;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = run.coordinator.sample()?;
            if now.cpu_percent_since(&prev) <= (cpu * 2.0).max(5.0) || t.elapsed() > setup.timeout {
                break;
            }
            prev = now;
        }
        let ingested = prev.at.duration_since(a.at);
        let b = prev;
        let reports = f64::from(burst) * f64::from(setup.agents);
        report.add(
            "health_sent_per_s",
            "health reports sent/s (burst)",
            reports / sent.as_secs_f64(),
            "/s",
            None,
        );
        report.add(
            "health_ingested_per_s",
            "health reports ingested/s (burst)",
            reports / ingested.as_secs_f64(),
            "/s",
            None,
        );
        report.add(
            "cpu_load_pct",
            "coordinator CPU under health load",
            b.cpu_percent_since(&a),
            "% core",
            None,
        );
    }
    let snap = run.swarm.snapshot(false).await?;
    report.add(
        "reconnects",
        "agent attach retries (failed or lost)",
        snap.reconnects as f64,
        "",
        Some("0"),
    );
    if let Some((p50, p99, max)) = percentiles(&snap.attach_us) {
        report.add(
            "attach_p50_ms",
            "attach p50",
            p50 as f64 / 1000.0,
            "ms",
            None,
        );
        report.add(
            "attach_p99_ms",
            "attach p99",
            p99 as f64 / 1000.0,
            "ms",
            None,
        );
        report.add(
            "attach_max_ms",
            "attach max",
            max as f64 / 1000.0,
            "ms",
            None,
        );
    }
    run.swarm.stop().await;
    Ok(report)
}

/// The coordinator's CPU over an idle window of `default` (or `SERIN_BENCH_IDLE_S` seconds, to
/// profile it: the window's start and end are printed on stderr with the coordinator's pid).
async fn cpu_window(run: &Running, what: &str, default: Duration) -> anyhow::Result<f64> {
    let window = std::env::var("SERIN_BENCH_IDLE_S")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(default, Duration::from_secs);
    eprintln!(
        "cpu window {what}: {} s from now (coordinator pid {})",
        window.as_secs_f64(),
        run.coordinator.pid()
    );
    let cpu = run.coordinator.cpu_over(window).await?;
    eprintln!("cpu window {what}: done, {cpu:.1} % of a core");
    Ok(cpu)
}

/// Shared by `broadcast`, `rollout` and `smoke`: one rollout over the whole fleet.
async fn rollout_report(
    setup: &Setup,
    scenario: &str,
    waves: &[String],
    artifact: usize,
) -> anyhow::Result<Report> {
    let mut report = Report::new(
        scenario,
        setup.params(serde_json::json!({ "waves": waves, "artifact_bytes": artifact })),
    );
    let mut run = setup.bring_up().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = run.coordinator.sample()?;
    add_connect(&mut report, setup, &run, &loaded);
    let data: Vec<u8> = (0..artifact).map(|i| (i % 251) as u8).collect();
    run.operator.push("web-2", data).await?;
    let idle_cpu = cpu_window(&run, "before the rollout", Duration::from_secs(2)).await?;
    report.add(
        "cpu_before_pct",
        "coordinator CPU before the rollout",
        idle_cpu,
        "% core",
        None,
    );
    let before = run.swarm.snapshot(true).await?;
    let a = run.coordinator.sample()?;
    let result = run.operator.rollout("web-2", waves, setup.timeout).await;
    let b = run.coordinator.sample()?;
    let after = run.swarm.snapshot(true).await?;
    let ro = match result {
        Ok(ro) => ro,
        Err(e) => {
            // Keep what was measured: a rollout that does not finish is a figure too.
            report.add(
                "orders",
                "orders received by agents",
                (after.orders - before.orders) as f64,
                "",
                None,
            );
            report.add(
                "duplicates",
                "duplicate orders seen by agents",
                (after.duplicates - before.duplicates) as f64,
                "",
                Some("0"),
            );
            report.add(
                "confirm_timeouts",
                "dead-man switches fired",
                (after.confirm_timeouts - before.confirm_timeouts) as f64,
                "",
                Some("0"),
            );
            report.add(
                "cpu_rollout_pct",
                "coordinator CPU during the rollout",
                b.cpu_percent_since(&a),
                "% core",
                None,
            );
            let warnings = run
                .coordinator
                .log_tail(100_000)
                .lines()
                .filter(|l| l.contains("WARN"))
                .count();
            report.add(
                "coordinator_warnings",
                "coordinator warnings logged",
                warnings as f64,
                "",
                None,
            );
            report.notes.push(format!("{e:#}"));
            report.notes.push(format!(
                "coordinator log tail:\n{}",
                run.coordinator.log_tail(5)
            ));
            report.params["rollout_state"] = serde_json::json!("unfinished");
            run.swarm.stop().await;
            return Ok(report);
        }
    };
    report.add(
        "rollout_s",
        "rollout wall time (start to finished)",
        ro.wall.as_secs_f64(),
        "s",
        None,
    );
    for (i, (size, took)) in ro.waves.iter().enumerate() {
        report.add(
            &format!("wave{i}_ms"),
            &format!("wave {i} ({size} hosts)"),
            took.as_secs_f64() * 1000.0,
            "ms",
            None,
        );
    }
    report.add(
        "cpu_rollout_pct",
        "coordinator CPU during the rollout",
        b.cpu_percent_since(&a),
        "% core",
        None,
    );
    let lat: Vec<u64> = after
        .activate_received_us
        .iter()
        .map(|t| t.saturating_sub(ro.started_us))
        .collect();
    if waves.len() == 1 {
        if let Some((p50, p99, max)) = percentiles(&lat) {
            report.add(
                "order_p50_ms",
                "activate order latency p50",
                p50 as f64 / 1000.0,
                "ms",
                None,
            );
            report.add(
                "order_p99_ms",
                "activate order latency p99",
                p99 as f64 / 1000.0,
                "ms",
                None,
            );
            report.add(
                "order_max_ms",
                "activate order latency max",
                max as f64 / 1000.0,
                "ms",
                Some("< 1 s (all acknowledged)"),
            );
        }
        if let Some(last) = after.activate_acked_us.iter().max() {
            report.add(
                "all_acked_ms",
                "all activations acknowledged",
                last.saturating_sub(ro.started_us) as f64 / 1000.0,
                "ms",
                Some("< 1 s"),
            );
        }
    }
    report.add(
        "orders",
        "orders received by agents",
        (after.orders - before.orders) as f64,
        "",
        None,
    );
    report.add(
        "duplicates",
        "duplicate orders seen by agents",
        (after.duplicates - before.duplicates) as f64,
        "",
        Some("0"),
    );
    report.add(
        "fetched_bytes",
        "artifact bytes downloaded by agents",
        (after.fetched_bytes - before.fetched_bytes) as f64,
        "B",
        None,
    );
    report.add(
        "stale",
        "stale orders seen by agents",
        (after.stale - before.stale) as f64,
        "",
        Some("0"),
    );
    report.add(
        "confirm_timeouts",
        "dead-man switches fired",
        (after.confirm_timeouts - before.confirm_timeouts) as f64,
        "",
        Some("0"),
    );
    report.add(
        "reconnects",
        "agent attach retries during the rollout",
        (after.reconnects - before.reconnects) as f64,
        "",
        Some("0"),
    );
    // The last wave's hosts may still be `healthy` when the rollout is reported finished: their
    // confirms go out with the final decision.
    let done = ro
        .status
        .hosts
        .iter()
        .filter(|h| matches!(h.phase().as_str(), "healthy" | "confirmed"))
        .count();
    report.add(
        "hosts_done",
        "hosts healthy or confirmed on the release",
        done as f64,
        "",
        None,
    );
    report.notes.push(format!(
        "rollout {} ended {}: {}",
        ro.status.rollout_id,
        ro.status.state().as_str(),
        ro.status.reason
    ));
    if let Some(c) = ro.confirmed {
        report.add(
            "confirmed_s",
            "every host confirmed (from start)",
            c.as_secs_f64(),
            "s",
            None,
        );
    }
    report.add(
        "status_full_ms",
        "GetRollout, every host",
        ro.full_status.0.as_secs_f64() * 1000.0,
        "ms",
        Some("< 500 ms"),
    );
    report.add(
        "status_full_mib",
        "GetRollout size, every host",
        ro.full_status.1 as f64 / (1024.0 * 1024.0),
        "MiB",
        Some("< 16 MiB"),
    );
    report.add(
        "status_summary_ms",
        "GetRollout, summary (host_limit 1)",
        ro.summary_status.as_secs_f64() * 1000.0,
        "ms",
        Some("< 500 ms"),
    );
    let cpu_after = cpu_window(
        &run,
        "after every host was confirmed",
        Duration::from_secs(3),
    )
    .await?;
    report.add(
        "cpu_after_pct",
        "coordinator CPU after every host was confirmed",
        cpu_after,
        "% core",
        Some(&format!("= before ({idle_cpu:.1} %)")),
    );
    report.params["rollout_state"] = serde_json::json!(ro.status.state().as_str());
    run.swarm.stop().await;
    Ok(report)
}

/// `broadcast`: one activate order to every agent at once (one wave of 100 %).
pub async fn broadcast(setup: &Setup) -> anyhow::Result<Report> {
    rollout_report(setup, "broadcast", &["100%".to_string()], 1024).await
}

/// `rollout`: a no-op rollout (instant answers, 1 ms bake) over `waves`.
pub async fn rollout(setup: &Setup, waves: &[String], artifact: usize) -> anyhow::Result<Report> {
    rollout_report(setup, "rollout", waves, artifact).await
}

/// `smoke`: a small fleet, one rollout; fails unless it succeeds on every host.
pub async fn smoke(setup: &Setup) -> anyhow::Result<Report> {
    let waves: Vec<String> = ["1", "10%", "100%"].iter().map(|s| s.to_string()).collect();
    let report = rollout_report(setup, "smoke", &waves, 4096).await?;
    let state = report.params["rollout_state"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    anyhow::ensure!(
        state == "succeeded",
        "the smoke rollout ended {state}\n{}",
        report.table()
    );
    let done = report.get("hosts_done").unwrap_or(0.0);
    anyhow::ensure!(
        done as u32 == setup.agents,
        "only {done} of {} hosts ended healthy or confirmed\n{}",
        setup.agents,
        report.table()
    );
    Ok(report)
}

/// `fanout`: `clients` fetches of one `size_mib` artifact at once, beside a loopback copy.
pub async fn fanout(setup: &Setup, clients: u32, size_mib: u64) -> anyhow::Result<Report> {
    let mut report = Report::new(
        "fanout",
        serde_json::json!({ "clients": clients, "size_mib": size_mib, "serin": setup.serin.display().to_string() }),
    );
    let coordinator = Coordinator::start(&setup.serin, &setup.coordinator)?;
    let connector = coordinator.connector();
    let mut operator = Operator::connect(&connector).await?;
    let size = size_mib * 1024 * 1024;
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let release = operator
        .push("web-2", data)
        .await
        .context("pushing the fan-out artifact")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = coordinator.sample()?;
    // One checked download first: the bytes are right.
    let ch = connector.channel("verify").await?;
    crate::sim_agent::fetch(&ch, &release.sha256, size).await?;
    drop(ch);
    let peak = PeakRss::start(coordinator.pid());
    let (bytes, took) = fanout::fetch_all(&connector, &release.sha256, size, clients).await?;
    let peak = peak.finish().await;
    let (base_bytes, base_took) = fanout::loopback_copy(size, clients).await?;
    let tls_base = match connector.transport() {
        Transport::MutualTls(pki) => Some(fanout::tls_loopback_copy(pki, size, clients).await?),
        Transport::Plaintext => None,
    };
    let mibps = bytes as f64 / 1048576.0 / took.as_secs_f64();
    let base = base_bytes as f64 / 1048576.0 / base_took.as_secs_f64();
    report.add(
        "fetch_mib_s",
        "FetchArtifact aggregate",
        mibps,
        "MiB/s",
        None,
    );
    report.add(
        "loopback_mib_s",
        "plain loopback copy, same run",
        base,
        "MiB/s",
        None,
    );
    report.add(
        "fetch_vs_loopback_pct",
        "FetchArtifact / loopback",
        mibps / base * 100.0,
        "%",
        Some(">= 70 %"),
    );
    if let Some((tls_bytes, tls_took)) = tls_base {
        let tls = tls_bytes as f64 / 1048576.0 / tls_took.as_secs_f64();
        report.add(
            "tls_loopback_mib_s",
            "mutual TLS loopback copy, same run",
            tls,
            "MiB/s",
            None,
        );
        report.add(
            "fetch_vs_tls_loopback_pct",
            "FetchArtifact / mutual TLS loopback",
            mibps / tls * 100.0,
            "%",
            None,
        );
    }
    report.add(
        "rss_idle_mib",
        "coordinator RSS before",
        idle.rss_bytes as f64 / 1048576.0,
        "MiB",
        None,
    );
    report.add(
        "rss_peak_mib",
        "coordinator RSS peak while serving",
        peak as f64 / 1048576.0,
        "MiB",
        None,
    );
    report.add(
        "rss_growth_per_client_kib",
        "RSS growth per concurrent fetch",
        peak.saturating_sub(idle.rss_bytes) as f64 / 1024.0 / f64::from(clients.max(1)),
        "KiB",
        Some("independent of artifact size"),
    );
    Ok(report)
}
