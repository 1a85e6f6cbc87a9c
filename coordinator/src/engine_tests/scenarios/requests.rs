//! Issue 11's request gate (`min_requests`): a bake passes only with its time up and enough
//! requests served by the wave since activation; too few pauses with "insufficient data",
//! never a pass.

use super::*;

impl Sim {
    /// A passing health report of web-2 from `h` whose request counter reads `total`.
    fn served(&mut self, h: &str, total: u64) {
        self.feed(Input::Health {
            host: hid(h),
            sample: HealthSample {
                service: ServiceName::new("web").unwrap(),
                release: Some(ReleaseId::new("web-2").unwrap()),
                healthy: true,
                checks_passing: 1,
                checks_total: 1,
                probe_latency_us: Some(1_000),
                restarts: 0,
                cpu_percent: 1.0,
                rss_bytes: 1,
                observed_unix_ms: self.now,
                requests_total: Some(total),
            },
        });
    }

    /// Lets the current wave's bake run out.
    fn bake_out(&mut self) {
        let idx = self.m.current_wave();
        let ends = self.m.waves()[idx].bake_ends_ms.unwrap();
        self.advance(ends - self.now);
    }
}

fn gated(min: u64) -> Sim {
    let mut w = wire_spec(&["1", "100%"]);
    w.min_requests = min;
    let mut s = Sim::new(fleet(4), w);
    s.agents(&[], false);
    assert_eq!(s.m.waves()[0].state, WaveState::Baking);
    s
}

#[test]
fn a_canary_without_enough_requests_pauses_with_insufficient_data_never_a_pass() {
    let mut s = gated(100);
    // The counter's value at the first report is the starting point: 30 requests since.
    s.served("h01", 5_000);
    s.served("h01", 5_030);
    s.bake_out();
    assert_eq!(s.m.state(), RolloutState::Paused);
    assert_eq!(s.m.waves()[0].state, WaveState::Paused);
    let d = s.m.decisions().last().unwrap();
    assert_eq!(d.kind.as_str(), "pause");
    assert!(
        d.reason.contains("insufficient data: 30 of 100 requests"),
        "{}",
        d.reason
    );
    assert_eq!(d.evidence["requests_served"], "30");
    assert_eq!(d.evidence["min_requests"], "100");
    assert!(
        s.sent_kinds("confirm").is_empty(),
        "a paused canary is not confirmed"
    );
    assert!(wire_status(&s.m).reason.contains("insufficient data"));
    // Time alone changes nothing: it stays paused.
    s.advance(3_600_000);
    assert_eq!(s.m.state(), RolloutState::Paused);
    assert_eq!(s.sent_kinds("activate"), vec!["h01"]);
    // An operator accepts the wave as it is (also after a coordinator restart).
    s.restart();
    s.feed(Input::HostUp(host("h01", "eu-1", "web-2")));
    for i in 2..=4 {
        s.feed(Input::HostUp(host(&format!("h{i:02}"), "eu-1", "web-1")));
    }
    s.operator(OperatorAction::Promote).unwrap();
    s.advance(1);
    assert_eq!(s.m.waves()[0].state, WaveState::Passed);
    let d = s.m.decisions().last().unwrap();
    assert_eq!((d.kind.as_str(), d.actor.as_str()), ("promote", "alice"));
    assert_eq!(s.sent_kinds("confirm"), vec!["h01"]);
}

#[test]
fn a_canary_with_enough_requests_passes_and_the_gate_shows_its_count() {
    let mut s = gated(100);
    s.served("h01", 5_000);
    s.served("h01", 5_150);
    s.bake_out();
    assert_eq!(s.m.waves()[0].state, WaveState::Passed);
    let d = s.m.decisions().last().unwrap();
    assert_eq!(d.kind.as_str(), "promote");
    assert!(
        d.reason.contains("150 requests served (at least 100)"),
        "{}",
        d.reason
    );
    assert_eq!(d.evidence["requests_served"], "150");
    assert_eq!(d.evidence["min_requests"], "100");
}

#[test]
fn requests_arriving_only_after_the_time_is_up_do_not_pass_a_paused_wave_by_themselves() {
    let mut s = gated(100);
    // No counter at all (no HAProxy socket on the agent): insufficient data, says why.
    s.bake_out();
    assert_eq!(s.m.state(), RolloutState::Paused);
    let d = s.m.decisions().last().unwrap();
    assert!(
        d.reason
            .contains("insufficient data: 0 of 100 requests served since activation when the bake ended (1 hosts report no request counter)"),
        "{}",
        d.reason
    );
    s.served("h01", 0);
    s.served("h01", 500);
    assert_eq!(s.m.state(), RolloutState::Paused);
    // Resume: the wave bakes again, counting on; now it passes.
    s.operator(OperatorAction::Resume).unwrap();
    assert_eq!(s.m.waves()[0].state, WaveState::Baking);
    s.bake_out();
    assert_eq!(s.m.waves()[0].state, WaveState::Passed);
    assert_eq!(
        s.m.decisions().last().unwrap().evidence["requests_served"],
        "500"
    );
}

#[test]
fn an_operator_pause_is_not_promotable_and_a_rollout_without_the_gate_ignores_counters() {
    let mut s = gated(100);
    s.operator(OperatorAction::Pause).unwrap();
    let e = s.operator(OperatorAction::Promote).unwrap_err();
    assert!(
        e.to_string().contains("paused for insufficient data"),
        "{e}"
    );
    // Without min_requests the bake passes on time alone and shows no request evidence.
    let mut s = Sim::new(fleet(4), wire_spec(&["1", "100%"]));
    s.agents(&[], false);
    s.served("h01", 10);
    s.bake_out();
    assert_eq!(s.m.waves()[0].state, WaveState::Passed);
    assert!(
        !s.m.decisions()
            .last()
            .unwrap()
            .evidence
            .contains_key("requests_served")
    );
}

#[test]
fn a_report_of_another_release_starts_the_count_afresh() {
    let mut s = gated(100);
    s.served("h01", 1_000);
    s.served("h01", 1_080);
    // A report of another release (the host went back) forgets the count.
    s.feed(Input::Health {
        host: hid("h01"),
        sample: HealthSample {
            service: ServiceName::new("web").unwrap(),
            release: Some(ReleaseId::new("web-1").unwrap()),
            healthy: true,
            checks_passing: 1,
            checks_total: 1,
            probe_latency_us: None,
            restarts: 0,
            cpu_percent: 1.0,
            rss_bytes: 1,
            observed_unix_ms: s.now,
            requests_total: Some(1_090),
        },
    });
    s.served("h01", 1_100);
    s.served("h01", 1_150);
    s.bake_out();
    assert_eq!(s.m.state(), RolloutState::Paused);
    assert_eq!(
        s.m.decisions().last().unwrap().evidence["requests_served"],
        "50"
    );
}
