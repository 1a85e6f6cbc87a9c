//! Canary analysis: the new release's hosts compared with baseline hosts over the same window.
//!
//! Health samples stream in from every host. At a gate, [`compare`] summarises the samples of the
//! canary hosts (already on the new release) and of the baseline hosts (selected but not yet
//! touched), side by side: check pass rate, probe latency p50/p99, restarts, CPU and RSS.
//!
//! Each host is summarised over its own [`Window`]: a canary host from the moment it reported
//! healthy for its current activation (so neither a failed earlier attempt nor the failed probes
//! of its own restart count against it), the baseline hosts over the same interval.
//!
//! The judge is deliberately conservative. It compares the *failure proportions* of health check
//! results with a one-sided Fisher exact test (exact for any sample size, so small cohorts are
//! judged correctly) and says:
//!
//! * `insufficient data` when either side has fewer than [`AnalysisSettings::min_checks`] check
//!   results, or there are no baseline hosts — never a guess;
//! * `canary worse` only when the canary fails more often and the probability of seeing at least
//!   that many canary failures by chance is below [`AnalysisSettings::alpha`];
//! * `canary healthy` otherwise.
//!
//! Only `canary worse` can fail a gate. Latency, restarts, CPU and RSS are shown as evidence.

use std::collections::{BTreeMap, VecDeque};

use serin_proto::HostId;

use crate::fleet::HealthSample;

/// Tunables of the judge.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisSettings {
    /// Fewer check results than this on either side: "insufficient data".
    pub min_checks: u64,
    /// Significance level of the one-sided test.
    pub alpha: f64,
    /// Samples kept per host.
    pub window: usize,
}

impl Default for AnalysisSettings {
    fn default() -> Self {
        Self {
            min_checks: 20,
            alpha: 0.01,
            window: 256,
        }
    }
}

/// The judge's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not enough samples on one side (or no baseline) to say anything.
    InsufficientData,
    /// No significant difference, or the canary does better.
    CanaryHealthy,
    /// The canary fails checks significantly more often than the baseline.
    CanaryWorse,
}

impl Verdict {
    /// The verdict as shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::InsufficientData => "insufficient data",
            Verdict::CanaryHealthy => "canary healthy",
            Verdict::CanaryWorse => "canary worse",
        }
    }
}

/// Samples per host, most recent last (kept in memory only).
#[derive(Debug, Default, Clone)]
pub struct Samples {
    by_host: BTreeMap<HostId, VecDeque<HealthSample>>,
}

impl Samples {
    /// Records one sample, dropping the oldest beyond `window`.
    pub fn push(&mut self, host: &HostId, sample: HealthSample, window: usize) {
        let q = self.by_host.entry(host.clone()).or_default();
        q.push_back(sample);
        while q.len() > window.max(1) {
            q.pop_front();
        }
    }

    fn since<'a>(&'a self, host: &HostId, since_ms: u64) -> impl Iterator<Item = &'a HealthSample> {
        self.by_host
            .get(host)
            .into_iter()
            .flatten()
            .filter(move |s| s.observed_unix_ms >= since_ms)
    }
}

/// The samples of one host that count: those observed at or after `since_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub host: HostId,
    pub since_ms: u64,
}

/// What a group of hosts reported over a window (`MetricSummary` on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricSummary {
    pub hosts: u32,
    pub reports: u32,
    pub check_pass_rate: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub restarts: u32,
    pub cpu_percent: f64,
    pub rss_bytes: u64,
}

/// The comparison at a gate: summaries, the verdict and the test's p-value.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub canary: MetricSummary,
    pub baseline: MetricSummary,
    pub verdict: Verdict,
    /// One-sided p-value; `None` when the verdict is "insufficient data".
    pub p_value: Option<f64>,
    canary_checks: (u64, u64),
    baseline_checks: (u64, u64),
}

impl Comparison {
    /// Evidence entries for a decision.
    pub fn evidence(&self, out: &mut BTreeMap<String, String>) {
        out.insert("analysis".into(), self.verdict.as_str().into());
        out.insert(
            "canary_checks_failed".into(),
            format!("{}/{}", self.canary_checks.0, self.canary_checks.1),
        );
        out.insert(
            "baseline_checks_failed".into(),
            format!("{}/{}", self.baseline_checks.0, self.baseline_checks.1),
        );
        if let Some(p) = self.p_value {
            out.insert("analysis_p_value".into(), format!("{p:.4}"));
        }
        out.insert(
            "canary_latency_p99_ms".into(),
            format!("{:.1}", self.canary.latency_p99_ms),
        );
        out.insert(
            "baseline_latency_p99_ms".into(),
            format!("{:.1}", self.baseline.latency_p99_ms),
        );
    }
}

/// Summary of a group of hosts plus (failed checks, total checks).
fn summarise(samples: &Samples, hosts: &[Window]) -> (MetricSummary, (u64, u64)) {
    let mut reports = 0u32;
    let (mut failed, mut total) = (0u64, 0u64);
    let mut latencies = Vec::new();
    let mut restarts = 0u32;
    let (mut cpu, mut rss) = (0f64, 0u64);
    let mut with_data = 0u32;
    for w in hosts {
        let mut last = None;
        for s in samples.since(&w.host, w.since_ms) {
            reports += 1;
            let (f, t) = if s.checks_total == 0 {
                (u64::from(!s.healthy), 1)
            } else {
                (
                    u64::from(s.checks_total.saturating_sub(s.checks_passing)),
                    u64::from(s.checks_total),
                )
            };
            failed += f;
            total += t;
            if let Some(l) = s.probe_latency_us {
                latencies.push(l);
            }
            last = Some(s);
        }
        if let Some(s) = last {
            with_data += 1;
            restarts += s.restarts;
            cpu += f64::from(s.cpu_percent);
            rss += s.rss_bytes;
        }
    }
    latencies.sort_unstable();
    let pct = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let idx = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx] as f64 / 1000.0
    };
    let summary = MetricSummary {
        hosts: hosts.len() as u32,
        reports,
        check_pass_rate: if total == 0 {
            0.0
        } else {
            (total - failed) as f64 / total as f64
        },
        latency_p50_ms: pct(0.50),
        latency_p99_ms: pct(0.99),
        restarts,
        cpu_percent: if with_data == 0 {
            0.0
        } else {
            cpu / f64::from(with_data)
        },
        rss_bytes: if with_data == 0 {
            0
        } else {
            rss / u64::from(with_data)
        },
    };
    (summary, (failed, total))
}

fn ln_factorial(n: u64) -> f64 {
    (1..=n).map(|k| (k as f64).ln()).sum()
}

/// One-sided Fisher exact test: the probability that the canary sees at least `a` failures among
/// `n1` checks when `a + c` failures are spread at random over `n1 + n2` checks.
pub fn fisher_greater(a: u64, n1: u64, c: u64, n2: u64) -> f64 {
    let k = a + c;
    let n = n1 + n2;
    let ln_choose = |n: u64, r: u64| ln_factorial(n) - ln_factorial(r) - ln_factorial(n - r);
    let denom = ln_choose(n, k);
    let hi = k.min(n1);
    let mut p = 0.0;
    for x in a..=hi {
        if k - x > n2 {
            continue;
        }
        p += (ln_choose(n1, x) + ln_choose(n2, k - x) - denom).exp();
    }
    p.min(1.0)
}

/// Compares canary and baseline hosts, each over the samples of its own window.
pub fn compare(
    settings: &AnalysisSettings,
    samples: &Samples,
    canary: &[Window],
    baseline: &[Window],
) -> Comparison {
    let (cs, (cf, ct)) = summarise(samples, canary);
    let (bs, (bf, bt)) = summarise(samples, baseline);
    let (verdict, p_value) =
        if baseline.is_empty() || ct < settings.min_checks || bt < settings.min_checks {
            (Verdict::InsufficientData, None)
        } else {
            let p = fisher_greater(cf, ct, bf, bt);
            // Worse only when the canary's failure rate is higher and the difference is significant.
            let canary_higher = u128::from(cf) * u128::from(bt) > u128::from(bf) * u128::from(ct);
            if canary_higher && p < settings.alpha {
                (Verdict::CanaryWorse, Some(p))
            } else {
                (Verdict::CanaryHealthy, Some(p))
            }
        };
    Comparison {
        canary: cs,
        baseline: bs,
        verdict,
        p_value,
        canary_checks: (cf, ct),
        baseline_checks: (bf, bt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serin_proto::ServiceName;

    fn sample(at: u64, passing: u32, total: u32, latency_ms: u64) -> HealthSample {
        HealthSample {
            service: ServiceName::new("web").unwrap(),
            release: None,
            healthy: passing == total,
            checks_passing: passing,
            checks_total: total,
            probe_latency_us: Some(latency_ms * 1000),
            restarts: 0,
            cpu_percent: 10.0,
            rss_bytes: 1000,
            observed_unix_ms: at,
            requests_total: None,
        }
    }

    fn hid(s: &str) -> HostId {
        HostId::new(s).unwrap()
    }

    fn w(s: &str, since_ms: u64) -> Window {
        Window {
            host: hid(s),
            since_ms,
        }
    }

    #[test]
    fn fisher_matches_known_values() {
        // 3/3 canary failures vs 0/3 baseline: p = 1/20.
        assert!((fisher_greater(3, 3, 0, 3) - 0.05).abs() < 1e-9);
        // No failures anywhere: p = 1.
        assert!((fisher_greater(0, 10, 0, 10) - 1.0).abs() < 1e-9);
        // Canary better than baseline: large p.
        assert!(fisher_greater(0, 10, 5, 10) > 0.5);
    }

    #[test]
    fn few_samples_are_insufficient_data_never_a_guess() {
        let mut s = Samples::default();
        for t in 0..5 {
            s.push(&hid("c"), sample(t, 0, 1, 5), 100);
            s.push(&hid("b"), sample(t, 1, 1, 5), 100);
        }
        let c = compare(&AnalysisSettings::default(), &s, &[w("c", 0)], &[w("b", 0)]);
        assert_eq!(c.verdict, Verdict::InsufficientData);
        // No baseline hosts at all.
        let c = compare(&AnalysisSettings::default(), &s, &[w("c", 0)], &[]);
        assert_eq!(c.verdict, Verdict::InsufficientData);
    }

    #[test]
    fn clearly_failing_canary_is_worse_and_similar_one_is_healthy() {
        let mut s = Samples::default();
        for t in 0..30 {
            s.push(
                &hid("c"),
                sample(t, if t % 2 == 0 { 0 } else { 2 }, 2, 50),
                100,
            );
            s.push(&hid("b"), sample(t, 2, 2, 5), 100);
            s.push(&hid("d"), sample(t, if t == 3 { 1 } else { 2 }, 2, 5), 100);
        }
        let set = AnalysisSettings::default();
        let c = compare(&set, &s, &[w("c", 0)], &[w("b", 0)]);
        assert_eq!(c.verdict, Verdict::CanaryWorse, "{c:?}");
        assert_eq!(c.canary.latency_p99_ms, 50.0);
        assert_eq!(c.baseline.latency_p50_ms, 5.0);
        let c = compare(&set, &s, &[w("d", 0)], &[w("b", 0)]);
        assert_eq!(
            c.verdict,
            Verdict::CanaryHealthy,
            "one failed check in 60 is noise: {c:?}"
        );
        // Samples before the window do not count.
        let c = compare(&set, &s, &[w("c", 1000)], &[w("b", 1000)]);
        assert_eq!(c.verdict, Verdict::InsufficientData);
    }

    #[test]
    fn each_host_counts_only_samples_of_its_own_window() {
        let mut s = Samples::default();
        // c failed every check until t = 30 (a failed attempt, then its restart), then passes.
        for t in 0..60 {
            s.push(&hid("c"), sample(t, u32::from(t >= 30), 1, 5), 100);
            s.push(&hid("b"), sample(t, 1, 1, 5), 100);
        }
        let set = AnalysisSettings::default();
        let c = compare(&set, &s, &[w("c", 0)], &[w("b", 0)]);
        assert_eq!(c.verdict, Verdict::CanaryWorse, "{c:?}");
        let c = compare(&set, &s, &[w("c", 30)], &[w("b", 30)]);
        assert_eq!(c.verdict, Verdict::CanaryHealthy, "{c:?}");
        let mut e = BTreeMap::new();
        c.evidence(&mut e);
        assert_eq!(e["canary_checks_failed"], "0/30");
        assert_eq!(e["baseline_checks_failed"], "0/30");
    }
}
