//! The `serin-agent` binary's log output when stderr is not a terminal (a file, a pipe,
//! journald): plain text, no ANSI colour escapes.

use std::process::{Command, Stdio};

#[test]
fn logs_to_a_pipe_carry_no_colour_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-agent.toml");
    // A missing config is logged through tracing at ERROR, then the agent exits.
    let out = Command::new(env!("CARGO_BIN_EXE_serin-agent"))
        .arg("--config")
        .arg(&missing)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env_remove("SERIN_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "agent started without a config");
    assert!(
        stderr.contains("ERROR") && stderr.contains("no-such-agent.toml"),
        "the error is not logged: {stderr:?}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "ANSI escapes in a log written to a pipe: {stderr:?}"
    );
}
