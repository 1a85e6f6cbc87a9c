//! Message chaos for the fault suites: the fate of each message a process sends.
//!
//! Test builds only. With the `chaos` feature (enabled by the agent's and the coordinator's
//! `fault-injection` features, which only the test harness turns on, in a target directory of its
//! own), `SERIN_CHAOS=drop:P,dup:P,reorder:P,delay:A-Bms` (any subset; probabilities in 0..=1)
//! and `SERIN_CHAOS_SEED=N` make [`Chaos::deliver`] drop a message, send it twice, hold it back
//! until the next message to the same peer overtook it, and/or delay it. Each peer draws from its
//! own random stream seeded by the seed and the peer's name, so a peer sees the same fates for the
//! same sequence of messages. Every injection is logged at warn level with `chaos = <kind>`,
//! which the suites count.
//!
//! Without the feature [`chaos`] is `None` and [`Chaos`] cannot be built: the product binaries
//! do not contain the variables' names (`tests/tests/product_build.rs` checks).

#[cfg(feature = "chaos")]
pub use imp::{Chaos, Spec, chaos};

/// The message chaos of this process, if any; `messages` names what it acts on in the log.
#[cfg(not(feature = "chaos"))]
#[inline(always)]
pub fn chaos(_messages: &str) -> Option<&'static Chaos> {
    None
}

/// Never built without the `chaos` feature.
#[cfg(not(feature = "chaos"))]
#[derive(Debug)]
pub enum Chaos {}

#[cfg(not(feature = "chaos"))]
impl Chaos {
    /// Never called: there is no chaos in a product build.
    pub fn deliver(&self, _peer: &str, _what: &str, _send: std::sync::Arc<dyn Fn() + Send + Sync>) {
        match *self {}
    }
}

#[cfg(feature = "chaos")]
mod imp {
    use std::collections::HashMap;
    use std::hash::{Hash, Hasher};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    /// Probabilities and delays of the message chaos, parsed from `SERIN_CHAOS`.
    #[derive(Debug, Clone, Default, PartialEq)]
    pub struct Spec {
        pub drop: f64,
        pub dup: f64,
        pub reorder: f64,
        /// Uniform delay range of every delivered copy, milliseconds.
        pub delay_ms: (u64, u64),
    }

    impl Spec {
        /// Parses `drop:0.1,dup:0.2,reorder:0.2,delay:0-300ms`; errors name the bad element.
        pub fn parse(s: &str) -> Result<Spec, String> {
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
                            _ => {
                                return Err(format!("chaos delay: {v:?} is not A-Bms with A <= B"));
                            }
                        }
                    }
                    other => return Err(format!("unknown chaos kind {other:?}")),
                }
            }
            Ok(spec)
        }
    }

    /// How long a message held back for a reorder waits for another one to overtake it.
    const HOLD_AT_MOST: Duration = Duration::from_millis(400);

    /// A deferred delivery of one message.
    type Send = Arc<dyn Fn() + std::marker::Send + Sync>;

    struct Peer {
        rng: StdRng,
        /// A message held back for a reorder: its id, delivery and delays.
        held: Option<(u64, Send, Vec<Duration>)>,
        next_id: u64,
    }

    /// The chaos of this process: the spec and one random stream per peer.
    pub struct Chaos {
        spec: Spec,
        seed: u64,
        peers: Arc<Mutex<HashMap<String, Peer>>>,
    }

    impl std::fmt::Debug for Chaos {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Chaos")
                .field("spec", &self.spec)
                .field("seed", &self.seed)
                .finish()
        }
    }

    /// The chaos configured by `SERIN_CHAOS` and `SERIN_CHAOS_SEED`, if any; `messages` names
    /// what it acts on in the log. A malformed variable aborts the start (a test asked for
    /// something it would not get).
    pub fn chaos(messages: &str) -> Option<&'static Chaos> {
        static CHAOS: OnceLock<Option<Chaos>> = OnceLock::new();
        CHAOS
            .get_or_init(|| {
                let s = std::env::var("SERIN_CHAOS").ok()?;
                let spec = Spec::parse(&s).unwrap_or_else(|e| panic!("SERIN_CHAOS={s:?}: {e}"));
                let seed = std::env::var("SERIN_CHAOS_SEED")
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                tracing::warn!(?spec, seed, messages, "fault injection: message chaos");
                Some(Chaos {
                    spec,
                    seed,
                    peers: Arc::new(Mutex::new(HashMap::new())),
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
        /// Delivers one message to `peer` (`what` names it in the log) through `send`, which
        /// may be called zero, one or two times, now or later (from a tokio task).
        pub fn deliver(&self, peer: &str, what: &str, send: Send) {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            let p = peers.entry(peer.to_owned()).or_insert_with(|| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                peer.hash(&mut h);
                Peer {
                    rng: StdRng::seed_from_u64(self.seed ^ h.finish()),
                    held: None,
                    next_id: 0,
                }
            });
            let s = &self.spec;
            if s.drop > 0.0 && p.rng.random_bool(s.drop) {
                tracing::warn!(chaos = "drop", peer, what, "chaos injection");
                return;
            }
            let copies = if s.dup > 0.0 && p.rng.random_bool(s.dup) {
                tracing::warn!(chaos = "dup", peer, what, "chaos injection");
                2
            } else {
                1
            };
            let delays: Vec<Duration> = (0..copies)
                .map(|_| {
                    let (a, b) = s.delay_ms;
                    Duration::from_millis(if b > 0 { p.rng.random_range(a..=b) } else { 0 })
                })
                .collect();
            if delays.iter().any(|d| !d.is_zero()) {
                tracing::warn!(chaos = "delay", peer, what, ?delays, "chaos injection");
            }
            if p.held.is_none() && s.reorder > 0.0 && p.rng.random_bool(s.reorder) {
                tracing::warn!(chaos = "reorder", peer, what, "chaos injection");
                let id = p.next_id;
                p.next_id += 1;
                p.held = Some((id, send, delays));
                // Nobody overtakes it within the hold: it goes out late, alone.
                let (peers, peer) = (self.peers.clone(), peer.to_owned());
                tokio::spawn(async move {
                    tokio::time::sleep(HOLD_AT_MOST).await;
                    let held = {
                        let mut peers = peers.lock().unwrap_or_else(|e| e.into_inner());
                        match peers.get_mut(&peer) {
                            Some(p) if p.held.as_ref().is_some_and(|h| h.0 == id) => p.held.take(),
                            _ => None,
                        }
                    };
                    if let Some((_, send, delays)) = held {
                        fire(&send, &delays);
                    }
                });
                return;
            }
            let held = p.held.take();
            drop(peers);
            fire(&send, &delays);
            if let Some((_, hsend, hdelays)) = held {
                // Behind the message that overtook it (and its own delay).
                let after =
                    delays.iter().max().copied().unwrap_or_default() + Duration::from_millis(1);
                let hdelays: Vec<Duration> = hdelays.into_iter().map(|d| d + after).collect();
                fire(&hsend, &hdelays);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::Spec;

        #[test]
        fn chaos_spec_parses_and_names_bad_elements() {
            let s = Spec::parse("dup:0.2,drop:0.1,delay:0-300ms,reorder:0.2").unwrap();
            assert_eq!(
                s,
                Spec {
                    drop: 0.1,
                    dup: 0.2,
                    reorder: 0.2,
                    delay_ms: (0, 300)
                }
            );
            assert!(Spec::parse("drop:2").unwrap_err().contains("drop"));
            assert!(Spec::parse("delay:300-0ms").unwrap_err().contains("delay"));
            assert!(Spec::parse("lose:0.1").unwrap_err().contains("lose"));
        }
    }
}
