//! The harness's throwaway PKI: every coordinator, agent and CLI a test starts talks mutual TLS
//! with certificates from here, so every test exercises the one code path users run.
//!
//! One CA per test process ([`pki`]), made on first use in `$TMPDIR/serin-test-pki-<pid>`
//! (directories of test processes that are gone are removed then). Certificates are issued on
//! demand with the same [`serin_security::pki::Ca`] code `serin ca issue` uses: a coordinator
//! certificate per coordinator address, one per agent host id, one per operator name and role.
//! Tests of refusals issue their own odd certificates ([`TestPki::issue`]: expired, not yet valid)
//! or make another CA ([`TestPki::other_ca`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serin_security::pki::{Ca, IdentityFiles, Subject, Validity, write_identity};
use serin_security::tls::{TlsFiles, TlsMaterial};
use serin_security::transport::ClientTransport;
use serin_security::{OperatorName, PeerIdentity, Role};

/// Lifetime of the harness's certificates.
const LIFETIME: Duration = Duration::from_secs(86_400);

/// The name of the operator the harness's CLI and gRPC clients use (role admin).
pub const HARNESS_OPERATOR: &str = "harness";

/// A CA in a directory of its own, issuing certificates on demand.
pub struct TestPki {
    dir: PathBuf,
    ca: Ca,
    issued: Mutex<HashMap<String, TlsFiles>>,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").field("dir", &self.dir).finish()
    }
}

/// This test process's PKI.
pub fn pki() -> &'static TestPki {
    static PKI: OnceLock<TestPki> = OnceLock::new();
    PKI.get_or_init(|| {
        let base = std::env::temp_dir();
        remove_stale(&base);
        let dir = base.join(format!("serin-test-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TestPki::create(&dir, "serin test CA").expect("creating the test PKI")
    })
}

/// Removes the PKI directories of test processes that no longer run.
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("serin-test-pki-")
            && pid.parse::<u32>().is_ok()
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl TestPki {
    /// A new CA in `dir` (created).
    pub fn create(dir: &Path, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ca::init(dir, name, Validity::starting(SystemTime::now(), LIFETIME))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ca: Ca::load(dir)?,
            issued: Mutex::default(),
        })
    }

    /// Another CA in a subdirectory, unknown to everything this PKI configures.
    pub fn other_ca(&self, name: &str) -> TestPki {
        TestPki::create(&self.dir.join(format!("other-{name}")), "another CA")
            .expect("creating another CA")
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(serin_security::pki::CA_CERT_FILE)
    }

    /// Issues a certificate for `subject` valid over `validity`, stored as `<stem>.crt/.key`
    /// (a stem already issued returns the files issued then).
    pub fn issue(&self, stem: &str, subject: &Subject, validity: Validity) -> TlsFiles {
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = issued.get(stem) {
            return f.clone();
        }
        let cert = self
            .ca
            .issue(subject, validity)
            .unwrap_or_else(|e| panic!("issuing {stem}: {e}"));
        let files = IdentityFiles::in_dir(&self.dir, stem);
        write_identity(&files, &cert).unwrap_or_else(|e| panic!("writing {stem}: {e}"));
        let tls = TlsFiles {
            ca: self.ca(),
            cert: files.cert,
            key: files.key,
        };
        issued.insert(stem.to_owned(), tls.clone());
        tls
    }

    fn valid_now() -> Validity {
        Validity::starting(SystemTime::now(), LIFETIME)
    }

    /// The coordinator's certificate for `ip` (and `localhost`).
    pub fn coordinator(&self, ip: IpAddr) -> TlsFiles {
        self.issue(
            &format!("coordinator-{ip}"),
            &Subject::Coordinator {
                dns_names: vec!["localhost".into()],
                ips: vec![ip],
            },
            Self::valid_now(),
        )
    }

    /// The agent certificate of `host_id`.
    pub fn agent(&self, host_id: &str) -> TlsFiles {
        let host_id = serin_proto::HostId::new(host_id).expect("a valid host id");
        self.issue(
            &format!("agent-{host_id}"),
            &Subject::Client(PeerIdentity::Agent { host_id }),
            Self::valid_now(),
        )
    }

    /// The certificate of operator `name` with `role`.
    pub fn operator(&self, name: &str, role: Role) -> TlsFiles {
        let name = OperatorName::new(name).expect("a valid operator name");
        self.issue(
            &format!("operator-{name}-{role}"),
            &Subject::Client(PeerIdentity::Operator { name, role }),
            Self::valid_now(),
        )
    }

    /// The harness's own operator (admin), used by `Fleet::cli` and `Fleet::grpc`.
    pub fn harness_operator(&self) -> TlsFiles {
        self.operator(HARNESS_OPERATOR, Role::Admin)
    }

    /// An operator client transport over `files` (which may be deliberately wrong: the
    /// identity kind is not checked here, so tests can present an agent's certificate).
    pub fn client_transport(files: &TlsFiles) -> ClientTransport {
        let material = TlsMaterial::load(files).expect("loading TLS files");
        ClientTransport::Tls {
            config: serin_security::tls::client_config(&material).expect("a client config"),
            server_name: None,
        }
    }
}

/// The `[tls]` table for `files`.
pub fn tls_toml(files: &TlsFiles) -> String {
    format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        files.ca.display(),
        files.cert.display(),
        files.key.display()
    )
}

/// Connects a gRPC channel to `url` over `transport`.
pub async fn channel(
    url: &str,
    transport: &ClientTransport,
    connect_timeout: Duration,
) -> Result<tonic::transport::Channel, serin_security::transport::ConnectError> {
    serin_security::transport::connect(url, transport, connect_timeout).await
}
