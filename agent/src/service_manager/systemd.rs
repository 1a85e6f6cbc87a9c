//! A [`ServiceManager`] for services run by a systemd unit, through `systemctl` (no D-Bus).
//!
//! The unit's `ExecStart` runs `<state_dir>/<service>/current/<binary>`, so a restart picks up
//! whatever `current` points at.

use std::path::PathBuf;

use futures::future::BoxFuture;

use super::{ServiceError, ServiceManager, ServiceStatus};

/// Drives one systemd unit with `systemctl`.
#[derive(Debug, Clone)]
pub struct Systemd {
    unit: String,
    systemctl: PathBuf,
}

impl Systemd {
    /// Manages `unit` with the `systemctl` found at `systemctl` (usually just `systemctl`).
    pub fn new(unit: impl Into<String>, systemctl: impl Into<PathBuf>) -> Self {
        Systemd {
            unit: unit.into(),
            systemctl: systemctl.into(),
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

/// Parses `systemctl show -p ActiveState,NRestarts,MainPID` output.
pub fn parse_show(text: &str) -> ServiceStatus {
    let mut status = ServiceStatus::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k.trim() {
            "ActiveState" => {
                let v = v.trim();
                status.running = matches!(v, "active" | "activating" | "reloading");
                status.detail = v.to_string();
            }
            "NRestarts" => status.restarts = v.trim().parse().unwrap_or(0),
            "MainPID" => status.pid = v.trim().parse().ok().filter(|p| *p != 0),
            _ => {}
        }
    }
    status
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
            let text = self
                .systemctl(&["show", "-p", "ActiveState,NRestarts,MainPID"])
                .await?;
            Ok(parse_show(&text))
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
                "#!/bin/sh\necho \"$@\" >> {log}\ncase \"$1\" in\n  show) printf 'ActiveState=active\\nNRestarts=2\\nMainPID=4242\\n' ;;\n  stop) echo 'unit busy' >&2; exit 1 ;;\nesac\n",
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let m = Systemd::new("web.service", &script);
        m.restart().await.unwrap();
        m.start().await.unwrap();
        let status = m.status().await.unwrap();
        assert_eq!(
            status,
            ServiceStatus {
                running: true,
                pid: Some(4242),
                restarts: 2,
                detail: "active".into()
            }
        );
        let err = m.stop().await.unwrap_err();
        assert!(err.to_string().contains("unit busy"), "{err}");
        let calls = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            calls,
            "restart web.service\nstart web.service\nshow -p ActiveState,NRestarts,MainPID web.service\nstop web.service\n"
        );
    }

    #[test]
    fn inactive_unit_is_not_running() {
        let s = parse_show("ActiveState=failed\nNRestarts=5\nMainPID=0\n");
        assert!(!s.running);
        assert_eq!(s.pid, None);
        assert_eq!(s.restarts, 5);
    }
}
