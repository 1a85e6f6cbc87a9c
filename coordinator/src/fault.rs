//! Fault injection for the coordinator's fault suite: crash points and message chaos.
//!
//! [`point`] marks a durable step (a store commit, an order handed to the fleet). In builds with
//! the `fault-injection` feature, `SERIN_COORDINATOR_CRASH_AT=<point>[:<nth>][,...]` makes the
//! coordinator abort (`std::process::abort()`, no destructors, no flush: as a power cut would
//! leave it, minus the page cache) the `nth` time (default: the first) it reaches the named
//! point. Core dumps are switched off first so an abort leaves no file behind. With
//! `SERIN_COORDINATOR_CRASH_ARMED=<file>` the points count only while that file exists, so a test
//! can let the coordinator start (and resume what it was doing) before the count begins.
//!
//! [`chaos`] decides the fate of each order the coordinator sends (`SERIN_CHAOS`, see
//! `serin_proto::chaos`): each host draws from its own random stream seeded by the seed and the
//! host id, so a host sees the same fates for the same sequence of orders.
//!
//! Without the feature [`point`] compiles to nothing and [`chaos`] to `None`, and the product
//! binary does not contain the variables' names: no crate of the workspace enables the feature
//! (cargo would unify it into every workspace build); the test harness builds this variant in a
//! target directory of its own (`tests/src/binaries.rs`), and `tests/tests/product_build.rs`
//! checks the product binary.

/// Marks the named step; see the module docs.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Marks the send of an order of `kind` (`activate`, `confirm`, `rollback`, ...): the point
/// `<kind>-before-send` (its decision and sequence are saved, nothing is handed to the fleet
/// yet) or `<kind>-after-send` (handed to the host's stream).
#[inline(always)]
pub fn order_point(kind: &str, after: bool) {
    #[cfg(feature = "fault-injection")]
    point(&format!(
        "{kind}-{}-send",
        if after { "after" } else { "before" }
    ));
    #[cfg(not(feature = "fault-injection"))]
    let _ = (kind, after);
}

/// The message chaos on the orders this coordinator sends, if any (`serin_proto::chaos`): each
/// host is a peer with its own random stream.
#[inline(always)]
pub fn chaos() -> Option<&'static serin_proto::chaos::Chaos> {
    serin_proto::chaos::chaos("orders")
}

#[cfg(feature = "fault-injection")]
pub use imp::point;

#[cfg(feature = "fault-injection")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    /// Marks the named step; see the module docs.
    pub fn point(name: &str) {
        static HITS: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
        let Ok(spec) = std::env::var("SERIN_COORDINATOR_CRASH_AT") else {
            return;
        };
        for p in spec.split(',') {
            let (pname, nth) = match p.trim().split_once(':') {
                Some((n, k)) => (n, k.trim().parse::<u32>().unwrap_or(1).max(1)),
                None => (p.trim(), 1),
            };
            if pname != name {
                continue;
            }
            if let Some(armed) = std::env::var_os("SERIN_COORDINATOR_CRASH_ARMED")
                && !std::path::Path::new(&armed).exists()
            {
                return;
            }
            let hit = {
                let mut hits = HITS
                    .get_or_init(Default::default)
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let n = hits.entry(name.to_owned()).or_default();
                *n += 1;
                *n
            };
            if hit == nth {
                tracing::warn!(
                    point = name,
                    nth,
                    "fault injection: aborting the coordinator"
                );
                eprintln!("fault injection: aborting the coordinator at {name}:{nth}");
                let _ =
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
                std::process::abort();
            }
        }
    }
}
