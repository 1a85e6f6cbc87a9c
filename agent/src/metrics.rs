//! Host and process metrics (sysinfo) for health reports: CPU, memory, load, free disk of the
//! state directory, and the service process's RSS and CPU.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serin_proto::wire::{HostMetrics, ProcessMetrics};
use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System};

/// Samples metrics; cheap to clone, shared by the service tasks.
#[derive(Clone)]
pub struct Metrics {
    system: Option<Arc<Mutex<System>>>,
    state_dir: PathBuf,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

impl Metrics {
    /// A sampler reporting the free space of `state_dir`'s file system.
    pub fn new(state_dir: PathBuf) -> Self {
        let system = match System::new() {
            Ok(s) => Some(Arc::new(Mutex::new(s))),
            Err(e) => {
                tracing::warn!(error = %e, "host metrics unavailable");
                None
            }
        };
        Metrics { system, state_dir }
    }

    /// Host metrics now.
    pub fn host(&self) -> HostMetrics {
        let mut m = HostMetrics {
            disk_free_bytes: crate::release_store::free_space(&self.state_dir).unwrap_or(0),
            load1: System::load_average().map(|l| l.one).unwrap_or(0.0),
            ..Default::default()
        };
        if let Some(sys) = &self.system
            && let Ok(mut sys) = sys.lock()
        {
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            m.cpu_percent = sys.global_cpu_usage();
            m.memory_total_bytes = sys.total_memory();
            m.memory_used_bytes = sys.used_memory();
        }
        m
    }

    /// Metrics of the process `pid` (`None`: not running).
    pub fn process(&self, pid: Option<u32>, restarts: u32) -> ProcessMetrics {
        let mut m = ProcessMetrics {
            running: pid.is_some(),
            pid: pid.unwrap_or(0),
            restarts,
            ..Default::default()
        };
        if let (Some(pid), Some(sys)) = (pid, &self.system)
            && let Ok(mut sys) = sys.lock()
        {
            let pid = sysinfo::Pid::from_u32(pid);
            sys.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                true,
                ProcessRefreshKind::nothing().with_memory().with_cpu(),
            );
            if let Some(p) = sys.process(pid) {
                m.rss_bytes = p.memory();
                m.cpu_percent = p.cpu_usage();
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process_and_host() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new(dir.path().to_path_buf());
        let host = m.host();
        assert!(host.memory_total_bytes > 0);
        assert!(host.disk_free_bytes > 0);
        let p = m.process(Some(std::process::id()), 2);
        assert!(p.running);
        assert!(p.rss_bytes > 0);
        assert_eq!(p.restarts, 2);
    }
}
