//! `serin-demo-service`: the tiny HTTP service serin deploys in its tests and demo.
//!
//! ```text
//! serin-demo-service [--port P] [--bind ADDR]
//! serin-demo-service make-release --version V [--crash-at-start] [--unhealthy-after SECS]
//!                    [--slow-health-ms MS] [--slow-stop-ms MS] [--listen-after-ms MS] --out FILE
//! ```
//!
//! Serving: `GET /healthz` answers 200 "ok" while healthy and 500 once unhealthy, `GET /version`
//! answers the release's version string, `GET /pid` the process id (so a test can tell whether
//! the process answering changed). What the release does comes from the trailer appended to its
//! own executable (see `serin_tests::demo_release`); without one it is version "dev" and healthy.
//! SIGTERM or SIGINT ends it with status 0 once the requests in flight are answered; a release
//! built with `slow_stop_ms` first drains, still answering (new connections too) that long. A
//! release built with `listen_after_ms` binds its port only that long after start.
//!
//! Socket handoff (for the supervisor's swap modes): a listening socket passed with
//! `LISTEN_FDS` (systemd's protocol, `LISTEN_FDS_FIRST_FD` honoured) is used instead of binding.
//! SIGHUP re-execs `argv[0]` (through `current`, so the new release) with the listening socket
//! inherited; the new process announces `MAINPID=`/`READY=1` on `NOTIFY_SOCKET` once it accepts
//! and then sends SIGTERM to the process it replaces, which finishes its requests and exits.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serin_tests::demo_release::{self, Behaviour};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `eprintln!` that never panics: a full disk under the log must not kill the service.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("make-release") {
        return make_release(&args[1..]);
    }
    serve(&args)
}

/// Takes the value following flag `name`.
fn value<'a>(name: &str, it: &mut impl Iterator<Item = &'a String>) -> anyhow::Result<&'a String> {
    it.next().with_context(|| format!("{name} needs a value"))
}

fn make_release(args: &[String]) -> anyhow::Result<()> {
    let mut version = None;
    let mut out = None;
    let mut behaviour = Behaviour::dev();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--version" => version = Some(value(arg, &mut it)?.clone()),
            "--out" => out = Some(PathBuf::from(value(arg, &mut it)?)),
            "--crash-at-start" => behaviour.crash_at_start = true,
            "--unhealthy-after" => {
                let v = value(arg, &mut it)?;
                behaviour.unhealthy_after_secs = Some(v.parse().with_context(|| {
                    format!("--unhealthy-after: {v:?} is not a number of seconds")
                })?);
            }
            "--slow-health-ms" => {
                let v = value(arg, &mut it)?;
                behaviour.slow_health_ms = Some(v.parse().with_context(|| {
                    format!("--slow-health-ms: {v:?} is not a number of milliseconds")
                })?);
            }
            "--slow-stop-ms" => {
                let v = value(arg, &mut it)?;
                behaviour.slow_stop_ms = Some(v.parse().with_context(|| {
                    format!("--slow-stop-ms: {v:?} is not a number of milliseconds")
                })?);
            }
            "--listen-after-ms" => {
                let v = value(arg, &mut it)?;
                behaviour.listen_after_ms = Some(v.parse().with_context(|| {
                    format!("--listen-after-ms: {v:?} is not a number of milliseconds")
                })?);
            }
            other => bail!("make-release: unknown argument {other:?}"),
        }
    }
    behaviour.version = version.context("make-release needs --version V")?;
    let out = out.context("make-release needs --out FILE")?;
    let exe = std::fs::read("/proc/self/exe").context("reading /proc/self/exe")?;
    let release = demo_release::with_trailer(&exe, &behaviour)?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &release).with_context(|| format!("writing {}", tmp.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    }
    std::fs::rename(&tmp, &out).with_context(|| format!("renaming onto {}", out.display()))?;
    println!(
        "{} {} {} bytes",
        out.display(),
        demo_release::sha256_hex(&release),
        release.len()
    );
    Ok(())
}

fn serve(args: &[String]) -> anyhow::Result<()> {
    let mut port: u16 = 8080;
    let mut bind = "127.0.0.1".to_owned();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--port" => {
                let v = value(arg, &mut it)?;
                port = v
                    .parse()
                    .with_context(|| format!("--port: {v:?} is not a port"))?;
            }
            "--bind" => bind = value(arg, &mut it)?.clone(),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let behaviour = demo_release::read_behaviour(std::path::Path::new("/proc/self/exe"))?;
    say!("serin-demo-service: starting with {behaviour:?}");
    if behaviour.crash_at_start {
        say!("serin-demo-service: crashing at start as this release is built to");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(format!("{bind}:{port}"), behaviour))
}

async fn run(addr: String, behaviour: Behaviour) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    if let Some(ms) = behaviour.listen_after_ms {
        say!("serin-demo-service: warming up for {ms} ms before listening");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
    let listener = match handoff::inherited_listener()? {
        Some(l) => l,
        None => bind(&addr).await?,
    };
    say!(
        "serin-demo-service: version {} listening on {addr}",
        behaviour.version
    );
    handoff::announce_ready()?;
    let in_flight = tokio_util::task::TaskTracker::new();
    let serve = |stream: TcpStream| {
        let behaviour = behaviour.clone();
        in_flight.spawn(async move {
            if let Err(e) = handle(stream, &behaviour, started).await {
                say!("serin-demo-service: connection error: {e:#}");
            }
        });
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if let Err(e) = handoff::reexec(&listener) {
                    say!("serin-demo-service: reload failed: {e:#}");
                }
            }
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    serve(stream);
                }
            }
        }
    }
    if let Some(ms) = behaviour.slow_stop_ms {
        // A draining service: it goes on answering (new connections too) until it is done.
        say!("serin-demo-service: draining for {ms} ms on signal as this release is built to");
        let drained = tokio::time::sleep(Duration::from_millis(ms));
        tokio::pin!(drained);
        loop {
            tokio::select! {
                _ = &mut drained => break,
                accepted = listener.accept() => {
                    if let Ok((stream, _)) = accepted {
                        serve(stream);
                    }
                }
            }
        }
    }
    // Stop accepting (the socket may live on in a successor), answer what was accepted.
    drop(listener);
    in_flight.close();
    if tokio::time::timeout(Duration::from_secs(10), in_flight.wait())
        .await
        .is_err()
    {
        say!("serin-demo-service: requests still in flight after 10 s, stopping anyway");
    }
    say!("serin-demo-service: stopping on signal");
    Ok(())
}

async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    // The previous release may still be closing the port while the supervisor starts this one.
    let bind_deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < bind_deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("binding {addr}")),
        }
    }
}

/// Taking over and handing over the listening socket.
mod handoff {
    use std::os::fd::AsRawFd;

    use anyhow::Context;
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use tokio::net::TcpListener;

    /// The process this one replaces on a reload (it is sent SIGTERM once this one is ready).
    const REPLACES: &str = "SERIN_DEMO_REPLACES";

    /// A listening socket passed with `LISTEN_FDS`, if any.
    pub fn inherited_listener() -> anyhow::Result<Option<TcpListener>> {
        let mut fds = listenfd::ListenFd::from_env();
        let Some(std) = fds
            .take_tcp_listener(0)
            .context("LISTEN_FDS: fd is not a TCP listening socket")?
        else {
            return Ok(None);
        };
        std.set_nonblocking(true)?;
        eprintln!(
            "serin-demo-service: using the inherited listening socket (fd {})",
            std.as_raw_fd()
        );
        Ok(Some(TcpListener::from_std(std)?))
    }

    /// `MAINPID=`/`READY=1` on `NOTIFY_SOCKET`; then SIGTERM to the process replaced.
    pub fn announce_ready() -> anyhow::Result<()> {
        if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
            let msg = format!("MAINPID={}\nREADY=1\n", std::process::id());
            std::os::unix::net::UnixDatagram::unbound()?
                .send_to(msg.as_bytes(), &path)
                .with_context(|| format!("notifying {path:?}"))?;
        }
        if let Some(pid) = std::env::var(REPLACES)
            .ok()
            .and_then(|p| p.parse::<i32>().ok())
        {
            eprintln!("serin-demo-service: ready, stopping the replaced process {pid}");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        Ok(())
    }

    /// Starts `argv[0]` again with the listening socket inherited (`LISTEN_FDS_FIRST_FD`).
    pub fn reexec(listener: &TcpListener) -> anyhow::Result<()> {
        let mut args = std::env::args_os();
        let program = args.next().context("no argv[0]")?;
        let fd = listener.as_raw_fd();
        fcntl(listener, FcntlArg::F_SETFD(FdFlag::empty())).context("clearing FD_CLOEXEC")?;
        let child = std::process::Command::new(&program)
            .args(args)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDS_FIRST_FD", fd.to_string())
            .env_remove("LISTEN_PID")
            .env(REPLACES, std::process::id().to_string())
            .spawn()
            .with_context(|| format!("re-executing {program:?}"));
        // Later children (none, here) must not inherit it.
        fcntl(listener, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).context("setting FD_CLOEXEC")?;
        eprintln!(
            "serin-demo-service: reloading: started {program:?} as process {}",
            child?.id()
        );
        Ok(())
    }
}

async fn handle(
    mut stream: TcpStream,
    behaviour: &Behaviour,
    started: Instant,
) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 16 * 1024 {
            bail!("request head larger than 16 KiB");
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the end of the request head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let (status, body) = match (method, path) {
        ("GET", "/healthz") => {
            if let Some(ms) = behaviour.slow_health_ms {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let unhealthy = behaviour
                .unhealthy_after_secs
                .is_some_and(|secs| started.elapsed() >= Duration::from_secs(secs));
            if unhealthy {
                ("500 Internal Server Error", "unhealthy".to_owned())
            } else {
                ("200 OK", "ok".to_owned())
            }
        }
        ("GET", "/version") => ("200 OK", behaviour.version.clone()),
        ("GET", "/pid") => ("200 OK", std::process::id().to_string()),
        ("GET", _) => ("404 Not Found", "not found".to_owned()),
        _ => ("405 Method Not Allowed", "method not allowed".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}
