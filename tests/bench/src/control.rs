//! Operator calls the bench makes: push a release, list hosts, start and follow a rollout.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serin_proto::wire;
use serin_proto::wire::control_service_client::ControlServiceClient;
use sha2::Digest as _;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use crate::connect::Connector;
use crate::sim_agent::SERVICE;
use crate::stats::unix_us;

/// An operator's client.
#[derive(Debug, Clone)]
pub struct Operator {
    client: ControlServiceClient<Channel>,
}

/// How a rollout went, as the operator saw it.
#[derive(Debug, Clone)]
pub struct RolloutRun {
    /// The final status.
    pub status: wire::RolloutStatus,
    /// Unix µs just before `StartRollout` was sent.
    pub started_us: u64,
    /// From `StartRollout` to a finished status on the watch.
    pub wall: Duration,
    /// Per wave: (hosts, wall time from its start to the next wave's start or the end).
    pub waves: Vec<(u32, Duration)>,
    /// From `StartRollout` until every host of a succeeded rollout was confirmed (the last
    /// wave's confirms go out with the final decision), when that happened in time.
    pub confirmed: Option<Duration>,
    /// The last full `GetRollout` (every host): how long it took and its encoded size.
    pub full_status: (Duration, usize),
    /// A summary `GetRollout` (waves, counts, one host): how long it took.
    pub summary_status: Duration,
}

impl Operator {
    /// Connects an operator channel.
    pub async fn connect(connector: &Connector) -> anyhow::Result<Self> {
        let client = ControlServiceClient::new(connector.channel("operator").await?)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024);
        Ok(Self { client })
    }

    /// Pushes `data` as release `id` of the simulated service, in 1 MiB chunks.
    pub async fn push(&mut self, id: &str, data: Vec<u8>) -> anyhow::Result<wire::Release> {
        let expected = hex::encode(sha2::Sha256::digest(&data));
        let mut chunks: Vec<wire::PushArtifactChunk> = data
            .chunks(1024 * 1024)
            .map(|c| wire::PushArtifactChunk {
                service: String::new(),
                release_id: String::new(),
                data: prost::bytes::Bytes::copy_from_slice(c),
                manifest: String::new(),
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(wire::PushArtifactChunk::default());
        }
        chunks[0].service = SERVICE.into();
        chunks[0].release_id = id.into();
        let info = self
            .client
            .push_artifact(futures::stream::iter(chunks))
            .await
            .with_context(|| format!("pushing release {id}"))?
            .into_inner();
        let release = info.release.context("push answered without a release")?;
        anyhow::ensure!(
            release.sha256 == expected,
            "the coordinator stored {} for {id}, expected {expected}",
            release.sha256
        );
        Ok(release)
    }

    /// `ListHosts` as `serin hosts` asks it: the summary and the first page (hosts counted by
    /// the summary, time the call took, response size in bytes).
    pub async fn list_hosts_summary(&mut self) -> anyhow::Result<(usize, Duration, usize)> {
        let t = Instant::now();
        let r = self
            .client
            .list_hosts(wire::ListHostsRequest {
                summary: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        let elapsed = t.elapsed();
        let hosts = r.summary.as_ref().map_or(0, |s| s.hosts);
        Ok((
            usize::try_from(hosts)?,
            elapsed,
            prost::Message::encoded_len(&r),
        ))
    }

    /// `ListHosts` page after page as `serin hosts --all` asks it: (hosts, time for all pages,
    /// size of the largest response in bytes).
    pub async fn list_hosts(&mut self) -> anyhow::Result<(usize, Duration, usize)> {
        let t = Instant::now();
        let (mut hosts, mut largest, mut page_token) = (0, 0, String::new());
        loop {
            let r = self
                .client
                .list_hosts(wire::ListHostsRequest {
                    page_size: 2000,
                    page_token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            hosts += r.hosts.len();
            largest = largest.max(prost::Message::encoded_len(&r));
            if r.next_page_token.is_empty() {
                break;
            }
            page_token = r.next_page_token;
        }
        Ok((hosts, t.elapsed(), largest))
    }

    /// Starts a rollout of `release` with `waves` and zero-ish bake, and follows it until it
    /// finishes or `timeout` passes.
    pub async fn rollout(
        &mut self,
        release: &str,
        waves: &[String],
        timeout: Duration,
    ) -> anyhow::Result<RolloutRun> {
        let spec = wire::RolloutSpec {
            service: SERVICE.into(),
            release: release.into(),
            waves: waves.to_vec(),
            // 0 means "the coordinator's default" (30 s, 5 s): 1 ms is the smallest explicit value.
            bake_ms: 1,
            canary_bake_ms: 1,
            min_healthy_ms: 1,
            healthy_deadline_ms: 60_000,
            progress_deadline_ms: 600_000,
            ..Default::default()
        };
        let started_us = unix_us();
        let t0 = Instant::now();
        let started = self
            .client
            .start_rollout(spec)
            .await
            .context("StartRollout")?
            .into_inner();
        let id = started.rollout_id.clone();
        let deadline = t0 + timeout;
        let mut last = started;
        while !last.finished {
            anyhow::ensure!(
                Instant::now() < deadline,
                "rollout {id} did not finish within {timeout:?}: {} wave {}",
                last.state().as_str(),
                last.current_wave
            );
            let mut watch = match self
                .client
                .watch_rollout(wire::RolloutRef {
                    rollout_id: id.clone(),
                    // A summary: waves and counts, one host (the bench reads every host once,
                    // at the end).
                    host_limit: 1,
                    ..Default::default()
                })
                .await
            {
                Ok(w) => w.into_inner(),
                Err(e) => {
                    tracing::warn!(error = %e, "watch failed; polling");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    last = self
                        .client
                        .get_rollout(wire::RolloutRef {
                            rollout_id: id.clone(),
                            host_limit: 1,
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    continue;
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let followed = tokio::time::timeout(left, async {
                while let Some(s) = watch.next().await {
                    match s {
                        Ok(s) => {
                            let done = s.finished;
                            last = s;
                            if done {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "watch broke");
                            break;
                        }
                    }
                }
            })
            .await;
            if followed.is_err() {
                anyhow::bail!(
                    "rollout {id} did not finish within {timeout:?}: {} wave {}",
                    last.state().as_str(),
                    last.current_wave
                );
            }
        }
        let wall = t0.elapsed();
        let end_ms = started_us / 1000 + u64::try_from(wall.as_millis()).unwrap_or(u64::MAX);
        let mut waves = Vec::new();
        for (i, w) in last.waves.iter().enumerate() {
            let next = last
                .waves
                .get(i + 1)
                .map_or(end_ms, |n| n.started_unix_ms.max(w.started_unix_ms));
            let took = if w.started_unix_ms == 0 {
                0
            } else {
                next.saturating_sub(w.started_unix_ms)
            };
            waves.push((w.size, Duration::from_millis(took)));
        }
        // Until every host is confirmed (or failed), bounded: the CPU "after" is measured once
        // the rollout's work is really over.
        let settle_by = Instant::now() + Duration::from_secs(15);
        let mut confirmed = None;
        let mut full_status;
        loop {
            let t = Instant::now();
            let full = self
                .client
                .get_rollout(wire::RolloutRef {
                    rollout_id: id.clone(),
                    ..Default::default()
                })
                .await
                .context("GetRollout")?
                .into_inner();
            full_status = (t.elapsed(), prost::Message::encoded_len(&full));
            let settled = full.hosts.iter().all(|h| {
                matches!(
                    h.phase(),
                    wire::HostPhase::Confirmed
                        | wire::HostPhase::Failed
                        | wire::HostPhase::RolledBack
                        | wire::HostPhase::Skipped
                )
            });
            last = full;
            if settled {
                confirmed = Some(t0.elapsed());
                break;
            }
            if last.state() != wire::RolloutState::Succeeded || Instant::now() > settle_by {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t = Instant::now();
        self.client
            .get_rollout(wire::RolloutRef {
                rollout_id: id.clone(),
                host_limit: 1,
                ..Default::default()
            })
            .await
            .context("GetRollout (summary)")?;
        let summary_status = t.elapsed();
        Ok(RolloutRun {
            status: last,
            started_us,
            wall,
            waves,
            confirmed,
            full_status,
            summary_status,
        })
    }
}
