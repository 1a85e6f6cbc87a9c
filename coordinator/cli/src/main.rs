//! The `serin` binary: the coordinator daemon (`serin serve`, `serin check-config`) and the
//! operator CLI (every other subcommand, a client of a running coordinator).
//!
//! This file binds sockets, reads files and installs signal handlers; everything else lives in
//! the libraries: [`serin_coordinator::server::run`] serves, [`serin_cli`] is the CLI.
//!
//! Under systemd (`Type=notify`), `serin serve` reports ready once it answers a call on its own
//! listener (the server only serves after its store is open and its rollouts resumed) and feeds
//! the watchdog only while those self-calls keep being answered, so a wedged server is restarted.
//! It logs to the journal with structured fields when stderr is the journal stream.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use serin_cli::{self as cli, Cli, Command, Exit, args::ServeArgs, commands};
use serin_coordinator::config::{self, CoordinatorConfig};
use serin_coordinator::server;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: with 19,900 agents attached, malloc and free were a
/// quarter of the coordinator's CPU in an order broadcast (`_int_malloc`, `malloc_consolidate`);
/// with mimalloc a 19,900-host rollout's wall time is a sixth shorter, at the same memory per
/// agent (BENCHMARKS.md, "The coordinator's allocator"). The `system-allocator` feature
/// keeps glibc's, for heap profilers that interpose malloc.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Usage errors exit 2 and --help/--version exit 0, both printed by clap.
    let cli = Cli::parse();
    if cli::offline::is_offline(&cli.command) {
        return match cli::offline::run(cli.output, cli.command) {
            Ok(exit) => exit.into(),
            Err(e) => fail(&e.to_string(), e.exit()),
        };
    }
    match cli.command {
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            commands::completions(shell, &mut buf);
            return write_stdout(&buf);
        }
        Command::Man { dir: Some(dir) } => {
            return match commands::man_pages_to(&dir) {
                Ok(files) => {
                    for f in files {
                        println!("{}", f.display());
                    }
                    Exit::Success.into()
                }
                Err(e) => fail(&e.to_string(), e.exit()),
            };
        }
        Command::Man { dir: None } => {
            let mut buf = Vec::new();
            return match commands::man_page(&mut buf) {
                Ok(()) => write_stdout(&buf),
                Err(e) => fail(&e.to_string(), e.exit()),
            };
        }
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the tokio runtime: {e}"), Exit::Error),
    };
    match cli.command {
        Command::Serve(args) => {
            init_daemon_tracing("info");
            match runtime.block_on(serve(args)) {
                Ok(()) => Exit::Success.into(),
                Err(e) => fail(&anyhow_chain(&e), Exit::Error),
            }
        }
        Command::CheckConfig(args) => match check_config(&args.config) {
            Ok(summary) => {
                println!("{summary}");
                Exit::Success.into()
            }
            Err(problems) => {
                let mut err = std::io::stderr().lock();
                for p in problems {
                    let _ = writeln!(err, "{p}");
                }
                Exit::Error.into()
            }
        },
        command => {
            init_tracing("warn");
            let tls = cli::credentials::TlsFlags {
                ca: cli.ca.clone(),
                cert: cli.cert.clone(),
                key: cli.key.clone(),
            };
            match runtime.block_on(commands::run_operator_with(
                &cli.coordinator,
                &tls,
                cli.output,
                command,
            )) {
                Ok(exit) => exit.into(),
                Err(e) => fail(&e.to_string(), e.exit()),
            }
        }
    }
}

/// Writes `bytes` to stdout; a reader that went away (`serin man | head`) is not an error.
fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Exit::Success.into(),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Exit::Success.into(),
        Err(e) => fail(&format!("cannot write to stdout: {e}"), Exit::Error),
    }
}

/// "outer: inner: cause", leaving out a cause whose text an outer message already contains.
fn anyhow_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Prints `msg` as an error and returns `exit`.
fn fail(msg: &str, exit: Exit) -> ExitCode {
    let mut err = anstream::stderr().lock();
    let style = anstyle::Style::new()
        .bold()
        .fg_color(Some(anstyle::AnsiColor::Red.into()));
    let _ = writeln!(err, "{style}error:{style:#} {msg}");
    exit.into()
}

/// Logs to stderr, filtered by `SERIN_LOG` or `RUST_LOG` (default `default`).
fn init_tracing(default: &str) {
    let filter = std::env::var("SERIN_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_string());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` names its
/// device and inode (systemd.exec(5)).
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

/// The daemon's logging: the journal's native protocol when stderr is the journal stream, each
/// tracing field a journal field (`ROLLOUT=`, `WAVE=`, `HOST=`, so `journalctl ROLLOUT=r-1`
/// works); else text on stderr as [`init_tracing`].
fn init_daemon_tracing(default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let filter = std::env::var("SERIN_LOG")
                    .or_else(|_| std::env::var("RUST_LOG"))
                    .unwrap_or_else(|_| default.to_string());
                let _ = tracing_subscriber::registry()
                    .with(tracing_subscriber::EnvFilter::new(filter))
                    .with(layer.with_field_prefix(None))
                    .try_init();
                return;
            }
            Err(e) => eprintln!("cannot log to the journal ({e}); logging text on stderr"),
        }
    }
    init_tracing(default);
}

/// Readiness and watchdog for systemd: calls `ListHosts` on the coordinator's own listener (a
/// selector no host matches, so the answer is small) until one is answered, then sends
/// `READY=1`; with `WatchdogSec=` set, repeats the call every quarter period and sends
/// `WATCHDOG=1` only when it was answered within that quarter. Outside systemd
/// (`NOTIFY_SOCKET` unset) it still probes until ready, then ends.
async fn notify_systemd(
    bound: std::net::SocketAddr,
    tls: serin_security::tls::TransportSecurity,
    shutdown: CancellationToken,
) {
    use sd_notify::NotifyState;
    use serin_proto::wire::ListHostsRequest;
    use serin_proto::wire::control_service_client::ControlServiceClient;
    use serin_security::tls::TransportSecurity;
    use serin_security::transport::ClientTransport;
    use std::time::Duration;

    let mut target = bound;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let watchdog = sd_notify::watchdog_enabled();
    let timeout = watchdog.map_or(Duration::from_secs(2), |p| p / 4);
    // With TLS the probe presents the coordinator's own certificate (read calls only) and
    // verifies the listener's certificate against the CA under the certificate's own name.
    let transport = match &tls {
        TransportSecurity::InsecurePlaintext => Ok((ClientTransport::Plaintext, "http")),
        TransportSecurity::Tls(files) => serin_security::tls::TlsMaterial::load(files)
            .and_then(|m| serin_security::tls::coordinator_self_client_config(&m))
            .map(|(config, name)| {
                (
                    ClientTransport::Tls {
                        config,
                        server_name: Some(name),
                    },
                    "https",
                )
            }),
    };
    let channel = transport
        .map_err(|e| e.to_string())
        .and_then(|(transport, scheme)| {
            serin_security::transport::endpoint(&format!("{scheme}://{target}"), &transport)
                .map_err(|e| e.to_string())
        })
        .map(|(endpoint, connector)| {
            endpoint
                .connect_timeout(timeout)
                .timeout(timeout)
                .connect_with_connector_lazy(connector)
        });
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, address = %target, "cannot probe the coordinator's own listener");
            return;
        }
    };
    let client = ControlServiceClient::new(channel);
    let probe = || {
        let mut client = client.clone();
        async move {
            client
                .list_hosts(ListHostsRequest {
                    selector: "serin-watchdog-probe".into(),
                    page_size: 1,
                    ..Default::default()
                })
                .await
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if probe().await.is_ok() {
            break;
        }
    }
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot notify systemd that the coordinator is ready");
    }
    let Some(period) = watchdog else {
        return;
    };
    tracing::info!(watchdog = ?period, "feeding systemd's watchdog from answered self-calls");
    let mut tick = tokio::time::interval(period / 4);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match probe().await {
            Ok(_) => {
                if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                    tracing::warn!(error = %e, "cannot feed systemd's watchdog");
                }
            }
            Err(status) => tracing::error!(
                error = %status,
                "the coordinator did not answer its own call; not feeding the watchdog"
            ),
        }
    }
}

/// `serin serve`: load the config, bind, announce the address, serve until SIGTERM/SIGINT.
async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_serve_config(&args)?;
    let listen = config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("cannot read the address bound for {listen}"))?;
    eprintln!("serin coordinator listening on {bound}");

    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let notifier = tokio::spawn(notify_systemd(bound, config.tls.clone(), shutdown.clone()));
    let result = server::run(config, listener, shutdown.clone())
        .await
        .context("the coordinator stopped with an error");
    shutdown.cancel();
    signals.abort();
    let _ = signals.await;
    let _ = notifier.await;
    result
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install the SIGTERM/SIGINT handlers");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        _ = shutdown.cancelled() => return,
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
}

/// `serin check-config`: the summary line (and warnings), or every problem found.
fn check_config(path: &std::path::Path) -> Result<String, Vec<String>> {
    let report = config::check_config(path);
    let warnings = report.warnings.iter().map(|w| format!("warning: {w}"));
    if !report.is_ok() {
        return Err(report.problems.iter().cloned().chain(warnings).collect());
    }
    let mut out: Vec<String> = warnings.collect();
    match CoordinatorConfig::load_with_warnings(path) {
        Ok(l) => out.push(format!(
            "config OK: listen {}, state_dir {}",
            l.config.listen,
            l.config.state_dir.display()
        )),
        Err(e) => return Err(e.problems()),
    }
    Ok(out.join("\n"))
}

/// Loads the config for `serin serve`: the file, then the command-line overrides. When the file
/// does not exist and `--listen` or `--state-dir` is given, the defaults stand in for it.
fn load_serve_config(args: &ServeArgs) -> anyhow::Result<CoordinatorConfig> {
    let overridden = args.listen.is_some() || args.state_dir.is_some();
    let mut config = if !args.config.exists() && overridden {
        tracing::info!(config = %args.config.display(), "no config file, using defaults and flags");
        if !args.insecure_plaintext {
            anyhow::bail!(
                "no config file at {} to take the [tls] section from: write one with \
                 [tls] ca, cert and key (made by `serin ca`), or pass --insecure-plaintext \
                 for development only",
                args.config.display()
            );
        }
        CoordinatorConfig::default()
    } else {
        let loaded = CoordinatorConfig::load_with(&args.config, args.insecure_plaintext)?;
        for w in &loaded.warnings {
            tracing::warn!(config = %args.config.display(), "{w}");
        }
        loaded.config
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.state_dir {
        config.state_dir = dir.clone();
    }
    config.validate()?;
    Ok(config)
}
