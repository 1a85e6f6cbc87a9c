//! Traffic through a real HAProxy (Debian's package, started on loopback by the test) whose four
//! servers are each polled through a real agent-check responder (`serin_agent::traffic`):
//! weighted canary share, a weight step within one agent-check interval, drain to zero sessions
//! under load, slow start, and the refusal to drain a backend's last serving server.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serin_agent::traffic::{
    AgentCheckResponder, DrainVerdict, DrainWait, SlowStart, TrafficHandle, TrafficState,
};
use serin_coordinator::haproxy::{HaproxyError, check_drain, weights_for_share};
use serin_tests::haproxy::{BACKEND, HOLD, Haproxy, NamedBackends, Server};
use serin_tests::load::LoadGen;
use serin_tests::wait::{wait_for, wait_for_value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const INTER: Duration = Duration::from_millis(500);
const NAMES: [&str; 4] = ["s1", "s2", "s3", "s4"];

/// Four named backends, one agent-check responder each, HAProxy in front.
struct Cluster {
    haproxy: Haproxy,
    handles: Vec<TrafficHandle>,
    _backends: NamedBackends,
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    tracker: TaskTracker,
    token: CancellationToken,
}

impl Cluster {
    fn start(states: Vec<TrafficState>, delay: Duration) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let backends = NamedBackends::start(&NAMES, delay).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let mut handles = Vec::new();
        let mut servers = Vec::new();
        for ((name, addr), state) in backends.servers.iter().zip(states) {
            let handle = TrafficHandle::new(state);
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let responder = {
                let _guard = rt.enter();
                AgentCheckResponder::spawn(name.clone(), listener, &handle, &tracker, token.clone())
                    .unwrap()
            };
            servers.push(Server {
                name: name.clone(),
                addr: *addr,
                agent: Some(responder.local_addr()),
            });
            handles.push(handle);
        }
        let haproxy = Haproxy::start(dir.path(), &servers, INTER).unwrap();
        Cluster {
            haproxy,
            handles,
            _backends: backends,
            _dir: dir,
            rt,
            tracker,
            token,
        }
    }

    fn frontend(&self) -> SocketAddr {
        self.haproxy.frontend
    }

    /// Waits until HAProxy shows `server` with `weight` (and, if given, `status`).
    fn wait_weight(&self, server: &str, weight: u32, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        wait_for(
            &format!("haproxy to show {server} at weight {weight}"),
            timeout,
            &|| format!("{:?}\n{}", self.haproxy.stats(), self.haproxy.log_tail()),
            || {
                self.haproxy
                    .server(server)
                    .is_ok_and(|s| s.weight == weight && s.status.starts_with("UP"))
            },
        );
        t0.elapsed()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.token.cancel();
        self.tracker.close();
        self.rt.block_on(self.tracker.wait());
    }
}

fn weighted(percent: u32) -> TrafficState {
    TrafficState::new(None).with_weight(percent).unwrap()
}

#[test]
fn a_canary_at_ten_percent_gets_ten_percent_and_a_ramp_step_lands_within_one_interval() {
    // One canary (s1) among four servers: 10 % of the traffic needs 33 % of its weight.
    let (canary, baseline) = weights_for_share(10, 1, 3).unwrap();
    assert_eq!((canary, baseline), (33, 100));
    let c = Cluster::start(
        vec![
            weighted(canary),
            weighted(baseline),
            weighted(baseline),
            weighted(baseline),
        ],
        Duration::ZERO,
    );
    c.wait_weight("s1", 33, Duration::from_secs(5));
    for s in &NAMES[1..] {
        c.wait_weight(s, 100, Duration::from_secs(5));
    }

    let t0 = Instant::now();
    let tally = LoadGen::new(c.frontend(), "/", 8).run(2_000);
    eprintln!("2000 requests in {:?}", t0.elapsed());
    assert_eq!(tally.failed(), 0, "{}", tally.summary());
    let share = *tally.ok_by_body.get("s1").unwrap_or(&0) as f64 * 100.0 / tally.ok() as f64;
    eprintln!(
        "canary at 10 %: {share:.2} % of {} requests ({:?})",
        tally.ok(),
        tally.ok_by_body
    );
    assert!(
        (8.0..=12.0).contains(&share),
        "canary share {share:.2} % is not within 10 ± 2 %: {}",
        tally.summary()
    );

    // Ramp step to 25 %: the canary goes to its full weight. HAProxy polls every 500 ms, so
    // the new weight must show within one interval (plus the runtime API poll).
    let (canary, _) = weights_for_share(25, 1, 3).unwrap();
    c.handles[0].set_weight(canary).unwrap();
    let took = c.wait_weight("s1", 100, INTER * 2);
    eprintln!("weight step applied by haproxy after {took:?} (agent-inter {INTER:?})");
    assert!(
        took <= INTER + Duration::from_millis(150),
        "the weight step took {took:?}, more than one agent-check interval ({INTER:?})"
    );
    let tally = LoadGen::new(c.frontend(), "/", 8).run(2_000);
    let share = *tally.ok_by_body.get("s1").unwrap_or(&0) as f64 * 100.0 / tally.ok() as f64;
    eprintln!("canary at 25 %: {share:.2} % of {} requests", tally.ok());
    assert_eq!(tally.failed(), 0, "{}", tally.summary());
    assert!((23.0..=27.0).contains(&share), "{}", tally.summary());
}

#[test]
fn a_drain_reaches_zero_sessions_under_load_without_a_failed_request_and_ready_undrains() {
    // Each answer takes 20 ms, so under load every server holds sessions.
    let c = Cluster::start(vec![weighted(100); 4], Duration::from_millis(20));
    for s in NAMES {
        c.wait_weight(s, 100, Duration::from_secs(5));
    }
    let load = LoadGen::new(c.frontend(), "/", 8).start();
    let dump = || format!("{:?}\n{}", c.haproxy.stats(), c.haproxy.log_tail());
    wait_for(
        "s1 to hold sessions under load",
        Duration::from_secs(10),
        &dump,
        || c.haproxy.server("s1").is_ok_and(|s| s.scur > 0),
    );

    let t0 = Instant::now();
    c.handles[0].update(TrafficState::drain);
    let stot_at_zero = wait_for_value(
        "s1 to drain to 0 sessions",
        Duration::from_secs(10),
        &dump,
        || {
            c.haproxy
                .server("s1")
                .ok()
                .filter(|s| s.status.starts_with("DRAIN") && s.scur == 0)
                .map(|s| s.stot)
        },
    );
    let drained_after = t0.elapsed();
    // Drained means no new sessions: while the load goes on, s1's total stays put.
    let sent = load.sent();
    wait_for(
        "more load to go through the others",
        Duration::from_secs(10),
        &dump,
        || load.sent() >= sent + 200,
    );
    let s1 = c.haproxy.server("s1").unwrap();
    assert_eq!(
        (s1.scur, s1.stot),
        (0, stot_at_zero),
        "a drained server got new sessions"
    );

    // `ready` (not `up`) brings it back.
    c.handles[0].update(TrafficState::ready);
    wait_for(
        "s1 to serve again after ready",
        Duration::from_secs(5),
        &dump,
        || c.haproxy.server("s1").is_ok_and(|s| s.stot > stot_at_zero),
    );
    let tally = load.stop();
    eprintln!(
        "drain under load: 0 sessions after {drained_after:?}; {}",
        tally.summary()
    );
    assert_eq!(tally.failed(), 0, "{}", tally.summary());
    assert!(tally.ok() > 200, "{}", tally.summary());
}

#[test]
fn refuses_to_drain_the_last_serving_server_of_the_backend() {
    let c = Cluster::start(vec![weighted(100); 4], Duration::ZERO);
    for s in NAMES {
        c.wait_weight(s, 100, Duration::from_secs(5));
    }
    let api = c.haproxy.api();
    // The coordinator checks the backend before it tells an agent to drain: while others serve,
    // draining s2 is allowed. (It tells the agent, not the runtime API: an agent answering
    // `ready` would undo a drain set through the runtime API at its next check.)
    check_drain(&c.haproxy.stats().unwrap(), BACKEND, "s2").unwrap();
    c.handles[1].update(TrafficState::drain);
    c.handles[2].update(TrafficState::drain);
    c.handles[3].update(TrafficState::maint);
    let dump = || format!("{:?}\n{}", c.haproxy.stats(), c.haproxy.log_tail());
    wait_for(
        "s2, s3, s4 out of rotation",
        Duration::from_secs(5),
        &dump,
        || {
            c.haproxy
                .stats()
                .is_ok_and(|st| st.iter().filter(|s| s.serving()).count() == 1)
        },
    );
    let e = c.haproxy.block_on(api.drain(BACKEND, "s1")).unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, HaproxyError::LastServing { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("refusing to drain be/s1: it is the last serving server of backend be"),
        "{e}"
    );
    // Nothing was drained: every request still succeeds, all on s1.
    let tally = LoadGen::new(c.frontend(), "/", 4).run(200);
    assert_eq!(tally.failed(), 0, "{}", tally.summary());
    assert_eq!(
        tally.ok_by_body.get("s1"),
        Some(&200),
        "{}",
        tally.summary()
    );
}

#[test]
fn slow_start_raises_the_new_host_weight_over_the_configured_time() {
    let ramp = SlowStart::new(10, Duration::from_secs(3)).unwrap();
    let c = Cluster::start(
        vec![
            TrafficState::new(Some(ramp)),
            weighted(100),
            weighted(100),
            weighted(100),
        ],
        Duration::ZERO,
    );
    c.wait_weight("s1", 100, Duration::from_secs(5));
    // A swap on s1: its weight drops to 10 % and climbs back to 100 % over 3 s.
    let t0 = Instant::now();
    c.handles[0].update(|s| s.swapped(Instant::now()));
    let mut seen = Vec::new();
    let dump = || format!("{:?}\n{}", c.haproxy.stats(), c.haproxy.log_tail());
    wait_for(
        "s1 back at full weight",
        Duration::from_secs(8),
        &dump,
        || {
            let w = c.haproxy.server("s1").map(|s| s.weight).unwrap_or(0);
            if seen.last() != Some(&(w)) {
                seen.push(w);
                eprintln!("{:>6} ms: s1 weight {w}", t0.elapsed().as_millis());
            }
            w == 100 && seen.len() > 2
        },
    );
    let took = t0.elapsed();
    let ramp_weights: Vec<u32> = seen.iter().copied().skip_while(|w| *w == 100).collect();
    assert!(
        ramp_weights.first().is_some_and(|w| *w <= 30),
        "no low weight after the swap: {seen:?}"
    );
    assert!(
        ramp_weights.windows(2).all(|w| w[0] < w[1]),
        "the weight did not rise steadily: {seen:?}"
    );
    assert!(
        ramp_weights.len() >= 4,
        "too few steps in the ramp: {seen:?}"
    );
    assert!(
        took >= Duration::from_millis(2_500) && took <= Duration::from_secs(3) + INTER * 2,
        "full weight after {took:?}, the ramp is 3 s: {seen:?}"
    );
}

#[test]
fn a_drain_held_open_by_a_client_times_out_and_says_so_then_the_client_still_gets_its_answer() {
    let c = Cluster::start(vec![weighted(100); 4], Duration::ZERO);
    for s in NAMES {
        c.wait_weight(s, 100, Duration::from_secs(5));
    }
    // A client holds a session open (its answer takes 3 s).
    let frontend = c.frontend();
    let held = std::thread::spawn(move || LoadGen::new(frontend, "/hold", 1).run(1));
    let dump = || format!("{:?}\n{}", c.haproxy.stats(), c.haproxy.log_tail());
    let busy = wait_for_value(
        "the held session on a server",
        Duration::from_secs(5),
        &dump,
        || c.haproxy.stats().ok()?.into_iter().find(|s| s.scur == 1),
    );
    let i = NAMES.iter().position(|n| *n == busy.server).unwrap();
    c.handles[i].update(TrafficState::drain);
    let wait = DrainWait::new(Instant::now(), Duration::from_secs(1));
    let verdict = wait_for_value("the drain to end", Duration::from_secs(5), &dump, || {
        let s = c.haproxy.server(&busy.server).ok()?;
        match wait.decide(Instant::now(), s.scur) {
            DrainVerdict::Wait => None,
            v => Some(v),
        }
    });
    eprintln!("{}: {}", busy.server, verdict.evidence());
    match verdict {
        DrainVerdict::TimedOut { after, sessions } => {
            assert_eq!(sessions, 1);
            assert!(after >= Duration::from_secs(1) && after < HOLD, "{after:?}");
        }
        other => panic!("the held session did not hold the drain: {other:?}"),
    }
    assert!(
        verdict.evidence().starts_with("drain timed out after 1."),
        "{}",
        verdict.evidence()
    );
    // Draining never cut the held session: the client gets its answer.
    let tally = held.join().unwrap();
    assert_eq!(
        tally.ok_by_body.get(&busy.server),
        Some(&1),
        "{}",
        tally.summary()
    );
}
