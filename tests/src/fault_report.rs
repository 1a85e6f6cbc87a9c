//! The report the fault suites end with: one outcome per case, a table of injections, runs and
//! invariant violations per kind (printed past the test harness's capture, so CI logs show it on
//! success too), and the failure that names every violation.
//!
//! A case that panics with a message starting with [`SKIPPED`] could not inject its fault on this
//! machine (only when `SERIN_FAULT_SKIP_ROOT` allows it, outside CI); it counts as a run without
//! an injection and is listed, never as a pass.

use std::collections::BTreeMap;
use std::io::Write;
use std::panic::AssertUnwindSafe;

/// The start of a panic message that marks a case skipped.
pub const SKIPPED: &str = "SKIPPED:";

/// A number from the environment (`SERIN_FAULT_ROUNDS`, `SERIN_FAULT_JOBS`), or `default`.
pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Runs one case, turning a panic into its message.
pub fn run_case(case: impl FnOnce()) -> Result<(), String> {
    std::panic::catch_unwind(AssertUnwindSafe(case)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panicked".to_owned())
    })
}

/// A case's name, with its round when the suite runs more than one.
pub fn in_round(name: &str, round: usize, rounds: usize) -> String {
    if rounds > 1 {
        format!("{name} (round {})", round + 1)
    } else {
        name.to_owned()
    }
}

/// What one run of a case gave.
#[derive(Debug)]
pub struct Outcome {
    pub kind: String,
    pub name: String,
    /// `Err` with the violation (or the reason it was skipped).
    pub result: Result<(), String>,
    /// The fault was injected (whether or not an invariant held afterwards).
    pub injected: bool,
}

impl Outcome {
    /// An outcome whose fault counts as injected unless the case was skipped.
    pub fn new(kind: &str, name: impl Into<String>, result: Result<(), String>) -> Self {
        let injected = !Self::is_skip(&result);
        Self {
            kind: kind.to_owned(),
            name: name.into(),
            result,
            injected,
        }
    }

    fn is_skip(result: &Result<(), String>) -> bool {
        result.as_ref().is_err_and(|e| e.starts_with(SKIPPED))
    }

    /// Whether the case was skipped.
    pub fn skipped(&self) -> bool {
        Self::is_skip(&self.result)
    }

    /// Prints the case's progress line (`suite: kind name verdict in took`) to stderr.
    pub fn log(&self, suite: &str, took: std::time::Duration) {
        eprintln!(
            "{suite}: {:<9} {:<44} {} in {took:.1?}",
            self.kind,
            self.name,
            self.verdict()
        );
    }

    /// `ok`, `skipped` or `VIOLATION`, for the progress line of a case.
    pub fn verdict(&self) -> &'static str {
        match &self.result {
            Ok(()) => "ok",
            Err(_) if self.skipped() => "skipped",
            Err(_) => "VIOLATION",
        }
    }
}

/// Prints the table under `title` to stderr and fails, naming every violation, if any case had
/// one.
pub fn finish(title: &str, outcomes: Vec<Outcome>) {
    let mut table: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    for o in &outcomes {
        let row = table.entry(&o.kind).or_default();
        row.0 += usize::from(o.injected);
        row.1 += 1;
        row.2 += usize::from(o.result.is_err() && !o.skipped());
    }
    let mut summary = format!(
        "\n{title}\n  {:<9} {:>10} {:>6} {:>10}\n",
        "kind", "injections", "runs", "violations"
    );
    let (mut ti, mut tr, mut tv) = (0, 0, 0);
    for (kind, (inj, runs, viol)) in &table {
        summary += &format!("  {kind:<9} {inj:>10} {runs:>6} {viol:>10}\n");
        ti += inj;
        tr += runs;
        tv += viol;
    }
    summary += &format!("  {:<9} {ti:>10} {tr:>6} {tv:>10}\n", "total");
    let skipped: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.skipped())
        .map(|o| o.name.as_str())
        .collect();
    if !skipped.is_empty() {
        summary += &format!(
            "  SKIPPED by SERIN_FAULT_SKIP_ROOT ({}): {skipped:?}\n",
            skipped.len()
        );
    }
    // Straight to stderr, past the test harness's capture.
    let _ = std::io::stderr().write_all(summary.as_bytes());
    let violations: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.skipped())
        .filter_map(|o| {
            o.result
                .as_ref()
                .err()
                .map(|e| format!("=== {} {}: {e}", o.kind, o.name))
        })
        .collect();
    assert!(
        violations.is_empty(),
        "{} invariant violation(s):\n{}\n{summary}",
        violations.len(),
        violations.join("\n\n")
    );
}
