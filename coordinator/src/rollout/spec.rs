//! The validated rollout spec: what an operator asked for, with defaults filled in.
//!
//! [`RolloutSpec`] is built from a [`RawSpec`] (which the control service fills from the wire)
//! with `TryFrom`; every error names the spec field
//! and the problem. Defaults (applied when a field is empty or zero):
//!
//! | field | default |
//! |---|---|
//! | `waves` | `1,25%,100%` |
//! | `bake` | 30 s; `canary_bake`: same as `bake` |
//! | `min_healthy` | 5 s |
//! | `healthy_deadline` | 2 min |
//! | `progress_deadline` | 10 min |
//! | `failure_threshold` | `0` (any failed host fails the wave) |
//! | `cumulative_failure_threshold` | none (only the per-wave threshold applies) |
//! | `unreachable_threshold` | `0` (any unreachable host makes the wave wait) |
//! | `max_unavailable`, `max_in_flight` | none (the whole wave at once) |
//! | `on_failure` | rollback |
//! | `min_requests` | none (a bake passes on time alone) |
//!
//! ## Waves
//!
//! Waves are **cumulative coverage targets** over the eligible hosts (selected, reachable,
//! healthy and not already on the release; see [`super::plan`]): `"1"` means "one host in total
//! so far", `"10%"` means `ceil(10% of eligible)` hosts in total so far. The first wave is the
//! canary. Each expression must grow: a later percentage must be larger than every earlier
//! percentage and a later count larger than every earlier count. The last wave must be `100%` or
//! a count; when a count (or a small fleet) leaves hosts uncovered, they form one extra final
//! wave. Waves that resolve to no new hosts (e.g. `1,10%` on 5 hosts) are dropped from the plan.
//!
//! ## Traffic weights
//!
//! `weights` gives each wave a load-balancer weight, one percent per wave (`5%,25%,50%,100%`), a
//! percent of each server's configured weight (HAProxy's agent-check percentages): a wave's hosts
//! are activated at their wave's weight and serve at it while the wave bakes, so its gate judges
//! them under that share of the load; a host goes to full weight (100%) when its wave passes (the
//! confirm order carries it). `canary_weight` is the shorthand for a weighted canary only: the
//! first wave at that weight, the others at 100%. Given both, the first weight must equal the
//! canary weight. A "rest" wave (hosts a count left uncovered) takes the last weight. Neither
//! given: orders carry no weight and the load balancer's weights are left as they are.
//!
//! ## Request gate
//!
//! `min_requests` (`--min-requests N`) makes each wave's bake count requests as well as time: the
//! bake passes only when its time is up and the wave's hosts served at least N requests since
//! their activation (the agents' request counters, see `machine::requests`). Too few when the
//! time is up: the rollout pauses with "insufficient data: n of N requests", never a pass; an
//! operator promotes or aborts. At most [`MAX_MIN_REQUESTS`].

use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use serin_proto::{ReleaseId, ServiceName, ValidationError};

use super::threshold::Limit;
use crate::selector::Selector;

pub use serin_proto::grammar::{MAX_TIMING, MAX_WAVES, WaveSize};

/// What to do when a wave's gate fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OnFailure {
    /// Roll every touched host back to its baseline, in parallel.
    Rollback,
    /// Stop and wait for an operator.
    Pause,
}

/// A spec as an operator wrote it (the control API's `RolloutSpec` fields, converted at the
/// wire edge) and as it is stored: text and milliseconds, every field optional (empty or 0 means
/// the default). [`RolloutSpec`] is its validated form.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RawSpec {
    pub service: String,
    pub release: String,
    pub selector: String,
    pub waves: Vec<String>,
    pub bake_ms: u64,
    pub canary_bake_ms: u64,
    pub min_healthy_ms: u64,
    pub healthy_deadline_ms: u64,
    pub progress_deadline_ms: u64,
    pub max_unavailable: String,
    pub max_in_flight: String,
    pub failure_threshold: String,
    pub cumulative_failure_threshold: String,
    /// [`ON_FAILURE_ROLLBACK`], [`ON_FAILURE_PAUSE`], or 0 for the default (rollback); the
    /// numbers of the wire enum `OnFailure`, so stored specs stay readable.
    pub on_failure: i32,
    pub spread_label: String,
    pub max_domains_in_flight: u32,
    pub unreachable_threshold: String,
    /// Traffic weight of the canary wave, e.g. `"5%"`; empty: none (see the module docs).
    #[serde(default)]
    pub canary_weight: String,
    /// Traffic weight of each wave, e.g. `["5%", "25%", "100%"]`; empty: none.
    #[serde(default)]
    pub weights: Vec<String>,
    /// Requests a wave's hosts must serve during its bake; 0: no request gate.
    #[serde(default)]
    pub min_requests: u64,
}

/// The largest `min_requests` accepted: a trillion requests, far beyond any bake, and small
/// enough that sums of counters never come near `u64::MAX`.
pub const MAX_MIN_REQUESTS: u64 = 1_000_000_000_000;

/// `RawSpec::on_failure` for "roll back" (as on the wire).
pub const ON_FAILURE_ROLLBACK: i32 = 1;
/// `RawSpec::on_failure` for "pause" (as on the wire).
pub const ON_FAILURE_PAUSE: i32 = 2;

/// A validated rollout spec.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    pub service: ServiceName,
    pub release: ReleaseId,
    /// The selector as parsed.
    pub selector: Selector,
    /// Cumulative coverage targets; the first is the canary.
    pub waves: Vec<WaveSize>,
    pub bake: Duration,
    pub canary_bake: Duration,
    /// How long a host must stay healthy before its agent reports it healthy.
    pub min_healthy: Duration,
    /// How long after activation a host has to become healthy.
    pub healthy_deadline: Duration,
    /// How long a wave may take from its start until every host is healthy.
    pub progress_deadline: Duration,
    pub max_unavailable: Option<Limit>,
    pub max_in_flight: Option<Limit>,
    /// Failed hosts allowed per wave (of the wave's size).
    pub failure_threshold: Limit,
    /// Failed hosts allowed over the whole rollout (of the rollout's size).
    pub cumulative_failure_threshold: Option<Limit>,
    /// Unreachable hosts allowed per wave before the wave waits.
    pub unreachable_threshold: Limit,
    pub on_failure: OnFailure,
    /// Label whose values are the failure domains cohorts are spread over.
    pub spread_label: Option<String>,
    /// At most this many failure domains with hosts in flight at once.
    pub max_domains_in_flight: Option<NonZeroU32>,
    /// The operator gave no wave list: the default adapts to small fleets (waves that add no
    /// host are left out) instead of being refused. Only planning reads it; the wire form and
    /// the stored spec spell the default waves out.
    pub default_waves: bool,
    /// Traffic weight (percent of the configured weight, 1..=100) of each wave's hosts while
    /// their wave bakes, one per spec wave; `None`: orders carry no weight.
    pub weights: Option<Vec<u8>>,
    /// Requests a wave's hosts must have served since their activation before its bake can
    /// pass; too few when the bake ends: "insufficient data", the rollout pauses. `None`: no
    /// request gate.
    pub min_requests: Option<NonZeroU64>,
}

fn timing(field: &str, ms: u64, default: Duration) -> Result<Duration, ValidationError> {
    serin_proto::grammar::timing_ms(field, ms, default)
}

fn fmt_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

fn optional_limit(field: &str, text: &str) -> Result<Option<Limit>, ValidationError> {
    if text.trim().is_empty() {
        Ok(None)
    } else {
        Limit::parse(field, text).map(Some)
    }
}

/// Parses and checks a wave list (see the module docs); empty is the default `1,25%,100%`.
pub fn parse_waves(texts: &[String]) -> Result<Vec<WaveSize>, ValidationError> {
    if texts.is_empty() {
        return Ok(vec![
            WaveSize::Count(1),
            WaveSize::Percent(25),
            WaveSize::Percent(100),
        ]);
    }
    serin_proto::grammar::parse_waves(texts)
}

fn parse_weight(field: &str, text: &str) -> Result<u8, ValidationError> {
    serin_proto::grammar::parse_weight_percent(field, text)
}

/// The per-wave weights of a spec (see the module docs): `weights` one per wave, or
/// `canary_weight` for the first wave and 100% for the others; neither: `None`.
pub fn parse_weights(
    canary_weight: &str,
    weights: &[String],
    waves: &[WaveSize],
) -> Result<Option<Vec<u8>>, ValidationError> {
    let canary = match canary_weight.trim() {
        "" => None,
        t => Some(parse_weight("canary_weight", t)?),
    };
    if weights.is_empty() {
        return Ok(canary.map(|c| {
            let mut all = vec![100; waves.len()];
            all[0] = c;
            all
        }));
    }
    let parsed = weights
        .iter()
        .enumerate()
        .map(|(i, w)| parse_weight(&format!("weights[{i}]"), w))
        .collect::<Result<Vec<u8>, _>>()?;
    if parsed.len() != waves.len() {
        let list: Vec<String> = waves.iter().map(ToString::to_string).collect();
        return Err(ValidationError::new(
            "weights",
            format!(
                "{} weights for {} waves ({}); give one weight per wave",
                parsed.len(),
                waves.len(),
                list.join(",")
            ),
        ));
    }
    if let Some(c) = canary
        && c != parsed[0]
    {
        return Err(ValidationError::new(
            "canary_weight",
            format!(
                "{c}% disagrees with the first of the weights ({}%); give one or make them equal",
                parsed[0]
            ),
        ));
    }
    Ok(Some(parsed))
}

impl TryFrom<RawSpec> for RolloutSpec {
    type Error = ValidationError;

    fn try_from(w: RawSpec) -> Result<Self, Self::Error> {
        let service = ServiceName::new(w.service.trim())?;
        let release = ReleaseId::new(w.release.trim())
            .map_err(|e| ValidationError::new("release", e.problem))?;
        let selector = Selector::parse(&w.selector)
            .map_err(|e| ValidationError::new("selector", e.to_string()))?;
        let waves = parse_waves(&w.waves)?;
        let weights = parse_weights(&w.canary_weight, &w.weights, &waves)?;
        let bake = timing("bake", w.bake_ms, Duration::from_secs(30))?;
        let canary_bake = timing("canary_bake", w.canary_bake_ms, bake)?;
        let min_healthy = timing("min_healthy", w.min_healthy_ms, Duration::from_secs(5))?;
        let healthy_deadline = timing(
            "healthy_deadline",
            w.healthy_deadline_ms,
            Duration::from_secs(120),
        )?;
        let progress_deadline = timing(
            "progress_deadline",
            w.progress_deadline_ms,
            Duration::from_secs(600),
        )?;
        if min_healthy >= healthy_deadline {
            return Err(ValidationError::new(
                "min_healthy",
                format!(
                    "{} must be shorter than healthy_deadline ({}), or no host could ever become healthy in time",
                    fmt_ms(min_healthy.as_millis() as u64),
                    fmt_ms(healthy_deadline.as_millis() as u64)
                ),
            ));
        }
        if progress_deadline < healthy_deadline {
            return Err(ValidationError::new(
                "progress_deadline",
                format!(
                    "{} must be at least healthy_deadline ({})",
                    fmt_ms(progress_deadline.as_millis() as u64),
                    fmt_ms(healthy_deadline.as_millis() as u64)
                ),
            ));
        }
        let max_unavailable = optional_limit("max_unavailable", &w.max_unavailable)?;
        let max_in_flight = optional_limit("max_in_flight", &w.max_in_flight)?;
        for (field, l) in [
            ("max_unavailable", max_unavailable),
            ("max_in_flight", max_in_flight),
        ] {
            if matches!(l, Some(Limit::Count(0)) | Some(Limit::Percent(0))) {
                return Err(ValidationError::new(
                    field,
                    "0 would never let a host be updated",
                ));
            }
        }
        let failure_threshold =
            optional_limit("failure_threshold", &w.failure_threshold)?.unwrap_or(Limit::Count(0));
        let cumulative_failure_threshold = optional_limit(
            "cumulative_failure_threshold",
            &w.cumulative_failure_threshold,
        )?;
        let unreachable_threshold =
            optional_limit("unreachable_threshold", &w.unreachable_threshold)?
                .unwrap_or(Limit::Count(0));
        let on_failure = match w.on_failure {
            0 | ON_FAILURE_ROLLBACK => OnFailure::Rollback,
            ON_FAILURE_PAUSE => OnFailure::Pause,
            _ => {
                return Err(ValidationError::new(
                    "on_failure",
                    format!("{} is not a known action (rollback or pause)", w.on_failure),
                ));
            }
        };
        if w.min_requests > MAX_MIN_REQUESTS {
            return Err(ValidationError::new(
                "min_requests",
                format!(
                    "{} is more requests than any bake could count (at most {MAX_MIN_REQUESTS})",
                    w.min_requests
                ),
            ));
        }
        let min_requests = NonZeroU64::new(w.min_requests);
        let spread_label = match w.spread_label.trim() {
            "" => None,
            l => {
                serin_proto::validate_label("spread_label", l, "")?;
                Some(l.to_string())
            }
        };
        Ok(Self {
            service,
            release,
            selector,
            waves,
            bake,
            canary_bake,
            min_healthy,
            healthy_deadline,
            progress_deadline,
            max_unavailable,
            max_in_flight,
            failure_threshold,
            cumulative_failure_threshold,
            unreachable_threshold,
            on_failure,
            spread_label,
            max_domains_in_flight: NonZeroU32::new(w.max_domains_in_flight),
            default_waves: w.waves.is_empty(),
            weights,
            min_requests,
        })
    }
}

impl RolloutSpec {
    /// The spec with every default spelled out, as shown to operators and stored.
    pub fn to_raw(&self) -> RawSpec {
        let ms = |d: Duration| d.as_millis() as u64;
        let lim = |l: Option<Limit>| l.map(|l| l.to_string()).unwrap_or_default();
        RawSpec {
            service: self.service.to_string(),
            release: self.release.to_string(),
            selector: self.selector.to_string(),
            waves: self.waves.iter().map(ToString::to_string).collect(),
            bake_ms: ms(self.bake),
            canary_bake_ms: ms(self.canary_bake),
            min_healthy_ms: ms(self.min_healthy),
            healthy_deadline_ms: ms(self.healthy_deadline),
            progress_deadline_ms: ms(self.progress_deadline),
            max_unavailable: lim(self.max_unavailable),
            max_in_flight: lim(self.max_in_flight),
            failure_threshold: self.failure_threshold.to_string(),
            cumulative_failure_threshold: lim(self.cumulative_failure_threshold),
            on_failure: match self.on_failure {
                OnFailure::Rollback => ON_FAILURE_ROLLBACK,
                OnFailure::Pause => ON_FAILURE_PAUSE,
            },
            spread_label: self.spread_label.clone().unwrap_or_default(),
            max_domains_in_flight: self.max_domains_in_flight.map_or(0, NonZeroU32::get),
            unreachable_threshold: self.unreachable_threshold.to_string(),
            canary_weight: String::new(),
            weights: self
                .weights
                .iter()
                .flatten()
                .map(|w| format!("{w}%"))
                .collect(),
            min_requests: self.min_requests.map_or(0, NonZeroU64::get),
        }
    }

    /// The traffic weight of the planned wave whose size expression is `size_expr` (a plan
    /// drops waves that add no host, so plan indices are not spec indices; expressions are
    /// unique because waves must grow). The "rest" wave takes the last weight. `None`: the
    /// spec gives no weights.
    pub fn weight_for_wave(&self, size_expr: &str) -> Option<u8> {
        let weights = self.weights.as_ref()?;
        let position = self
            .waves
            .iter()
            .position(|w| w.to_string() == size_expr)
            .unwrap_or(weights.len() - 1);
        weights.get(position).copied()
    }

    /// Bake time of wave `index` (the canary, index 0, uses `canary_bake`).
    pub fn bake_for(&self, index: usize) -> Duration {
        if index == 0 {
            self.canary_bake
        } else {
            self.bake
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn wire_spec(waves: &[&str]) -> RawSpec {
        RawSpec {
            service: "web".into(),
            release: "web-2".into(),
            waves: waves.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn err(w: RawSpec) -> ValidationError {
        RolloutSpec::try_from(w).unwrap_err()
    }

    #[test]
    fn defaults_are_filled_in() {
        let s = RolloutSpec::try_from(wire_spec(&[])).unwrap();
        assert_eq!(
            s.waves,
            vec![
                WaveSize::Count(1),
                WaveSize::Percent(25),
                WaveSize::Percent(100)
            ]
        );
        assert_eq!(s.bake, Duration::from_secs(30));
        assert_eq!(s.canary_bake, Duration::from_secs(30));
        assert_eq!(s.min_healthy, Duration::from_secs(5));
        assert_eq!(s.healthy_deadline, Duration::from_secs(120));
        assert_eq!(s.progress_deadline, Duration::from_secs(600));
        assert_eq!(s.failure_threshold, Limit::Count(0));
        assert_eq!(s.unreachable_threshold, Limit::Count(0));
        assert_eq!(s.cumulative_failure_threshold, None);
        assert_eq!(s.max_in_flight, None);
        assert_eq!(s.on_failure, OnFailure::Rollback);
        assert!(s.default_waves);
        // The wire form round-trips (spelling the default waves out).
        let back = RolloutSpec::try_from(s.to_raw()).unwrap();
        assert!(!back.default_waves);
        assert_eq!(
            RolloutSpec {
                default_waves: true,
                ..back
            },
            s
        );
    }

    #[test]
    fn canary_bake_defaults_to_bake() {
        let mut w = wire_spec(&[]);
        w.bake_ms = 7000;
        assert_eq!(
            RolloutSpec::try_from(w.clone()).unwrap().canary_bake,
            Duration::from_secs(7)
        );
        w.canary_bake_ms = 1000;
        let s = RolloutSpec::try_from(w).unwrap();
        assert_eq!(s.bake_for(0), Duration::from_secs(1));
        assert_eq!(s.bake_for(1), Duration::from_secs(7));
    }

    #[test]
    fn waves_reject_zero_garbage_and_overflow() {
        for (waves, field, needle) in [
            (&["0%", "100%"][..], "waves[0]", "0% covers no host"),
            (&["0", "100%"][..], "waves[0]", "0 covers no host"),
            (&["1", "150%"][..], "waves[1]", "more than 100%"),
            (&["1", "abc"][..], "waves[1]", "not a host count"),
            (&["1", "-3"][..], "waves[1]", "not a host count"),
            (&["1", "10 %%"][..], "waves[1]", "not a host count"),
        ] {
            let e = err(wire_spec(waves));
            assert_eq!(e.field, field, "{waves:?}: {e}");
            assert!(e.problem.contains(needle), "{waves:?}: {e}");
        }
    }

    #[test]
    fn waves_must_grow() {
        let e = err(wire_spec(&["10%", "10%", "100%"]));
        assert_eq!(e.field, "waves[1]");
        assert!(e.problem.contains("does not grow"), "{e}");
        let e = err(wire_spec(&["50%", "20%", "100%"]));
        assert_eq!(e.field, "waves[1]");
        let e = err(wire_spec(&["5", "1%", "3"]));
        assert_eq!(e.field, "waves[2]");
        assert!(
            e.problem.contains("earlier wave already covers 5 hosts"),
            "{e}"
        );
        // Counts and percents are not compared with each other.
        assert!(RolloutSpec::try_from(wire_spec(&["5", "1%", "100%"])).is_ok());
    }

    #[test]
    fn last_wave_must_be_all_or_a_count() {
        let e = err(wire_spec(&["1", "50%"]));
        assert_eq!(e.field, "waves[1]");
        assert!(e.problem.contains("last wave must be 100%"), "{e}");
        assert!(RolloutSpec::try_from(wire_spec(&["1", "5"])).is_ok());
    }

    #[test]
    fn wave_targets_round_up() {
        assert_eq!(WaveSize::Percent(10).target(7), 1);
        assert_eq!(WaveSize::Percent(10).target(10), 1);
        assert_eq!(WaveSize::Percent(10).target(11), 2);
        assert_eq!(WaveSize::Percent(100).target(7), 7);
        assert_eq!(WaveSize::Count(5).target(3), 3);
    }

    #[test]
    fn traffic_weights_one_per_wave() {
        // No weight: orders carry none.
        assert_eq!(RolloutSpec::try_from(wire_spec(&[])).unwrap().weights, None);
        // A canary weight: the first wave at it, the others at full weight.
        let mut w = wire_spec(&["1", "50%", "100%"]);
        w.canary_weight = "10%".into();
        let s = RolloutSpec::try_from(w).unwrap();
        assert_eq!(s.weights, Some(vec![10, 100, 100]));
        assert_eq!(s.weight_for_wave("1"), Some(10));
        assert_eq!(s.weight_for_wave("50%"), Some(100));
        // Stored spelled out, and read back the same.
        let raw = s.to_raw();
        assert_eq!(raw.weights, ["10%", "100%", "100%"]);
        assert_eq!(RolloutSpec::try_from(raw).unwrap().weights, s.weights);

        let mut w = wire_spec(&["1", "25%", "50%", "100%"]);
        w.weights = ["5%", "25%", "50%", "100%"].map(String::from).to_vec();
        let s = RolloutSpec::try_from(w.clone()).unwrap();
        assert_eq!(s.weights, Some(vec![5, 25, 50, 100]));
        assert_eq!(s.weight_for_wave("50%"), Some(50));
        // A count that leaves hosts uncovered makes a "rest" wave: the last weight.
        let mut c = wire_spec(&["1", "3"]);
        c.weights = vec!["5%".into(), "30%".into()];
        assert_eq!(
            RolloutSpec::try_from(c).unwrap().weight_for_wave("rest"),
            Some(30)
        );
        // Both given and equal: fine; disagreeing: refused, naming both.
        w.canary_weight = "5%".into();
        assert!(RolloutSpec::try_from(w.clone()).is_ok());
        w.canary_weight = "10%".into();
        let e = err(w);
        assert_eq!(e.field, "canary_weight");
        assert!(e.problem.contains("disagrees"), "{e}");
    }

    #[test]
    fn traffic_weights_are_refused_with_a_reason() {
        let mut w = wire_spec(&["1", "50%", "100%"]);
        w.weights = vec!["5%".into(), "100%".into()];
        let e = err(w);
        assert_eq!(e.field, "weights");
        assert!(
            e.problem.contains("2 weights for 3 waves (1,50%,100%)"),
            "{e}"
        );
        // The default waves count too.
        let mut w = wire_spec(&[]);
        w.weights = vec!["5%".into()];
        assert!(
            err(w)
                .problem
                .contains("1 weights for 3 waves (1,25%,100%)")
        );
        for (text, needle) in [
            ("5", "not a percent"),
            ("0%", "no traffic"),
            ("101%", "from 1% to 100%"),
            ("-3%", "from 1% to 100%"),
            ("lots%", "from 1% to 100%"),
        ] {
            let mut w = wire_spec(&[]);
            w.canary_weight = text.into();
            let e = err(w);
            assert_eq!(e.field, "canary_weight", "{text}");
            assert!(e.problem.contains(needle), "{text}: {e}");
        }
        let mut w = wire_spec(&["1", "100%"]);
        w.weights = vec!["5%".into(), "x".into()];
        assert_eq!(err(w).field, "weights[1]");
    }

    #[test]
    fn other_fields_are_named_in_errors() {
        let mut w = wire_spec(&[]);
        w.selector = "role=".into();
        let e = err(w);
        assert_eq!(e.field, "selector");
        assert!(e.problem.contains("malformed selector"), "{e}");

        let mut w = wire_spec(&[]);
        w.service = "Web!".into();
        assert_eq!(err(w).field, "service");

        let mut w = wire_spec(&[]);
        w.release = "../x".into();
        assert_eq!(err(w).field, "release");

        let mut w = wire_spec(&[]);
        w.failure_threshold = "lots".into();
        assert_eq!(err(w).field, "failure_threshold");

        let mut w = wire_spec(&[]);
        w.max_in_flight = "0".into();
        assert_eq!(err(w).field, "max_in_flight");

        let mut w = wire_spec(&[]);
        w.min_healthy_ms = 200_000;
        assert_eq!(err(w).field, "min_healthy");

        let mut w = wire_spec(&[]);
        w.progress_deadline_ms = 1000;
        assert_eq!(err(w).field, "progress_deadline");

        let mut w = wire_spec(&[]);
        w.bake_ms = 13 * 3600 * 1000;
        assert_eq!(err(w).field, "bake");

        let mut w = wire_spec(&[]);
        w.on_failure = 42;
        assert_eq!(err(w).field, "on_failure");

        let mut w = wire_spec(&[]);
        w.spread_label = "zo ne".into();
        assert_eq!(err(w).field, "spread_label");
    }

    #[test]
    fn min_requests_is_optional_kept_and_bounded() {
        assert_eq!(
            RolloutSpec::try_from(wire_spec(&[])).unwrap().min_requests,
            None
        );
        let mut w = wire_spec(&[]);
        w.min_requests = 500;
        let s = RolloutSpec::try_from(w).unwrap();
        assert_eq!(s.min_requests.map(NonZeroU64::get), Some(500));
        assert_eq!(s.to_raw().min_requests, 500);
        let mut w = wire_spec(&[]);
        w.min_requests = MAX_MIN_REQUESTS + 1;
        let e = err(w);
        assert_eq!(e.field, "min_requests");
        assert!(e.problem.contains("at most"), "{}", e.problem);
    }
}
