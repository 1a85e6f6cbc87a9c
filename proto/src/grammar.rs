//! The value grammar shared by the coordinator's spec validation and the CLI's argument parsers:
//! host counts and percentages ([`Limit`]), wave sizes and wave lists ([`WaveSize`],
//! [`parse_wave_list`], [`check_waves`]), durations ([`parse_duration`], [`timing_ms`]) and
//! traffic weights ([`parse_weight_percent`]).
//!
//! One grammar means the CLI cannot accept what the coordinator refuses, or the other way round:
//! `10 %` is a percentage for both, `500us` is refused by both.
//!
//! ## Durations
//!
//! A spec carries durations in whole milliseconds, and 0 means "the coordinator's default". A
//! duration that is not a whole number of milliseconds (`500us`, `1500us`) cannot be carried
//! without changing what the operator asked for, so [`parse_duration`] refuses it instead of
//! truncating it (truncated to 0 it would silently become the default). Zero is refused too: it
//! would read as "unset". (The alternative, optional fields on the wire, would keep `0` as a
//! value but change every stored spec; refusing is the smaller, explicit change.)
//!
//! ## Limits
//!
//! A [`Limit`] is either a host count (`"2"`) or a percentage (`"10%"`, `"10 %"`) of some number
//! of hosts `n`. The arithmetic is integer-only so there is never a rounding surprise:
//!
//! * a count `N` allows exactly `N` hosts;
//! * a percentage `P%` of `n` hosts allows `floor(P * n / 100)` hosts;
//! * a gate **fails when `bad > allowed`**, so being exactly at the limit still passes.
//!
//! Budgets that pace dispatching use [`Limit::allowed_at_least_one`]: a budget that rounds down
//! to zero would stall a rollout forever, so it allows one host.
//!
//! ## Waves
//!
//! Waves are cumulative coverage targets: `"1"` is one host in total so far, `"10%"` is
//! `ceil(10% of eligible)` hosts in total so far. Within a list, a later count must be larger than
//! every earlier count and a later percentage larger than every earlier percentage; the last wave
//! is `100%` or a count. Whether a mixed list grows (`10,5%,100%`) depends on the fleet's size,
//! so the coordinator checks that again when it plans.

use std::fmt;
use std::time::Duration;

use crate::ValidationError;

/// Longest bake, deadline or timing a spec may ask for: 12 hours.
pub const MAX_TIMING: Duration = Duration::from_secs(12 * 3600);

/// Most waves a spec may list.
pub const MAX_WAVES: usize = 64;

/// A number of hosts, absolute or relative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Exactly this many hosts.
    Count(u32),
    /// This percentage (0–100) of the hosts under consideration, rounded down.
    Percent(u32),
}

impl Limit {
    /// Parses `"N"` or `"P%"` (0 ≤ P ≤ 100, spaces allowed around the number); `field` names
    /// the spec field in the error.
    pub fn parse(field: &str, text: &str) -> Result<Self, ValidationError> {
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            let p: u32 = p.trim().parse().map_err(|_| {
                ValidationError::new(
                    field,
                    format!("{text:?} is not a count like \"2\" or a percentage like \"10%\""),
                )
            })?;
            if p > 100 {
                return Err(ValidationError::new(
                    field,
                    format!("{text:?} is more than 100%"),
                ));
            }
            Ok(Limit::Percent(p))
        } else {
            let n: u32 = t.parse().map_err(|_| {
                ValidationError::new(
                    field,
                    format!("{text:?} is not a count like \"2\" or a percentage like \"10%\""),
                )
            })?;
            Ok(Limit::Count(n))
        }
    }

    /// How many hosts out of `n` this limit allows: a count as is, `P%` as `floor(P * n / 100)`.
    pub fn allowed(self, n: u32) -> u32 {
        match self {
            Limit::Count(c) => c,
            Limit::Percent(p) => (u64::from(p) * u64::from(n) / 100) as u32,
        }
    }

    /// True when `bad` hosts out of `n` exceed the limit (`bad > allowed(n)`).
    pub fn exceeded(self, bad: u32, n: u32) -> bool {
        bad > self.allowed(n)
    }

    /// Like [`Limit::allowed`] but never less than one, for pacing budgets.
    pub fn allowed_at_least_one(self, n: u32) -> u32 {
        self.allowed(n).max(1)
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Count(c) => write!(f, "{c}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// One wave's cumulative coverage target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveSize {
    /// This many hosts in total, including earlier waves.
    Count(u32),
    /// `ceil(P% of eligible hosts)` in total, including earlier waves.
    Percent(u32),
}

impl WaveSize {
    /// Parses `"N"` (N ≥ 1) or `"P%"` (1 ≤ P ≤ 100).
    pub fn parse(field: &str, text: &str) -> Result<Self, ValidationError> {
        let t = text.trim();
        let garbage = || {
            ValidationError::new(
                field,
                format!("{text:?} is not a host count like \"1\" or a percentage like \"10%\""),
            )
        };
        if let Some(p) = t.strip_suffix('%') {
            let p: u32 = p.trim().parse().map_err(|_| garbage())?;
            if p == 0 {
                return Err(ValidationError::new(field, "0% covers no host"));
            }
            if p > 100 {
                return Err(ValidationError::new(
                    field,
                    format!("{text:?} is more than 100%"),
                ));
            }
            Ok(WaveSize::Percent(p))
        } else {
            let n: u32 = t.parse().map_err(|_| garbage())?;
            if n == 0 {
                return Err(ValidationError::new(field, "0 covers no host"));
            }
            Ok(WaveSize::Count(n))
        }
    }

    /// Hosts covered in total after this wave, out of `n` eligible hosts (at most `n`).
    pub fn target(self, n: u32) -> u32 {
        match self {
            WaveSize::Count(c) => c.min(n),
            WaveSize::Percent(p) => (u64::from(p) * u64::from(n)).div_ceil(100) as u32,
        }
    }
}

impl fmt::Display for WaveSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveSize::Count(c) => write!(f, "{c}"),
            WaveSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Parses and checks a list of wave expressions; errors name the element as `waves[i]`.
pub fn parse_waves<S: AsRef<str>>(texts: &[S]) -> Result<Vec<WaveSize>, ValidationError> {
    if texts.len() > MAX_WAVES {
        return Err(ValidationError::new(
            "waves",
            format!("{} waves listed, at most {MAX_WAVES} allowed", texts.len()),
        ));
    }
    let waves = texts
        .iter()
        .enumerate()
        .map(|(i, t)| WaveSize::parse(&format!("waves[{i}]"), t.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    check_waves(&waves)?;
    Ok(waves)
}

/// Parses a comma-separated wave list such as `1,10%,50%,100%` (as the CLI takes it).
pub fn parse_wave_list(text: &str) -> Result<Vec<WaveSize>, ValidationError> {
    let parts: Vec<&str> = text.split(',').collect();
    parse_waves(&parts)
}

/// The rules a wave list must follow whatever the fleet: each count grows past every earlier
/// count, each percentage past every earlier percentage, and the last wave is `100%` or a count.
pub fn check_waves(waves: &[WaveSize]) -> Result<(), ValidationError> {
    let mut last_count: Option<u32> = None;
    let mut last_percent: Option<u32> = None;
    for (i, w) in waves.iter().enumerate() {
        let field = format!("waves[{i}]");
        match *w {
            WaveSize::Count(c) => {
                if let Some(prev) = last_count.filter(|p| c <= *p) {
                    return Err(ValidationError::new(
                        field,
                        format!(
                            "{c} does not grow: waves are cumulative and an earlier wave already covers {prev} hosts"
                        ),
                    ));
                }
                last_count = Some(c);
            }
            WaveSize::Percent(p) => {
                if let Some(prev) = last_percent.filter(|q| p <= *q) {
                    return Err(ValidationError::new(
                        field,
                        format!(
                            "{p}% does not grow: waves are cumulative and an earlier wave already covers {prev}%"
                        ),
                    ));
                }
                last_percent = Some(p);
            }
        }
    }
    if let Some(WaveSize::Percent(p)) = waves.last().copied()
        && p != 100
    {
        return Err(ValidationError::new(
            format!("waves[{}]", waves.len() - 1),
            format!("the last wave must be 100% or a host count, not {p}%"),
        ));
    }
    Ok(())
}

/// Parses a duration such as `30s`, `2m`, `1h 30m` or `500ms`. Refused: zero (a spec reads 0 as
/// "the coordinator's default") and anything that is not a whole number of milliseconds (a spec
/// counts in milliseconds; `500us` would silently become 0, the default).
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, ValidationError> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        ValidationError::new(
            field,
            format!("{text:?} is not a duration (e.g. \"30s\", \"2m\", \"500ms\"): {e}"),
        )
    })?;
    if d.is_zero() {
        return Err(ValidationError::new(
            field,
            format!("{text:?} must be longer than 0 (use a small value such as \"100ms\")"),
        ));
    }
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(ValidationError::new(
            field,
            format!(
                "{text:?} is not a whole number of milliseconds; durations are counted in milliseconds (e.g. \"1ms\")"
            ),
        ));
    }
    Ok(d)
}

/// A spec timing in milliseconds: 0 is `default`, more than [`MAX_TIMING`] is refused.
pub fn timing_ms(field: &str, ms: u64, default: Duration) -> Result<Duration, ValidationError> {
    if ms == 0 {
        return Ok(default);
    }
    let d = Duration::from_millis(ms);
    if d > MAX_TIMING {
        return Err(ValidationError::new(
            field,
            format!(
                "{} is longer than the limit of {}",
                humantime::format_duration(d),
                humantime::format_duration(MAX_TIMING)
            ),
        ));
    }
    Ok(d)
}

/// Whole milliseconds of a duration parsed by [`parse_duration`] (saturating).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// The words operators see for the rollout enums of the control API (the CLI's text and JSON):
// the proto names without their prefix, in lower case. A test checks every one.
macro_rules! words {
    ($ty:ty, $prefix:literal, { $($variant:ident => $word:literal),* $(,)? }) => {
        impl $ty {
            /// The state as operators read it (`"rolling_back"`), `"unspecified"` for 0.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(<$ty>::$variant => $word,)*
                }
            }

            /// The value with this word, if any.
            pub fn from_word(w: &str) -> Option<Self> {
                match w {
                    $($word => Some(<$ty>::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

words!(crate::wire::RolloutState, "ROLLOUT_STATE_", {
    Unspecified => "unspecified",
    Running => "running",
    Paused => "paused",
    Waiting => "waiting",
    Succeeded => "succeeded",
    RollingBack => "rolling_back",
    RolledBack => "rolled_back",
    Aborted => "aborted",
    Failed => "failed",
});

words!(crate::wire::WaveState, "WAVE_STATE_", {
    Unspecified => "unspecified",
    Pending => "pending",
    Dispatching => "dispatching",
    Baking => "baking",
    Passed => "passed",
    Failed => "failed",
    Paused => "paused",
    Waiting => "waiting",
});

words!(crate::wire::HostPhase, "HOST_PHASE_", {
    Unspecified => "unspecified",
    Pending => "pending",
    Dispatched => "dispatched",
    Activated => "activated",
    Healthy => "healthy",
    Confirmed => "confirmed",
    Failed => "failed",
    RollingBack => "rolling_back",
    RolledBack => "rolled_back",
    Skipped => "skipped",
    Unreachable => "unreachable",
});

words!(crate::wire::DecisionKind, "DECISION_KIND_", {
    Unspecified => "unspecified",
    Promote => "promote",
    Wait => "wait",
    Pause => "pause",
    Resume => "resume",
    Rollback => "rollback",
    Abort => "abort",
    Retry => "retry",
    Complete => "complete",
    ManualRollback => "manual_rollback",
    RollbackFinished => "rollback_finished",
});

/// A traffic weight: a percent from 1% to 100% of a server's configured load-balancer weight,
/// with its `%` (`"5%"`, `"5 %"`); a bare number is refused so it cannot be read as a host count.
pub fn parse_weight_percent(field: &str, text: &str) -> Result<u8, ValidationError> {
    let t = text.trim();
    let Some(n) = t.strip_suffix('%') else {
        return Err(ValidationError::new(
            field,
            format!("{t:?} is not a percent; write a traffic weight as e.g. 5%"),
        ));
    };
    match n.trim().parse::<u8>() {
        Ok(0) => Err(ValidationError::new(
            field,
            "0% would send the wave no traffic, so its bake would judge nothing",
        )),
        Ok(p) if p <= 100 => Ok(p),
        _ => Err(ValidationError::new(
            field,
            format!("{t:?} is not a percent from 1% to 100%"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_allow_exactly_their_value() {
        for c in [0, 1, 2, 5] {
            let l = Limit::Count(c);
            assert_eq!(l.allowed(100), c);
            assert!(!l.exceeded(c, 100), "exactly at {c} must pass");
            assert!(l.exceeded(c + 1, 100), "one past {c} must fail");
        }
        assert!(!Limit::Count(0).exceeded(0, 3));
    }

    #[test]
    fn percents_round_down_with_integer_math() {
        let cases = [
            (10, 7, 0),
            (10, 10, 1),
            (10, 19, 1),
            (10, 20, 2),
            (15, 20, 3),
            (50, 3, 1),
            (33, 3, 0),
            (34, 3, 1),
            (0, 1000, 0),
            (100, 7, 7),
            (1, 99, 0),
            (1, 100, 1),
        ];
        for (p, n, want) in cases {
            let l = Limit::Percent(p);
            assert_eq!(l.allowed(n), want, "{p}% of {n}");
            assert!(
                !l.exceeded(want, n),
                "{p}% of {n}: exactly at {want} must pass"
            );
            assert!(
                l.exceeded(want + 1, n),
                "{p}% of {n}: {} must fail",
                want + 1
            );
        }
        // Large fleets do not overflow.
        assert_eq!(Limit::Percent(100).allowed(u32::MAX), u32::MAX);
    }

    #[test]
    fn pacing_budgets_never_stall() {
        assert_eq!(Limit::Percent(10).allowed_at_least_one(7), 1);
        assert_eq!(Limit::Percent(10).allowed_at_least_one(30), 3);
        assert_eq!(Limit::Count(0).allowed_at_least_one(30), 1);
    }

    #[test]
    fn parse_accepts_counts_and_percents_and_names_the_field() {
        assert_eq!(Limit::parse("f", "3").unwrap(), Limit::Count(3));
        assert_eq!(Limit::parse("f", " 25% ").unwrap(), Limit::Percent(25));
        assert_eq!(Limit::parse("f", "0%").unwrap(), Limit::Percent(0));
        for bad in ["", "x", "-1", "101%", "1.5", "%", "10%%"] {
            let e = Limit::parse("failure_threshold", bad).unwrap_err();
            assert_eq!(e.field, "failure_threshold", "{bad:?}");
        }
        assert_eq!(Limit::Percent(25).to_string(), "25%");
        assert_eq!(Limit::Count(2).to_string(), "2");
    }

    #[test]
    fn enum_words_are_the_proto_names_in_lower_case() {
        use crate::wire::{DecisionKind, HostPhase, RolloutState, WaveState};
        fn check(name: &str, prefix: &str, word: &str) {
            assert_eq!(
                name.strip_prefix(prefix).unwrap().to_lowercase(),
                word,
                "{name}"
            );
        }
        for v in 0..20 {
            if let Ok(e) = RolloutState::try_from(v) {
                check(e.as_str_name(), "ROLLOUT_STATE_", e.as_str());
                assert_eq!(RolloutState::from_word(e.as_str()), Some(e));
            }
            if let Ok(e) = WaveState::try_from(v) {
                check(e.as_str_name(), "WAVE_STATE_", e.as_str());
            }
            if let Ok(e) = HostPhase::try_from(v) {
                check(e.as_str_name(), "HOST_PHASE_", e.as_str());
            }
            if let Ok(e) = DecisionKind::try_from(v) {
                check(e.as_str_name(), "DECISION_KIND_", e.as_str());
            }
        }
    }

    #[test]
    fn the_same_percent_grammar_everywhere() {
        assert_eq!(Limit::parse("f", "10 %").unwrap(), Limit::Percent(10));
        assert_eq!(WaveSize::parse("w", "10 %").unwrap(), WaveSize::Percent(10));
        assert_eq!(
            parse_wave_list("1, 10 %,100%").unwrap(),
            vec![
                WaveSize::Count(1),
                WaveSize::Percent(10),
                WaveSize::Percent(100)
            ]
        );
    }

    #[test]
    fn wave_lists_name_the_bad_element() {
        for (bad, field, needle) in [
            ("0", "waves[0]", "0 covers no host"),
            ("1,,100%", "waves[1]", "not a host count"),
            ("150%", "waves[0]", "more than 100%"),
            ("12.5%", "waves[0]", "not a host count"),
            ("1,x%", "waves[1]", "not a host count"),
            ("50%,10%,100%", "waves[1]", "does not grow"),
            ("1,50%", "waves[1]", "last wave must be 100%"),
        ] {
            let e = parse_wave_list(bad).expect_err(bad);
            assert_eq!(e.field, field, "{bad:?}: {e}");
            assert!(e.problem.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn durations_the_spec_cannot_carry_are_refused() {
        assert_eq!(
            parse_duration("bake", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_duration("bake", "1h 30m").unwrap(),
            Duration::from_secs(5400)
        );
        for (bad, needle) in [
            ("500us", "whole number of milliseconds"),
            ("1500us", "whole number of milliseconds"),
            ("1ns", "whole number of milliseconds"),
            ("0s", "longer than 0"),
            ("soon", "not a duration"),
        ] {
            let e = parse_duration("bake", bad).expect_err(bad);
            assert_eq!(e.field, "bake");
            assert!(e.problem.contains(needle), "{bad:?}: {e}");
        }
        assert_eq!(
            timing_ms("bake", 0, Duration::from_secs(30)).unwrap(),
            Duration::from_secs(30)
        );
        assert!(timing_ms("bake", 13 * 3600 * 1000, Duration::ZERO).is_err());
    }
}
