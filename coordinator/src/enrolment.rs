//! Enrolment for real fleets: one-time join tokens, the key each host enrolled with, enrolments
//! held for approval, and certificate renewal.
//!
//! - `serin token create` ([`EnrolAdmin`], admin, audited) makes a random token; the store keeps
//!   only its sha256 (`token/<sha256>`), the host id it is bound to (if any), its expiry and
//!   whether it was used.
//! - `serin-agent enroll` calls [`Enroller`] (`EnrolService.Enrol`) on the enrolment port, the one
//!   call serin accepts without a client certificate (server-authenticated TLS, the agent pins the
//!   CA by fingerprint), rate-limited. The certificate request is verified first, then the token
//!   is consumed in one store transaction (single use even under concurrent calls; an expired,
//!   used, unknown or other-host token is refused and nothing is issued).
//! - The store remembers the key each host enrolled with (`key/<host>`). A host id already known
//!   with another key is **held** (`pending/<host>`), never silently accepted: the agent gets a
//!   pending id (a secret only it holds; the store keeps its sha256) and asks again until an
//!   admin runs `serin hosts approve HOST` (audited). A revoked host id cannot enrol.
//! - `RenewService.Renew` (agents, main port, mTLS): a new certificate for the key the host
//!   enrolled with, for another lifetime; a revoked host never reaches it (refused at the
//!   handshake) and is refused here too.
//!
//! The issuing key: the coordinator holds the CA key configured in `[enrolment] ca_key` (see
//! SECURITY.md for the trade-off). Time is read at the gRPC edge and passed into the decisions.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serin_proto::HostId;
use serin_proto::wire;
use serin_security::PeerIdentity;
use serin_security::pki::{Ca, Subject, Validity};
use serin_security::tls::{Revocation as _, RevokedSet};
use tonic::{Request, Response, Status};

use crate::store::{AuditRecord, EnrolmentWrite, Store, StoreError};

/// Largest certificate request accepted (a P-256 request is under 1 KiB).
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Enrolment calls accepted per second on the enrolment port, all peers together.
pub const ENROL_CALLS_PER_SECOND: u32 = 20;
/// Longest token lifetime `CreateToken` accepts.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 86_400);

/// A join token as stored (under `token/<sha256 of the token>`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    /// The only host id that may use it; `None`: any.
    pub host_id: Option<String>,
    /// Refused from this instant on.
    pub expires_unix_ms: u64,
    /// Who made it.
    pub created_by: String,
    /// When it was used; a used token is refused.
    pub used_unix_ms: Option<u64>,
}

/// The key a host enrolled with (under `key/<host>`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRecord {
    /// sha256 (hex) of the public key.
    pub key_sha256: String,
    /// When it was recorded.
    pub at_unix_ms: u64,
}

/// An enrolment held for approval (under `pending/<host>`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingRecord {
    /// sha256 (hex) of the pending id handed to the enrolling agent.
    pub pending_id_sha256: String,
    /// The certificate request (PEM), issued once approved.
    pub csr_pem: String,
    /// sha256 of the new key.
    pub key_sha256: String,
    /// sha256 of the key the host enrolled with before.
    pub known_key_sha256: String,
    /// When it was held.
    pub requested_unix_ms: u64,
    /// Who approved it, once approved.
    pub approved_by: Option<String>,
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn random_secret() -> Result<String, Status> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Status::internal("the system random number generator failed"))?;
    Ok(hex::encode(bytes))
}

fn store_status(what: &str) -> impl Fn(StoreError) -> Status + '_ {
    move |e| Status::unavailable(format!("cannot {what}: {e}"))
}

/// Why a join token is refused, decided from its record and the time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// No token with this hash.
    #[error("unknown join token (make one with `serin token create`)")]
    Unknown,
    /// Used before.
    #[error("this join token was already used (tokens are single-use; make a new one)")]
    Used,
    /// Past its expiry.
    #[error("this join token expired {0} ms ago (make a new one)")]
    Expired(u64),
    /// Bound to another host id.
    #[error("this join token is for host {bound}, not {asked}")]
    OtherHost {
        /// The host id it is bound to.
        bound: String,
        /// The host id asked for.
        asked: String,
    },
}

impl TokenRecord {
    /// Whether `host` may use this token at `now_ms`.
    pub fn check(&self, host: &HostId, now_ms: u64) -> Result<(), TokenRefusal> {
        if self.used_unix_ms.is_some() {
            return Err(TokenRefusal::Used);
        }
        if now_ms >= self.expires_unix_ms {
            return Err(TokenRefusal::Expired(now_ms - self.expires_unix_ms));
        }
        match &self.host_id {
            Some(bound) if bound != host.as_str() => Err(TokenRefusal::OtherHost {
                bound: bound.clone(),
                asked: host.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

/// What the enrolment services share: the store, the issuing CA and the revoked hosts.
pub struct Enrolment {
    store: Arc<dyn Store>,
    ca: Ca,
    lifetime: Duration,
    revoked: Arc<RevokedSet>,
    window: Mutex<(Instant, u32)>,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolment")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Enrolment {
    /// Enrolment issuing from `ca`, agent certificates valid for `lifetime`.
    pub fn new(
        store: Arc<dyn Store>,
        ca: Ca,
        lifetime: Duration,
        revoked: Arc<RevokedSet>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            ca,
            lifetime,
            revoked,
            window: Mutex::new((Instant::now(), 0)),
        })
    }

    fn is_revoked(&self, host: &HostId) -> bool {
        self.revoked
            .check(
                &PeerIdentity::Agent {
                    host_id: host.clone(),
                },
                &[],
            )
            .is_err()
    }

    /// At most [`ENROL_CALLS_PER_SECOND`] calls per second.
    fn admit(&self, now: Instant) -> Result<(), Status> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(w.0) >= Duration::from_secs(1) {
            *w = (now, 0);
        }
        if w.1 >= ENROL_CALLS_PER_SECOND {
            return Err(Status::resource_exhausted(
                "too many enrolment calls; try again in a second",
            ));
        }
        w.1 += 1;
        Ok(())
    }

    fn issue(
        &self,
        host: &HostId,
        csr_pem: &str,
        now: SystemTime,
    ) -> Result<(String, String), Status> {
        let subject = Subject::Client(PeerIdentity::Agent {
            host_id: host.clone(),
        });
        self.ca
            .issue_for_request(&subject, csr_pem, Validity::short_lived(now, self.lifetime))
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
        what: &'static str,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(store_status(what))
    }

    async fn audit(
        &self,
        who: String,
        what: &str,
        arguments: String,
        result: &Result<impl Sized, Status>,
    ) {
        let rec = AuditRecord {
            at_unix_ms: unix_ms(SystemTime::now()),
            who,
            what: what.to_string(),
            arguments,
            result: match result {
                Ok(_) => "ok".to_string(),
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
            },
        };
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.append_audit(&rec).map(|_| rec)).await {
            Ok(Ok(rec)) => {
                tracing::info!(who = %rec.who, what = %rec.what, arguments = %rec.arguments, result = %rec.result, "audit")
            }
            Ok(Err(e)) => tracing::error!(error = %e, what, "cannot write the audit log"),
            Err(e) => tracing::error!(error = %e, what, "cannot write the audit log"),
        }
    }

    /// `Enrol`, the decision and its effects (see the module docs).
    async fn enrol(
        &self,
        r: wire::EnrolRequest,
        now: SystemTime,
    ) -> Result<wire::EnrolResponse, Status> {
        let host = HostId::new(&r.host_id)
            .map_err(|e| Status::invalid_argument(format!("host_id: {e}")))?;
        if r.csr_pem.is_empty() || r.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(format!(
                "csr_pem: a certificate request of 1 to {MAX_CSR_BYTES} bytes is required"
            )));
        }
        if self.is_revoked(&host) {
            return Err(Status::permission_denied(format!(
                "host {host} is revoked and cannot enrol"
            )));
        }
        let now_ms = unix_ms(now);
        // The request's signature is checked (and the certificate made) before the token is
        // spent: a malformed request does not burn it.
        let (cert_pem, key_sha256) = self.issue(&host, &r.csr_pem, now)?;
        if !r.pending_id.is_empty() {
            return self.collect_pending(&host, &r, cert_pem, key_sha256).await;
        }
        if r.token.is_empty() || r.token.len() > 256 {
            return Err(Status::invalid_argument("token: a join token is required"));
        }
        let key = format!("token/{}", sha256_hex(&r.token));
        let h = host.clone();
        let verdict = self
            .blocking(
                move |store| {
                    let mut verdict = Err(TokenRefusal::Unknown);
                    store.enrolment_update(&key, &mut |current| {
                        let Some(mut rec) =
                            current.and_then(|v| serde_json::from_slice::<TokenRecord>(&v).ok())
                        else {
                            verdict = Err(TokenRefusal::Unknown);
                            return EnrolmentWrite::Keep;
                        };
                        verdict = rec.check(&h, now_ms);
                        if verdict.is_err() {
                            return EnrolmentWrite::Keep;
                        }
                        rec.used_unix_ms = Some(now_ms);
                        match serde_json::to_vec(&rec) {
                            Ok(v) => EnrolmentWrite::Put(v),
                            Err(_) => EnrolmentWrite::Keep,
                        }
                    })?;
                    Ok(verdict)
                },
                "consume the join token",
            )
            .await?;
        if let Err(refusal) = verdict {
            tracing::warn!(host = %host, %refusal, "enrolment refused");
            return Err(Status::permission_denied(refusal.to_string()));
        }
        // The token is spent. A host id known with another key is held.
        let key_entry = format!("key/{host}");
        let new_key = key_sha256.clone();
        let known = self
            .blocking(
                move |store| {
                    let mut known = None;
                    store.enrolment_update(&key_entry, &mut |current| match current
                        .and_then(|v| serde_json::from_slice::<KeyRecord>(&v).ok())
                    {
                        Some(k) if k.key_sha256 != new_key => {
                            known = Some(k.key_sha256);
                            EnrolmentWrite::Keep
                        }
                        Some(_) => EnrolmentWrite::Keep,
                        None => serde_json::to_vec(&KeyRecord {
                            key_sha256: new_key.clone(),
                            at_unix_ms: now_ms,
                        })
                        .map_or(EnrolmentWrite::Keep, EnrolmentWrite::Put),
                    })?;
                    Ok(known)
                },
                "record the host's key",
            )
            .await?;
        let Some(known_key_sha256) = known else {
            tracing::info!(host = %host, key = %key_sha256, "agent enrolled");
            return Ok(wire::EnrolResponse {
                certificate_pem: cert_pem,
                ca_pem: self.ca.cert_pem().to_string(),
                ..Default::default()
            });
        };
        let pending_id = random_secret()?;
        let rec = PendingRecord {
            pending_id_sha256: sha256_hex(&pending_id),
            csr_pem: r.csr_pem.clone(),
            key_sha256: key_sha256.clone(),
            known_key_sha256: known_key_sha256.clone(),
            requested_unix_ms: now_ms,
            approved_by: None,
        };
        let blob = serde_json::to_vec(&rec).map_err(|e| Status::internal(e.to_string()))?;
        let pending_key = format!("pending/{host}");
        self.blocking(
            move |store| {
                store.enrolment_update(&pending_key, &mut |_| EnrolmentWrite::Put(blob.clone()))
            },
            "hold the enrolment",
        )
        .await?;
        tracing::warn!(host = %host, key = %key_sha256, known_key = %known_key_sha256, "a known host id presented a new key: enrolment held for approval");
        Ok(wire::EnrolResponse {
            pending_id,
            ca_pem: self.ca.cert_pem().to_string(),
            message: format!(
                "host {host} is already enrolled with another key; held for approval \
                 (an admin runs `serin hosts approve {host}`)"
            ),
            ..Default::default()
        })
    }

    /// A held enrolment asked again: the certificate once approved, else still held.
    async fn collect_pending(
        &self,
        host: &HostId,
        r: &wire::EnrolRequest,
        cert_pem: String,
        key_sha256: String,
    ) -> Result<wire::EnrolResponse, Status> {
        let pending_key = format!("pending/{host}");
        let id_hash = sha256_hex(&r.pending_id);
        let now_ms = unix_ms(SystemTime::now());
        let k = key_sha256.clone();
        let outcome = self
            .blocking(
                move |store| {
                    let mut outcome: Result<bool, String> =
                        Err("no enrolment of this host is held".to_string());
                    let mut approved = false;
                    store.enrolment_update(&pending_key, &mut |current| {
                        let Some(rec) =
                            current.and_then(|v| serde_json::from_slice::<PendingRecord>(&v).ok())
                        else {
                            return EnrolmentWrite::Keep;
                        };
                        if rec.pending_id_sha256 != id_hash || rec.key_sha256 != k {
                            outcome = Err(
                                "the pending id or the key does not match the held enrolment"
                                    .into(),
                            );
                            return EnrolmentWrite::Keep;
                        }
                        approved = rec.approved_by.is_some();
                        outcome = Ok(approved);
                        if approved {
                            EnrolmentWrite::Delete
                        } else {
                            EnrolmentWrite::Keep
                        }
                    })?;
                    if approved {
                        let blob = serde_json::to_vec(&KeyRecord {
                            key_sha256: k.clone(),
                            at_unix_ms: now_ms,
                        })
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                        store.enrolment_update(
                            &format!("key/{}", rec_host(&pending_key)),
                            &mut |_| EnrolmentWrite::Put(blob.clone()),
                        )?;
                    }
                    Ok(outcome)
                },
                "read the held enrolment",
            )
            .await?;
        match outcome {
            Err(problem) => Err(Status::permission_denied(problem)),
            Ok(false) => Ok(wire::EnrolResponse {
                pending_id: r.pending_id.clone(),
                ca_pem: self.ca.cert_pem().to_string(),
                message: format!("still held for approval (`serin hosts approve {host}`)"),
                ..Default::default()
            }),
            Ok(true) => {
                tracing::info!(host = %host, key = %key_sha256, "held enrolment approved and collected");
                Ok(wire::EnrolResponse {
                    certificate_pem: cert_pem,
                    ca_pem: self.ca.cert_pem().to_string(),
                    ..Default::default()
                })
            }
        }
    }
}

fn rec_host(pending_key: &str) -> &str {
    pending_key.strip_prefix("pending/").unwrap_or(pending_key)
}

/// `EnrolService`, served on the enrolment port.
#[derive(Debug, Clone)]
pub struct Enroller(pub Arc<Enrolment>);

#[tonic::async_trait]
impl wire::enrol_service_server::EnrolService for Enroller {
    async fn enrol(
        &self,
        request: Request<wire::EnrolRequest>,
    ) -> Result<Response<wire::EnrolResponse>, Status> {
        self.0.admit(Instant::now())?;
        let peer = request.remote_addr();
        let r = request.into_inner();
        let host = r.host_id.clone();
        let result = self.0.enrol(r, SystemTime::now()).await;
        if let Err(s) = &result {
            tracing::warn!(?peer, host = %host, error = %s.message(), "enrolment refused");
        }
        result.map(Response::new)
    }
}

/// `EnrolAdminService` (admin; tokens and approval audited), served on the main port.
#[derive(Debug, Clone)]
pub struct EnrolAdmin(pub Arc<Enrolment>);

#[tonic::async_trait]
impl wire::enrol_admin_service_server::EnrolAdminService for EnrolAdmin {
    async fn create_token(
        &self,
        request: Request<wire::CreateTokenRequest>,
    ) -> Result<Response<wire::CreateTokenResponse>, Status> {
        let who = crate::audit::who(&request);
        let r = request.into_inner();
        let args = format!("host={:?} expires_in_secs={}", r.host_id, r.expires_in_secs);
        let result = self.create(&who, r).await;
        // The token itself never reaches the audit log.
        self.0.audit(who, "CreateToken", args, &result).await;
        result.map(Response::new)
    }

    async fn list_pending(
        &self,
        _request: Request<wire::ListPendingRequest>,
    ) -> Result<Response<wire::ListPendingResponse>, Status> {
        let entries = self
            .0
            .blocking(
                |s| s.enrolment_entries("pending/"),
                "read the held enrolments",
            )
            .await?;
        let hosts = entries
            .into_iter()
            .filter_map(|(k, v)| {
                let rec: PendingRecord = serde_json::from_slice(&v).ok()?;
                Some(wire::PendingHost {
                    host_id: rec_host(&k).to_string(),
                    key_sha256: rec.key_sha256,
                    known_key_sha256: rec.known_key_sha256,
                    requested_unix_ms: rec.requested_unix_ms,
                    approved: rec.approved_by.is_some(),
                })
            })
            .collect();
        Ok(Response::new(wire::ListPendingResponse { hosts }))
    }

    async fn approve_host(
        &self,
        request: Request<wire::ApproveHostRequest>,
    ) -> Result<Response<wire::ApproveHostResponse>, Status> {
        let who = crate::audit::who(&request);
        let r = request.into_inner();
        let args = format!("host={}", r.host_id);
        let result = self.approve(&who, r).await;
        self.0.audit(who, "ApproveHost", args, &result).await;
        result.map(Response::new)
    }
}

impl EnrolAdmin {
    async fn create(
        &self,
        who: &str,
        r: wire::CreateTokenRequest,
    ) -> Result<wire::CreateTokenResponse, Status> {
        let host_id = if r.host_id.is_empty() {
            None
        } else {
            Some(
                HostId::new(&r.host_id)
                    .map_err(|e| Status::invalid_argument(format!("host_id: {e}")))?
                    .to_string(),
            )
        };
        let lifetime = Duration::from_secs(r.expires_in_secs);
        if lifetime.is_zero() || lifetime > MAX_TOKEN_LIFETIME {
            return Err(Status::invalid_argument(format!(
                "expires_in_secs: {} is not between 1 s and {} days",
                r.expires_in_secs,
                MAX_TOKEN_LIFETIME.as_secs() / 86_400
            )));
        }
        let token = random_secret()?;
        let expires_unix_ms = unix_ms(SystemTime::now() + lifetime);
        let blob = serde_json::to_vec(&TokenRecord {
            host_id: host_id.clone(),
            expires_unix_ms,
            created_by: who.to_string(),
            used_unix_ms: None,
        })
        .map_err(|e| Status::internal(e.to_string()))?;
        let key = format!("token/{}", sha256_hex(&token));
        self.0
            .blocking(
                move |s| s.enrolment_update(&key, &mut |_| EnrolmentWrite::Put(blob.clone())),
                "store the join token",
            )
            .await?;
        Ok(wire::CreateTokenResponse {
            token,
            expires_unix_ms,
            host_id: host_id.unwrap_or_default(),
        })
    }

    async fn approve(
        &self,
        who: &str,
        r: wire::ApproveHostRequest,
    ) -> Result<wire::ApproveHostResponse, Status> {
        let host = HostId::new(&r.host_id)
            .map_err(|e| Status::invalid_argument(format!("host_id: {e}")))?;
        let key = format!("pending/{host}");
        let by = who.to_string();
        let approved = self
            .0
            .blocking(
                move |s| {
                    let mut approved = None;
                    s.enrolment_update(&key, &mut |current| {
                        let Some(mut rec) =
                            current.and_then(|v| serde_json::from_slice::<PendingRecord>(&v).ok())
                        else {
                            return EnrolmentWrite::Keep;
                        };
                        rec.approved_by = Some(by.clone());
                        approved = Some(rec.key_sha256.clone());
                        serde_json::to_vec(&rec).map_or(EnrolmentWrite::Keep, EnrolmentWrite::Put)
                    })?;
                    Ok(approved)
                },
                "approve the held enrolment",
            )
            .await?;
        let key_sha256 = approved.ok_or_else(|| {
            Status::not_found(format!("no enrolment of host {host} is held for approval"))
        })?;
        tracing::warn!(host = %host, key = %key_sha256, by = who, "held enrolment approved");
        Ok(wire::ApproveHostResponse {
            host_id: host.to_string(),
            key_sha256,
        })
    }
}

/// `RenewService` (agents, main port).
#[derive(Debug, Clone)]
pub struct Renewer(pub Arc<Enrolment>);

#[tonic::async_trait]
impl wire::renew_service_server::RenewService for Renewer {
    async fn renew(
        &self,
        request: Request<wire::RenewRequest>,
    ) -> Result<Response<wire::RenewResponse>, Status> {
        let host = serin_security::transport::agent_host(&request)?.clone();
        let r = request.into_inner();
        if r.csr_pem.is_empty() || r.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(format!(
                "csr_pem: a certificate request of 1 to {MAX_CSR_BYTES} bytes is required"
            )));
        }
        if self.0.is_revoked(&host) {
            return Err(Status::permission_denied(format!(
                "host {host} is revoked and cannot renew"
            )));
        }
        let now = SystemTime::now();
        let (cert_pem, key_sha256) = self.0.issue(&host, &r.csr_pem, now)?;
        let entry = format!("key/{host}");
        let k = key_sha256.clone();
        let now_ms = unix_ms(now);
        let same = self
            .0
            .blocking(
                move |s| {
                    let mut same = true;
                    s.enrolment_update(&entry, &mut |current| {
                        match current.and_then(|v| serde_json::from_slice::<KeyRecord>(&v).ok()) {
                            Some(rec) => {
                                same = rec.key_sha256 == k;
                                EnrolmentWrite::Keep
                            }
                            // Issued by `serin ca issue`: its first renewal records the key.
                            None => serde_json::to_vec(&KeyRecord {
                                key_sha256: k.clone(),
                                at_unix_ms: now_ms,
                            })
                            .map_or(EnrolmentWrite::Keep, EnrolmentWrite::Put),
                        }
                    })?;
                    Ok(same)
                },
                "check the host's key",
            )
            .await?;
        if !same {
            return Err(Status::permission_denied(format!(
                "host {host}: a renewal keeps the enrolled key; a new key needs enrolment and approval"
            )));
        }
        tracing::info!(host = %host, "agent certificate renewed");
        Ok(Response::new(wire::RenewResponse {
            certificate_pem: cert_pem,
            not_after_unix_ms: unix_ms(now + self.0.lifetime),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_single_use_expires_and_may_be_bound_to_a_host() {
        let h1 = HostId::new("h1").unwrap();
        let h2 = HostId::new("h2").unwrap();
        let mut t = TokenRecord {
            host_id: Some("h1".into()),
            expires_unix_ms: 1_000,
            created_by: "x".into(),
            used_unix_ms: None,
        };
        assert_eq!(t.check(&h1, 999), Ok(()));
        assert_eq!(t.check(&h1, 1_000), Err(TokenRefusal::Expired(0)));
        assert!(matches!(
            t.check(&h2, 10),
            Err(TokenRefusal::OtherHost { .. })
        ));
        t.used_unix_ms = Some(5);
        assert_eq!(t.check(&h1, 10), Err(TokenRefusal::Used));
        t.host_id = None;
        t.used_unix_ms = None;
        assert_eq!(t.check(&h2, 10), Ok(()));
    }
}
