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
//! refused there (wrong role, wrong kind of certificate, a revoked certificate) never reaches a
//! handler; it is written (and so is a hello refused for claiming another host, by
//! [`crate::agent_service`]) to the audit log by [`RefusalAudit`] with the caller's subject, the
//! method and the reason, at a bounded rate (`serin_security::limits::REFUSED_AUDIT_BURST`,
//! `REFUSED_AUDIT_PER_SECOND`): refusals over the rate are counted and written as one
//! `RefusedCallsNotRecorded` entry, so a flood of refused calls cannot fill the store. Those
//! writes happen off the call's path (a bounded queue and one writer task): a refusal is never
//! slowed by the store.
//!
//! Each operator identity may have at most `serin_security::limits::CONTROL_CALLS_PER_OPERATOR`
//! control calls in flight (a watch counts while it streams); beyond it a call is refused with
//! `resource_exhausted`.
//!
//! `RevokeHost` (admin) persists the revocation, adds the host to the handshake's
//! [`RevokedSet`] (every certificate of that host id is refused from the next handshake on; no
//! session resumption lets it back in), and ends the host's stream. [`load_revocations`] fills
//! the set from the store at start.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::Stream;
use serin_proto::wire;
use serin_proto::wire::control_service_server::ControlService;
use serin_security::PeerIdentity;
use serin_security::limits::{self, PeerSlot, PeerSlots, TokenBucket};
use serin_security::tls::RevokedSet;
use serin_security::transport::PeerInfo;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
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
    /// Calls in flight per operator identity.
    calls: Arc<PeerSlots>,
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
            calls: PeerSlots::new(limits::CONTROL_CALLS_PER_OPERATOR, "control calls"),
        }
    }

    /// A slot of the caller's calls in flight, held until the call (or its stream) ends; `None`
    /// in plaintext development mode (no identities to count).
    fn slot<T>(&self, request: &Request<T>) -> Result<Option<PeerSlot>, Status> {
        let Some(peer) = request.extensions().get::<PeerInfo>() else {
            return Ok(None);
        };
        self.calls
            .try_acquire(&peer.identity.uri())
            .map(Some)
            .map_err(|e| {
                tracing::warn!(identity = %peer.identity, error = %e, "control call refused over the per-operator limit");
                Status::resource_exhausted(e.to_string())
            })
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

/// Refuses a rollout id longer than any the coordinator makes, before it is looked up (the
/// lookup's "no rollout …" would echo it in full).
fn check_rollout_id(id: &str) -> Result<(), Status> {
    if id.len() > limits::MAX_ROLLOUT_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "rollout id {:?} is {} bytes long, at most {} allowed",
            limits::truncated(id),
            id.len(),
            limits::MAX_ROLLOUT_ID_BYTES
        )));
    }
    Ok(())
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
        let _slot = self.slot(&request)?;
        self.inner.list_hosts(request).await
    }

    async fn push_artifact(
        &self,
        request: Request<Streaming<wire::PushArtifactChunk>>,
    ) -> Result<Response<wire::ReleaseInfo>, Status> {
        let _slot = self.slot(&request)?;
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
        let _slot = self.slot(&request)?;
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
        let _slot = self.slot(&request)?;
        self.inner.list_releases(request).await
    }

    async fn plan_rollout(
        &self,
        request: Request<wire::RolloutSpec>,
    ) -> Result<Response<wire::RolloutPlan>, Status> {
        let _slot = self.slot(&request)?;
        self.inner.plan_rollout(request).await
    }

    async fn start_rollout(
        &self,
        request: Request<wire::RolloutSpec>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        let _slot = self.slot(&request)?;
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
        let _slot = self.slot(&request)?;
        check_rollout_id(&request.get_ref().rollout_id)?;
        self.inner.get_rollout(request).await
    }

    type WatchRolloutStream =
        Pin<Box<dyn Stream<Item = Result<wire::RolloutStatus, Status>> + Send + 'static>>;

    async fn watch_rollout(
        &self,
        request: Request<wire::RolloutRef>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let slot = self.slot(&request)?;
        check_rollout_id(&request.get_ref().rollout_id)?;
        let watch = self.inner.watch_rollout(request).await?;
        // The slot is held for as long as the watch streams.
        Ok(watch.map(|stream| -> Self::WatchRolloutStream {
            Box::pin(futures::StreamExt::map(stream, move |item| {
                let _held = &slot;
                item
            }))
        }))
    }

    async fn list_rollouts(
        &self,
        request: Request<wire::ListRolloutsRequest>,
    ) -> Result<Response<wire::ListRolloutsResponse>, Status> {
        let _slot = self.slot(&request)?;
        self.inner.list_rollouts(request).await
    }

    async fn control_rollout(
        &self,
        request: Request<wire::ControlRequest>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        let _slot = self.slot(&request)?;
        let who = who(&request);
        let r = request.get_ref();
        if let Err(refused) = check_rollout_id(&r.rollout_id) {
            let args = format!("rollout={:?}", limits::truncated(&r.rollout_id));
            let result = Err(refused);
            self.record(who, "ControlRollout", args, &result).await;
            return result;
        }
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
        let _slot = self.slot(&request)?;
        check_rollout_id(&request.get_ref().rollout_id)?;
        self.inner.explain_rollout(request).await
    }

    async fn revoke_host(
        &self,
        request: Request<wire::RevokeHostRequest>,
    ) -> Result<Response<wire::RevokeHostResponse>, Status> {
        let _slot = self.slot(&request)?;
        let who = who(&request);
        let r = request.into_inner();
        let args = format!(
            "host={} reason={:?}",
            limits::truncated(&r.host_id),
            r.reason
        );
        let result = self.revoke(&who, r).await;
        self.record(who, "RevokeHost", args, &result).await;
        result.map(Response::new)
    }

    async fn list_audit(
        &self,
        request: Request<wire::ListAuditRequest>,
    ) -> Result<Response<wire::ListAuditResponse>, Status> {
        let _slot = self.slot(&request)?;
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

/// Writes calls refused by the policy layer to the audit log, at a bounded rate (see the module
/// docs). Cheap to clone; [`RefusalAudit::refused`] never waits.
#[derive(Clone)]
pub struct RefusalAudit {
    tx: mpsc::Sender<AuditRecord>,
    gate: Arc<Mutex<RefusalGate>>,
}

impl std::fmt::Debug for RefusalAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalAudit").finish_non_exhaustive()
    }
}

/// The rate of [`RefusalAudit`] and what it did not record.
struct RefusalGate {
    bucket: TokenBucket,
    /// Refusals over the rate since the last summary entry.
    not_recorded: u64,
}

/// Refusals waiting for the writer; beyond it they are counted as not recorded.
const REFUSAL_QUEUE: usize = 256;

impl RefusalAudit {
    /// Starts the writer task on `tasks`; it ends when `shutdown` is cancelled (after writing
    /// what is queued) or when every handle is dropped.
    pub fn start(store: Arc<dyn Store>, tasks: &TaskTracker, shutdown: CancellationToken) -> Self {
        let (tx, mut rx) = mpsc::channel::<AuditRecord>(REFUSAL_QUEUE);
        tasks.spawn(async move {
            loop {
                let rec = tokio::select! {
                    biased;
                    rec = rx.recv() => match rec {
                        Some(rec) => rec,
                        None => break,
                    },
                    () = shutdown.cancelled() => {
                        rx.close();
                        continue;
                    }
                };
                let store = store.clone();
                let written =
                    tokio::task::spawn_blocking(move || store.append_audit(&rec).map(|_| rec))
                        .await
                        .map_err(|e| StoreError::Io(e.to_string()))
                        .and_then(|r| r);
                if let Err(e) = written {
                    tracing::error!(error = %e, "cannot write a refused call to the audit log");
                }
            }
        });
        Self {
            tx,
            gate: Arc::new(Mutex::new(RefusalGate {
                bucket: TokenBucket::new(
                    limits::REFUSED_AUDIT_BURST,
                    limits::REFUSED_AUDIT_PER_SECOND,
                ),
                not_recorded: 0,
            })),
        }
    }

    /// Records that `identity` called `path` (a gRPC method path) from `remote` and was refused
    /// with `status`, unless over the rate.
    pub fn refused(
        &self,
        identity: &PeerIdentity,
        remote: std::net::SocketAddr,
        path: &str,
        status: &Status,
    ) {
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("", path));
        let rec = AuditRecord {
            at_unix_ms: unix_ms_now(),
            who: identity.uri(),
            what: limits::truncated(method),
            arguments: format!(
                "refused by the access policy; service={} peer={remote}",
                limits::truncated(service)
            ),
            result: format!("{:?}: {}", status.code(), status.message()),
        };
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if !gate.bucket.allow(Instant::now()) {
            gate.not_recorded += 1;
            return;
        }
        if gate.not_recorded > 0 {
            let summary = AuditRecord {
                at_unix_ms: rec.at_unix_ms,
                who: "serin-coordinator".to_string(),
                what: "RefusedCallsNotRecorded".to_string(),
                arguments: format!(
                    "{} refused calls over the audit rate ({} at once, then {}/s) were not recorded",
                    gate.not_recorded,
                    limits::REFUSED_AUDIT_BURST,
                    limits::REFUSED_AUDIT_PER_SECOND
                ),
                result: "ok".to_string(),
            };
            if self.tx.try_send(summary).is_ok() {
                gate.not_recorded = 0;
            }
        }
        if self.tx.try_send(rec).is_err() {
            gate.not_recorded += 1;
        }
    }
}
