//! Certificate renewal: agent certificates are short-lived (`[enrolment] agent_cert_lifetime`
//! on the coordinator, a few days by default) and the agent renews its own well before expiry.
//!
//! At two thirds of the certificate's validity window ([`serin_security::pki::renewal_time`]),
//! the agent sends `RenewService.Renew` over its authenticated channel (its current certificate)
//! with a certificate request over **the key it already has** (the enrolled key: the coordinator
//! refuses another one). The new certificate is checked against the key and the host id, written
//! over the old one atomically (tmp, fsync, rename, fsync dir), and presented from the next
//! handshake on ([`serin_security::tls::ReloadableClientCert`]): the open stream is not
//! interrupted, and every reconnection uses the new certificate. A failed attempt is retried
//! with a back-off bounded by the time left. A coordinator without renewal (`Unimplemented`) is
//! logged once; the agent keeps its certificate until it expires.

use std::time::{Duration, SystemTime};

use serin_proto::HostId;
use serin_proto::wire;
use serin_proto::wire::renew_service_client::RenewServiceClient;
use serin_security::pki;
use serin_security::tls::{TlsMaterial, agent_client_config};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::connection::ReloadableCert;

/// Shortest wait between two failed attempts.
const MIN_RETRY: Duration = Duration::from_millis(500);
/// Longest wait between two failed attempts.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Renews `cert` until `shutdown`.
pub async fn run(
    cert: ReloadableCert,
    host_id: HostId,
    channel: Channel,
    shutdown: CancellationToken,
) {
    let mut client = RenewServiceClient::new(channel);
    let mut retry = MIN_RETRY;
    loop {
        let due = match due(&cert) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(cert = %cert.files.cert.display(), error = %e, "cannot read the certificate to renew it");
                return;
            }
        };
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match renew_once(&cert, &host_id, &mut client).await {
            Ok(not_after) => {
                retry = MIN_RETRY;
                tracing::info!(host = %host_id, not_after = %humantime::format_rfc3339_seconds(not_after), "certificate renewed");
            }
            Err(RenewError::Unsupported) => {
                tracing::warn!(host = %host_id, "the coordinator offers no certificate renewal; keeping this certificate until it expires");
                return;
            }
            Err(RenewError::Failed(e)) => {
                tracing::warn!(host = %host_id, error = %e, retry_in = ?retry, "certificate renewal failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// When the certificate on disk is due for renewal.
fn due(cert: &ReloadableCert) -> Result<SystemTime, String> {
    let pem = std::fs::read_to_string(&cert.files.cert).map_err(|e| e.to_string())?;
    let (not_before, not_after) = pki::certificate_validity(&pem)?;
    Ok(pki::renewal_time(not_before, not_after))
}

enum RenewError {
    Unsupported,
    Failed(String),
}

async fn renew_once(
    cert: &ReloadableCert,
    host_id: &HostId,
    client: &mut RenewServiceClient<Channel>,
) -> Result<SystemTime, RenewError> {
    let failed = |e: String| RenewError::Failed(e);
    let key_pem = std::fs::read_to_string(&cert.files.key)
        .map_err(|e| failed(format!("{}: {e}", cert.files.key.display())))?;
    let csr_pem =
        pki::agent_request_for_key(host_id, &key_pem).map_err(|e| failed(e.to_string()))?;
    let resp = match client.renew(wire::RenewRequest { csr_pem }).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::Unimplemented => return Err(RenewError::Unsupported),
        Err(s) => return Err(failed(format!("{:?}: {}", s.code(), s.message()))),
    };
    let ca_pem = std::fs::read_to_string(&cert.files.ca)
        .map_err(|e| failed(format!("{}: {e}", cert.files.ca.display())))?;
    // The new certificate must load with our key and carry our host id before it replaces
    // the one that works.
    let material = TlsMaterial::from_pem(&ca_pem, &resp.certificate_pem, &key_pem)
        .map_err(|e| failed(format!("the renewed certificate: {e}")))?;
    agent_client_config(&material, host_id)
        .map_err(|e| failed(format!("the renewed certificate: {e}")))?;
    let (_, not_after) =
        pki::certificate_validity(&resp.certificate_pem).map_err(|e| failed(e.to_string()))?;
    crate::durable::write_atomic(&cert.files.cert, resp.certificate_pem.as_bytes())
        .map_err(|e| failed(format!("{}: {e}", cert.files.cert.display())))?;
    cert.resolver
        .replace(&material)
        .map_err(|e| failed(e.to_string()))?;
    Ok(not_after)
}
