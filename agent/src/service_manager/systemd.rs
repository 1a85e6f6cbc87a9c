//! A [`ServiceManager`] for services run by a systemd unit, through `systemctl` (no D-Bus).
//!
//! The unit's `ExecStart` runs `<state_dir>/<service>/current/<binary>`, so a restart picks up
//! whatever `current` points at. `systemctl show` gives the unit's state, main PID and restart
//! count (health inputs: a unit that is not active, or restarts by itself, is unhealthy). Which
//! release the unit *actually* runs comes from the kernel, not from our records: the main PID's
//! `/proc/<pid>/exe` resolves through `current` into `releases/<id>/`, so after an agent restart
//! the agent restarts the unit only when it runs another release than `current`.
//!
//! With `[service.swap] mode = "socket"` the unit is socket-activated: a `.socket` unit with
//! `Accept=no` holds the listening socket, and the agent restarts only the service unit, so
//! connections wait in the kernel's backlog while the process is swapped. The agent starts the
//! socket unit before the service and never stops or restarts it. Config load checks the socket
//! unit's file ([`check_socket_unit`], on [`unit_search_path`]) and refuses a missing one.
//!
//! Why `systemctl` rather than D-Bus: one short-lived process per call, a few calls per check
//! interval, no D-Bus client library or connection state in the agent, and the same commands an
//! operator types. `systemctl` talks D-Bus to systemd itself.

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use super::{ServiceError, ServiceManager, ServiceStatus};

/// Drives one systemd unit with `systemctl`.
#[derive(Debug, Clone)]
pub struct Systemd {
    unit: String,
    systemctl: PathBuf,
    releases_dir: PathBuf,
    /// The `.socket` unit holding the service's listening socket (swap mode `socket`).
    socket: Option<String>,
}

impl Systemd {
    /// Manages `unit` with the `systemctl` found at `systemctl` (usually just `systemctl`);
    /// `releases_dir` is the service's `releases/` directory, into which the unit's executable
    /// resolves.
    pub fn new(
        unit: impl Into<String>,
        systemctl: impl Into<PathBuf>,
        releases_dir: impl Into<PathBuf>,
    ) -> Self {
        Systemd {
            unit: unit.into(),
            systemctl: systemctl.into(),
            releases_dir: releases_dir.into(),
            socket: None,
        }
    }

    /// The unit is socket-activated by `socket_unit` (swap mode `socket`): [`ServiceManager::start`]
    /// starts the socket unit first; a restart restarts only the service unit, so the socket
    /// stays open and connections wait in its backlog.
    pub fn with_socket(mut self, socket_unit: impl Into<String>) -> Self {
        self.socket = Some(socket_unit.into());
        self
    }

    fn err(&self, message: String) -> ServiceError {
        ServiceError {
            service: self.unit.clone(),
            message,
        }
    }

    async fn systemctl(&self, args: &[&str]) -> Result<String, ServiceError> {
        self.systemctl_on(args, &self.unit).await
    }

    async fn systemctl_on(&self, args: &[&str], unit: &str) -> Result<String, ServiceError> {
        let out = tokio::process::Command::new(&self.systemctl)
            .args(args)
            .arg(unit)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| self.err(format!("cannot run {}: {e}", self.systemctl.display())))?;
        if !out.status.success() {
            return Err(self.err(format!(
                "systemctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The properties [`parse_show`] reads.
pub const SHOW_PROPERTIES: &str = "ActiveState,SubState,Result,NRestarts,MainPID";

/// Parses `systemctl show -p ActiveState,SubState,Result,NRestarts,MainPID` output.
///
/// Running means active, reloading, or activating with a process (a unit in `auto-restart`
/// is "activating" too, but its process died and systemd waits to start another). The detail
/// reads `active (running)`, or `failed (exit-code)` with the unit's result when it failed.
pub fn parse_show(text: &str) -> ServiceStatus {
    let mut status = ServiceStatus::default();
    let (mut active, mut sub, mut result) = ("", "", "");
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "ActiveState" => active = v,
            "SubState" => sub = v,
            "Result" => result = v,
            "NRestarts" => status.restarts = v.parse().unwrap_or(0),
            "MainPID" => status.pid = v.parse().ok().filter(|p| *p != 0),
            _ => {}
        }
    }
    status.running = match active {
        "active" | "reloading" => true,
        "activating" => sub != "auto-restart",
        _ => false,
    };
    status.detail = match (sub.is_empty(), result) {
        (true, _) => active.to_string(),
        (false, "" | "success") => format!("{active} ({sub})"),
        (false, result) => format!("{active} ({sub}, {result})"),
    };
    status
}

/// The release a process runs, from its executable's path (`/proc/<pid>/exe`): the first
/// component below `releases_dir`, or `None` when the executable lives elsewhere. A deleted
/// executable (its release was pruned) still names the release it came from.
pub fn release_of_exe(exe: &Path, releases_dir: &Path) -> Option<String> {
    let text = exe.to_str()?;
    let exe = Path::new(text.strip_suffix(" (deleted)").unwrap_or(text));
    let rest = exe.strip_prefix(releases_dir).ok()?;
    match rest.components().next()? {
        std::path::Component::Normal(id) => Some(id.to_str()?.to_owned()),
        _ => None,
    }
}

/// The directories systemd loads unit files from, in its order: `$SYSTEMD_UNIT_PATH` when set
/// (colon-separated; an empty entry stands for the defaults, as for systemd), else the system
/// defaults.
pub fn unit_search_path() -> Vec<PathBuf> {
    const DEFAULTS: [&str; 5] = [
        "/etc/systemd/system",
        "/run/systemd/system",
        "/usr/local/lib/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
    ];
    let defaults = || DEFAULTS.iter().map(PathBuf::from);
    match std::env::var_os("SYSTEMD_UNIT_PATH") {
        None => defaults().collect(),
        Some(v) => {
            let mut dirs = Vec::new();
            for part in std::env::split_paths(&v) {
                if part.as_os_str().is_empty() {
                    dirs.extend(defaults());
                } else {
                    dirs.push(part);
                }
            }
            dirs
        }
    }
}

/// Checks that `socket_unit` can hand `service_unit` its listening socket for the `socket` swap
/// mode: its file is found in `dirs` (the first match, as systemd loads it), its `[Socket]`
/// section listens on something (`Listen*=`), it has `Accept=no` (the default: with `Accept=yes`
/// systemd starts one instance per connection, and no swap could keep them), and it activates
/// `service_unit` (`Service=`, or the same name stem). Answers the file; the error says what is
/// wrong. Drop-ins (`<unit>.d/*.conf`) are not read.
pub fn check_socket_unit(
    service_unit: &str,
    socket_unit: &str,
    dirs: &[PathBuf],
) -> Result<PathBuf, String> {
    let Some(path) = dirs
        .iter()
        .map(|d| d.join(socket_unit))
        .find(|p| p.is_file())
    else {
        let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(format!(
            "the socket unit {socket_unit} was not found (searched {}); swap.mode = \"socket\" \
             on a systemd unit needs a .socket unit with Accept=no that holds the listening socket",
            searched.join(", ")
        ));
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the socket unit {}: {e}", path.display()))?;
    let (mut section, mut listens, mut accept, mut service) = (String::new(), 0, None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
            continue;
        }
        if section != "Socket" {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            // An empty assignment resets the list.
            _ if k.starts_with("Listen") => listens = if v.is_empty() { 0 } else { listens + 1 },
            "Accept" => accept = Some(v.to_ascii_lowercase()),
            "Service" => service = Some(v.to_owned()),
            _ => {}
        }
    }
    let at = path.display();
    if listens == 0 {
        return Err(format!(
            "the socket unit {at} listens on nothing: its [Socket] section has no ListenStream= (or other Listen*=)"
        ));
    }
    if let Some(a) = accept.as_deref()
        && matches!(a, "yes" | "true" | "on" | "1")
    {
        return Err(format!(
            "the socket unit {at} has Accept={a}: systemd would start a service instance per connection; swap.mode = \"socket\" needs Accept=no"
        ));
    }
    let stem = |u: &str| u.rsplit_once('.').map_or(u, |(s, _)| s).to_owned();
    let activates = service.unwrap_or_else(|| format!("{}.service", stem(socket_unit)));
    if activates != service_unit {
        return Err(format!(
            "the socket unit {at} activates {activates}, not {service_unit} (set Service={service_unit} in its [Socket] section)"
        ));
    }
    Ok(path)
}

impl ServiceManager for Systemd {
    fn start(&self) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async move {
            if let Some(socket) = &self.socket {
                self.systemctl_on(&["start"], socket).await?;
            }
            self.systemctl(&["start"]).await.map(drop)
        })
    }

    fn stop(&self) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async move { self.systemctl(&["stop"]).await.map(drop) })
    }

    fn restart(&self) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async move { self.systemctl(&["restart"]).await.map(drop) })
    }

    fn status(&self) -> BoxFuture<'_, Result<ServiceStatus, ServiceError>> {
        Box::pin(async move {
            let text = self.systemctl(&["show", "-p", SHOW_PROPERTIES]).await?;
            Ok(parse_show(&text))
        })
    }

    fn running_release(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            let pid = self.status().await.ok()?.pid?;
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            // `/proc/<pid>/exe` is fully resolved; so must the directory be.
            let releases = std::fs::canonicalize(&self.releases_dir).ok()?;
            let release = release_of_exe(&exe, &releases);
            tracing::debug!(unit = %self.unit, pid, exe = %exe.display(), release = ?release, "unit's main process");
            release
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn drives_the_unit_through_systemctl() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls");
        let script = dir.path().join("systemctl");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" >> {log}\ncase \"$1\" in\n  show) printf 'ActiveState=active\\nSubState=running\\nNRestarts=2\\nMainPID=4242\\n' ;;\n  stop) echo 'unit busy' >&2; exit 1 ;;\nesac\n",
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let m = Systemd::new("web.service", &script, dir.path().join("releases"));
        m.restart().await.unwrap();
        m.start().await.unwrap();
        let status = m.status().await.unwrap();
        assert_eq!(
            status,
            ServiceStatus {
                running: true,
                pid: Some(4242),
                restarts: 2,
                detail: "active (running)".into()
            }
        );
        let err = m.stop().await.unwrap_err();
        assert!(err.to_string().contains("unit busy"), "{err}");
        let calls = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            calls,
            "restart web.service\nstart web.service\nshow -p ActiveState,SubState,Result,NRestarts,MainPID web.service\nstop web.service\n"
        );
    }

    #[tokio::test]
    async fn a_socket_activated_unit_starts_its_socket_first_and_restarts_only_the_service() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls");
        let script = dir.path().join("systemctl");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"$@\" >> {}\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let m = Systemd::new("web.service", &script, dir.path().join("releases"))
            .with_socket("web.socket");
        m.start().await.unwrap();
        m.restart().await.unwrap();
        m.restart().await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "start web.socket\nstart web.service\nrestart web.service\nrestart web.service\n",
            "the socket unit is never restarted: it keeps the listening socket across swaps"
        );
    }

    #[test]
    fn a_socket_unit_must_exist_listen_not_accept_and_activate_the_service() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let dirs = [a.path().to_owned(), b.path().to_owned()];
        let e = check_socket_unit("web.service", "web.socket", &dirs).unwrap_err();
        assert!(
            e.contains("the socket unit web.socket was not found")
                && e.contains(&a.path().display().to_string()),
            "{e}"
        );
        let unit = |dir: &Path, name: &str, body: &str| {
            std::fs::write(dir.join(name), format!("[Unit]\nDescription=web\n\n[Socket]\n{body}\n\n[Install]\nWantedBy=sockets.target\n")).unwrap();
        };
        unit(b.path(), "web.socket", "ListenStream=8080\nAccept=no");
        assert_eq!(
            check_socket_unit("web.service", "web.socket", &dirs).unwrap(),
            b.path().join("web.socket")
        );
        // The first directory wins, as for systemd.
        unit(a.path(), "web.socket", "ListenStream=8080\nAccept=yes");
        let e = check_socket_unit("web.service", "web.socket", &dirs).unwrap_err();
        assert!(
            e.contains("has Accept=yes") && e.contains("needs Accept=no"),
            "{e}"
        );
        unit(a.path(), "web.socket", "Accept=no");
        let e = check_socket_unit("web.service", "web.socket", &dirs).unwrap_err();
        assert!(e.contains("listens on nothing"), "{e}");
        // Accept defaults to no; another name needs Service=.
        unit(a.path(), "front.socket", "ListenStream=0.0.0.0:80");
        let e = check_socket_unit("web.service", "front.socket", &dirs).unwrap_err();
        assert!(
            e.contains("activates front.service, not web.service (set Service=web.service"),
            "{e}"
        );
        unit(
            a.path(),
            "front.socket",
            "ListenStream=0.0.0.0:80\nService=web.service",
        );
        assert!(check_socket_unit("web.service", "front.socket", &dirs).is_ok());
    }

    #[test]
    fn inactive_unit_is_not_running() {
        let s = parse_show(
            "ActiveState=failed\nSubState=failed\nResult=exit-code\nNRestarts=5\nMainPID=0\n",
        );
        assert!(!s.running);
        assert_eq!(s.pid, None);
        assert_eq!(s.restarts, 5);
        assert_eq!(s.detail, "failed (failed, exit-code)");
    }

    #[test]
    fn a_unit_waiting_to_restart_is_not_running() {
        let s = parse_show(
            "ActiveState=activating\nSubState=auto-restart\nResult=signal\nNRestarts=1\nMainPID=0\n",
        );
        assert!(!s.running, "{s:?}");
        let s = parse_show("ActiveState=activating\nSubState=start\nResult=success\nMainPID=77\n");
        assert!(s.running, "{s:?}");
        assert_eq!(s.pid, Some(77));
    }

    #[test]
    fn release_from_the_executable_path() {
        let releases = Path::new("/var/lib/serin-agent/web/releases");
        let exe = |p: &str| release_of_exe(Path::new(p), releases);
        assert_eq!(
            exe("/var/lib/serin-agent/web/releases/web-1.2/web").as_deref(),
            Some("web-1.2")
        );
        assert_eq!(
            exe("/var/lib/serin-agent/web/releases/web-1.1/bin/web (deleted)").as_deref(),
            Some("web-1.1")
        );
        assert_eq!(exe("/usr/bin/web"), None);
        assert_eq!(exe("/var/lib/serin-agent/web/releases"), None);
    }

    /// The unit's real main process: its `/proc/<pid>/exe` names the release, whichever way
    /// `current` points now.
    #[tokio::test]
    async fn running_release_reads_the_main_pid_executable() {
        let dir = tempfile::tempdir().unwrap();
        let release = dir.path().join("releases").join("r-7");
        std::fs::create_dir_all(&release).unwrap();
        let binary = release.join("sleeper");
        std::fs::copy("/bin/sleep", &binary).unwrap();
        let mut child = std::process::Command::new(&binary)
            .arg("60")
            .spawn()
            .unwrap();
        let script = dir.path().join("systemctl");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nprintf 'ActiveState=active\\nSubState=running\\nMainPID={}\\n'\n",
                child.id()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let m = Systemd::new("web.service", &script, dir.path().join("releases"));
        let running = m.running_release().await;
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(running.as_deref(), Some("r-7"));
    }
}
