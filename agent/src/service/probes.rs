//! Health: one probe task per configured check plus a status poller, each tagged with the
//! process generation it observed, so no result about a previous process (or started before
//! the new one) counts for the new release; the checks' verdict; the observations fed to the
//! armed activation's dead-man switch; health reports.

use std::time::Duration;

use serin_proto::wire;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activation::{self, Activation, Observation};
use crate::config::CheckKind;
use crate::health::{self, ProbeResult};
use crate::release_store::unix_ms;
use crate::service_manager::ServiceStatus;

use super::{Input, ServiceTask, Upstream};

/// How long a health report waits for HAProxy's stats socket to give the request counter.
const REQUESTS_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// Which process the probes are about. Every (re)start of the service begins a new generation:
/// a probe result or status poll tagged with an older one describes a previous process (or was
/// started before the new one) and never counts. While a restart is under way the probes pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProbeEpoch {
    pub(super) generation: u64,
    pub(super) active: bool,
}

/// The first pause between the quick probes of a new process that has not passed yet.
const QUICK_FIRST: Duration = Duration::from_millis(5);

/// The longest pause between the quick probes during the first [`QUICK_FOR`] of a new
/// process: one that starts listening then is seen passing at most this much later (a pause
/// doubling from [`QUICK_FIRST`] saw a process listening at 80 ms only at 155 ms).
const QUICK_MAX: Duration = Duration::from_millis(10);

/// How long a new process that has not passed yet is probed every [`QUICK_MAX`] at most;
/// afterwards the pause doubles up to the check's interval, so a service that takes long to
/// start (or never does) costs a few probes, not a hundred a second.
const QUICK_FOR: Duration = Duration::from_secs(1);

/// One probe task: waits while the epoch is paused, probes at once at the start of each new
/// generation and then every `interval`, drops a probe in flight when the generation changes,
/// and hands each result with its generation to `deliver` (which returns false once the service
/// task is gone).
///
/// Until a new generation's first result that `passed` accepts, it probes again quickly
/// ([`QUICK_FIRST`], doubling up to [`QUICK_MAX`] during the generation's first [`QUICK_FOR`],
/// then doubling up to `interval`): a process that starts listening a few ms after the first
/// probe is seen healthy then, not one interval later (a 200 ms interval made every wave of a
/// small rollout 200 ms longer). Failures of those quick probes are delivered at most
/// once per `interval`, as without them, so a check's `failure_threshold` still means that many
/// intervals of failure.
pub(super) async fn probe_loop<T, P, PF, D, DF, OK>(
    mut epoch: watch::Receiver<ProbeEpoch>,
    token: CancellationToken,
    interval: Duration,
    probe: P,
    passed: OK,
    deliver: D,
) where
    P: Fn() -> PF,
    PF: std::future::Future<Output = T>,
    OK: Fn(&T) -> bool,
    D: Fn(u64, T) -> DF,
    DF: std::future::Future<Output = bool>,
{
    let mut next = tokio::time::Instant::now();
    // The generation the next three are about: whether it passed, when a result of it was
    // last delivered, and the next quick pause.
    let mut current: Option<u64> = None;
    let mut passed_once = false;
    let mut last_delivered: Option<tokio::time::Instant> = None;
    let mut quick = QUICK_FIRST;
    // When the generation began (its first probe): the quick probes stay at most `QUICK_MAX`
    // apart until `QUICK_FOR` after it.
    let mut began: Option<tokio::time::Instant> = None;
    loop {
        let ProbeEpoch { generation, active } = *epoch.borrow_and_update();
        if current != Some(generation) {
            current = Some(generation);
            passed_once = false;
            last_delivered = None;
            quick = QUICK_FIRST;
            began = None;
        }
        if !active {
            tokio::select! {
                _ = token.cancelled() => return,
                changed = epoch.changed() => if changed.is_err() { return },
            }
            next = tokio::time::Instant::now();
            continue;
        }
        tokio::select! {
            _ = token.cancelled() => return,
            changed = epoch.changed() => {
                if changed.is_err() {
                    return;
                }
                next = tokio::time::Instant::now();
                continue;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        let started = tokio::time::Instant::now();
        let began_at = *began.get_or_insert(started);
        let result = tokio::select! {
            _ = token.cancelled() => return,
            changed = epoch.changed() => {
                if changed.is_err() {
                    return;
                }
                // Started before the new generation: whatever it finds is not about it.
                next = tokio::time::Instant::now();
                continue;
            }
            r = probe() => r,
        };
        let now = tokio::time::Instant::now();
        let ok = passed(&result);
        let early = last_delivered.is_some_and(|t| now < t + interval);
        let hand_over = ok || passed_once || !early;
        if ok {
            passed_once = true;
        }
        next = if passed_once {
            started + interval
        } else {
            let pause = if now < began_at + QUICK_FOR {
                quick.min(QUICK_MAX)
            } else {
                quick
            };
            quick = (quick * 2).min(interval);
            (now + pause).min(started + interval)
        };
        if hand_over {
            last_delivered = Some(now);
            if !deliver(generation, result).await {
                return;
            }
        }
    }
}

impl ServiceTask {
    /// Probe tasks: one per configured check with a probe, plus the status poller. Each waits
    /// while the epoch is inactive, probes at once when a new generation begins (the first
    /// probe of a new process is not left to a free-running interval), abandons a probe in
    /// flight when the generation changes under it, and tags each result with its generation.
    pub(super) fn spawn_probes(
        &self,
        tracker: &TaskTracker,
        tx: &mpsc::Sender<Input>,
        shutdown: CancellationToken,
    ) -> CancellationToken {
        let token = shutdown.child_token();
        let mut status_every = Duration::from_secs(1);
        for (i, check) in self.cfg.checks.iter().enumerate() {
            status_every = status_every.min(check.interval);
            if matches!(check.kind, CheckKind::Restarts { .. }) {
                continue;
            }
            let (kind, interval, timeout) = (check.kind.clone(), check.interval, check.timeout);
            let tx = tx.clone();
            tracker.spawn(probe_loop(
                self.epoch.subscribe(),
                token.clone(),
                interval,
                move || {
                    let kind = kind.clone();
                    async move { health::probe(&kind, timeout).await }
                },
                |r: &ProbeResult| r.ok,
                move |generation, result| {
                    let tx = tx.clone();
                    async move {
                        tx.send(Input::Probe {
                            index: i + 1,
                            generation,
                            result,
                        })
                        .await
                        .is_ok()
                    }
                },
            ));
        }
        let status_every = status_every.max(Duration::from_millis(100));
        let (tx, manager) = (tx.clone(), self.manager.clone());
        tracker.spawn(probe_loop(
            self.epoch.subscribe(),
            token.clone(),
            status_every,
            move || {
                let manager = manager.clone();
                async move {
                    match manager.status().await {
                        Ok(s) => s,
                        Err(e) => ServiceStatus {
                            detail: e.to_string(),
                            ..Default::default()
                        },
                    }
                }
            },
            // Every status counts as it comes: no quick polls.
            |_: &ServiceStatus| true,
            move |generation, status| {
                let tx = tx.clone();
                async move { tx.send(Input::Status { generation, status }).await.is_ok() }
            },
        ));
        token
    }

    /// Pauses the probes: a restart is under way and nothing observed now describes the
    /// process that will run afterwards.
    pub(super) fn pause_probes(&mut self) {
        self.epoch.send_modify(|e| {
            e.generation += 1;
            e.active = false;
        });
    }

    /// A new process generation begins: every check forgets what it knew, results of earlier
    /// generations still queued are dropped, and the probes run at once.
    pub(super) fn new_generation(&mut self) {
        self.monitor.reset();
        self.last_verdict = activation::Verdict::Unknown;
        self.epoch.send_modify(|e| {
            e.generation += 1;
            e.active = true;
        });
    }

    /// The current process generation.
    pub(super) fn generation(&self) -> u64 {
        self.epoch.borrow().generation
    }

    /// Feeds the service manager's status into the process check and the `restarts` checks.
    pub(super) fn record_status(&mut self, status: ServiceStatus) {
        let restarts = status.restarts.saturating_sub(self.restart_baseline);
        let detail = if status.running {
            format!("running (pid {})", status.pid.unwrap_or(0))
        } else {
            status.detail.clone()
        };
        self.monitor.checks[0].record(ProbeResult {
            ok: status.running,
            latency: Duration::ZERO,
            detail,
        });
        for (i, check) in self.cfg.checks.iter().enumerate() {
            if let CheckKind::Restarts { max } = check.kind {
                self.monitor.checks[i + 1].record(ProbeResult {
                    ok: restarts <= max,
                    latency: Duration::ZERO,
                    detail: format!("{restarts} restarts since activation (max {max})"),
                });
            }
        }
        self.last_status = status;
    }

    /// After a new health observation: reports a changed verdict and feeds the armed activation.
    pub(super) async fn after_health(&mut self) {
        let verdict = self.monitor.verdict();
        if verdict != self.last_verdict {
            tracing::info!(service = self.name(), verdict = ?verdict, detail = %self.monitor.failing_detail(), "health changed");
            self.last_verdict = verdict;
            self.send_health().await;
            self.publish_inventory();
        }
        if self
            .state
            .activation
            .as_ref()
            .is_some_and(Activation::is_armed)
        {
            if verdict == activation::Verdict::Failing {
                // Before judging, look at the process itself: a release that crashed at start
                // is a failed start, not merely unhealthy.
                if let Ok(status) = self.manager.status().await {
                    self.record_status(status);
                }
            }
            let verdict = self.monitor.verdict();
            let observation = Observation {
                verdict,
                running: self.last_status.running,
                restarts: self
                    .last_status
                    .restarts
                    .saturating_sub(self.restart_baseline),
                detail: self.monitor.failing_detail(),
            };
            self.feed(activation::Input::Health {
                now_ms: unix_ms(),
                observation,
            })
            .await;
        }
    }

    /// Queues a full health report (dropped if the queue is full: only the latest matters),
    /// with the service's request counter read now (see [`Self::requests_total`]).
    pub(super) async fn send_health(&mut self) {
        let requests_total = self.requests_total().await;
        let restarts = self
            .last_status
            .restarts
            .saturating_sub(self.restart_baseline);
        let pid = if self.last_status.running {
            self.last_status.pid
        } else {
            None
        };
        let report = wire::HealthReport {
            service: self.name().to_string(),
            release: self.store.current().unwrap_or_default(),
            healthy: self.monitor.verdict() == activation::Verdict::Passing,
            verdict: self.monitor.verdict().to_wire() as i32,
            checks: self.monitor.checks.iter().map(|c| c.to_wire()).collect(),
            process: Some(self.ctx.metrics.process(pid, restarts)),
            host: Some(self.ctx.metrics.host()),
            observed_unix_ms: unix_ms(),
            requests_total,
        };
        let _ = self.ctx.upstream.try_send(Upstream::Health(report));
    }

    /// The service's request counter for the rollout's request gate: HAProxy's `stot` of this
    /// host's server, read fresh (at most [`REQUESTS_READ_TIMEOUT`]) when `[service.traffic]
    /// haproxy_socket` is configured; `None` without one, or when HAProxy does not answer (the
    /// gate then counts nothing for this report, never a guess).
    async fn requests_total(&mut self) -> Option<u64> {
        let server = self.cfg.traffic.haproxy.as_ref()?;
        match tokio::time::timeout(REQUESTS_READ_TIMEOUT, server.sessions()).await {
            Ok(Ok(s)) => Some(s.stot),
            Ok(Err(e)) => {
                tracing::debug!(service = self.name(), error = %e, "cannot read the request counter");
                None
            }
            Err(_) => {
                tracing::debug!(
                    service = self.name(),
                    "haproxy stats socket did not answer in time"
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe loop with an hour-long interval: it probes at once in each new generation, drops
    /// the probe that was in flight when the generation changed, and tags results correctly.
    #[tokio::test]
    async fn probes_run_at_once_in_a_new_generation_and_drop_probes_in_flight() {
        let epoch = watch::Sender::new(ProbeEpoch {
            generation: 0,
            active: true,
        });
        let token = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel::<(u64, u64)>(16);
        // Probe number n of the loop; the second one hangs until the generation changes.
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = calls.clone();
        let task = tokio::spawn(probe_loop(
            epoch.subscribe(),
            token.clone(),
            Duration::from_secs(3600),
            move || {
                let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if n == 1 {
                        std::future::pending::<()>().await;
                    }
                    n
                }
            },
            |_: &u64| true,
            move |generation, n| {
                let tx = tx.clone();
                async move { tx.send((generation, n)).await.is_ok() }
            },
        ));
        let within = Duration::from_secs(5);
        let first = tokio::time::timeout(within, rx.recv()).await.unwrap();
        assert_eq!(first, Some((0, 0)), "first probe at once, generation 0");

        // A restart: paused (no probes), then generation 2 with an immediate probe. That probe
        // hangs; the next generation abandons it and probes again at once.
        epoch.send_modify(|e| {
            e.generation = 1;
            e.active = false;
        });
        epoch.send_modify(|e| {
            e.generation = 2;
            e.active = true;
        });
        while calls.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        epoch.send_modify(|e| e.generation = 3);
        let next = tokio::time::timeout(within, rx.recv()).await.unwrap();
        assert_eq!(
            next,
            Some((3, 2)),
            "the hung probe of generation 2 was dropped, generation 3 probed at once"
        );
        token.cancel();
        task.await.unwrap();
    }

    /// A new process that starts listening a moment after the first probe: its first passing
    /// result arrives at once, not an interval (here an hour) later, and the failures of the
    /// quick probes before it are not delivered (only the first, as without them).
    #[tokio::test]
    async fn a_new_process_is_probed_again_quickly_until_it_first_passes() {
        let epoch = watch::Sender::new(ProbeEpoch {
            generation: 7,
            active: true,
        });
        let token = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel::<(u64, u64)>(16);
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = calls.clone();
        // Probes 0..4 fail (not listening yet), then every probe passes.
        let task = tokio::spawn(probe_loop(
            epoch.subscribe(),
            token.clone(),
            Duration::from_secs(3600),
            move || {
                let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move { n }
            },
            |n: &u64| *n >= 4,
            move |generation, n| {
                let tx = tx.clone();
                async move { tx.send((generation, n)).await.is_ok() }
            },
        ));
        let within = Duration::from_secs(5);
        let first = tokio::time::timeout(within, rx.recv()).await.unwrap();
        assert_eq!(first, Some((7, 0)), "the first probe's failure, at once");
        let passed = tokio::time::timeout(within, rx.recv()).await;
        assert_eq!(
            passed.ok().flatten(),
            Some((7, 4)),
            "the first pass arrives quickly; the quick failures 1..3 are not delivered"
        );
        // Passed: back to the interval, no more quick probes.
        tokio::task::yield_now().await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 5);
        assert!(rx.try_recv().is_err());
        token.cancel();
        task.await.unwrap();
    }

    /// A new process that starts listening 80 ms after its start (a service warming up on a
    /// busy host): its first pass is seen within a few ms of that moment, not at the next step
    /// of a doubling back-off (5, 15, 35, 75, then 155 ms: 75 ms late).
    // Paused time: the clock moves only when every task waits, so "within a few ms" is exact
    // whatever else the machine runs.
    #[tokio::test(start_paused = true)]
    async fn a_process_listening_after_a_while_is_seen_passing_within_a_few_ms() {
        let epoch = watch::Sender::new(ProbeEpoch {
            generation: 1,
            active: true,
        });
        let token = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel::<(u64, bool, tokio::time::Instant)>(16);
        let t0 = tokio::time::Instant::now();
        let listening_at = t0 + Duration::from_millis(80);
        let probes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let p = probes.clone();
        let task = tokio::spawn(probe_loop(
            epoch.subscribe(),
            token.clone(),
            Duration::from_millis(200),
            move || {
                p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move { tokio::time::Instant::now() >= listening_at }
            },
            |ok: &bool| *ok,
            move |generation, ok| {
                let tx = tx.clone();
                async move {
                    tx.send((generation, ok, tokio::time::Instant::now()))
                        .await
                        .is_ok()
                }
            },
        ));
        let within = Duration::from_secs(5);
        let first = tokio::time::timeout(within, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((first.0, first.1), (1, false), "the first probe's failure");
        let passed = tokio::time::timeout(within, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((passed.0, passed.1), (1, true), "then the first pass");
        let late = passed.2 - listening_at;
        // At most one quick pause late; the doubling back-off was 75 ms late.
        assert!(
            late <= QUICK_MAX,
            "the first pass was seen {late:?} after the process began listening"
        );
        // The quick probes stay cheap: one every few ms while it warms up, not a busy loop.
        let n = probes.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n <= 20, "{n} probes in 80 ms");
        token.cancel();
        task.await.unwrap();
    }

    /// A process that never starts listening: quick probes only during `QUICK_FOR`, then one
    /// per interval, and its failures still delivered at most once per interval (so
    /// `failure_threshold` keeps counting intervals).
    #[tokio::test(start_paused = true)]
    async fn a_process_that_never_listens_is_probed_quickly_only_at_first() {
        let epoch = watch::Sender::new(ProbeEpoch {
            generation: 1,
            active: true,
        });
        let token = CancellationToken::new();
        let (tx, mut rx) = mpsc::unbounded_channel::<tokio::time::Instant>();
        let probes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let p = probes.clone();
        let interval = Duration::from_millis(100);
        let task = tokio::spawn(probe_loop(
            epoch.subscribe(),
            token.clone(),
            interval,
            move || {
                p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { false }
            },
            |ok: &bool| *ok,
            move |_, _| {
                let tx = tx.clone();
                async move { tx.send(tokio::time::Instant::now()).is_ok() }
            },
        ));
        let t0 = tokio::time::Instant::now();
        // Not a synchronisation: the window whose probes are counted.
        tokio::time::sleep(QUICK_FOR + Duration::from_millis(500)).await;
        let n = probes.load(std::sync::atomic::Ordering::SeqCst);
        let quick_most = (QUICK_FOR.as_millis() / QUICK_FIRST.as_millis()) as u64;
        let slow_most = (t0.elapsed().saturating_sub(QUICK_FOR).as_millis() / 100) as u64;
        // Every 10 ms at most for a second: ~100 (the doubling back-off made ~15).
        assert!(n >= 40, "{n} probes: the quick probes did not run");
        assert!(
            n <= quick_most + slow_most + 2,
            "{n} probes in {:?}: quick probing did not slow down",
            t0.elapsed()
        );
        let mut delivered = Vec::new();
        while let Ok(at) = rx.try_recv() {
            delivered.push(at);
        }
        for pair in delivered.windows(2) {
            assert!(
                pair[1] - pair[0] >= interval,
                "two failures delivered {:?} apart",
                pair[1] - pair[0]
            );
        }
        token.cancel();
        task.await.unwrap();
    }
}
