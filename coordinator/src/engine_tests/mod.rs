//! Tests of the rollout engine as operators and agents meet it: through the control service's
//! [`RolloutApi`](crate::control_service::RolloutApi) and the wire status it shows. They live
//! outside `rollout/` because they use the wire types, which the engine itself never sees.
//!
//! | module | what it proves |
//! |---|---|
//! | `scenarios` | the machine through whole scenarios with a fake clock, read through the wire status |
//! | `manager` | the manager with an in-memory store and a scripted fleet |
//! | `findings` | issue 6's findings 1–5, each failing before its fix |

mod findings;
mod manager;
mod scenarios;

use serin_proto::wire;

use crate::control_service::{raw_spec_to_wire, status_to_wire};
use crate::rollout::Rollout;
use crate::rollout::testing::raw_spec;

/// A wire spec for service web, release web-2, role=web, with the given waves.
pub(crate) fn wire_spec(waves: &[&str]) -> wire::RolloutSpec {
    raw_spec_to_wire(raw_spec(waves))
}

/// The machine's status as the control service shows it.
pub(crate) fn wire_status(m: &Rollout) -> wire::RolloutStatus {
    status_to_wire(&m.status())
}

/// A rollout's status watch, read as the wire status operators see.
pub(crate) struct WireWatch(pub tokio::sync::watch::Receiver<crate::rollout::RolloutView>);

impl WireWatch {
    /// The status now.
    pub(crate) fn borrow(&self) -> wire::RolloutStatus {
        status_to_wire(&self.0.borrow())
    }

    /// The status now, marked seen.
    pub(crate) fn borrow_and_update(&mut self) -> wire::RolloutStatus {
        status_to_wire(&self.0.borrow_and_update())
    }

    /// Waits for the next change.
    pub(crate) async fn changed(&mut self) -> Result<(), tokio::sync::watch::error::RecvError> {
        self.0.changed().await
    }
}

/// Tidy: the engine never sees the wire. No file under `coordinator/src/rollout/` names tonic or
/// the generated protocol types, and `fleet.rs` (its seam to the registry) neither names nor
/// re-exports them; the control service and the registry convert at the edge. And every module
/// of the engine has its line in ARCHITECTURE.md's code map.
#[test]
fn the_rollout_engine_has_no_wire_types_and_every_module_is_mapped() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/rollout");
    let arch = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md"),
    )
    .expect("ARCHITECTURE.md at the workspace root");
    let mut problems = Vec::new();
    let mut files = Vec::new();
    let mut dirs = vec![dir.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("a directory under rollout/") {
            let path = e.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(files.len() > 5, "found the engine's files: {files:?}");
    for path in files {
        let name = path
            .strip_prefix(&dir)
            .expect("under rollout/")
            .to_string_lossy()
            .to_string();
        let text = std::fs::read_to_string(&path).expect("a readable source file");
        for needle in ["tonic::", "serin_proto::wire", "use tonic", "wire::"] {
            for (n, line) in text.lines().enumerate() {
                if line.contains(needle) {
                    problems.push(format!("rollout/{name}:{}: {needle:?} in {line:?}", n + 1));
                }
            }
        }
        // A module is `name.rs`, or a directory's `dir/mod.rs` mapped as `dir/`.
        let mapped = match name.strip_suffix("mod.rs") {
            Some("") => true,
            Some(dir) => arch.contains(&format!("`{dir}`")),
            None => arch.contains(&format!("`{name}`")),
        };
        if !mapped {
            problems.push(format!(
                "rollout/{name} is missing from ARCHITECTURE.md's code map"
            ));
        }
    }
    // The seam the engine reads the fleet through: domain types only (the registry converts),
    // so no generated enum (`OrderPhase`, `ResultCode`, `ServiceState`) reaches `rollout/`
    // through a re-export.
    let fleet = dir.with_file_name("fleet.rs");
    let text = std::fs::read_to_string(&fleet).expect("coordinator/src/fleet.rs");
    for needle in [
        "tonic",
        "serin_proto::wire",
        "wire::",
        "pub use serin_proto",
    ] {
        for (n, line) in text.lines().enumerate() {
            if line.contains(needle) && !line.trim_start().starts_with("//") {
                problems.push(format!("fleet.rs:{}: {needle:?} in {line:?}", n + 1));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
