//! Rendering of the ControlService answers: JSON for machines, tables and reports for humans.
//!
//! The generated wire types do not derive serde, so every message has an explicit `*_json`
//! conversion to a [`serde_json::Value`] whose keys are the proto field names (snake_case) and
//! whose enums are lowercase names (`"running"`, `"rollback"`). Text renderers are pure
//! functions of the message, the current time and a [`Palette`], so tests can check their output.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use anstyle::{AnsiColor, Style};
use serde_json::{Map, Value, json};
use serin_proto::wire;

// ---------------------------------------------------------------------------------------------
// Colour

/// Styles for the text output; [`Palette::plain`] produces no escape codes at all.
#[derive(Debug, Clone, Copy)]
pub struct Palette {
    enabled: bool,
}

impl Palette {
    /// No colour (piped output, NO_COLOR, tests).
    pub fn plain() -> Self {
        Palette { enabled: false }
    }

    /// Colour when stdout supports it and the user did not opt out (NO_COLOR, CLICOLOR=0).
    pub fn for_stdout() -> Self {
        let choice = anstream::AutoStream::choice(&std::io::stdout());
        Palette {
            enabled: !matches!(choice, anstream::ColorChoice::Never),
        }
    }

    /// Whether this palette emits escape codes.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `text` in `style`.
    pub fn paint(&self, style: Style, text: &str) -> String {
        if self.enabled {
            format!("{style}{text}{style:#}")
        } else {
            text.to_string()
        }
    }

    /// Bold text.
    pub fn bold(&self, text: &str) -> String {
        self.paint(Style::new().bold(), text)
    }

    /// Dimmed text.
    pub fn dim(&self, text: &str) -> String {
        self.paint(Style::new().dimmed(), text)
    }

    /// A rollout, wave or host state, coloured by how good it is.
    pub fn state(&self, state: &str) -> String {
        self.paint(state_style(state), state)
    }
}

/// The colour of a rollout/wave/host state word.
fn state_style(state: &str) -> Style {
    let color = match state {
        "succeeded" | "passed" | "confirmed" | "healthy" | "connected" | "promote" | "complete" => {
            AnsiColor::Green
        }
        "failed" | "rolled_back" | "aborted" | "rollback" | "abort" | "unhealthy"
        | "disconnected" => AnsiColor::Red,
        "paused" | "waiting" | "unreachable" | "rolling_back" | "pause" => AnsiColor::Yellow,
        "running" | "baking" | "dispatching" | "dispatched" | "activated" => AnsiColor::Cyan,
        _ => return Style::new(),
    };
    Style::new().fg_color(Some(color.into()))
}

// ---------------------------------------------------------------------------------------------
// Small formatting helpers

/// "2026-11-05T12:00:01Z" for a unix time in milliseconds; "-" for 0.
pub fn fmt_time(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".to_string();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// "12:00:01" (UTC) for a unix time in milliseconds.
pub fn fmt_clock(unix_ms: u64) -> String {
    let full = fmt_time(unix_ms);
    full.get(11..19).map(str::to_string).unwrap_or(full)
}

/// A short duration: "850ms", "12s", "3m 20s".
pub fn fmt_duration_ms(ms: u64) -> String {
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let secs = ms / 1_000;
    if secs < 60 {
        if ms.is_multiple_of(1_000) || secs >= 10 {
            return format!("{secs}s");
        }
        return format!("{:.1}s", ms as f64 / 1_000.0);
    }
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    match (h, s) {
        (0, 0) => format!("{m}m"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m"),
    }
}

/// "3s ago" / "never".
fn fmt_ago(unix_ms: u64, now_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".to_string();
    }
    format!("{} ago", fmt_duration_ms(now_ms.saturating_sub(unix_ms)))
}

/// "12.3 MiB".
pub fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A map rendered as "k=v,k2=v2", sorted by key.
pub fn fmt_labels(labels: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = labels.iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Evidence rendered as "k=v k2=v2", sorted by key.
pub fn fmt_evidence(evidence: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = evidence.iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `line` fitted to `width` terminal columns (escape codes take none): unchanged when it fits,
/// else cut with "…" and followed by `hint` (where to read the full text, e.g. " (full text:
/// serin rollout explain r-1)") when there is room for it. Never wider than `width`.
pub fn fit_width(line: &str, width: usize, hint: &str) -> String {
    if console::measure_text_width(line) <= width {
        return line.to_string();
    }
    let hint_width = console::measure_text_width(hint);
    if width >= hint_width + 24 {
        format!(
            "{}{hint}",
            console::truncate_str(line, width - hint_width, "…")
        )
    } else {
        console::truncate_str(line, width, "…").into_owned()
    }
}

fn plural(n: u32, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The lowercase tail of a protobuf enum name: `SERVICE_STATE_RUNNING` → `running`.
fn enum_tail(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
}

fn service_state_name(v: i32) -> String {
    wire::ServiceState::try_from(v)
        .map(|s| enum_tail(s.as_str_name(), "SERVICE_STATE_"))
        .unwrap_or_else(|_| format!("unknown({v})"))
}

fn check_kind_name(v: i32) -> String {
    wire::CheckKind::try_from(v)
        .map(|s| enum_tail(s.as_str_name(), "CHECK_KIND_"))
        .unwrap_or_else(|_| format!("unknown({v})"))
}

/// `rollback`, `pause` or `default` for a spec's on_failure.
pub fn on_failure_name(v: i32) -> String {
    match wire::OnFailure::try_from(v) {
        Ok(wire::OnFailure::Unspecified) => "default".to_string(),
        Ok(o) => enum_tail(o.as_str_name(), "ON_FAILURE_"),
        Err(_) => format!("unknown({v})"),
    }
}

/// A plain-text table: the header row dimmed, columns padded to their widest cell. Each cell is
/// its text and an optional style; padding is computed on the text, so colour does not skew it.
fn table(p: &Palette, headers: &[&str], rows: &[Vec<(String, Style)>]) -> String {
    let n = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, (text, _)) in row.iter().enumerate().take(n) {
            widths[i] = widths[i].max(text.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<(String, Style)>, out: &mut String| {
        let mut l = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, (text, style)) in cells.into_iter().enumerate() {
            let pad = widths[i].saturating_sub(text.chars().count());
            l.push_str(&p.paint(style, &text));
            if i != last {
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(
        headers
            .iter()
            .map(|h| (h.to_string(), Style::new().bold()))
            .collect(),
        &mut out,
    );
    for row in rows {
        line(row.clone(), &mut out);
    }
    out
}

fn cell(text: impl Into<String>) -> (String, Style) {
    (text.into(), Style::new())
}

fn state_cell(text: &str) -> (String, Style) {
    (text.to_string(), state_style(text))
}

/// A fixed-width ASCII progress bar: "[######....]".
pub fn ascii_bar(done: u32, total: u32, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        ((done.min(total) as usize) * width) / total as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

// ---------------------------------------------------------------------------------------------
// JSON

fn map_json(m: &HashMap<String, String>) -> Value {
    let obj: Map<String, Value> = m
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    Value::Object(obj)
}

/// A release.
pub fn release_json(r: &wire::Release) -> Value {
    json!({
        "service": r.service,
        "id": r.id,
        "sha256": r.sha256,
        "size": r.size,
        "url": r.url,
    })
}

/// A registered release (answer of push, add and list).
pub fn release_info_json(r: &wire::ReleaseInfo) -> Value {
    json!({
        "release": r.release.as_ref().map(release_json),
        "created_unix_ms": r.created_unix_ms,
        "deduplicated": r.deduplicated,
    })
}

/// `ListReleases`.
pub fn releases_json(r: &wire::ListReleasesResponse) -> Value {
    json!({ "releases": r.releases.iter().map(release_info_json).collect::<Vec<_>>() })
}

fn inventory_json(s: &wire::ServiceInventory) -> Value {
    json!({
        "service": s.service,
        "current_release": s.current_release,
        "kept_releases": s.kept_releases,
        "state": service_state_name(s.state),
        "healthy": s.healthy,
        "previous_release": s.previous_release,
        "last_seq": s.last_seq,
    })
}

fn check_json(c: &wire::CheckResult) -> Value {
    json!({
        "name": c.name,
        "kind": check_kind_name(c.kind),
        "passing": c.passing,
        "last_ok": c.last_ok,
        "latency_us": c.latency_us,
        "detail": c.detail,
        "consecutive_failures": c.consecutive_failures,
        "consecutive_successes": c.consecutive_successes,
    })
}

fn health_json(h: &wire::HealthReport) -> Value {
    json!({
        "service": h.service,
        "release": h.release,
        "healthy": h.healthy,
        "checks": h.checks.iter().map(check_json).collect::<Vec<_>>(),
        "process": h.process.as_ref().map(|p| json!({
            "running": p.running,
            "pid": p.pid,
            "rss_bytes": p.rss_bytes,
            "cpu_percent": p.cpu_percent,
            "restarts": p.restarts,
        })),
        "host": h.host.as_ref().map(|m| json!({
            "cpu_percent": m.cpu_percent,
            "memory_total_bytes": m.memory_total_bytes,
            "memory_used_bytes": m.memory_used_bytes,
            "load1": m.load1,
            "disk_free_bytes": m.disk_free_bytes,
        })),
        "observed_unix_ms": h.observed_unix_ms,
    })
}

/// One host of `ListHosts`.
pub fn host_json(h: &wire::HostInfo) -> Value {
    json!({
        "host_id": h.host_id,
        "hostname": h.hostname,
        "labels": map_json(&h.labels),
        "connected": h.connected,
        "last_seen_unix_ms": h.last_seen_unix_ms,
        "agent_version": h.agent_version,
        "services": h.services.iter().map(inventory_json).collect::<Vec<_>>(),
        "health": h.health.iter().map(health_json).collect::<Vec<_>>(),
    })
}

/// `ListHosts`: the page, the token of the next one, and the summary when there is one.
pub fn hosts_json(r: &wire::ListHostsResponse) -> Value {
    let counts = |c: &[wire::SummaryCount]| {
        c.iter()
            .map(|c| json!({ "key": c.key, "count": c.count }))
            .collect::<Vec<_>>()
    };
    let summary = r.summary.as_ref().map(|s| {
        json!({
            "hosts": s.hosts,
            "connected": s.connected,
            "states": counts(&s.states),
            "releases": counts(&s.releases),
            "labels": counts(&s.labels),
            "states_left_off": s.states_left_off,
            "releases_left_off": s.releases_left_off,
            "labels_left_off": s.labels_left_off,
        })
    });
    json!({
        "summary": summary,
        "hosts": r.hosts.iter().map(host_json).collect::<Vec<_>>(),
        "next_page_token": r.next_page_token,
    })
}

/// A rollout spec.
pub fn spec_json(s: &wire::RolloutSpec) -> Value {
    json!({
        "service": s.service,
        "release": s.release,
        "selector": s.selector,
        "waves": s.waves,
        "bake_ms": s.bake_ms,
        "canary_bake_ms": s.canary_bake_ms,
        "min_healthy_ms": s.min_healthy_ms,
        "healthy_deadline_ms": s.healthy_deadline_ms,
        "progress_deadline_ms": s.progress_deadline_ms,
        "max_unavailable": s.max_unavailable,
        "max_in_flight": s.max_in_flight,
        "failure_threshold": s.failure_threshold,
        "cumulative_failure_threshold": s.cumulative_failure_threshold,
        "on_failure": on_failure_name(s.on_failure),
        "spread_label": s.spread_label,
        "max_domains_in_flight": s.max_domains_in_flight,
        "unreachable_threshold": s.unreachable_threshold,
        "canary_weight": s.canary_weight,
        "weights": s.weights,
        "min_requests": s.min_requests,
    })
}

/// `PlanRollout`.
pub fn plan_json(p: &wire::RolloutPlan) -> Value {
    json!({
        "spec": p.spec.as_ref().map(spec_json),
        "waves": p.waves.iter().map(|w| json!({
            "index": w.index,
            "host_ids": w.host_ids,
            "size_expr": w.size_expr,
        })).collect::<Vec<_>>(),
        "skipped": p.skipped.iter().map(|s| json!({
            "host_id": s.host_id,
            "reason": s.reason,
        })).collect::<Vec<_>>(),
    })
}

fn wave_json(w: &wire::WaveStatus) -> Value {
    json!({
        "index": w.index,
        "size": w.size,
        "state": w.state().as_str(),
        "succeeded": w.succeeded,
        "failed": w.failed,
        "unreachable": w.unreachable,
        "in_progress": w.in_progress,
        "started_unix_ms": w.started_unix_ms,
        "bake_ends_unix_ms": w.bake_ends_unix_ms,
    })
}

fn host_progress_json(h: &wire::HostProgress) -> Value {
    json!({
        "host_id": h.host_id,
        "hostname": h.hostname,
        "wave": h.wave,
        "phase": h.phase().as_str(),
        "baseline_release": h.baseline_release,
        "target_release": h.target_release,
        "current_release": h.current_release,
        "healthy": h.healthy,
        "detail": h.detail,
        "labels": map_json(&h.labels),
    })
}

fn metric_json(m: &wire::MetricSummary) -> Value {
    json!({
        "hosts": m.hosts,
        "reports": m.reports,
        "check_pass_rate": m.check_pass_rate,
        "latency_p50_ms": m.latency_p50_ms,
        "latency_p99_ms": m.latency_p99_ms,
        "restarts": m.restarts,
        "cpu_percent": m.cpu_percent,
        "rss_bytes": m.rss_bytes,
    })
}

/// A gate decision with its evidence.
pub fn decision_json(d: &wire::Decision) -> Value {
    json!({
        "at_unix_ms": d.at_unix_ms,
        "wave": d.wave,
        "kind": d.kind().as_str(),
        "reason": d.reason,
        "evidence": map_json(&d.evidence),
        "actor": d.actor,
    })
}

/// `GetRollout`, `StartRollout`, `ControlRollout` and every `WatchRollout` message.
pub fn status_json(s: &wire::RolloutStatus) -> Value {
    json!({
        "rollout_id": s.rollout_id,
        "spec": s.spec.as_ref().map(spec_json),
        "state": s.state().as_str(),
        "reason": s.reason,
        "current_wave": s.current_wave,
        "waves": s.waves.iter().map(wave_json).collect::<Vec<_>>(),
        "hosts": s.hosts.iter().map(host_progress_json).collect::<Vec<_>>(),
        "hosts_total": s.hosts_total,
        "comparison": s.comparison.as_ref().map(|c| json!({
            "canary": c.canary.as_ref().map(metric_json),
            "baseline": c.baseline.as_ref().map(metric_json),
            "verdict": c.verdict,
        })),
        "decisions": s.decisions.iter().map(decision_json).collect::<Vec<_>>(),
        "created_unix_ms": s.created_unix_ms,
        "updated_unix_ms": s.updated_unix_ms,
        "finished": s.finished,
    })
}

/// `ListRollouts`.
pub fn rollouts_json(r: &wire::ListRolloutsResponse) -> Value {
    json!({ "rollouts": r.rollouts.iter().map(status_json).collect::<Vec<_>>() })
}

/// `ExplainRollout`.
pub fn explanation_json(e: &wire::Explanation) -> Value {
    json!({
        "status": e.status.as_ref().map(status_json),
        "decisions": e.decisions.iter().map(decision_json).collect::<Vec<_>>(),
        "events": e.events,
    })
}

// ---------------------------------------------------------------------------------------------
// Text

/// `serin hosts`: one row per host.
pub fn hosts_text(hosts: &[wire::HostInfo], now_ms: u64, p: &Palette) -> String {
    if hosts.is_empty() {
        return "no hosts\n".to_string();
    }
    let mut sorted: Vec<&wire::HostInfo> = hosts.iter().collect();
    sorted.sort_by(|a, b| a.host_id.cmp(&b.host_id));
    let rows: Vec<Vec<(String, Style)>> = sorted
        .iter()
        .map(|h| {
            let services = h
                .services
                .iter()
                .map(|s| {
                    let release = if s.current_release.is_empty() {
                        "-"
                    } else {
                        &s.current_release
                    };
                    let state = service_state_name(s.state);
                    if s.current_release.is_empty() {
                        return format!("{}=- ({state})", s.service);
                    }
                    let health = if s.healthy { "healthy" } else { "unhealthy" };
                    format!("{}={release} ({state}, {health})", s.service)
                })
                .collect::<Vec<_>>()
                .join("; ");
            let conn = if h.connected {
                "connected"
            } else {
                "disconnected"
            };
            vec![
                cell(&h.host_id),
                cell(&h.hostname),
                state_cell(conn),
                cell(fmt_ago(h.last_seen_unix_ms, now_ms)),
                cell(fmt_labels(&h.labels)),
                cell(services),
            ]
        })
        .collect();
    table(
        p,
        &[
            "HOST",
            "HOSTNAME",
            "STATE",
            "LAST SEEN",
            "LABELS",
            "SERVICES",
        ],
        &rows,
    )
}

/// `serin hosts` without `--all`: the summary of every selected host, then the first page and
/// how to see the rest.
pub fn hosts_summary_text(r: &wire::ListHostsResponse, now_ms: u64, p: &Palette) -> String {
    let mut out = String::new();
    if let Some(s) = &r.summary {
        if s.hosts == 0 {
            return "no hosts\n".to_string();
        }
        out.push_str(&format!(
            "{} hosts: {} connected, {} disconnected\n",
            p.bold(&s.hosts.to_string()),
            s.connected,
            s.hosts.saturating_sub(s.connected)
        ));
        for (name, counts, left_off) in [
            ("states", &s.states, s.states_left_off),
            ("releases", &s.releases, s.releases_left_off),
            ("labels", &s.labels, s.labels_left_off),
        ] {
            if counts.is_empty() {
                continue;
            }
            let mut line = counts
                .iter()
                .map(|c| format!("{} {}", c.key, c.count))
                .collect::<Vec<_>>()
                .join(", ");
            if left_off > 0 {
                line.push_str(&format!(" (+{left_off} more)"));
            }
            out.push_str(&format!("  {name:<9} {line}\n"));
        }
        out.push('\n');
    }
    out.push_str(&hosts_text(&r.hosts, now_ms, p));
    if !r.next_page_token.is_empty() {
        let total = r
            .summary
            .as_ref()
            .map_or(String::new(), |s| format!(" of {}", s.hosts));
        out.push_str(&format!(
            "(first {} hosts{total}; `serin hosts --all` lists every host)\n",
            r.hosts.len()
        ));
    }
    out
}

/// One registered release, as `artifact push` / `release add` report it.
pub fn release_info_text(r: &wire::ReleaseInfo, verb: &str, p: &Palette) -> String {
    let Some(rel) = &r.release else {
        return format!("{verb}: (the coordinator returned no release)\n");
    };
    let source = if rel.url.is_empty() {
        "coordinator store".to_string()
    } else {
        rel.url.clone()
    };
    let mut out = format!(
        "{verb} {} {}\n  sha256  {}\n  size    {} ({} bytes)\n  source  {}\n",
        rel.service,
        p.bold(&rel.id),
        rel.sha256,
        fmt_bytes(rel.size),
        rel.size,
        source
    );
    if r.deduplicated {
        out.push_str("  (the content was already in the store)\n");
    }
    out
}

/// `serin release list`.
pub fn releases_text(releases: &[wire::ReleaseInfo], p: &Palette) -> String {
    if releases.is_empty() {
        return "no releases\n".to_string();
    }
    let rows: Vec<Vec<(String, Style)>> = releases
        .iter()
        .filter_map(|r| {
            let rel = r.release.as_ref()?;
            let sha = rel.sha256.get(..12).unwrap_or(&rel.sha256);
            let source = if rel.url.is_empty() {
                "store".to_string()
            } else {
                rel.url.clone()
            };
            Some(vec![
                cell(&rel.service),
                cell(&rel.id),
                cell(sha),
                cell(fmt_bytes(rel.size)),
                cell(fmt_time(r.created_unix_ms)),
                cell(source),
            ])
        })
        .collect();
    table(
        p,
        &["SERVICE", "RELEASE", "SHA256", "SIZE", "CREATED", "SOURCE"],
        &rows,
    )
}

/// `serin rollout list`.
pub fn rollouts_text(rollouts: &[wire::RolloutStatus], p: &Palette) -> String {
    if rollouts.is_empty() {
        return "no rollouts\n".to_string();
    }
    let rows: Vec<Vec<(String, Style)>> = rollouts
        .iter()
        .map(|r| {
            let spec = r.spec.clone().unwrap_or_default();
            let waves = r.waves.len().max(spec.waves.len());
            let wave = if r.finished || waves == 0 {
                "-".to_string()
            } else {
                format!("{}/{}", wave_number(r.current_wave), waves)
            };
            vec![
                cell(&r.rollout_id),
                cell(&spec.service),
                cell(&spec.release),
                state_cell(r.state().as_str()),
                cell(wave),
                cell(fmt_time(r.created_unix_ms)),
                cell(&r.reason),
            ]
        })
        .collect();
    table(
        p,
        &[
            "ROLLOUT", "SERVICE", "RELEASE", "STATE", "WAVE", "CREATED", "REASON",
        ],
        &rows,
    )
}

/// A short description of the spec's pacing, e.g. "waves 1,25%,100%  bake 3s (canary 5s)".
fn spec_line(s: &wire::RolloutSpec) -> String {
    let mut parts = Vec::new();
    parts.push(format!(
        "selector {}",
        if s.selector.is_empty() {
            "(every host)"
        } else {
            &s.selector
        }
    ));
    if !s.waves.is_empty() {
        parts.push(format!("waves {}", s.waves.join(",")));
    }
    if !s.weights.is_empty() {
        parts.push(format!("traffic weights {}", s.weights.join(",")));
    } else if !s.canary_weight.is_empty() {
        parts.push(format!("canary weight {}", s.canary_weight));
    }
    if s.min_requests > 0 {
        parts.push(format!("at least {} requests per wave", s.min_requests));
    }
    if s.bake_ms > 0 {
        let mut bake = format!("bake {}", fmt_duration_ms(s.bake_ms));
        if s.canary_bake_ms > 0 && s.canary_bake_ms != s.bake_ms {
            let _ = write!(bake, " (canary {})", fmt_duration_ms(s.canary_bake_ms));
        }
        parts.push(bake);
    } else if s.canary_bake_ms > 0 {
        parts.push(format!("canary bake {}", fmt_duration_ms(s.canary_bake_ms)));
    }
    if s.on_failure != 0 {
        parts.push(format!("on failure {}", on_failure_name(s.on_failure)));
    }
    if !s.spread_label.is_empty() {
        parts.push(format!("spread by {}", s.spread_label));
    }
    parts.join("  ")
}

/// The number operators read for the wave at `index` on the wire: waves count from 1 (the
/// canary is wave 1) in every text the CLI prints, the header's "wave 2/3" included. `-o json`
/// carries the coordinator's 0-based `index` / `wave` fields unchanged.
pub fn wave_number(index: u32) -> u32 {
    index.saturating_add(1)
}

/// "wave 1 (canary)", "wave 2", … for the wave at wire `index`.
pub fn wave_name(index: u32) -> String {
    if index == 0 {
        "wave 1 (canary)".to_string()
    } else {
        format!("wave {}", wave_number(index))
    }
}

/// How a wave reads to an operator, from its wire status and the hosts of the same status
/// message. The wire state says how far the wave's gate got (a canary that passed stays
/// `passed`); once every host the wave touched is back on its baseline, what happened to it is
/// "rolled_back" (or "rolling_back" while some are still on their way). A wave whose gate failed
/// stays "failed". The counts say how many hosts were rolled back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaveShown {
    /// The state word: the wire state, or `rolling_back` / `rolled_back`.
    pub state: String,
    /// Hosts done, for the progress bar: answered (ok + failed), or rolled back.
    pub done: u32,
    /// "ok 1  failed 0 …", with "rolled back N" / "rolling back N" when there are any.
    pub counts: String,
}

/// See [`WaveShown`].
pub fn wave_shown(w: &wire::WaveStatus, hosts: &[wire::HostProgress]) -> WaveShown {
    let mut rolled_back = 0u32;
    let mut rolling_back = 0u32;
    let mut on_new = 0u32;
    for h in hosts.iter().filter(|h| h.wave == w.index) {
        match h.phase().as_str() {
            "rolled_back" => rolled_back += 1,
            "rolling_back" => rolling_back += 1,
            "dispatched" | "activated" | "healthy" | "confirmed" => on_new += 1,
            _ => {}
        }
    }
    let mut counts = wave_counts(w);
    if rolled_back > 0 {
        let _ = write!(counts, "  rolled back {rolled_back}");
    }
    if rolling_back > 0 {
        let _ = write!(counts, "  rolling back {rolling_back}");
    }
    // A failed wave keeps "failed" (why it was rolled back; its counts say the rest).
    let reverted = rolled_back + rolling_back > 0 && on_new == 0;
    let state = match w.state().as_str() {
        "failed" | "pending" => w.state().as_str(),
        _ if reverted && rolling_back > 0 => "rolling_back",
        _ if reverted => "rolled_back",
        other => other,
    };
    WaveShown {
        state: state.to_string(),
        done: if reverted {
            rolled_back
        } else {
            w.succeeded + w.failed
        },
        counts,
    }
}

/// `serin rollout plan`: each wave with its hosts, then the skipped hosts with their reasons.
pub fn plan_text(plan: &wire::RolloutPlan, p: &Palette) -> String {
    let spec = plan.spec.clone().unwrap_or_default();
    let mut out = format!(
        "plan for {} {} → {}\n  {}\n\n",
        p.bold("service"),
        spec.service,
        p.bold(&spec.release),
        spec_line(&spec)
    );
    if plan.waves.is_empty() {
        out.push_str("no host would change\n");
    }
    for w in &plan.waves {
        let size = if w.size_expr.is_empty() {
            String::new()
        } else {
            format!(" [{}]", w.size_expr)
        };
        let _ = writeln!(
            out,
            "{}{}: {}",
            p.bold(&wave_name(w.index)),
            size,
            plural(w.host_ids.len() as u32, "host", "hosts")
        );
        for h in &w.host_ids {
            let _ = writeln!(out, "  {h}");
        }
    }
    if !plan.skipped.is_empty() {
        let _ = writeln!(
            out,
            "\n{}: {}",
            p.bold("skipped"),
            plural(plan.skipped.len() as u32, "host", "hosts")
        );
        for s in &plan.skipped {
            let _ = writeln!(out, "  {}  {}", s.host_id, p.dim(&s.reason));
        }
    }
    out
}

/// One line describing a wave: "wave 2  2 hosts  baking  [####....] 1/2  ok 1  failed 0 ...";
/// `hosts` are the status's hosts (see [`wave_shown`]).
pub fn wave_line(
    w: &wire::WaveStatus,
    hosts: &[wire::HostProgress],
    now_ms: u64,
    p: &Palette,
) -> String {
    let shown = wave_shown(w, hosts);
    let mut line = format!(
        "{:<16} {:<8} {:<12} {} {}/{}",
        wave_name(w.index),
        plural(w.size, "host", "hosts"),
        shown.state,
        ascii_bar(shown.done, w.size, 20),
        shown.done,
        w.size
    );
    line = line.replacen(&shown.state, &p.state(&shown.state), 1);
    let _ = write!(line, "  {}", shown.counts);
    if let Some(extra) = bake_note(w, now_ms) {
        let _ = write!(line, "  {}", p.dim(&extra));
    }
    line
}

/// "ok 1  failed 0  unreachable 0  in progress 1".
pub fn wave_counts(w: &wire::WaveStatus) -> String {
    let mut s = format!("ok {}  failed {}", w.succeeded, w.failed);
    if w.unreachable > 0 {
        let _ = write!(s, "  unreachable {}", w.unreachable);
    }
    if w.in_progress > 0 {
        let _ = write!(s, "  in progress {}", w.in_progress);
    }
    s
}

/// "bake ends in 3s" while a wave bakes.
pub fn bake_note(w: &wire::WaveStatus, now_ms: u64) -> Option<String> {
    if w.state().as_str() == "baking" && w.bake_ends_unix_ms > 0 {
        let left = w.bake_ends_unix_ms.saturating_sub(now_ms);
        return Some(if left == 0 {
            "bake over, gate next".to_string()
        } else {
            format!(
                "bake ends in {}",
                fmt_duration_ms(left.div_ceil(1000) * 1000)
            )
        });
    }
    None
}

fn hosts_progress_table(hosts: &[wire::HostProgress], p: &Palette) -> String {
    let mut sorted: Vec<&wire::HostProgress> = hosts.iter().collect();
    sorted.sort_by(|a, b| (a.wave, &a.host_id).cmp(&(b.wave, &b.host_id)));
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let rows: Vec<Vec<(String, Style)>> = sorted
        .iter()
        .map(|h| {
            let health = if h.healthy { "healthy" } else { "-" };
            vec![
                cell(&h.host_id),
                cell(wave_number(h.wave).to_string()),
                state_cell(h.phase().as_str()),
                cell(dash(&h.current_release)),
                cell(dash(&h.baseline_release)),
                state_cell(health),
                cell(&h.detail),
            ]
        })
        .collect();
    table(
        p,
        &[
            "HOST", "WAVE", "PHASE", "CURRENT", "BASELINE", "HEALTH", "DETAIL",
        ],
        &rows,
    )
}

/// The canary vs baseline table, side by side.
pub fn comparison_text(c: &wire::Comparison, p: &Palette) -> String {
    let canary = c.canary.unwrap_or_default();
    let base = c.baseline.unwrap_or_default();
    let verdict = if c.verdict.is_empty() {
        "(no verdict yet)"
    } else {
        &c.verdict
    };
    let verdict_style = if c.verdict.contains("worse") || c.verdict.contains("fail") {
        Style::new().fg_color(Some(AnsiColor::Red.into()))
    } else if c.verdict.contains("insufficient") {
        Style::new().fg_color(Some(AnsiColor::Yellow.into()))
    } else if c.verdict.contains("healthy") || c.verdict.contains("pass") {
        Style::new().fg_color(Some(AnsiColor::Green.into()))
    } else {
        Style::new()
    };
    let mut out = format!(
        "{}: {}\n",
        p.bold("canary vs baseline"),
        p.paint(verdict_style, verdict)
    );
    // A side without health reports has no measurements: "-" rather than a misleading 0.
    let measured = |m: &wire::MetricSummary, f: &dyn Fn(&wire::MetricSummary) -> String| {
        if m.reports == 0 {
            "-".to_string()
        } else {
            f(m)
        }
    };
    type Metric<'a> = (&'a str, &'a dyn Fn(&wire::MetricSummary) -> String);
    let metrics: [Metric; 6] = [
        ("check pass rate", &|m| {
            format!("{:.1}%", m.check_pass_rate * 100.0)
        }),
        ("latency p50", &|m| format!("{:.1} ms", m.latency_p50_ms)),
        ("latency p99", &|m| format!("{:.1} ms", m.latency_p99_ms)),
        ("restarts", &|m| m.restarts.to_string()),
        ("cpu", &|m| format!("{:.1}%", m.cpu_percent)),
        ("memory (rss)", &|m| fmt_bytes(m.rss_bytes)),
    ];
    let mut rows: Vec<Vec<(String, Style)>> = vec![
        vec![
            cell("hosts"),
            cell(canary.hosts.to_string()),
            cell(base.hosts.to_string()),
        ],
        vec![
            cell("health reports"),
            cell(canary.reports.to_string()),
            cell(base.reports.to_string()),
        ],
    ];
    for (name, f) in metrics {
        rows.push(vec![
            cell(name),
            cell(measured(&canary, f)),
            cell(measured(&base, f)),
        ]);
    }
    for line in table(p, &["", "CANARY", "BASELINE"], &rows).lines() {
        let _ = writeln!(out, "  {line}");
    }
    out
}

/// One decision, with its evidence on the following line.
pub fn decision_text(d: &wire::Decision, p: &Palette) -> String {
    let actor = if d.actor.is_empty() {
        String::new()
    } else {
        format!(" by {}", d.actor)
    };
    let mut out = format!(
        "{}  wave {}  {}{}: {}\n",
        fmt_clock(d.at_unix_ms),
        wave_number(d.wave),
        p.paint(state_style(d.kind().as_str()).bold(), d.kind().as_str()),
        actor,
        d.reason
    );
    if !d.evidence.is_empty() {
        let _ = writeln!(out, "          evidence: {}", fmt_evidence(&d.evidence));
    }
    out
}

/// `serin rollout status`: state, waves, hosts, the canary comparison and the decisions.
pub fn status_text(s: &wire::RolloutStatus, now_ms: u64, p: &Palette) -> String {
    let spec = s.spec.clone().unwrap_or_default();
    let mut out = format!(
        "rollout {}  {} → {}  {}\n",
        p.bold(&s.rollout_id),
        spec.service,
        p.bold(&spec.release),
        p.paint(state_style(s.state().as_str()).bold(), s.state().as_str()),
    );
    if !s.reason.is_empty() {
        let _ = writeln!(out, "  reason: {}", s.reason);
    }
    let _ = writeln!(out, "  {}", spec_line(&spec));
    let took = if s.finished && s.updated_unix_ms >= s.created_unix_ms && s.created_unix_ms > 0 {
        format!(
            "  (took {})",
            fmt_duration_ms(s.updated_unix_ms - s.created_unix_ms)
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "  created {}  updated {}{}",
        fmt_time(s.created_unix_ms),
        fmt_time(s.updated_unix_ms),
        took
    );

    if !s.waves.is_empty() {
        let _ = writeln!(out, "\n{}", p.bold("waves"));
        for w in &s.waves {
            let marker = if !s.finished && w.index == s.current_wave {
                "▶ "
            } else {
                "  "
            };
            let _ = writeln!(out, "{marker}{}", wave_line(w, &s.hosts, now_ms, p));
        }
    }
    if !s.hosts.is_empty() {
        let total = s.hosts_total as usize;
        let heading = if total > s.hosts.len() {
            format!(
                "{} (a page: {} of {total}; --offset N for another, --all for every host)",
                p.bold("hosts"),
                s.hosts.len()
            )
        } else {
            p.bold("hosts")
        };
        let _ = writeln!(out, "\n{heading}");
        for line in hosts_progress_table(&s.hosts, p).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    if let Some(c) = &s.comparison {
        out.push('\n');
        out.push_str(&comparison_text(c, p));
    }
    if !s.decisions.is_empty() {
        let _ = writeln!(out, "\n{}", p.bold("decisions"));
        for d in &s.decisions {
            for line in decision_text(d, p).lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    out
}

/// `serin rollout explain`: the rollout in one line, every decision with its evidence, then
/// the event log.
pub fn explanation_text(e: &wire::Explanation, p: &Palette) -> String {
    let mut out = String::new();
    if let Some(s) = &e.status {
        let spec = s.spec.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "rollout {}  {} → {}  {}",
            p.bold(&s.rollout_id),
            spec.service,
            p.bold(&spec.release),
            p.paint(state_style(s.state().as_str()).bold(), s.state().as_str())
        );
        if !s.reason.is_empty() {
            let _ = writeln!(out, "  reason: {}", s.reason);
        }
        let _ = writeln!(out, "  {}", spec_line(&spec));
        let touched: Vec<&str> = s
            .hosts
            .iter()
            .filter(|h| !matches!(h.phase().as_str(), "pending" | "skipped"))
            .map(|h| h.host_id.as_str())
            .collect();
        let _ = writeln!(
            out,
            "  hosts touched: {}",
            if touched.is_empty() {
                "none".to_string()
            } else {
                touched.join(", ")
            }
        );
        if let Some(c) = &s.comparison {
            out.push('\n');
            out.push_str(&comparison_text(c, p));
        }
    }
    // The decisions of the explanation; fall back to the status's when the list is empty.
    let decisions = if e.decisions.is_empty() {
        e.status
            .as_ref()
            .map(|s| s.decisions.as_slice())
            .unwrap_or_default()
    } else {
        e.decisions.as_slice()
    };
    let _ = writeln!(out, "\n{} ({})", p.bold("decisions"), decisions.len());
    if decisions.is_empty() {
        out.push_str("  none yet\n");
    }
    for d in decisions {
        for line in decision_text(d, p).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    let _ = writeln!(out, "\n{} ({})", p.bold("events"), e.events.len());
    for ev in &e.events {
        let _ = writeln!(out, "  {ev}");
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A rollout of web 2.0.0 over three hosts: the canary passed, wave 1 is baking.
    pub(crate) fn sample_status() -> wire::RolloutStatus {
        let host =
            |id: &str, wave: u32, phase: &str, current: &str, healthy: bool| wire::HostProgress {
                host_id: id.into(),
                hostname: id.into(),
                wave,
                phase: wire::HostPhase::from_word(phase).unwrap() as i32,
                baseline_release: "1.0.0".into(),
                target_release: "2.0.0".into(),
                current_release: current.into(),
                healthy,
                detail: String::new(),
                labels: HashMap::from([("zone".to_string(), "a".to_string())]),
            };
        wire::RolloutStatus {
            rollout_id: "r-42".into(),
            spec: Some(wire::RolloutSpec {
                service: "web".into(),
                release: "2.0.0".into(),
                waves: vec!["1".into(), "50%".into(), "100%".into()],
                bake_ms: 3_000,
                canary_bake_ms: 5_000,
                on_failure: wire::OnFailure::Rollback as i32,
                ..Default::default()
            }),
            state: wire::RolloutState::from_word("running").unwrap() as i32,
            reason: String::new(),
            current_wave: 1,
            waves: vec![
                wire::WaveStatus {
                    index: 0,
                    size: 1,
                    state: wire::WaveState::from_word("passed").unwrap() as i32,
                    succeeded: 1,
                    started_unix_ms: 1_000_000,
                    ..Default::default()
                },
                wire::WaveStatus {
                    index: 1,
                    size: 1,
                    state: wire::WaveState::from_word("baking").unwrap() as i32,
                    succeeded: 1,
                    started_unix_ms: 1_010_000,
                    bake_ends_unix_ms: 1_013_000,
                    ..Default::default()
                },
                wire::WaveStatus {
                    index: 2,
                    size: 1,
                    state: wire::WaveState::from_word("pending").unwrap() as i32,
                    ..Default::default()
                },
            ],
            hosts: vec![
                host("web-01", 0, "confirmed", "2.0.0", true),
                host("web-02", 1, "healthy", "2.0.0", true),
                host("web-03", 2, "pending", "1.0.0", true),
            ],
            comparison: Some(wire::Comparison {
                canary: Some(wire::MetricSummary {
                    hosts: 1,
                    reports: 12,
                    check_pass_rate: 1.0,
                    latency_p50_ms: 1.25,
                    latency_p99_ms: 4.5,
                    restarts: 0,
                    cpu_percent: 0.5,
                    rss_bytes: 3 * 1024 * 1024,
                }),
                baseline: Some(wire::MetricSummary {
                    hosts: 2,
                    reports: 24,
                    check_pass_rate: 0.975,
                    latency_p50_ms: 1.0,
                    latency_p99_ms: 3.0,
                    restarts: 1,
                    cpu_percent: 0.4,
                    rss_bytes: 2 * 1024 * 1024,
                }),
                verdict: "canary healthy".into(),
            }),
            decisions: vec![wire::Decision {
                at_unix_ms: 1_009_000,
                wave: 0,
                kind: wire::DecisionKind::from_word("promote").unwrap() as i32,
                reason: "canary gate passed".into(),
                evidence: HashMap::from([
                    ("failed".to_string(), "0".to_string()),
                    ("threshold".to_string(), "0".to_string()),
                ]),
                actor: "engine".into(),
            }],
            created_unix_ms: 1_000_000,
            updated_unix_ms: 1_011_000,
            finished: false,
            hosts_total: 0,
        }
    }

    #[test]
    fn status_text_shows_waves_hosts_comparison_and_decisions() {
        let s = sample_status();
        let text = status_text(&s, 1_011_000, &Palette::plain());
        assert!(!text.contains('\u{1b}'), "plain mode has no escape codes");
        for needle in [
            "rollout r-42",
            "web → 2.0.0",
            "running",
            "waves 1,50%,100%",
            "bake 3s (canary 5s)",
            "on failure rollback",
            "wave 1 (canary)",
            "passed",
            "baking",
            "bake ends in 2s",
            "web-01",
            "web-02",
            "web-03",
            "confirmed",
            "canary vs baseline: canary healthy",
            "check pass rate",
            "100.0%",
            "97.5%",
            "latency p50",
            "1.2 ms",
            "latency p99",
            "4.5 ms",
            "restarts",
            "3.0 MiB",
            "promote by engine: canary gate passed",
            "evidence: failed=0 threshold=0",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        // Canary and baseline values are side by side on one line.
        let pass = text
            .lines()
            .find(|l| l.contains("check pass rate"))
            .expect("pass rate row");
        assert!(pass.contains("100.0%") && pass.contains("97.5%"), "{pass}");
        // The wave marker points at the current wave.
        assert!(text.lines().any(|l| l.starts_with("▶ wave 2")), "{text}");
    }

    #[test]
    fn a_side_without_reports_shows_no_measurements() {
        let mut s = sample_status();
        if let Some(c) = s.comparison.as_mut() {
            c.baseline = Some(wire::MetricSummary::default());
        }
        let text = status_text(&s, 1_011_000, &Palette::plain());
        let row = text
            .lines()
            .find(|l| l.contains("check pass rate"))
            .expect("pass rate row");
        assert!(row.trim_end().ends_with('-'), "{row}");
        assert!(row.contains("100.0%"), "{row}");
    }

    #[test]
    fn coloured_text_differs_only_by_escape_codes() {
        let s = sample_status();
        let coloured = status_text(&s, 1_011_000, &Palette { enabled: true });
        assert!(coloured.contains('\u{1b}'));
        let stripped = anstream::adapter::strip_str(&coloured).to_string();
        assert_eq!(stripped, status_text(&s, 1_011_000, &Palette::plain()));
    }

    #[test]
    fn status_text_says_when_its_hosts_are_a_page() {
        let mut s = sample_status();
        let shown = s.hosts.len();
        s.hosts_total = shown as u32;
        let whole = status_text(&s, 1_011_000, &Palette::plain());
        assert!(!whole.contains("a page"), "{whole}");
        s.hosts_total = 19_900;
        let page = status_text(&s, 1_011_000, &Palette::plain());
        assert!(
            page.contains(&format!(
                "hosts (a page: {shown} of 19900; --offset N for another, --all for every host)"
            )),
            "{page}"
        );
        assert_eq!(status_json(&s)["hosts_total"], 19_900);
    }

    #[test]
    fn status_json_is_valid_and_has_the_fields() {
        let s = sample_status();
        let v = status_json(&s);
        let text = serde_json::to_string(&v).expect("serialise");
        let back: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(back["rollout_id"], "r-42");
        assert_eq!(back["state"], "running");
        assert_eq!(back["spec"]["on_failure"], "rollback");
        assert_eq!(back["spec"]["waves"][1], "50%");
        assert_eq!(back["waves"][1]["state"], "baking");
        assert_eq!(back["waves"][1]["bake_ends_unix_ms"], 1_013_000);
        assert_eq!(back["hosts"][0]["host_id"], "web-01");
        assert_eq!(back["hosts"][0]["labels"]["zone"], "a");
        assert_eq!(back["comparison"]["verdict"], "canary healthy");
        assert_eq!(back["comparison"]["baseline"]["restarts"], 1);
        assert_eq!(back["decisions"][0]["evidence"]["threshold"], "0");
        assert_eq!(back["finished"], false);
    }

    #[test]
    fn plan_text_lists_waves_and_skipped_hosts() {
        let plan = wire::RolloutPlan {
            spec: sample_status().spec,
            waves: vec![
                wire::PlannedWave {
                    index: 0,
                    host_ids: vec!["web-01".into()],
                    size_expr: "1".into(),
                },
                wire::PlannedWave {
                    index: 1,
                    host_ids: vec!["web-02".into(), "web-03".into()],
                    size_expr: "100%".into(),
                },
            ],
            skipped: vec![wire::SkippedHost {
                host_id: "web-04".into(),
                reason: "unreachable".into(),
            }],
        };
        let text = plan_text(&plan, &Palette::plain());
        assert!(text.contains("wave 1 (canary) [1]: 1 host"), "{text}");
        assert!(text.contains("wave 2 [100%]: 2 hosts"), "{text}");
        assert!(text.contains("skipped: 1 host"), "{text}");
        assert!(text.contains("web-04  unreachable"), "{text}");
        let v = plan_json(&plan);
        assert_eq!(v["waves"][1]["host_ids"][1], "web-03");
        assert_eq!(v["skipped"][0]["reason"], "unreachable");
    }

    #[test]
    fn hosts_summary_then_the_first_page_and_how_to_see_the_rest() {
        let count = |key: &str, count| wire::SummaryCount {
            key: key.into(),
            count,
        };
        let resp = wire::ListHostsResponse {
            hosts: vec![wire::HostInfo {
                host_id: "h00001".into(),
                connected: true,
                ..Default::default()
            }],
            next_page_token: "h00001".into(),
            summary: Some(wire::HostsSummary {
                hosts: 19_900,
                connected: 19_890,
                states: vec![count("web running", 19_900)],
                releases: vec![count("web=web-2", 19_000), count("web=web-1", 900)],
                labels: vec![count("zone=a", 10_000)],
                labels_left_off: 3,
                ..Default::default()
            }),
        };
        let text = hosts_summary_text(&resp, 0, &Palette::plain());
        for needle in [
            "19900 hosts: 19890 connected, 10 disconnected",
            "states    web running 19900",
            "releases  web=web-2 19000, web=web-1 900",
            "labels    zone=a 10000 (+3 more)",
            "h00001",
            "(first 1 hosts of 19900; `serin hosts --all` lists every host)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        let v = hosts_json(&resp);
        assert_eq!(v["summary"]["hosts"], 19_900);
        assert_eq!(v["summary"]["releases"][1]["key"], "web=web-1");
        assert_eq!(v["next_page_token"], "h00001");
    }

    #[test]
    fn hosts_table_and_json() {
        let hosts = vec![wire::HostInfo {
            host_id: "demo-01".into(),
            hostname: "box1".into(),
            labels: HashMap::from([
                ("zone".to_string(), "b".to_string()),
                ("role".to_string(), "web".to_string()),
            ]),
            connected: true,
            last_seen_unix_ms: 9_000,
            agent_version: "0.1.0".into(),
            services: vec![wire::ServiceInventory {
                service: "demo".into(),
                current_release: "2.0.0".into(),
                state: wire::ServiceState::Running as i32,
                healthy: true,
                ..Default::default()
            }],
            health: vec![wire::HealthReport {
                service: "demo".into(),
                release: "2.0.0".into(),
                healthy: true,
                checks: vec![wire::CheckResult {
                    name: "http".into(),
                    kind: wire::CheckKind::Http as i32,
                    passing: true,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }];
        let text = hosts_text(&hosts, 10_000, &Palette::plain());
        let mut lines = text.lines();
        let header = lines.next().expect("header");
        assert!(header.starts_with("HOST"), "{header}");
        let row = lines.next().expect("row");
        for needle in [
            "demo-01",
            "box1",
            "connected",
            "1s ago",
            "role=web,zone=b",
            "demo=2.0.0 (running, healthy)",
        ] {
            assert!(row.contains(needle), "missing {needle:?} in {row:?}");
        }
        let v = hosts_json(&wire::ListHostsResponse {
            hosts,
            ..Default::default()
        });
        assert_eq!(v["hosts"][0]["services"][0]["state"], "running");
        assert_eq!(v["hosts"][0]["services"][0]["current_release"], "2.0.0");
        assert_eq!(v["hosts"][0]["health"][0]["checks"][0]["kind"], "http");
    }

    #[test]
    fn explanation_lists_decisions_and_events() {
        let mut status = sample_status();
        status.state = wire::RolloutState::from_word("rolled_back").unwrap() as i32;
        status.reason = "canary failed".into();
        let e = wire::Explanation {
            decisions: status.decisions.clone(),
            status: Some(status),
            events: vec![
                "12:00:00 wave 0 dispatched to web-01".into(),
                "12:00:05 web-01 failed".into(),
            ],
        };
        let text = explanation_text(&e, &Palette::plain());
        for needle in [
            "rolled_back",
            "reason: canary failed",
            "hosts touched: web-01, web-02",
            "decisions (1)",
            "evidence: failed=0 threshold=0",
            "events (2)",
            "web-01 failed",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        let v = explanation_json(&e);
        assert_eq!(v["events"][1], "12:00:05 web-01 failed");
        assert_eq!(v["status"]["reason"], "canary failed");
    }

    #[test]
    fn formatting_helpers() {
        assert_eq!(fmt_duration_ms(850), "850ms");
        assert_eq!(fmt_duration_ms(1_500), "1.5s");
        assert_eq!(fmt_duration_ms(12_000), "12s");
        assert_eq!(fmt_duration_ms(200_000), "3m 20s");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(ascii_bar(1, 2, 10), "[#####.....]");
        assert_eq!(ascii_bar(0, 0, 4), "[####]");
        assert_eq!(fmt_time(0), "-");
        assert_eq!(fmt_clock(3_723_000), "01:02:03");
    }

    /// The sample after a failed wave 2 and the automatic rollback: the canary had passed.
    pub(crate) fn rolled_back_status() -> wire::RolloutStatus {
        let mut s = sample_status();
        s.state = wire::RolloutState::from_word("rolled_back").unwrap() as i32;
        s.finished = true;
        s.reason = "wave 2 failed; every touched host is back on its baseline".into();
        // The engine counts healthy hosts: after the rollback the passed canary has none.
        s.waves[0].succeeded = 0;
        s.waves[1].state = wire::WaveState::from_word("failed").unwrap() as i32;
        s.waves[1].succeeded = 0;
        s.waves[1].failed = 1;
        for h in &mut s.hosts[..2] {
            h.phase = wire::HostPhase::from_word("rolled_back").unwrap() as i32;
            h.current_release = "1.0.0".into();
        }
        s
    }

    #[test]
    fn waves_count_from_one_wherever_operators_read() {
        let s = sample_status();
        let p = Palette::plain();
        let text = status_text(&s, 1_011_000, &p);
        assert!(!text.contains("wave 0"), "a wave 0 is shown:\n{text}");
        for needle in ["wave 1 (canary)", "▶ wave 2", "  wave 3 "] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        // The hosts table: web-01 is the canary (wave 1), web-03 in wave 3.
        let wave_of = |host: &str| {
            let row = text
                .lines()
                .find(|l| l.trim_start().starts_with(host))
                .unwrap_or_else(|| panic!("no row for {host} in:\n{text}"));
            row.split_whitespace().nth(1).unwrap().to_string()
        };
        assert_eq!(wave_of("web-01"), "1");
        assert_eq!(wave_of("web-03"), "3");
        // The canary's decision.
        assert!(text.contains("wave 1  promote by engine"), "{text}");
        // `rollout list` and the live view's header say the same as the wave marker: 2 of 3.
        let list = rollouts_text(std::slice::from_ref(&s), &p);
        assert!(list.contains("2/3"), "{list}");
        let header = crate::watch::header_text(&s, &p);
        assert!(header.ends_with("wave 2/3"), "{header}");
        // JSON keeps the coordinator's 0-based fields unchanged.
        let json = status_json(&s);
        assert_eq!(json["current_wave"], 1);
        assert_eq!(json["waves"][0]["index"], 0);
    }

    #[test]
    fn a_rolled_back_canary_says_it_was_rolled_back() {
        let s = rolled_back_status();
        let text = status_text(&s, 1_020_000, &Palette::plain());
        let line = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("no {name:?} line in:\n{text}"))
                .to_string()
        };
        let canary = line("wave 1 (canary)");
        assert!(
            canary.contains("rolled_back") && canary.contains("rolled back 1"),
            "{canary}"
        );
        assert!(!canary.contains("passed"), "{canary}");
        assert!(
            canary.contains("1/1"),
            "the bar counts the rolled back host: {canary}"
        );
        // The wave whose gate failed keeps saying so, and that its host went back.
        let failed = line("wave 2 ");
        assert!(
            failed.contains("failed") && failed.contains("rolled back 1"),
            "{failed}"
        );
        // The untouched wave is still pending.
        assert!(line("wave 3 ").contains("pending"), "{text}");
        // While the rollback runs the canary reads rolling_back.
        let mut during = s.clone();
        during.hosts[0].phase = wire::HostPhase::from_word("rolling_back").unwrap() as i32;
        let shown = wave_shown(&during.waves[0], &during.hosts);
        assert_eq!(shown.state, "rolling_back");
        assert!(shown.counts.contains("rolling back 1"), "{}", shown.counts);
        // One host of a healthy wave rolled back alone does not make the wave "rolled back".
        let mut one = sample_status();
        one.waves[1].size = 2;
        let mut extra = one.hosts[1].clone();
        extra.host_id = "web-09".into();
        extra.phase = wire::HostPhase::from_word("rolled_back").unwrap() as i32;
        one.hosts.push(extra);
        let shown = wave_shown(&one.waves[1], &one.hosts);
        assert_eq!(shown.state, "baking");
        assert!(shown.counts.contains("rolled back 1"), "{}", shown.counts);
    }

    #[test]
    fn long_lines_are_fitted_to_the_terminal_width() {
        let hint = " (full text: serin rollout explain r-42)";
        let evidence: String = (0..40)
            .map(|i| format!("canary_metric_{i}=0.{i:04}"))
            .collect::<Vec<_>>()
            .join(" ");
        let line = format!("decision: wave 1 rollback: canary worse than baseline [{evidence}]");
        assert!(line.len() > 3 * 160);
        let fitted = fit_width(&line, 160, hint);
        assert_eq!(console::measure_text_width(&fitted), 160, "{fitted}");
        assert!(
            fitted.starts_with("decision: wave 1 rollback: canary worse"),
            "{fitted}"
        );
        assert!(fitted.ends_with(&format!("…{hint}")), "{fitted}");
        // Narrow terminals: no room for the hint, still cut to the width.
        let narrow = fit_width(&line, 40, hint);
        assert_eq!(console::measure_text_width(&narrow), 40, "{narrow}");
        // A line that fits is unchanged; escape codes take no columns.
        let coloured = Palette { enabled: true }.state("rolled_back");
        assert_eq!(fit_width(&coloured, 11, hint), coloured);
        assert_eq!(fit_width("short", 160, hint), "short");
    }
}
