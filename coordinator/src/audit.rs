//! The security record of the control API: who did what, and host revocation.
//!
//! [`AuditedControl`] wraps the control service ([`crate::control_service::ControlServiceImpl`])
//! and is what the server serves. Read calls pass straight through. Every mutating call
//! (`PushArtifact`, `RegisterRelease`, `StartRollout`, `ControlRollout`, `RevokeHost`) is
//! answered by the inner service and then written to the store's audit log ([`AuditRecord`]):
//! who (the caller's certificate identity, `plaintext` in development mode), what, the
//! arguments, when, and the result (`ok` or the refusal's code and message). The call waits for
//! the entry to be durable; if it cannot be written, the error is logged and the call's own
//! result still returned (the change happened; hiding it would be worse).
//!
//! Which role may call what is decided before any of this, by the policy layer
//! ([`crate::listener::PeerLayer`], `serin_security::transport::required_access`): a call
//! refused there never reaches a handler and is logged as a warning, not audited.
//!
//! `RevokeHost` (admin) persists the revocation, adds the host to the handshake's
//! [`RevokedSet`] (every certificate of that host id is refused from the next handshake on; no
//! session resumption lets it back in), and ends the host's stream. [`load_revocations`] fills
//! the set from the store at start.

use std::sync::Arc;

use serin_proto::wire;
use serin_proto::wire::control_service_server::ControlService;
use serin_security::PeerIdentity;
use serin_security::tls::RevokedSet;
use serin_security::transport::PeerInfo;
use tonic::{Request, Response, Status, Streaming};

use crate::control_service::ControlServiceImpl;
use crate::registry::{Registry, unix_ms_now};
use crate::store::{AuditRecord, RevocationRecord, Store, StoreError};

/// The control service with its audit log and revocation (see the module docs).
pub struct AuditedControl {
    inner: ControlServiceImpl,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    revoked: Arc<RevokedSet>,
}

impl AuditedControl {
    /// Wraps `inner`.
    pub fn new(
        inner: ControlServiceImpl,
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        revoked: Arc<RevokedSet>,
    ) -> Self {
        Self {
            inner,
            store,
            registry,
            revoked,
        }
    }

    /// Writes one audit entry (durably, off the async threads).
    async fn record<T>(
        &self,
        who: String,
        what: &str,
        arguments: String,
        result: &Result<T, Status>,
    ) {
        let rec = AuditRecord {
            at_unix_ms: unix_ms_now(),
            who,
            what: what.to_string(),
            arguments,
            result: match result {
                Ok(_) => "ok".to_string(),
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
            },
        };
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || store.append_audit(&rec).map(|_| rec))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))
            .and_then(|r| r);
        match written {
            Ok(rec) => {
                tracing::info!(who = %rec.who, what = %rec.what, arguments = %rec.arguments, result = %rec.result, "audit")
            }
            Err(e) => tracing::error!(error = %e, what, "cannot write the audit log"),
        }
    }
}

/// The caller's identity for the audit log: its certificate's `serin://` URI.
pub fn who<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<PeerInfo>()
        .map_or_else(|| "plaintext".to_string(), |p| p.identity.uri())
}

/// Fills `revoked` from the store's revocations (at start).
pub fn load_revocations(store: &dyn Store, revoked: &RevokedSet) -> Result<usize, StoreError> {
    let recs = store.revoked_hosts()?;
    for r in &recs {
        match serin_proto::HostId::new(&r.host_id) {
            Ok(host_id) => revoked.revoke_identity(PeerIdentity::Agent { host_id }),
            Err(e) => {
                tracing::error!(host = %r.host_id, error = %e, "a stored revocation names an invalid host id")
            }
        }
    }
    Ok(recs.len())
}

fn spec_args(s: &wire::RolloutSpec) -> String {
    format!(
        "service={} release={} selector={:?} waves={}",
        s.service,
        s.release,
        s.selector,
        s.waves.join(",")
    )
}

#[tonic::async_trait]
impl ControlService for AuditedControl {
    async fn list_hosts(
        &self,
        request: Request<wire::ListHostsRequest>,
    ) -> Result<Response<wire::ListHostsResponse>, Status> {
        self.inner.list_hosts(request).await
    }

    async fn push_artifact(
        &self,
        request: Request<Streaming<wire::PushArtifactChunk>>,
    ) -> Result<Response<wire::ReleaseInfo>, Status> {
        let who = who(&request);
        let result = self.inner.push_artifact(request).await;
        // The arguments arrive in the stream; what was stored says them exactly.
        let args = match &result {
            Ok(r) => r
                .get_ref()
                .release
                .as_ref()
                .map_or_else(String::new, |rel| {
                    format!(
                        "service={} release={} sha256={} size={}",
                        rel.service, rel.id, rel.sha256, rel.size
                    )
                }),
            Err(_) => "(upload refused; see result)".to_string(),
        };
        self.record(who, "PushArtifact", args, &result).await;
        result
    }

    async fn register_release(
        &self,
        request: Request<wire::Release>,
    ) -> Result<Response<wire::ReleaseInfo>, Status> {
        let who = who(&request);
        let r = request.get_ref();
        let args = format!(
            "service={} release={} sha256={} size={}",
            r.service, r.id, r.sha256, r.size
        );
        let result = self.inner.register_release(request).await;
        self.record(who, "RegisterRelease", args, &result).await;
        result
    }

    async fn list_releases(
        &self,
        request: Request<wire::ListReleasesRequest>,
    ) -> Result<Response<wire::ListReleasesResponse>, Status> {
        self.inner.list_releases(request).await
    }

    async fn plan_rollout(
        &self,
        request: Request<wire::RolloutSpec>,
    ) -> Result<Response<wire::RolloutPlan>, Status> {
        self.inner.plan_rollout(request).await
    }

    async fn start_rollout(
        &self,
        request: Request<wire::RolloutSpec>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        let who = who(&request);
        let args = spec_args(request.get_ref());
        let result = self.inner.start_rollout(request).await;
        let args = match &result {
            Ok(r) => format!("{args} -> rollout={}", r.get_ref().rollout_id),
            Err(_) => args,
        };
        self.record(who, "StartRollout", args, &result).await;
        result
    }

    async fn get_rollout(
        &self,
        request: Request<wire::RolloutRef>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        self.inner.get_rollout(request).await
    }

    type WatchRolloutStream = <ControlServiceImpl as ControlService>::WatchRolloutStream;

    async fn watch_rollout(
        &self,
        request: Request<wire::RolloutRef>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        self.inner.watch_rollout(request).await
    }

    async fn list_rollouts(
        &self,
        request: Request<wire::ListRolloutsRequest>,
    ) -> Result<Response<wire::ListRolloutsResponse>, Status> {
        self.inner.list_rollouts(request).await
    }

    async fn control_rollout(
        &self,
        request: Request<wire::ControlRequest>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        let who = who(&request);
        let r = request.get_ref();
        let action = wire::ControlAction::try_from(r.action)
            .map_or_else(|_| r.action.to_string(), |a| a.as_str_name().to_lowercase());
        let args = format!(
            "rollout={} action={action} reason={:?}",
            r.rollout_id, r.reason
        );
        let result = self.inner.control_rollout(request).await;
        self.record(who, "ControlRollout", args, &result).await;
        result
    }

    async fn explain_rollout(
        &self,
        request: Request<wire::RolloutRef>,
    ) -> Result<Response<wire::Explanation>, Status> {
        self.inner.explain_rollout(request).await
    }

    async fn revoke_host(
        &self,
        request: Request<wire::RevokeHostRequest>,
    ) -> Result<Response<wire::RevokeHostResponse>, Status> {
        let who = who(&request);
        let r = request.into_inner();
        let args = format!("host={} reason={:?}", r.host_id, r.reason);
        let result = self.revoke(&who, r).await;
        self.record(who, "RevokeHost", args, &result).await;
        result.map(Response::new)
    }

    async fn list_audit(
        &self,
        request: Request<wire::ListAuditRequest>,
    ) -> Result<Response<wire::ListAuditResponse>, Status> {
        let since = request.get_ref().since_unix_ms;
        let store = self.store.clone();
        let entries = tokio::task::spawn_blocking(move || store.audit(since))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("cannot read the audit log: {e}")))?;
        Ok(Response::new(wire::ListAuditResponse {
            entries: entries
                .into_iter()
                .map(|(seq, e)| wire::AuditEntry {
                    seq,
                    at_unix_ms: e.at_unix_ms,
                    who: e.who,
                    what: e.what,
                    arguments: e.arguments,
                    result: e.result,
                })
                .collect(),
        }))
    }
}

impl AuditedControl {
    async fn revoke(
        &self,
        who: &str,
        r: wire::RevokeHostRequest,
    ) -> Result<wire::RevokeHostResponse, Status> {
        let host_id = serin_proto::HostId::new(&r.host_id)
            .map_err(|e| Status::invalid_argument(format!("host id: {}", e.problem)))?;
        let rec = RevocationRecord {
            host_id: host_id.to_string(),
            at_unix_ms: unix_ms_now(),
            by: who.to_string(),
            reason: r.reason,
        };
        let store = self.store.clone();
        let new = tokio::task::spawn_blocking(move || store.revoke_host(&rec))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("cannot persist the revocation: {e}")))?;
        // Persisted first, then enforced: a crash in between still refuses it after the restart.
        self.revoked.revoke_identity(PeerIdentity::Agent {
            host_id: host_id.clone(),
        });
        let disconnected = self.registry.kick(&host_id);
        tracing::warn!(host = %host_id, by = who, disconnected, "host revoked: its certificate is refused from now on");
        Ok(wire::RevokeHostResponse {
            host_id: host_id.to_string(),
            disconnected,
            already_revoked: !new,
        })
    }
}
