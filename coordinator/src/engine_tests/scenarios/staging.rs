//! Prepare, then activate (issue 10): stage orders ahead of a host's wave, bounded by
//! [`EngineSettings::stage_ahead`]; a stage that fails is a warning, never a failure; a
//! rollback or an abort cancels the stages in flight and activates nothing; sequences stay
//! monotonic per host through stale refusals and restarts; unreachable hosts are staged when
//! they come back.

use super::*;

fn settings(stage_ahead: u32) -> EngineSettings {
    EngineSettings {
        stage_ahead,
        ..EngineSettings::default()
    }
}

impl Sim {
    /// The unanswered order of `kind` sent to `host`, marked answered.
    fn take(&mut self, host: &str, kind: &str) -> Order {
        let (_, o) = self
            .pending()
            .into_iter()
            .find(|(h, o)| h.as_str() == host && o.action.kind() == kind)
            .unwrap_or_else(|| panic!("no {kind} order pending for {host}: {:?}", self.sent));
        self.answered.insert(o.order_id.clone());
        o
    }

    /// The canary h01 answers ACTIVATED (its download is over: staging ahead may begin).
    fn canary_activated(&mut self) -> Order {
        // Left unanswered in the log: `agents` answers it HEALTHY later.
        let (_, o) = self
            .pending()
            .into_iter()
            .find(|(h, o)| h.as_str() == "h01" && o.action.kind() == "activate")
            .expect("the canary's activation");
        self.reply(
            &hid("h01"),
            &o,
            OrderPhase::Activated,
            ResultCode::Ok,
            "web-2",
        );
        o
    }

    /// Every pending stage order is answered STAGED.
    fn stage_all(&mut self) {
        for (h, o) in self.pending() {
            if o.action.kind() == "stage" {
                self.answered.insert(o.order_id.clone());
                self.reply(&h, &o, OrderPhase::Staged, ResultCode::Ok, "web-1");
            }
        }
    }

    /// Runs every wave to its end: answers, then bakes, until the rollout is finished.
    fn finish(&mut self) {
        for _ in 0..20 {
            if self.m.state().is_finished() {
                break;
            }
            self.stage_all();
            self.agents(&[], false);
            self.advance(60_000);
        }
        self.agents(&[], false);
    }

    /// The sequences sent to `host`, in order, with the order kinds.
    fn seqs_of(&self, host: &str) -> Vec<(&'static str, u64)> {
        self.sent
            .iter()
            .filter(|(_, h, _)| h.as_str() == host)
            .map(|(_, _, o)| (o.action.kind(), o.seq))
            .collect()
    }
}

#[test]
fn later_waves_are_staged_one_wave_at_a_time_and_activated_in_their_waves() {
    let mut s = Sim::new(fleet(10), wire_spec(&["1", "50%", "100%"]));
    assert_eq!(s.sent_kinds("activate"), vec!["h01"], "only the canary");
    assert!(
        s.sent_kinds("stage").is_empty(),
        "nothing shares the canary's download"
    );
    let canary = s.canary_activated();
    assert_eq!(
        s.sent_kinds("stage"),
        vec!["h02", "h03", "h04", "h05"],
        "the next wave is staged once the canary swapped"
    );
    // The wave after it waits until those downloads are done.
    for h in ["h02", "h03", "h04"] {
        let o = s.take(h, "stage");
        s.reply(&hid(h), &o, OrderPhase::Staged, ResultCode::Ok, "web-1");
    }
    assert_eq!(s.sent_kinds("stage").len(), 4);
    let o = s.take("h05", "stage");
    s.reply(&hid("h05"), &o, OrderPhase::Staged, ResultCode::Ok, "web-1");
    let later: Vec<String> = (2..=10).map(|i| format!("h{i:02}")).collect();
    assert_eq!(s.sent_kinds("stage"), later, "then the last wave");
    s.reply(
        &hid("h01"),
        &canary,
        OrderPhase::Healthy,
        ResultCode::Ok,
        "web-2",
    );
    for (_, _, o) in s.sent.iter().filter(|(_, _, o)| o.action.kind() == "stage") {
        assert_eq!(
            o.action,
            OrderAction::Stage { release: release() },
            "a stage of the rollout's release"
        );
    }
    s.stage_all();
    // A staged host is still pending and serves its baseline; its status says it is staged.
    assert_eq!(s.phase("h05"), HostPhase::Pending);
    let st = s.status_of("h05");
    assert!(st.detail.contains("staged ahead"), "{}", st.detail);
    assert_eq!(st.current_release, "web-1");
    s.finish();
    assert_eq!(s.m.state(), RolloutState::Succeeded);
    for h in &later {
        assert_eq!(s.phase(h), HostPhase::Confirmed, "{h}");
        // The stage's sequence is below the activation's, which is below the confirm's.
        let seqs = s.seqs_of(h);
        let kinds: Vec<&str> = seqs.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, vec!["stage", "activate", "confirm"], "{h}");
        assert!(
            seqs.windows(2).all(|w| w[0].1 < w[1].1),
            "{h}: sequences not increasing: {seqs:?}"
        );
    }
}

#[test]
fn stage_ahead_is_bounded_and_refills_as_staged_hosts_are_dispatched() {
    let mut s = Sim::with_settings(fleet(10), wire_spec(&["1", "50%", "100%"]), settings(3));
    s.canary_activated();
    assert_eq!(s.sent_kinds("stage"), vec!["h02", "h03", "h04"]);
    s.stage_all();
    // Staged hosts hold their slots until they are dispatched: nothing more yet.
    s.advance(1_000);
    assert_eq!(s.sent_kinds("stage").len(), 3);
    // The canary passes; wave 2 (h02–h05) is dispatched, which frees the three slots.
    s.agents(&[], false);
    s.advance(60_000);
    assert_eq!(s.m.current_wave(), 1);
    assert_eq!(
        s.sent_kinds("activate"),
        vec!["h01", "h02", "h03", "h04", "h05"]
    );
    // The slots are free, but wave 2 is still downloading (h05 was not staged): the next wave
    // waits for it.
    assert_eq!(s.sent_kinds("stage").len(), 3);
    s.agents(&[], false);
    assert_eq!(
        s.sent_kinds("stage"),
        vec!["h02", "h03", "h04", "h06", "h07", "h08"],
        "once wave 2 swapped, the next wave's first three are staged"
    );
    // Off: no stage order at all.
    let mut off = Sim::with_settings(fleet(10), wire_spec(&["1", "50%", "100%"]), settings(0));
    off.finish();
    assert_eq!(off.m.state(), RolloutState::Succeeded);
    assert!(off.sent_kinds("stage").is_empty());
}

#[test]
fn a_failed_stage_is_a_warning_and_the_host_is_still_activated_in_its_wave() {
    let mut s = Sim::new(fleet(4), wire_spec(&["1", "100%"]));
    let canary = s.canary_activated();
    let o = s.take("h03", "stage");
    let mut out = s.outcome(
        &o,
        OrderPhase::Failed,
        ResultCode::InsufficientSpace,
        "web-1",
    );
    out.message = "not enough space in /var/lib/serin-agent".into();
    s.feed(Input::OrderResult {
        host: hid("h03"),
        outcome: out,
    });
    let h = s.m.host(&hid("h03")).unwrap();
    assert_eq!(h.phase, HostPhase::Pending, "not failed");
    assert!(h.failure.is_none());
    let st = s.status_of("h03");
    assert!(
        st.detail.contains("warning: staging ahead failed")
            && st.detail.contains("not enough space"),
        "{}",
        st.detail
    );
    assert!(
        s.events
            .iter()
            .any(|e| e.contains("h03") && e.contains("not a failure")),
        "the event log (explain) says so: {:?}",
        s.events
    );
    // Its wave activates it all the same, and the warning shows while it is dispatched.
    s.reply(
        &hid("h01"),
        &canary,
        OrderPhase::Healthy,
        ResultCode::Ok,
        "web-2",
    );
    s.stage_all();
    s.agents(&[], false);
    s.advance(60_000);
    assert_eq!(s.phase("h03"), HostPhase::Dispatched);
    assert!(s.status_of("h03").detail.contains("warning"));
    s.finish();
    assert_eq!(s.m.state(), RolloutState::Succeeded);
    assert_eq!(s.phase("h03"), HostPhase::Confirmed);
    assert!(
        s.m.decisions()
            .iter()
            .all(|d| d.kind.as_str() != "rollback")
    );
}

#[test]
fn a_rollback_cancels_the_stages_in_flight_and_activates_nothing_more() {
    let mut s = Sim::new(fleet(6), wire_spec(&["1", "100%"]));
    let canary = s.canary_activated();
    assert_eq!(
        s.sent_kinds("stage"),
        vec!["h02", "h03", "h04", "h05", "h06"]
    );
    // h02 staged already, h03 is cut off while staging; the rest are still downloading.
    let o = s.take("h02", "stage");
    s.reply(&hid("h02"), &o, OrderPhase::Staged, ResultCode::Ok, "web-1");
    s.feed(Input::HostDown(hid("h03")));
    // The canary fails to start and its agent rolls it back: the rollout rolls back.
    s.reply(
        &hid("h01"),
        &canary,
        OrderPhase::RolledBack,
        ResultCode::ServiceFailedToStart,
        "web-1",
    );
    assert!(
        s.m.decisions()
            .iter()
            .any(|d| d.kind.as_str() == "rollback")
    );
    assert_eq!(
        s.sent_kinds("cancel"),
        vec!["h04", "h05", "h06"],
        "a cancel to each reachable host still staging; h02 is done, h03 unreachable"
    );
    let stage_seq = s.seqs_of("h04")[0].1;
    let cancel = s.take("h04", "cancel");
    assert!(cancel.seq > stage_seq, "the cancel supersedes the stage");
    s.reply(
        &hid("h04"),
        &cancel,
        OrderPhase::Cancelled,
        ResultCode::Ok,
        "web-1",
    );
    s.agents(&[], false);
    s.feed(Input::HostUp(host("h03", "eu-1", "web-1")));
    s.advance(1_000);
    assert_eq!(s.m.state(), RolloutState::RolledBack);
    assert!(s.m.is_quiescent(), "every cancel answered or withdrawn");
    assert_eq!(
        s.sent_kinds("activate"),
        vec!["h01"],
        "nothing else activated"
    );
    assert_eq!(s.sent_kinds("stage").len(), 5, "no stage sent again");
    for h in ["h02", "h03", "h04", "h05", "h06"] {
        assert_eq!(s.phase(h), HostPhase::Pending, "{h}");
    }
    // An abort does the same.
    let mut a = Sim::new(fleet(4), wire_spec(&["1", "100%"]));
    a.canary_activated();
    a.operator(OperatorAction::Abort).unwrap();
    assert_eq!(a.sent_kinds("cancel"), vec!["h02", "h03", "h04"]);
    a.agents(&[], false);
    assert_eq!(a.m.state(), RolloutState::Aborted);
    assert!(a.m.is_quiescent());
    assert_eq!(a.sent_kinds("activate"), vec!["h01"]);
}

#[test]
fn a_stale_refusal_of_a_stage_catches_up_and_later_orders_stay_above_it() {
    let mut s = Sim::new(fleet(3), wire_spec(&["1", "100%"]));
    s.canary_activated();
    // The agent of h02 applied sequence 40 already (a store restored from a backup).
    let o = s.take("h02", "stage");
    let mut out = s.outcome(&o, OrderPhase::Rejected, ResultCode::StaleOrder, "web-1");
    out.last_seq = 40;
    s.feed(Input::OrderResult {
        host: hid("h02"),
        outcome: out,
    });
    let again = s.take("h02", "stage");
    assert!(
        again.seq > 40,
        "stage sent again past the agent: {}",
        again.seq
    );
    assert_ne!(again.order_id, o.order_id);
    s.reply(
        &hid("h02"),
        &again,
        OrderPhase::Staged,
        ResultCode::Ok,
        "web-1",
    );
    s.finish();
    assert_eq!(s.m.state(), RolloutState::Succeeded);
    let seqs = s.seqs_of("h02");
    assert!(
        seqs.windows(2).all(|w| w[0].1 < w[1].1),
        "sequences not increasing: {seqs:?}"
    );
    assert_eq!(seqs.last().unwrap().0, "confirm");
}

#[test]
fn a_stage_survives_a_restart_and_a_host_cut_off_while_staging_gets_it_again() {
    let mut s = Sim::new(fleet(3), wire_spec(&["1", "100%"]));
    s.canary_activated();
    assert_eq!(s.sent_kinds("stage"), vec!["h02", "h03"]);
    let first = s.take("h02", "stage");
    // The coordinator restarts before any stage is answered.
    s.restart();
    s.feed(Input::Resync(fleet(3)));
    let resent = s.take("h02", "stage");
    assert_eq!(
        (resent.order_id.as_str(), resent.seq),
        (first.order_id.as_str(), first.seq),
        "the same stage, unchanged (the agent deduplicates it)"
    );
    s.reply(
        &hid("h02"),
        &resent,
        OrderPhase::Staged,
        ResultCode::Ok,
        "web-1",
    );
    // h03 is cut off while staging and comes back: the same stage goes out again.
    let to_h03 = |s: &Sim| -> Vec<Order> {
        s.sent
            .iter()
            .filter(|(_, h, _)| h.as_str() == "h03")
            .map(|(_, _, o)| o.clone())
            .collect()
    };
    let before = to_h03(&s);
    assert_eq!(before.len(), 1, "re-sent once after the restart");
    s.feed(Input::HostDown(hid("h03")));
    s.feed(Input::HostUp(host("h03", "eu-1", "web-1")));
    let after = to_h03(&s);
    assert_eq!(after.len(), 2, "sent again on its reconnect");
    let again = after[1].clone();
    assert_eq!(
        (again.order_id.as_str(), again.seq),
        (before[0].order_id.as_str(), before[0].seq)
    );
    s.answered.insert(again.order_id.clone());
    s.reply(
        &hid("h03"),
        &again,
        OrderPhase::Staged,
        ResultCode::Ok,
        "web-1",
    );
    s.finish();
    assert_eq!(s.m.state(), RolloutState::Succeeded);
    for h in ["h02", "h03"] {
        let seqs = s.seqs_of(h);
        assert!(seqs.windows(2).all(|w| w[0].1 <= w[1].1), "{h}: {seqs:?}");
        assert_eq!(seqs.last().unwrap().0, "confirm", "{h}");
    }
}

/// The stage order ids a step asked sequences for.
fn stages_allocated(cmds: &[Command]) -> Vec<String> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::AllocateSeqs(r) => Some(r.iter().filter(|r| r.order_id.ends_with("-stage"))),
            _ => None,
        })
        .flatten()
        .map(|r| r.host.to_string())
        .collect()
}

#[test]
fn a_host_unreachable_at_stage_time_is_staged_once_it_is_back() {
    let spec = RolloutSpec::try_from(crate::control_service::raw_spec_from_wire(wire_spec(&[
        "1", "100%",
    ])))
    .unwrap();
    let p = plan::plan(&spec, &fleet(4));
    let mut m = Rollout::new("r-1", spec, release(), &p, EngineSettings::default(), T0);
    // h04 goes away at the start; once the canary swapped, h02 and h03 are staged, not h04.
    let cmds = m.step(T0, Input::HostDown(hid("h04")));
    assert!(
        stages_allocated(&cmds).is_empty(),
        "the canary downloads alone"
    );
    let canary = cmds
        .iter()
        .find_map(|c| match c {
            Command::AllocateSeqs(r) => r.first().map(|r| r.order_id.clone()),
            _ => None,
        })
        .unwrap();
    let cmds = m.step(T0, Input::SeqsAllocated(vec![(canary.clone(), 4)]));
    assert!(stages_allocated(&cmds).is_empty());
    let activated = OrderOutcome {
        order_id: canary,
        rollout_id: "r-1".into(),
        seq: 4,
        service: ServiceName::new("web").unwrap(),
        release: None,
        phase: OrderPhase::Activated,
        code: ResultCode::Ok,
        message: String::new(),
        current_release: Some(ReleaseId::new("web-2").unwrap()),
        last_seq: 4,
    };
    let cmds = m.step(
        T0 + 5,
        Input::OrderResult {
            host: hid("h01"),
            outcome: activated,
        },
    );
    assert_eq!(stages_allocated(&cmds), vec!["h02", "h03"]);
    assert!(m.host(&hid("h04")).unwrap().order.is_none());
    // Back: it is staged now.
    let cmds = m.step(T0 + 10, Input::HostUp(host("h04", "eu-1", "web-1")));
    assert_eq!(stages_allocated(&cmds), vec!["h04"]);
}
