//! `serin-agent check-config`: every problem named by its key, unknown keys only warned about.

use std::process::{Command, Output};

use serin_tests::agent_proc::{AgentOptions, config_toml};
use serin_tests::binaries;

/// A valid config for a test agent.
fn valid() -> String {
    config_toml(
        &AgentOptions::new("check-config"),
        "http://127.0.0.1:7700",
        std::path::Path::new("/tmp/serin-check-config-state"),
        "check-config-host",
        18080,
    )
}

fn check(config: &str) -> (Output, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).expect("writing the config");
    let out = Command::new(binaries::agent())
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("running serin-agent check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// Asserts check-config refuses `config` and names every one of `needles`.
fn refused(config: &str, needles: &[&str]) {
    let (out, text) = check(config);
    assert!(
        !out.status.success(),
        "check-config accepted a bad config:\n{config}\noutput:\n{text}"
    );
    for n in needles {
        assert!(
            text.contains(n),
            "check-config output does not mention {n:?}:\n{text}\nconfig:\n{config}"
        );
    }
}

#[test]
fn a_valid_config_passes() {
    let (out, text) = check(&valid());
    assert!(
        out.status.success(),
        "valid config refused:\n{text}\n{}",
        valid()
    );
    assert!(text.contains("config OK: 1 services"), "{text}");
}

#[test]
fn a_bad_duration_is_named_by_its_key() {
    let config = valid().replace(r#"interval = "200ms""#, r#"interval = "abc""#);
    refused(&config, &["service[0].check[0].interval", "abc"]);
}

#[test]
fn a_missing_coordinator_is_named() {
    let config: String = valid()
        .lines()
        .filter(|l| !l.starts_with("coordinator ="))
        .map(|l| format!("{l}\n"))
        .collect();
    refused(&config, &["coordinator"]);
}

#[test]
fn a_bad_service_name_is_named_by_its_key() {
    let config = valid().replace(r#"name = "demo""#, r#"name = "Demo!""#);
    refused(&config, &["service[0].name", "Demo!"]);
}

#[test]
fn an_unknown_check_kind_is_named_by_its_key() {
    let config = valid().replace(r#"kind = "http""#, r#"kind = "ftp""#);
    refused(&config, &["service[0].check[0].kind", "ftp"]);
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let config = valid()
        .replace(r#"interval = "200ms""#, r#"interval = "abc""#)
        .replace(r#"name = "demo""#, r#"name = "Demo!""#);
    refused(
        &config,
        &["service[0].check[0].interval", "service[0].name"],
    );
}

#[test]
fn an_unknown_key_only_warns() {
    let config = valid().replace("keep_releases = 3", "keep_releases = 3\nfoo = 1");
    let (out, text) = check(&config);
    assert!(out.status.success(), "an unknown key was fatal:\n{text}");
    assert!(
        text.contains("warning: unknown key service[0].foo"),
        "{text}"
    );
}

#[test]
fn the_agent_refuses_to_run_with_a_bad_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        valid().replace(r#"kind = "http""#, r#"kind = "ftp""#),
    )
    .unwrap();
    let out = Command::new(binaries::agent())
        .arg("--config")
        .arg(&path)
        .output()
        .expect("running serin-agent");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent ran with a bad config: {text}"
    );
    assert!(text.contains("service[0].check[0].kind"), "{text}");
}
