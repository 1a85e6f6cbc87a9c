//! The service task's side of the load balancer and of the lifecycle hooks: executing the
//! activation machine's [`Command::Drain`](crate::activation::Command::Drain) and
//! [`Command::Undrain`](crate::activation::Command::Undrain) through the agent-check state, and
//! running the incoming release's `validate` and `post-start` hooks.
//!
//! Every line of evidence (drain timings, time out of rotation, hook outcomes and output) is
//! collected in `ServiceTask::evidence` and appended to the next result the task sends, so it
//! shows in the host's progress and in `explain`.

use std::time::{Duration, Instant};

use crate::health;
use crate::hooks::{self, Hook, HookStatus, SwapKind};
use crate::traffic::{AdminState, DrainVerdict, DrainWait, TrafficState};

use super::ServiceTask;

/// How often a drain re-reads the session count, and an undrain re-probes the checks.
const POLL: Duration = Duration::from_millis(50);

impl ServiceTask {
    /// Answers `drain` on the agent-check port, then waits until the server is idle (HAProxy
    /// shows it out of rotation with no session open) or the drain timeout passed. Without a
    /// session count (`traffic.haproxy_socket`) the whole timeout is waited. Records the
    /// outcome and its timing in the evidence. Nothing to do for a service without a load
    /// balancer.
    pub(super) async fn drain(&mut self) {
        let Some(traffic) = &self.traffic else {
            return;
        };
        let started = Instant::now();
        if traffic.get().admin() != AdminState::Drain {
            traffic.update(TrafficState::drain);
            self.drained_at = Some(started);
        }
        let timeout = self.cfg.traffic.drain_timeout;
        let wait = DrainWait::new(started, timeout);
        let mut warned = false;
        let verdict = loop {
            let sessions = match &self.cfg.traffic.haproxy {
                None => None,
                Some(server) => match server.sessions().await {
                    Ok(s) if s.out_of_rotation() => Some(s.scur),
                    // HAProxy has not polled the drain yet: a 0 would mean nothing.
                    Ok(_) => None,
                    Err(e) => {
                        if !warned {
                            tracing::warn!(service = self.name(), error = %e, "cannot read the drained server's sessions");
                            warned = true;
                        }
                        None
                    }
                },
            };
            match wait.decide(Instant::now(), sessions.unwrap_or(u64::MAX)) {
                DrainVerdict::Wait => tokio::time::sleep(POLL).await,
                DrainVerdict::TimedOut { after, .. } if sessions.is_none() => {
                    break format!(
                        "drain waited its whole timeout ({after:?}) without a session count \
                         (no traffic.haproxy_socket, or HAProxy had not seen the drain); swapping"
                    );
                }
                v => break v.evidence(),
            }
        };
        tracing::info!(service = self.name(), evidence = %verdict, "drain done");
        self.evidence.push(verdict);
    }

    /// Puts the server back into rotation: waits until the service passes each of its probed
    /// checks once (at most the drain timeout), then answers `ready` at the target weight, the
    /// slow-start ramp (if configured) starting now. Records how long the host was out of
    /// rotation.
    pub(super) async fn undrain(&mut self) {
        if self.traffic.is_none() {
            return;
        }
        let started = Instant::now();
        let limit = self.cfg.traffic.drain_timeout;
        let mut passing = false;
        while !passing {
            passing = true;
            for check in &self.cfg.checks {
                if matches!(check.kind, crate::config::CheckKind::Restarts { .. }) {
                    continue;
                }
                if !health::probe(&check.kind, check.timeout).await.ok {
                    passing = false;
                    break;
                }
            }
            if !passing {
                if started.elapsed() >= limit {
                    self.evidence.push(format!(
                        "checks still failing {limit:?} after the swap; back in rotation anyway"
                    ));
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
        }
        let Some(traffic) = &self.traffic else {
            return;
        };
        let now = Instant::now();
        traffic.update(|s| s.swapped(now).ready());
        let state = traffic.get();
        let out = self
            .drained_at
            .take()
            .map(|at| format!(" after {:?} out of rotation", now.duration_since(at)))
            .unwrap_or_default();
        let ramp = match self.cfg.traffic.slow_start {
            Some(s) => format!(
                ", slow start from {}% over {:?}",
                s.from_percent, s.duration
            ),
            None => String::new(),
        };
        let line = format!(
            "back in rotation{out}: ready at {}%{ramp}",
            state.target_weight()
        );
        tracing::info!(service = self.name(), evidence = %line, "undrained");
        self.evidence.push(line);
    }

    /// At the end of an activation, whatever its outcome, a drained server goes back into
    /// rotation: no host stays out of its load balancer after serin is done with it (a dead
    /// service is HAProxy's health checks' business).
    pub(super) fn undrain_after_finish(&mut self) {
        if let Some(traffic) = &self.traffic
            && traffic.get().admin() != AdminState::Ready
        {
            traffic.update(TrafficState::ready);
            self.drained_at = None;
            tracing::info!(
                service = self.name(),
                "back in rotation at the end of the activation"
            );
        }
    }

    /// Sets the target weight from an order (remembering the one it replaces, for a rollback).
    /// Without an agent-check port there is nothing to weigh: the evidence says so.
    pub(super) fn apply_weight(&mut self, percent: u8) {
        let Some(traffic) = &self.traffic else {
            self.evidence.push(format!(
                "traffic weight {percent}% ignored: the service has no traffic.agent_check"
            ));
            return;
        };
        let before = traffic.get().target_weight();
        // In range: the order was validated at the edge.
        if traffic.set_weight(u32::from(percent)).is_ok() {
            self.weight_before = Some(before);
            self.evidence
                .push(format!("traffic weight {percent}% (was {before}%)"));
        }
    }

    /// Refuses the drain of an activation to `to` when HAProxy (`traffic.haproxy_socket`) shows
    /// no other server of the backend serving: draining this one would leave the backend with
    /// none, every request failing until the swap is done. Without a stats socket there is
    /// nothing to read (the agent-check protocol says nothing about the other servers); when
    /// the socket cannot be read the drain goes ahead and the evidence says the check was not made.
    pub(super) async fn check_not_last_server(&mut self, to: &str) -> Result<(), String> {
        let Some(server) = &self.cfg.traffic.haproxy else {
            return Ok(());
        };
        match server.others_serving().await {
            Ok(others) if others.is_empty() => Err(format!(
                "release {to} not activated, nothing drained or swapped: draining {}/{} would \
                 leave backend {} with no serving server",
                server.backend, server.server, server.backend
            )),
            Ok(others) => {
                self.evidence.push(format!(
                    "backend {} keeps {} serving during the drain ({})",
                    server.backend,
                    others.len(),
                    others.join(",")
                ));
                Ok(())
            }
            Err(e) => {
                self.evidence.push(format!(
                    "could not check that backend {} keeps a serving server ({e}); draining anyway",
                    server.backend
                ));
                Ok(())
            }
        }
    }

    /// Restores the weight an order's weight replaced, after a rollback.
    pub(super) fn restore_weight(&mut self) {
        if let (Some(before), Some(traffic)) = (self.weight_before.take(), &self.traffic)
            && traffic.set_weight(u32::from(before)).is_ok()
        {
            self.evidence
                .push(format!("traffic weight restored to {before}%"));
        }
    }

    /// Runs the `validate` hook of release `to` (before anything is drained or swapped).
    /// `Err`: the hook failed, with its evidence.
    pub(super) async fn validate_hook(&mut self, to: &str) -> Result<(), String> {
        self.run_hook(SwapKind::Activate, Hook::Validate, to).await
    }

    /// Runs the `post-start` hook of the release `current` now points at, after its restart:
    /// blocking on an activation (`Err` with its evidence fails the start), evidence only on a
    /// rollback. Only the incoming release's hook ever runs.
    pub(super) async fn post_start_hook(&mut self, kind: SwapKind) -> Result<(), String> {
        let Some(current) = self.store.current() else {
            return Ok(());
        };
        self.run_hook(kind, Hook::PostStart, &current).await
    }

    async fn run_hook(&mut self, kind: SwapKind, hook: Hook, release: &str) -> Result<(), String> {
        let dir = self.store.release_dir(release);
        let Some(planned) = hooks::plan(kind, &dir).into_iter().find(|p| p.hook == hook) else {
            return Ok(());
        };
        let env = [("SERIN_SERVICE", self.name()), ("SERIN_RELEASE", release)];
        let outcome = hooks::run(&planned, &dir, &env, self.cfg.traffic.hook_timeout).await;
        if outcome.status == HookStatus::Absent {
            return Ok(());
        }
        let line = format!("release {release}: {}", outcome.evidence());
        tracing::info!(
            service = self.name(),
            release,
            hook = hook.file_name(),
            ok = outcome.ok(),
            "lifecycle hook ran"
        );
        if !outcome.ok() && planned.blocking {
            return Err(line);
        }
        self.evidence.push(line);
        Ok(())
    }

    /// `message` followed by the evidence gathered since the last result (which is then
    /// cleared).
    pub(super) fn with_evidence(&mut self, message: String) -> String {
        if self.evidence.is_empty() {
            return message;
        }
        let evidence = std::mem::take(&mut self.evidence).join("; ");
        format!("{message}; {evidence}")
    }
}
