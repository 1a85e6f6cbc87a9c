//! Orders in: each order's sequence is admitted (duplicate → its stored results again, lower →
//! `STALE_ORDER`) and persisted before anything is done, a newer order preempts a stage in
//! progress, then the order is dispatched; rollback, confirm and hold are handled here, stage
//! and activate go to [`super::staging`] and [`super::driver`].

use serin_proto::wire::{OrderPhase, ResultCode};
use serin_proto::{Order, OrderAction};
use tokio::task::JoinSet;

use crate::activation::{self, Deadlines, OrderRef};
use crate::fault;
use crate::orders::{self, Admission};
use crate::release_store::{StageError, Staged, unix_ms};

use super::ServiceTask;

impl ServiceTask {
    /// Admits an order (duplicate, stale or new), persists a new sequence, then carries it out.
    pub(super) async fn handle_order(
        &mut self,
        order: Order,
        jobs: &mut JoinSet<Result<Staged, StageError>>,
    ) {
        tracing::info!(service = self.name(), seq = order.seq, order = %order.order_id, action = order.action.kind(), "order received");
        let in_progress = self.job.as_ref().is_some_and(|j| j.order.seq == order.seq)
            || self
                .state
                .activation
                .as_ref()
                .is_some_and(|a| a.order.seq == order.seq);
        match orders::admit(&self.state, &order) {
            Admission::Duplicate(results) if results.is_empty() && !in_progress => {
                // Admitted (its sequence persisted) but never carried out or answered: the agent
                // died in between. Nothing of it took effect, so it is carried out now.
                tracing::info!(
                    service = self.name(),
                    seq = order.seq,
                    "order admitted before an agent restart was never answered; carrying it out"
                );
                self.act(order, jobs).await;
                return;
            }
            Admission::Duplicate(results) => {
                tracing::info!(
                    service = self.name(),
                    seq = order.seq,
                    n = results.len(),
                    "duplicate order; re-sending its results"
                );
                for r in results {
                    self.send(r, false).await;
                }
                return;
            }
            Admission::Stale { last_seq } => {
                let current = self.store.current();
                let r = orders::result(
                    &order,
                    OrderPhase::Rejected,
                    ResultCode::StaleOrder,
                    format!(
                        "order seq {} is older than the last applied seq {last_seq}",
                        order.seq
                    ),
                    current.as_deref(),
                );
                self.send(r, false).await;
                return;
            }
            Admission::Replayed { last_epoch } => {
                tracing::warn!(
                    service = self.name(),
                    seq = order.seq,
                    epoch = order.epoch,
                    last_epoch,
                    "order of an older coordinator epoch refused as a replay"
                );
                let current = self.store.current();
                let r = orders::result(
                    &order,
                    OrderPhase::Rejected,
                    ResultCode::ReplayedOrder,
                    format!(
                        "order seq {} of coordinator epoch {} is a replay: this host already \
                         accepted orders of epoch {last_epoch}",
                        order.seq, order.epoch
                    ),
                    current.as_deref(),
                );
                self.send(r, false).await;
                return;
            }
            Admission::Apply => {}
        }
        // Persist the sequence before acting: a crash now must not apply it twice. A confirm
        // (with no weight to apply) changes nothing before its answer, and every way it ends
        // writes the state with its answer (the activation's end, or a recorded reply): its
        // sequence goes in that one write, so a crash leaves both or neither.
        self.state.last_seq = order.seq;
        self.state.last_epoch = self.state.last_epoch.max(order.epoch);
        let written_with_answer = matches!(
            order.action,
            OrderAction::Confirm {
                traffic_weight: None,
                ..
            }
        );
        if written_with_answer {
            self.act(order, jobs).await;
            return;
        }
        if let Err(e) = self.state_file.save(&self.state) {
            tracing::error!(service = self.name(), error = %e, "cannot persist order sequence");
            let current = self.store.current();
            let r = orders::result(
                &order,
                OrderPhase::Failed,
                ResultCode::IoError,
                e.to_string(),
                current.as_deref(),
            );
            self.send(r, false).await;
            return;
        }
        fault::point("order-admitted");
        self.act(order, jobs).await;
    }

    /// Carries out an admitted order whose sequence is durable.
    async fn act(&mut self, order: Order, jobs: &mut JoinSet<Result<Staged, StageError>>) {
        // Prepare, then activate: an activation of the very release being staged takes the
        // stage's download over instead of cancelling it and starting again.
        if let OrderAction::Activate {
            release,
            healthy_deadline,
            min_healthy,
            confirm_deadline,
            ..
        } = &order.action
            && self.state.activation.is_none()
            && self.job.as_ref().is_some_and(|j| {
                j.activate.is_none()
                    && j.release.id == release.id
                    && j.release.sha256 == release.sha256
            })
            && self.admit_release(release).is_ok()
        {
            let deadlines = Deadlines {
                healthy_deadline_ms: healthy_deadline.as_millis() as u64,
                min_healthy_ms: min_healthy.as_millis() as u64,
                confirm_deadline_ms: confirm_deadline.map(|d| d.as_millis() as u64),
            };
            self.adopt_stage(order, deadlines).await;
            return;
        }
        // A newer order that changes what runs or what is staged preempts the stage in
        // progress: cancel it, wait until its partial download is removed, then act. A confirm
        // is about the armed activation and leaves the stage alone.
        if matches!(
            order.action,
            OrderAction::Stage { .. }
                | OrderAction::Activate { .. }
                | OrderAction::Rollback { .. }
                | OrderAction::Cancel
        ) {
            self.preempt_stage(&order, jobs).await;
        }
        if let OrderAction::Stage { release } | OrderAction::Activate { release, .. } =
            &order.action
            && let Err(refusal) = self.admit_release(release)
        {
            self.reply(&order, OrderPhase::Failed, refusal.code, refusal.message)
                .await;
            return;
        }
        match order.action.clone() {
            OrderAction::Stage { release } => self.start_stage(order, release, None, jobs),
            OrderAction::Activate {
                release,
                healthy_deadline,
                min_healthy,
                confirm_deadline,
                ..
            } => {
                let deadlines = Deadlines {
                    healthy_deadline_ms: healthy_deadline.as_millis() as u64,
                    min_healthy_ms: min_healthy.as_millis() as u64,
                    confirm_deadline_ms: confirm_deadline.map(|d| d.as_millis() as u64),
                };
                self.activate_order(order, release, deadlines, jobs).await;
            }
            OrderAction::Rollback { to } => {
                self.rollback_order(order, to.map(|t| t.to_string())).await
            }
            OrderAction::Confirm {
                release,
                traffic_weight,
            } => {
                self.confirm_order(order, release.to_string(), traffic_weight)
                    .await
            }
            OrderAction::Cancel => {
                let msg = match self.last_preempted.take() {
                    Some(id) => format!("staging of release {id} cancelled"),
                    None => "nothing in progress to cancel".to_owned(),
                };
                self.reply(&order, OrderPhase::Cancelled, ResultCode::Ok, msg)
                    .await;
            }
        }
    }

    /// Points `current` at the rollback target (`to`, else the previous release) and restarts,
    /// superseding an activation in flight; the release already current and running is left alone.
    pub(super) async fn rollback_order(&mut self, order: Order, to: Option<String>) {
        let current = self.store.current();
        let target = to.or_else(|| self.state.previous.clone());
        let Some(target) = target else {
            self.reply(
                &order,
                OrderPhase::Failed,
                ResultCode::UnknownRelease,
                format!(
                    "service {} has no previous release to roll back to",
                    self.name()
                ),
            )
            .await;
            return;
        };
        if self.store.installed(&target).is_none() {
            self.reply(
                &order,
                OrderPhase::Failed,
                ResultCode::UnknownRelease,
                format!("release {target} of service {} is not on disk", self.name()),
            )
            .await;
            return;
        }
        if self.state.activation.is_none() && current.as_deref() == Some(target.as_str()) {
            // Already there (the host rolled back by itself, or the order is repeated): a
            // running service is left alone, a stopped one is started.
            let running = self
                .manager
                .status()
                .await
                .map(|s| s.running)
                .unwrap_or(false);
            if running {
                self.state.confirmed = Some(target.clone());
                if let Err(e) = self.state_file.save(&self.state) {
                    tracing::warn!(service = self.name(), error = %e, "cannot persist the confirmed release");
                }
                let msg =
                    format!("release {target} is already current and running; nothing restarted");
                self.reply(&order, OrderPhase::RolledBack, ResultCode::Ok, msg)
                    .await;
                return;
            }
        }
        if current.as_deref() != Some(target.as_str())
            && let Err(refusal) = self.check_installed(&target, None)
        {
            self.reply(&order, OrderPhase::Failed, refusal.code, refusal.message)
                .await;
            return;
        }
        if let Some(a) = self.state.activation.take() {
            tracing::info!(service = self.name(), release = %a.to, "rollback order supersedes the activation in progress");
        }
        // Behind a load balancer the ordered rollback is drained like an activation.
        self.drain().await;
        if current.as_deref() != Some(target.as_str()) {
            if let Err(e) = self.store.swap_current(&target) {
                self.undrain_after_finish();
                self.reply(
                    &order,
                    OrderPhase::Failed,
                    ResultCode::IoError,
                    format!("cannot point current at release {target}: {e}"),
                )
                .await;
                return;
            }
            fault::point("ordered-rollback-swapped");
            self.state.previous = current.clone();
        }
        self.state.confirmed = Some(target.clone());
        if let Err(e) = self.state_file.save(&self.state) {
            tracing::warn!(service = self.name(), error = %e, "cannot persist the rolled-back release");
        }
        fault::point("ordered-rollback-saved");
        let restarted = self.restart_service().await;
        if restarted.is_ok() {
            // Only the restored release's own hook; its failure is evidence, never a stop.
            let _ = self.post_start_hook(crate::hooks::SwapKind::Rollback).await;
            self.undrain().await;
        }
        self.undrain_after_finish();
        match restarted {
            Ok(()) => {
                let msg = match current.as_deref() {
                    Some(c) if c == target => {
                        format!("release {target} was current but not running; started it")
                    }
                    c => format!(
                        "rolled back from {} to release {target}",
                        c.unwrap_or("nothing")
                    ),
                };
                self.reply(&order, OrderPhase::RolledBack, ResultCode::Ok, msg)
                    .await;
            }
            Err(e) => {
                self.reply(
                    &order,
                    OrderPhase::Failed,
                    ResultCode::ServiceFailedToStart,
                    format!("release {target} is current but failed to start: {e}"),
                )
                .await;
            }
        }
    }

    /// Applies a `HoldConfirm`: an armed activation of that release gets a confirm deadline of
    /// at least now + the hold's deadline (journaled); a hold for another release, or with no
    /// activation armed, is ignored. Health failures still revert.
    pub(super) async fn hold(&mut self, hold: serin_proto::HoldConfirm) {
        let matches = self
            .state
            .activation
            .as_ref()
            .is_some_and(|a| a.is_armed() && a.to == hold.release.as_str());
        if !matches {
            tracing::debug!(service = self.name(), release = %hold.release, "hold for no armed activation of that release; ignored");
            return;
        }
        tracing::debug!(service = self.name(), release = %hold.release, confirm_deadline_ms = hold.confirm_deadline.as_millis() as u64, "coordinator holds the activation");
        self.feed(activation::Input::Hold {
            now_ms: unix_ms(),
            confirm_deadline_ms: hold.confirm_deadline.as_millis() as u64,
        })
        .await;
    }

    /// Confirms the armed activation of `release`, or says why there is nothing to confirm.
    pub(super) async fn confirm_order(
        &mut self,
        order: Order,
        release: String,
        traffic_weight: Option<u8>,
    ) {
        let confirmable = match &self.state.activation {
            Some(a) => a.to == release && a.is_armed(),
            None => self.store.current().as_deref() == Some(release.as_str()),
        };
        if let Some(w) = traffic_weight
            && confirmable
        {
            // The weight the confirmed release keeps (a weighted canary going to full
            // weight); a rollback after a confirm has no earlier weight to restore.
            self.apply_weight(w);
            self.weight_before = None;
        }
        match &self.state.activation {
            Some(a) if a.to == release && a.is_armed() => {
                let order = OrderRef {
                    order_id: order.order_id.clone(),
                    rollout_id: order.rollout_id.clone(),
                    seq: order.seq,
                };
                self.feed(activation::Input::Confirm { order }).await;
            }
            Some(a) if a.to == release => {
                let msg = format!(
                    "release {release} is not awaiting confirm (phase {:?})",
                    a.phase
                );
                self.reply(&order, OrderPhase::Failed, ResultCode::InvalidOrder, msg)
                    .await;
            }
            _ if self.store.current().as_deref() == Some(release.as_str()) => {
                self.reply(
                    &order,
                    OrderPhase::Confirmed,
                    ResultCode::Ok,
                    format!("release {release} is current and confirmed"),
                )
                .await;
            }
            _ => {
                let current = self.store.current().unwrap_or_else(|| "nothing".into());
                let msg =
                    format!("release {release} is not awaiting confirm; current is {current}");
                self.reply(&order, OrderPhase::Failed, ResultCode::InvalidOrder, msg)
                    .await;
            }
        }
    }
}
