//! The swap modes and the agent-check responder through a real `serin-agent` configured with
//! `[service.swap]` and `[service.traffic]`: an activation under load refuses nothing, and
//! HAProxy's agent-check port answers.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serin_proto::wire::OrderPhase;
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::{AgentOptions, free_port};
use serin_tests::demo_release::DemoRelease;
use serin_tests::load::LoadGen;
use serin_tests::orders::Deadlines;

fn activation_under_load(name: &str, swap_toml: &str) {
    let agent_check = free_port();
    let mut opts = AgentOptions::new(name);
    opts.checks_toml = format!(
        "{}\n[service.swap]\n{swap_toml}\n\n[service.traffic]\nagent_check = \"127.0.0.1:{agent_check}\"\ndrain_timeout = \"300ms\"\n",
        opts.checks_toml
    );
    let fx = AgentFixture::start_with(opts);
    let v1 = DemoRelease::healthy("traffic-1.0");
    let v2 = DemoRelease::healthy("traffic-2.0");
    fx.install_first(1, &v1);
    let first_pid = fx.agent.service_pid().unwrap();

    let load = LoadGen::new(
        SocketAddr::from(([127, 0, 0, 1], fx.agent.port)),
        "/version",
        8,
    )
    .start();
    fx.activate(2, &v2, Deadlines::quick().confirm_within(30_000));
    let healthy = fx.wait_phase(2, OrderPhase::Healthy);
    assert_eq!(healthy.release, "traffic-2.0");
    fx.wait_serving("traffic-2.0");
    let tally = load.stop();
    eprintln!("{name}: one activation under load: {}", tally.summary());
    assert_eq!(tally.failed(), 0, "{}\n{}", tally.summary(), fx.dump());
    assert!(
        tally.ok_by_body.contains_key("traffic-1.0")
            && tally.ok_by_body.contains_key("traffic-2.0"),
        "{}",
        tally.summary()
    );
    assert_ne!(
        fx.agent.service_pid().unwrap(),
        first_pid,
        "the process was not swapped"
    );

    let mut answer = String::new();
    let mut s = TcpStream::connect(("127.0.0.1", agent_check)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "up ready 100%\n");
}

#[test]
fn an_agent_in_socket_mode_activates_under_load_without_a_failed_request() {
    let port_placeholder = "listen = \"127.0.0.1:{port}\"";
    activation_under_load(
        "traffic-socket",
        &format!("mode = \"socket\"\n{port_placeholder}"),
    );
}

#[test]
fn an_agent_in_reload_mode_activates_under_load_without_a_failed_request() {
    activation_under_load(
        "traffic-reload",
        "mode = \"reload\"\nready_timeout = \"10s\"",
    );
}

/// The `ini` block of README.md that starts with `# {name}`.
fn readme_unit(name: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("reading README.md");
    let start = format!("```ini\n# {name}\n");
    let at = readme.find(&start).unwrap_or_else(|| {
        panic!("README.md documents no {name} unit (```ini block starting `# {name}`)")
    });
    let body = &readme[at + start.len()..];
    body[..body.find("```").expect("the unit's block ends")].to_owned()
}

/// `serin-agent check-config` of a systemd service with `swap.mode = "socket"`, with
/// `SYSTEMD_UNIT_PATH` set to `units`: whether it passed, and what it said.
fn check_socket_config(units: &std::path::Path) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "coordinator = \"http://127.0.0.1:7700\"\ntls = { insecure_plaintext = true }\n\n\
         [[service]]\nname = \"web\"\nbinary = \"web\"\n\n\
         [service.run]\nkind = \"systemd\"\nunit = \"web.service\"\n\n\
         [service.swap]\nmode = \"socket\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(serin_tests::binaries::agent())
        .args(["check-config", "--config"])
        .arg(&config)
        .env("SYSTEMD_UNIT_PATH", units)
        .output()
        .expect("running serin-agent check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn socket_swap_of_a_systemd_unit_is_refused_at_load_without_its_socket_unit_and_takes_the_documented_one()
 {
    let units = tempfile::tempdir().unwrap();
    let (ok, text) = check_socket_config(units.path());
    assert!(!ok, "accepted without a socket unit:\n{text}");
    assert!(
        text.contains("service[0].swap.mode: the socket unit web.socket was not found")
            && text.contains(&units.path().display().to_string()),
        "{text}"
    );
    // The socket unit README documents passes as written.
    let documented = readme_unit("web.socket");
    assert!(documented.contains("Accept=no"), "{documented}");
    std::fs::write(units.path().join("web.socket"), &documented).unwrap();
    let (ok, text) = check_socket_config(units.path());
    assert!(
        ok,
        "the documented socket unit is refused:\n{text}\n{documented}"
    );
    // One systemd would start a service instance per connection for is refused.
    std::fs::write(
        units.path().join("web.socket"),
        documented.replace("Accept=no", "Accept=yes"),
    )
    .unwrap();
    let (ok, text) = check_socket_config(units.path());
    assert!(
        !ok && text.contains("has Accept=yes") && text.contains("needs Accept=no"),
        "{text}"
    );
}
