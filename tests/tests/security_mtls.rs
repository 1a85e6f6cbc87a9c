//! Mutual TLS end to end, against the real `serin serve`, `serin-agent` and `serin` binaries:
//! the negative matrix of issue 7 (each refusal with a clear reason and no state change), the
//! identity attacks of the issue (which all succeeded against the plaintext coordinator), and
//! the role matrix of the control API.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, SystemTime};

use serin_proto::wire;
use serin_proto::wire::agent_service_client::AgentServiceClient;
use serin_proto::wire::control_service_client::ControlServiceClient;
use serin_security::pki::{Subject, Validity};
use serin_security::tls::{TlsFiles, TlsMaterial};
use serin_security::transport::{self, ClientTransport};
use serin_security::{OperatorName, PeerIdentity, Role};
use serin_tests::agent_proc::{AgentOptions, AgentProc};
use serin_tests::fleet::{CoordinatorProc, Fleet, operator_env};
use serin_tests::tls::{TestPki, pki};
use serin_tests::{binaries, wait};

const TIMEOUT: Duration = Duration::from_secs(20);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The text of an error and its whole source chain (where TLS names its refusal).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// `ListHosts` over `transport`; the error text (connect or call) on failure.
fn list_hosts_with(url: &str, transport: &ClientTransport) -> Result<Vec<wire::HostInfo>, String> {
    rt().block_on(async {
        let ch = transport::connect(url, transport, Duration::from_secs(2))
            .await
            .map_err(|e| chain(&e))?;
        ControlServiceClient::new(ch)
            .list_hosts(wire::ListHostsRequest::default())
            .await
            .map(|r| r.into_inner().hosts)
            .map_err(|s| format!("{:?}: {}", s.code(), chain(&s)))
    })
}

fn expect_refused(coord: &CoordinatorProc, transport: &ClientTransport, needle: &str) -> String {
    let e = list_hosts_with(&coord.url(), transport).expect_err("the call must be refused");
    assert!(
        e.contains(needle),
        "refusal {e:?} does not say {needle:?}\n{}",
        coord.dump()
    );
    e
}

/// Waits until the coordinator's log holds `needle` (a refusal logged with its reason).
fn wait_logged(coord: &CoordinatorProc, needle: &str) {
    wait::wait_for(
        &format!("the coordinator to log {needle:?}"),
        TIMEOUT,
        &|| coord.dump(),
        || coord.log().contains(needle),
    );
}

fn own_operator(role: Role) -> ClientTransport {
    TestPki::client_transport(&pki().operator(&format!("op-{role}"), role))
}

fn operator_subject(name: &str, role: Role) -> Subject {
    Subject::Client(PeerIdentity::Operator {
        name: OperatorName::new(name).unwrap(),
        role,
    })
}

#[test]
fn certificates_the_coordinator_must_not_accept_are_refused_in_the_handshake() {
    let coord = CoordinatorProc::start();
    let before =
        list_hosts_with(&coord.url(), &own_operator(Role::Viewer)).expect("a viewer lists");

    // No client certificate.
    let ca = TlsMaterial::load(&pki().harness_operator()).unwrap().ca;
    let anonymous = ClientTransport::Tls {
        config: serin_security::tls::anonymous_client_config(&ca).unwrap(),
        server_name: None,
    };
    let e = expect_refused(&coord, &anonymous, "CertificateRequired");
    assert_eq!(
        transport::explain_failure(&e),
        Some("the coordinator requires a client certificate and none was presented")
    );

    // An operator certificate from another CA (that trusts our coordinator's CA).
    let other = pki().other_ca("mtls-matrix");
    let mut foreign = other.operator("mallory", Role::Admin);
    foreign.ca = pki().ca();
    expect_refused(&coord, &TestPki::client_transport(&foreign), "UnknownCA");

    // Expired, and not yet valid.
    let now = SystemTime::now();
    let expired = pki().issue(
        "operator-expired",
        &operator_subject("expired", Role::Admin),
        Validity {
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        },
    );
    expect_refused(
        &coord,
        &TestPki::client_transport(&expired),
        "CertificateExpired",
    );
    let early = pki().issue(
        "operator-early",
        &operator_subject("early", Role::Admin),
        Validity {
            not_before: now + Duration::from_secs(3600),
            not_after: now + Duration::from_secs(7200),
        },
    );
    expect_refused(
        &coord,
        &TestPki::client_transport(&early),
        "CertificateExpired",
    );

    // Each refusal is in the coordinator's log with its reason, and nothing changed.
    wait_logged(&coord, "connection refused");
    wait_logged(&coord, "tls handshake failed");
    let after = list_hosts_with(&coord.url(), &own_operator(Role::Viewer)).unwrap();
    assert_eq!(before, after);
}

#[test]
fn plaintext_against_the_tls_port_is_refused_with_a_reason() {
    let coord = CoordinatorProc::start();
    // A plaintext gRPC client (what `serin` was before TLS).
    let url = coord.url().replacen("https://", "http://", 1);
    let e = list_hosts_with(&url, &ClientTransport::Plaintext).expect_err("refused");
    assert!(!e.is_empty());
    wait_logged(&coord, "not a TLS client");

    // The CLI given http:// and no credentials tries plaintext, warns, and gets nothing.
    let out = std::process::Command::new(binaries::serin())
        .args(["--coordinator", &url, "hosts"])
        .env_remove("SERIN_CA")
        .env_remove("SERIN_CERT")
        .env_remove("SERIN_KEY")
        .env("XDG_CONFIG_HOME", "/nonexistent-serin-test")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("plaintext"), "{stderr}");

    // A real agent configured for plaintext never attaches.
    let agent = AgentProc::start(&url, &AgentOptions::new("plaintext-agent"));
    wait::wait_for(
        "the plaintext agent's refusals in the coordinator's log",
        TIMEOUT,
        &|| format!("{}{}", coord.dump(), agent.dump()),
        || coord.log().matches("not a TLS client").count() >= 3,
    );
    let hosts = list_hosts_with(&coord.url(), &own_operator(Role::Viewer)).unwrap();
    assert!(
        hosts.iter().all(|h| h.host_id != agent.host_id),
        "{hosts:?}"
    );
}

#[test]
fn the_cli_needs_an_operator_certificate_and_says_when_it_is_refused() {
    let coord = CoordinatorProc::start();
    let run = |env: Vec<(String, String)>| {
        let out = std::process::Command::new(binaries::serin())
            .args(["--coordinator", &coord.url(), "hosts"])
            .env_remove("SERIN_CA")
            .env_remove("SERIN_CERT")
            .env_remove("SERIN_KEY")
            .env("XDG_CONFIG_HOME", "/nonexistent-serin-test")
            .envs(env)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // No credentials at all: listing hosts is impossible (the first attack of issue 7).
    let (code, err) = run(Vec::new());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no operator certificate"), "{err}");
    // An agent's certificate: refused by the CLI itself (wrong kind).
    let (code, err) = run(operator_env(&pki().agent("cli-agent-cert")));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("expected an operator identity"), "{err}");
    // An expired operator certificate: the coordinator refuses it, and the CLI says so.
    let now = SystemTime::now();
    let expired = pki().issue(
        "operator-cli-expired",
        &operator_subject("cli-expired", Role::Admin),
        Validity {
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        },
    );
    let (code, err) = run(operator_env(&expired));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the coordinator refused this certificate"),
        "{err}"
    );
    // A viewer can list, not push.
    let viewer = pki().operator("cli-viewer", Role::Viewer);
    let (code, err) = run(operator_env(&viewer));
    assert_eq!(code, Some(0), "{err}");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), b"#!/bin/sh\necho pwned\n").unwrap();
    let out = std::process::Command::new(binaries::serin())
        .args(["--coordinator", &coord.url(), "artifact", "push"])
        .arg(file.path())
        .args(["--service", "demo", "--release", "evil-1"])
        .envs(operator_env(&viewer))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("needs the deployer role") && err.contains("viewer"),
        "{err}"
    );
    let releases = rt().block_on(async {
        viewer_control(&coord.url())
            .await
            .list_releases(wire::ListReleasesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .releases
    });
    assert!(releases.is_empty(), "{releases:?}");
}

/// Opens an `Attach` stream with `files` and sends `hello`; the first answer or the error.
fn attach(
    url: &str,
    files: &TlsFiles,
    hello: wire::Hello,
) -> Result<wire::CoordinatorMessage, tonic::Status> {
    rt().block_on(async {
        let ch = transport::connect(
            url,
            &TestPki::client_transport(files),
            Duration::from_secs(2),
        )
        .await
        .map_err(|e| tonic::Status::unavailable(chain(&e)))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(wire::AgentMessage {
            body: Some(wire::agent_message::Body::Hello(hello)),
        })
        .await
        .unwrap();
        let mut inbound = AgentServiceClient::new(ch)
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = inbound.message().await?;
        drop(tx);
        first.ok_or_else(|| tonic::Status::unknown("stream ended"))
    })
}

fn hello(host: &str) -> wire::Hello {
    wire::Hello {
        host_id: host.into(),
        hostname: host.into(),
        agent_version: "attacker".into(),
        labels: [("test".to_string(), "x".to_string())].into(),
        ..Default::default()
    }
}

#[test]
fn identities_are_held_to_their_api_and_their_host() {
    let f = Fleet::start_bare("mtls-identities", &["a", "b"]);
    let url = f.coord.url();
    let (a, b) = (f.hosts[0].id().to_owned(), f.hosts[1].id().to_owned());

    // An agent certificate on the operator API.
    let e = expect_refused(
        &f.coord,
        &TestPki::client_transport(&pki().agent(&a)),
        "PermissionDenied",
    );
    assert!(
        e.contains("operator API") && e.contains("an agent certificate"),
        "{e}"
    );

    // An operator certificate on the agent API.
    let e = attach(&url, &pki().harness_operator(), hello(&a)).expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains("agent API") && e.message().contains("an operator certificate"),
        "{e}"
    );

    // Host A's certificate claiming host B: refused, and B's own stream is not taken over
    // (the attack of issue 7: the real host was disconnected each time).
    let b_log_before = f.hosts[1]
        .agent
        .log()
        .matches("connected to coordinator")
        .count();
    let e = attach(&url, &pki().agent(&a), hello(&b)).expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message().contains(&format!(
            "claims host {b}, but this agent's certificate is for host {a}"
        )),
        "{e}"
    );
    // A made-up host id with matching labels (it became the canary before): refused too.
    let e = attach(&url, &pki().agent(&a), hello("ghost-canary")).expect_err("refused");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    let hosts = f.list_hosts().unwrap();
    let ids: Vec<&str> = hosts.iter().map(|h| h.host_id.as_str()).collect();
    assert!(!ids.contains(&"ghost-canary"), "{ids:?}");
    assert!(
        hosts.iter().filter(|h| h.connected).count() == 2,
        "both real hosts still connected: {hosts:?}"
    );
    assert_eq!(
        f.hosts[1]
            .agent
            .log()
            .matches("connection to coordinator lost")
            .count(),
        0,
        "host B lost its stream\n{}",
        f.hosts[1].agent.dump()
    );
    assert_eq!(
        f.hosts[1]
            .agent
            .log()
            .matches("connected to coordinator")
            .count(),
        b_log_before
    );
    // The plan of a rollout only has the real hosts.
    f.push(&serin_tests::fleet::healthy("demo-9"));
    let plan = f.plan(
        "demo-9",
        &["--waves", "1,100%"],
        &serin_tests::fleet::Timings::default(),
    );
    let planned = serin_tests::fleet::planned_waves(&plan["waves"]);
    let all: std::collections::BTreeSet<String> = planned.into_iter().flatten().collect();
    assert_eq!(all, [a, b].into_iter().collect(), "{plan}");
}

/// Forwards every connection on a new 127.0.0.1 port to `target`, byte for byte.
fn forwarder(target: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    addr
}

#[test]
fn an_agent_refuses_a_coordinator_whose_certificate_is_not_for_the_name_it_dials() {
    let coord = CoordinatorProc::start();
    let target: SocketAddr = coord.url().trim_start_matches("https://").parse().unwrap();
    // 127.0.0.1 is not a name in the coordinator's certificate (its own loopback address and
    // localhost are).
    let via = forwarder(target);
    let agent = AgentProc::start(&format!("https://{via}"), &AgentOptions::new("wrong-name"));
    wait::wait_for(
        "the agent to refuse the coordinator's name",
        TIMEOUT,
        &|| agent.dump(),
        || agent.log().contains("not valid for name"),
    );
    assert!(
        agent
            .log()
            .contains("the coordinator's certificate is not valid for the name dialled"),
        "{}",
        agent.dump()
    );
    let hosts = list_hosts_with(&coord.url(), &own_operator(Role::Viewer)).unwrap();
    assert!(hosts.is_empty(), "{hosts:?}");
}

/// Every control method with a harmless request over a new connection; `Err(status)` of the
/// call.
fn call(url: &str, transport: &ClientTransport, method: &str) -> Result<(), tonic::Status> {
    rt().block_on(async move {
        let ch = transport::connect(url, transport, Duration::from_secs(2))
            .await
            .map_err(|e| tonic::Status::unavailable(chain(&e)))?;
        let mut c = ControlServiceClient::new(ch);
        let r = wire::RolloutRef {
            rollout_id: "no-such-rollout".into(),
            ..Default::default()
        };
        let spec = wire::RolloutSpec {
            service: "demo".into(),
            release: "no-such-release".into(),
            ..Default::default()
        };
        match method {
            "ListHosts" => c
                .list_hosts(wire::ListHostsRequest::default())
                .await
                .map(drop),
            "PushArtifact" => c
                .push_artifact(futures::stream::iter(Vec::<wire::PushArtifactChunk>::new()))
                .await
                .map(drop),
            "RegisterRelease" => c.register_release(wire::Release::default()).await.map(drop),
            "ListReleases" => c
                .list_releases(wire::ListReleasesRequest::default())
                .await
                .map(drop),
            "PlanRollout" => c.plan_rollout(spec).await.map(drop),
            "StartRollout" => c.start_rollout(spec).await.map(drop),
            "GetRollout" => c.get_rollout(r).await.map(drop),
            "WatchRollout" => c.watch_rollout(r).await.map(drop),
            "ListRollouts" => c
                .list_rollouts(wire::ListRolloutsRequest::default())
                .await
                .map(drop),
            "ControlRollout" => c
                .control_rollout(wire::ControlRequest {
                    rollout_id: "no-such-rollout".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            "ExplainRollout" => c.explain_rollout(r).await.map(drop),
            "RevokeHost" => c
                .revoke_host(wire::RevokeHostRequest {
                    host_id: "role-matrix-host".into(),
                    reason: "role matrix".into(),
                })
                .await
                .map(drop),
            "ListAudit" => c
                .list_audit(wire::ListAuditRequest::default())
                .await
                .map(drop),
            other => panic!("no call for {other}"),
        }
    })
}

#[test]
fn every_control_call_under_every_role_follows_the_policy_table() {
    let coord = CoordinatorProc::start();
    let methods: Vec<&str> = include_str!("../../proto/proto/serin/v1/control.proto")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split('(').next())
        .map(str::trim)
        .collect();
    assert!(methods.len() >= 11, "{methods:?}");
    let mut table = String::new();
    for role in Role::ALL {
        let operator = own_operator(role);
        for m in &methods {
            let path = format!("/serin.v1.ControlService/{m}");
            let allowed = transport::authorize(
                &path,
                &PeerIdentity::Operator {
                    name: OperatorName::new("x").unwrap(),
                    role,
                },
            )
            .is_ok();
            let got = call(&coord.url(), &operator, m);
            let denied = matches!(&got, Err(s) if s.code() == tonic::Code::PermissionDenied);
            table.push_str(&format!(
                "{role:>8} {m:<16} policy {:<5} got {:?}\n",
                if allowed { "allow" } else { "deny" },
                got.as_ref().err().map(|s| s.code())
            ));
            assert_eq!(
                !denied, allowed,
                "{role} calling {m}: policy says {allowed}, got {got:?}\n{table}"
            );
            if let Err(s) = &got
                && s.code() == tonic::Code::PermissionDenied
            {
                assert!(s.message().contains("role"), "{s:?}");
            }
        }
    }
    eprintln!("{table}");

    // Every mutating call that passed the policy is in the audit log with its caller, and so is
    // every call the policy refused (with the reason); allowed reads are not.
    let entries = audit_entries(&coord.url());
    let mutating = [
        "PushArtifact",
        "RegisterRelease",
        "StartRollout",
        "ControlRollout",
        "RevokeHost",
    ];
    for role in Role::ALL {
        let who = format!("serin://operator/{role}/op-{role}");
        for m in &methods {
            let allowed = transport::authorize(
                &format!("/serin.v1.ControlService/{m}"),
                &PeerIdentity::Operator {
                    name: OperatorName::new("x").unwrap(),
                    role,
                },
            )
            .is_ok();
            let found: Vec<_> = entries
                .iter()
                .filter(|e| e.who == who && e.what == *m)
                .collect();
            let expected = usize::from(!allowed || mutating.contains(m));
            assert_eq!(
                found.len(),
                expected,
                "{who} {m}: policy allows: {allowed}\n{entries:#?}"
            );
            if !allowed {
                let e = found[0];
                assert!(
                    e.result.starts_with("PermissionDenied")
                        && e.result.contains("needs the")
                        && e.arguments.contains("refused by the access policy"),
                    "{e:?}"
                );
            }
        }
    }
    for e in entries
        .iter()
        .filter(|e| !e.result.starts_with("PermissionDenied"))
    {
        assert!(
            mutating.contains(&e.what.as_str()),
            "a read call audited: {e:?}"
        );
        assert!(e.at_unix_ms > 0 && !e.result.is_empty(), "{e:?}");
    }
    let passed: Vec<_> = entries
        .iter()
        .filter(|e| !e.result.starts_with("PermissionDenied"))
        .collect();
    let revoke = passed
        .iter()
        .find(|e| e.what == "RevokeHost")
        .expect("the admin's revocation");
    assert_eq!(revoke.result, "ok");
    assert!(
        revoke.arguments.contains("host=role-matrix-host"),
        "{revoke:?}"
    );
    let start = passed
        .iter()
        .find(|e| e.what == "StartRollout")
        .expect("a deployer's start");
    assert!(start.result.starts_with("NotFound"), "{start:?}");
}

/// A control client holding a viewer's certificate.
async fn viewer_control(url: &str) -> ControlServiceClient<tonic::transport::Channel> {
    let ch = transport::connect(url, &own_operator(Role::Viewer), Duration::from_secs(2))
        .await
        .expect("a viewer's connection");
    ControlServiceClient::new(ch)
}

fn audit_entries(url: &str) -> Vec<wire::AuditEntry> {
    rt().block_on(async {
        viewer_control(url)
            .await
            .list_audit(wire::ListAuditRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
    })
}

#[test]
fn refused_calls_are_audited_at_a_bounded_rate_and_shown_by_serin_audit() {
    use serin_security::limits::{REFUSED_AUDIT_BURST, REFUSED_AUDIT_PER_SECOND};
    let coord = CoordinatorProc::start();
    let url = coord.url();
    // An agent's certificate on the operator API: refused by certificate, audited.
    let agent = TestPki::client_transport(&pki().agent("audit-agent"));
    let got = call(&url, &agent, "ListHosts");
    assert_eq!(got.unwrap_err().code(), tonic::Code::PermissionDenied);
    // An operator certificate on the agent API: the same.
    let got = attach(
        &url,
        &pki().operator("op-admin", Role::Admin),
        hello("audit-op"),
    );
    assert_eq!(got.unwrap_err().code(), tonic::Code::PermissionDenied);

    // Host A's certificate claiming host B: refused by certificate, audited.
    let got = attach(&url, &pki().agent("audit-a"), hello("audit-b"));
    assert_eq!(got.unwrap_err().code(), tonic::Code::PermissionDenied);

    // A viewer floods StartRollout over one connection.
    let viewer = own_operator(Role::Viewer);
    let flood = 400u64;
    let started = std::time::Instant::now();
    rt().block_on(async {
        let ch = transport::connect(&url, &viewer, Duration::from_secs(2))
            .await
            .unwrap();
        let mut c = ControlServiceClient::new(ch);
        for _ in 0..flood {
            let s = c
                .start_rollout(wire::RolloutSpec::default())
                .await
                .unwrap_err();
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    // One more refusal now and then, until the rate lets one through with the summary of what
    // it did not record.
    let entries = wait::wait_for_value(
        "the summary of refusals not recorded",
        TIMEOUT,
        &|| coord.dump(),
        || {
            let _ = call(&url, &viewer, "StartRollout");
            let e = audit_entries(&url);
            e.iter()
                .any(|e| e.what == "RefusedCallsNotRecorded")
                .then_some(e)
        },
    );
    let agent_entry = entries
        .iter()
        .find(|e| e.who == "serin://host/audit-agent")
        .expect("the agent's refused call");
    assert_eq!(agent_entry.what, "ListHosts", "{agent_entry:?}");
    assert!(
        agent_entry.result.starts_with("PermissionDenied")
            && agent_entry.result.contains("not an operator's"),
        "{agent_entry:?}"
    );
    let op_entry = entries
        .iter()
        .find(|e| e.who == "serin://operator/admin/op-admin")
        .expect("the operator's refused Attach");
    assert_eq!(op_entry.what, "Attach", "{op_entry:?}");
    let claim = entries
        .iter()
        .find(|e| e.who == "serin://host/audit-a")
        .expect("host a's hello claiming host b");
    assert!(
        claim.what == "Attach" && claim.result.starts_with("PermissionDenied"),
        "{claim:?}"
    );
    let viewer_who = "serin://operator/viewer/op-viewer";
    let recorded = entries
        .iter()
        .filter(|e| e.who == viewer_who && e.what == "StartRollout")
        .count() as u64;
    let summary = entries
        .iter()
        .find(|e| e.what == "RefusedCallsNotRecorded")
        .unwrap();
    let not_recorded: u64 = summary
        .arguments
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary:?}"));
    eprintln!(
        "{flood} refused calls in {elapsed:.2}s: {recorded} recorded, {not_recorded} counted in a summary"
    );
    // The burst, then the rate: never one entry per refused call.
    assert!(
        // The three refusals before the flood took three of the burst.
        recorded + 3 >= u64::from(REFUSED_AUDIT_BURST)
            && recorded < flood / 2
            && (recorded as f64)
                <= f64::from(REFUSED_AUDIT_BURST)
                    + f64::from(REFUSED_AUDIT_PER_SECOND) * (started.elapsed().as_secs_f64() + 1.0),
        "{recorded} entries for {flood} refused calls"
    );
    assert!(
        not_recorded > 0 && not_recorded + recorded <= flood + 100,
        "{summary:?}"
    );

    // `serin audit` shows refused calls with who and why.
    let admin = pki().harness_operator();
    let out = std::process::Command::new(binaries::serin())
        .args(["--coordinator", &url, "audit"])
        .envs(operator_env(&admin))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(viewer_who)
            && text.contains("PermissionDenied")
            && text.contains("RefusedCallsNotRecorded"),
        "{text}"
    );
}

#[test]
fn a_revoked_host_is_disconnected_and_refused_from_then_on() {
    let f = Fleet::start_bare("mtls-revoke", &["a", "b"]);
    let (a, b) = (f.hosts[0].id().to_owned(), f.hosts[1].id().to_owned());

    // A deployer may not revoke; nothing changes.
    let deployer = pki().operator("revoke-deployer", Role::Deployer);
    let out = std::process::Command::new(binaries::serin())
        .args(["--coordinator", &f.coord.url(), "hosts", "revoke", &a])
        .envs(operator_env(&deployer))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("needs the admin role"), "{err}");
    f.wait_host_connected(0, true);

    // The admin revokes A: its stream ends at once and its reconnects are refused.
    let v = f.cli_json(&["hosts", "revoke", &a, "--reason", "key leaked"]);
    assert_eq!(v["disconnected"], true, "{v}");
    f.wait_host_connected(0, false);
    wait::wait_for(
        "agent A's reconnects to be refused as revoked",
        TIMEOUT,
        &|| format!("{}{}", f.coord.dump(), f.hosts[0].agent.dump()),
        || {
            f.coord.log().contains("revoked certificate refused")
                && f.hosts[0]
                    .agent
                    .log()
                    .contains("this certificate has been revoked by the coordinator")
        },
    );
    f.wait_host_connected(1, true);

    // Persisted: after a coordinator restart B comes back, A stays out.
    f.coord.restart();
    f.wait_host_connected(1, true);
    wait::wait_for(
        "a refusal of A after the restart",
        TIMEOUT,
        &|| f.coord.dump(),
        || {
            let log = f.coord.log();
            let after = log.rsplit("start #2 of serin serve").next().unwrap_or("");
            after.contains("revoked certificate refused")
        },
    );
    let hosts = f.list_hosts().unwrap();
    assert!(
        hosts.iter().all(|h| h.host_id != a),
        "A is back after the restart: {hosts:?}"
    );
    assert!(hosts.iter().any(|h| h.host_id == b && h.connected));

    // The revocation is in the audit log, with who did it.
    let audit = f.cli_json(&["audit", "--since", "1h"]);
    let entries = audit["entries"].as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["what"] == "RevokeHost"
            && e["who"] == "serin://operator/admin/harness"
            && e["result"] == "ok"
            && e["arguments"].as_str().unwrap().contains("key leaked")),
        "{audit}"
    );
}
