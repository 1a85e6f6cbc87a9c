//! Issue 6 finding 6: test-only code never ships. The product agent and coordinator (what `cargo
//! build --workspace`, `./demo.sh` and `packaging/build.sh` produce) have no fault hooks: they
//! ignore `SERIN_AGENT_CRASH_AT` / `SERIN_COORDINATOR_CRASH_AT` and do not even contain the hooks'
//! variable names (nor `SERIN_CHAOS`), while the test builds (`binaries::fault_agent`,
//! `binaries::fault_coordinator`, built in `target/fault-injection/`) honour them, so each check
//! could fail.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use serin_proto::wire::OrderPhase;
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::SERVICE;
use serin_tests::demo_release::{Behaviour, DemoRelease};
use serin_tests::fleet::CoordinatorProc;
use serin_tests::orders::{self, Deadlines};

/// The crash points of stage, activate and local rollback.
const ALL_POINTS: &str = "stage-downloaded,stage-verified,stage-installed,activate-journaled,\
activate-swapped,activate-restarted,confirm-wait,rollback-swapped";

/// With `SERIN_AGENT_CRASH_AT` naming every crash point, the product agent stages, activates,
/// confirms and rolls back locally without dying; the test build of the agent dies at the first
/// of them under the same conditions (so the variable would have been honoured).
#[test]
fn product_agent_ignores_crash_points() {
    let product = serin_tests::binaries::agent();
    let fx = AgentFixture::start("product-ignores-crash-points");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));

    fx.agent.kill();
    fx.agent.spawn_binary(&product, Some(ALL_POINTS));
    fx.wait_attached(2);
    let pid = fx.agent.pid();
    // Stage and activate a healthy release, then confirm it.
    let v2 = DemoRelease::healthy("demo-2.0");
    fx.publish(&v2);
    fx.send(orders::stage(2, v2.wire(SERVICE, "")));
    fx.wait_phase(2, OrderPhase::Staged);
    fx.activate(3, &v2, Deadlines::quick().confirm_within(30_000));
    fx.wait_phase(3, OrderPhase::Healthy);
    fx.send(orders::confirm(4, SERVICE, "demo-2.0"));
    fx.wait_phase(4, OrderPhase::Confirmed);
    // A release that crashes at start is rolled back locally (reaches "rollback-swapped").
    let bad = DemoRelease::build(Behaviour::healthy("demo-3.0").crashing_at_start());
    fx.activate(5, &bad, Deadlines::quick());
    fx.wait_phase(5, OrderPhase::RolledBack);
    assert_eq!(fx.wait_consistent(), "demo-2.0");
    assert!(
        fx.agent.is_running() && fx.agent.pid() == pid,
        "the product agent died or restarted with SERIN_AGENT_CRASH_AT set\n{}",
        fx.dump()
    );

    // The control: the test build honours the variable at the first point reached.
    fx.agent.kill();
    fx.agent
        .spawn_binary(&serin_tests::binaries::fault_agent(), Some(ALL_POINTS));
    fx.wait_attached(3);
    let v4 = DemoRelease::healthy("demo-4.0");
    fx.publish(&v4);
    fx.send(orders::stage(6, v4.wire(SERVICE, "")));
    let status = fx.agent.wait_exit(Duration::from_secs(30), &|| fx.dump());
    assert_eq!(
        status.signal(),
        Some(9),
        "the test build should have SIGKILLed itself"
    );
}

/// The product binary does not even contain the hooks' variable names, while the test build
/// does (so the check can fail).
#[test]
fn product_agent_binary_has_no_fault_hooks() {
    let contains = |path: &std::path::Path, needle: &[u8]| {
        let bytes = std::fs::read(path).expect("reading the agent binary");
        bytes.windows(needle.len()).any(|w| w == needle)
    };
    let product = serin_tests::binaries::agent();
    let test_build = serin_tests::binaries::fault_agent();
    for needle in [&b"SERIN_AGENT_CRASH_AT"[..], &b"SERIN_AGENT_WEDGE_FILE"[..]] {
        let name = String::from_utf8_lossy(needle);
        assert!(
            !contains(&product, needle),
            "the product agent {} contains {name}: a test-only hook ships",
            product.display()
        );
        assert!(
            contains(&test_build, needle),
            "the test build {} lacks {name}: the check proves nothing",
            test_build.display()
        );
    }
}

/// Every crash point of the coordinator, as `SERIN_COORDINATOR_CRASH_AT` takes them.
const COORDINATOR_POINTS: &str = "artifact-before-rename,artifact-committed,\
store-release-before-commit,store-release-committed,store-rollout-before-commit,\
store-rollout-committed,store-seq-before-commit,store-seq-committed,finish-before-save,\
finish-saved,activate-before-send,activate-after-send,confirm-before-send,confirm-after-send,\
rollback-before-send,rollback-after-send";

/// Pushes a small artifact through the `serin` CLI; returns whether it succeeded and what it said.
fn push_artifact(coord: &CoordinatorProc, dir: &std::path::Path, release: &str) -> (bool, String) {
    let file = dir.join(format!("{release}.bin"));
    std::fs::write(&file, format!("artifact of {release}")).expect("writing an artifact");
    let out = std::process::Command::new(serin_tests::binaries::serin())
        .args([
            "--coordinator",
            &coord.url(),
            "-o",
            "json",
            "artifact",
            "push",
        ])
        .arg(&file)
        .args(["--service", SERVICE, "--release", release])
        .envs(serin_tests::fleet::operator_env(
            &serin_tests::tls::pki().harness_operator(),
        ))
        .output()
        .expect("running serin artifact push");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// With `SERIN_COORDINATOR_CRASH_AT` naming every crash point, the product coordinator stores
/// an artifact and its release (four of the points) without dying; the test build aborts at the
/// first of them under the same conditions.
#[test]
fn product_coordinator_ignores_crash_points() {
    let coord = CoordinatorProc::start();
    let dir = tempfile::tempdir().expect("a tempdir");
    coord.set_env("SERIN_COORDINATOR_CRASH_AT", Some(COORDINATOR_POINTS));
    coord.restart();
    let (ok, said) = push_artifact(&coord, dir.path(), "demo-1.0");
    assert!(
        ok,
        "push to the product coordinator failed: {said}\n{}",
        coord.dump()
    );
    assert!(
        coord.is_running(),
        "the product coordinator died with SERIN_COORDINATOR_CRASH_AT set\n{}",
        coord.dump()
    );

    // The control: the test build honours the variable at the first point reached.
    coord.set_binary(Some(serin_tests::binaries::fault_coordinator()));
    coord.restart();
    let (ok, said) = push_artifact(&coord, dir.path(), "demo-2.0");
    assert!(
        !ok,
        "the push should have failed with the coordinator: {said}"
    );
    let status = coord.wait_exit(Duration::from_secs(20), &|| coord.dump());
    assert_eq!(
        status.signal(),
        Some(6),
        "the test build should have aborted (SIGABRT), exited with {status}\n{}",
        coord.dump()
    );
    assert!(
        coord
            .log()
            .contains("aborting the coordinator at artifact-before-rename:1"),
        "{}",
        coord.dump()
    );
}

/// The product coordinator does not even contain the hooks' variable names, while the test
/// build does (so the check can fail); neither does the product agent contain the chaos hook's.
#[test]
fn product_coordinator_binary_has_no_fault_hooks() {
    let contains = |path: &std::path::Path, needle: &[u8]| {
        let bytes = std::fs::read(path).expect("reading a binary");
        bytes.windows(needle.len()).any(|w| w == needle)
    };
    let product = serin_tests::binaries::serin();
    let test_build = serin_tests::binaries::fault_coordinator();
    for needle in [&b"SERIN_COORDINATOR_CRASH_AT"[..], &b"SERIN_CHAOS"[..]] {
        let name = String::from_utf8_lossy(needle);
        assert!(
            !contains(&product, needle),
            "the product coordinator {} contains {name}: a test-only hook ships",
            product.display()
        );
        assert!(
            contains(&test_build, needle),
            "the test build {} lacks {name}: the check proves nothing",
            test_build.display()
        );
    }
    let (agent, fault_agent) = (
        serin_tests::binaries::agent(),
        serin_tests::binaries::fault_agent(),
    );
    assert!(
        !contains(&agent, b"SERIN_CHAOS"),
        "the product agent contains SERIN_CHAOS"
    );
    assert!(
        contains(&fault_agent, b"SERIN_CHAOS"),
        "the agent's test build lacks SERIN_CHAOS: the check proves nothing"
    );
}
