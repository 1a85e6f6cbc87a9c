//! Exact limit arithmetic for failure, unreachable, availability and in-flight budgets.
//!
//! [`Limit`] itself lives in `serin_proto::grammar`, the value grammar the CLI shares with the
//! coordinator; this module is where the engine documents how it counts.
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

pub use serin_proto::grammar::Limit;
