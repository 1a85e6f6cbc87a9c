//! Tidy checks of the crate graph: the daemon library does not compile the CLI's dependencies,
//! and the CLI library does not reach into the daemon ("the CLI never decides", enforced by what
//! each crate can name). Only the `serin` binary (`src/main.rs`) uses `serin_coordinator`, for
//! `serin serve` and `serin check-config`.

use std::path::{Path, PathBuf};

/// Dependencies only the operator CLI needs; `serin-coordinator` must not regain any of them.
const CLI_ONLY: &[&str] = &[
    "clap",
    "clap_complete",
    "clap_mangen",
    "indicatif",
    "anstream",
    "anstyle",
    "console",
];

fn cli_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn coordinator_manifest() -> PathBuf {
    cli_dir()
        .parent()
        .expect("coordinator/cli lives inside coordinator/")
        .join("Cargo.toml")
}

/// Every dependency name of a manifest's `[dependencies]`, `[build-dependencies]` and
/// target-specific dependency tables (dev-dependencies do not reach the daemon's build).
fn shipped_dependencies(manifest: &toml::Table) -> Vec<String> {
    let mut names = Vec::new();
    let mut add = |table: Option<&toml::Value>| {
        if let Some(t) = table.and_then(toml::Value::as_table) {
            for (name, spec) in t {
                // `foo = { package = "bar" }` renames a crate: check the real one too.
                if let Some(p) = spec.get("package").and_then(toml::Value::as_str) {
                    names.push(p.to_string());
                }
                names.push(name.clone());
            }
        }
    };
    add(manifest.get("dependencies"));
    add(manifest.get("build-dependencies"));
    if let Some(targets) = manifest.get("target").and_then(toml::Value::as_table) {
        for target in targets.values() {
            add(target.get("dependencies"));
            add(target.get("build-dependencies"));
        }
    }
    names.into_iter().map(|n| n.replace('-', "_")).collect()
}

#[test]
fn coordinator_has_no_cli_only_dependency() {
    let path = coordinator_manifest();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let manifest: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    assert_eq!(
        manifest["package"]["name"].as_str(),
        Some("serin-coordinator"),
        "{} is not the daemon's manifest",
        path.display()
    );
    let deps = shipped_dependencies(&manifest);
    assert!(
        deps.iter().any(|d| d == "tonic"),
        "the dependency reader found no tonic in {}: it is not reading the manifest right ({deps:?})",
        path.display()
    );
    let bad: Vec<&str> = CLI_ONLY
        .iter()
        .copied()
        .filter(|c| deps.iter().any(|d| d == c))
        .collect();
    assert!(
        bad.is_empty(),
        "{} depends on {bad:?}, which only the operator CLI (serin-cli) needs; \
         keep the daemon library free of them",
        path.display()
    );
    assert!(
        manifest.get("bin").is_none(),
        "{} declares a binary again; `serin` belongs to serin-cli",
        path.display()
    );
}

#[test]
fn cli_library_never_names_the_daemon() {
    let src = cli_dir().join("src");
    let mut offenders = Vec::new();
    let mut checked = 0;
    for entry in std::fs::read_dir(&src).expect("coordinator/cli/src") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_none_or(|e| e != "rs") || path.ends_with("main.rs") {
            continue;
        }
        checked += 1;
        let text = std::fs::read_to_string(&path).expect("a source file");
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            if line.contains("serin_coordinator::") || line.contains("use serin_coordinator") {
                offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        checked >= 5,
        "found only {checked} files under {}",
        src.display()
    );
    assert!(
        offenders.is_empty(),
        "the CLI library talks to the coordinator over gRPC only; these lines name the daemon \
         crate (only src/main.rs may, for `serin serve` and config types):\n{}",
        offenders.join("\n")
    );
}
