//! `serin-agent enroll`: join a fleet with a one-time token.
//!
//! The key is generated here, on the host, and never leaves it: only a certificate request goes
//! to the coordinator's enrolment port, over TLS whose CA is pinned by the sha256 fingerprint the
//! operator copied from `serin ca fingerprint` (the CA itself arrives in the handshake and must
//! match). The issued certificate, the key (0600) and the CA are written where the agent
//! config's `[tls]` points, each created exclusively and fsync'd: an existing file is never
//! overwritten. A known host id presenting a new key is held by the coordinator until an admin
//! approves it; the command waits for that (polling with the pending id only it holds).

use std::path::Path;
use std::time::{Duration, Instant};

use serin_proto::HostId;
use serin_proto::wire;
use serin_proto::wire::enrol_service_client::EnrolServiceClient;
use serin_security::pki;
use serin_security::tls::TransportSecurity;
use serin_security::transport::{self, ClientTransport};

/// What `enroll` needs.
#[derive(Debug, Clone)]
pub struct EnrolOptions {
    /// The enrolment URL (`https://coordinator:7701`).
    pub url: String,
    /// The join token.
    pub token: String,
    /// The CA's sha256 fingerprint.
    pub ca_fingerprint: String,
    /// How long to wait for an approval when held.
    pub wait: Duration,
    /// How often to ask again while held.
    pub poll: Duration,
}

/// Why enrolment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// The agent config has no TLS files to write.
    #[error("the agent config has no [tls] ca, cert and key: enrolment writes them there")]
    NoTlsFiles,
    /// A file to write already exists.
    #[error("{} already exists: this host looks enrolled already (move it away to enrol again)", .0.display())]
    AlreadyEnrolled(std::path::PathBuf),
    /// The coordinator refused.
    #[error("the coordinator refused the enrolment: {0}")]
    Refused(String),
    /// Could not reach the enrolment port, or TLS failed (wrong fingerprint, wrong name).
    #[error("cannot reach the enrolment port: {0}")]
    Connect(String),
    /// Still held when the wait ran out.
    #[error(
        "the enrolment is still held for approval after {0:?} (run `serin hosts approve HOST`, then enroll again)"
    )]
    StillHeld(Duration),
    /// A local step failed.
    #[error("{0}")]
    Local(String),
}

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

/// Enrols `host_id` and writes the TLS files of `tls`. Returns the certificate's path.
pub async fn enroll(
    tls: &TransportSecurity,
    host_id: &HostId,
    opts: &EnrolOptions,
) -> Result<std::path::PathBuf, EnrolError> {
    let TransportSecurity::Tls(files) = tls else {
        return Err(EnrolError::NoTlsFiles);
    };
    for p in [&files.cert, &files.key] {
        if p.exists() {
            return Err(EnrolError::AlreadyEnrolled(p.clone()));
        }
    }
    let (key_pem, csr_pem) =
        pki::agent_key_and_request(host_id).map_err(|e| EnrolError::Local(e.to_string()))?;
    let config = serin_security::tls::enrolment_client_config(&opts.ca_fingerprint)
        .map_err(|e| EnrolError::Local(e.to_string()))?;
    let transport = ClientTransport::Tls {
        config,
        server_name: None,
    };
    let channel = transport::connect(&opts.url, &transport, Duration::from_secs(5))
        .await
        .map_err(|e| EnrolError::Connect(chain(&e)))?;
    let mut client = EnrolServiceClient::new(channel);
    let mut request = wire::EnrolRequest {
        host_id: host_id.to_string(),
        token: opts.token.clone(),
        csr_pem,
        pending_id: String::new(),
    };
    let started = Instant::now();
    let resp = loop {
        let resp = client
            .enrol(request.clone())
            .await
            .map_err(|s| EnrolError::Refused(s.message().to_string()))?
            .into_inner();
        if !resp.certificate_pem.is_empty() {
            break resp;
        }
        if resp.pending_id.is_empty() {
            return Err(EnrolError::Refused(
                "the coordinator answered with neither a certificate nor a pending id".into(),
            ));
        }
        if request.pending_id.is_empty() {
            tracing::warn!(host = %host_id, "{}", resp.message);
        }
        request.pending_id = resp.pending_id;
        request.token.clear();
        if started.elapsed() >= opts.wait {
            return Err(EnrolError::StillHeld(opts.wait));
        }
        tokio::time::sleep(opts.poll).await;
    };
    let fp = pki::certificate_fingerprint(&resp.ca_pem).map_err(EnrolError::Local)?;
    let pinned = opts
        .ca_fingerprint
        .trim()
        .to_ascii_lowercase()
        .trim_start_matches("sha256:")
        .replace(':', "");
    if fp != pinned {
        return Err(EnrolError::Refused(format!(
            "the CA the coordinator returned has fingerprint {fp}, not the pinned {pinned}"
        )));
    }
    write_files(
        &files.ca,
        &resp.ca_pem,
        &files.cert,
        &resp.certificate_pem,
        &files.key,
        &key_pem,
    )?;
    tracing::info!(host = %host_id, cert = %files.cert.display(), "enrolled");
    Ok(files.cert.clone())
}

fn write_files(
    ca: &Path,
    ca_pem: &str,
    cert: &Path,
    cert_pem: &str,
    key: &Path,
    key_pem: &str,
) -> Result<(), EnrolError> {
    let local = |e: pki::PkiError| EnrolError::Local(e.to_string());
    for p in [ca, cert, key] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| EnrolError::Local(format!("{}: {e}", dir.display())))?;
        }
    }
    if !ca.exists() {
        pki::write_new(ca, ca_pem.as_bytes(), 0o644).map_err(local)?;
    }
    pki::write_new(key, key_pem.as_bytes(), 0o600).map_err(local)?;
    if let Err(e) = pki::write_new(cert, cert_pem.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(key);
        return Err(local(e));
    }
    Ok(())
}
