//! Issue 6 finding 6: test-only code never ships. The product agent (what `cargo build
//! --workspace`, `./demo.sh` and `packaging/build.sh` produce) has no fault hooks: it ignores
//! `SERIN_AGENT_CRASH_AT` and does not even contain the hooks' variable names, while the test
//! build of the agent (`binaries::fault_agent`, built in `target/fault-injection/`) honours them,
//! so each check could fail.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use serin_proto::wire::OrderPhase;
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::SERVICE;
use serin_tests::demo_release::{Behaviour, DemoRelease};
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
