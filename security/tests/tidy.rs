//! Rules of the security layer that a test keeps true (STYLE.md rule 18).

use std::path::Path;

fn workspace_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// rustls runs on ring everywhere; aws-lc (a C and cmake build) never enters the dependency graph,
/// not even through a default feature of a new dependency.
#[test]
fn no_crate_depends_on_aws_lc() {
    for lock in ["Cargo.lock", "fuzz/Cargo.lock"] {
        let text = workspace_file(lock);
        for name in ["aws-lc-rs", "aws-lc-sys", "aws-lc-fips-sys"] {
            assert!(
                !text.contains(&format!("name = \"{name}\"")),
                "{lock} contains {name}: some dependency enables rustls' or tonic's aws-lc feature"
            );
        }
    }
}

/// tonic's own TLS is not used: TLS is terminated by serin-security, so the handshake runs serin's
/// verifier (identity, revocation) and resumption stays off.
#[test]
fn tonic_tls_features_stay_off() {
    for manifest in [
        "Cargo.toml",
        "proto/Cargo.toml",
        "security/Cargo.toml",
        "agent/Cargo.toml",
        "coordinator/Cargo.toml",
        "tests/Cargo.toml",
    ] {
        for line in workspace_file(manifest).lines() {
            if line.trim_start().starts_with("tonic ") || line.trim_start().starts_with("tonic=") {
                assert!(
                    !line.contains("tls"),
                    "{manifest} enables tonic's TLS ({line}); serve through serin_security::transport"
                );
            }
        }
    }
}

/// The fuzz crate is not a member of the workspace (it needs cargo-fuzz and RUSTC_BOOTSTRAP).
#[test]
fn the_fuzz_crate_stays_out_of_the_workspace() {
    let manifest = workspace_file("Cargo.toml");
    let members = manifest
        .lines()
        .find(|l| l.starts_with("members = "))
        .expect("workspace members");
    assert!(!members.contains("fuzz"), "{members}");
    assert!(
        manifest.contains("exclude = [\"fuzz\"]"),
        "fuzz/ must be excluded"
    );
    assert!(
        workspace_file("fuzz/Cargo.toml").contains("\n[workspace]\n"),
        "fuzz/Cargo.toml declares its own workspace"
    );
}
