//! Releases of the demo service: behaviour carried in a trailer appended to the executable.
//!
//! A release of `serin-demo-service` is its own executable plus a trailer:
//!
//! ```text
//! <ELF bytes> <behaviour as JSON> <JSON length: u32 little endian> <TRAILER_MAGIC (16 bytes)>
//! ```
//!
//! The ELF loader ignores the bytes after the image, so every release runs the same code but has
//! its own sha256 and behaviour (version string, crash at start, unhealthy after a delay, slow
//! health answers, slow start, slow stop). The demo service reads the trailer from `/proc/self/exe` at start;
//! [`DemoRelease::build`] makes releases for tests by running `serin-demo-service make-release`.

use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Last bytes of a release carrying a trailer.
pub const TRAILER_MAGIC: &[u8; 16] = b"SERIN-DEMO-TRLR1";

/// Largest trailer JSON accepted when reading one back.
const MAX_TRAILER_JSON: usize = 64 * 1024;

/// What a demo release does, as carried in its trailer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Behaviour {
    /// The string `GET /version` answers with.
    pub version: String,
    /// Exit with status 1 immediately at start.
    #[serde(default)]
    pub crash_at_start: bool,
    /// Answer `GET /healthz` with 500 from this many seconds after start on.
    #[serde(default)]
    pub unhealthy_after_secs: Option<u64>,
    /// Sleep this many milliseconds before answering `GET /healthz`.
    #[serde(default)]
    pub slow_health_ms: Option<u64>,
    /// On SIGTERM, keep serving (new connections too) this many milliseconds before exiting: a
    /// service draining slowly.
    #[serde(default)]
    pub slow_stop_ms: Option<u64>,
    /// Wait this many milliseconds after start before listening (a slow starter: a JVM, a
    /// service warming its cache).
    #[serde(default)]
    pub listen_after_ms: Option<u64>,
}

impl Behaviour {
    /// A healthy release answering `version`.
    pub fn healthy(version: &str) -> Self {
        Self {
            version: version.to_owned(),
            crash_at_start: false,
            unhealthy_after_secs: None,
            slow_health_ms: None,
            slow_stop_ms: None,
            listen_after_ms: None,
        }
    }

    /// The behaviour of an executable without a trailer: version "dev", healthy.
    pub fn dev() -> Self {
        Self::healthy("dev")
    }

    /// The same behaviour, crashing at start.
    pub fn crashing_at_start(mut self) -> Self {
        self.crash_at_start = true;
        self
    }

    /// The same behaviour, turning unhealthy `secs` seconds after start.
    pub fn unhealthy_after(mut self, secs: u64) -> Self {
        self.unhealthy_after_secs = Some(secs);
        self
    }

    /// The same behaviour, taking `ms` milliseconds to exit after SIGTERM.
    pub fn slow_stop(mut self, ms: u64) -> Self {
        self.slow_stop_ms = Some(ms);
        self
    }

    /// The same behaviour, listening only `ms` milliseconds after start.
    pub fn listen_after(mut self, ms: u64) -> Self {
        self.listen_after_ms = Some(ms);
        self
    }

    /// The same behaviour, answering health checks after `ms` milliseconds.
    pub fn slow_health(mut self, ms: u64) -> Self {
        self.slow_health_ms = Some(ms);
        self
    }
}

/// Splits `bytes` into the executable image and the trailer's behaviour, if it has one.
pub fn split_trailer(bytes: &[u8]) -> anyhow::Result<(&[u8], Option<Behaviour>)> {
    let magic_at = match bytes.len().checked_sub(TRAILER_MAGIC.len()) {
        Some(at) if &bytes[at..] == TRAILER_MAGIC => at,
        _ => return Ok((bytes, None)),
    };
    let Some(len_at) = magic_at.checked_sub(4) else {
        bail!("demo release trailer is cut short: no room for its length");
    };
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&bytes[len_at..magic_at]);
    let json_len = u32::from_le_bytes(len_bytes) as usize;
    if json_len > MAX_TRAILER_JSON {
        bail!("demo release trailer claims {json_len} bytes of JSON, at most {MAX_TRAILER_JSON}");
    }
    let Some(json_at) = len_at.checked_sub(json_len) else {
        bail!("demo release trailer claims {json_len} bytes of JSON, more than the file holds");
    };
    let behaviour: Behaviour = serde_json::from_slice(&bytes[json_at..len_at])
        .context("demo release trailer is not valid behaviour JSON")?;
    Ok((&bytes[..json_at], Some(behaviour)))
}

/// `image` (without any trailer it had) followed by a trailer for `behaviour`.
pub fn with_trailer(image: &[u8], behaviour: &Behaviour) -> anyhow::Result<Vec<u8>> {
    let (image, _) = split_trailer(image)?;
    let json = serde_json::to_vec(behaviour)?;
    let json_len = u32::try_from(json.len()).context("behaviour JSON too long")?;
    let mut out = Vec::with_capacity(image.len() + json.len() + 20);
    out.extend_from_slice(image);
    out.extend_from_slice(&json);
    out.extend_from_slice(&json_len.to_le_bytes());
    out.extend_from_slice(TRAILER_MAGIC);
    Ok(out)
}

/// Reads the behaviour from the trailer of the executable at `path`; [`Behaviour::dev`] without one.
pub fn read_behaviour(path: &Path) -> anyhow::Result<Behaviour> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, behaviour) = split_trailer(&bytes)
        .with_context(|| format!("reading the trailer of {}", path.display()))?;
    Ok(behaviour.unwrap_or_else(Behaviour::dev))
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A built release of the demo service, ready to be served to an agent.
#[derive(Clone)]
pub struct DemoRelease {
    /// The release id, which is also the version string `/version` answers with.
    pub id: String,
    /// What the release does.
    pub behaviour: Behaviour,
    /// The whole artifact.
    pub bytes: Vec<u8>,
    /// Lowercase hex sha256 of `bytes`.
    pub sha256: String,
    /// `bytes.len()`.
    pub size: u64,
}

impl std::fmt::Debug for DemoRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoRelease")
            .field("id", &self.id)
            .field("behaviour", &self.behaviour)
            .field("sha256", &self.sha256)
            .field("size", &self.size)
            .finish()
    }
}

impl DemoRelease {
    /// Makes a release with `behaviour` (its version is the release id) by running
    /// `serin-demo-service make-release`, so the CLI is exercised as users run it.
    pub fn build(behaviour: Behaviour) -> Self {
        let dir = tempfile::tempdir().expect("creating a tempdir for a demo release");
        let out = dir.path().join("release");
        let mut cmd = std::process::Command::new(crate::binaries::demo_service());
        cmd.arg("make-release")
            .arg("--version")
            .arg(&behaviour.version)
            .arg("--out")
            .arg(&out);
        if behaviour.crash_at_start {
            cmd.arg("--crash-at-start");
        }
        if let Some(secs) = behaviour.unhealthy_after_secs {
            cmd.arg("--unhealthy-after").arg(secs.to_string());
        }
        if let Some(ms) = behaviour.slow_health_ms {
            cmd.arg("--slow-health-ms").arg(ms.to_string());
        }
        if let Some(ms) = behaviour.slow_stop_ms {
            cmd.arg("--slow-stop-ms").arg(ms.to_string());
        }
        if let Some(ms) = behaviour.listen_after_ms {
            cmd.arg("--listen-after-ms").arg(ms.to_string());
        }
        let output = cmd
            .output()
            .expect("running serin-demo-service make-release");
        assert!(
            output.status.success(),
            "serin-demo-service make-release for {behaviour:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let bytes = std::fs::read(&out).expect("reading the made demo release");
        let (_, read_back) = split_trailer(&bytes).expect("the made demo release has a trailer");
        assert_eq!(
            read_back.as_ref(),
            Some(&behaviour),
            "trailer of the made release"
        );
        Self::from_bytes(behaviour, bytes)
    }

    /// A healthy release with version `id`.
    pub fn healthy(id: &str) -> Self {
        Self::build(Behaviour::healthy(id))
    }

    /// Wraps already built bytes.
    pub fn from_bytes(behaviour: Behaviour, bytes: Vec<u8>) -> Self {
        Self {
            id: behaviour.version.clone(),
            sha256: sha256_hex(&bytes),
            size: bytes.len() as u64,
            behaviour,
            bytes,
        }
    }

    /// The wire release for `service`, served by the coordinator (`url` empty) or from `url`.
    pub fn wire(&self, service: &str, url: &str) -> serin_proto::wire::Release {
        serin_proto::wire::Release {
            manifest: String::new(),
            service: service.to_owned(),
            id: self.id.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            url: url.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailer_round_trip() {
        let image = b"\x7fELF pretend image".to_vec();
        let b = Behaviour::healthy("web-2.0")
            .unhealthy_after(3)
            .slow_health(250);
        let release = with_trailer(&image, &b).unwrap();
        let (img, got) = split_trailer(&release).unwrap();
        assert_eq!(img, &image[..]);
        assert_eq!(got, Some(b.clone()));

        // Re-trailering a release replaces its trailer instead of stacking a second one.
        let b2 = Behaviour::healthy("web-3.0").crashing_at_start();
        let release2 = with_trailer(&release, &b2).unwrap();
        let (img2, got2) = split_trailer(&release2).unwrap();
        assert_eq!(img2, &image[..]);
        assert_eq!(got2, Some(b2));
        assert_ne!(sha256_hex(&release), sha256_hex(&release2));
    }

    #[test]
    fn no_trailer_means_dev() {
        let (img, got) = split_trailer(b"plain binary").unwrap();
        assert_eq!(img, b"plain binary");
        assert_eq!(got, None);
    }

    #[test]
    fn corrupt_trailer_is_an_error() {
        let mut bytes = b"x".to_vec();
        bytes.extend_from_slice(&1000u32.to_le_bytes());
        bytes.extend_from_slice(TRAILER_MAGIC);
        let err = split_trailer(&bytes).unwrap_err().to_string();
        assert!(err.contains("more than the file holds"), "{err}");
    }
}
