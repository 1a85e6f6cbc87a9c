//! The mTLS negative matrix at the transport level: a real tonic server (serin's `AgentService`
//! and `ControlService` with probe handlers) behind [`TlsIncoming`] and [`AuthorizeLayer`] on a
//! loopback socket, and real tonic clients through [`connect`].
//!
//! Each refused case proves three things: the call failed, the error says why (client side, and
//! the server's refusal report where the handshake was refused), and no handler ran.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serin_proto::HostId;
use serin_proto::wire;
use serin_proto::wire::agent_service_client::AgentServiceClient;
use serin_proto::wire::agent_service_server::{AgentService, AgentServiceServer};
use serin_proto::wire::control_service_client::ControlServiceClient;
use serin_proto::wire::control_service_server::{ControlService, ControlServiceServer};
use serin_security::pki::{Ca, IssuedCert, Subject, Validity};
use serin_security::tls::{self, NoRevocation, Revocation, RevokedSet, TlsMaterial};
use serin_security::transport::{
    AuthorizeLayer, ClientTransport, Refusal, RefusalReason, TlsIncoming, agent_host,
    check_claimed_host, connect, explain_failure, peer_identity,
};
use serin_security::{OperatorName, PeerIdentity, Role};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

const DAY: Duration = Duration::from_secs(86_400);

/// Every identity that reached a handler.
#[derive(Clone, Default)]
struct Probe {
    seen: Arc<Mutex<Vec<PeerIdentity>>>,
}

impl Probe {
    fn record<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let id = peer_identity(req)?.clone();
        assert!(
            req.remote_addr().is_some(),
            "Request::remote_addr still works behind TlsIncoming"
        );
        self.seen.lock().unwrap().push(id);
        Ok(())
    }
    fn seen(&self) -> Vec<PeerIdentity> {
        self.seen.lock().unwrap().clone()
    }
}

type Empty<T> = tokio_stream::Empty<Result<T, Status>>;

#[tonic::async_trait]
impl AgentService for Probe {
    type AttachStream = Empty<wire::CoordinatorMessage>;
    /// As the coordinator will: the hello's host id must be the certificate's.
    async fn attach(
        &self,
        mut req: Request<tonic::Streaming<wire::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let certified = agent_host(&req)?.clone();
        let first = req.get_mut().message().await?;
        let Some(wire::AgentMessage {
            body: Some(wire::agent_message::Body::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message must be a hello",
            ));
        };
        let claimed = HostId::new(hello.host_id)?;
        check_claimed_host(&certified, &claimed)?;
        self.record(&req)?;
        Ok(Response::new(tokio_stream::empty()))
    }
    type FetchArtifactStream = Empty<wire::ArtifactChunk>;
    async fn fetch_artifact(
        &self,
        req: Request<wire::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        self.record(&req)?;
        Ok(Response::new(tokio_stream::empty()))
    }
}

fn unused<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not used by this test"))
}

#[tonic::async_trait]
impl ControlService for Probe {
    async fn list_hosts(
        &self,
        req: Request<wire::ListHostsRequest>,
    ) -> Result<Response<wire::ListHostsResponse>, Status> {
        self.record(&req)?;
        Ok(Response::new(wire::ListHostsResponse::default()))
    }
    async fn push_artifact(
        &self,
        _: Request<tonic::Streaming<wire::PushArtifactChunk>>,
    ) -> Result<Response<wire::ReleaseInfo>, Status> {
        unused()
    }
    async fn register_release(
        &self,
        _: Request<wire::Release>,
    ) -> Result<Response<wire::ReleaseInfo>, Status> {
        unused()
    }
    async fn list_releases(
        &self,
        _: Request<wire::ListReleasesRequest>,
    ) -> Result<Response<wire::ListReleasesResponse>, Status> {
        unused()
    }
    async fn plan_rollout(
        &self,
        _: Request<wire::RolloutSpec>,
    ) -> Result<Response<wire::RolloutPlan>, Status> {
        unused()
    }
    async fn start_rollout(
        &self,
        req: Request<wire::RolloutSpec>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        self.record(&req)?;
        Ok(Response::new(wire::RolloutStatus::default()))
    }
    async fn get_rollout(
        &self,
        _: Request<wire::RolloutRef>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        unused()
    }
    type WatchRolloutStream = Empty<wire::RolloutStatus>;
    async fn watch_rollout(
        &self,
        _: Request<wire::RolloutRef>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        unused()
    }
    async fn list_rollouts(
        &self,
        _: Request<wire::ListRolloutsRequest>,
    ) -> Result<Response<wire::ListRolloutsResponse>, Status> {
        unused()
    }
    async fn control_rollout(
        &self,
        _: Request<wire::ControlRequest>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        unused()
    }
    async fn explain_rollout(
        &self,
        _: Request<wire::RolloutRef>,
    ) -> Result<Response<wire::Explanation>, Status> {
        unused()
    }

    async fn revoke_host(
        &self,
        _: Request<wire::RevokeHostRequest>,
    ) -> Result<Response<wire::RevokeHostResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    async fn list_audit(
        &self,
        _: Request<wire::ListAuditRequest>,
    ) -> Result<Response<wire::ListAuditResponse>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }
}

/// A CA and the certificates the cases need.
struct Pki {
    ca: Ca,
    ca_pem: String,
}

impl Pki {
    fn new(name: &str) -> Self {
        let (ca, pem) = Ca::generate(name, Validity::starting(SystemTime::now(), 365 * DAY))
            .expect("generate a CA");
        Self {
            ca,
            ca_pem: pem.cert_pem,
        }
    }

    fn issue(&self, subject: Subject, validity: Validity) -> IssuedCert {
        self.ca.issue(&subject, validity).expect("issue")
    }

    fn valid(&self, subject: Subject) -> IssuedCert {
        self.issue(subject, Validity::starting(SystemTime::now(), DAY))
    }

    /// Material trusting this CA and presenting `cert`.
    fn material(&self, cert: &IssuedCert) -> TlsMaterial {
        TlsMaterial::from_pem(&self.ca_pem, &cert.cert_pem, &cert.key_pem).expect("material")
    }
}

fn coordinator_subject(name: &str) -> Subject {
    Subject::Coordinator {
        dns_names: vec![name.to_string()],
        ips: vec![],
    }
}

fn agent(host: &str) -> Subject {
    Subject::Client(PeerIdentity::Agent {
        host_id: HostId::new(host).unwrap(),
    })
}

fn operator(name: &str, role: Role) -> Subject {
    Subject::Client(PeerIdentity::Operator {
        name: OperatorName::new(name).unwrap(),
        role,
    })
}

/// A running coordinator-like server on loopback.
struct Server {
    port: u16,
    probe: Probe,
    refusals: mpsc::Receiver<Refusal>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Serves with `cert` (a coordinator certificate for "localhost") issued by `pki`.
    async fn start(pki: &Pki, cert: &IssuedCert, revocation: Arc<dyn Revocation>) -> Self {
        Self::start_with(pki, cert, revocation, Duration::from_secs(10)).await
    }

    async fn start_with(
        pki: &Pki,
        cert: &IssuedCert,
        revocation: Arc<dyn Revocation>,
        handshake_timeout: Duration,
    ) -> Self {
        let material = pki.material(cert);
        let config = tls::server_config(&material, revocation).expect("server config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, refusals) = mpsc::channel(16);
        let incoming = TlsIncoming::new(listener, config)
            .with_handshake_timeout(handshake_timeout)
            .with_refusal_reports(tx);
        let probe = Probe::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .layer(AuthorizeLayer)
            .add_service(AgentServiceServer::new(probe.clone()))
            .add_service(ControlServiceServer::new(probe.clone()));
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
                .expect("server");
        });
        Self {
            port,
            probe,
            refusals,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    /// The next refusal the server reported (waits up to 5 s).
    async fn refusal(&mut self) -> RefusalReason {
        tokio::time::timeout(Duration::from_secs(5), self.refusals.recv())
            .await
            .expect("the server reports a refusal within 5 s")
            .expect("refusal channel open")
            .reason
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

fn tls_transport(config: Arc<rustls::ClientConfig>) -> ClientTransport {
    ClientTransport::Tls {
        config,
        server_name: None,
    }
}

/// The whole error chain as one string.
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

/// Connects and calls ListHosts; the error (connect or call) as text.
async fn list_hosts(url: &str, transport: &ClientTransport) -> Result<(), String> {
    let channel = connect(url, transport, Duration::from_secs(5))
        .await
        .map_err(|e| chain(&e))?;
    ControlServiceClient::new(channel)
        .list_hosts(wire::ListHostsRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), chain(&s)))
}

/// Connects and calls FetchArtifact.
async fn fetch(url: &str, transport: &ClientTransport) -> Result<(), String> {
    let channel = connect(url, transport, Duration::from_secs(5))
        .await
        .map_err(|e| chain(&e))?;
    AgentServiceClient::new(channel)
        .fetch_artifact(wire::FetchArtifactRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), chain(&s)))
}

fn refused(result: Result<(), String>, needle: &str) -> String {
    let err = result.expect_err("the call must be refused");
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "expected the error to mention {needle:?}, got: {err}"
    );
    err
}

/// The explanation a client prints for `err` contains `needle`.
fn explained(err: &str, needle: &str) {
    let hint = explain_failure(err).unwrap_or_else(|| panic!("no explanation for {err}"));
    assert!(
        hint.contains(needle),
        "explanation of {err:?} is {hint:?}, expected {needle:?}"
    );
}

#[tokio::test]
async fn valid_identities_reach_their_api_with_their_identity() -> anyhow::Result<()> {
    let pki = Pki::new("serin test");
    let server = Server::start(
        &pki,
        &pki.valid(coordinator_subject("localhost")),
        Arc::new(NoRevocation),
    )
    .await;

    let op = pki.material(&pki.valid(operator("alice", Role::Viewer)));
    let op = tls_transport(tls::operator_client_config(&op)?);
    list_hosts(&server.url(), &op)
        .await
        .map_err(anyhow::Error::msg)?;

    let host = HostId::new("web-01")?;
    let ag = pki.material(&pki.valid(agent("web-01")));
    let ag = tls_transport(tls::agent_client_config(&ag, &host)?);
    fetch(&server.url(), &ag)
        .await
        .map_err(anyhow::Error::msg)?;

    assert_eq!(
        server.probe.seen(),
        vec![
            PeerIdentity::Operator {
                name: OperatorName::new("alice")?,
                role: Role::Viewer
            },
            PeerIdentity::Agent { host_id: host }
        ],
        "each handler saw the identity from the certificate"
    );
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn no_client_certificate_is_refused_in_the_handshake() -> anyhow::Result<()> {
    let pki = Pki::new("serin test");
    let mut server = Server::start(
        &pki,
        &pki.valid(coordinator_subject("localhost")),
        Arc::new(NoRevocation),
    )
    .await;
    let ca = tls::parse_certs(pki.ca_pem.as_bytes()).map_err(anyhow::Error::msg)?;
    let anon = tls_transport(tls::anonymous_client_config(&ca)?);
    let err = refused(
        list_hosts(&server.url(), &anon).await,
        "CertificateRequired",
    );
    explained(&err, "requires a client certificate");
    let reason = server.refusal().await;
    assert!(
        reason.to_string().contains("peer sent no certificates"),
        "server reason: {reason}"
    );
    assert!(server.probe.seen().is_empty(), "no handler ran");
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let pki = Pki::new("serin test");
    let other = Pki::new("someone else");
    let mut server = Server::start(
        &pki,
        &pki.valid(coordinator_subject("localhost")),
        Arc::new(NoRevocation),
    )
    .await;
    // Trusts the right CA for the server, presents a certificate of another CA.
    let foreign = other.valid(operator("mallory", Role::Admin));
    let material = TlsMaterial::from_pem(&pki.ca_pem, &foreign.cert_pem, &foreign.key_pem)?;
    let t = tls_transport(tls::operator_client_config(&material)?);
    let err = refused(list_hosts(&server.url(), &t).await, "UnknownCA");
    explained(&err, "does not trust the CA");
    let reason = server.refusal().await;
    assert!(
        reason.to_string().contains("UnknownIssuer"),
        "server reason: {reason}"
    );
    assert!(server.probe.seen().is_empty(), "no handler ran");
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() -> anyhow::Result<()> {
    let pki = Pki::new("serin test");
    let mut server = Server::start(
        &pki,
        &pki.valid(coordinator_subject("localhost")),
        Arc::new(NoRevocation),
    )
    .await;
    let now = SystemTime::now();
    let host = HostId::new("web-01")?;
    let cases = [
        (
            "expired",
            Validity {
                not_before: now - 3 * DAY,
                not_after: now - DAY,
            },
            "certificate expired",
        ),
        (
            "not yet valid",
            Validity {
                not_before: now + DAY,
                not_after: now + 3 * DAY,
            },
            "not valid before",
        ),
    ];
    for (case, validity, server_says) in cases {
        let cert = pki.issue(agent("web-01"), validity);
        let t = tls_transport(tls::agent_client_config(&pki.material(&cert), &host)?);
        let err = fetch(&server.url(), &t).await.expect_err(case);
        explained(&err, "expired or not yet valid");
        let reason = server.refusal().await;
        assert!(
            reason.to_string().contains(server_says),
            "{case}: server reason: {reason}"
        );
    }
    assert!(server.probe.seen().is_empty(), "no handler ran");
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_agent_on_the_operator_api_and_an_operator_on_the_agent_api_are_refused()
-> anyhow::Result<()> {
    let pki = Pki::new("serin test");
    let server = Server::start(
        &pki,
        &pki.valid(coordinator_subject("localhost")),
        Arc::new(NoRevocation),
    )
    .await;
    let host = HostId::new("web-01")?;
    let ag = tls_transport(tls::agent_client_config(
        &pki.material(&pki.valid(agent("web-01"))),
        &host,
    )?);
    let err = refused(list_hosts(&server.url(), &ag).await, "PermissionDenied");
    assert!(
        err.contains("is the operator API") && err.contains("serin://host/web-01"),
        "{err}"
    );

    let op = tls_transport(tls::operator_client_config(
        &pki.material(&pki.valid(operator("alice", Role::Admin))),
    )?);
    let err = refused(fetch(&server.url(), &op).await, "PermissionDenied");
    assert!(
        err.contains("is the agent API") && err.contains("serin://operator/admin/alice"),
        "{err}"
    );

    // A viewer may read but not start a rollout.
    let viewer = tls_transport(tls::operator_client_config(
        &pki.material(&pki.valid(operator("victor", Role::Viewer))),
    )?);
    let channel = connect(&server.url(), &viewer, Duration::from_secs(5)).await?;
    let status = ControlServiceClient::new(channel)
        .start_rollout(wire::RolloutSpec::default())
        .await
        .expect_err("a viewer cannot start a rollout");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("needs the deployer role"),
        "{}",
        status.message()
    );

    assert!(server.probe.seen().is_empty(), "no handler ran");
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_agent_refuses_a_coordinator_with_the_wrong_name_or_from_another_ca()
-> anyhow::Result<()> {
    let pki = Pki::new("serin test");
    let host = HostId::new("web-01")?;
    let ag = tls_transport(tls::agent_client_config(
        &pki.material(&pki.valid(agent("web-01"))),
        &host,
    )?);

    // Right CA, but the certificate names another coordinator.
    let server = Server::start(
        &pki,
        &pki.valid(coordinator_subject("other.example.com")),
        Arc::new(NoRevocation),
    )
    .await;
    let err = refused(
        fetch(&server.url(), &ag).await,
        "not valid for name \"localhost\"",
    );
    explained(&err, "not valid for the name dialled");
    assert!(server.probe.seen().is_empty(), "no handler ran");
    server.stop().await;

    // Right name, but issued by a CA the agent does not pin.
    let other = Pki::new("impostor");
    let server = Server::start(
        &other,
        &other.valid(coordinator_subject("localhost")),
        Arc::new(NoRevocation),
    )
    .await;
    let err = refused(fetch(&server.url(), &ag).await, "UnknownIssuer");
    explained(&err, "not issued by the pinned serin CA");
    assert!(server.probe.seen().is_empty(), "no handler ran");
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_plaintext_client_on_the_tls_port_is_refused() -> anyhow::Result<()> {
    let pki = Pki::new("serin test");
    let mut server = Server::start(
        &pki,
        &pki.valid(coordinator_subject("localhost")),
        Arc::new(NoRevocation),
    )
    .await;
    let url = format!("http://localhost:{}", server.port);
    let err = list_hosts(&url, &ClientTransport::Plaintext)
        .await
        .expect_err("plaintext must be refused");
    explained(&err, "resets plaintext clients");
    let reason = server.refusal().await;
    assert!(
        matches!(reason, RefusalReason::NotTls(b'P')),
        "the server recognises the HTTP/2 preface: {reason}"
    );
    assert!(
        reason
            .to_string()
            .contains("plaintext client on the TLS port"),
        "{reason}"
    );
    assert!(server.probe.seen().is_empty(), "no handler ran");
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_from_the_next_handshake_on() -> anyhow::Result<()> {
    let pki = Pki::new("serin test");
    let revoked = Arc::new(RevokedSet::default());
    let mut server = Server::start(
        &pki,
        &pki.valid(coordinator_subject("localhost")),
        revoked.clone(),
    )
    .await;
    let host = HostId::new("web-02")?;
    let t = tls_transport(tls::agent_client_config(
        &pki.material(&pki.valid(agent("web-02"))),
        &host,
    )?);
    fetch(&server.url(), &t)
        .await
        .map_err(anyhow::Error::msg)
        .context("served before the revocation")?;

    revoked.revoke_identity(PeerIdentity::Agent {
        host_id: host.clone(),
    });
    let err = refused(fetch(&server.url(), &t).await, "CertificateRevoked");
    explained(&err, "revoked");
    let reason = server.refusal().await;
    assert!(reason.to_string().contains("Revoked"), "{reason}");

    // Another host is unaffected.
    let other = HostId::new("web-01")?;
    let good = tls_transport(tls::agent_client_config(
        &pki.material(&pki.valid(agent("web-01"))),
        &other,
    )?);
    fetch(&server.url(), &good)
        .await
        .map_err(anyhow::Error::msg)
        .context("web-01 is not revoked")?;
    assert_eq!(
        server.probe.seen(),
        vec![
            PeerIdentity::Agent { host_id: host },
            PeerIdentity::Agent { host_id: other }
        ]
    );
    server.stop().await;
    Ok(())
}

/// Opens Attach and sends a hello claiming `claimed`; the call's outcome.
async fn attach_as(url: &str, transport: &ClientTransport, claimed: &str) -> Result<(), Status> {
    let channel = connect(url, transport, Duration::from_secs(5))
        .await
        .map_err(|e| Status::unavailable(chain(&e)))?;
    let hello = wire::AgentMessage {
        body: Some(wire::agent_message::Body::Hello(wire::Hello {
            host_id: claimed.to_string(),
            ..Default::default()
        })),
    };
    let mut stream = AgentServiceClient::new(channel)
        .attach(tokio_stream::iter([hello]))
        .await?
        .into_inner();
    // The probe answers with an empty stream once it accepted the hello.
    while stream.message().await?.is_some() {}
    Ok(())
}

#[tokio::test]
async fn host_a_certificate_claiming_host_b_is_refused() -> anyhow::Result<()> {
    let pki = Pki::new("serin test");
    let server = Server::start(
        &pki,
        &pki.valid(coordinator_subject("localhost")),
        Arc::new(NoRevocation),
    )
    .await;
    let a = HostId::new("host-a")?;
    let t = tls_transport(tls::agent_client_config(
        &pki.material(&pki.valid(agent("host-a"))),
        &a,
    )?);
    let status = attach_as(&server.url(), &t, "host-b")
        .await
        .expect_err("host-a's certificate cannot attach as host-b");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.message(),
        "the hello claims host host-b, but this agent's certificate is for host host-a"
    );
    assert!(server.probe.seen().is_empty(), "nothing was accepted");
    attach_as(&server.url(), &t, "host-a")
        .await
        .context("its own host id is accepted")?;
    assert_eq!(
        server.probe.seen(),
        vec![PeerIdentity::Agent { host_id: a }]
    );
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn programs_refuse_to_start_with_the_wrong_kind_of_certificate() -> anyhow::Result<()> {
    let pki = Pki::new("serin test");
    // The coordinator with an agent certificate.
    let err = tls::server_config(
        &pki.material(&pki.valid(agent("web-01"))),
        Arc::new(NoRevocation),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("serin://host/web-01") && err.contains("coordinator"),
        "{err}"
    );
    // An agent with another host's certificate.
    let err = tls::agent_client_config(
        &pki.material(&pki.valid(agent("web-02"))),
        &HostId::new("web-01")?,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("serin://host/web-02") && err.contains("serin://host/web-01"),
        "{err}"
    );
    // The CLI with an agent certificate.
    let err = tls::operator_client_config(&pki.material(&pki.valid(agent("web-01"))))
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected an operator identity"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_silent_connection_neither_blocks_others_nor_stays_forever() -> anyhow::Result<()> {
    let pki = Pki::new("serin test");
    let mut server = Server::start_with(
        &pki,
        &pki.valid(coordinator_subject("localhost")),
        Arc::new(NoRevocation),
        Duration::from_millis(300),
    )
    .await;
    // Connects and never says a word.
    let silent = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await?;
    let op = tls_transport(tls::operator_client_config(
        &pki.material(&pki.valid(operator("alice", Role::Viewer))),
    )?);
    list_hosts(&server.url(), &op)
        .await
        .map_err(anyhow::Error::msg)
        .context("a valid client is served while another connection stalls its handshake")?;
    let reason = server.refusal().await;
    assert_eq!(reason, RefusalReason::Timeout(Duration::from_millis(300)));
    drop(silent);
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn during_a_ca_rotation_a_bundle_of_both_cas_accepts_both_generations() -> anyhow::Result<()>
{
    let old = Pki::new("serin CA 2026");
    let new = Pki::new("serin CA 2027");
    let bundle = format!("{}{}", old.ca_pem, new.ca_pem);
    // The coordinator already runs on a certificate of the new CA and trusts both.
    let coordinator = new.valid(coordinator_subject("localhost"));
    let material = TlsMaterial::from_pem(&bundle, &coordinator.cert_pem, &coordinator.key_pem)?;
    assert_eq!(material.ca.len(), 2, "both CAs are trust anchors");
    let config = tls::server_config(&material, Arc::new(NoRevocation))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let probe = Probe::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .layer(AuthorizeLayer)
        .add_service(ControlServiceServer::new(probe.clone()));
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(TlsIncoming::new(listener, config), async {
                let _ = stopped.await;
            })
            .await
    });
    let url = format!("https://localhost:{port}");
    for (pki, name) in [(&old, "old-op"), (&new, "new-op")] {
        let cert = pki.valid(operator(name, Role::Viewer));
        // Each operator trusts the bundle too, so either generation of coordinator certificate works.
        let m = TlsMaterial::from_pem(&bundle, &cert.cert_pem, &cert.key_pem)?;
        let t = tls_transport(tls::operator_client_config(&m)?);
        list_hosts(&url, &t)
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{name} during the rotation"))?;
    }
    assert_eq!(probe.seen().len(), 2);
    let _ = stop.send(());
    task.await??;
    Ok(())
}
