//! The `serin-agent` binary: reads the config, sets up logging and signals, runs the agent.
//!
//! Under systemd (`Type=notify`) it tells systemd it is ready once the agent's main loop turns
//! (services set up, first connection attempt under way), feeds the watchdog only while that loop
//! keeps beating (see [`serin_agent::liveness`]), and logs to the journal with structured fields
//! when stderr is the journal stream (`JOURNAL_STREAM`); on a terminal or a pipe it logs text.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use serin_agent::config::{Config, DEFAULT_CONFIG_PATH};
use serin_agent::liveness::Liveness;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "serin-agent", version, about = "serin's host agent")]
struct Cli {
    /// Config file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log format: `auto` is the journal's native protocol (structured fields) when stderr is
    /// connected to the journal, else text.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Journal when stderr is the journal stream, else text.
    Auto,
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
    /// The journal's native protocol, each tracing field a journal field (`HOST=`, `SERVICE=`).
    Journald,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Validate the config and exit.
    CheckConfig,
    /// Join a fleet: make this host's key (it never leaves the host), trade a one-time join
    /// token for a certificate on the coordinator's enrolment port, and write the certificate,
    /// key (0600) and CA where the config's [tls] points.
    Enroll {
        /// The coordinator's enrolment URL, e.g. https://serin.example.com:7701.
        #[arg(long, value_name = "URL")]
        coordinator: String,
        /// The join token of `serin token create`.
        #[arg(long, value_name = "TOKEN", env = "SERIN_JOIN_TOKEN")]
        token: String,
        /// The CA's sha256 fingerprint (`serin ca fingerprint`), pinned on first contact.
        #[arg(long, value_name = "SHA256")]
        ca_fingerprint: String,
        /// How long to wait for an admin's approval when the host id is known with another key.
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
}

/// Colour escapes only for a person at a terminal: never into a file, a pipe or journald, and
/// never when `NO_COLOR` is set to anything non-empty (<https://no-color.org>).
fn use_colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` names its
/// device and inode (systemd.exec(5)); a child that inherited the variable but not the stream
/// logs text.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    expected.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG")
        .or_else(|_| std::env::var("SERIN_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journald = match format {
        LogFormat::Journald => true,
        LogFormat::Auto => stderr_is_journal(),
        LogFormat::Text | LogFormat::Json => false,
    };
    if journald {
        // Field names as they are (`HOST=`, `ROLLOUT=`), so `journalctl HOST=web-01` finds them.
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(layer.with_field_prefix(None))
                    .init();
                return;
            }
            Err(e) => eprintln!("cannot log to the journal ({e}); logging text on stderr"),
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(use_colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Auto | LogFormat::Text | LogFormat::Journald => builder.init(),
    }
}

/// Tells systemd the agent is ready once its main loop beats, then feeds the watchdog (when
/// `WatchdogSec=` is set) every quarter period, but only while the last beat is younger than
/// half the period: a wedged main loop stops the pings, and systemd restarts the agent.
/// Outside systemd (`NOTIFY_SOCKET` unset) the notifications are no-ops.
async fn notify_systemd(liveness: Liveness, shutdown: CancellationToken) {
    use sd_notify::NotifyState;
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    while liveness.since_last_beat(Instant::now()).is_none() {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = poll.tick() => {}
        }
    }
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd that the agent is ready");
    }
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    tracing::info!(watchdog = ?period, "feeding systemd's watchdog from the main loop");
    let fresh = period / 2;
    let mut tick = tokio::time::interval(period / 4);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match liveness.since_last_beat(Instant::now()) {
            Some(age) if age < fresh => {
                if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                    tracing::warn!(error = %e, "cannot feed systemd's watchdog");
                }
            }
            age => tracing::error!(
                silent_for = ?age,
                "the main loop stopped beating; not feeding the watchdog"
            ),
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                println!("warning: {w}");
            }
            println!("config OK: {} services", loaded.config.services.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for w in serin_agent::config::unknown_keys(&text) {
                println!("warning: {w}");
            }
            for p in e.problems() {
                println!("{p}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `serin-agent enroll`.
fn enroll(path: &std::path::Path, opts: &serin_agent::enrol::EnrolOptions) -> ExitCode {
    let config = match Config::load(path) {
        Ok(l) => l.config,
        Err(e) => {
            tracing::error!(config = %path.display(), "cannot load the config: {e}");
            return ExitCode::FAILURE;
        }
    };
    let host_id = match serin_agent::host_id::resolve(
        config.host_id.as_ref(),
        std::path::Path::new("/etc/machine-id"),
        &config.state_dir,
    ) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("cannot find this host's id: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serin_agent::enrol::enroll(&config.tls, &host_id, opts)) {
        Ok(cert) => {
            println!("enrolled as host {host_id}: certificate {}", cert.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("enrolment failed: {e}");
            eprintln!("serin-agent enroll: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::CheckConfig) = cli.command {
        return check_config(&cli.config);
    }
    init_tracing(cli.log_format);
    if let Some(Cmd::Enroll {
        coordinator,
        token,
        ca_fingerprint,
        wait,
    }) = cli.command
    {
        let opts = serin_agent::enrol::EnrolOptions {
            url: coordinator,
            token,
            ca_fingerprint,
            wait,
            poll: Duration::from_secs(1),
        };
        return enroll(&cli.config, &opts);
    }
    let loaded = match Config::load(&cli.config) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(config = %cli.config.display(), "cannot load the config: {e}");
            return ExitCode::FAILURE;
        }
    };
    for w in &loaded.warnings {
        tracing::warn!(config = %cli.config.display(), "{w}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let signal_task = tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
                _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
                _ = signals.cancelled() => return,
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            signals.cancel();
        });
        let options = serin_agent::Options::default();
        let notifier = tokio::spawn(notify_systemd(options.liveness.clone(), shutdown.clone()));
        let result = serin_agent::run_with(loaded.config, options, shutdown.clone()).await;
        shutdown.cancel();
        let _ = signal_task.await;
        let _ = notifier.await;
        result?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause goes into the message too: journalctl shows messages, not fields.
            tracing::error!(error = format!("{e:#}"), "agent failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::use_colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some("".into())));
        assert!(!use_colour(true, Some("1".into())));
        assert!(!use_colour(false, None));
    }
}
