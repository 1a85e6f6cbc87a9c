//! Starting, stopping and observing a managed service, behind the narrow [`ServiceManager`]
//! trait: [`systemd::Systemd`] drives a unit through `systemctl`, [`supervisor::Supervisor`]
//! runs the process itself.

pub mod supervisor;
pub mod systemd;

use futures::future::BoxFuture;

/// What a service manager knows about its service right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStatus {
    /// The process (or unit) is up.
    pub running: bool,
    /// Its main process id, if known.
    pub pid: Option<u32>,
    /// Restarts after unexpected exits, counted by the manager.
    pub restarts: u32,
    /// Human description, e.g. `active` or `exited with status 1`.
    pub detail: String,
}

/// Why a service manager operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{service}: {message}")]
pub struct ServiceError {
    /// The service (or unit).
    pub service: String,
    /// What went wrong.
    pub message: String,
}

/// Starts, stops and observes one service.
pub trait ServiceManager: Send + Sync + std::fmt::Debug {
    /// Starts the service if it is not running.
    fn start(&self) -> BoxFuture<'_, Result<(), ServiceError>>;
    /// Stops the service.
    fn stop(&self) -> BoxFuture<'_, Result<(), ServiceError>>;
    /// Restarts the service (so it runs what `current` points at now).
    fn restart(&self) -> BoxFuture<'_, Result<(), ServiceError>>;
    /// The service's current status.
    fn status(&self) -> BoxFuture<'_, Result<ServiceStatus, ServiceError>>;
    /// The release the running process was started from, when the manager knows it.
    fn running_release(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { None })
    }
}
