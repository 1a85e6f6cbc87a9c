//! Fault injection for crash and watchdog tests.
//!
//! [`point`] marks a step of staging or activation. In builds with the `fault-injection` feature,
//! the environment variable `SERIN_AGENT_CRASH_AT=<point>[,<point>...]` makes the agent SIGKILL
//! itself the first time it reaches one of the named points, so tests can check that every step
//! is recoverable. [`wedge`] marks a place in a loop: with the feature, when the file named by
//! `SERIN_AGENT_WEDGE_FILE` exists and holds that place's name, the agent removes the file (so
//! the next agent process runs normally) and blocks the loop there for good: a wedged main loop,
//! which systemd's watchdog must restart.
//!
//! [`chaos`] decides the fate of each order result the agent sends: with
//! `SERIN_CHAOS=drop:P,dup:P,reorder:P,delay:A-Bms` and `SERIN_CHAOS_SEED=N` a result is dropped,
//! duplicated, held back until the next result overtook it, and/or delayed; every injection is
//! logged at warn level with `chaos = <kind>` (the coordinator's `fault.rs` does the same for
//! orders; the suites count both).
//!
//! Without the feature all of them compile to nothing, and the product binary does not even contain the
//! variables' names: no crate of the workspace enables the feature (cargo would unify it into
//! every workspace build); the test harness builds its agent with it in a target directory of its
//! own (`tests/src/binaries.rs`), and a test checks the product binary.

/// Marks the named step; see the module docs.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Marks the named place in a loop; see the module docs.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn wedge(_name: &str) {}

/// Marks the named step; see the module docs.
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    let Ok(points) = std::env::var("SERIN_AGENT_CRASH_AT") else {
        return;
    };
    if points.split(',').any(|p| p.trim() == name) {
        tracing::warn!(point = name, "fault injection: killing the agent");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        // raise(SIGKILL) does not return; make sure of it.
        std::process::abort();
    }
}

/// Marks the named place in a loop; see the module docs.
#[cfg(feature = "fault-injection")]
pub fn wedge(name: &str) {
    let Some(file) = std::env::var_os("SERIN_AGENT_WEDGE_FILE") else {
        return;
    };
    let wanted = |f: &std::ffi::OsStr| std::fs::read_to_string(f).is_ok_and(|s| s.trim() == name);
    if wanted(&file) {
        if let Err(e) = std::fs::remove_file(&file) {
            tracing::warn!(point = name, error = %e, "fault injection: cannot remove the wedge file");
        }
        tracing::warn!(point = name, "fault injection: wedging this loop");
        // Block this thread for good, as a deadlock would; only a restart ends it.
        loop {
            std::thread::park();
        }
    }
}

/// The message chaos on this agent's order results, if any; see the module docs.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn chaos() -> Option<&'static chaos_imp::Chaos> {
    None
}

#[cfg(not(feature = "fault-injection"))]
mod chaos_imp {
    /// Never built without the `fault-injection` feature.
    #[derive(Debug)]
    pub enum Chaos {}

    impl Chaos {
        /// Never called: there is no chaos in a product build.
        pub fn deliver(&self, _what: &str, _send: std::sync::Arc<dyn Fn() + Send + Sync>) {
            match *self {}
        }
    }
}

#[cfg(feature = "fault-injection")]
pub use chaos_imp::chaos;

#[cfg(feature = "fault-injection")]
mod chaos_imp {
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    type Send = Arc<dyn Fn() + std::marker::Send + Sync>;

    /// How long a result held back for a reorder waits for another one to overtake it.
    const HOLD_AT_MOST: Duration = Duration::from_millis(400);

    /// Probabilities and the delay range, parsed from `SERIN_CHAOS`.
    #[derive(Debug, Default)]
    struct Spec {
        drop: f64,
        dup: f64,
        reorder: f64,
        delay_ms: (u64, u64),
    }

    fn parse(s: &str) -> Result<Spec, String> {
        let mut spec = Spec::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once(':')
                .ok_or_else(|| format!("chaos element {item:?} is not KIND:VALUE"))?;
            let prob = |v: &str| {
                v.parse::<f64>()
                    .ok()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .ok_or_else(|| format!("chaos {k}: {v:?} is not a probability in 0..=1"))
            };
            match k {
                "drop" => spec.drop = prob(v)?,
                "dup" => spec.dup = prob(v)?,
                "reorder" => spec.reorder = prob(v)?,
                "delay" => {
                    let r = v.trim_end_matches("ms");
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    match (a.trim().parse::<u64>(), b.trim().parse::<u64>()) {
                        (Ok(a), Ok(b)) if a <= b => spec.delay_ms = (a, b),
                        _ => return Err(format!("chaos delay: {v:?} is not A-Bms with A <= B")),
                    }
                }
                other => return Err(format!("unknown chaos kind {other:?}")),
            }
        }
        Ok(spec)
    }

    struct State {
        rng: StdRng,
        held: Option<(u64, Send, Vec<Duration>)>,
        next_id: u64,
    }

    /// The chaos of this agent: the spec and one random stream.
    pub struct Chaos {
        spec: Spec,
        state: Arc<Mutex<State>>,
    }

    impl std::fmt::Debug for Chaos {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Chaos").field("spec", &self.spec).finish()
        }
    }

    /// The chaos configured by `SERIN_CHAOS` and `SERIN_CHAOS_SEED`, if any; a malformed
    /// variable aborts the start.
    pub fn chaos() -> Option<&'static Chaos> {
        static CHAOS: OnceLock<Option<Chaos>> = OnceLock::new();
        CHAOS
            .get_or_init(|| {
                let s = std::env::var("SERIN_CHAOS").ok()?;
                let spec = parse(&s).unwrap_or_else(|e| panic!("SERIN_CHAOS={s:?}: {e}"));
                let seed = std::env::var("SERIN_CHAOS_SEED")
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                tracing::warn!(?spec, seed, "fault injection: message chaos on results");
                Some(Chaos {
                    spec,
                    state: Arc::new(Mutex::new(State {
                        rng: StdRng::seed_from_u64(seed),
                        held: None,
                        next_id: 0,
                    })),
                })
            })
            .as_ref()
    }

    fn fire(send: &Send, delays: &[Duration]) {
        for d in delays {
            if d.is_zero() {
                send();
            } else {
                let (send, d) = (send.clone(), *d);
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    send();
                });
            }
        }
    }

    impl Chaos {
        /// Delivers one result (`what` names it in the log) through `send`, which may be called
        /// zero, one or two times, now or later (from a tokio task).
        pub fn deliver(&self, what: &str, send: Send) {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let s = &self.spec;
            if s.drop > 0.0 && st.rng.random_bool(s.drop) {
                tracing::warn!(chaos = "drop", what, "chaos injection");
                return;
            }
            let copies = if s.dup > 0.0 && st.rng.random_bool(s.dup) {
                tracing::warn!(chaos = "dup", what, "chaos injection");
                2
            } else {
                1
            };
            let delays: Vec<Duration> = (0..copies)
                .map(|_| {
                    let (a, b) = s.delay_ms;
                    Duration::from_millis(if b > 0 { st.rng.random_range(a..=b) } else { 0 })
                })
                .collect();
            if delays.iter().any(|d| !d.is_zero()) {
                tracing::warn!(chaos = "delay", what, ?delays, "chaos injection");
            }
            if st.held.is_none() && s.reorder > 0.0 && st.rng.random_bool(s.reorder) {
                tracing::warn!(chaos = "reorder", what, "chaos injection");
                let id = st.next_id;
                st.next_id += 1;
                st.held = Some((id, send, delays));
                let state = self.state.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(HOLD_AT_MOST).await;
                    let held = {
                        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                        if st.held.as_ref().is_some_and(|h| h.0 == id) {
                            st.held.take()
                        } else {
                            None
                        }
                    };
                    if let Some((_, send, delays)) = held {
                        fire(&send, &delays);
                    }
                });
                return;
            }
            let held = st.held.take();
            drop(st);
            fire(&send, &delays);
            if let Some((_, hsend, hdelays)) = held {
                let after =
                    delays.iter().max().copied().unwrap_or_default() + Duration::from_millis(1);
                let hdelays: Vec<Duration> = hdelays.into_iter().map(|d| d + after).collect();
                fire(&hsend, &hdelays);
            }
        }
    }
}
