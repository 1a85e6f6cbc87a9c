//! A host without a CA bundle (a minimal Debian install has no `ca-certificates`): the agent
//! still starts and attaches to its coordinator. Only releases fetched from https URLs need the
//! bundle. Found by the system suite: the agent used to fail at start with "cannot build the HTTP
//! client: builder error".

use std::process::{Command, Stdio};
use std::time::Duration;

use serin_tests::agent_proc::{AgentOptions, config_toml};
use serin_tests::binaries;
use serin_tests::fake_coordinator::FakeCoordinator;

#[test]
fn agent_starts_without_a_ca_bundle() {
    let coord = FakeCoordinator::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let no_certs = dir.path().join("no-certs");
    std::fs::create_dir(&no_certs).expect("creating an empty certificate directory");
    let host = "no-ca-bundle-host";
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        config_toml(
            &AgentOptions::new("no-ca-bundle"),
            &coord.url(),
            &dir.path().join("state"),
            host,
            18099,
        ),
    )
    .expect("writing the config");
    let log = dir.path().join("agent.log");
    let mut child = Command::new(binaries::agent())
        .arg("--config")
        .arg(&config)
        // Where rustls looks for roots: nothing there.
        .env("SSL_CERT_FILE", no_certs.join("ca-certificates.crt"))
        .env("SSL_CERT_DIR", &no_certs)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("creating the agent log"))
        .spawn()
        .expect("starting serin-agent");
    let dump = || {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        format!("{}\nagent log:\n{log}", coord.dump(host))
    };
    coord.wait_attached(host, 1, Duration::from_secs(20), &dump);
    let _ = child.kill();
    let _ = child.wait();
}
