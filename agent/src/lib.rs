//! serin-agent: the daemon on every host. It stages, activates, checks and rolls back releases
//! of the services it manages, and streams health to the coordinator.
//!
//! Code map:
//! - [`config`]: the TOML config, parsed raw then validated.
//! - [`host_id`]: the host's stable id.
//! - [`connection`]: the `Attach` stream to the coordinator, with reconnect and a result queue.
//! - [`service`]: the one task per managed service; admits [`orders`], drives the
//!   [`activation`] machine, runs [`health`] checks.
//! - [`activation`]: the pure activation state machine and its journal.
//! - [`release_store`]: releases on disk, staging, the `current` symlink; downloads via [`fetch`].
//! - [`bundle`]: release bundles (binary + hooks in one tar artifact), checked and unpacked.
//! - [`state`]: the durable per-service state file; [`durable`] has the fsync recipes.
//! - [`service_manager`]: systemd and the built-in process supervisor.
//! - [`metrics`]: host and process metrics; [`fault`]: crash points for tests.
//! - [`hooks`]: lifecycle hooks (`validate`, `post-start`) of the incoming release.
//! - [`traffic`]: the HAProxy agent-check responder and the traffic state it answers from.
//! - [`liveness`]: the main loop's beat, which feeds systemd's watchdog.
//! - [`renew`]: renews the agent's certificate at two thirds of its lifetime over mTLS.
//! - [`enrol`]: `serin-agent enroll`: a key made on the host, a join token, the issued certificate.
//!
//! Architecture invariant: the current release keeps serving through every failure — a failed
//! stage never touches `current`, and an activation either completes or restores the previous
//! release, also across agent crashes (the journal is persisted before each step).

pub mod activation;
pub mod bundle;
pub mod config;
pub mod connection;
pub mod durable;
pub mod enrol;
pub mod fault;
pub mod fetch;
pub mod health;
pub mod hooks;
pub mod host_id;
pub mod liveness;
pub mod metrics;
pub mod orders;
pub mod release_store;
pub mod renew;
pub mod service;
pub mod service_manager;
pub mod state;
pub mod traffic;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

use crate::config::RunConfig;
use crate::service_manager::ServiceManager;
use crate::service_manager::supervisor::{Supervisor, SupervisorSpec};
use crate::service_manager::systemd::Systemd;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory is unusable.
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No host id.
    #[error(transparent)]
    HostId(#[from] host_id::HostIdError),
    /// The coordinator address is unusable.
    #[error("invalid coordinator address {address}: {problem}")]
    Coordinator {
        /// The address.
        address: String,
        /// What is wrong.
        problem: String,
    },
    /// A service could not be set up.
    #[error(transparent)]
    Service(#[from] service::ServiceInitError),
    /// A service's agent-check responder could not listen.
    #[error("service {service}: cannot listen for HAProxy's agent-check on {address}: {source}")]
    AgentCheck {
        /// The service.
        service: String,
        /// `traffic.agent_check`.
        address: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Knobs that are not part of the config file (tests and unusual hosts).
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the machine id is read from.
    pub machine_id_path: PathBuf,
    /// The `systemctl` program.
    pub systemctl: PathBuf,
    /// Beaten by the main loop (systemd readiness and watchdog, see [`liveness`]).
    pub liveness: liveness::Liveness,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            machine_id_path: PathBuf::from("/etc/machine-id"),
            systemctl: PathBuf::from("systemctl"),
            liveness: liveness::Liveness::new(),
        }
    }
}

/// Runs the agent until `shutdown` is cancelled. The managed services keep running afterwards.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    run_with(config, Options::default(), shutdown).await
}

/// [`run`] with explicit [`Options`].
pub async fn run_with(
    config: Config,
    options: Options,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| AgentError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let host_id = host_id::resolve(
        config.host_id.as_ref(),
        &options.machine_id_path,
        &config.state_dir,
    )?;
    let hostname = config.hostname.clone().unwrap_or_else(|| {
        sysinfo::System::host_name()
            .ok()
            .unwrap_or_else(|| host_id.to_string())
    });
    let (channel, reloadable) =
        connection::channel(&config, &host_id).map_err(|problem| AgentError::Coordinator {
            address: config.coordinator.clone(),
            problem,
        })?;
    let fetcher = fetch::Fetcher::new(channel.clone())
        .map_err(|problem| AgentError::Coordinator {
            address: config.coordinator.clone(),
            problem,
        })?
        .with_allowed_url_prefixes(config.allowed_url_prefixes.clone());
    let metrics = metrics::Metrics::new(config.state_dir.clone());
    let (up_tx, up_rx) = tokio::sync::mpsc::channel(1024);
    let tracker = TaskTracker::new();
    let tasks = shutdown.child_token();
    tracing::info!(host = %host_id, hostname = %hostname, services = config.services.len(), coordinator = %config.coordinator, "agent starting");

    let mut services = HashMap::new();
    for svc in &config.services {
        let service_dir = config.state_dir.join(svc.name.as_str());
        std::fs::create_dir_all(&service_dir).map_err(|source| AgentError::StateDir {
            path: service_dir.clone(),
            source,
        })?;
        let manager: Arc<dyn ServiceManager> = match &svc.run {
            RunConfig::Process { args, env } => Arc::new(Supervisor::spawn_with_swap(
                SupervisorSpec {
                    service: svc.name.to_string(),
                    service_dir,
                    binary: svc.binary.clone(),
                    args: args.clone(),
                    env: env.clone(),
                    stop_timeout: svc.stop_timeout,
                    restart_backoff: Duration::from_millis(100),
                    restart_backoff_max: Duration::from_secs(5),
                },
                svc.traffic.swap.clone(),
                &tracker,
                tasks.clone(),
            )),
            RunConfig::Systemd { unit } => {
                let m = Systemd::new(
                    unit.clone(),
                    options.systemctl.clone(),
                    service_dir.join("releases"),
                );
                // Swap mode `socket`: the socket unit holds the listening socket.
                Arc::new(match &svc.traffic.systemd_socket {
                    Some(socket) => m.with_socket(socket.clone()),
                    None => m,
                })
            }
        };
        // The agent-check responder's state is driven by the service task on each swap.
        let mut traffic_handle = None;
        if let Some(address) = svc.traffic.agent_check {
            let listener = match tokio::net::TcpListener::bind(address).await {
                Ok(l) => l,
                Err(source) => {
                    tasks.cancel();
                    tracker.close();
                    tracker.wait().await;
                    return Err(AgentError::AgentCheck {
                        service: svc.name.to_string(),
                        address,
                        source,
                    });
                }
            };
            let handle =
                traffic::TrafficHandle::new(traffic::TrafficState::new(svc.traffic.slow_start));
            traffic::AgentCheckResponder::spawn(
                svc.name.to_string(),
                listener,
                &handle,
                &tracker,
                tasks.clone(),
            )
            .map_err(|source| AgentError::AgentCheck {
                service: svc.name.to_string(),
                address,
                source,
            })?;
            traffic_handle = Some(handle);
        }
        let ctx = service::Context {
            fetcher: fetcher.clone(),
            metrics: metrics.clone(),
            upstream: up_tx.clone(),
            report_interval: config.report_interval,
            stage_policy: release_store::StagePolicy {
                retry_delay: Duration::from_millis(200),
                limits: config.download,
            },
        };
        let handle = match service::spawn(
            svc.clone(),
            &config.state_dir,
            manager,
            ctx,
            traffic_handle,
            &tracker,
            tasks.clone(),
        ) {
            Ok(h) => h,
            Err(e) => {
                tasks.cancel();
                tracker.close();
                tracker.wait().await;
                return Err(e.into());
            }
        };
        services.insert(svc.name.to_string(), handle);
    }
    drop(up_tx);
    let settings = connection::Settings {
        host_id,
        hostname,
        labels: config.labels.clone(),
        heartbeat_interval: config.heartbeat_interval,
        reconnect_initial: config.reconnect_initial,
        reconnect_max: config.reconnect_max,
        liveness: options.liveness.clone(),
    };
    if let Some(cert) = reloadable {
        tracker.spawn(renew::run(
            cert,
            settings.host_id.clone(),
            channel.clone(),
            tasks.clone(),
        ));
    }
    tracker.spawn(connection::run(
        settings,
        channel,
        services,
        up_rx,
        tasks.clone(),
    ));
    tracker.close();
    tasks.cancelled().await;
    tracker.wait().await;
    tracing::info!("agent stopped; managed services keep running");
    Ok(())
}
