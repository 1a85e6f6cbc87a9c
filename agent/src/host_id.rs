//! The host's stable id: the config's `host_id`, else `/etc/machine-id`, else an id generated
//! once and persisted in `<state_dir>/host-id`.

use std::io;
use std::path::Path;

use serin_proto::HostId;

use crate::durable;

/// Why no host id could be found or made.
#[derive(Debug, thiserror::Error)]
pub enum HostIdError {
    /// The persisted host id could not be read or written.
    #[error("host id file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The persisted host id is not a valid id.
    #[error("host id file {path} holds an invalid id: {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
}

/// Resolves the host id: `configured`, else the machine-id at `machine_id_path`, else the id
/// persisted in `<state_dir>/host-id` (generated and written on first use).
pub fn resolve(
    configured: Option<&HostId>,
    machine_id_path: &Path,
    state_dir: &Path,
) -> Result<HostId, HostIdError> {
    if let Some(h) = configured {
        return Ok(h.clone());
    }
    if let Ok(text) = std::fs::read_to_string(machine_id_path)
        && let Ok(id) = HostId::new(text.trim())
    {
        return Ok(id);
    }
    let path = state_dir.join("host-id");
    let io_err = |source| HostIdError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return HostId::new(text.trim()).map_err(|e| HostIdError::Invalid {
                path: path.display().to_string(),
                problem: e.problem,
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let bytes: [u8; 16] = rand::random();
    let id = HostId::new(hex::encode(bytes)).map_err(|e| HostIdError::Invalid {
        path: path.display().to_string(),
        problem: e.problem,
    })?;
    std::fs::create_dir_all(state_dir).map_err(io_err)?;
    durable::write_atomic(&path, format!("{id}\n").as_bytes()).map_err(io_err)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_then_machine_id_then_generated_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let mid = dir.path().join("machine-id");
        let state = dir.path().join("state");
        let configured = HostId::new("web-01").unwrap();
        assert_eq!(
            resolve(Some(&configured), &mid, &state).unwrap(),
            configured
        );

        std::fs::write(&mid, "0123abcd\n").unwrap();
        assert_eq!(resolve(None, &mid, &state).unwrap().as_str(), "0123abcd");

        std::fs::remove_file(&mid).unwrap();
        let generated = resolve(None, &mid, &state).unwrap();
        assert_eq!(generated.as_str().len(), 32);
        assert_eq!(
            resolve(None, &mid, &state).unwrap(),
            generated,
            "id not stable"
        );
        let on_disk = std::fs::read_to_string(state.join("host-id")).unwrap();
        assert_eq!(on_disk.trim(), generated.as_str());
    }
}
