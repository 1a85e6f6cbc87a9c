//! Lifecycle hooks shipped inside a release: optional executables `hooks/validate` (run before
//! the swap) and `hooks/post-start` (run after the restart, before health gating). They reach
//! `releases/<id>/hooks/` only by being unpacked from the release's own verified bundle
//! ([`crate::bundle`], made by `serin release pack`).
//!
//! Two parts, so the activation driver's wiring stays short:
//! - [`plan`] (pure): which hooks a swap runs. It only ever takes the *incoming* release's
//!   directory, so the outgoing release's hooks cannot run — a broken release's hooks never
//!   wedge its own rollback (CodeDeploy's stop hooks do). An activation runs `validate` then
//!   `post-start`, both blocking (a failure is a host failure); a rollback runs only the
//!   baseline's `post-start`, whose failure is evidence but never stops the rollback.
//! - [`run`]: runs one hook with a timeout in its own process group (killed whole on timeout),
//!   with the release directory as cwd, and captures its output (the last
//!   [`OUTPUT_LIMIT`] bytes of stdout and stderr) for the evidence.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;

/// How much of a hook's output is kept (its tail).
pub const OUTPUT_LIMIT: usize = 8 * 1024;

/// A lifecycle hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Before the swap: may refuse the release (e.g. config check against this host).
    Validate,
    /// After the restart, before health gating (e.g. warm a cache, register somewhere).
    PostStart,
}

impl Hook {
    /// The executable's file name under `<release>/hooks/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Hook::Validate => "validate",
            Hook::PostStart => "post-start",
        }
    }
}

/// What kind of swap the hooks are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapKind {
    /// Moving to a new release.
    Activate,
    /// Moving back to the baseline after a failure.
    Rollback,
}

/// One hook a swap will run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedHook {
    /// Which hook.
    pub hook: Hook,
    /// Its executable, inside the incoming release.
    pub path: PathBuf,
    /// A failure stops the swap (activation) instead of only being recorded (rollback).
    pub blocking: bool,
}

/// The hooks a swap to the release in `incoming` runs, in order. Only the incoming release's
/// directory is taken: the outgoing release's hooks are never run.
pub fn plan(kind: SwapKind, incoming: &Path) -> Vec<PlannedHook> {
    let at = |hook: Hook, blocking| PlannedHook {
        hook,
        path: incoming.join("hooks").join(hook.file_name()),
        blocking,
    };
    match kind {
        SwapKind::Activate => vec![at(Hook::Validate, true), at(Hook::PostStart, true)],
        SwapKind::Rollback => vec![at(Hook::PostStart, false)],
    }
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookStatus {
    /// The release ships no such hook.
    Absent,
    /// Exit status 0.
    Passed,
    /// A non-zero exit, a signal, or it could not be started.
    Failed(String),
    /// Killed after the timeout.
    TimedOut(Duration),
}

/// The result of running one hook, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    /// Which hook.
    pub hook: Hook,
    /// How it ended.
    pub status: HookStatus,
    /// The tail of its stdout then stderr.
    pub output: String,
    /// How long it ran.
    pub took: Duration,
}

impl HookOutcome {
    /// Passed, or absent.
    pub fn ok(&self) -> bool {
        matches!(self.status, HookStatus::Passed | HookStatus::Absent)
    }

    /// One line for the evidence: `post-start hook failed: exit status: 3 after 12ms; output: …`.
    pub fn evidence(&self) -> String {
        let what = match &self.status {
            HookStatus::Absent => return format!("no {} hook", self.hook.file_name()),
            HookStatus::Passed => "passed".to_owned(),
            HookStatus::Failed(how) => format!("failed: {how}"),
            HookStatus::TimedOut(limit) => format!("timed out after {limit:?} and was killed"),
        };
        format!(
            "{} hook {what} after {:?}; output: {:?}",
            self.hook.file_name(),
            self.took,
            self.output.trim_end()
        )
    }
}

/// Runs `planned` with `release_dir` as cwd and `env` added, for at most `timeout`.
pub async fn run(
    planned: &PlannedHook,
    release_dir: &Path,
    env: &[(&str, &str)],
    timeout: Duration,
) -> HookOutcome {
    let started = Instant::now();
    let outcome = |status, output| HookOutcome {
        hook: planned.hook,
        status,
        output,
        took: started.elapsed(),
    };
    if !planned.path.exists() {
        return outcome(HookStatus::Absent, String::new());
    }
    let mut child = match tokio::process::Command::new(&planned.path)
        .current_dir(release_dir)
        .env("SERIN_HOOK", planned.hook.file_name())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return outcome(
                HookStatus::Failed(format!("cannot run {}: {e}", planned.path.display())),
                String::new(),
            );
        }
    };
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let read_all = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut out).await;
        }
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut err).await;
        }
        out.extend_from_slice(&err);
        out
    };
    let finished = tokio::time::timeout(timeout, async {
        // Read both pipes while waiting; a hook filling a pipe must not deadlock.
        let (out, status) = tokio::join!(read_all, child.wait());
        (out, status)
    })
    .await;
    match finished {
        Ok((out, status)) => {
            let output = tail(&out);
            match status {
                Ok(s) if s.success() => outcome(HookStatus::Passed, output),
                Ok(s) => outcome(HookStatus::Failed(s.to_string()), output),
                Err(e) => outcome(HookStatus::Failed(format!("cannot wait: {e}")), output),
            }
        }
        Err(_) => {
            // The whole group: a hook's children must not outlive it.
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            outcome(HookStatus::TimedOut(timeout), String::new())
        }
    }
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(OUTPUT_LIMIT);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn release(root: &Path, id: &str, hooks: &[(&str, &str)]) -> PathBuf {
        let dir = root.join("releases").join(id);
        std::fs::create_dir_all(dir.join("hooks")).unwrap();
        for (name, script) in hooks {
            let p = dir.join("hooks").join(name);
            std::fs::write(&p, script).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    }

    async fn run_all(kind: SwapKind, incoming: &Path) -> Vec<HookOutcome> {
        let mut out = Vec::new();
        for p in plan(kind, incoming) {
            out.push(
                run(
                    &p,
                    incoming,
                    &[("SERIN_RELEASE", "x")],
                    Duration::from_secs(5),
                )
                .await,
            );
        }
        out
    }

    #[test]
    fn an_activation_validates_then_post_starts_and_a_rollback_only_post_starts_the_baseline() {
        let p = plan(SwapKind::Activate, Path::new("/r/v2"));
        assert_eq!(
            p.iter().map(|h| (h.hook, h.blocking)).collect::<Vec<_>>(),
            vec![(Hook::Validate, true), (Hook::PostStart, true)]
        );
        assert_eq!(p[0].path, Path::new("/r/v2/hooks/validate"));
        let p = plan(SwapKind::Rollback, Path::new("/r/v1"));
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].hook, p[0].blocking), (Hook::PostStart, false));
        assert!(p.iter().all(|h| h.path.starts_with("/r/v1")));
    }

    #[tokio::test]
    async fn a_failing_validate_is_reported_with_its_output_and_exit_status() {
        let root = tempfile::tempdir().unwrap();
        let v2 = release(
            root.path(),
            "v2",
            &[(
                "validate",
                "#!/bin/sh\necho \"checking $SERIN_HOOK in $(pwd)\"\necho 'missing /etc/web.conf' >&2\nexit 3\n",
            )],
        );
        let out = run_all(SwapKind::Activate, &v2).await;
        assert_eq!(out[0].status, HookStatus::Failed("exit status: 3".into()));
        assert!(!out[0].ok());
        assert!(
            out[0].output.contains("checking validate in"),
            "{:?}",
            out[0]
        );
        assert!(out[0].output.contains("releases/v2"), "{:?}", out[0]);
        assert!(
            out[0].output.contains("missing /etc/web.conf"),
            "{:?}",
            out[0]
        );
        assert!(
            out[0]
                .evidence()
                .starts_with("validate hook failed: exit status: 3 after")
        );
        // No post-start hook in this release: absent is fine.
        assert_eq!(out[1].status, HookStatus::Absent);
        assert!(out[1].ok());
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_with_its_children() {
        let root = tempfile::tempdir().unwrap();
        let v2 = release(
            root.path(),
            "v2",
            &[(
                "post-start",
                "#!/bin/sh\nsleep 30 &\necho $! > child.pid\nwait\n",
            )],
        );
        let p = &plan(SwapKind::Activate, &v2)[1];
        let t0 = Instant::now();
        let out = run(p, &v2, &[], Duration::from_millis(300)).await;
        assert_eq!(out.status, HookStatus::TimedOut(Duration::from_millis(300)));
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(
            out.evidence()
                .contains("timed out after 300ms and was killed")
        );
        let child: u32 = std::fs::read_to_string(v2.join("child.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while crate::service_manager::supervisor::proc_start_time(child).is_some() {
            assert!(Instant::now() < until, "the hook's child {child} survived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_rollback_never_runs_the_outgoing_release_hooks() {
        let root = tempfile::tempdir().unwrap();
        let marker = |name: &str| format!("#!/bin/sh\ntouch \"$(pwd)/ran-{name}\"\nexit 1\n");
        let v1 = release(
            root.path(),
            "v1",
            &[
                ("validate", &marker("validate")),
                ("post-start", &marker("post-start")),
            ],
        );
        let v2 = release(
            root.path(),
            "v2",
            &[
                ("validate", &marker("validate")),
                ("post-start", &marker("post-start")),
            ],
        );
        // v2 failed; the rollback goes back to v1.
        let out = run_all(SwapKind::Rollback, &v1).await;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].hook, Hook::PostStart);
        assert!(
            !out[0].ok(),
            "the baseline's post-start failure is reported"
        );
        assert!(v1.join("ran-post-start").exists());
        assert!(!v1.join("ran-validate").exists());
        assert!(
            std::fs::read_dir(&v2).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("ran-")),
            "a hook of the outgoing release ran"
        );
    }

    #[tokio::test]
    async fn a_non_executable_hook_fails_naming_it() {
        let root = tempfile::tempdir().unwrap();
        let v2 = release(root.path(), "v2", &[]);
        std::fs::write(v2.join("hooks/validate"), "#!/bin/sh\nexit 0\n").unwrap();
        let out = run(
            &plan(SwapKind::Activate, &v2)[0],
            &v2,
            &[],
            Duration::from_secs(5),
        )
        .await;
        match &out.status {
            HookStatus::Failed(how) => {
                assert!(
                    how.contains("cannot run") && how.contains("hooks/validate"),
                    "{how}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
