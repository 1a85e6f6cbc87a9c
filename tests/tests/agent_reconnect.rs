//! The coordinator goes away and comes back: the service never stops, the agent reconnects.

use std::time::{Duration, Instant};

use serin_proto::wire::{OrderPhase, ServiceState, agent_message};
use serin_tests::agent_fixture::AgentFixture;
use serin_tests::agent_proc::SERVICE;
use serin_tests::demo_release::DemoRelease;
use serin_tests::fake_coordinator::describe_hello;
use serin_tests::orders::Deadlines;
use serin_tests::wait;

#[test]
fn coordinator_gone_and_back_the_service_keeps_serving_and_the_agent_reconnects() {
    let fx = AgentFixture::start("coordinator-gone");
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let pid = fx.agent.service_pid().expect("service pid");
    let serving_same = || match (fx.agent.version(), fx.agent.service_pid()) {
        (Ok(v), Ok(p)) if v == "demo-1.0" && p == pid => Ok(()),
        other => Err(format!(
            "version and pid now {other:?}, before demo-1.0 and {pid}"
        )),
    };

    fx.coord.stop();
    wait::hold_for(
        "the service serving demo-1.0 from the same process while the coordinator is gone",
        Duration::from_secs(3),
        &|| fx.dump(),
        serving_same,
    );
    assert!(
        fx.agent.is_running(),
        "the agent exited without its coordinator\n{}",
        fx.dump()
    );

    fx.coord.restart();
    let start = Instant::now();
    let hello = wait::wait_for_value(
        "the agent to attach again (keeping the service up meanwhile)",
        Duration::from_secs(20),
        &|| fx.dump(),
        || {
            if let Err(e) = serving_same() {
                panic!(
                    "service disturbed {:?} after the coordinator came back: {e}\n{}",
                    start.elapsed(),
                    fx.dump()
                );
            }
            (fx.coord.connections(fx.host()) >= 2 && fx.coord.is_connected(fx.host()))
                .then(|| fx.coord.hellos(fx.host()).pop())
                .flatten()
        },
    );

    // The new hello carries a correct inventory.
    let inv = hello
        .services
        .iter()
        .find(|s| s.service == SERVICE)
        .unwrap_or_else(|| panic!("no inventory for {SERVICE}: {}", describe_hello(&hello)));
    assert_eq!(
        inv.current_release,
        "demo-1.0",
        "{}",
        describe_hello(&hello)
    );
    assert!(
        inv.kept_releases.contains(&"demo-1.0".to_owned()),
        "{}",
        describe_hello(&hello)
    );
    assert_eq!(
        inv.state(),
        ServiceState::Running,
        "{}",
        describe_hello(&hello)
    );
    assert_eq!(inv.last_seq, 1, "{}", describe_hello(&hello));
    assert_eq!(hello.host_id, fx.host());
    assert_eq!(fx.agent.service_pid().ok(), Some(pid));

    // Heartbeats flow on the new connection, and it takes orders.
    wait::wait_for(
        "a heartbeat on the new connection",
        Duration::from_secs(10),
        &|| fx.dump(),
        || {
            fx.coord
                .messages(fx.host())
                .iter()
                .any(|m| m.connection >= 2 && matches!(m.body, agent_message::Body::Heartbeat(_)))
        },
    );
    fx.activate(2, &DemoRelease::healthy("demo-2.0"), Deadlines::quick());
    fx.wait_phase(2, OrderPhase::Healthy);
    fx.wait_serving("demo-2.0");
}

#[test]
fn first_hello_reports_an_empty_service_and_the_host_identity() {
    let fx = AgentFixture::start("first-hello");
    let hello = fx.coord.hellos(fx.host()).pop().expect("a hello");
    assert_eq!(hello.hostname, fx.host(), "{}", describe_hello(&hello));
    assert!(
        !hello.agent_version.is_empty(),
        "{}",
        describe_hello(&hello)
    );
    let inv = hello
        .services
        .iter()
        .find(|s| s.service == SERVICE)
        .unwrap_or_else(|| panic!("no inventory for {SERVICE}: {}", describe_hello(&hello)));
    assert_eq!(
        inv.state(),
        ServiceState::Empty,
        "{}",
        describe_hello(&hello)
    );
    assert!(inv.current_release.is_empty(), "{}", describe_hello(&hello));
    assert_eq!(inv.last_seq, 0, "{}", describe_hello(&hello));
}

/// A TCP proxy on 127.0.0.1 to `target`. [`StallProxy::stall`] freezes every connection open
/// at that moment: nothing is forwarded any more either way, but nothing is closed (a frozen
/// coordinator, or a network that drops packets). Later connections are forwarded normally.
struct StallProxy {
    addr: std::net::SocketAddr,
    epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl StallProxy {
    fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let epoch = Arc::new(AtomicU64::new(0));
        let e = epoch.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(down) = conn else { continue };
                let Ok(up) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let born = e.load(Ordering::SeqCst);
                for (mut from, mut to) in [
                    (
                        down.try_clone().expect("clone"),
                        up.try_clone().expect("clone"),
                    ),
                    (up, down),
                ] {
                    let e = e.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let Ok(n) = from.read(&mut buf) else { return };
                            if n == 0 {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                return;
                            }
                            if e.load(Ordering::SeqCst) != born {
                                // Stalled: hold both sockets open for ever, forward nothing.
                                let _keep = (from, to);
                                loop {
                                    std::thread::park();
                                }
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self { addr, epoch }
    }

    fn stall(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_stalled_coordinator_stream_is_abandoned_and_the_agent_reconnects() {
    let coord = serin_tests::fake_coordinator::FakeCoordinator::start();
    let proxy = StallProxy::start(coord.addr());
    let agent = serin_tests::agent_proc::AgentProc::start(
        &format!("http://{}", proxy.addr),
        &serin_tests::agent_proc::AgentOptions::new("stalled-stream"),
    );
    let fx = AgentFixture { agent, coord };
    fx.wait_attached(1);
    fx.install_first(1, &DemoRelease::healthy("demo-1.0"));
    let pid = fx.agent.service_pid().expect("service pid");

    // The stream stalls without closing: the agent's HTTP/2 keepalive (20 s interval, 10 s
    // timeout) must notice and dial again, and the service never stops meanwhile.
    proxy.stall();
    let stalled_at = Instant::now();
    wait::wait_for(
        "the agent to attach again after its stream stalled",
        Duration::from_secs(45),
        &|| fx.dump(),
        || {
            assert_eq!(
                fx.agent.service_pid().ok(),
                Some(pid),
                "the service was disturbed while the stream stalled\n{}",
                fx.dump()
            );
            fx.coord.connections(fx.host()) >= 2 && fx.coord.is_connected(fx.host())
        },
    );
    eprintln!(
        "agent reattached {:?} after its stream stalled",
        stalled_at.elapsed()
    );
    // The new stream works: an order goes through it.
    fx.send(serin_tests::orders::confirm(2, SERVICE, "demo-1.0"));
    assert_eq!(fx.wait_outcome(2).phase(), OrderPhase::Confirmed);
}
