//! The live view of a rollout (`rollout start --wait`, `rollout status --watch`).
//!
//! It follows `WatchRollout` until the rollout finishes or pauses for an operator. In a terminal
//! it redraws progress bars (indicatif) and prints host transitions and decisions above them;
//! when piped it prints one plain line per change. Either way it ends with the full status and a
//! summary line, and returns the exit code the final state maps to. With `-o json` it prints
//! every status message as one JSON line.
//!
//! It asks for a page of hosts ([`HostPage`], the first 100 by default; `--all` for every host):
//! the waves and their counts always cover every host, the host lines cover the page.
//!
//! A broken stream (the coordinator restarting) is re-opened with a short backoff; the rollout
//! itself lives in the coordinator, so nothing is lost.
//!
//! What operators read: waves count from 1 (the canary is wave 1), as everywhere the CLI prints
//! text; a wave whose hosts all went back to their baseline reads `rolled_back`; a host that
//! joins mid-rollout is announced ("host h7 joined wave 3"); in a terminal every line is fitted
//! to its width (the full text is in `serin rollout explain` and `-o json`); and a rollout that
//! succeeded is shown once its last hosts confirmed (for up to [`SETTLE_FOR`]).

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
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

/// How long a view that saw the rollout succeed waits for its last hosts' confirmations (the
/// coordinator confirms a wave's hosts when its gate passes, so the last wave's are sent as the
/// rollout succeeds and are answered within moments).
pub const SETTLE_FOR: Duration = Duration::from_secs(5);

/// How often a succeeded rollout is asked for again while its last hosts confirm, at first:
/// the confirmations are one round trip and one fsync away (a few ms), and `--wait` of a small
/// rollout ends up to this much later than they do (100 ms made a 50-host `--wait` ~50 ms slower
/// on average, 20 ms ~10 ms).
const SETTLE_POLL: Duration = Duration::from_millis(5);

/// After [`SETTLE_QUICK_FOR`] the pause doubles up to this: a host that does not confirm soon
/// (gone, or a large fleet's long tail) is not asked about 200 times a second for the whole
/// [`SETTLE_FOR`], each answer a status with every host.
const SETTLE_POLL_MAX: Duration = Duration::from_millis(100);

/// How long the succeeded rollout is asked for every [`SETTLE_POLL`].
const SETTLE_QUICK_FOR: Duration = Duration::from_millis(100);

/// True while a succeeded rollout still has hosts on the new release that have not confirmed
/// (the watch stream ends at the first finished status, before their answers).
pub fn awaiting_confirmation(s: &wire::RolloutStatus) -> bool {
    s.state().as_str() == "succeeded"
        && s.hosts
            .iter()
            .any(|h| matches!(h.phase().as_str(), "dispatched" | "activated" | "healthy"))
}

/// Which of a rollout's hosts the view asks the coordinator for: `limit` hosts from `offset`
/// (limit 0: every host). The waves and their counts always cover every host, so a page keeps the
/// view's wave lines exact at any fleet size while its host lines cover the page only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPage {
    /// Hosts skipped before the page, in the status's order (wave, then host id).
    pub offset: u32,
    /// Hosts in the page; 0: every host.
    pub limit: u32,
}

impl HostPage {
    /// Every host of the rollout.
    pub const ALL: Self = Self {
        offset: 0,
        limit: 0,
    };

    /// The request for rollout `id` with this page.
    pub fn request(self, id: &str) -> wire::RolloutRef {
        wire::RolloutRef {
            rollout_id: id.to_string(),
            host_limit: self.limit,
            host_offset: self.offset,
        }
    }
}

impl Default for HostPage {
    /// The first [`DEFAULT_HOST_PAGE`](super::args::DEFAULT_HOST_PAGE) hosts.
    fn default() -> Self {
        Self {
            offset: 0,
            limit: super::args::DEFAULT_HOST_PAGE,
        }
    }
}

impl From<super::args::HostPageArgs> for HostPage {
    fn from(a: super::args::HostPageArgs) -> Self {
        let (offset, limit) = a.offset_limit();
        Self { offset, limit }
    }
}

/// The header of the terminal view: "rollout r-1  web → 2.0.0  running  wave 2/3" (waves count
/// from 1, as in every other line).
pub fn header_text(s: &wire::RolloutStatus, p: &Palette) -> String {
    let spec = s.spec.clone().unwrap_or_default();
    let total = s.waves.len().max(spec.waves.len());
    let current = (render::wave_number(s.current_wave) as usize).min(total.max(1));
    format!(
        "rollout {}  {} → {}  {}  wave {current}/{total}",
        p.bold(&s.rollout_id),
        spec.service,
        p.bold(&spec.release),
        p.state(s.state().as_str()),
    )
}

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
                let shown = render::wave_shown(w, &next.hosts);
                out.push(format!(
                    "{}: {} ({})",
                    render::wave_name(w.index),
                    shown.state,
                    shown.counts
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
        let old = before.map_or_else(
            || "pending".to_string(),
            |b| render::wave_shown(b, &prev.hosts).state,
        );
        let shown = render::wave_shown(w, &next.hosts);
        if old != shown.state {
            out.push(format!(
                "{}: {} → {} ({} of {} hosts: {})",
                render::wave_name(w.index),
                old,
                shown.state,
                shown.done,
                w.size,
                shown.counts
            ));
        }
    }
    for h in &next.hosts {
        let before = prev.hosts.iter().find(|p| p.host_id == h.host_id);
        if before.is_none() {
            // A host that joined the fleet mid-rollout: its wave grew.
            let mut line = format!(
                "host {} joined wave {}",
                h.host_id,
                render::wave_number(h.wave)
            );
            if h.phase().as_str() != "pending" {
                line.push_str(&format!(": {}", h.phase().as_str()));
            }
            if !h.current_release.is_empty() {
                line.push_str(&format!(", serving {}", h.current_release));
            }
            out.push(line);
            continue;
        }
        let old = before.map(|b| b.phase().as_str()).unwrap_or("pending");
        if old != h.phase().as_str() {
            let mut line = format!(
                "host {} (wave {}): {} → {}",
                h.host_id,
                render::wave_number(h.wave),
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
            render::wave_number(d.wave),
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

/// A shared in-memory sink for the plain-line view (tests read what an operator would see).
pub type Captured = Arc<Mutex<Vec<u8>>>;

/// Where the live view writes.
enum View {
    /// NDJSON: every status message as one line.
    Json,
    /// One plain line per change, prefixed with the elapsed time; full lines (logs keep them).
    Lines {
        started: Instant,
        palette: Palette,
        out: Box<dyn Write + Send>,
    },
    /// indicatif bars redrawn in place, transitions printed above them, fitted to the width.
    Live(Box<LiveBars>),
}

/// The progress bars of the terminal view.
struct LiveBars {
    multi: MultiProgress,
    header: ProgressBar,
    waves: Vec<ProgressBar>,
    palette: Palette,
    wave_style: ProgressStyle,
    /// The terminal's width in columns; lines are fitted to it.
    width: usize,
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
        let width = console::Term::stdout()
            .size_checked()
            .map_or(usize::MAX, |(_rows, cols)| usize::from(cols));
        LiveBars {
            multi,
            header,
            waves: Vec::new(),
            palette,
            wave_style,
            width,
        }
    }

    fn update(&mut self, s: &wire::RolloutStatus, now: u64) {
        let p = &self.palette;
        self.header.set_message(header_text(s, p));
        for w in s.waves.iter().skip(self.waves.len()) {
            // Built with its length and prefix before it is added, so it never draws as 0/0.
            let bar = ProgressBar::hidden()
                .with_style(self.wave_style.clone())
                .with_prefix(render::wave_name(w.index));
            bar.set_length(u64::from(w.size));
            bar.set_position(u64::from(render::wave_shown(w, &s.hosts).done));
            self.waves.push(self.multi.add(bar));
        }
        for (bar, w) in self.waves.iter().zip(&s.waves) {
            let shown = render::wave_shown(w, &s.hosts);
            bar.set_length(u64::from(w.size));
            bar.set_position(u64::from(shown.done));
            let mut msg = format!("{}  {}", p.state(&shown.state), shown.counts);
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

/// Where the full text of a cut line is: `serin rollout explain ID` (and `-o json`).
fn full_text_hint(id: &str) -> String {
    format!(" (full text: serin rollout explain {id})")
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
                out: Box::new(anstream::stdout()),
            },
        }
    }

    /// The plain-line view writing into `sink` instead of stdout.
    fn captured(sink: Captured) -> Self {
        struct Sink(Captured);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        View::Lines {
            started: Instant::now(),
            palette: Palette::plain(),
            out: Box::new(Sink(sink)),
        }
    }

    fn show(&mut self, prev: Option<&wire::RolloutStatus>, next: &wire::RolloutStatus) {
        match self {
            View::Json => {
                anstream::println!("{}", render::status_json(next));
            }
            View::Lines {
                started,
                palette,
                out,
            } => {
                let elapsed = started.elapsed().as_secs_f64();
                for line in changes(prev, next) {
                    let _ = writeln!(
                        out,
                        "{} {}",
                        palette.dim(&format!("[{elapsed:6.1}s]")),
                        line
                    );
                }
            }
            View::Live(bars) => {
                let hint = full_text_hint(&next.rollout_id);
                for line in changes(prev, next) {
                    bars.println(&render::fit_width(&line, bars.width, &hint));
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
        let mut text = String::new();
        let palette = match self {
            View::Json => return,
            View::Lines { palette, .. } => *palette,
            View::Live(bars) => {
                bars.finish();
                bars.palette
            }
        };
        let status = render::status_text(last, now_ms(), &palette);
        let status = match self {
            View::Live(bars) => {
                let hint = full_text_hint(&last.rollout_id);
                status
                    .lines()
                    .map(|l| render::fit_width(l, bars.width, &hint) + "\n")
                    .collect()
            }
            _ => status,
        };
        text.push('\n');
        text.push_str(&status);
        text.push('\n');
        if timed_out {
            text.push_str(&format!(
                "gave up waiting: rollout {} is still {} (exit {}); follow it with `serin rollout status {} --watch`\n",
                last.rollout_id,
                last.state().as_str(),
                exit.code(),
                last.rollout_id
            ));
        } else {
            text.push_str(&palette.bold(&summary(last, exit)));
            text.push('\n');
        }
        match self {
            View::Lines { out, .. } => {
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
            _ => anstream::print!("{text}"),
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
    page: HostPage,
) -> Result<Exit, CliError> {
    follow_in(control, id, first, View::new(output), timeout, page).await
}

/// [`follow`] with the plain-line view written into `sink` (what a pipe would receive).
pub async fn follow_captured(
    control: &mut Control,
    id: &str,
    first: Option<wire::RolloutStatus>,
    timeout: Option<Duration>,
    sink: Captured,
    page: HostPage,
) -> Result<Exit, CliError> {
    follow_in(control, id, first, View::captured(sink), timeout, page).await
}

/// Shows `s`, the first status that ends the view, and ends it: a succeeded rollout whose last
/// hosts have not confirmed yet is asked for again (every [`SETTLE_POLL`], slowing down after
/// [`SETTLE_QUICK_FOR`], for up to [`SETTLE_FOR`] and
/// never past the deadline) so the view ends on what the hosts did, not on a moment before.
async fn finish(
    control: &mut Control,
    view: &mut View,
    mut s: wire::RolloutStatus,
    exit: Exit,
    deadline: Option<tokio::time::Instant>,
    page: HostPage,
) -> Exit {
    let settle_by = tokio::time::Instant::now() + SETTLE_FOR;
    let settle_by = deadline.map_or(settle_by, |d| d.min(settle_by));
    let quick_until = tokio::time::Instant::now() + SETTLE_QUICK_FOR;
    let mut pause = SETTLE_POLL;
    while awaiting_confirmation(&s) && tokio::time::Instant::now() < settle_by {
        tokio::time::sleep(pause).await;
        if tokio::time::Instant::now() >= quick_until {
            pause = (pause * 2).min(SETTLE_POLL_MAX);
        }
        match control
            .client
            .get_rollout(page.request(&s.rollout_id))
            .await
        {
            Ok(resp) => {
                let next = resp.into_inner();
                view.show(Some(&s), &next);
                s = next;
            }
            Err(status) => {
                tracing::debug!(error = %status, "cannot read the succeeded rollout again");
                break;
            }
        }
    }
    view.end(&s, exit, false);
    exit
}

async fn follow_in(
    control: &mut Control,
    id: &str,
    first: Option<wire::RolloutStatus>,
    mut view: View,
    timeout: Option<Duration>,
    page: HostPage,
) -> Result<Exit, CliError> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last: Option<wire::RolloutStatus> = None;
    if let Some(s) = first {
        view.show(None, &s);
        if let Some(exit) = final_exit(&s) {
            return Ok(finish(control, &mut view, s, exit, deadline, page).await);
        }
        last = Some(s);
    }
    let mut broken_since: Option<Instant> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    loop {
        let opened = tokio::select! {
            r = control.client.watch_rollout(page.request(id)) => r,
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
                            return Ok(finish(control, &mut view, s, exit, deadline, page).await);
                        }
                        last = Some(s);
                    }
                    Some(Err(status)) => {
                        retry_or_fail(control, "watch rollout", status, &mut broken_since)?;
                        break;
                    }
                    None => {
                        // The stream ended without a final state: ask once, then re-open.
                        match control.client.get_rollout(page.request(id)).await {
                            Ok(resp) => {
                                let s = resp.into_inner();
                                view.show(last.as_ref(), &s);
                                if let Some(exit) = final_exit(&s) {
                                    return Ok(finish(control, &mut view, s, exit, deadline, page).await);
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
            "wave 2: baking → failed",
            "host web-02 (wave 2): healthy → rolling_back, serving 2.0.0 (unhealthy: http check failing)",
            "decision: wave 2 rollback: 1 failed host, threshold 0 [failed=1]",
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
        assert!(lines.iter().any(|l| l.starts_with("wave 2: baking")));
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

    #[test]
    fn a_host_that_joins_mid_rollout_is_announced() {
        let before = sample_status();
        let mut after = before.clone();
        after.waves[2].size = 2;
        let mut h7 = after.hosts[2].clone();
        h7.host_id = "h7".into();
        h7.hostname = "h7".into();
        after.hosts.push(h7);
        let lines = changes(Some(&before), &after);
        assert_eq!(lines, ["host h7 joined wave 3, serving 1.0.0"], "{lines:?}");
        // Once it is part of the status, its phase changes read like any other host's.
        let mut later = after.clone();
        later.hosts[3].phase = wire::HostPhase::from_word("dispatched").unwrap() as i32;
        let lines = changes(Some(&after), &later);
        assert_eq!(
            lines,
            ["host h7 (wave 3): pending → dispatched, serving 1.0.0"]
        );
    }

    #[test]
    fn the_rollback_of_a_passed_canary_is_a_wave_transition() {
        let before = sample_status();
        let after = crate::render::tests::rolled_back_status();
        let all = changes(Some(&before), &after).join("\n");
        for needle in [
            "wave 1 (canary): passed → rolled_back (1 of 1 hosts: ok 0  failed 0  rolled back 1)",
            "wave 2: baking → failed",
            "host web-01 (wave 1): confirmed → rolled_back, serving 1.0.0",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn the_header_counts_waves_like_the_wave_lines() {
        let mut s = sample_status();
        let p = Palette::plain();
        assert!(header_text(&s, &p).ends_with("wave 2/3"));
        s.current_wave = 0;
        assert!(header_text(&s, &p).ends_with("wave 1/3"));
        let lines = changes(None, &s).join("\n");
        assert!(lines.contains("wave 1 (canary): passed"), "{lines}");
        s.current_wave = 2;
        assert!(header_text(&s, &p).ends_with("wave 3/3"));
    }

    #[test]
    fn a_succeeded_rollout_waits_for_its_last_confirmations_only() {
        let mut s = sample_status();
        s.state = wire::RolloutState::from_word("succeeded").unwrap() as i32;
        s.finished = true;
        assert!(
            awaiting_confirmation(&s),
            "web-02 is healthy, not confirmed"
        );
        for h in &mut s.hosts {
            h.phase = wire::HostPhase::from_word("confirmed").unwrap() as i32;
        }
        assert!(!awaiting_confirmation(&s));
        s.hosts[1].phase = wire::HostPhase::from_word("healthy").unwrap() as i32;
        s.state = wire::RolloutState::from_word("paused").unwrap() as i32;
        assert!(!awaiting_confirmation(&s), "only a success waits");
    }
}
