//! Issue 8 end to end on a real fleet (`serin serve` + `serin-agent`s + the demo service): no
//! false verdicts. A wave that waits for an unreachable host far longer than its hosts' confirm
//! deadline keeps its healthy hosts on the new release: the coordinator, alive, keeps their
//! dead-man switches fed with `HoldConfirm`, so no healthy release is reverted or blamed.

use std::io::Write;
use std::time::Duration;

use serin_tests::fleet::{self, Fleet, Timings, describe_status};
use serin_tests::wait;

const LONG: Duration = Duration::from_secs(60);

#[test]
fn a_wave_waiting_for_an_unreachable_host_keeps_its_healthy_host_on_the_release() {
    let f = Fleet::start("held", &["a", "b", "c"]);
    // A short confirm grace: each activation's confirm deadline is healthy deadline (6 s) +
    // bake (1 s) + 1 s = 8 s, so without holds the waiting host would revert within seconds.
    let config = f.coord.root().join("coordinator.toml");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&config)
        .and_then(|mut c| c.write_all(b"\n[engine]\nconfirm_grace = \"1s\"\n"))
        .expect("adding an [engine] section to the coordinator config");
    f.coord.restart();
    f.wait_connected(3);
    f.push(&fleet::healthy("v2"));
    let t = Timings {
        canary_bake: Some("60s"),
        ..Timings::default()
    };
    let id = f.start_rollout("v2", &["--waves", "1,100%"], &t);
    let s = f.wait_rollout(&id, "the canary baking", LONG, |s| {
        s.waves
            .first()
            .is_some_and(|w| w.state().as_str() == "baking")
    });
    let wave1 = f.wave_hosts(&s, 1);
    let (gone, live) = (wave1[0], wave1[1]);
    f.hosts[gone].kill();
    f.wait_host_connected(gone, false);
    f.control("promote", &id);
    f.wait_state(&id, "waiting", LONG);
    f.wait_serving(live, "v2");
    // Three confirm deadlines of waiting: the live host stays on v2, activated once, and
    // the rollout keeps waiting with no failure.
    wait::hold_for(
        "the live host on v2 while the wave waits",
        Duration::from_secs(24),
        &|| f.dump(),
        || {
            let s = f.status(&id);
            if s.state().as_str() != "waiting" || s.waves[1].failed != 0 {
                return Err(describe_status(&s));
            }
            let current = f.hosts[live].agent.current_release();
            if current.as_deref() != Some("v2") {
                return Err(format!("host #{live} is on {current:?}"));
            }
            Ok(())
        },
    );
    assert_eq!(
        f.history().activations(live, "v2"),
        1,
        "host #{live} reverted and was activated again\n{}",
        f.dump()
    );

    f.hosts[gone].revive();
    let s = f.wait_finished(&id, LONG);
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "{}\n{}",
        describe_status(&s),
        f.dump()
    );
    f.assert_all_serving(0..3, "v2");
}
