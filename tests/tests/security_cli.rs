//! The offline security commands of the real `serin` binary: `ca init`, `ca issue …`,
//! `keygen`, `release sign` and `release verify`. Files land with the right modes, nothing is
//! ever overwritten, the issued certificates carry the identities asked for and build working TLS
//! configurations, and a signed release verifies until a byte of it changes.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use serin_proto::HostId;
use serin_security::tls::{self, NoRevocation, TlsFiles, TlsMaterial};
use serin_security::{OperatorName, PeerIdentity, Role};
use serin_tests::binaries;

/// One finished `serin` run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn serin(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(binaries::serin())
        .args(args)
        .current_dir(dir)
        .env_remove("SERIN_PKI_DIR")
        .env("NO_COLOR", "1")
        .output()
        .expect("run serin");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn identity_of(cert: &Path) -> PeerIdentity {
    let pem = std::fs::read(cert).expect("read certificate");
    let der = tls::parse_certs(&pem).expect("PEM certificate");
    PeerIdentity::from_certificate(&der[0]).expect("a serin identity")
}

#[test]
fn ca_init_and_issue_write_private_keys_0600_never_overwrite_and_carry_identities() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = dir.join("pki");
    let pki_s = pki.to_str().unwrap();

    let init = serin(dir, &["ca", "init", "--pki-dir", pki_s]);
    assert_eq!(init.code, 0, "{init}");
    assert!(init.stdout.contains("fingerprint  sha256:"), "{init}");
    assert_eq!(mode(&pki), 0o700, "the PKI directory is private");
    assert_eq!(mode(&pki.join("ca.key")), 0o600);
    let ca_key = std::fs::read(pki.join("ca.key")).unwrap();

    let again = serin(dir, &["ca", "init", "--pki-dir", pki_s]);
    assert_eq!(again.code, 1, "{again}");
    assert!(
        again
            .stderr
            .contains("already exists; refusing to overwrite"),
        "{again}"
    );
    assert_eq!(
        std::fs::read(pki.join("ca.key")).unwrap(),
        ca_key,
        "the CA key is untouched"
    );

    let issued = [
        (
            vec!["coordinator", "--name", "localhost", "--ip", "127.0.0.1"],
            "coordinator",
            PeerIdentity::Coordinator,
        ),
        (
            vec!["agent", "--host-id", "web-01"],
            "agent-web-01",
            PeerIdentity::Agent {
                host_id: HostId::new("web-01").unwrap(),
            },
        ),
        (
            vec!["operator", "--name", "alice", "--role", "deployer"],
            "operator-alice",
            PeerIdentity::Operator {
                name: OperatorName::new("alice").unwrap(),
                role: Role::Deployer,
            },
        ),
    ];
    for (args, stem, identity) in &issued {
        let mut full = vec!["ca", "issue"];
        full.extend(args.iter().copied());
        full.extend(["--pki-dir", pki_s]);
        let run = serin(dir, &full);
        assert_eq!(run.code, 0, "{run}");
        let cert = pki.join(format!("{stem}.crt"));
        let key = pki.join(format!("{stem}.key"));
        assert_eq!(mode(&key), 0o600, "{stem}.key");
        assert_eq!(&identity_of(&cert), identity, "{stem}");
        // Issuing the same identity again would replace a key in use: refused.
        let again = serin(dir, &full);
        assert_eq!(again.code, 1, "{again}");
        assert!(again.stderr.contains("refusing to overwrite"), "{again}");
    }

    // The files build the programs' TLS configurations.
    let files = |stem: &str| TlsFiles {
        ca: pki.join("ca.crt"),
        cert: pki.join(format!("{stem}.crt")),
        key: pki.join(format!("{stem}.key")),
    };
    let coordinator = TlsMaterial::load(&files("coordinator")).unwrap();
    tls::server_config(&coordinator, std::sync::Arc::new(NoRevocation)).unwrap();
    let agent = TlsMaterial::load(&files("agent-web-01")).unwrap();
    tls::agent_client_config(&agent, &HostId::new("web-01").unwrap()).unwrap();
    let operator = TlsMaterial::load(&files("operator-alice")).unwrap();
    tls::operator_client_config(&operator).unwrap();
}

#[test]
fn bad_ca_input_is_a_usage_error_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = dir.join("pki");
    let pki_s = pki.to_str().unwrap();
    assert_eq!(serin(dir, &["ca", "init", "--pki-dir", pki_s]).code, 0);
    for (args, needle) in [
        (vec!["agent", "--host-id", "../etc"], "host id"),
        (
            vec!["operator", "--name", "a/b", "--role", "admin"],
            "invalid operator name",
        ),
        (
            vec!["operator", "--name", "bob", "--role", "root"],
            "invalid value 'root'",
        ),
        (
            vec!["coordinator", "--name", "bad name"],
            "is not a DNS name",
        ),
        (vec!["coordinator"], "required"),
    ] {
        let mut full = vec!["ca", "issue"];
        full.extend(args.iter().copied());
        full.extend(["--pki-dir", pki_s]);
        let run = serin(dir, &full);
        assert_eq!(run.code, 2, "{args:?}: {run}");
        assert!(run.stderr.contains(needle), "{args:?}: {run}");
    }
    let run = serin(
        dir,
        &[
            "ca",
            "issue",
            "agent",
            "--host-id",
            "h",
            "--pki-dir",
            "/nonexistent",
        ],
    );
    assert_eq!(run.code, 1, "{run}");
    assert!(
        run.stderr.contains("/nonexistent/ca.crt"),
        "names the missing file: {run}"
    );
    // Nothing but the CA was written.
    let mut names: Vec<_> = std::fs::read_dir(&pki)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["ca.crt", "ca.key"]);
}

#[test]
fn keygen_sign_and_verify_round_trip_and_a_changed_byte_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let keygen = serin(dir, &["keygen", "--name", "ops", "--comment", "ops-team"]);
    assert_eq!(keygen.code, 0, "{keygen}");
    assert_eq!(mode(&dir.join("ops.key")), 0o600);
    assert!(
        std::fs::read_to_string(dir.join("ops.pub"))
            .unwrap()
            .starts_with("serin-ed25519 ")
    );
    let again = serin(dir, &["keygen", "--name", "ops"]);
    assert_eq!(again.code, 1, "{again}");
    assert!(again.stderr.contains("refusing to overwrite"), "{again}");

    std::fs::write(dir.join("web.bin"), b"#!/bin/sh\necho release 2\n").unwrap();
    let sign = serin(
        dir,
        &[
            "release",
            "sign",
            "web.bin",
            "--key",
            "ops.key",
            "-s",
            "web",
            "-r",
            "2.0.0",
            "--counter",
            "2",
            "--expires-in",
            "30d",
            "--floor",
            "1",
        ],
    );
    assert_eq!(sign.code, 0, "{sign}");
    let manifest = std::fs::read_to_string(dir.join("web.bin.manifest")).unwrap();
    assert!(
        manifest.starts_with("serin-release-manifest-v1\nservice: web\nrelease: 2.0.0\n"),
        "{manifest}"
    );

    let verify = |args: &[&str]| {
        let mut full = vec!["release", "verify", "web.bin", "--trust", "ops.pub"];
        full.extend(args.iter().copied());
        serin(dir, &full)
    };
    let ok = verify(&["-s", "web", "-r", "2.0.0"]);
    assert_eq!(ok.code, 0, "{ok}");
    assert!(ok.stdout.contains("verified: web 2.0.0, counter 2"), "{ok}");

    for (args, code) in [
        (vec!["-s", "api", "-r", "2.0.0"], "OTHER_SERVICE"),
        (vec!["-s", "web", "-r", "2.0.1"], "OTHER_RELEASE"),
        (
            vec!["-s", "web", "-r", "2.0.0", "--floor", "3"],
            "BELOW_FLOOR",
        ),
    ] {
        let run = verify(&args);
        assert_eq!(run.code, 1, "{run}");
        assert!(
            run.stderr.contains(&format!("refused ({code})")),
            "{args:?}: {run}"
        );
    }

    // One byte of the artifact changed after signing.
    std::fs::write(dir.join("web.bin"), b"#!/bin/sh\necho release 3\n").unwrap();
    let run = verify(&["-s", "web", "-r", "2.0.0"]);
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("refused (HASH_MISMATCH)"), "{run}");

    // Signing again never overwrites a manifest.
    let resign = serin(
        dir,
        &[
            "release",
            "sign",
            "web.bin",
            "--key",
            "ops.key",
            "-s",
            "web",
            "-r",
            "3.0.0",
            "--counter",
            "3",
        ],
    );
    assert_eq!(resign.code, 1, "{resign}");
    assert!(resign.stderr.contains("refusing to overwrite"), "{resign}");

    // An unsigned release is refused when keys are pinned.
    std::fs::write(dir.join("other.bin"), b"x").unwrap();
    let run = serin(
        dir,
        &[
            "release",
            "verify",
            "other.bin",
            "--trust",
            "ops.pub",
            "-s",
            "web",
            "-r",
            "1",
        ],
    );
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("refused (UNSIGNED)"), "{run}");

    // A floor above the counter is refused at signing time.
    let run = serin(
        dir,
        &[
            "release",
            "sign",
            "other.bin",
            "--key",
            "ops.key",
            "-s",
            "web",
            "-r",
            "1",
            "--counter",
            "1",
            "--floor",
            "2",
        ],
    );
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("floor"), "{run}");
}

/// The packaged `coordinator.toml` with its commented `[tls]` and `[enrolment]` sections turned
/// on passes `serin check-config`; an `[enrolment]` without its CA key is refused by name.
#[test]
fn the_packaged_config_documents_enrolment_and_check_config_validates_it() {
    let packaged = include_str!("../../packaging/config/coordinator.toml");
    for key in [
        "#[enrolment]",
        "#listen = \"0.0.0.0:7701\"",
        "#ca_key",
        "#agent_cert_lifetime",
        "serin token create",
        "serin-agent enroll",
    ] {
        assert!(
            packaged.contains(key),
            "the packaged config documents {key}"
        );
    }
    let enabled: String = packaged
        .lines()
        .map(|l| {
            let on = [
                "#[tls]",
                "#ca =",
                "#cert =",
                "#key =",
                "#[enrolment]",
                "#listen =",
                "#ca_key =",
                "#agent_cert_lifetime =",
            ];
            if on.iter().any(|p| l.starts_with(p)) {
                &l[1..]
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("coordinator.toml");
    std::fs::write(&good, &enabled).unwrap();
    let ok = serin(
        tmp.path(),
        &["check-config", "--config", good.to_str().unwrap()],
    );
    assert_eq!(ok.code, 0, "{ok}\n{enabled}");
    assert!(ok.stdout.contains("config OK"), "{ok}");
    assert!(!ok.stderr.contains("warning"), "no unknown keys: {ok}");

    let bad = tmp.path().join("no-ca-key.toml");
    let without_key: String = enabled
        .lines()
        .filter(|l| !l.starts_with("ca_key"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&bad, without_key).unwrap();
    let refused = serin(
        tmp.path(),
        &["check-config", "--config", bad.to_str().unwrap()],
    );
    assert_ne!(refused.code, 0, "{refused}");
    assert!(
        format!("{}{}", refused.stdout, refused.stderr).contains("enrolment.ca_key"),
        "{refused}"
    );
}
