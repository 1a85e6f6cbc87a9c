//! `serin-demo`: the whole product on one machine, in about a minute.
//!
//! Starts a coordinator (`serin serve`) and eight `serin-agent`s on loopback, each supervising its
//! own `serin-demo-service`, then drives them with the `serin` CLI exactly as an operator would:
//!
//! 1. pushes three releases of the demo service: 1.0.0 and 2.0.0 (healthy), 3.0.0 (crashes at start);
//! 2. bootstraps every host to 1.0.0 with a fast single-wave rollout;
//! 3. rolls out 2.0.0 through a canary and the waves `1,25%,100%` with short bakes, showing the
//!    live view (`serin rollout start --wait`);
//! 4. rolls out 3.0.0, which fails in the canary wave and is rolled back automatically (exit 3);
//! 5. checks that every host serves 2.0.0 (`serin hosts -o json` and each service's `/version`) and
//!    that only the canary hosts ever ran 3.0.0 (the rollout's explanation; the others may have
//!    staged it ahead of their wave, never run it).
//!
//! Every process it starts is killed when it ends, also on failure or Ctrl-C: the coordinator
//! and agents by process group, the supervised services through each agent's `supervisor.json`.
//! The binaries are found next to this one (`cargo build --workspace --bins` puts them there).
//!
//! Everything talks mutual TLS, as in production: the demo makes a throwaway CA in its directory
//! (`pki/`), a coordinator certificate for 127.0.0.1, one certificate per agent host id and an
//! admin operator certificate for its `serin` commands.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;

/// Number of agents (hosts) the demo starts.
const HOSTS: usize = 8;
/// The service every agent manages.
const SERVICE: &str = "demo";
/// Zones the hosts are spread over, round-robin.
const ZONES: [&str; 3] = ["a", "b", "c"];

/// What to kill on the way out: process groups (coordinator, agents) and the supervised services
/// recorded in each agent's `supervisor.json`. Global so the Ctrl-C thread can reach it.
static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    groups: Vec::new(),
    supervisor_files: Vec::new(),
    foreground: None,
    dir: None,
});

struct Cleanup {
    /// (name, process group id), in start order.
    groups: Vec<(String, i32)>,
    supervisor_files: Vec<PathBuf>,
    /// The `serin` command running in the foreground (in the demo's own process group).
    foreground: Option<i32>,
    /// The demo's directory, removed after an interrupt (unless SERIN_DEMO_KEEP is set).
    dir: Option<PathBuf>,
}

/// Kills every process the demo started. Safe to call more than once.
fn kill_everything() {
    let mut c = CLEANUP.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(pid) = c.foreground.take() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    // Agents first (newest first), so none of them restarts its service; the coordinator last.
    for (_, pgid) in c.groups.iter().rev() {
        let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
    }
    for file in &c.supervisor_files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let (Some(pid), Some(start)) = (v["pid"].as_u64(), v["start_time"].as_u64()) else {
            continue;
        };
        // Only the process the agent recorded, not a later process that reused the pid.
        if proc_start_time(pid) == Some(start) {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
    c.groups.clear();
    c.supervisor_files.clear();
}

/// Field 22 of `/proc/<pid>/stat` of a live process.
fn proc_start_time(pid: u64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | None) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Kills everything on Ctrl-C or SIGTERM, then exits 130.
fn install_signal_handler() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal thread's runtime")?;
    // Register the handlers before returning, so a Ctrl-C right after start is caught.
    let mut term = rt
        .block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        })
        .context("cannot install the SIGTERM handler")?;
    let mut int = rt
        .block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        })
        .context("cannot install the SIGINT handler")?;
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        eprintln!("\ninterrupted: stopping every process the demo started");
        kill_everything();
        let dir = CLEANUP.lock().unwrap_or_else(|p| p.into_inner()).dir.take();
        if let Some(dir) = dir
            && std::env::var_os("SERIN_DEMO_KEEP").is_none()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    });
    Ok(())
}

/// The binaries the demo runs.
struct Bins {
    serin: PathBuf,
    agent: PathBuf,
    service: PathBuf,
}

impl Bins {
    /// Finds the binaries next to this executable.
    fn find() -> anyhow::Result<Self> {
        let me = std::env::current_exe().context("cannot find the demo's own executable")?;
        let dir = me
            .parent()
            .context("the demo's executable has no parent directory")?;
        let find = |name: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{} not found; build every binary first: cargo build --workspace --bins",
                    p.display()
                )
            }
        };
        Ok(Bins {
            serin: find("serin")?,
            agent: find("serin-agent")?,
            service: find("serin-demo-service")?,
        })
    }
}

/// One started agent.
struct Host {
    id: String,
    zone: &'static str,
    port: u16,
}

/// The running demo: its directory, its processes and the coordinator's URL.
struct Demo {
    dir: PathBuf,
    /// The demo's throwaway CA (`<dir>/pki`): every process talks mutual TLS.
    pki: serin_tests::tls::TestPki,
    bins: Bins,
    url: String,
    hosts: Vec<Host>,
    children: Vec<Child>,
    started: Instant,
}

impl Drop for Demo {
    fn drop(&mut self) {
        kill_everything();
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

/// Asks the OS for a free loopback port (bind port 0, read it, close).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(l.local_addr()?.port())
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout` saying `what`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            match last_err {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET path` on 127.0.0.1:port; returns (status, body).
fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .with_context(|| format!("cannot read the answer of {addr}{path}"))?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{addr}{path} answered no HTTP status: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Wraps `text` in an SGR escape `code` when stdout is a terminal and NO_COLOR is unset.
fn sgr(code: &str, text: &str) -> String {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

fn banner(text: &str) {
    println!("\n{}", sgr("1", &format!("==> {text}")));
}

impl Demo {
    fn elapsed(&self) -> String {
        format!("{:.1}s", self.started.elapsed().as_secs_f64())
    }

    /// Runs `serin ARGS` with the output captured; fails unless it exits 0.
    fn serin(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bins.serin)
            .arg("--coordinator")
            .arg(&self.url)
            .args(args)
            .env("NO_COLOR", "1")
            .envs(serin_tests::fleet::operator_env(
                &self.pki.operator("demo", serin_security::Role::Admin),
            ))
            .output()
            .with_context(|| format!("cannot run serin {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`serin {}` failed with {}: {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `serin -o json ARGS` and parses the answer.
    fn serin_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let text = self.serin(&full)?;
        serde_json::from_str(&text)
            .with_context(|| format!("`serin {}` printed invalid JSON: {text}", full.join(" ")))
    }

    /// Runs `serin ARGS` with the terminal as its stdout/stderr (the live view); returns its
    /// exit code.
    fn serin_live(&self, args: &[&str]) -> anyhow::Result<i32> {
        println!("$ serin {}", args.join(" "));
        let mut child = Command::new(&self.bins.serin)
            .arg("--coordinator")
            .arg(&self.url)
            .args(args)
            .envs(serin_tests::fleet::operator_env(
                &self.pki.operator("demo", serin_security::Role::Admin),
            ))
            .spawn()
            .with_context(|| format!("cannot run serin {}", args.join(" ")))?;
        CLEANUP.lock().unwrap_or_else(|p| p.into_inner()).foreground = Some(child.id() as i32);
        let status = child.wait();
        CLEANUP.lock().unwrap_or_else(|p| p.into_inner()).foreground = None;
        let status = status.with_context(|| format!("cannot wait for serin {}", args.join(" ")))?;
        status
            .code()
            .with_context(|| format!("`serin {}` was killed by a signal", args.join(" ")))
    }

    /// Starts `serin serve` on a free port and waits for "listening on ADDR".
    fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let state = self.dir.join("coordinator");
        let config = self.dir.join("coordinator.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\nheartbeat_interval = \"500ms\"\nunreachable_after = \"3s\"\n{}",
                state.display().to_string(),
                serin_tests::tls::tls_toml(
                    &self.pki.coordinator(std::net::Ipv4Addr::LOCALHOST.into())
                )
            ),
        )
        .with_context(|| format!("cannot write {}", config.display()))?;
        let log_path = self.dir.join("coordinator.log");
        let mut log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut child = Command::new(&self.bins.serin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("SERIN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("cannot start serin serve")?;
        register_group("coordinator", &child);
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let (tx, rx) = mpsc::channel::<String>();
        // Copies the coordinator's stderr to its log and picks out the bound address.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if let Some(addr) = line.split("serin coordinator listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        self.children.push(child);
        let addr = rx.recv_timeout(Duration::from_secs(20)).map_err(|_| {
            anyhow::anyhow!(
                "the coordinator did not print \"serin coordinator listening on ADDR\" within 20s; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        })?;
        self.url = format!("https://{addr}");
        println!(
            "coordinator listening on {addr} (log: {})",
            log_path.display()
        );
        Ok(())
    }

    /// Writes each agent's config and starts it.
    fn start_agents(&mut self) -> anyhow::Result<()> {
        for i in 0..HOSTS {
            let id = format!("demo-{:02}", i + 1);
            let zone = ZONES[i % ZONES.len()];
            let port = free_port()?;
            let state_dir = self.dir.join("agents").join(&id);
            std::fs::create_dir_all(&state_dir)
                .with_context(|| format!("cannot create {}", state_dir.display()))?;
            let config = state_dir.join("agent.toml");
            std::fs::write(
                &config,
                format!(
                    r#"coordinator = "{url}"
{tls}
state_dir = {state:?}
host_id = "{id}"
hostname = "{id}"
heartbeat_interval = "500ms"
report_interval = "2s"
reconnect_initial = "100ms"
reconnect_max = "1s"

[labels]
zone = "{zone}"
role = "demo"

[[service]]
name = "{SERVICE}"
binary = "demo-service"
keep_releases = 3
stop_timeout = "2s"

[service.run]
kind = "process"
args = ["--port", "{port}"]

[[service.check]]
name = "http"
kind = "http"
url = "http://127.0.0.1:{port}/healthz"
interval = "{interval}ms"
timeout = "200ms"
failure_threshold = 2
success_threshold = 1
"#,
                    url = self.url,
                    tls = serin_tests::agent_proc::agent_tls_toml_with(&self.pki, &self.url, &id),
                    state = state_dir.display().to_string(),
                    // 200-500 ms, different per host.
                    interval = 200 + (i * 300 / HOSTS.max(1)) as u64,
                ),
            )
            .with_context(|| format!("cannot write {}", config.display()))?;
            let log = std::fs::File::create(state_dir.join("agent.log"))?;
            let child = Command::new(&self.bins.agent)
                .arg("--config")
                .arg(&config)
                .env("SERIN_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start serin-agent for {id}"))?;
            register_group(&id, &child);
            CLEANUP
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .supervisor_files
                .push(state_dir.join(SERVICE).join("supervisor.json"));
            self.children.push(child);
            self.hosts.push(Host { id, zone, port });
        }
        Ok(())
    }

    /// The hosts as `serin hosts -o json` reports them, by id.
    fn hosts_json(&self) -> anyhow::Result<BTreeMap<String, Value>> {
        let v = self.serin_json(&["hosts"])?;
        let hosts = v["hosts"]
            .as_array()
            .context("`serin hosts -o json` has no hosts array")?;
        Ok(hosts
            .iter()
            .filter_map(|h| Some((h["host_id"].as_str()?.to_string(), h.clone())))
            .collect())
    }

    /// The release `host` reports for the demo service ("" when none).
    fn current_release(host: &Value) -> String {
        host["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == SERVICE)
            .and_then(|s| s["current_release"].as_str())
            .unwrap_or_default()
            .to_string()
    }

    /// The id of the newest rollout of `release`.
    fn rollout_of(&self, release: &str) -> anyhow::Result<String> {
        let v = self.serin_json(&["rollout", "list", "--service", SERVICE])?;
        v["rollouts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["spec"]["release"] == release)
            .max_by_key(|r| r["created_unix_ms"].as_u64().unwrap_or(0))
            .and_then(|r| r["rollout_id"].as_str())
            .map(str::to_string)
            .with_context(|| format!("no rollout of {release} in `serin rollout list`"))
    }

    /// Waits until every host serves `release` and answers it on /version.
    fn wait_all_serve(&self, release: &str, timeout: Duration) -> anyhow::Result<()> {
        wait_for(&format!("every host to serve {release}"), timeout, || {
            let hosts = self.hosts_json()?;
            for h in &self.hosts {
                let Some(info) = hosts.get(&h.id) else {
                    return Ok(None);
                };
                if Self::current_release(info) != release {
                    return Ok(None);
                }
                match http_get(h.port, "/version") {
                    Ok((200, body)) if body == release => {}
                    _ => return Ok(None),
                }
            }
            Ok(Some(()))
        })
    }
}

fn register_group(name: &str, child: &Child) {
    CLEANUP
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .groups
        .push((name.to_string(), child.id() as i32));
}

fn main() -> ExitCode {
    let keep = std::env::var_os("SERIN_DEMO_KEEP").is_some();
    let dir = match tempfile::Builder::new().prefix("serin-demo-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("demo FAILED: cannot create a temporary directory: {e}");
            return ExitCode::from(1);
        }
    };
    CLEANUP.lock().unwrap_or_else(|p| p.into_inner()).dir = Some(dir.path().to_path_buf());
    let result = run(dir.path());
    kill_everything();
    match result {
        Ok(summary) => {
            println!("\n{summary}");
            if keep {
                println!("(kept {})", dir.keep().display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let path = dir.keep();
            eprintln!("\n{} {e:#}", sgr("1;31", "demo FAILED:"));
            eprintln!(
                "logs kept in {} (coordinator.log, agents/*/agent.log, agents/*/{SERVICE}/service.log)",
                path.display()
            );
            ExitCode::from(1)
        }
    }
}

fn run(dir: &Path) -> anyhow::Result<String> {
    install_signal_handler()?;
    let mut demo = Demo {
        dir: dir.to_path_buf(),
        pki: serin_tests::tls::TestPki::create(&dir.join("pki"), "serin demo CA (throwaway)")?,
        bins: Bins::find()?,
        url: String::new(),
        hosts: Vec::new(),
        children: Vec::new(),
        started: Instant::now(),
    };
    println!("serin demo in {}", dir.display());

    banner("starting the coordinator");
    demo.start_coordinator()?;

    banner("making three releases of the demo service");
    let releases = dir.join("releases");
    std::fs::create_dir_all(&releases)?;
    let versions: [(&str, &[&str], &str); 3] = [
        ("1.0.0", &[], "healthy"),
        ("2.0.0", &[], "healthy"),
        ("3.0.0", &["--crash-at-start"], "crashes at start"),
    ];
    for (version, extra, what) in versions {
        let out = releases.join(format!("demo-service-{version}"));
        let status = Command::new(&demo.bins.service)
            .args(["make-release", "--version", version, "--out"])
            .arg(&out)
            .args(extra)
            .stdout(Stdio::null())
            .status()
            .context("cannot run serin-demo-service make-release")?;
        ensure!(
            status.success(),
            "make-release of {version} failed: {status}"
        );
        let pushed = demo.serin(&[
            "artifact",
            "push",
            &out.display().to_string(),
            "--service",
            SERVICE,
            "--release",
            version,
        ])?;
        let sha = pushed
            .lines()
            .find_map(|l| l.trim().strip_prefix("sha256"))
            .map(|s| s.trim().chars().take(12).collect::<String>())
            .unwrap_or_default();
        println!("  {SERVICE} {version} ({what}) pushed, sha256 {sha}…");
    }

    banner(&format!("starting {HOSTS} agents (zones a, b, c)"));
    demo.start_agents()?;
    let ids: BTreeSet<String> = demo.hosts.iter().map(|h| h.id.clone()).collect();
    wait_for(
        &format!("{HOSTS} agents to connect"),
        Duration::from_secs(30),
        || {
            let hosts = demo.hosts_json()?;
            let connected = hosts
                .values()
                .filter(|h| {
                    h["connected"] == true && ids.contains(h["host_id"].as_str().unwrap_or(""))
                })
                .count();
            Ok((connected == HOSTS).then_some(()))
        },
    )?;
    print!("{}", demo.serin(&["hosts"])?);

    banner("bootstrap: every host to 1.0.0 in one fast wave");
    let code = demo.serin_live(&[
        "rollout",
        "start",
        "--service",
        SERVICE,
        "--release",
        "1.0.0",
        "--waves",
        "100%",
        "--bake",
        "500ms",
        "--min-healthy",
        "500ms",
        "--healthy-deadline",
        "20s",
        "--wait",
        "--timeout",
        "60s",
    ])?;
    ensure!(
        code == 0,
        "the bootstrap rollout to 1.0.0 exited {code}, expected 0"
    );
    demo.wait_all_serve("1.0.0", Duration::from_secs(20))?;
    println!("every host serves 1.0.0 ({})", demo.elapsed());

    banner("rollout of 2.0.0: canary, then waves 1,25%,100% spread over zones");
    let code = demo.serin_live(&[
        "rollout",
        "start",
        "--service",
        SERVICE,
        "--release",
        "2.0.0",
        "--waves",
        "1,25%,100%",
        "--canary-bake",
        "4s",
        "--bake",
        "2s",
        "--min-healthy",
        "1s",
        "--healthy-deadline",
        "15s",
        "--spread-by",
        "zone",
        "--wait",
        "--timeout",
        "90s",
    ])?;
    ensure!(
        code == 0,
        "the rollout of 2.0.0 exited {code}, expected 0 (succeeded)"
    );
    demo.wait_all_serve("2.0.0", Duration::from_secs(20))?;
    println!("every host serves 2.0.0 ({})", demo.elapsed());

    banner("rollout of 3.0.0, which crashes at start: the canary fails and is rolled back");
    let code = demo.serin_live(&[
        "rollout",
        "start",
        "--service",
        SERVICE,
        "--release",
        "3.0.0",
        "--waves",
        "1,25%,100%",
        "--canary-bake",
        "4s",
        "--bake",
        "2s",
        "--min-healthy",
        "1s",
        "--healthy-deadline",
        "8s",
        "--spread-by",
        "zone",
        "--wait",
        "--timeout",
        "90s",
    ])?;
    ensure!(
        code == 3,
        "the rollout of 3.0.0 exited {code}, expected 3 (rolled back)"
    );

    banner("checking the outcome");
    demo.wait_all_serve("2.0.0", Duration::from_secs(20))?;
    println!("  every host reports 2.0.0 and answers 2.0.0 on /version");
    let v3 = demo.rollout_of("3.0.0")?;
    let explained = demo.serin_json(&["rollout", "explain", &v3])?;
    let status = &explained["status"];
    ensure!(
        status["state"] == "rolled_back",
        "rollout {v3} of 3.0.0 ended {}, expected rolled_back",
        status["state"]
    );
    let hosts = status["hosts"]
        .as_array()
        .context("the explanation has no hosts")?;
    let canary: BTreeSet<String> = hosts
        .iter()
        .filter(|h| h["wave"] == 0)
        .filter_map(|h| h["host_id"].as_str().map(str::to_string))
        .collect();
    ensure!(!canary.is_empty(), "rollout {v3} has no canary hosts");
    let touched: BTreeSet<String> = hosts
        .iter()
        .filter(|h| !matches!(h["phase"].as_str(), Some("pending") | Some("skipped")))
        .filter_map(|h| h["host_id"].as_str().map(str::to_string))
        .collect();
    ensure!(
        touched.is_subset(&canary),
        "rollout {v3} touched {touched:?}, but only the canary {canary:?} should have run 3.0.0"
    );
    let decisions = explained["decisions"]
        .as_array()
        .context("the explanation has no decisions")?;
    let rollback = decisions
        .iter()
        .find(|d| d["kind"] == "rollback")
        .with_context(|| format!("rollout {v3} has no rollback decision: {decisions:?}"))?;
    println!(
        "  rollout {v3} of 3.0.0: rolled back after the canary wave ({})",
        rollback["reason"].as_str().unwrap_or("")
    );
    println!(
        "  only the canary host(s) {} ran 3.0.0; the other {} hosts at most staged it, never ran it",
        canary.iter().cloned().collect::<Vec<_>>().join(", "),
        HOSTS - canary.len()
    );
    println!("\n$ serin rollout explain {v3}");
    print!("{}", demo.serin(&["rollout", "explain", &v3])?);

    let zones: BTreeMap<&str, usize> = demo.hosts.iter().fold(BTreeMap::new(), |mut m, h| {
        *m.entry(h.zone).or_default() += 1;
        m
    });
    Ok(format!(
        "{} in {}: {HOSTS} hosts over zones {zones:?}; 1.0.0 bootstrapped, \
         2.0.0 rolled out through a canary and three waves, 3.0.0 failed in its canary and was \
         rolled back automatically; every host serves 2.0.0",
        sgr("1;32", "demo OK"),
        demo.elapsed()
    ))
}
