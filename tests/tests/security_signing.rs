//! Signed releases enforced by the real `serin-agent` (issue 7), driven by the fake coordinator,
//! which plays a coordinator that holds no signing key.
//!
//! The agent pins one release-signing key for the demo service. Every refused order must come back
//! FAILED with its own result code, leave nothing in `releases/` or `staging/`, fetch nothing, and
//! leave the current release serving from the very same process (HTTP `/version` and its pid).

use std::time::{Duration, SystemTime};

use serin_proto::wire::{self, OrderPhase, OrderResult, ResultCode};
use serin_proto::{ReleaseId, ServiceName, Sha256};
use serin_security::manifest::{self, ManifestBody, SecretKey};
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::{AgentOptions, AgentProc, SERVICE};
use serin_tests::demo_release::DemoRelease;
use serin_tests::fake_coordinator::{FakeCoordinator, describe_result};
use serin_tests::orders::{self, Deadlines};
use serin_tests::wait;

/// A fake coordinator and an agent pinning `key` for the demo service.
fn start_pinned(name: &str, key: &SecretKey) -> AgentFixture {
    let coord = FakeCoordinator::start();
    let agent = AgentProc::configure(&coord.url(), &AgentOptions::new(name));
    let config = std::fs::read_to_string(agent.config_path()).expect("reading the agent config");
    let pinned = config.replacen(
        "stop_timeout = \"2s\"",
        &format!(
            "stop_timeout = \"2s\"\nsigning_keys = [\"{}\"]",
            key.public().to_line("test")
        ),
        1,
    );
    assert_ne!(pinned, config, "the agent config has no stop_timeout line");
    std::fs::write(agent.config_path(), pinned).expect("writing the agent config");
    agent.spawn(None);
    let fx = AgentFixture { agent, coord };
    fx.wait_attached(1);
    fx
}

/// The manifest body of `release` for `service` with `counter` and `floor`.
fn body(release: &DemoRelease, counter: u64, floor: Option<u64>) -> ManifestBody {
    ManifestBody {
        service: ServiceName::new(SERVICE).unwrap(),
        release: ReleaseId::new(&release.id).unwrap(),
        sha256: Sha256::from_hex("sha256", &release.sha256).unwrap(),
        size: release.size,
        counter,
        expires: None,
        floor,
    }
}

fn signed(body: &ManifestBody, key: &SecretKey) -> String {
    manifest::sign(body, key).expect("signing a test manifest")
}

/// `release` as the coordinator would send it, with `manifest` (empty: unsigned).
fn wire_with(release: &DemoRelease, manifest: &str) -> wire::Release {
    let mut w = release.wire(SERVICE, "");
    w.manifest = manifest.to_owned();
    w
}

/// Activates `release` (published) with order `seq` and waits for its outcome past ACTIVATED.
fn activate(fx: &AgentFixture, seq: u64, w: wire::Release) -> OrderResult {
    fx.send(orders::activate(seq, w, Deadlines::quick()));
    fx.wait_activation_end(seq)
}

/// The order was refused with `code`, nothing of `refused` is on disk or was fetched after
/// `fetches_before`, and `serving` still serves from process `pid`.
fn assert_refused(
    fx: &AgentFixture,
    r: &OrderResult,
    code: ResultCode,
    refused: &DemoRelease,
    serving: &str,
    pid: u32,
) {
    let ctx = || format!("{}\n{}", describe_result(r), fx.dump());
    assert_eq!(r.phase(), OrderPhase::Failed, "{}", ctx());
    assert_eq!(r.code(), code, "{}", ctx());
    assert!(
        !r.message.is_empty(),
        "a refusal without a message: {}",
        ctx()
    );
    assert_eq!(r.current_release, serving, "{}", ctx());
    assert!(
        fx.agent.staging_entries().is_empty(),
        "staging/ is not empty: {:?}\n{}",
        fx.agent.staging_entries(),
        ctx()
    );
    assert!(
        !fx.agent.releases().contains(&refused.id),
        "the refused release {} is in releases/\n{}",
        refused.id,
        ctx()
    );
    assert_eq!(
        fx.agent.current_release().as_deref(),
        Some(serving),
        "{}",
        ctx()
    );
    assert_eq!(
        fx.agent.version().ok().as_deref(),
        Some(serving),
        "{}",
        ctx()
    );
    assert_eq!(
        fx.agent.service_pid().ok(),
        Some(pid),
        "the serving process changed while a release was refused\n{}",
        ctx()
    );
}

fn fetched(fx: &AgentFixture, release: &DemoRelease) -> bool {
    fx.coord
        .fetches()
        .iter()
        .any(|f| f.sha256 == release.sha256)
}

#[test]
fn the_signature_matrix_refuses_each_case_with_its_own_code_and_changes_nothing() {
    let key = SecretKey::generate().unwrap();
    let stranger = SecretKey::generate().unwrap();
    let fx = start_pinned("signature-matrix", &key);

    let v1 = DemoRelease::healthy("demo-1.0");
    fx.publish(&v1);
    let r = activate(
        &fx,
        1,
        wire_with(&v1, &signed(&body(&v1, 5, Some(5)), &key)),
    );
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    fx.wait_serving("demo-1.0");
    let pid = fx.agent.service_pid().unwrap();

    let v2 = DemoRelease::healthy("demo-2.0");
    let v3 = DemoRelease::healthy("demo-3.0");
    fx.publish(&v2);
    let good = body(&v2, 6, Some(6));
    let past = manifest::whole_seconds(SystemTime::now() - Duration::from_secs(3600));

    let mut other_service = good.clone();
    other_service.service = ServiceName::new("other").unwrap();
    let mut other_release = good.clone();
    other_release.release = ReleaseId::new("demo-9.9").unwrap();
    let mut other_hash = good.clone();
    other_hash.sha256 = Sha256::from_hex("sha256", &v3.sha256).unwrap();
    let mut other_size = good.clone();
    other_size.size += 1;
    let mut expired = good.clone();
    expired.expires = Some(past);
    let below_floor = body(&v2, 4, None);
    let altered = signed(&good, &key).replacen("counter: 6", "counter: 7", 1);

    let cases: Vec<(&str, String, ResultCode)> = vec![
        ("unsigned", String::new(), ResultCode::Unsigned),
        (
            "not a manifest",
            "hello\n".into(),
            ResultCode::MalformedManifest,
        ),
        (
            "an unpinned key",
            signed(&good, &stranger),
            ResultCode::UnknownKey,
        ),
        ("an altered counter", altered, ResultCode::BadSignature),
        (
            "another service",
            signed(&other_service, &key),
            ResultCode::OtherService,
        ),
        (
            "another release",
            signed(&other_release, &key),
            ResultCode::OtherRelease,
        ),
        (
            "another hash",
            signed(&other_hash, &key),
            ResultCode::SignedHashMismatch,
        ),
        (
            "another size",
            signed(&other_size, &key),
            ResultCode::SignedSizeMismatch,
        ),
        ("expired", signed(&expired, &key), ResultCode::Expired),
        (
            "below the floor",
            signed(&below_floor, &key),
            ResultCode::BelowFloor,
        ),
    ];
    let mut seq = 10;
    for (what, manifest, code) in &cases {
        seq += 1;
        let r = activate(&fx, seq, wire_with(&v2, manifest));
        eprintln!("{what}: {}", describe_result(&r));
        assert_refused(&fx, &r, *code, &v2, "demo-1.0", pid);
        // Stage orders are checked the same way, before anything is downloaded.
        seq += 1;
        fx.send(orders::stage(seq, wire_with(&v2, manifest)));
        let r = fx.wait_outcome(seq);
        assert_refused(&fx, &r, *code, &v2, "demo-1.0", pid);
        assert!(
            !fetched(&fx, &v2),
            "{what}: the refused release was downloaded\n{}",
            fx.dump()
        );
    }

    // A valid manifest, with any single byte changed, never passes.
    let valid = signed(&good, &key);
    let mut positions: Vec<usize> = (0..valid.len()).step_by(valid.len() / 24).collect();
    positions.push(valid.len() - 2);
    for at in positions {
        let mut bytes = valid.clone().into_bytes();
        bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
        let mutated = String::from_utf8_lossy(&bytes).into_owned();
        seq += 1;
        let r = activate(&fx, seq, wire_with(&v2, &mutated));
        assert_eq!(
            r.phase(),
            OrderPhase::Failed,
            "byte {at} changed: {}",
            describe_result(&r)
        );
        assert!(
            matches!(
                r.code(),
                ResultCode::MalformedManifest | ResultCode::UnknownKey | ResultCode::BadSignature
            ),
            "byte {at} changed: {}",
            describe_result(&r)
        );
        assert_refused(&fx, &r, r.code(), &v2, "demo-1.0", pid);
    }

    // The artifact's bytes changed (the coordinator declares the tampered hash and size with the
    // valid manifest): refused before the download.
    let mut tampered_bytes = v2.bytes.clone();
    tampered_bytes.push(b'\n');
    let tampered = DemoRelease::from_bytes(v2.behaviour.clone(), tampered_bytes);
    fx.publish(&tampered);
    seq += 1;
    let r = activate(&fx, seq, wire_with(&tampered, &valid));
    assert_refused(
        &fx,
        &r,
        ResultCode::SignedHashMismatch,
        &tampered,
        "demo-1.0",
        pid,
    );
    assert!(!fetched(&fx, &tampered), "{}", fx.dump());

    // The same release, correctly signed, goes through: the matrix refused for the reasons given.
    seq += 1;
    let r = activate(&fx, seq, wire_with(&v2, &valid));
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    fx.wait_serving("demo-2.0");
    let state = fx.agent.state_json().unwrap();
    assert_eq!(
        state["floor"], 6,
        "the floor of demo-2.0's manifest is persisted: {state}"
    );
}

#[test]
fn the_floor_survives_a_restart_and_bars_rollback_targets_below_it() {
    let key = SecretKey::generate().unwrap();
    let fx = start_pinned("signing-floor", &key);
    let v1 = DemoRelease::healthy("demo-1.0");
    let v2 = DemoRelease::healthy("demo-2.0");
    fx.publish(&v1);
    fx.publish(&v2);
    let r = activate(&fx, 1, wire_with(&v1, &signed(&body(&v1, 1, None), &key)));
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    // demo-2.0 raises the floor to its own counter: demo-1.0 must never come back.
    let r = activate(
        &fx,
        2,
        wire_with(&v2, &signed(&body(&v2, 2, Some(2)), &key)),
    );
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    fx.wait_serving("demo-2.0");
    assert!(fx.agent.releases().contains(&v1.id), "{}", fx.dump());

    fx.agent.kill();
    fx.agent.spawn(None);
    fx.wait_attached(2);
    fx.wait_serving("demo-2.0");
    let pid = fx.agent.service_pid().unwrap();
    assert_eq!(fx.agent.state_json().unwrap()["floor"], 2, "{}", fx.dump());

    fx.send(orders::rollback(3, SERVICE, "demo-1.0"));
    let r = fx.wait_outcome(3);
    let ctx = || format!("{}\n{}", describe_result(&r), fx.dump());
    assert_eq!(r.phase(), OrderPhase::Failed, "{}", ctx());
    assert_eq!(r.code(), ResultCode::BelowFloor, "{}", ctx());
    assert_eq!(
        fx.agent.current_release().as_deref(),
        Some("demo-2.0"),
        "{}",
        ctx()
    );
    assert_eq!(fx.agent.service_pid().ok(), Some(pid), "{}", ctx());
    // The rollback without a target (to the previous release, demo-1.0) is refused the same way.
    fx.send(orders::rollback(4, SERVICE, ""));
    let r = fx.wait_outcome(4);
    assert_eq!(
        r.code(),
        ResultCode::BelowFloor,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    assert_eq!(
        fx.agent.version().ok().as_deref(),
        Some("demo-2.0"),
        "{}",
        fx.dump()
    );
}

#[test]
fn a_manifest_that_expires_between_staging_and_activation_is_refused_at_the_swap() {
    let key = SecretKey::generate().unwrap();
    let fx = start_pinned("signing-expiry-at-swap", &key);
    let v1 = DemoRelease::healthy("demo-1.0");
    let v2 = DemoRelease::healthy("demo-2.0");
    fx.publish(&v1);
    fx.publish(&v2);
    let r = activate(&fx, 1, wire_with(&v1, &signed(&body(&v1, 1, None), &key)));
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    let pid = fx.agent.service_pid().unwrap();

    let expires = manifest::whole_seconds(SystemTime::now() + Duration::from_secs(2));
    let mut b = body(&v2, 2, None);
    b.expires = Some(expires);
    let m = signed(&b, &key);
    fx.send(orders::stage(2, wire_with(&v2, &m)));
    let r = fx.wait_outcome(2);
    assert_eq!(
        r.phase(),
        OrderPhase::Staged,
        "{}\n{}",
        describe_result(&r),
        fx.dump()
    );
    wait::wait_for(
        "the manifest's expiry to pass",
        Duration::from_secs(5),
        &|| fx.dump(),
        || SystemTime::now() > expires,
    );
    let r = activate(&fx, 3, wire_with(&v2, &m));
    let ctx = || format!("{}\n{}", describe_result(&r), fx.dump());
    assert_eq!(r.phase(), OrderPhase::Failed, "{}", ctx());
    assert_eq!(r.code(), ResultCode::Expired, "{}", ctx());
    assert_eq!(
        fx.agent.current_release().as_deref(),
        Some("demo-1.0"),
        "{}",
        ctx()
    );
    assert_eq!(fx.agent.service_pid().ok(), Some(pid), "{}", ctx());
    assert_eq!(
        fx.agent.version().ok().as_deref(),
        Some("demo-1.0"),
        "{}",
        ctx()
    );
}

#[test]
fn an_order_of_an_older_coordinator_epoch_is_refused_as_a_replay_and_survives_a_restart() {
    let key = SecretKey::generate().unwrap();
    let fx = start_pinned("signing-epochs", &key);
    let v1 = DemoRelease::healthy("demo-1.0");
    let v2 = DemoRelease::healthy("demo-2.0");
    fx.publish(&v1);
    fx.publish(&v2);
    let mut first = orders::activate(
        1,
        wire_with(&v1, &signed(&body(&v1, 1, None), &key)),
        Deadlines::quick(),
    );
    first.epoch = 7;
    fx.send(first);
    fx.wait_phase(1, OrderPhase::Healthy);
    fx.wait_serving("demo-1.0");
    let pid = fx.agent.service_pid().unwrap();

    fx.agent.kill();
    fx.agent.spawn(None);
    fx.wait_attached(2);
    let hello = fx.coord.hellos(fx.host()).pop().unwrap();
    assert_eq!(hello.services[0].last_epoch, 7, "{}", fx.dump());

    // A validly signed release, in an order with a higher sequence but an older epoch.
    let mut replay = orders::activate(
        2,
        wire_with(&v2, &signed(&body(&v2, 2, None), &key)),
        Deadlines::quick(),
    );
    replay.epoch = 6;
    fx.send(replay);
    let r = fx.wait_outcome(2);
    let ctx = || format!("{}\n{}", describe_result(&r), fx.dump());
    assert_eq!(r.phase(), OrderPhase::Rejected, "{}", ctx());
    assert_eq!(r.code(), ResultCode::ReplayedOrder, "{}", ctx());
    assert_eq!(r.last_epoch, 7, "{}", ctx());
    assert!(!fetched(&fx, &v2), "{}", ctx());
    assert_eq!(
        fx.agent.current_release().as_deref(),
        Some("demo-1.0"),
        "{}",
        ctx()
    );
    assert_eq!(fx.agent.service_pid().ok(), Some(pid), "{}", ctx());
    assert_eq!(fx.agent.state_json().unwrap()["last_seq"], 1, "{}", ctx());
}

// ---------------------------------------------------------------------------------------------
// The compromised-coordinator drill: a real `serin serve` with its database, but no signing key.

mod drill {
    use super::*;
    use serin_coordinator::store::{RedbStore, Store};
    use serin_tests::fleet::{Fleet, Timings};

    fn timings() -> Timings {
        Timings {
            bake: "100ms",
            canary_bake: None,
            min_healthy: "300ms",
            healthy_deadline: "10s",
            progress_deadline: "30s",
        }
    }

    /// Pushes `release` with the CLI, with `manifest` (written to a file) when given.
    fn push(f: &Fleet, release: &DemoRelease, manifest: Option<&str>) {
        let file = f.scratch().join(format!("{}.bin", release.id));
        std::fs::write(&file, &release.bytes).unwrap();
        let mut args = vec![
            "artifact".to_owned(),
            "push".to_owned(),
            file.display().to_string(),
            "--service".to_owned(),
            SERVICE.to_owned(),
            "--release".to_owned(),
            release.id.clone(),
        ];
        if let Some(m) = manifest {
            let path = f.scratch().join(format!("{}.manifest", release.id));
            std::fs::write(&path, m).unwrap();
            args.push("--manifest".to_owned());
            args.push(path.display().to_string());
        }
        let v = f.cli_json(&args);
        assert_eq!(
            v["release"]["sha256"].as_str(),
            Some(release.sha256.as_str()),
            "{v}"
        );
    }

    /// Rolls `release` out in a canary of one then everything; returns the finished status and
    /// the rollout's `serin rollout status -o json` text.
    fn roll_out(f: &Fleet, release: &str) -> (wire::RolloutStatus, String) {
        let id = f.start_rollout(release, &["--waves", "1,100%"], &timings());
        let s = f.wait_finished(&id, Duration::from_secs(60));
        let json = f.cli_json(&["rollout", "status", &id]).to_string();
        (s, json)
    }

    #[test]
    fn a_coordinator_without_the_signing_key_cannot_change_what_any_host_runs() {
        let key = SecretKey::generate().unwrap();
        let thief = SecretKey::generate().unwrap();
        let f = Fleet::start_bare("compromised-coordinator", &["a", "b", "c"]);
        for (i, h) in f.hosts.iter().enumerate() {
            h.kill();
            f.wait_host_connected(i, false);
            let config = std::fs::read_to_string(h.agent.config_path()).unwrap();
            let pinned = config.replacen(
                "stop_timeout = \"2s\"",
                &format!(
                    "stop_timeout = \"2s\"\nsigning_keys = [\"{}\"]",
                    key.public().to_line("release")
                ),
                1,
            );
            assert_ne!(pinned, config);
            std::fs::write(h.agent.config_path(), pinned).unwrap();
            h.revive();
            f.wait_host_connected(i, true);
        }

        // The release owners sign v1 and v2 offline; v2 raises the floor to its counter.
        let v1 = DemoRelease::healthy("v1");
        let v2 = DemoRelease::healthy("v2");
        push(&f, &v1, Some(&signed(&body(&v1, 1, None), &key)));
        push(&f, &v2, Some(&signed(&body(&v2, 2, Some(2)), &key)));
        for release in ["v1", "v2"] {
            let (s, _) = roll_out(&f, release);
            assert_eq!(
                s.state().as_str(),
                "succeeded",
                "{release}: {}\n{}",
                s.reason,
                f.dump()
            );
            for i in 0..f.hosts.len() {
                f.wait_serving(i, release);
            }
        }

        // What the coordinator can do on its own.
        let unsigned = DemoRelease::healthy("v3-unsigned");
        push(&f, &unsigned, None);
        let other_key = DemoRelease::healthy("v3-other-key");
        push(
            &f,
            &other_key,
            Some(&signed(&body(&other_key, 3, None), &thief)),
        );
        // With its database: a manifest the owners signed for another service, attached to a
        // release of this one (the push checks would refuse it, so it goes into the store).
        let other_service = DemoRelease::healthy("v3-other-service");
        push(&f, &other_service, None);
        f.coord.kill();
        {
            let store = RedbStore::open(f.coord.state_dir().join("store.redb")).unwrap();
            let service = ServiceName::new(SERVICE).unwrap();
            let id = ReleaseId::new("v3-other-service").unwrap();
            let mut rec = store.release(&service, &id).unwrap().unwrap();
            let mut b = body(&other_service, 3, None);
            b.service = ServiceName::new("other").unwrap();
            rec.manifest = signed(&b, &key);
            store.put_release(&rec).unwrap();
        }
        f.coord.spawn();
        f.wait_connected(f.hosts.len());

        let attacks = [
            ("v3-unsigned", "unsigned"),
            ("v3-other-key", "unknown_key"),
            ("v3-other-service", "other_service"),
            // The old, validly signed v1 again: below the floor v2 set.
            ("v1", "below_floor"),
        ];
        for (release, code) in attacks {
            let (s, json) = roll_out(&f, release);
            assert_ne!(s.state().as_str(), "succeeded", "{release}\n{}", f.dump());
            assert!(
                json.contains(code),
                "the refusal ({code}) of {release} is not in the rollout's status:\n{json}"
            );
            for i in 0..f.hosts.len() {
                f.wait_serving(i, "v2");
            }
        }
        let history = f.history();
        for i in 0..f.hosts.len() {
            for (release, _) in attacks {
                if release != "v1" {
                    assert!(
                        !history.ever_had(i, release)
                            && !f.hosts[i].agent.releases().contains(&release.to_owned()),
                        "host #{i} had {release} on disk or current\n{}",
                        f.dump()
                    );
                }
            }
            assert!(
                history.versions_seen[i]
                    .iter()
                    .all(|v| v == "v1" || v == "v2"),
                "host #{i} served {:?}\n{}",
                history.versions_seen[i],
                f.dump()
            );
            assert_eq!(
                history.activations(i, "v1"),
                1,
                "host #{i} went back to v1\n{}",
                f.dump()
            );
            assert_eq!(f.hosts[i].agent.current_release().as_deref(), Some("v2"));
        }
    }
}
