//! The rustls configurations of every serin program, built in one place.
//!
//! - [`server_config`]: the coordinator. TLS 1.2/1.3 on ring, a client certificate is required and
//!   must chain to the configured serin CA, carry a serin client identity (agent or operator), be
//!   within its validity window, and pass the [`Revocation`] hook. Anything else fails the
//!   handshake, before a single gRPC byte is read. TLS 1.3 only, and no session resumption: every
//!   connection runs the whole verification again, so a revocation or an expiry takes effect at
//!   the next connection.
//! - [`agent_client_config`] / [`operator_client_config`]: the agent and the CLI. The CA is pinned
//!   (the system trust store is never consulted), the coordinator's name is verified by the
//!   connector in [`crate::transport`], and the client presents its own certificate.
//!
//! Each builder also checks that the certificate it is handed is the right kind (the coordinator
//! refuses to serve with an agent certificate; an agent refuses an operator certificate or one for
//! another host), so a misconfigured file is an error at start, not a mystery at the first call.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use serin_proto::HostId;

use crate::identity::{IdentityError, PeerIdentity};

/// ALPN protocol of gRPC.
const ALPN_H2: &[u8] = b"h2";

/// TLS 1.3 only: every peer is one of serin's own programs, so nothing needs an older version.
const PROTOCOLS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The ring crypto provider; serin never uses aws-lc.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where a program's TLS files are: the pinned CA, its own certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The serin CA certificate (PEM); the only trust anchor.
    pub ca: PathBuf,
    /// This program's certificate (PEM; a chain is allowed, leaf first).
    pub cert: PathBuf,
    /// This program's private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// The `[tls]` section of the coordinator's and the agent's config files, as written (every key
/// optional); [`TlsSection::validate`] turns it into a [`TransportSecurity`].
///
/// ```toml
/// [tls]
/// ca = "/etc/serin/pki/ca.crt"
/// cert = "/etc/serin/pki/coordinator.crt"
/// key = "/etc/serin/pki/coordinator.key"
/// # insecure_plaintext = true   # development only, instead of the three files
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct TlsSection {
    /// The serin CA certificate (or a bundle of CAs during a rotation).
    pub ca: Option<PathBuf>,
    /// This program's certificate.
    pub cert: Option<PathBuf>,
    /// This program's private key.
    pub key: Option<PathBuf>,
    /// Development only: no TLS at all. Conflicts with the three files; loudly logged by the
    /// programs.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

/// How a program secures its connections, validated from a [`TlsSection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportSecurity {
    /// Mutual TLS with these files.
    Tls(TlsFiles),
    /// Cleartext, for development; explicitly asked for.
    InsecurePlaintext,
}

impl TlsSection {
    /// Every problem, each naming its key (`tls.cert: …`): the three files together, or
    /// `insecure_plaintext = true` alone; nothing at all is an error too (TLS is not optional).
    pub fn validate(&self) -> Result<TransportSecurity, Vec<String>> {
        let set: Vec<&str> = [
            ("ca", self.ca.is_some()),
            ("cert", self.cert.is_some()),
            ("key", self.key.is_some()),
        ]
        .iter()
        .filter(|(_, present)| *present)
        .map(|(name, _)| *name)
        .collect();
        if self.insecure_plaintext {
            if set.is_empty() {
                return Ok(TransportSecurity::InsecurePlaintext);
            }
            return Err(vec![format!(
                "tls.insecure_plaintext: true conflicts with tls.{}; use either the files or plaintext",
                set.join(", tls.")
            )]);
        }
        match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => Ok(TransportSecurity::Tls(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            })),
            _ if set.is_empty() => Err(vec![
                "tls: no ca, cert and key configured (make them with `serin ca`), or set \
                 tls.insecure_plaintext = true for development only"
                    .to_string(),
            ]),
            _ => Err(["ca", "cert", "key"]
                .iter()
                .filter(|name| !set.contains(name))
                .map(|name| {
                    format!(
                        "tls.{name}: missing (tls.{} is set; the three files go together)",
                        set.join(" and tls.")
                    )
                })
                .collect()),
        }
    }
}

/// The parsed contents of [`TlsFiles`].
#[derive(Debug)]
pub struct TlsMaterial {
    /// Trust anchors: the serin CA.
    pub ca: Vec<CertificateDer<'static>>,
    /// Own certificate chain, leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// Own private key.
    pub key: PrivateKeyDer<'static>,
}

impl TlsMaterial {
    /// Reads and parses the three files, naming the file that is missing or malformed.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| TlsError::File {
                path: p.to_path_buf(),
                problem: e.to_string(),
            })
        };
        let bad = |p: &Path, problem: String| TlsError::File {
            path: p.to_path_buf(),
            problem,
        };
        let ca = parse_certs(&read(&files.ca)?).map_err(|e| bad(&files.ca, e))?;
        let cert_chain = parse_certs(&read(&files.cert)?).map_err(|e| bad(&files.cert, e))?;
        let key = parse_key(&read(&files.key)?).map_err(|e| bad(&files.key, e))?;
        Ok(Self {
            ca,
            cert_chain,
            key,
        })
    }

    /// Parses PEM text held in memory (tests, the demo).
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        let bad = |what: &str, problem: String| TlsError::File {
            path: PathBuf::from(format!("<{what}>")),
            problem,
        };
        Ok(Self {
            ca: parse_certs(ca.as_bytes()).map_err(|e| bad("ca", e))?,
            cert_chain: parse_certs(cert.as_bytes()).map_err(|e| bad("cert", e))?,
            key: parse_key(key.as_bytes()).map_err(|e| bad("key", e))?,
        })
    }

    /// The identity in this program's own certificate.
    pub fn own_identity(&self) -> Result<PeerIdentity, TlsError> {
        let leaf = self.cert_chain.first().ok_or(TlsError::NoCertificate)?;
        PeerIdentity::from_certificate(leaf).map_err(TlsError::OwnIdentity)
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &self.ca {
            roots
                .add(ca.clone())
                .map_err(|e| TlsError::Config(format!("the CA certificate is unusable: {e}")))?;
        }
        Ok(Arc::new(roots))
    }
}

/// Every certificate in PEM `bytes`; at least one.
pub fn parse_certs(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".to_string());
    }
    Ok(certs)
}

/// The first private key in PEM `bytes`.
pub fn parse_key(bytes: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| format!("no usable PEM private key: {e}"))
}

/// The revocation hook of the coordinator: consulted during every handshake, after the chain and
/// the validity window were verified. The coordinator fills it from its persisted revocations
/// (`serin hosts revoke`); [`NoRevocation`] revokes nothing.
pub trait Revocation: Send + Sync + std::fmt::Debug {
    /// `Err(reason)` when the certificate (its identity and serial number) is revoked.
    fn check(&self, identity: &PeerIdentity, serial: &[u8]) -> Result<(), String>;
}

/// A [`Revocation`] that revokes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRevocation;

impl Revocation for NoRevocation {
    fn check(&self, _: &PeerIdentity, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// A [`Revocation`] held in memory: certificates by serial number, and whole identities (every
/// certificate of a host or an operator). The coordinator fills it from its persisted
/// revocations at start and on every `revoke`; the next handshake sees the change.
#[derive(Debug, Default)]
pub struct RevokedSet {
    inner: std::sync::RwLock<Revoked>,
}

#[derive(Debug, Default)]
struct Revoked {
    identities: std::collections::HashSet<PeerIdentity>,
    serials: std::collections::HashSet<Vec<u8>>,
}

impl RevokedSet {
    /// Refuses every certificate carrying `identity` from now on.
    pub fn revoke_identity(&self, identity: PeerIdentity) {
        self.write().identities.insert(identity);
    }

    /// Refuses the certificate with this serial number from now on.
    pub fn revoke_serial(&self, serial: Vec<u8>) {
        self.write().serials.insert(serial);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Revoked> {
        // A panic while holding the lock cannot leave the sets half-updated (single inserts).
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Revocation for RevokedSet {
    fn check(&self, identity: &PeerIdentity, serial: &[u8]) -> Result<(), String> {
        let revoked = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if revoked.identities.contains(identity) {
            return Err(format!("{identity} is revoked"));
        }
        if revoked.serials.contains(serial) {
            return Err(format!(
                "certificate serial {} is revoked",
                hex::encode(serial)
            ));
        }
        Ok(())
    }
}

/// The coordinator's server configuration: mutual TLS, client certificates required, issued by
/// the CA in `material`, carrying an agent or operator identity, not revoked.
pub fn server_config(
    material: &TlsMaterial,
    revocation: Arc<dyn Revocation>,
) -> Result<Arc<ServerConfig>, TlsError> {
    match material.own_identity()? {
        PeerIdentity::Coordinator => {}
        other => {
            return Err(TlsError::WrongOwnIdentity {
                expected: "the coordinator (serin://coordinator)".to_string(),
                found: other,
            });
        }
    }
    let webpki = WebPkiClientVerifier::builder_with_provider(material.roots()?, provider())
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let verifier = Arc::new(IdentityVerifier {
        inner: webpki,
        revocation,
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOLS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.cert_chain.clone(), material.key.clone_key())
        .map_err(|e| TlsError::Config(format!("the coordinator certificate or key: {e}")))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No session resumption: a resumed session skips the client verifier, so a certificate
    // revoked (or expired) since the first handshake would still get in. Connections are
    // long-lived gRPC channels; a full handshake each time costs nothing that matters.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The enrolment port's server configuration: the coordinator's certificate, followed by the
/// CA certificates (so an enrolling agent, which has no CA yet, can pin the CA by its sha256
/// fingerprint), and **no client certificate** asked for: the one port that serves callers
/// without one (it serves `EnrolService` only). TLS 1.3, no session resumption.
pub fn enrolment_server_config(material: &TlsMaterial) -> Result<Arc<ServerConfig>, TlsError> {
    match material.own_identity()? {
        PeerIdentity::Coordinator => {}
        other => {
            return Err(TlsError::WrongOwnIdentity {
                expected: "the coordinator (serin://coordinator)".to_string(),
                found: other,
            });
        }
    }
    let mut chain = material.cert_chain.clone();
    chain.extend(material.ca.iter().cloned());
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOLS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, material.key.clone_key())
        .map_err(|e| TlsError::Config(format!("the coordinator certificate or key: {e}")))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The enrolling agent's client configuration: no client certificate, and the coordinator's
/// certificate must chain to a CA certificate **the server sent** whose sha256 (hex) is
/// `ca_fingerprint` (trust on first use, pinned by the fingerprint the operator copied from
/// `serin ca fingerprint`), and be valid for the name dialled.
pub fn enrolment_client_config(ca_fingerprint: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let trimmed = ca_fingerprint.trim().to_ascii_lowercase();
    let fingerprint = trimmed
        .strip_prefix("sha256:")
        .unwrap_or(&trimmed)
        .replace(':', "");
    if fingerprint.len() != 64 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TlsError::Config(format!(
            "the CA fingerprint {ca_fingerprint:?} is not a sha256 in hex (64 digits)"
        )));
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOLS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier { fingerprint }))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Verifies a server certificate against the CA, among the certificates the server sent, whose
/// sha256 is the pinned fingerprint.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest as _;
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(sha2::Sha256::digest(c.as_ref())) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the coordinator sent no CA certificate with the pinned fingerprint {}",
                    self.fingerprint
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("the pinned CA is unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The agent's client configuration: the serin CA pinned, presenting a certificate that must be
/// this host's (`serin://host/<host_id>`).
pub fn agent_client_config(
    material: &TlsMaterial,
    host_id: &HostId,
) -> Result<Arc<ClientConfig>, TlsError> {
    match material.own_identity()? {
        PeerIdentity::Agent { host_id: h } if &h == host_id => {}
        other => {
            return Err(TlsError::WrongOwnIdentity {
                expected: format!("this host's agent identity (serin://host/{host_id})"),
                found: other,
            });
        }
    }
    client_config(material)
}

/// The client certificate an agent presents, replaceable while the agent runs: a renewed
/// certificate is used from the next handshake on (see [`agent_client_config_reloadable`]).
#[derive(Debug)]
pub struct ReloadableClientCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ReloadableClientCert {
    fn certified(material: &TlsMaterial) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
        let key = provider()
            .key_provider
            .load_private_key(material.key.clone_key())
            .map_err(|e| TlsError::Config(format!("the client key: {e}")))?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            material.cert_chain.clone(),
            key,
        )))
    }

    /// Presents `material`'s certificate and key from the next handshake on.
    pub fn replace(&self, material: &TlsMaterial) -> Result<(), TlsError> {
        let certified = Self::certified(material)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = certified;
        Ok(())
    }
}

impl rustls::client::ResolvesClientCert for ReloadableClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// [`agent_client_config`] whose certificate can be replaced (after a renewal) without
/// rebuilding the connection's configuration.
pub fn agent_client_config_reloadable(
    material: &TlsMaterial,
    host_id: &HostId,
) -> Result<(Arc<ClientConfig>, Arc<ReloadableClientCert>), TlsError> {
    agent_client_config(material, host_id)?;
    let resolver = Arc::new(ReloadableClientCert {
        current: std::sync::RwLock::new(ReloadableClientCert::certified(material)?),
    });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOLS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(material.roots()?)
        .with_client_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((Arc::new(config), resolver))
}

/// The operator CLI's client configuration: the serin CA pinned, presenting an operator
/// certificate.
pub fn operator_client_config(material: &TlsMaterial) -> Result<Arc<ClientConfig>, TlsError> {
    match material.own_identity()? {
        PeerIdentity::Operator { .. } => {}
        other => {
            return Err(TlsError::WrongOwnIdentity {
                expected: "an operator identity (serin://operator/<role>/<name>)".to_string(),
                found: other,
            });
        }
    }
    client_config(material)
}

/// The coordinator's client configuration for calling its own listener (the systemd readiness
/// and watchdog self-probe): it presents the coordinator's own certificate, which the policy
/// lets make read calls only. Returns the name to verify: the first DNS name or address of the
/// certificate, whatever address the probe dials.
pub fn coordinator_self_client_config(
    material: &TlsMaterial,
) -> Result<(Arc<ClientConfig>, String), TlsError> {
    let leaf = material.cert_chain.first().ok_or(TlsError::NoCertificate)?;
    match material.own_identity()? {
        PeerIdentity::Coordinator => {}
        other => {
            return Err(TlsError::WrongOwnIdentity {
                expected: "the coordinator (serin://coordinator)".to_string(),
                found: other,
            });
        }
    }
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| TlsError::Config(format!("the coordinator certificate: {e}")))?;
    let name = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => Some(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
                    16 => <[u8; 16]>::try_from(*b)
                        .ok()
                        .map(|a| std::net::Ipv6Addr::from(a).to_string()),
                    _ => None,
                },
                _ => None,
            })
        })
        .ok_or_else(|| {
            TlsError::Config("the coordinator certificate names no DNS name or address".into())
        })?;
    Ok((client_config(material)?, name))
}

/// A client configuration trusting only the CA in `material` and presenting its certificate.
/// Public for tests that need to present a deliberately wrong certificate; programs use
/// [`agent_client_config`] or [`operator_client_config`].
pub fn client_config(material: &TlsMaterial) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOLS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(material.roots()?)
        .with_client_auth_cert(material.cert_chain.clone(), material.key.clone_key())
        .map_err(|e| TlsError::Config(format!("the client certificate or key: {e}")))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration that trusts the CA in `ca_pem` and presents no certificate: only for
/// tests proving the server refuses it.
pub fn anonymous_client_config(
    ca: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots
            .add(c.clone())
            .map_err(|e| TlsError::Config(e.to_string()))?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOLS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// WebPKI client verification, then the serin identity and the revocation hook.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocation: Arc<dyn Revocation>,
}

impl ClientCertVerifier for IdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let other = |msg: String| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(RefusedIdentity(msg)),
            )))
        };
        let identity =
            PeerIdentity::from_certificate(end_entity).map_err(|e| other(e.to_string()))?;
        // The coordinator's own certificate is accepted as a client for its self-probe; the
        // policy (`transport::authorize`) lets it make read calls only.
        let serial = certificate_serial(end_entity).unwrap_or_default();
        if let Err(reason) = self.revocation.check(&identity, &serial) {
            tracing::warn!(peer = %identity, %reason, "revoked certificate refused");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The reason an otherwise valid certificate was refused, carried inside a rustls error.
#[derive(Debug)]
struct RefusedIdentity(String);

impl std::fmt::Display for RefusedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedIdentity {}

/// The raw serial number of a DER certificate.
pub fn certificate_serial(der: &[u8]) -> Option<Vec<u8>> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.raw_serial().to_vec())
}

/// Why a TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable or not what it should be.
    #[error("{}: {problem}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The certificate file holds no certificate.
    #[error("no certificate given")]
    NoCertificate,
    /// The program's own certificate carries no usable identity.
    #[error("own certificate: {0}")]
    OwnIdentity(IdentityError),
    /// The program's own certificate is of the wrong kind.
    #[error("own certificate is {found}, expected {expected}")]
    WrongOwnIdentity {
        /// What the program needs.
        expected: String,
        /// What the certificate carries.
        found: PeerIdentity,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Config(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml_text: &str) -> TlsSection {
        #[derive(serde::Deserialize)]
        struct File {
            tls: TlsSection,
        }
        toml::from_str::<File>(toml_text).unwrap().tls
    }

    #[test]
    fn the_tls_section_needs_all_three_files_or_explicit_plaintext() {
        let full = section("[tls]\nca = \"/p/ca.crt\"\ncert = \"/p/c.crt\"\nkey = \"/p/c.key\"\n");
        assert_eq!(
            full.validate(),
            Ok(TransportSecurity::Tls(TlsFiles {
                ca: "/p/ca.crt".into(),
                cert: "/p/c.crt".into(),
                key: "/p/c.key".into(),
            }))
        );
        assert_eq!(
            section("[tls]\ninsecure_plaintext = true\n").validate(),
            Ok(TransportSecurity::InsecurePlaintext)
        );
        let none = TlsSection::default().validate().unwrap_err();
        assert!(
            none[0].contains("insecure_plaintext = true for development only"),
            "{none:?}"
        );
        let half = section("[tls]\ncert = \"/c\"\n").validate().unwrap_err();
        assert_eq!(
            half,
            vec![
                "tls.ca: missing (tls.cert is set; the three files go together)".to_string(),
                "tls.key: missing (tls.cert is set; the three files go together)".to_string(),
            ]
        );
        let both = section("[tls]\nca = \"/ca\"\ninsecure_plaintext = true\n")
            .validate()
            .unwrap_err();
        assert!(
            both[0].starts_with("tls.insecure_plaintext: true conflicts with tls.ca"),
            "{both:?}"
        );
    }
}
