//! Exact limit arithmetic for failure, unreachable, availability and in-flight budgets.
//!
//! A [`Limit`] is either a host count (`"2"`) or a percentage (`"10%"`) of some number of hosts
//! `n` (the wave's size for per-wave thresholds, the rollout's size for cumulative ones and for
//! budgets). The arithmetic is integer-only so there is never a rounding surprise:
//!
//! * a count `N` allows exactly `N` hosts;
//! * a percentage `P%` of `n` hosts allows `floor(P * n / 100)` hosts;
//! * a gate **fails when `bad > allowed`**, so being exactly at the limit still passes.
//!
//! | limit | n  | allowed | passes with | fails with |
//! |-------|----|---------|-------------|------------|
//! | `0`   | any| 0       | 0 failed    | 1 failed   |
//! | `2`   | any| 2       | 2 failed    | 3 failed   |
//! | `10%` | 7  | 0       | 0 failed    | 1 failed   |
//! | `10%` | 10 | 1       | 1 failed    | 2 failed   |
//! | `15%` | 20 | 3       | 3 failed    | 4 failed   |
//! | `50%` | 3  | 1       | 1 failed    | 2 failed   |
//! | `100%`| n  | n       | n failed    | never      |
//!
//! Budgets that pace dispatching (`max_in_flight`, `max_unavailable`) use
//! [`Limit::allowed_at_least_one`] instead: a budget that rounds down to zero would stall the
//! rollout forever, so it allows one host.

use std::fmt;

use serin_proto::ValidationError;

/// A number of hosts, absolute or relative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Exactly this many hosts.
    Count(u32),
    /// This percentage (0–100) of the hosts under consideration, rounded down.
    Percent(u32),
}

impl Limit {
    /// Parses `"N"` or `"P%"` (0 ≤ P ≤ 100); `field` names the spec field in the error.
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
}
