//! The one place where the simulator makes gRPC channels to the coordinator.
//!
//! Every simulated agent, the fan-out clients and the operator calls dial through a
//! [`Connector`], so transport security is decided here and nowhere else:
//! - [`Transport::MutualTls`] (the default of every scenario): each simulated host presents its
//!   own agent certificate, issued on first use by the run's throwaway CA ([`BenchPki`]) and kept
//!   for its reconnections; the operator channel presents an admin operator certificate. The
//!   connection is made by `serin_security::transport`, the same code the real agent and CLI
//!   dial with.
//! - [`Transport::Plaintext`]: plain HTTP/2 against a coordinator started with
//!   `insecure_plaintext` (to compare the cost of TLS).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serin_security::pki::{Ca, IdentityFiles, Subject, Validity, write_identity};
use serin_security::tls::{TlsFiles, TlsMaterial, client_config};
use serin_security::transport::ClientTransport;
use serin_security::{OperatorName, PeerIdentity, Role};
use tonic::transport::{Channel, Endpoint};

/// The host name whose channel is an operator's (admin) rather than an agent's.
pub const OPERATOR: &str = "operator";

/// Lifetime of the run's certificates.
const LIFETIME: Duration = Duration::from_secs(2 * 86_400);

/// How channels are secured.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plain HTTP/2 (the coordinator runs with `insecure_plaintext`).
    Plaintext,
    /// Mutual TLS with the run's CA.
    MutualTls(Arc<BenchPki>),
}

impl Transport {
    /// The URL scheme the coordinator is dialled with.
    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::Plaintext => "http",
            Transport::MutualTls(_) => "https",
        }
    }
}

/// The run's throwaway CA in a directory of its own (worker processes load it from there and
/// issue their own hosts' certificates), and the client identities issued so far.
pub struct BenchPki {
    dir: PathBuf,
    ca: Ca,
    issued: Mutex<HashMap<String, ClientTransport>>,
}

impl std::fmt::Debug for BenchPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchPki").field("dir", &self.dir).finish()
    }
}

impl BenchPki {
    /// A new CA in `dir` (created).
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ca::init(dir, "serin bench CA", Self::validity())
            .with_context(|| format!("creating the bench CA in {}", dir.display()))?;
        Self::load(dir)
    }

    /// The CA another process created in `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            ca: Ca::load(dir)
                .with_context(|| format!("loading the bench CA in {}", dir.display()))?,
            issued: Mutex::default(),
        })
    }

    fn validity() -> Validity {
        Validity::starting(SystemTime::now(), LIFETIME)
    }

    /// The CA's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues the coordinator's certificate for 127.0.0.1 and `localhost` into the CA's
    /// directory: the coordinator's `[tls]` files.
    pub fn coordinator_files(&self) -> anyhow::Result<TlsFiles> {
        let subject = Subject::Coordinator {
            dns_names: vec!["localhost".into()],
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        };
        let cert = self.ca.issue(&subject, Self::validity())?;
        write_identity(&IdentityFiles::in_dir(&self.dir, "coordinator"), &cert)?;
        Ok(self.issued_coordinator_files())
    }

    /// The coordinator's `[tls]` files [`Self::coordinator_files`] issued.
    pub fn issued_coordinator_files(&self) -> TlsFiles {
        let files = IdentityFiles::in_dir(&self.dir, "coordinator");
        TlsFiles {
            ca: self.dir.join(serin_security::pki::CA_CERT_FILE),
            cert: files.cert,
            key: files.key,
        }
    }

    /// The client transport of `host`: the agent certificate of host id `host`, or an admin
    /// operator's for [`OPERATOR`]. Issued on first use, in memory.
    pub fn client(&self, host: &str) -> anyhow::Result<ClientTransport> {
        if let Some(t) = self
            .issued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(host)
        {
            return Ok(t.clone());
        }
        let identity = if host == OPERATOR {
            PeerIdentity::Operator {
                name: OperatorName::new("bench")?,
                role: Role::Admin,
            }
        } else {
            PeerIdentity::Agent {
                host_id: serin_proto::HostId::new(host)?,
            }
        };
        let cert = self
            .ca
            .issue(&Subject::Client(identity), Self::validity())
            .with_context(|| format!("issuing the certificate of {host}"))?;
        let material = TlsMaterial::from_pem(self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem)?;
        let transport = ClientTransport::Tls {
            config: client_config(&material)?,
            server_name: None,
        };
        self.issued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(host.to_owned(), transport.clone());
        Ok(transport)
    }
}

/// Makes channels to one coordinator, one per simulated host.
#[derive(Debug, Clone)]
pub struct Connector {
    url: String,
    transport: Transport,
}

impl Connector {
    /// A connector for the coordinator at `url` (`https://127.0.0.1:PORT`, or `http://` for
    /// [`Transport::Plaintext`]).
    pub fn new(url: impl Into<String>, transport: Transport) -> Self {
        Self {
            url: url.into(),
            transport,
        }
    }

    /// The URL dialled.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How channels are secured.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The real agent's keepalive period (`serin_agent::connection::KEEPALIVE_INTERVAL`): an
    /// agent that reads nothing from the coordinator pings it this often.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

    /// The real agent's channel settings: `TCP_NODELAY`, its maximum frame size, its HTTP/2
    /// keepalive pings (each one costs the coordinator a read and an answer, as a message does),
    /// bounded connect time, and otherwise tonic's defaults.
    fn tuned(endpoint: Endpoint) -> Endpoint {
        endpoint
            .tcp_nodelay(true)
            // serin_agent::connection::MAX_FRAME_SIZE
            .max_frame_size(256 * 1024)
            // serin_agent::connection::KEEPALIVE_INTERVAL and KEEPALIVE_TIMEOUT
            .http2_keep_alive_interval(Self::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_timeout(Duration::from_secs(10))
    }

    /// Connects a fresh channel for `host`, over its own connection.
    pub async fn channel(&self, host: &str) -> anyhow::Result<Channel> {
        let reach = || format!("cannot reach the coordinator at {}", self.url);
        match &self.transport {
            Transport::Plaintext => {
                let endpoint = Endpoint::from_shared(self.url.clone())
                    .with_context(|| format!("invalid coordinator URL {}", self.url))?;
                Self::tuned(endpoint).connect().await.with_context(reach)
            }
            Transport::MutualTls(pki) => {
                let client = pki.client(host)?;
                let (endpoint, connector) =
                    serin_security::transport::endpoint(&self.url, &client)?;
                Self::tuned(endpoint)
                    .connect_with_connector(connector)
                    .await
                    .with_context(reach)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_get_their_own_agent_identity_and_the_operator_an_admin_one() {
        let dir = tempfile::tempdir().unwrap();
        let pki = BenchPki::create(dir.path()).unwrap();
        let again = BenchPki::load(dir.path()).unwrap();
        for (p, host) in [(&pki, "sim-000001"), (&again, OPERATOR)] {
            let ClientTransport::Tls { config, .. } = p.client(host).unwrap() else {
                panic!("a TLS transport");
            };
            assert!(config.client_auth_cert_resolver.has_certs());
        }
        assert!(pki.client("not a host id").is_err());
    }
}
