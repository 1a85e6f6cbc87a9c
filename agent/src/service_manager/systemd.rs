//! A [`ServiceManager`] for services run by a systemd unit, through `systemctl` (no D-Bus).
//!
//! The unit's `ExecStart` runs `<state_dir>/<service>/current/<binary>`, so a restart picks up
//! whatever `current` points at. `systemctl show` gives the unit's state, main PID and restart
//! count (health inputs: a unit that is not active, or restarts by itself, is unhealthy). Which
//! release the unit *actually* runs comes from the kernel, not from our records: the main PID's
//! `/proc/<pid>/exe` resolves through `current` into `releases/<id>/`, so after an agent restart
//! the agent restarts the unit only when it runs another release than `current`.
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
        }
    }

    fn err(&self, message: String) -> ServiceError {
        ServiceError {
            service: self.unit.clone(),
            message,
        }
    }

    async fn systemctl(&self, args: &[&str]) -> Result<String, ServiceError> {
        let out = tokio::process::Command::new(&self.systemctl)
            .args(args)
            .arg(&self.unit)
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

impl ServiceManager for Systemd {
    fn start(&self) -> BoxFuture<'_, Result<(), ServiceError>> {
        Box::pin(async move { self.systemctl(&["start"]).await.map(drop) })
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
