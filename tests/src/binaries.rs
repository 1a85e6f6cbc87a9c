//! Locating the workspace's binaries, built fresh once per test process.
//!
//! Tests run real processes: `serin-agent`, `serin` and `serin-demo-service`. The first call to
//! [`agent`] or [`demo_service`] runs `cargo build --bins -p serin-agent -p serin-tests`, the first
//! call to [`serin`] or [`binary`] runs `cargo build --workspace --bins` (each once per test
//! process), so the binaries are never stale. These are the product binaries, exactly what
//! `cargo build --workspace` and the packages ship: no test-only code.
//!
//! The test variants are [`fault_agent`]: `serin-agent` built with its `fault-injection`
//! feature (crash points driven by `SERIN_AGENT_CRASH_AT`, a wedge for the watchdog, chaos on its
//! results driven by `SERIN_CHAOS`), and [`fault_coordinator`]: `serin` built with the
//! coordinator's `fault-injection` feature (crash points driven by `SERIN_COORDINATOR_CRASH_AT`,
//! chaos on its orders driven by `SERIN_CHAOS`), both in a target directory of their own,
//! `<target>/fault-injection/`. No crate of the workspace enables that
//! feature, because cargo unifies features across a workspace build: a dependency with the feature
//! here would put the hooks into every `cargo build --workspace` (and the demo, and the packages).
//! The paths handed out are the build outputs in `deps/` (see `stable_path`), so a concurrent
//! build cannot swap a binary under a running test.
//! Set `SERIN_TESTS_SKIP_BUILD=1` to skip the builds (e.g. when the binaries were just built).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The directory holding the binaries of the current profile, e.g. `target/debug/`.
///
/// Derived from the running executable (`target/debug/deps/agent_x-hash`,
/// `target/release/examples/real50` or `target/debug/serin-demo`), so it follows
/// `CARGO_TARGET_DIR` and the profile in use.
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("the path of the running test executable");
        let mut dir = exe
            .parent()
            .expect("the test executable lives in a directory")
            .to_path_buf();
        if dir
            .file_name()
            .is_some_and(|n| n == "deps" || n == "examples")
        {
            dir.pop();
        }
        dir
    })
    .clone()
}

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
}

/// Which packages a build covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// `-p serin-agent -p serin-tests`: the agent and the demo service. Agent tests need no
    /// more, so they do not fail when another crate of the workspace does not compile.
    Agent,
    /// `-p serin-agent --features fault-injection` in `<target>/fault-injection/`: the test
    /// build of the agent.
    FaultAgent,
    /// `-p serin-cli --features fault-injection` in `<target>/fault-injection/`: the
    /// test build of the coordinator.
    FaultCoordinator,
    /// `--workspace`: everything, `serin` (crate serin-cli) included.
    Workspace,
}

/// Binaries resolved right after each scope's build.
type Resolved = Result<HashMap<&'static str, PathBuf>, String>;

/// The binaries each scope's build resolves.
fn names(scope: Scope) -> &'static [&'static str] {
    match scope {
        Scope::Agent => &["serin-agent", "serin-demo-service"],
        Scope::FaultAgent => &["serin-agent"],
        Scope::FaultCoordinator => &["serin"],
        Scope::Workspace => &["serin-agent", "serin-demo-service", "serin"],
    }
}

/// Runs the build for `scope` once per process and resolves its binaries; panics with cargo's
/// stderr on failure (every later call panics with the same message instead of building again).
fn ensure_built(scope: Scope) -> &'static HashMap<&'static str, PathBuf> {
    static AGENT: OnceLock<Resolved> = OnceLock::new();
    static FAULT_AGENT: OnceLock<Resolved> = OnceLock::new();
    static FAULT_COORDINATOR: OnceLock<Resolved> = OnceLock::new();
    static WORKSPACE: OnceLock<Resolved> = OnceLock::new();
    let cell = match scope {
        Scope::Agent => &AGENT,
        Scope::FaultAgent => &FAULT_AGENT,
        Scope::FaultCoordinator => &FAULT_COORDINATOR,
        Scope::Workspace => &WORKSPACE,
    };
    let resolved = cell.get_or_init(|| {
        build(scope)?;
        Ok(names(scope)
            .iter()
            .map(|name| (*name, stable_path(&scope_bin_dir(scope), name)))
            .collect())
    });
    match resolved {
        Ok(map) => map,
        Err(e) => panic!("{e}"),
    }
}

/// The path of the build output behind `<bin_dir>/<name>` that later builds will not replace.
///
/// Cargo links each build of a binary to `deps/<name_with_underscores>-<hash>`, the hash covering
/// the enabled features, and hardlinks the latest one to `<bin_dir>/<name>`. Someone building
/// meanwhile replaces `<bin_dir>/<name>`, but not the deps file we resolved: so tests run that one.
fn stable_path(bin_dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let uplifted = bin_dir.join(name);
    let Ok(meta) = std::fs::metadata(&uplifted) else {
        return uplifted;
    };
    let prefix = format!("{}-", name.replace('-', "_"));
    let found = std::fs::read_dir(bin_dir.join("deps"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .find(|e| {
            e.metadata()
                .is_ok_and(|m| m.ino() == meta.ino() && m.dev() == meta.dev())
        });
    found.map_or(uplifted, |e| e.path())
}

/// The target directory of the test builds of the agent and the coordinator:
/// `<target>/fault-injection`.
fn fault_target_dir() -> PathBuf {
    let dir = bin_dir();
    dir.parent()
        .expect("the profile directory lives in a target directory")
        .join("fault-injection")
}

/// The directory a scope's binaries land in.
fn scope_bin_dir(scope: Scope) -> PathBuf {
    match scope {
        Scope::Agent | Scope::Workspace => bin_dir(),
        Scope::FaultAgent | Scope::FaultCoordinator => fault_target_dir().join(
            bin_dir()
                .file_name()
                .expect("the profile directory has a name"),
        ),
    }
}

fn build(scope: Scope) -> Result<(), String> {
    if std::env::var_os("SERIN_TESTS_SKIP_BUILD").is_some_and(|v| v == "1") {
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace_root()).args(["build", "--bins"]);
    // `cargo test` gives each test process the variables of its own package (CARGO_MANIFEST_DIR,
    // CARGO_PKG_*, ...). A build script that reruns when one of them changes (ring's reruns on
    // CARGO_MANIFEST_DIR) would then see them flip between this build and the next top-level
    // cargo, and rebuild ring and everything above it each time: minutes per test binary.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k == "OUT_DIR"
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&k.as_ref())
        {
            cmd.env_remove(&key);
        }
    }
    match scope {
        Scope::Agent => cmd.args(["-p", "serin-agent", "-p", "serin-tests"]),
        Scope::FaultAgent => cmd
            .args([
                "-p",
                "serin-agent",
                "--features",
                "fault-injection",
                "--target-dir",
            ])
            .arg(fault_target_dir()),
        Scope::FaultCoordinator => cmd
            .args([
                "-p",
                "serin-cli",
                "--features",
                "fault-injection",
                "--target-dir",
            ])
            .arg(fault_target_dir()),
        Scope::Workspace => cmd.arg("--workspace"),
    };
    // Build the profile the tests run under, so bin_dir() finds what was built.
    if bin_dir().file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let output = cmd
        .output()
        .map_err(|e| format!("running {cargo:?} {cmd:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn binary_in(scope: Scope, name: &str) -> PathBuf {
    let path = ensure_built(scope)
        .get(name)
        .cloned()
        .unwrap_or_else(|| scope_bin_dir(scope).join(name));
    // A concurrent build of the same configuration (another engineer, another test process)
    // replaces the file: it is missing for a moment, so give it a little while to come back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !path.is_file() && std::time::Instant::now() < deadline {
        std::thread::sleep(crate::wait::POLL);
    }
    assert!(
        path.is_file(),
        "binary {name} not found at {} after building it",
        path.display()
    );
    path
}

/// The path of workspace binary `name`, after `cargo build --workspace --bins`; panics if it
/// does not exist.
pub fn binary(name: &str) -> PathBuf {
    binary_in(Scope::Workspace, name)
}

/// The agent binary, `serin-agent`, as shipped (no fault hooks).
pub fn agent() -> PathBuf {
    binary_in(Scope::Agent, "serin-agent")
}

/// The test build of the agent: `serin-agent` with its `fault-injection` feature, built in
/// `<target>/fault-injection/` so the feature never reaches a product build.
pub fn fault_agent() -> PathBuf {
    binary_in(Scope::FaultAgent, "serin-agent")
}

/// The test build of the coordinator: `serin` with its `fault-injection` feature (crash points,
/// chaos on orders), built in `<target>/fault-injection/` so the feature never reaches a product
/// build.
pub fn fault_coordinator() -> PathBuf {
    binary_in(Scope::FaultCoordinator, "serin")
}

/// The coordinator and operator CLI binary, `serin`.
pub fn serin() -> PathBuf {
    binary("serin")
}

/// The demo service binary, `serin-demo-service`.
pub fn demo_service() -> PathBuf {
    binary_in(Scope::Agent, "serin-demo-service")
}
