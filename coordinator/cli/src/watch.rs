//! The live view of a rollout (`rollout start --wait`, `rollout status --watch`).
//!
//! It follows `WatchRollout` until the rollout finishes or pauses for an operator. In a terminal
//! it redraws progress bars (indicatif) and prints host transitions and decisions above them;
//! when piped it prints one plain line per change. Either way it ends with the full status and a
//! summary line, and returns the exit code the final state maps to. With `-o json` it prints
//! every status message as one JSON line.
//!
//! A broken stream (the coordinator restarting) is re-opened with a short backoff; the rollout
//! itself lives in the coordinator, so nothing is lost.

use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serin_proto::wire;
use tokio_stream::StreamExt;

use super::args::OutputFormat;
use super::client::Control;
use super::exit::{CliError, Exit};
use super::render::{self, Palette};

/// How long the view keeps trying to re-open a broken watch stream before it gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(30);

/// Milliseconds since the unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The plain-text lines describing what changed from `prev` to `next`: rollout state, wave
/// states, host phases, the comparison verdict and new decisions. `prev = None` describes `next`
/// from scratch (only its state and current wave).
pub fn changes(prev: Option<&wire::RolloutStatus>, next: &wire::RolloutStatus) -> Vec<String> {
    let mut out = Vec::new();
    let Some(prev) = prev else {
        let spec = next.spec.clone().unwrap_or_default();
        out.push(format!(
            "rollout {} of {} {}: {}{}",
            next.rollout_id,
            spec.service,
            spec.release,
            next.state().as_str(),
            if next.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", next.reason)
            }
        ));
        for w in &next.waves {
            if w.state().as_str() != "pending" {
                out.push(format!(
                    "wave {}: {} ({})",
                    w.index,
                    w.state().as_str(),
                    render::wave_counts(w)
                ));
            }
        }
        return out;
    };
    if prev.state().as_str() != next.state().as_str() {
        out.push(format!(
            "rollout {}: {} → {}{}",
            next.rollout_id,
            prev.state().as_str(),
            next.state().as_str(),
            if next.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", next.reason)
            }
        ));
    }
    for w in &next.waves {
        let before = prev.waves.iter().find(|p| p.index == w.index);
        let old = before.map(|b| b.state().as_str()).unwrap_or("pending");
        if old != w.state().as_str() {
            out.push(format!(
                "wave {}: {} → {} ({} of {} hosts: {})",
                w.index,
                old,
                w.state().as_str(),
                w.succeeded + w.failed,
                w.size,
                render::wave_counts(w)
            ));
        }
    }
    for h in &next.hosts {
        let before = prev.hosts.iter().find(|p| p.host_id == h.host_id);
        let old = before.map(|b| b.phase().as_str()).unwrap_or("pending");
        if old != h.phase().as_str() {
            let mut line = format!(
                "host {} (wave {}): {} → {}",
                h.host_id,
                h.wave,
                old,
                h.phase().as_str()
            );
            if !h.current_release.is_empty() {
                line.push_str(&format!(", serving {}", h.current_release));
            }
            if !h.detail.is_empty() {
                line.push_str(&format!(" ({})", h.detail));
            }
            out.push(line);
        }
    }
    let verdict = |s: &wire::RolloutStatus| {
        s.comparison
            .as_ref()
            .map(|c| c.verdict.clone())
            .unwrap_or_default()
    };
    if verdict(prev) != verdict(next) && !verdict(next).is_empty() {
        out.push(format!("canary vs baseline: {}", verdict(next)));
    }
    for d in next.decisions.iter().skip(prev.decisions.len()) {
        let mut line = format!(
            "decision: wave {} {}: {}",
            d.wave,
            d.kind().as_str(),
            d.reason
        );
        if !d.evidence.is_empty() {
            line.push_str(&format!(" [{}]", render::fmt_evidence(&d.evidence)));
        }
        out.push(line);
    }
    out
}

/// The summary line printed when the view ends.
pub fn summary(s: &wire::RolloutStatus, exit: Exit) -> String {
    let spec = s.spec.clone().unwrap_or_default();
    let took = if s.updated_unix_ms > s.created_unix_ms && s.created_unix_ms > 0 {
        format!(
            " after {}",
            render::fmt_duration_ms(s.updated_unix_ms - s.created_unix_ms)
        )
    } else {
        String::new()
    };
    let reason = if s.reason.is_empty() {
        String::new()
    } else {
        format!(": {}", s.reason)
    };
    let hint = match exit {
        Exit::Paused => format!(
            "\nthe rollout waits for an operator: serin rollout resume|retry|abort {}",
            s.rollout_id
        ),
        _ => String::new(),
    };
    format!(
        "rollout {} of {} {} {}{took}{reason} (exit {}){hint}",
        s.rollout_id,
        spec.service,
        spec.release,
        s.state().as_str(),
        exit.code()
    )
}

/// Where the live view writes.
enum View {
    /// NDJSON: every status message as one line.
    Json,
    /// One plain line per change, prefixed with the elapsed time.
    Lines { started: Instant, palette: Palette },
    /// indicatif bars redrawn in place, transitions printed above them.
    Live(Box<LiveBars>),
}

/// The progress bars of the terminal view.
struct LiveBars {
    multi: MultiProgress,
    header: ProgressBar,
    waves: Vec<ProgressBar>,
    palette: Palette,
    wave_style: ProgressStyle,
}

impl LiveBars {
    fn new(palette: Palette) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
        let header = multi.add(ProgressBar::new_spinner());
        header.set_style(
            ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        header.enable_steady_tick(Duration::from_millis(120));
        let template = if palette.enabled() {
            "  {prefix:<16} [{bar:30.green/white}] {pos}/{len} {msg}"
        } else {
            "  {prefix:<16} [{bar:30}] {pos}/{len} {msg}"
        };
        let wave_style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        LiveBars {
            multi,
            header,
            waves: Vec::new(),
            palette,
            wave_style,
        }
    }

    fn update(&mut self, s: &wire::RolloutStatus, now: u64) {
        let p = &self.palette;
        let spec = s.spec.clone().unwrap_or_default();
        let total = s.waves.len().max(spec.waves.len());
        self.header.set_message(format!(
            "rollout {}  {} → {}  {}  wave {}/{}",
            p.bold(&s.rollout_id),
            spec.service,
            p.bold(&spec.release),
            p.state(s.state().as_str()),
            (s.current_wave as usize + 1).min(total.max(1)),
            total
        ));
        for w in s.waves.iter().skip(self.waves.len()) {
            // Built with its length and prefix before it is added, so it never draws as 0/0.
            let bar = ProgressBar::hidden()
                .with_style(self.wave_style.clone())
                .with_prefix(if w.index == 0 {
                    "wave 0 (canary)".to_string()
                } else {
                    format!("wave {}", w.index)
                });
            bar.set_length(u64::from(w.size));
            bar.set_position(u64::from(w.succeeded + w.failed));
            self.waves.push(self.multi.add(bar));
        }
        for (bar, w) in self.waves.iter().zip(&s.waves) {
            bar.set_length(u64::from(w.size));
            bar.set_position(u64::from(w.succeeded + w.failed));
            let mut msg = format!(
                "{}  {}",
                p.state(w.state().as_str()),
                render::wave_counts(w)
            );
            if let Some(note) = render::bake_note(w, now) {
                msg.push_str(&format!("  {}", p.dim(&note)));
            }
            bar.set_message(msg);
        }
    }

    fn println(&self, line: &str) {
        let _ = self.multi.println(line);
    }

    fn finish(&self) {
        self.header.finish_and_clear();
        for b in &self.waves {
            b.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

impl View {
    fn new(output: OutputFormat) -> Self {
        match output {
            OutputFormat::Json => View::Json,
            OutputFormat::Text if std::io::stdout().is_terminal() => {
                View::Live(Box::new(LiveBars::new(Palette::for_stdout())))
            }
            OutputFormat::Text => View::Lines {
                started: Instant::now(),
                palette: Palette::plain(),
            },
        }
    }

    fn show(&mut self, prev: Option<&wire::RolloutStatus>, next: &wire::RolloutStatus) {
        match self {
            View::Json => {
                anstream::println!("{}", render::status_json(next));
            }
            View::Lines { started, palette } => {
                let elapsed = started.elapsed().as_secs_f64();
                for line in changes(prev, next) {
                    anstream::println!("{} {}", palette.dim(&format!("[{elapsed:6.1}s]")), line);
                }
            }
            View::Live(bars) => {
                for line in changes(prev, next) {
                    bars.println(&line);
                }
                bars.update(next, now_ms());
            }
        }
    }

    fn tick(&mut self, last: &wire::RolloutStatus) {
        if let View::Live(bars) = self {
            bars.update(last, now_ms());
        }
    }

    /// Ends the view with the full status (text) and the summary line.
    fn end(&mut self, last: &wire::RolloutStatus, exit: Exit, timed_out: bool) {
        let palette = match self {
            View::Json => return,
            View::Lines { palette, .. } => *palette,
            View::Live(bars) => {
                bars.finish();
                bars.palette
            }
        };
        anstream::println!();
        anstream::print!("{}", render::status_text(last, now_ms(), &palette));
        anstream::println!();
        if timed_out {
            anstream::println!(
                "gave up waiting: rollout {} is still {} (exit {}); follow it with `serin rollout status {} --watch`",
                last.rollout_id,
                last.state().as_str(),
                exit.code(),
                last.rollout_id
            );
        } else {
            anstream::println!("{}", palette.bold(&summary(last, exit)));
        }
    }
}

/// Follows rollout `id` until it finishes or pauses, or `timeout` passes. `first` is a status
/// already known (e.g. StartRollout's answer), shown before the stream's first message.
pub async fn follow(
    control: &mut Control,
    id: &str,
    first: Option<wire::RolloutStatus>,
    output: OutputFormat,
    timeout: Option<Duration>,
) -> Result<Exit, CliError> {
    let mut view = View::new(output);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last: Option<wire::RolloutStatus> = None;
    if let Some(s) = first {
        view.show(None, &s);
        if let Some(exit) = final_exit(&s) {
            view.end(&s, exit, false);
            return Ok(exit);
        }
        last = Some(s);
    }
    let mut broken_since: Option<Instant> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    loop {
        let request = wire::RolloutRef {
            rollout_id: id.to_string(),
        };
        let opened = tokio::select! {
            r = control.client.watch_rollout(request) => r,
            _ = sleep_until(deadline) => return Ok(timed_out(&mut view, last.as_ref(), id)),
        };
        let mut stream = match opened {
            Ok(resp) => {
                broken_since = None;
                resp.into_inner()
            }
            Err(status) => {
                retry_or_fail(control, "watch rollout", status, &mut broken_since)?;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = sleep_until(deadline) => return Ok(timed_out(&mut view, last.as_ref(), id)),
                }
            }
        };
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(Ok(s)) => {
                        view.show(last.as_ref(), &s);
                        if let Some(exit) = final_exit(&s) {
                            view.end(&s, exit, false);
                            return Ok(exit);
                        }
                        last = Some(s);
                    }
                    Some(Err(status)) => {
                        retry_or_fail(control, "watch rollout", status, &mut broken_since)?;
                        break;
                    }
                    None => {
                        // The stream ended without a final state: ask once, then re-open.
                        match control.client.get_rollout(wire::RolloutRef { rollout_id: id.to_string() }).await {
                            Ok(resp) => {
                                let s = resp.into_inner();
                                view.show(last.as_ref(), &s);
                                if let Some(exit) = final_exit(&s) {
                                    view.end(&s, exit, false);
                                    return Ok(exit);
                                }
                                last = Some(s);
                            }
                            Err(status) => {
                                retry_or_fail(control, "get rollout", status, &mut broken_since)?;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                },
                _ = ticker.tick() => {
                    if let Some(l) = &last {
                        view.tick(l);
                    }
                }
                _ = sleep_until(deadline) => return Ok(timed_out(&mut view, last.as_ref(), id)),
            }
        }
    }
}

/// The exit code if `s` ends the view: finished, or paused for an operator.
fn final_exit(s: &wire::RolloutStatus) -> Option<Exit> {
    match Exit::for_rollout_state(s.state()) {
        Some(e) => Some(e),
        None if s.finished => Some(Exit::RolloutFailed),
        None => None,
    }
}

fn timed_out(view: &mut View, last: Option<&wire::RolloutStatus>, id: &str) -> Exit {
    match last {
        Some(l) => view.end(l, Exit::Timeout, true),
        None => {
            if let View::Live(bars) = view {
                bars.finish();
            }
            eprintln!("gave up waiting for rollout {id}: no status arrived in time");
        }
    }
    Exit::Timeout
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Decides whether a failed watch is worth retrying: transport trouble is retried for
/// [`RECONNECT_FOR`]; a rejection (unknown rollout, ...) is returned at once.
fn retry_or_fail(
    control: &Control,
    what: &str,
    status: tonic::Status,
    broken_since: &mut Option<Instant>,
) -> Result<(), CliError> {
    let transient = matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
    );
    if !transient {
        return Err(control.err(what, status));
    }
    let since = *broken_since.get_or_insert_with(Instant::now);
    if since.elapsed() > RECONNECT_FOR {
        return Err(control.err(what, status));
    }
    tracing::debug!(error = %status, "watch stream broke, re-opening");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tests::sample_status;

    #[test]
    fn changes_name_each_transition() {
        let before = sample_status();
        let mut after = before.clone();
        after.state = wire::RolloutState::from_word("rolling_back").unwrap() as i32;
        after.reason = "wave 1 failed".into();
        after.waves[1].state = wire::WaveState::from_word("failed").unwrap() as i32;
        after.waves[1].failed = 1;
        after.waves[1].succeeded = 0;
        after.hosts[1].phase = wire::HostPhase::from_word("rolling_back").unwrap() as i32;
        after.hosts[1].detail = "unhealthy: http check failing".into();
        after.decisions.push(wire::Decision {
            at_unix_ms: 1_012_000,
            wave: 1,
            kind: wire::DecisionKind::from_word("rollback").unwrap() as i32,
            reason: "1 failed host, threshold 0".into(),
            evidence: [("failed".to_string(), "1".to_string())].into(),
            actor: "engine".into(),
        });
        let lines = changes(Some(&before), &after);
        let all = lines.join("\n");
        for needle in [
            "rollout r-42: running → rolling_back (wave 1 failed)",
            "wave 1: baking → failed",
            "host web-02 (wave 1): healthy → rolling_back, serving 2.0.0 (unhealthy: http check failing)",
            "decision: wave 1 rollback: 1 failed host, threshold 0 [failed=1]",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(lines.len(), 4, "{all}");
        assert!(changes(Some(&after), &after).is_empty());
    }

    #[test]
    fn the_first_status_is_described_from_scratch() {
        let lines = changes(None, &sample_status());
        assert!(lines[0].starts_with("rollout r-42 of web 2.0.0: running"));
        assert!(lines.iter().any(|l| l.starts_with("wave 1: baking")));
    }

    #[test]
    fn the_view_ends_on_final_and_paused_states_only() {
        let mut s = sample_status();
        assert_eq!(final_exit(&s), None);
        s.state = wire::RolloutState::from_word("waiting").unwrap() as i32;
        assert_eq!(final_exit(&s), None);
        s.state = wire::RolloutState::from_word("paused").unwrap() as i32;
        assert_eq!(final_exit(&s), Some(Exit::Paused));
        s.state = wire::RolloutState::from_word("rolled_back").unwrap() as i32;
        s.finished = true;
        assert_eq!(final_exit(&s), Some(Exit::RolloutFailed));
        s.state = wire::RolloutState::from_word("succeeded").unwrap() as i32;
        assert_eq!(final_exit(&s), Some(Exit::Success));
        let line = summary(&s, Exit::Success);
        assert!(
            line.contains("rollout r-42 of web 2.0.0 succeeded after 11s"),
            "{line}"
        );
    }
}
