//! The gRPC service operators talk to (`serin.v1.ControlService`): hosts, releases and
//! artifacts are answered here; the rollout calls are forwarded to the rollout engine through the
//! narrow [`RolloutApi`] trait (implemented by [`crate::rollout::RolloutManager`]).
//!
//! Releases are immutable: once `(service, release id)` names some content, pushing or
//! registering different content under it is refused with `already_exists`, naming both hashes.
//! Sending the same content again is fine and reported as deduplicated.

use std::sync::Arc;

use futures::Stream;
use serin_proto::wire;
use serin_proto::{ArtifactSource, HostId, Release, ReleaseId, ServiceName, ValidationError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::artifacts::ArtifactStore;
use crate::registry::{Registry, unix_ms_now};
use crate::rollout::analysis::MetricSummary;
use crate::rollout::machine::Decision;
use crate::rollout::plan::Plan;
use crate::rollout::spec::RawSpec;
use crate::rollout::{
    Explanation, OperatorAction, RolloutError, RolloutManager, RolloutSpec, RolloutView,
};
use crate::selector::Selector;
use crate::store::{ReleaseRecord, Store, StoreError};

/// `ListHosts` hosts per page when the request names no page size.
pub const DEFAULT_HOSTS_PAGE: usize = 500;
/// The largest `ListHosts` page served, whatever the request asks: a host's entry is bounded
/// (validated hello, latest health report per service), so a page stays far below the 16 MiB
/// message limit however large the fleet.
pub const MAX_HOSTS_PAGE: usize = 2_000;
/// Keys kept per list of a `ListHosts` summary (the most common).
pub const SUMMARY_TOP: usize = 20;

/// The rollout engine as the control API needs it. Errors are already gRPC statuses
/// (`invalid_argument`, `not_found`, `failed_precondition`, …) with messages for the operator.
#[tonic::async_trait]
pub trait RolloutApi: Send + Sync + 'static {
    /// Which host lands in which wave; changes nothing.
    async fn plan(&self, spec: wire::RolloutSpec) -> Result<wire::RolloutPlan, Status>;
    /// Starts a rollout.
    async fn start_rollout(&self, spec: wire::RolloutSpec) -> Result<wire::RolloutStatus, Status>;
    /// A rollout's status now.
    async fn status(&self, id: &str) -> Result<wire::RolloutStatus, Status>;
    /// A rollout's status now and after every change (domain values; the stream converts each).
    fn watch(&self, id: &str) -> Result<watch::Receiver<RolloutView>, Status>;
    /// Every rollout (of one service), oldest first.
    async fn list(&self, service: Option<&str>) -> Result<Vec<wire::RolloutStatus>, Status>;
    /// Pause, resume, promote, abort, retry or roll back a rollout.
    async fn control(&self, req: wire::ControlRequest) -> Result<wire::RolloutStatus, Status>;
    /// A rollout's decisions with their evidence.
    async fn explain(&self, id: &str) -> Result<wire::Explanation, Status>;
}

impl From<RolloutError> for Status {
    fn from(e: RolloutError) -> Self {
        let msg = e.to_string();
        match e {
            RolloutError::InvalidSpec(_) => Status::invalid_argument(msg),
            RolloutError::UnknownRelease { .. } | RolloutError::NotFound(_) => {
                Status::not_found(msg)
            }
            RolloutError::NothingToDo(_)
            | RolloutError::ServiceBusy { .. }
            | RolloutError::Refused(_)
            | RolloutError::NotLatest { .. } => Status::failed_precondition(msg),
            RolloutError::NotSaved(_) | RolloutError::Stopped(_) => Status::unavailable(msg),
            RolloutError::Store(_) | RolloutError::Record(_) | RolloutError::BadRelease { .. } => {
                tracing::error!(error = %msg, "rollout engine failed");
                Status::internal(msg)
            }
        }
    }
}

/// The operator action of a wire control request.
fn action_from_wire(action: i32) -> Result<OperatorAction, Status> {
    match wire::ControlAction::try_from(action) {
        Ok(wire::ControlAction::Pause) => Ok(OperatorAction::Pause),
        Ok(wire::ControlAction::Resume) => Ok(OperatorAction::Resume),
        Ok(wire::ControlAction::Promote) => Ok(OperatorAction::Promote),
        Ok(wire::ControlAction::Abort) => Ok(OperatorAction::Abort),
        Ok(wire::ControlAction::Retry) => Ok(OperatorAction::Retry),
        Ok(wire::ControlAction::Rollback) => Ok(OperatorAction::Rollback),
        _ => Err(Status::invalid_argument(format!(
            "action: {action} is not one of pause, resume, promote, abort, retry, rollback"
        ))),
    }
}

/// The raw spec of a wire spec (field for field).
pub fn raw_spec_from_wire(w: wire::RolloutSpec) -> RawSpec {
    RawSpec {
        service: w.service,
        release: w.release,
        selector: w.selector,
        waves: w.waves,
        bake_ms: w.bake_ms,
        canary_bake_ms: w.canary_bake_ms,
        min_healthy_ms: w.min_healthy_ms,
        healthy_deadline_ms: w.healthy_deadline_ms,
        progress_deadline_ms: w.progress_deadline_ms,
        max_unavailable: w.max_unavailable,
        max_in_flight: w.max_in_flight,
        failure_threshold: w.failure_threshold,
        cumulative_failure_threshold: w.cumulative_failure_threshold,
        on_failure: w.on_failure,
        spread_label: w.spread_label,
        max_domains_in_flight: w.max_domains_in_flight,
        unreachable_threshold: w.unreachable_threshold,
        canary_weight: w.canary_weight,
        weights: w.weights,
        min_requests: w.min_requests,
    }
}

/// A validated spec from the wire.
fn spec_from_wire(spec: wire::RolloutSpec) -> Result<RolloutSpec, Status> {
    RolloutSpec::try_from(raw_spec_from_wire(spec)).map_err(|e| Status::from(RolloutError::from(e)))
}

/// The wire form of a raw spec (field for field).
pub fn raw_spec_to_wire(r: RawSpec) -> wire::RolloutSpec {
    wire::RolloutSpec {
        service: r.service,
        release: r.release,
        selector: r.selector,
        waves: r.waves,
        bake_ms: r.bake_ms,
        canary_bake_ms: r.canary_bake_ms,
        min_healthy_ms: r.min_healthy_ms,
        healthy_deadline_ms: r.healthy_deadline_ms,
        progress_deadline_ms: r.progress_deadline_ms,
        max_unavailable: r.max_unavailable,
        max_in_flight: r.max_in_flight,
        failure_threshold: r.failure_threshold,
        cumulative_failure_threshold: r.cumulative_failure_threshold,
        on_failure: r.on_failure,
        spread_label: r.spread_label,
        max_domains_in_flight: r.max_domains_in_flight,
        unreachable_threshold: r.unreachable_threshold,
        canary_weight: r.canary_weight,
        weights: r.weights,
        min_requests: r.min_requests,
    }
}

/// The wire form of a spec, every default spelled out.
pub fn spec_to_wire(spec: &RolloutSpec) -> wire::RolloutSpec {
    raw_spec_to_wire(spec.to_raw())
}

/// The wire form shown by `serin rollout plan`.
pub fn plan_to_wire(p: &Plan, spec: &RolloutSpec) -> wire::RolloutPlan {
    wire::RolloutPlan {
        spec: Some(spec_to_wire(spec)),
        waves: p
            .waves
            .iter()
            .map(|w| wire::PlannedWave {
                index: w.index,
                host_ids: w.hosts.iter().map(|h| h.host_id.to_string()).collect(),
                size_expr: w.size_expr.clone(),
            })
            .collect(),
        skipped: p
            .skipped
            .iter()
            .map(|s| wire::SkippedHost {
                host_id: s.host_id.to_string(),
                reason: s.reason.clone(),
            })
            .collect(),
    }
}

fn summary_to_wire(m: &MetricSummary) -> wire::MetricSummary {
    wire::MetricSummary {
        hosts: m.hosts,
        reports: m.reports,
        check_pass_rate: m.check_pass_rate,
        latency_p50_ms: m.latency_p50_ms,
        latency_p99_ms: m.latency_p99_ms,
        restarts: m.restarts,
        cpu_percent: m.cpu_percent,
        rss_bytes: m.rss_bytes,
    }
}

fn decision_to_wire(d: &Decision) -> wire::Decision {
    wire::Decision {
        at_unix_ms: d.at_ms,
        wave: d.wave,
        kind: wire::DecisionKind::from_word(d.kind.as_str()).unwrap_or_default() as i32,
        reason: d.reason.clone(),
        evidence: d.evidence.clone().into_iter().collect(),
        actor: d.actor.clone(),
    }
}

fn opt_id(r: &Option<ReleaseId>) -> String {
    r.as_ref().map(ToString::to_string).unwrap_or_default()
}

/// The wire form of a rollout's status.
pub fn status_to_wire(v: &RolloutView) -> wire::RolloutStatus {
    status_page_to_wire(v, 0, 0)
}

/// The wire form of a rollout's status with one page of its hosts: at most `limit` of them
/// (0: all) from `offset` on. Waves, counts and `hosts_total` always cover every host, so a
/// summary of any fleet stays far below the message limit.
pub fn status_page_to_wire(v: &RolloutView, offset: u32, limit: u32) -> wire::RolloutStatus {
    let offset = (offset as usize).min(v.hosts.len());
    let limit = if limit == 0 {
        usize::MAX
    } else {
        limit as usize
    };
    wire::RolloutStatus {
        hosts_total: u32::try_from(v.hosts.len()).unwrap_or(u32::MAX),
        rollout_id: v.id.clone(),
        spec: Some(spec_to_wire(&v.spec)),
        // The domain's words are the wire enums' (checked by serin-proto's tests).
        state: wire::RolloutState::from_word(v.state.as_str()).unwrap_or_default() as i32,
        reason: v.reason.clone(),
        current_wave: v.current_wave,
        waves: v
            .waves
            .iter()
            .map(|w| wire::WaveStatus {
                index: w.index,
                size: w.size,
                state: wire::WaveState::from_word(w.state.as_str()).unwrap_or_default() as i32,
                succeeded: w.succeeded,
                failed: w.failed,
                unreachable: w.unreachable,
                in_progress: w.in_progress,
                started_unix_ms: w.started_ms.unwrap_or(0),
                bake_ends_unix_ms: w.bake_ends_ms.unwrap_or(0),
            })
            .collect(),
        hosts: v.hosts[offset..]
            .iter()
            .take(limit)
            .map(|h| wire::HostProgress {
                host_id: h.id.to_string(),
                hostname: h.hostname.clone(),
                wave: h.wave,
                phase: wire::HostPhase::from_word(h.phase.as_str()).unwrap_or_default() as i32,
                baseline_release: opt_id(&h.baseline),
                target_release: opt_id(&h.target),
                current_release: opt_id(&h.current),
                healthy: h.healthy,
                detail: h.detail.clone(),
                labels: h.labels.clone().into_iter().collect(),
            })
            .collect(),
        comparison: v.comparison.as_ref().map(|c| wire::Comparison {
            canary: Some(summary_to_wire(&c.canary)),
            baseline: Some(summary_to_wire(&c.baseline)),
            verdict: c.verdict.as_str().to_string(),
        }),
        decisions: v.decisions.iter().map(decision_to_wire).collect(),
        created_unix_ms: v.created_ms,
        updated_unix_ms: v.updated_ms,
        finished: v.finished(),
    }
}

/// The wire form of an explanation.
pub fn explanation_to_wire(e: &Explanation) -> wire::Explanation {
    wire::Explanation {
        status: Some(status_to_wire(&e.status)),
        decisions: e.status.decisions.iter().map(decision_to_wire).collect(),
        events: e.events.clone(),
    }
}

#[tonic::async_trait]
impl RolloutApi for RolloutManager {
    async fn plan(&self, spec: wire::RolloutSpec) -> Result<wire::RolloutPlan, Status> {
        let spec = spec_from_wire(spec)?;
        let p = RolloutManager::plan(self, &spec).await?;
        Ok(plan_to_wire(&p, &spec))
    }
    async fn start_rollout(&self, spec: wire::RolloutSpec) -> Result<wire::RolloutStatus, Status> {
        let spec = spec_from_wire(spec)?;
        Ok(status_to_wire(
            &RolloutManager::start_rollout(self, spec).await?,
        ))
    }
    async fn status(&self, id: &str) -> Result<wire::RolloutStatus, Status> {
        Ok(status_to_wire(&RolloutManager::status(self, id).await?))
    }
    fn watch(&self, id: &str) -> Result<watch::Receiver<RolloutView>, Status> {
        Ok(RolloutManager::watch(self, id)?)
    }
    async fn list(&self, service: Option<&str>) -> Result<Vec<wire::RolloutStatus>, Status> {
        let service = match service.map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => {
                Some(ServiceName::new(s).map_err(|e| Status::invalid_argument(e.to_string()))?)
            }
        };
        Ok(RolloutManager::list(self, service.as_ref())
            .await?
            .iter()
            .map(status_to_wire)
            .collect())
    }
    async fn control(&self, req: wire::ControlRequest) -> Result<wire::RolloutStatus, Status> {
        let action = action_from_wire(req.action)?;
        if req.reason.len() > 1024 {
            return Err(Status::invalid_argument("reason: at most 1024 bytes"));
        }
        let v =
            RolloutManager::control(self, &req.rollout_id, action, "operator", &req.reason).await?;
        Ok(status_to_wire(&v))
    }
    async fn explain(&self, id: &str) -> Result<wire::Explanation, Status> {
        Ok(explanation_to_wire(
            &RolloutManager::explain(self, id).await?,
        ))
    }
}

/// Implements `serin.v1.ControlService`.
pub struct ControlServiceImpl {
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
    artifacts: ArtifactStore,
    rollouts: Arc<dyn RolloutApi>,
    shutdown: CancellationToken,
    /// Serialises the check-then-write of release records, so two concurrent pushes of one
    /// release id cannot both win.
    release_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ControlServiceImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServiceImpl").finish_non_exhaustive()
    }
}

fn store_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "store operation failed");
    Status::internal(e.to_string())
}

/// Runs a (blocking, fsyncing) store call off the async workers.
async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| Status::internal(format!("store task failed: {e}")))?
        .map_err(store_status)
}

fn release_info(rec: &ReleaseRecord, deduplicated: bool) -> wire::ReleaseInfo {
    wire::ReleaseInfo {
        release: Some(wire::Release {
            service: rec.service.clone(),
            id: rec.id.clone(),
            sha256: rec.sha256.clone(),
            size: rec.size,
            url: rec.url.clone(),
            manifest: rec.manifest.clone(),
        }),
        created_unix_ms: rec.created_unix_ms,
        deduplicated,
    }
}

fn immutable(existing: &ReleaseRecord, sha256: &str) -> Status {
    Status::already_exists(format!(
        "release {} of service {} already exists with sha256 {}; this content has sha256 {}. \
         Release ids are immutable: use a new release id",
        existing.id, existing.service, existing.sha256, sha256
    ))
}

impl ControlServiceImpl {
    /// A control service over these parts.
    pub fn new(
        registry: Arc<Registry>,
        store: Arc<dyn Store>,
        artifacts: ArtifactStore,
        rollouts: Arc<dyn RolloutApi>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            registry,
            store,
            artifacts,
            rollouts,
            shutdown,
            release_lock: tokio::sync::Mutex::new(()),
        }
    }

    async fn existing(
        &self,
        service: &ServiceName,
        id: &ReleaseId,
    ) -> Result<Option<ReleaseRecord>, Status> {
        let (service, id) = (service.clone(), id.clone());
        blocking(&self.store, move |s| s.release(&service, &id)).await
    }

    async fn put(&self, rec: ReleaseRecord) -> Result<(), Status> {
        blocking(&self.store, move |s| s.put_release(&rec)).await
    }

    /// A release pushed or added again with a (checked) manifest keeps the new manifest: that is
    /// how a release is re-signed, e.g. with a new key. Without one, the stored one stays.
    async fn attach_manifest(
        &self,
        mut existing: ReleaseRecord,
        manifest: String,
    ) -> Result<ReleaseRecord, Status> {
        if !manifest.is_empty() && manifest != existing.manifest {
            existing.manifest = manifest;
            self.put(existing.clone()).await?;
            tracing::info!(service = %existing.service, release = %existing.id, "release manifest replaced");
        }
        Ok(existing)
    }
}

type WatchStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<wire::RolloutStatus, Status>> + Send>>;

/// The watch channel's value now and after every change, until a finished status was sent, the
/// engine drops the channel, or the coordinator shuts down.
/// Each status carries the page of hosts `page` (offset, limit) asks for.
fn watch_stream(
    rx: watch::Receiver<RolloutView>,
    shutdown: CancellationToken,
    page: (u32, u32),
) -> WatchStream {
    struct St {
        rx: watch::Receiver<RolloutView>,
        first: bool,
        done: bool,
        shutdown: CancellationToken,
        page: (u32, u32),
    }
    let st = St {
        rx,
        first: true,
        done: false,
        shutdown,
        page,
    };
    Box::pin(futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        if !st.first {
            tokio::select! {
                changed = st.rx.changed() => {
                    if changed.is_err() {
                        // The engine let go of the rollout: whatever we sent last is final.
                        return None;
                    }
                }
                () = st.shutdown.cancelled() => {
                    st.done = true;
                    return Some((Err(Status::unavailable("coordinator is shutting down")), st));
                }
            }
        }
        st.first = false;
        let status = status_page_to_wire(&st.rx.borrow_and_update(), st.page.0, st.page.1);
        st.done = status.finished;
        Some((Ok(status), st))
    }))
}

fn opt_service(field: &str, s: &str) -> Result<Option<ServiceName>, Status> {
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(ServiceName::new(s).map_err(|e| e.within(field))?))
    }
}

#[tonic::async_trait]
impl wire::control_service_server::ControlService for ControlServiceImpl {
    #[tracing::instrument(skip_all, fields(selector = %request.get_ref().selector))]
    async fn list_hosts(
        &self,
        request: Request<wire::ListHostsRequest>,
    ) -> Result<Response<wire::ListHostsResponse>, Status> {
        let req = request.get_ref();
        let selector =
            Selector::parse(&req.selector).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let page_size = match req.page_size {
            0 => DEFAULT_HOSTS_PAGE,
            n => usize::try_from(n)
                .unwrap_or(MAX_HOSTS_PAGE)
                .min(MAX_HOSTS_PAGE),
        };
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(HostId::new(&req.page_token).map_err(|_| {
                Status::invalid_argument(
                    "page_token: not a token of an earlier ListHosts page (pass next_page_token as it came)",
                )
            })?)
        };
        let (hosts, next) = self
            .registry
            .host_page(&selector, after.as_ref(), page_size);
        let summary = req
            .summary
            .then(|| self.registry.host_summary(&selector, SUMMARY_TOP));
        Ok(Response::new(wire::ListHostsResponse {
            hosts,
            next_page_token: next.map(|h| h.to_string()).unwrap_or_default(),
            summary,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn push_artifact(
        &self,
        request: Request<Streaming<wire::PushArtifactChunk>>,
    ) -> Result<Response<wire::ReleaseInfo>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the upload ended before its first chunk"))?;
        let service = ServiceName::new(&first.service).map_err(|e| e.within("push"))?;
        let id = ReleaseId::new(&first.release_id).map_err(|e| e.within("push"))?;
        let manifest = first.manifest.clone();
        if manifest.len() > serin_proto::MAX_MANIFEST_BYTES {
            return Err(
                ValidationError::new("push.manifest", "longer than a manifest can be").into(),
            );
        }
        tracing::info!(service = %service, release = %id, "artifact upload started");

        let mut upload = self.artifacts.upload().await?;
        upload.write(&first.data).await?;
        loop {
            let chunk = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    return Err(Status::unavailable("coordinator is shutting down; push again"));
                }
                chunk = inbound.message() => chunk?,
            };
            let Some(chunk) = chunk else { break };
            if (!chunk.service.is_empty() && chunk.service != service.as_str())
                || (!chunk.release_id.is_empty() && chunk.release_id != id.as_str())
            {
                return Err(ValidationError::new(
                    "push.service",
                    "only the first chunk names the service and release; a later chunk names another",
                )
                .into());
            }
            upload.write(&chunk.data).await?;
        }
        let staged = upload.finish().await?;
        let sha = staged.sha256().to_hex();
        if !manifest.is_empty() {
            crate::artifacts::check_manifest(
                &manifest,
                &service,
                &id,
                &staged.sha256(),
                staged.size(),
            )?;
        }

        let _guard = self.release_lock.lock().await;
        if let Some(existing) = self.existing(&service, &id).await? {
            if existing.sha256 != sha {
                tracing::warn!(service = %service, release = %id, existing = %existing.sha256, pushed = %sha, "refused to change an immutable release");
                return Err(immutable(&existing, &sha));
            }
            staged.commit().await?;
            let existing = self.attach_manifest(existing, manifest).await?;
            return Ok(Response::new(release_info(&existing, true)));
        }
        let size = staged.size();
        let deduplicated = staged.commit().await?;
        let rec = ReleaseRecord {
            service: service.to_string(),
            id: id.to_string(),
            sha256: sha,
            size,
            url: String::new(),
            created_unix_ms: unix_ms_now(),
            manifest,
        };
        self.put(rec.clone()).await?;
        tracing::info!(service = %service, release = %id, sha256 = %rec.sha256, size, deduplicated, "release stored");
        Ok(Response::new(release_info(&rec, deduplicated)))
    }

    #[tracing::instrument(skip_all, fields(service = %request.get_ref().service, release = %request.get_ref().id))]
    async fn register_release(
        &self,
        request: Request<wire::Release>,
    ) -> Result<Response<wire::ReleaseInfo>, Status> {
        let release = Release::try_from(request.into_inner())?;
        let ArtifactSource::Url(url) = &release.source else {
            return Err(ValidationError::new(
                "release.url",
                "required: a registered release is downloaded from a URL (upload a file with \
                 `serin artifact push` instead)",
            )
            .into());
        };
        let sha = release.sha256.to_hex();
        let manifest = release.manifest.clone().unwrap_or_default();
        if !manifest.is_empty() {
            crate::artifacts::check_manifest(
                &manifest,
                &release.service,
                &release.id,
                &release.sha256,
                release.size,
            )?;
        }
        let _guard = self.release_lock.lock().await;
        if let Some(existing) = self.existing(&release.service, &release.id).await? {
            if existing.sha256 != sha {
                return Err(immutable(&existing, &sha));
            }
            if existing.size != release.size {
                return Err(Status::already_exists(format!(
                    "release {} of service {} already exists with size {}; this one has size {}",
                    existing.id, existing.service, existing.size, release.size
                )));
            }
            let existing = self.attach_manifest(existing, manifest).await?;
            return Ok(Response::new(release_info(&existing, true)));
        }
        let rec = ReleaseRecord {
            service: release.service.to_string(),
            id: release.id.to_string(),
            sha256: sha,
            size: release.size,
            url: url.clone(),
            created_unix_ms: unix_ms_now(),
            manifest,
        };
        self.put(rec.clone()).await?;
        tracing::info!(sha256 = %rec.sha256, url = %rec.url, "release registered");
        Ok(Response::new(release_info(&rec, false)))
    }

    async fn list_releases(
        &self,
        request: Request<wire::ListReleasesRequest>,
    ) -> Result<Response<wire::ListReleasesResponse>, Status> {
        let service = opt_service("list_releases", &request.get_ref().service)?;
        let mut recs = blocking(&self.store, move |s| s.releases(service.as_ref())).await?;
        recs.sort_by(|a, b| {
            (a.service.as_str(), a.created_unix_ms, a.id.as_str()).cmp(&(
                b.service.as_str(),
                b.created_unix_ms,
                b.id.as_str(),
            ))
        });
        Ok(Response::new(wire::ListReleasesResponse {
            releases: recs.iter().map(|r| release_info(r, false)).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(service = %request.get_ref().service, release = %request.get_ref().release))]
    async fn plan_rollout(
        &self,
        request: Request<wire::RolloutSpec>,
    ) -> Result<Response<wire::RolloutPlan>, Status> {
        Ok(Response::new(
            self.rollouts.plan(request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(service = %request.get_ref().service, release = %request.get_ref().release))]
    async fn start_rollout(
        &self,
        request: Request<wire::RolloutSpec>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        Ok(Response::new(
            self.rollouts.start_rollout(request.into_inner()).await?,
        ))
    }

    async fn get_rollout(
        &self,
        request: Request<wire::RolloutRef>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        let r = request.get_ref();
        let mut status = self.rollouts.status(&r.rollout_id).await?;
        let offset = (r.host_offset as usize).min(status.hosts.len());
        status.hosts.drain(..offset);
        if r.host_limit > 0 {
            status.hosts.truncate(r.host_limit as usize);
        }
        Ok(Response::new(status))
    }

    type WatchRolloutStream = WatchStream;

    #[tracing::instrument(skip_all, fields(rollout = %request.get_ref().rollout_id))]
    async fn watch_rollout(
        &self,
        request: Request<wire::RolloutRef>,
    ) -> Result<Response<Self::WatchRolloutStream>, Status> {
        let r = request.get_ref();
        let rx = self.rollouts.watch(&r.rollout_id)?;
        Ok(Response::new(watch_stream(
            rx,
            self.shutdown.clone(),
            (r.host_offset, r.host_limit),
        )))
    }

    async fn list_rollouts(
        &self,
        request: Request<wire::ListRolloutsRequest>,
    ) -> Result<Response<wire::ListRolloutsResponse>, Status> {
        let service = opt_service("list_rollouts", &request.get_ref().service)?;
        let rollouts = self
            .rollouts
            .list(service.as_ref().map(ServiceName::as_str))
            .await?;
        Ok(Response::new(wire::ListRolloutsResponse { rollouts }))
    }

    #[tracing::instrument(skip_all, fields(rollout = %request.get_ref().rollout_id, action = request.get_ref().action))]
    async fn control_rollout(
        &self,
        request: Request<wire::ControlRequest>,
    ) -> Result<Response<wire::RolloutStatus>, Status> {
        Ok(Response::new(
            self.rollouts.control(request.into_inner()).await?,
        ))
    }

    async fn explain_rollout(
        &self,
        request: Request<wire::RolloutRef>,
    ) -> Result<Response<wire::Explanation>, Status> {
        Ok(Response::new(
            self.rollouts.explain(&request.get_ref().rollout_id).await?,
        ))
    }

    /// Answered by [`crate::audit::AuditedControl`], which the server serves around this one.
    async fn revoke_host(
        &self,
        _: Request<wire::RevokeHostRequest>,
    ) -> Result<Response<wire::RevokeHostResponse>, Status> {
        Err(Status::unimplemented("served by audit::AuditedControl"))
    }

    /// Answered by [`crate::audit::AuditedControl`], which the server serves around this one.
    async fn list_audit(
        &self,
        _: Request<wire::ListAuditRequest>,
    ) -> Result<Response<wire::ListAuditResponse>, Status> {
        Err(Status::unimplemented("served by audit::AuditedControl"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use serin_proto::wire::control_service_client::ControlServiceClient;
    use sha2::Digest;
    use tonic::transport::Channel;

    use super::*;
    use crate::server::testing::{FakeAgent, TestServer, hello};

    const LONG: Duration = Duration::from_secs(30);

    fn sha_hex(data: &[u8]) -> String {
        hex::encode(sha2::Sha256::digest(data))
    }

    async fn push(
        client: &mut ControlServiceClient<Channel>,
        service: &str,
        release: &str,
        data: &[u8],
    ) -> Result<wire::ReleaseInfo, Status> {
        let mut chunks: Vec<wire::PushArtifactChunk> = data
            .chunks(100_000)
            .map(|c| wire::PushArtifactChunk {
                data: c.to_vec().into(),
                ..Default::default()
            })
            .collect();
        chunks[0].service = service.into();
        chunks[0].release_id = release.into();
        Ok(client
            .push_artifact(futures::stream::iter(chunks))
            .await?
            .into_inner())
    }

    #[tokio::test]
    async fn pushed_releases_are_deduplicated_and_immutable() {
        let server = TestServer::start(LONG).await;
        let mut client = server.control_client().await;
        let a: Vec<u8> = (0..350_000u32).map(|i| (i % 199) as u8).collect();
        let b = b"another binary".to_vec();

        let info = push(&mut client, "web", "web-1", &a).await.unwrap();
        let rel = info.release.clone().unwrap();
        assert_eq!((rel.service.as_str(), rel.id.as_str()), ("web", "web-1"));
        assert_eq!(rel.sha256, sha_hex(&a));
        assert_eq!(rel.size, a.len() as u64);
        assert!(rel.url.is_empty());
        assert!(!info.deduplicated);
        // The blob is in the artifact store under its hash.
        let path = server.artifacts.path_of(&rel.sha256.parse().unwrap());
        assert_eq!(std::fs::read(path).unwrap(), a);

        // The same content again: fine, deduplicated, same record.
        let again = push(&mut client, "web", "web-1", &a).await.unwrap();
        assert!(again.deduplicated);
        assert_eq!(again.created_unix_ms, info.created_unix_ms);

        // Different content under the same id: refused, naming both hashes.
        let e = push(&mut client, "web", "web-1", &b).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
        assert!(e.message().contains(&sha_hex(&a)), "{e}");
        assert!(e.message().contains(&sha_hex(&b)), "{e}");

        // Same content under a new id: a new release sharing the blob.
        let other = push(&mut client, "web", "web-2", &a).await.unwrap();
        assert!(other.deduplicated);

        let list = client
            .list_releases(wire::ListReleasesRequest {
                service: "web".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<_> = list
            .releases
            .iter()
            .map(|r| r.release.as_ref().unwrap().id.clone())
            .collect();
        assert_eq!(ids, vec!["web-1", "web-2"]);
        let none = client
            .list_releases(wire::ListReleasesRequest {
                service: "db".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(none.releases.is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn a_bad_push_is_refused_naming_the_field() {
        let server = TestServer::start(LONG).await;
        let mut client = server.control_client().await;
        let e = push(&mut client, "Web", "web-1", b"x").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("push.service"), "{e}");
        let e = push(&mut client, "web", "../web", b"x").await.unwrap_err();
        assert!(e.message().contains("push.release id"), "{e}");
        let e = client
            .push_artifact(futures::stream::iter(vec![wire::PushArtifactChunk {
                manifest: String::new(),
                service: "web".into(),
                release_id: "web-1".into(),
                data: Default::default(),
            }]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("empty"), "{e}");
        assert!(server.store.releases(None).unwrap().is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn register_release_needs_a_url_and_keeps_ids_immutable() {
        let server = TestServer::start(LONG).await;
        let mut client = server.control_client().await;
        let rel = wire::Release {
            manifest: String::new(),
            service: "web".into(),
            id: "web-9".into(),
            sha256: "ab".repeat(32),
            size: 1234,
            url: "https://example.invalid/web-9".into(),
        };
        let info = client
            .register_release(rel.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.release.as_ref().unwrap(), &rel);
        assert!(!info.deduplicated);
        let again = client
            .register_release(rel.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(again.deduplicated);

        let mut changed = rel.clone();
        changed.sha256 = "cd".repeat(32);
        let e = client.register_release(changed).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
        assert!(
            e.message().contains(&"ab".repeat(32)) && e.message().contains(&"cd".repeat(32)),
            "{e}"
        );

        let mut no_url = rel.clone();
        no_url.id = "web-10".into();
        no_url.url = String::new();
        let e = client.register_release(no_url).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("release.url"), "{e}");

        let mut bad = rel;
        bad.sha256 = "nope".into();
        let e = client.register_release(bad).await.unwrap_err();
        assert!(e.message().contains("release.sha256"), "{e}");
        server.stop().await;
    }

    #[tokio::test]
    async fn list_hosts_filters_by_selector() {
        let server = TestServer::start(LONG).await;
        let mut agents = Vec::new();
        for (h, zone) in [("h1", "eu-1"), ("h2", "eu-2"), ("h3", "eu-1")] {
            agents.push(
                FakeAgent::attach(&server, hello(h, &[("zone", zone), ("role", "web")])).await,
            );
        }
        let mut client = server.control_client().await;
        let list = |selector: &str| wire::ListHostsRequest {
            selector: selector.into(),
            ..Default::default()
        };
        let hosts = client
            .list_hosts(list("zone=eu-1"))
            .await
            .unwrap()
            .into_inner()
            .hosts;
        let ids: Vec<_> = hosts.iter().map(|h| h.host_id.as_str()).collect();
        assert_eq!(ids, vec!["h1", "h3"]);
        assert!(hosts.iter().all(|h| h.connected));
        assert_eq!(hosts[0].hostname, "h1.test");
        assert_eq!(hosts[0].services[0].current_release, "web-1");

        let all = client
            .list_hosts(list(""))
            .await
            .unwrap()
            .into_inner()
            .hosts;
        assert_eq!(all.len(), 3);
        let set = client
            .list_hosts(list("zone in (eu-2),role=web"))
            .await
            .unwrap()
            .into_inner()
            .hosts;
        assert_eq!(set.len(), 1);

        let e = client.list_hosts(list("zone=")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(
            e.message()
                .contains("malformed selector \"zone=\": empty value"),
            "{e}"
        );
        drop(agents);
        server.stop().await;
    }

    /// `serin hosts` over 100,000 hosts known to the store (three labels, one service each, none
    /// of them attached), end to end over gRPC: the summary counts every host in one small
    /// answer, and `--all` pages through every host exactly once, each page far below the
    /// message-size limit. The times are printed, not asserted (speed is the benchmarks' job; the
    /// release figures are in BENCHMARKS.md: `cargo test --release -p serin-coordinator --lib
    /// hosts_at_100k -- --nocapture`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hosts_at_100k_in_the_store() {
        let server = TestServer::start(LONG).await;
        let n = 100_000;
        for i in 0..n {
            let (tx, _rx) = tokio::sync::mpsc::channel(1);
            let zone = format!("z{}", i % 7);
            let rack = format!("r{}", i % 300);
            let a = server
                .registry
                .attach(
                    hello(
                        &format!("host-{i:06}"),
                        &[("zone", &zone), ("rack", &rack), ("role", "web")],
                    ),
                    tx,
                    std::time::Instant::now(),
                    unix_ms_now(),
                )
                .unwrap();
            server.registry.detach(&a.host, a.conn_id);
        }
        let mut client = server.control_client().await;
        let t = std::time::Instant::now();
        let first = client
            .list_hosts(wire::ListHostsRequest {
                summary: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let summary_took = t.elapsed();
        assert_eq!(first.summary.as_ref().unwrap().hosts, n);
        let size = prost::Message::encoded_len(&first);
        let t = std::time::Instant::now();
        let (mut hosts, mut token, mut largest) = (0, String::new(), 0);
        loop {
            let page = client
                .list_hosts(wire::ListHostsRequest {
                    page_size: 2000,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            hosts += page.hosts.len();
            largest = largest.max(prost::Message::encoded_len(&page));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let all_took = t.elapsed();
        assert_eq!(hosts as u64, n);
        println!(
            "100,000 hosts: serin hosts (summary + first page) {summary_took:?}, {size} bytes; \
             --all {all_took:?}, largest page {largest} bytes"
        );
        assert!(
            size < 256 * 1024,
            "the summary and first page took {size} bytes"
        );
        assert!(
            largest < 1024 * 1024,
            "a page of 2,000 hosts took {largest} bytes"
        );
        server.stop().await;
    }

    /// More hosts than the largest page, some of them disconnected (known from the store's
    /// point of view, not attached): the default page, pages that follow each token to the last
    /// host exactly once, a page size clamped to the maximum, the summary over every page, and a
    /// token that is not one.
    #[tokio::test]
    async fn list_hosts_pages_through_more_hosts_than_a_page_and_summarises_them() {
        let server = TestServer::start(LONG).await;
        let n = MAX_HOSTS_PAGE * 2 + 123;
        let mut streams = Vec::new();
        for i in 0..n {
            let zone = ["a", "b", "c"][i % 3];
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let a = server
                .registry
                .attach(
                    hello(&format!("h{i:05}"), &[("zone", zone)]),
                    tx,
                    std::time::Instant::now(),
                    unix_ms_now(),
                )
                .unwrap();
            if i % 10 == 0 {
                server.registry.detach(&a.host, a.conn_id);
            }
            streams.push(rx);
        }
        let mut client = server.control_client().await;
        let req = |page_size: u32, page_token: &str, summary: bool| wire::ListHostsRequest {
            selector: String::new(),
            page_size,
            page_token: page_token.into(),
            summary,
        };

        let first = client
            .list_hosts(req(0, "", true))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            first.hosts.len(),
            DEFAULT_HOSTS_PAGE,
            "the default page size"
        );
        assert_eq!(
            first.next_page_token,
            format!("h{:05}", DEFAULT_HOSTS_PAGE - 1)
        );
        let summary = first.summary.expect("asked for a summary");
        assert_eq!(summary.hosts, n as u64);
        assert_eq!(summary.connected, (n - n.div_ceil(10)) as u64);
        let zones: Vec<(&str, u64)> = summary
            .labels
            .iter()
            .map(|c| (c.key.as_str(), c.count))
            .collect();
        let third = n as u64 / 3;
        assert_eq!(
            zones,
            [("zone=a", third + 1), ("zone=b", third), ("zone=c", third)]
        );
        assert_eq!(summary.states[0].key, "web running");
        assert_eq!(summary.states[0].count, n as u64);
        assert_eq!(summary.releases[0].key, "web=web-1");

        let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let page = client
                .list_hosts(req(u32::MAX, &token, false))
                .await
                .unwrap()
                .into_inner();
            assert!(page.summary.is_none(), "no summary unless asked");
            assert!(page.hosts.len() <= MAX_HOSTS_PAGE, "page size clamped");
            pages += 1;
            seen.extend(page.hosts.into_iter().map(|h| (h.host_id, h.connected)));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(pages, 3);
        let expected: Vec<(String, bool)> =
            (0..n).map(|i| (format!("h{i:05}"), i % 10 != 0)).collect();
        assert_eq!(
            seen, expected,
            "every host once, in order, connected or not"
        );

        // A selector pages over the selected hosts only.
        let mut zone_b = client
            .list_hosts(wire::ListHostsRequest {
                selector: "zone=b".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(zone_b.hosts.len(), 1000);
        let rest = client
            .list_hosts(wire::ListHostsRequest {
                selector: "zone=b".into(),
                page_size: 1000,
                page_token: std::mem::take(&mut zone_b.next_page_token),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(zone_b.hosts.len() + rest.hosts.len(), n / 3);
        assert!(rest.next_page_token.is_empty());

        let e = client
            .list_hosts(req(0, "no such token!", false))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(e.message().contains("page_token"), "{e}");
        drop(streams);
        server.stop().await;
    }

    #[tokio::test]
    async fn rollout_calls_are_forwarded_to_the_engine() {
        let server = TestServer::start(LONG).await;
        let mut client = server.control_client().await;
        let e = client
            .get_rollout(wire::RolloutRef {
                rollout_id: "r-404".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("r-404"), "{e}");
        let e = client
            .watch_rollout(wire::RolloutRef {
                rollout_id: "r-404".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = client
            .list_rollouts(wire::ListRolloutsRequest {
                service: "Bad!".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        server.stop().await;
    }

    #[tokio::test]
    async fn watch_streams_every_change_until_the_rollout_finishes() {
        use crate::rollout::{Rollout, RolloutState, plan, testing};
        let base = {
            let spec = testing::spec(&["100%"]);
            let hosts = vec![testing::host("h1", "a", "web-1")];
            let p = plan::plan(&spec, &hosts);
            Rollout::new("r-1", spec, testing::release(), &p, Default::default(), 1).status()
        };
        let status = |state: RolloutState| RolloutView {
            state,
            ..base.clone()
        };
        let (tx, rx) = watch::channel(status(RolloutState::Running));
        let mut stream = watch_stream(rx, CancellationToken::new(), (0, 0));
        assert_eq!(
            stream.next().await.unwrap().unwrap().state().as_str(),
            "running"
        );
        tx.send(status(RolloutState::Paused)).unwrap();
        assert_eq!(
            stream.next().await.unwrap().unwrap().state().as_str(),
            "paused"
        );
        tx.send(status(RolloutState::Succeeded)).unwrap();
        let last = stream.next().await.unwrap().unwrap();
        assert!(last.finished);
        assert!(
            stream.next().await.is_none(),
            "the stream ends after a finished status"
        );

        // A shutdown ends a watch that would otherwise wait forever.
        let (_tx, rx) = watch::channel(status(RolloutState::Running));
        let shutdown = CancellationToken::new();
        let mut stream = watch_stream(rx, shutdown.clone(), (0, 0));
        assert!(stream.next().await.unwrap().is_ok());
        shutdown.cancel();
        let e = stream.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(stream.next().await.is_none());
    }
}
