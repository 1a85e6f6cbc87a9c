//! Enrolment for real fleets (issue 7), against the real `serin serve`, `serin` and
//! `serin-agent` binaries: a host joins with a one-time token and a key made on the host; a
//! reused or expired token is refused and writes nothing; a known host id presenting a new key is
//! held until an admin approves it; the coordinator renews an agent's certificate over mTLS and
//! refuses a revoked host.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use serin_proto::wire;
use serin_proto::wire::renew_service_client::RenewServiceClient;
use serin_security::tls::{TlsFiles, TlsMaterial};
use serin_security::transport::{self, ClientTransport};
use serin_tests::agent_proc::{AgentOptions, AgentProc};
use serin_tests::fleet::{CoordinatorProc, operator_env};
use serin_tests::tls::pki;
use serin_tests::{binaries, wait};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A coordinator serving enrolment on a second port of its own address.
struct Enrolling {
    coord: CoordinatorProc,
    enrol_url: String,
    fingerprint: String,
}

fn start(lifetime: &str) -> Enrolling {
    let coord = CoordinatorProc::start();
    let ip = coord.addr().ip();
    let port = std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port for the enrolment listener")
        .port();
    let ca_dir = pki().ca().parent().expect("the PKI dir").to_path_buf();
    let mut toml = std::fs::read_to_string(coord.config_path()).expect("the coordinator config");
    toml.push_str(&format!(
        "\n[enrolment]\nlisten = \"{ip}:{port}\"\nca_key = \"{}\"\nagent_cert_lifetime = \"{lifetime}\"\n",
        ca_dir.join("ca.key").display()
    ));
    std::fs::write(coord.config_path(), toml).expect("writing the coordinator config");
    coord.restart();
    wait::wait_for(
        "the enrolment port",
        TIMEOUT,
        &|| coord.log_tail(40),
        || coord.log().contains("enrolment port serving"),
    );
    let ca_pem = std::fs::read_to_string(pki().ca()).expect("the CA");
    Enrolling {
        enrol_url: format!("https://{ip}:{port}"),
        fingerprint: serin_security::pki::certificate_fingerprint(&ca_pem).expect("fingerprint"),
        coord,
    }
}

impl Enrolling {
    /// `serin ARGS -o json` as the harness's admin operator.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(binaries::serin())
            .args(args)
            .args(["-o", "json", "--coordinator", &self.coord.url()])
            .envs(operator_env(&pki().harness_operator()))
            .env("NO_COLOR", "1")
            .output()
            .expect("running serin")
    }

    fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "serin {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.coord.log_tail(30)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    fn token(&self, host: &str, expires: &str) -> (String, u64) {
        let v = self.cli_json(&["token", "create", "--host-id", host, "--expires", expires]);
        (
            v["token"].as_str().expect("a token").to_string(),
            v["expires_unix_ms"].as_u64().expect("an expiry"),
        )
    }

    fn enroll_cmd(&self, agent: &AgentProc, token: &str) -> Command {
        let mut cmd = Command::new(binaries::agent());
        cmd.arg("--config")
            .arg(agent.config_path())
            .args(["enroll", "--coordinator", &self.enrol_url, "--token", token])
            .args(["--ca-fingerprint", &self.fingerprint, "--wait", "60s"])
            .env("NO_COLOR", "1");
        cmd
    }

    fn enroll(&self, agent: &AgentProc, token: &str) -> Output {
        self.enroll_cmd(agent, token)
            .output()
            .expect("running serin-agent enroll")
    }

    fn audit(&self) -> String {
        self.cli_json(&["audit"]).to_string()
    }
}

/// An agent whose `[tls]` files are in its own `pki/` directory, not yet there.
fn enrolling_agent(e: &Enrolling, name: &str, host_id: Option<&str>) -> (AgentProc, TlsFiles) {
    let agent = AgentProc::configure(&e.coord.url(), &AgentOptions::new(name));
    let dir = agent.root().join("pki");
    let files = TlsFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("agent.crt"),
        key: dir.join("agent.key"),
    };
    let text = std::fs::read_to_string(agent.config_path()).expect("the agent config");
    let tls_line = text
        .lines()
        .find(|l| l.starts_with("tls = "))
        .expect("a tls line")
        .to_string();
    let mut text = text.replace(
        &tls_line,
        &format!(
            "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
            files.ca.display(),
            files.cert.display(),
            files.key.display()
        ),
    );
    if let Some(h) = host_id {
        text = text.replace(
            &format!("host_id = \"{}\"", agent.host_id),
            &format!("host_id = \"{h}\""),
        );
    }
    std::fs::write(agent.config_path(), text).expect("writing the agent config");
    (agent, files)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

fn connected(e: &Enrolling, host: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let url = e.coord.url();
    rt.block_on(async move {
        let transport = serin_tests::tls::TestPki::client_transport(&pki().harness_operator());
        let Ok(ch) = transport::connect(&url, &transport, Duration::from_secs(2)).await else {
            return false;
        };
        wire::control_service_client::ControlServiceClient::new(ch)
            .list_hosts(wire::ListHostsRequest::default())
            .await
            .map(|r| {
                r.into_inner()
                    .hosts
                    .iter()
                    .any(|h| h.host_id == host && h.connected)
            })
            .unwrap_or(false)
    })
}

#[test]
fn a_host_enrols_with_a_token_joins_the_fleet_and_the_token_is_single_use() {
    let e = start("1d");
    let (agent, files) = enrolling_agent(&e, "enrol-join", None);
    let host = agent.host_id.clone();
    let (token, _) = e.token(&host, "1h");

    let out = e.enroll(&agent, &token);
    assert!(out.status.success(), "enroll failed: {}", stderr(&out));
    assert_eq!(mode(&files.key), 0o600, "the key is private");
    let material = TlsMaterial::load(&files).expect("the enrolled files load");
    assert_eq!(
        material.own_identity().expect("an identity"),
        serin_security::PeerIdentity::Agent {
            host_id: serin_proto::HostId::new(&host).unwrap()
        }
    );

    // The enrolled agent joins the fleet with its new certificate.
    agent.spawn(None);
    wait::wait_for(
        "the enrolled agent to connect",
        TIMEOUT,
        &|| agent.log_tail(30),
        || connected(&e, &host),
    );

    // The same token again, from a fresh host directory: refused, nothing written.
    let (again, again_files) = enrolling_agent(&e, "enrol-join-again", Some(&host));
    let out = e.enroll(&again, &token);
    assert!(!out.status.success(), "a reused token must be refused");
    assert!(stderr(&out).contains("already used"), "{}", stderr(&out));
    assert!(!again_files.cert.exists() && !again_files.key.exists());

    // The token never reaches the audit log, its creation does.
    let audit = e.audit();
    assert!(audit.contains("CreateToken"), "{audit}");
    assert!(
        !audit.contains(&token),
        "the token leaked into the audit log"
    );
    agent.kill();
}

#[test]
fn an_expired_or_unknown_token_is_refused_and_writes_nothing() {
    let e = start("1d");
    let (agent, files) = enrolling_agent(&e, "enrol-expired", None);
    let (token, expires) = e.token(&agent.host_id, "1s");
    wait::wait_for("the token to expire", TIMEOUT, &String::new, || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .is_ok_and(|d| d.as_millis() > u128::from(expires))
    });
    let out = e.enroll(&agent, &token);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));
    assert!(!files.cert.exists() && !files.key.exists() && !files.ca.exists());

    let out = e.enroll(&agent, &"0".repeat(64));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown join token"),
        "{}",
        stderr(&out)
    );

    // A wrong CA fingerprint fails before the token is ever sent.
    let (token, _) = e.token(&agent.host_id, "1h");
    let out = Command::new(binaries::agent())
        .arg("--config")
        .arg(agent.config_path())
        .args(["enroll", "--coordinator", &e.enrol_url, "--token", &token])
        .args(["--ca-fingerprint", &"ab".repeat(32)])
        .output()
        .expect("running serin-agent enroll");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("pinned fingerprint"),
        "{}",
        stderr(&out)
    );
    // ... so the token is still good.
    let out = e.enroll(&agent, &token);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_new_key_for_a_known_host_is_held_until_approved() {
    let e = start("1d");
    let (first, _) = enrolling_agent(&e, "enrol-held", None);
    let host = first.host_id.clone();
    let (token, _) = e.token(&host, "1h");
    let out = e.enroll(&first, &token);
    assert!(out.status.success(), "{}", stderr(&out));

    // The same host id from another machine (a new key): held, not issued.
    let (second, files) = enrolling_agent(&e, "enrol-held-2", Some(&host));
    let (token2, _) = e.token(&host, "1h");
    let mut child: Child = e
        .enroll_cmd(&second, &token2)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting serin-agent enroll");
    let pending = wait::wait_for_value("the enrolment to be held", TIMEOUT, &String::new, || {
        let v = e.cli_json(&["hosts", "pending"]);
        v.as_array()
            .and_then(|a| a.iter().find(|h| h["host_id"] == host.as_str()).cloned())
    });
    assert_eq!(pending["approved"], false);
    assert_ne!(pending["key_sha256"], pending["known_key_sha256"]);
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the enrolling agent waits for approval"
    );
    assert!(!files.cert.exists(), "no certificate while held");

    // A deployer may not approve; an admin may.
    let deployer = pki().operator("enrol-deployer", serin_security::Role::Deployer);
    let out = Command::new(binaries::serin())
        .args(["hosts", "approve", &host, "--coordinator", &e.coord.url()])
        .envs(operator_env(&deployer))
        .output()
        .expect("running serin");
    assert!(!out.status.success(), "a deployer cannot approve");
    let v = e.cli_json(&["hosts", "approve", &host]);
    assert_eq!(v["key_sha256"], pending["key_sha256"]);

    let status = wait::wait_for_value("enroll to finish", TIMEOUT, &String::new, || {
        child.try_wait().expect("try_wait")
    });
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        use std::io::Read as _;
        let _ = s.read_to_string(&mut err);
    }
    assert!(status.success(), "enroll after approval failed: {err}");
    assert!(files.cert.exists() && mode(&files.key) == 0o600);
    assert!(e.audit().contains("ApproveHost"));
    let v = e.cli_json(&["hosts", "pending"]);
    assert_eq!(v.as_array().map(Vec::len), Some(0), "{v}");
}

/// `Renew` over mTLS with `files` (the agent's current certificate and key).
fn renew(url: &str, files: &TlsFiles, host: &str) -> Result<wire::RenewResponse, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let key = std::fs::read_to_string(&files.key).expect("the key");
    let csr =
        serin_security::pki::agent_request_for_key(&serin_proto::HostId::new(host).unwrap(), &key)
            .expect("a request");
    rt.block_on(async {
        let material = TlsMaterial::load(files).map_err(|e| e.to_string())?;
        let config = serin_security::tls::client_config(&material).map_err(|e| e.to_string())?;
        let transport = ClientTransport::Tls {
            config,
            server_name: None,
        };
        let ch = transport::connect(url, &transport, Duration::from_secs(2))
            .await
            .map_err(|e| format!("{e:?}"))?;
        RenewServiceClient::new(ch)
            .renew(wire::RenewRequest { csr_pem: csr })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
}

#[test]
fn the_coordinator_renews_an_enrolled_agent_and_refuses_a_revoked_one() {
    let e = start("1h");
    let (agent, files) = enrolling_agent(&e, "enrol-renew", None);
    let host = agent.host_id.clone();
    let (token, _) = e.token(&host, "1h");
    let out = e.enroll(&agent, &token);
    assert!(out.status.success(), "{}", stderr(&out));
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();

    let renewed = renew(&e.coord.url(), &files, &host).expect("renewal");
    assert!(
        renewed.not_after_unix_ms >= now_ms + 59 * 60 * 1000,
        "a renewed certificate lasts the configured lifetime"
    );
    // The renewed certificate is for the same key and the same host.
    let material = TlsMaterial::from_pem(
        &std::fs::read_to_string(&files.ca).expect("the CA"),
        &renewed.certificate_pem,
        &std::fs::read_to_string(&files.key).expect("the key"),
    )
    .expect("the renewed certificate parses");
    assert_eq!(
        material.own_identity().expect("an identity"),
        serin_security::PeerIdentity::Agent {
            host_id: serin_proto::HostId::new(&host).unwrap()
        }
    );
    serin_security::tls::agent_client_config(&material, &serin_proto::HostId::new(&host).unwrap())
        .expect("the renewed certificate matches the enrolled key");
    let dir = tempfile::tempdir().expect("a tempdir");

    // A new key is not a renewal: it needs enrolment and approval.
    let other = dir.path().join("other.key");
    let (key, _) =
        serin_security::pki::agent_key_and_request(&serin_proto::HostId::new(&host).unwrap())
            .expect("a key");
    std::fs::write(&other, key.as_bytes()).expect("writing");
    let swapped = TlsFiles {
        key: other,
        ..files.clone()
    };
    // (The handshake itself fails: the certificate does not match that key.)
    assert!(renew(&e.coord.url(), &swapped, &host).is_err());

    // Revoked: refused at the handshake, so it cannot renew.
    e.cli_json(&["hosts", "revoke", &host]);
    let err = renew(&e.coord.url(), &files, &host).expect_err("a revoked host cannot renew");
    assert!(err.contains("Revoked") || err.contains("revoked"), "{err}");
    // ... nor enrol again with a fresh token.
    let (again, _) = enrolling_agent(&e, "enrol-renew-again", Some(&host));
    let (token, _) = e.token(&host, "1h");
    let out = e.enroll(&again, &token);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
}

#[test]
fn an_agent_renews_its_short_lived_certificate_over_mtls_without_leaving_the_fleet() {
    // Certificates of 9 s: the agent renews at two thirds (about 5 s after issue).
    let e = start("9s");
    let (agent, files) = enrolling_agent(&e, "enrol-renewal", None);
    let host = agent.host_id.clone();
    let (token, _) = e.token(&host, "1h");
    let out = e.enroll(&agent, &token);
    let enrolled = SystemTime::now();
    assert!(out.status.success(), "{}", stderr(&out));
    let first = std::fs::read_to_string(&files.cert).expect("the certificate");
    let first_expiry = enrolled + Duration::from_secs(9);

    agent.spawn(None);
    wait::wait_for(
        "the agent to connect",
        TIMEOUT,
        &|| agent.log_tail(30),
        || connected(&e, &host),
    );
    // Renewed before the first certificate expires, and connected at every look meanwhile.
    let mut looks = 0;
    let mut disconnected = 0;
    wait::wait_for(
        "the certificate to be renewed",
        TIMEOUT,
        &|| agent.log_tail(30),
        || {
            looks += 1;
            if !connected(&e, &host) {
                disconnected += 1;
            }
            std::fs::read_to_string(&files.cert).is_ok_and(|c| c != first)
        },
    );
    let renewed_at = SystemTime::now();
    assert!(
        renewed_at < first_expiry,
        "renewed {:?} after the first certificate expired",
        renewed_at.duration_since(first_expiry).unwrap_or_default()
    );
    assert_eq!(
        disconnected, 0,
        "disconnected at {disconnected} of {looks} looks"
    );
    assert!(
        agent.log().contains("certificate renewed"),
        "{}",
        agent.log_tail(30)
    );

    // Past the first certificate's expiry: still in the fleet. A coordinator restart then
    // forces a new handshake, which only the renewed certificate can pass.
    wait::wait_for(
        "the first certificate to expire",
        TIMEOUT,
        &String::new,
        || SystemTime::now() > first_expiry + Duration::from_secs(1),
    );
    assert!(connected(&e, &host), "{}", agent.log_tail(30));
    let killed = std::time::Instant::now();
    e.coord.restart();
    let restarted = std::time::Instant::now();
    wait::wait_for(
        "the agent to reconnect with its renewed certificate",
        TIMEOUT,
        &|| format!("{}\n{}", agent.log_tail(30), e.coord.log_tail(30)),
        || connected(&e, &host),
    );
    println!(
        "reconnected with the renewed certificate {:?} after the coordinator answered again \
         ({:?} after it was killed)",
        restarted.elapsed(),
        killed.elapsed()
    );
    agent.kill();
}
