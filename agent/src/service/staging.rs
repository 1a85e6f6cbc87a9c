//! Staging: a stage runs as its own task (download, verify, install through the release
//! store); its end either answers the order or begins the activation it was for. A newer order
//! preempts a stage in progress: it is cancelled, its partial download removed, its order
//! answered CANCELLED, and only then does the newer order act.

use serin_proto::wire::{OrderPhase, ResultCode};
use serin_proto::{Order, Release};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::activation::Deadlines;
use crate::orders;
use crate::release_store::{FetchOpener, StageError, Staged};

use super::{ServiceTask, Upstream};

pub(super) struct StageJob {
    pub(super) order: Order,
    pub(super) release: Release,
    pub(super) cancel: CancellationToken,
    /// Activate after staging (an activate order whose release was not on disk).
    pub(super) activate: Option<Deadlines>,
}

/// The result of a stage task, a panicked task being an I/O failure of the stage.
pub(super) fn flatten_stage(
    done: Result<Result<Staged, StageError>, tokio::task::JoinError>,
) -> Result<Staged, StageError> {
    done.unwrap_or_else(|e| {
        Err(StageError::Io {
            what: "stage task failed".into(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

impl ServiceTask {
    /// Cancels the stage in progress, if any, on behalf of `by`; returns once the stage task
    /// has ended and removed its partial download, after its order was answered CANCELLED.
    pub(super) async fn preempt_stage(
        &mut self,
        by: &Order,
        jobs: &mut JoinSet<Result<Staged, StageError>>,
    ) {
        self.last_preempted = None;
        let Some(job) = &self.job else {
            return;
        };
        tracing::info!(service = self.name(), release = %job.release.id, stage_seq = job.order.seq, by_seq = by.seq, "order preempts the stage in progress");
        job.cancel.cancel();
        let id = job.release.id.to_string();
        let result = match jobs.join_next().await {
            Some(done) => flatten_stage(done),
            None => Err(StageError::Cancelled {
                release: id.clone(),
            }),
        };
        self.stage_done(result, Some(by.seq)).await;
        self.last_preempted = Some(id);
    }

    /// Hands the stage in progress to `activate`, an activate order of the same release: the
    /// download goes on and the activation begins once it is staged. The stage's own order is
    /// answered CANCELLED (superseded), naming the order that took it over.
    pub(super) async fn adopt_stage(&mut self, activate: Order, deadlines: Deadlines) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        let by = activate.seq;
        let stage = std::mem::replace(&mut job.order, activate);
        job.activate = Some(deadlines);
        let msg = format!(
            "order seq {by} activates release {} and takes over its staging",
            job.release.id
        );
        let release = job.release.id.to_string();
        tracing::info!(
            service = self.name(),
            release,
            stage_seq = stage.seq,
            by_seq = by,
            "activation takes over the stage in progress"
        );
        self.reply(&stage, OrderPhase::Cancelled, ResultCode::Cancelled, msg)
            .await;
    }

    /// Spawns the stage task for `release`; `activate`: begin the activation once it is staged.
    pub(super) fn start_stage(
        &mut self,
        order: Order,
        release: Release,
        activate: Option<Deadlines>,
        jobs: &mut JoinSet<Result<Staged, StageError>>,
    ) {
        let cancel = CancellationToken::new();
        let (store, fetcher, rel, token) = (
            self.store.clone(),
            self.ctx.fetcher.clone(),
            release.clone(),
            cancel.clone(),
        );
        let upstream = self.ctx.upstream.clone();
        let mut progress_base = orders::result(
            &order,
            OrderPhase::Progress,
            ResultCode::Ok,
            "downloading",
            self.store.current().as_deref(),
        );
        progress_base.last_seq = self.state.last_seq;
        let policy = self.ctx.stage_policy;
        tracing::info!(service = self.name(), release = %release.id, size = release.size, "staging release");
        jobs.spawn(async move {
            let step = (rel.size / 10).max(1 << 20);
            let last = std::sync::atomic::AtomicU64::new(0);
            let progress = |done: u64| {
                let prev = last.load(std::sync::atomic::Ordering::Relaxed);
                if done >= prev + step || done == rel.size {
                    last.store(done, std::sync::atomic::Ordering::Relaxed);
                    let mut r = progress_base.clone();
                    r.bytes_done = done;
                    let _ = upstream.try_send(Upstream::Result(r));
                }
            };
            let opener = FetchOpener {
                fetcher: &fetcher,
                release: &rel,
            };
            store.stage(&rel, &opener, &progress, &token, policy).await
        });
        self.job = Some(StageJob {
            order,
            release,
            cancel,
            activate,
        });
        self.publish_inventory();
    }

    /// A stage task ended. `preempted_by`: the sequence of the order that cancelled it; a stage
    /// that completed anyway stays on disk but is not activated.
    pub(super) async fn stage_done(
        &mut self,
        result: Result<Staged, StageError>,
        preempted_by: Option<u64>,
    ) {
        let Some(job) = self.job.take() else {
            return;
        };
        if let Some(by) = preempted_by {
            let msg = match &result {
                Ok(_) => {
                    self.staged = Some(job.release.id.to_string());
                    format!(
                        "release {} was staged, but order seq {by} superseded this order",
                        job.release.id
                    )
                }
                Err(StageError::Cancelled { .. }) => format!(
                    "staging of release {} cancelled by order seq {by}",
                    job.release.id
                ),
                Err(e) => format!("{e}; order seq {by} superseded this order"),
            };
            self.reply(
                &job.order,
                OrderPhase::Cancelled,
                ResultCode::Cancelled,
                msg,
            )
            .await;
            self.publish_inventory();
            return;
        }
        match result {
            Ok(staged) => {
                let how = match staged {
                    Staged::AlreadyInstalled => "was already on disk and verified",
                    Staged::Installed => "downloaded and verified",
                };
                tracing::info!(service = self.name(), release = %job.release.id, how, "release staged");
                // No pruning here: between staging and the swap the staged release is in no
                // other protected slot. Pruning runs when an activation ends.
                match job.activate {
                    None => {
                        self.staged = Some(job.release.id.to_string());
                        let msg = format!("release {} {how}", job.release.id);
                        self.reply(&job.order, OrderPhase::Staged, ResultCode::Ok, msg)
                            .await;
                    }
                    Some(deadlines) => {
                        self.begin_activation(&job.order, job.release.id.to_string(), deadlines)
                            .await
                    }
                }
            }
            Err(e) => {
                tracing::warn!(service = self.name(), release = %job.release.id, error = %e, "staging failed");
                self.reply(&job.order, OrderPhase::Failed, e.code(), e.to_string())
                    .await;
            }
        }
        self.publish_inventory();
    }
}
