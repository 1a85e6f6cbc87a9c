//! The activation driver: executes the pure activation machine's commands in order — persist
//! the journal (a forward step whose record cannot be written stops the activation), swap
//! `current`, restart the service, report, finish — feeding back the inputs they produce.
//! Restarts and pruning of old releases live here too.

use std::collections::VecDeque;

use serin_proto::wire::{self, OrderPhase, ResultCode};
use serin_proto::{Order, OrderAction, Release};
use tokio::task::JoinSet;

use crate::activation::{self, Activation, Command, Deadlines, OrderRef, Outcome, Phase};
use crate::fault;
use crate::hooks::SwapKind;
use crate::release_store::{StageError, Staged, unix_ms};
use crate::state::ServiceState;

use super::ServiceTask;

impl ServiceTask {
    /// Activates `release`: at once if it is on disk and verified, else after staging it; an
    /// activation already in flight refuses it as busy.
    pub(super) async fn activate_order(
        &mut self,
        order: Order,
        release: Release,
        deadlines: Deadlines,
        jobs: &mut JoinSet<Result<Staged, StageError>>,
    ) {
        if let Some(a) = &self.state.activation {
            let msg = format!(
                "release {} is still being activated; confirm or roll it back first",
                a.to
            );
            self.reply(&order, OrderPhase::Failed, ResultCode::Busy, msg)
                .await;
            return;
        }
        let id = release.id.to_string();
        if self.store.current().as_deref() == Some(id.as_str()) {
            // A weight step for the release already current: applied at once, nothing swapped.
            if let OrderAction::Activate {
                traffic_weight: Some(w),
                ..
            } = &order.action
            {
                self.apply_weight(*w);
                self.weight_before = None;
            }
            self.reply(
                &order,
                OrderPhase::Activated,
                ResultCode::Ok,
                format!("release {id} is already current"),
            )
            .await;
            self.reply(
                &order,
                OrderPhase::Healthy,
                ResultCode::Ok,
                format!("release {id} is already current"),
            )
            .await;
            return;
        }
        match self.store.installed(&id) {
            Some(meta) if meta.sha256 == release.sha256.to_hex() => {
                self.begin_activation(&order, id, deadlines).await
            }
            _ => self.start_stage(order, release, Some(deadlines), jobs),
        }
    }

    /// Starts the activation machine for `to` (journal first, then swap).
    pub(super) async fn begin_activation(
        &mut self,
        order: &Order,
        to: String,
        deadlines: Deadlines,
    ) {
        let offered = match &order.action {
            OrderAction::Activate { release, .. } => release.manifest.as_deref(),
            _ => None,
        };
        if let Err(refusal) = self.check_installed(&to, offered) {
            self.reply(order, OrderPhase::Failed, refusal.code, refusal.message)
                .await;
            return;
        }
        let from = self.store.current();
        if self.staged.as_deref() == Some(to.as_str()) {
            // From now on the journal protects it.
            self.staged = None;
        }
        if let Err(evidence) = self.validate_hook(&to).await {
            let msg =
                format!("release {to} refused by its validate hook, nothing swapped: {evidence}");
            tracing::warn!(service = self.name(), release = %to, %evidence, "validate hook failed");
            self.reply(order, OrderPhase::Failed, ResultCode::HookFailed, msg)
                .await;
            return;
        }
        tracing::info!(service = self.name(), from = ?from, to = %to, "activating release");
        let from_running = from.is_some();
        let drain = self.cfg.traffic.behind_load_balancer() && from_running;
        if drain && let Err(msg) = self.check_not_last_server(&to).await {
            tracing::warn!(service = self.name(), release = %to, reason = %msg, "activation refused");
            self.reply(
                order,
                OrderPhase::Failed,
                ResultCode::LastServingServer,
                msg,
            )
            .await;
            return;
        }
        let weight = match &order.action {
            OrderAction::Activate { traffic_weight, .. } => *traffic_weight,
            _ => None,
        };
        if let Some(w) = weight
            && !drain
        {
            // Nothing to undrain (a first install, or no load balancer): the weight applies now.
            self.apply_weight(w);
        }
        let step = Activation::begin_with(
            OrderRef {
                order_id: order.order_id.clone(),
                rollout_id: order.rollout_id.clone(),
                seq: order.seq,
            },
            from,
            to,
            deadlines,
            // A first install has nothing serving to drain.
            drain,
            weight,
        );
        self.drive(step).await;
    }

    /// Removes the oldest releases beyond `keep_releases`, never one that is current, the
    /// rollback target, staged for activation, being staged, or named by an in-flight
    /// activation journal. Runs on a blocking thread: deleting a large release and fsyncing
    /// must not stall the other tasks on the runtime.
    pub(super) async fn prune(&mut self) {
        let protect = protected_releases(
            self.store.current(),
            &self.state,
            self.job.as_ref().map(|j| j.release.id.to_string()),
            self.staged.clone(),
        );
        let (store, keep) = (self.store.clone(), self.cfg.keep_releases);
        let removed = tokio::task::spawn_blocking(move || {
            let protect: Vec<&str> = protect.iter().map(String::as_str).collect();
            store.prune(keep, &protect)
        })
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(service = self.name(), error = %e, "pruning old releases failed");
            Vec::new()
        });
        for id in removed {
            tracing::info!(service = self.name(), release = %id, "pruned old release");
        }
    }

    /// Restarts the service into what `current` points at. No probe result about the previous
    /// process, nor one of a probe started before the restart, counts for the new one.
    pub(super) async fn restart_service(&mut self) -> Result<(), String> {
        self.pause_probes();
        let r = self.manager.restart().await.map_err(|e| e.to_string());
        self.new_generation();
        if let Ok(s) = self.manager.status().await {
            self.restart_baseline = s.restarts;
            self.last_status = s;
        }
        r
    }

    /// Steps the activation in flight with `input` and executes what it says.
    pub(super) async fn feed(&mut self, input: activation::Input) {
        let Some(a) = self.state.activation.take() else {
            return;
        };
        let step = a.step(input);
        self.drive(step).await;
    }

    /// Executes the machine's commands, feeding back the inputs they produce.
    pub(super) async fn drive(&mut self, (next, commands): activation::Step) {
        self.state.activation = next;
        let mut queue: VecDeque<Command> = commands.into();
        while let Some(cmd) = queue.pop_front() {
            let feedback = match cmd {
                Command::Persist => {
                    let phase = self.state.activation.as_ref().map(|a| a.phase.clone());
                    // A result reported right after this record goes into the same write
                    // (one write, not two: a crash leaves both or neither), and out after it.
                    let result = match queue.front() {
                        Some(Command::Report { .. }) => match queue.pop_front() {
                            Some(Command::Report {
                                order,
                                release,
                                phase,
                                code,
                                message,
                                current,
                            }) => {
                                let message = self.with_evidence(message);
                                let r = self
                                    .order_result(&order, &release, phase, code, message, current);
                                self.state.record(&r);
                                Some(r)
                            }
                            _ => None,
                        },
                        _ => None,
                    };
                    if let Err(e) = self.state_file.save(&self.state) {
                        let required = self
                            .state
                            .activation
                            .as_ref()
                            .is_some_and(Activation::journal_required);
                        tracing::error!(service = self.name(), error = %e, stops_activation = required, "cannot persist the activation journal");
                        if required {
                            // No step runs unless its journal record is durable.
                            queue.clear();
                            if let Some(a) = self.state.activation.take() {
                                let (next, more) = a.step(activation::Input::JournalFailed {
                                    message: e.to_string(),
                                });
                                self.state.activation = next;
                                queue.extend(more);
                            }
                            continue;
                        }
                    }
                    match phase {
                        Some(Phase::Journaled) => fault::point("activate-journaled"),
                        Some(Phase::Swapped) => fault::point("activate-swapped-journaled"),
                        Some(Phase::Armed {
                            reported_healthy: false,
                            ..
                        }) => fault::point("confirm-wait"),
                        Some(Phase::Armed {
                            reported_healthy: true,
                            ..
                        }) => fault::point("activate-healthy-journaled"),
                        Some(Phase::RollingBack { .. }) => fault::point("rollback-journaled"),
                        Some(Phase::RollbackSwapped { .. }) => {
                            fault::point("rollback-swapped-journaled")
                        }
                        Some(Phase::Abandoning { .. }) | None => {}
                    }
                    if let Some(r) = result {
                        fault::point("result-recorded");
                        self.send(r, false).await;
                    }
                    None
                }
                Command::Swap(id) => {
                    let rolling_back = matches!(
                        self.state.activation.as_ref().map(|a| &a.phase),
                        Some(Phase::RollingBack { .. } | Phase::Abandoning { .. })
                    );
                    match self.store.swap_current(&id) {
                        Ok(()) => {
                            tracing::info!(service = self.name(), release = %id, rolling_back, "current swapped");
                            fault::point(if rolling_back {
                                "rollback-swapped"
                            } else {
                                "activate-swapped"
                            });
                            Some(activation::Input::Swapped)
                        }
                        Err(e) => {
                            // The swap is atomic: current still points where it did.
                            let a = self.state.activation.take();
                            let _ = self.state_file.save(&self.state);
                            if let Some(a) = a {
                                let msg = format!("cannot point current at release {id}: {e}");
                                let current = self.store.current();
                                self.report_for(
                                    &a.order,
                                    &a.to,
                                    OrderPhase::Failed,
                                    ResultCode::IoError,
                                    msg,
                                    current,
                                )
                                .await;
                            }
                            self.ensure_running().await;
                            self.undrain_after_finish();
                            self.publish_inventory();
                            return;
                        }
                    }
                }
                Command::Restart => {
                    let forward = matches!(
                        self.state.activation.as_ref().map(|a| &a.phase),
                        Some(Phase::Swapped)
                    );
                    match self.restart_service().await {
                        Ok(()) => {
                            fault::point(if forward {
                                "activate-restarted"
                            } else {
                                "rollback-restarted"
                            });
                            // The incoming release's post-start hook, before health gating.
                            let kind = if forward {
                                SwapKind::Activate
                            } else {
                                SwapKind::Rollback
                            };
                            match self.post_start_hook(kind).await {
                                Ok(()) => Some(activation::Input::Started { now_ms: unix_ms() }),
                                Err(message) => {
                                    tracing::warn!(service = self.name(), error = %message, "post-start hook failed");
                                    Some(activation::Input::HookFailed { message })
                                }
                            }
                        }
                        Err(message) => {
                            tracing::warn!(service = self.name(), error = %message, "service failed to start");
                            Some(activation::Input::StartFailed { message })
                        }
                    }
                }
                Command::Drain => {
                    self.drain().await;
                    Some(activation::Input::Drained)
                }
                Command::Undrain { weight, rollback } => {
                    match weight {
                        Some(w) => self.apply_weight(w),
                        None if rollback => self.restore_weight(),
                        None => {}
                    }
                    self.undrain().await;
                    None
                }
                Command::Report {
                    order,
                    release,
                    phase,
                    code,
                    message,
                    current,
                } => {
                    let message = self.with_evidence(message);
                    match queue.front() {
                        // The activation's last result and its end: one write, then the
                        // result goes out.
                        Some(Command::Finish { .. }) => {
                            let r =
                                self.order_result(&order, &release, phase, code, message, current);
                            self.state.record(&r);
                            if let Some(Command::Finish { outcome, from, to }) = queue.pop_front() {
                                self.finish_reporting(outcome, from, to, Some(r)).await;
                            }
                        }
                        _ => {
                            self.report_for(&order, &release, phase, code, message, current)
                                .await
                        }
                    }
                    None
                }
                Command::Finish { outcome, from, to } => {
                    self.finish(outcome, from, to).await;
                    None
                }
            };
            if let Some(input) = feedback
                && let Some(a) = self.state.activation.take()
            {
                let (next, more) = a.step(input);
                self.state.activation = next;
                queue.extend(more);
            }
        }
        self.publish_inventory();
    }

    /// Sends (and records) a result for the activation's order.
    pub(super) async fn report_for(
        &mut self,
        order: &OrderRef,
        release: &str,
        phase: OrderPhase,
        code: ResultCode,
        message: String,
        current: Option<String>,
    ) {
        let r = self.order_result(order, release, phase, code, message, current);
        self.send(r, true).await;
    }

    /// A result for the activation's order, saying how far this agent's sequence is.
    fn order_result(
        &self,
        order: &OrderRef,
        release: &str,
        phase: OrderPhase,
        code: ResultCode,
        message: String,
        current: Option<String>,
    ) -> wire::OrderResult {
        wire::OrderResult {
            order_id: order.order_id.clone(),
            rollout_id: order.rollout_id.clone(),
            seq: order.seq,
            service: self.name().to_string(),
            release: release.to_string(),
            phase: phase as i32,
            code: code as i32,
            message,
            current_release: current.unwrap_or_default(),
            bytes_done: 0,
            last_seq: self.state.last_seq,
            last_epoch: self.state.last_epoch,
        }
    }

    /// Ends the activation: clears the journal, records previous/confirmed, then prunes.
    pub(super) async fn finish(&mut self, outcome: Outcome, from: Option<String>, to: String) {
        self.finish_reporting(outcome, from, to, None).await
    }

    /// [`finish`](Self::finish), with the activation's last result (already recorded in the
    /// state) written in the same write and sent after it, before the pruning.
    async fn finish_reporting(
        &mut self,
        outcome: Outcome,
        from: Option<String>,
        to: String,
        result: Option<wire::OrderResult>,
    ) {
        tracing::info!(service = self.name(), release = %to, outcome = ?outcome, "activation finished");
        self.state.activation = None;
        self.undrain_after_finish();
        self.evidence.clear();
        // The weight in force now is the one to keep; a later rollback does not go back past it.
        self.weight_before = None;
        match outcome {
            Outcome::Kept => {
                self.raise_floor(&to);
                if from.as_deref() != Some(to.as_str()) {
                    self.state.previous = from;
                }
                self.state.confirmed = Some(to);
            }
            Outcome::RolledBack => {
                self.state.confirmed = from;
            }
            Outcome::FailedInPlace | Outcome::Abandoned => {}
        }
        if let Err(e) = self.state_file.save(&self.state) {
            tracing::error!(service = self.name(), error = %e, "cannot persist the end of the activation");
        }
        if let Some(r) = result {
            fault::point("result-recorded");
            self.send(r, false).await;
        }
        fault::point("activation-finished");
        // The activation is over and persisted: only now may old releases go.
        self.prune().await;
    }
}

/// The releases pruning must keep whatever their age: `current`, the rollback target
/// (`previous`) and the last confirmed release, both ends of an in-flight activation journal,
/// the release being staged (`job`) and the one staged for a coming activation (`staged`).
fn protected_releases(
    current: Option<String>,
    state: &ServiceState,
    job: Option<String>,
    staged: Option<String>,
) -> Vec<String> {
    let journal = state
        .activation
        .as_ref()
        .map(|a| [a.from.clone(), Some(a.to.clone())]);
    [
        current,
        state.previous.clone(),
        state.confirmed.clone(),
        job,
        staged,
    ]
    .into_iter()
    .chain(journal.into_iter().flatten())
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::test_support::{journal, state};

    #[test]
    fn pruning_protects_staged_journaled_current_and_previous() {
        let s = state(
            Some("web-1"),
            Some(journal(Some("web-2"), "web-3", Phase::Journaled)),
        );
        let p = protected_releases(
            Some("web-2".into()),
            &s,
            Some("web-5".into()),
            Some("web-4".into()),
        );
        for id in ["web-1", "web-2", "web-3", "web-4", "web-5"] {
            assert!(p.iter().any(|r| r == id), "{id} not protected: {p:?}");
        }
        assert!(protected_releases(None, &ServiceState::default(), None, None).is_empty());
    }
}
