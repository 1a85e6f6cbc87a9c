//! The release store of one service: verified releases under `releases/<id>/`, partial downloads
//! under `staging/`, and the `current` symlink.
//!
//! Everything for a service lives in one tree (`<state_dir>/<service>/`), so every rename stays
//! on one mount. A release directory only ever appears complete: the artifact is downloaded into
//! `staging/<sha256>.part`, verified, moved into a hidden temporary directory (a bundle —
//! [`crate::bundle`] — is unpacked there instead: its binary and hooks) with its `release.json`,
//! and that directory is renamed into place.

use prost::bytes::Bytes;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serin_proto::wire::ResultCode;
use serin_proto::{Release, ReleaseId, ServiceName};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::bundle;
use crate::config::DownloadLimits;
use crate::durable;
use crate::fault;
use crate::fetch::{Download, Fetcher};

/// The file in `releases/<id>/` that keeps the release's signed manifest, when it came with one.
pub const RELEASE_MANIFEST: &str = "release.manifest";

/// Extra free space required beyond the declared artifact size.
const SPACE_MARGIN: u64 = 16 << 20;
/// How many times a short or broken download is resumed before giving up.
const DOWNLOAD_ATTEMPTS: u32 = 5;

/// How a stage retries and when it gives up on a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagePolicy {
    /// Pause before the n-th retry of a broken download: n × this.
    pub retry_delay: Duration,
    /// Minimum rate and overall deadline.
    pub limits: DownloadLimits,
}

/// `release.json`: what was verified about an installed release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseMeta {
    /// Service name.
    pub service: String,
    /// Release id.
    pub id: String,
    /// Verified sha256 of the artifact (for a bundle: of the whole bundle), lowercase hex.
    pub sha256: String,
    /// Size in bytes of the installed binary (for a bare binary: the artifact's, verified).
    pub size: u64,
    /// When it was verified.
    pub verified_unix_ms: u64,
    /// The artifact was a bundle ([`crate::bundle`]): its verified size, which is what a
    /// manifest signs (`sha256` is the bundle's too). `None`: the artifact is the binary. `size`
    /// stays the binary's so that an older agent reading this record still finds the release
    /// complete (it never deletes a bundle's release as half-installed after a downgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_size: Option<u64>,
    /// The hooks the bundle carried (`validate`, `post-start`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<String>,
}

impl ReleaseMeta {
    /// The verified size of the artifact as downloaded (what a manifest signs).
    pub fn artifact_size(&self) -> u64 {
        self.artifact_size.unwrap_or(self.size)
    }
}

/// Why staging failed. The current release is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Not enough free space for the artifact.
    #[error(
        "not enough free space to stage release {release}: need {need} bytes, {free} free in {dir}"
    )]
    InsufficientSpace {
        /// Release id.
        release: String,
        /// Bytes needed (artifact plus margin).
        need: u64,
        /// Bytes free.
        free: u64,
        /// Where.
        dir: String,
    },
    /// The download failed repeatedly.
    #[error("download of release {release} failed: {reason}")]
    Download {
        /// Release id.
        release: String,
        /// Why.
        reason: String,
    },
    /// The artifact's size differs from the declared one.
    #[error("artifact size mismatch for release {release}: declared {expected} bytes, {got}")]
    SizeMismatch {
        /// Release id.
        release: String,
        /// Declared size.
        expected: u64,
        /// What was received.
        got: String,
    },
    /// The artifact's hash differs from the declared one.
    #[error("artifact sha256 mismatch for release {release}: expected {expected}, got {got}")]
    HashMismatch {
        /// Release id.
        release: String,
        /// Declared sha256.
        expected: String,
        /// Computed sha256.
        got: String,
    },
    /// A release with this id but another hash is already installed.
    #[error("release {release} is already installed with sha256 {installed}, not {requested}")]
    Conflict {
        /// Release id.
        release: String,
        /// Hash on disk.
        installed: String,
        /// Hash requested.
        requested: String,
    },
    /// The verified artifact is a bundle the agent refuses (unsafe path, link, device file,
    /// duplicate, over a bound, no binary, …).
    #[error("release {release} is a bundle the agent refuses: {source}")]
    Bundle {
        /// Release id.
        release: String,
        /// What is wrong with it.
        source: crate::bundle::BundleError,
    },
    /// The stage was cancelled.
    #[error("staging of release {release} was cancelled")]
    Cancelled {
        /// Release id.
        release: String,
    },
    /// A file-system operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: io::Error,
    },
}

impl StageError {
    /// The result code reported for this error.
    pub fn code(&self) -> ResultCode {
        match self {
            StageError::InsufficientSpace { .. } => ResultCode::InsufficientSpace,
            StageError::Download { .. } => ResultCode::DownloadFailed,
            StageError::SizeMismatch { .. } => ResultCode::SizeMismatch,
            StageError::HashMismatch { .. } => ResultCode::HashMismatch,
            StageError::Conflict { .. } => ResultCode::InvalidOrder,
            StageError::Bundle { .. } => ResultCode::BadBundle,
            StageError::Cancelled { .. } => ResultCode::Cancelled,
            StageError::Io { .. } => ResultCode::IoError,
        }
    }
}

/// Ends with the error that abandons a download which is too slow: fewer than
/// `min_bytes_per_sec` over a whole `rate_window` (measured in consecutive windows), or not
/// finished by the overall `deadline`. Never ends while the download keeps within both.
async fn watch_download(
    release: &str,
    size: u64,
    received: &AtomicU64,
    limits: DownloadLimits,
) -> StageError {
    let started = tokio::time::Instant::now();
    let deadline = started + limits.deadline;
    let mut window_start = started;
    let mut at_window_start = received.load(Ordering::Relaxed);
    loop {
        let window_end = window_start + limits.rate_window;
        if deadline <= window_end {
            tokio::time::sleep_until(deadline).await;
            let done = received.load(Ordering::Relaxed);
            return StageError::Download {
                release: release.into(),
                reason: format!(
                    "not finished within the download deadline of {} ({done} of {size} bytes)",
                    humantime::format_duration(limits.deadline)
                ),
            };
        }
        tokio::time::sleep_until(window_end).await;
        let done = received.load(Ordering::Relaxed);
        let got = done.saturating_sub(at_window_start);
        let need = (limits.min_bytes_per_sec as f64 * limits.rate_window.as_secs_f64()) as u64;
        if got < need {
            return StageError::Download {
                release: release.into(),
                reason: format!(
                    "too slow: {got} bytes in the last {}, below the minimum of {} bytes/s \
                     ({done} of {size} bytes)",
                    humantime::format_duration(limits.rate_window),
                    limits.min_bytes_per_sec
                ),
            };
        }
        window_start = window_end;
        at_window_start = done;
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StageError {
    let what = what.into();
    move |source| StageError::Io { what, source }
}

/// Runs blocking file-system work (large reads, fsyncs) on the blocking pool; `what` names the
/// file for the error if the thread itself fails.
async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, StageError> + Send + 'static,
) -> Result<T, StageError> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(StageError::Io {
            what: format!("blocking work on {what} failed"),
            source: io::Error::other(e),
        })
    })
}

/// Feeds the first `len` bytes of the file at `path` into `hasher`.
fn hash_prefix(mut hasher: Sha256, path: &Path, len: u64) -> io::Result<Sha256> {
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let n = n.min(left as usize);
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hasher)
}

/// A stream of artifact bytes.
pub trait ChunkSource: Send {
    /// The next chunk, `None` at the end (a view of the received buffer, not a copy).
    fn next_chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, String>> + Send;
}

/// Opens artifact streams at an offset.
pub trait Opener: Sync {
    /// The stream type.
    type Source: ChunkSource;
    /// Opens the artifact from byte `offset`.
    fn open(&self, offset: u64) -> impl Future<Output = Result<Self::Source, String>> + Send;
}

impl ChunkSource for Download {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.next().await
    }
}

/// Opens `release` through a [`Fetcher`].
#[derive(Debug)]
pub struct FetchOpener<'a> {
    /// The fetcher.
    pub fetcher: &'a Fetcher,
    /// The release.
    pub release: &'a Release,
}

impl Opener for FetchOpener<'_> {
    type Source = Download;
    async fn open(&self, offset: u64) -> Result<Download, String> {
        self.fetcher.open(self.release, offset).await
    }
}

/// Whether `stage` downloaded anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staged {
    /// The release was already installed and verified.
    AlreadyInstalled,
    /// The release was downloaded, verified and installed.
    Installed,
}

/// Free bytes available to unprivileged users on the file system holding `path`.
pub fn free_space(path: &Path) -> io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The release store of one service.
#[derive(Debug, Clone)]
pub struct ReleaseStore {
    service: ServiceName,
    binary: String,
    dir: PathBuf,
}

impl ReleaseStore {
    /// The store of `service` under `state_dir`, creating its directories.
    pub fn open(state_dir: &Path, service: &ServiceName, binary: &str) -> io::Result<Self> {
        let dir = state_dir.join(service.as_str());
        fs::create_dir_all(dir.join("releases"))?;
        fs::create_dir_all(dir.join("staging"))?;
        Ok(ReleaseStore {
            service: service.clone(),
            binary: binary.to_string(),
            dir,
        })
    }

    /// `<state_dir>/<service>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn releases_dir(&self) -> PathBuf {
        self.dir.join("releases")
    }

    fn staging_dir(&self) -> PathBuf {
        self.dir.join("staging")
    }

    /// The `current` symlink.
    pub fn current_link(&self) -> PathBuf {
        self.dir.join("current")
    }

    /// The directory of release `id`.
    pub fn release_dir(&self, id: &str) -> PathBuf {
        self.releases_dir().join(id)
    }

    /// The artifact of release `id`.
    pub fn binary_path(&self, id: &str) -> PathBuf {
        self.release_dir(id).join(&self.binary)
    }

    /// The release `current` points at, if any.
    pub fn current(&self) -> Option<String> {
        let target = fs::read_link(self.current_link()).ok()?;
        let name = target.file_name()?.to_str()?;
        ReleaseId::new(name).ok().map(ReleaseId::into_string)
    }

    /// The metadata of release `id` if it is installed completely: `release.json` readable and
    /// the artifact present with the recorded size.
    pub fn installed(&self, id: &str) -> Option<ReleaseMeta> {
        let dir = self.release_dir(id);
        let meta: ReleaseMeta =
            serde_json::from_slice(&fs::read(dir.join("release.json")).ok()?).ok()?;
        let len = fs::metadata(dir.join(&self.binary)).ok()?.len();
        (meta.id == id && len == meta.size).then_some(meta)
    }

    /// Every complete release on disk, oldest verification first.
    pub fn list(&self) -> Vec<ReleaseMeta> {
        let Ok(entries) = fs::read_dir(self.releases_dir()) else {
            return Vec::new();
        };
        let mut out: Vec<ReleaseMeta> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .filter_map(|n| self.installed(&n))
            .collect();
        out.sort_by(|a, b| (a.verified_unix_ms, &a.id).cmp(&(b.verified_unix_ms, &b.id)));
        out
    }

    /// Removes partial downloads and half-installed release directories.
    pub fn clean_staging(&self) {
        if let Ok(entries) = fs::read_dir(self.staging_dir()) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path()).or_else(|_| fs::remove_dir_all(e.path()));
            }
        }
        if let Ok(entries) = fs::read_dir(self.releases_dir()) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') || self.installed(&name).is_none() {
                    tracing::info!(service = %self.service, dir = %e.path().display(), "removing incomplete release directory");
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Points `current` at release `id` atomically (temporary symlink renamed over `current`,
    /// directory fsynced).
    pub fn swap_current(&self, id: &str) -> io::Result<()> {
        if self.installed(id).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("release {id} of service {} is not installed", self.service),
            ));
        }
        durable::replace_symlink(&self.current_link(), &Path::new("releases").join(id))
    }

    /// Removes the oldest releases beyond `keep`, never one named in `protect`. Returns the ids
    /// removed.
    pub fn prune(&self, keep: usize, protect: &[&str]) -> Vec<String> {
        let releases = self.list();
        let mut excess = releases.len().saturating_sub(keep);
        let mut removed = Vec::new();
        for r in releases {
            if excess == 0 {
                break;
            }
            if protect.contains(&r.id.as_str()) {
                continue;
            }
            // Rename out of the way first so a half-deleted directory never looks like a release.
            let doomed = self.releases_dir().join(format!(".delete-{}", r.id));
            let ok = fs::rename(self.release_dir(&r.id), &doomed).is_ok();
            let _ = fs::remove_dir_all(&doomed);
            if ok {
                excess -= 1;
                removed.push(r.id);
            }
        }
        if !removed.is_empty() {
            let _ = durable::fsync_dir(&self.releases_dir());
        }
        removed
    }

    /// Downloads, verifies and installs `release`, unless it is installed already.
    /// `progress` is called with the bytes downloaded so far.
    pub async fn stage<O: Opener>(
        &self,
        release: &Release,
        opener: &O,
        progress: &(dyn Fn(u64) + Sync),
        cancel: &CancellationToken,
        policy: StagePolicy,
    ) -> Result<Staged, StageError> {
        let id = release.id.as_str();
        let sha = release.sha256.to_hex();
        if let Some(meta) = self.installed(id) {
            if meta.sha256 == sha {
                return Ok(Staged::AlreadyInstalled);
            }
            return Err(StageError::Conflict {
                release: id.into(),
                installed: meta.sha256,
                requested: sha,
            });
        }
        let part_path = self.staging_dir().join(format!("{sha}.part"));
        let existing = fs::metadata(&part_path).map(|m| m.len()).unwrap_or(0);
        let existing = if existing > release.size { 0 } else { existing };
        let free = free_space(&self.staging_dir()).map_err(io_err(format!(
            "cannot read free space of {}",
            self.staging_dir().display()
        )))?;
        let need = (release.size - existing).saturating_add(SPACE_MARGIN);
        if free < need {
            return Err(StageError::InsufficientSpace {
                release: id.into(),
                need,
                free,
                dir: self.staging_dir().display().to_string(),
            });
        }
        let result = self
            .download_and_install(release, &part_path, opener, progress, cancel, policy)
            .await;
        if result.is_err() {
            // A failed stage leaves nothing behind; resuming happens within one stage.
            let _ = fs::remove_file(&part_path);
            let _ = fs::remove_dir_all(self.releases_dir().join(format!(".install-{id}")));
        }
        result
    }

    async fn download_and_install<O: Opener>(
        &self,
        release: &Release,
        part_path: &Path,
        opener: &O,
        progress: &(dyn Fn(u64) + Sync),
        cancel: &CancellationToken,
        policy: StagePolicy,
    ) -> Result<Staged, StageError> {
        let StagePolicy {
            retry_delay,
            limits,
        } = policy;
        let id = release.id.as_str();
        // What a URL returned is never described back (size, hash): the coordinator could use
        // the agent as an oracle for addresses only the hosts reach.
        let foreign = matches!(release.source, serin_proto::ArtifactSource::Url(_));
        let part_name = part_path.display().to_string();
        let mut file = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(part_path)
            .map_err(io_err(format!("cannot open {part_name}")))?;
        let mut hasher = Sha256::new();
        let mut offset = file
            .metadata()
            .map_err(io_err(format!("cannot stat {part_name}")))?
            .len();
        if offset > release.size {
            file.set_len(0)
                .map_err(io_err(format!("cannot truncate {part_name}")))?;
            offset = 0;
        }
        if offset > 0 {
            // Resume: hash what is already there (up to the whole artifact: off the runtime).
            let (path, name) = (part_path.to_path_buf(), part_name.clone());
            hasher = blocking(&part_name, move || {
                hash_prefix(hasher, &path, offset).map_err(io_err(format!("cannot read {name}")))
            })
            .await?;
            tracing::info!(service = %self.service, release = id, offset, "resuming partial download");
        }
        let received = AtomicU64::new(offset);
        let download = async {
            let mut attempt = 0;
            let mut last_problem = String::new();
            let mut short = false;
            while offset < release.size {
                if attempt >= DOWNLOAD_ATTEMPTS {
                    return Err(if short {
                        StageError::SizeMismatch {
                            release: id.into(),
                            expected: release.size,
                            got: if foreign {
                                "the source ended early".to_owned()
                            } else {
                                format!("the source ended after {offset} bytes")
                            },
                        }
                    } else {
                        StageError::Download {
                            release: id.into(),
                            reason: format!("{last_problem} (after {DOWNLOAD_ATTEMPTS} attempts)"),
                        }
                    });
                }
                if attempt > 0 {
                    tokio::select! {
                        // A cancelled stage never completes, even when data is ready too.
                        biased;
                        _ = cancel.cancelled() => return Err(StageError::Cancelled { release: id.into() }),
                        _ = tokio::time::sleep(retry_delay * attempt) => {}
                    }
                }
                attempt += 1;
                let mut source = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(StageError::Cancelled { release: id.into() }),
                    s = opener.open(offset) => match s {
                        Ok(s) => s,
                        Err(e) => {
                            short = false;
                            last_problem = e;
                            continue;
                        }
                    },
                };
                loop {
                    let chunk = tokio::select! {
                        // A cancelled stage never completes, even when data is ready too.
                        biased;
                        _ = cancel.cancelled() => return Err(StageError::Cancelled { release: id.into() }),
                        c = source.next_chunk() => c,
                    };
                    match chunk {
                        Ok(Some(data)) => {
                            if offset + data.len() as u64 > release.size {
                                return Err(StageError::SizeMismatch {
                                    release: id.into(),
                                    expected: release.size,
                                    got: format!(
                                        "the source sent more than {} bytes",
                                        release.size
                                    ),
                                });
                            }
                            file.write_all(&data)
                                .map_err(io_err(format!("cannot write {part_name}")))?;
                            hasher.update(&data);
                            offset += data.len() as u64;
                            received.store(offset, Ordering::Relaxed);
                            progress(offset);
                        }
                        Ok(None) => {
                            short = offset < release.size;
                            last_problem = if foreign {
                                "the source ended early".to_owned()
                            } else {
                                format!("the source ended after {offset} of {} bytes", release.size)
                            };
                            break;
                        }
                        Err(e) => {
                            short = false;
                            last_problem = e;
                            break;
                        }
                    }
                }
            }
            Ok(())
        };
        tokio::select! {
            biased;
            r = download => r?,
            e = watch_download(id, release.size, &received, limits) => return Err(e),
        }
        // Fsyncing a large file and installing it block for a while: keep them off the runtime
        // so the coordinator stream and the other services are not stalled.
        let name = part_name.clone();
        blocking(&part_name, move || {
            durable::sync_file(&file).map_err(io_err(format!("cannot fsync {name}")))
        })
        .await?;
        fault::point("stage-downloaded");

        let got = hex::encode(hasher.finalize());
        let expected = release.sha256.to_hex();
        if got != expected {
            return Err(StageError::HashMismatch {
                release: id.into(),
                expected,
                got: if foreign {
                    "other content (not described for a URL source)".to_owned()
                } else {
                    got
                },
            });
        }
        fault::point("stage-verified");

        let (store, id_owned, size, part, manifest) = (
            self.clone(),
            id.to_string(),
            release.size,
            part_path.to_path_buf(),
            release.manifest.clone(),
        );
        blocking(&part_name, move || {
            store.install(&id_owned, expected, size, &part, manifest.as_deref())
        })
        .await?;
        fault::point("stage-installed");
        Ok(Staged::Installed)
    }

    /// Moves the verified artifact at `part_path` into `releases/<id>/` with its `release.json`,
    /// through a hidden temporary directory renamed into place (blocking, with fsyncs).
    fn install(
        &self,
        id: &str,
        sha256: String,
        size: u64,
        part_path: &Path,
        manifest: Option<&str>,
    ) -> Result<(), StageError> {
        let part_name = part_path.display().to_string();
        let tmp = self.releases_dir().join(format!(".install-{id}"));
        let _ = fs::remove_dir_all(&tmp);
        let tmp_name = tmp.display().to_string();
        fs::create_dir(&tmp).map_err(io_err(format!("cannot create {tmp_name}")))?;
        let bundle =
            bundle::is_bundle(part_path).map_err(io_err(format!("cannot read {part_name}")))?;
        let (binary_size, artifact_size, hooks) = if bundle {
            // Unpacking writes at most the bundle's size again next to it.
            let free = free_space(&tmp)
                .map_err(io_err(format!("cannot read free space of {tmp_name}")))?;
            let need = size.saturating_add(SPACE_MARGIN);
            if free < need {
                return Err(StageError::InsufficientSpace {
                    release: id.into(),
                    need,
                    free,
                    dir: tmp_name,
                });
            }
            let unpacked = bundle::unpack(part_path, &tmp, &self.binary, bundle::Limits::default())
                .map_err(|source| StageError::Bundle {
                    release: id.into(),
                    source,
                })?;
            tracing::info!(service = %self.service, release = id, binary_size = unpacked.binary_size, hooks = ?unpacked.hooks, "unpacked release bundle");
            fs::remove_file(part_path).map_err(io_err(format!("cannot remove {part_name}")))?;
            (unpacked.binary_size, Some(size), unpacked.hooks)
        } else {
            let bin = tmp.join(&self.binary);
            fs::rename(part_path, &bin)
                .map_err(io_err(format!("cannot move {part_name} into {tmp_name}")))?;
            fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))
                .map_err(io_err(format!("cannot chmod {}", bin.display())))?;
            (size, None, Vec::new())
        };
        let meta = ReleaseMeta {
            service: self.service.to_string(),
            id: id.into(),
            sha256,
            size: binary_size,
            verified_unix_ms: unix_ms(),
            artifact_size,
            hooks,
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| StageError::Io {
            what: "cannot encode release.json".into(),
            source: io::Error::other(e),
        })?;
        durable::write_atomic(&tmp.join("release.json"), &json)
            .map_err(io_err(format!("cannot write release.json in {tmp_name}")))?;
        if let Some(m) = manifest {
            // Kept with the release for the checks before its swap and any rollback to it; it
            // is verified there, like any manifest.
            durable::write_atomic(&tmp.join(RELEASE_MANIFEST), m.as_bytes()).map_err(io_err(
                format!("cannot write {RELEASE_MANIFEST} in {tmp_name}"),
            ))?;
        }
        durable::fsync_dir(&tmp).map_err(io_err(format!("cannot fsync {tmp_name}")))?;
        fault::point("stage-install-prepared");
        let final_dir = self.release_dir(id);
        fs::rename(&tmp, &final_dir).map_err(io_err(format!(
            "cannot move {tmp_name} to {}",
            final_dir.display()
        )))?;
        durable::fsync_dir(&self.releases_dir()).map_err(io_err("cannot fsync releases/"))?;
        let _ = durable::fsync_dir(&self.staging_dir());
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serin_proto::ArtifactSource;
    use std::sync::Mutex;

    /// Serves `data`, cutting each opened stream after `cut` bytes (if set) and optionally
    /// appending junk.
    pub(crate) struct VecOpener {
        pub data: Vec<u8>,
        pub cut: Option<usize>,
        pub opens: Mutex<Vec<u64>>,
    }

    pub(crate) struct VecSource {
        chunks: Vec<Vec<u8>>,
    }

    impl ChunkSource for VecSource {
        async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
            Ok(if self.chunks.is_empty() {
                None
            } else {
                Some(self.chunks.remove(0).into())
            })
        }
    }

    impl VecOpener {
        pub(crate) fn new(data: &[u8]) -> Self {
            VecOpener {
                data: data.to_vec(),
                cut: None,
                opens: Mutex::new(Vec::new()),
            }
        }
    }

    impl Opener for VecOpener {
        type Source = VecSource;
        async fn open(&self, offset: u64) -> Result<VecSource, String> {
            self.opens.lock().unwrap().push(offset);
            let mut rest = &self.data[(offset as usize).min(self.data.len())..];
            if let Some(cut) = self.cut {
                rest = &rest[..cut.min(rest.len())];
            }
            Ok(VecSource {
                chunks: rest.chunks(7).map(<[u8]>::to_vec).collect(),
            })
        }
    }

    pub(crate) fn release_for(data: &[u8], id: &str, size: u64) -> Release {
        Release {
            service: ServiceName::new("web").unwrap(),
            id: ReleaseId::new(id).unwrap(),
            sha256: serin_proto::Sha256::from_bytes(Sha256::digest(data).into()),
            size,
            source: ArtifactSource::Coordinator,
            manifest: None,
        }
    }

    pub(crate) fn store(dir: &Path) -> ReleaseStore {
        ReleaseStore::open(dir, &ServiceName::new("web").unwrap(), "web").unwrap()
    }

    pub(crate) fn policy(retry_delay: Duration) -> StagePolicy {
        StagePolicy {
            retry_delay,
            limits: DownloadLimits::default(),
        }
    }

    async fn stage(s: &ReleaseStore, r: &Release, o: &VecOpener) -> Result<Staged, StageError> {
        s.stage(
            r,
            o,
            &|_| {},
            &CancellationToken::new(),
            policy(Duration::from_millis(1)),
        )
        .await
    }

    /// Serves `data` `per` bytes at a time, pausing `every` before each piece.
    struct TrickleOpener {
        data: Vec<u8>,
        per: usize,
        every: Duration,
    }

    struct TrickleSource {
        rest: Vec<u8>,
        per: usize,
        every: Duration,
    }

    impl ChunkSource for TrickleSource {
        async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
            if self.rest.is_empty() {
                return Ok(None);
            }
            tokio::time::sleep(self.every).await;
            let n = self.per.min(self.rest.len());
            Ok(Some(self.rest.drain(..n).collect::<Vec<u8>>().into()))
        }
    }

    impl Opener for TrickleOpener {
        type Source = TrickleSource;
        async fn open(&self, offset: u64) -> Result<TrickleSource, String> {
            Ok(TrickleSource {
                rest: self.data[offset as usize..].to_vec(),
                per: self.per,
                every: self.every,
            })
        }
    }

    async fn stage_trickle(
        s: &ReleaseStore,
        data: &[u8],
        per: usize,
        every: Duration,
        limits: DownloadLimits,
    ) -> Result<Staged, StageError> {
        let r = release_for(data, "web-1", data.len() as u64);
        let opener = TrickleOpener {
            data: data.to_vec(),
            per,
            every,
        };
        let policy = StagePolicy {
            retry_delay: Duration::from_millis(1),
            limits,
        };
        s.stage(&r, &opener, &|_| {}, &CancellationToken::new(), policy)
            .await
    }

    #[tokio::test]
    async fn a_trickling_download_below_the_minimum_rate_is_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = vec![7u8; 10_000];
        let limits = DownloadLimits {
            min_bytes_per_sec: 1_000,
            rate_window: Duration::from_millis(200),
            deadline: Duration::from_secs(3600),
        };
        // 1 byte every 20 ms: about 10 bytes per 200 ms window, far below 200.
        let e = stage_trickle(&s, &data, 1, Duration::from_millis(20), limits)
            .await
            .unwrap_err();
        assert_eq!(e.code(), ResultCode::DownloadFailed, "{e}");
        assert!(e.to_string().contains("too slow"), "{e}");
        assert!(staging_is_empty(&s), "a .part is left in staging");
        assert!(s.list().is_empty());
        // Fast enough (about 10 kB/s, ten times the minimum): installed, even though it takes
        // several windows. Windows of 300 ms, so only a stall of most of a window (not a
        // moment of a loaded machine) could make it too slow.
        let data = vec![8u8; 12_000];
        let limits = DownloadLimits {
            rate_window: Duration::from_millis(300),
            ..limits
        };
        let ok = stage_trickle(&s, &data, 100, Duration::from_millis(10), limits).await;
        assert_eq!(ok.unwrap(), Staged::Installed);
    }

    #[tokio::test]
    async fn a_download_past_its_deadline_is_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = vec![7u8; 100_000];
        // The rate window is the deadline: only the deadline can end this download (seen in CI:
        // with a 100 ms window, a stall of the loaded machine ended it as "too slow" first).
        let limits = DownloadLimits {
            min_bytes_per_sec: 10,
            rate_window: Duration::from_millis(500),
            deadline: Duration::from_millis(500),
        };
        // 100 kB/s is above the minimum rate, but 1 s of it is past the 0.5 s deadline.
        let e = stage_trickle(&s, &data, 1_000, Duration::from_millis(10), limits)
            .await
            .unwrap_err();
        assert_eq!(e.code(), ResultCode::DownloadFailed, "{e}");
        assert!(e.to_string().contains("deadline"), "{e}");
        assert!(staging_is_empty(&s), "a .part is left in staging");
    }

    fn staging_is_empty(s: &ReleaseStore) -> bool {
        fs::read_dir(s.staging_dir()).unwrap().next().is_none()
    }

    #[tokio::test]
    async fn stage_installs_a_verified_release_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = b"#!/bin/sh\necho hello\n".repeat(10);
        let r = release_for(&data, "web-1", data.len() as u64);
        let o = VecOpener::new(&data);
        assert_eq!(stage(&s, &r, &o).await.unwrap(), Staged::Installed);
        let bin = s.binary_path("web-1");
        assert_eq!(fs::read(&bin).unwrap(), data);
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let meta = s.installed("web-1").unwrap();
        assert_eq!(meta.sha256, r.sha256.to_hex());
        assert_eq!(meta.size, data.len() as u64);
        assert!(staging_is_empty(&s));
        // Already there: not downloaded again.
        assert_eq!(stage(&s, &r, &o).await.unwrap(), Staged::AlreadyInstalled);
        assert_eq!(o.opens.lock().unwrap().len(), 1);
        // Same id, other bytes: refused.
        let other = release_for(b"other", "web-1", 5);
        assert!(matches!(
            stage(&s, &other, &VecOpener::new(b"other")).await,
            Err(StageError::Conflict { .. })
        ));
    }

    #[tokio::test]
    async fn a_bundle_is_unpacked_into_its_release_and_a_hostile_one_leaves_nothing() {
        use crate::bundle::tests::{archive, file, marker};
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let bin = b"\x7fELF-the-binary".repeat(50);
        let data = archive(&[
            marker(),
            file("binary", &bin),
            file("hooks/validate", b"#!/bin/sh\nexit 0\n"),
        ]);
        let r = release_for(&data, "web-1", data.len() as u64);
        assert_eq!(
            stage(&s, &r, &VecOpener::new(&data)).await.unwrap(),
            Staged::Installed
        );
        s.swap_current("web-1").unwrap();
        assert_eq!(fs::read(s.binary_path("web-1")).unwrap(), bin);
        let hook = s.release_dir("web-1").join("hooks/validate");
        assert_eq!(
            fs::metadata(&hook).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        let meta = s
            .installed("web-1")
            .expect("the bundle's release is installed");
        assert_eq!(
            (meta.sha256.as_str(), meta.artifact_size()),
            (r.sha256.to_hex().as_str(), data.len() as u64)
        );
        assert_eq!(meta.size, bin.len() as u64);
        assert_eq!(meta.hooks, vec!["validate".to_owned()]);
        assert!(staging_is_empty(&s));

        // A bundle whose hook is a link out of the release: a stage failure naming it, nothing
        // left behind, `current` untouched.
        let mut h = tar::Header::new_gnu();
        h.set_path("hooks/post-start").unwrap();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_link_name("/usr/bin/passwd").unwrap();
        h.set_size(0);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(
            &{
                let mut m = tar::Header::new_gnu();
                m.set_path(crate::bundle::MARKER).unwrap();
                m.set_size(crate::bundle::MARKER_CONTENT.len() as u64);
                m.set_cksum();
                m
            },
            crate::bundle::MARKER_CONTENT,
        )
        .unwrap();
        b.append(&h, &b""[..]).unwrap();
        let evil = b.into_inner().unwrap();
        let r2 = release_for(&evil, "web-2", evil.len() as u64);
        let e = stage(&s, &r2, &VecOpener::new(&evil)).await.unwrap_err();
        assert_eq!(e.code(), ResultCode::BadBundle);
        assert_eq!(
            e.to_string(),
            "release web-2 is a bundle the agent refuses: bundle entry \"hooks/post-start\" is a \
             symbolic link; a bundle holds only regular files and directories"
        );
        assert!(!s.release_dir("web-2").exists());
        assert!(staging_is_empty(&s));
        let left: Vec<_> = fs::read_dir(s.releases_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("web-1")]);
        assert_eq!(s.current().as_deref(), Some("web-1"));
    }

    #[tokio::test]
    async fn hash_mismatch_names_both_hashes_and_installs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let r = release_for(b"good bytes", "web-1", 10);
        let e = stage(&s, &r, &VecOpener::new(b"evil bytes"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ResultCode::HashMismatch);
        let msg = e.to_string();
        assert!(
            msg.contains(&r.sha256.to_hex())
                && msg.contains(&hex::encode(Sha256::digest(b"evil bytes"))),
            "{msg}"
        );
        assert!(
            msg.starts_with("artifact sha256 mismatch for release web-1"),
            "{msg}"
        );
        assert!(s.list().is_empty());
        assert!(staging_is_empty(&s));
    }

    #[tokio::test]
    async fn too_many_bytes_abort_with_size_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let r = release_for(b"0123456789", "web-1", 10);
        let e = stage(&s, &r, &VecOpener::new(b"0123456789-and-more"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), ResultCode::SizeMismatch, "{e}");
        assert!(s.list().is_empty());
        assert!(staging_is_empty(&s));
    }

    #[tokio::test]
    async fn short_streams_resume_from_offset() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data: Vec<u8> = (0..100u8).collect();
        let r = release_for(&data, "web-1", 100);
        let mut o = VecOpener::new(&data);
        o.cut = Some(30);
        assert_eq!(stage(&s, &r, &o).await.unwrap(), Staged::Installed);
        assert_eq!(*o.opens.lock().unwrap(), vec![0, 30, 60, 90]);
        assert_eq!(fs::read(s.binary_path("web-1")).unwrap(), data);
    }

    #[tokio::test]
    async fn a_partial_download_left_in_staging_is_resumed_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data: Vec<u8> = (0..200u8).collect();
        let r = release_for(&data, "web-1", 200);
        fs::write(
            s.staging_dir().join(format!("{}.part", r.sha256.to_hex())),
            &data[..120],
        )
        .unwrap();
        let o = VecOpener::new(&data);
        assert_eq!(stage(&s, &r, &o).await.unwrap(), Staged::Installed);
        assert_eq!(*o.opens.lock().unwrap(), vec![120]);
        assert_eq!(fs::read(s.binary_path("web-1")).unwrap(), data);
    }

    #[tokio::test]
    async fn a_source_that_stays_short_is_a_size_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let data = b"0123456789".to_vec();
        let r = release_for(&data, "web-1", 20);
        let e = stage(&s, &r, &VecOpener::new(&data)).await.unwrap_err();
        assert_eq!(e.code(), ResultCode::SizeMismatch, "{e}");
        assert!(e.to_string().contains("ended after 10 bytes"), "{e}");
    }

    #[tokio::test]
    async fn insufficient_space_is_refused_before_touching_anything() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        // A declared size larger than the whole free space of the disk.
        let free = free_space(dir.path()).unwrap();
        let r = release_for(b"x", "web-1", free + 1);
        let o = VecOpener::new(b"x");
        let e = stage(&s, &r, &o).await.unwrap_err();
        assert_eq!(e.code(), ResultCode::InsufficientSpace);
        assert!(
            o.opens.lock().unwrap().is_empty(),
            "download started anyway"
        );
        assert!(staging_is_empty(&s));
    }

    #[tokio::test]
    async fn cancel_stops_the_download() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let r = release_for(b"abc", "web-1", 3);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let e = s
            .stage(
                &r,
                &VecOpener::new(b"abc"),
                &|_| {},
                &cancel,
                policy(Duration::ZERO),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), ResultCode::Cancelled);
        assert!(s.list().is_empty());
    }

    #[tokio::test]
    async fn swap_and_prune_keep_current_and_previous() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        for i in 1..=5 {
            let data = format!("release {i}");
            let r = release_for(data.as_bytes(), &format!("web-{i}"), data.len() as u64);
            stage(&s, &r, &VecOpener::new(data.as_bytes()))
                .await
                .unwrap();
        }
        assert!(s.current().is_none());
        s.swap_current("web-1").unwrap();
        assert_eq!(s.current().as_deref(), Some("web-1"));
        assert_eq!(
            fs::read_link(s.current_link()).unwrap(),
            Path::new("releases/web-1")
        );
        s.swap_current("web-2").unwrap();
        assert_eq!(s.current().as_deref(), Some("web-2"));
        assert!(s.swap_current("web-9").is_err());
        assert_eq!(s.current().as_deref(), Some("web-2"));

        // Protected releases count towards `keep` but are never removed.
        let removed = s.prune(3, &["web-2", "web-1"]);
        assert_eq!(removed, vec!["web-3".to_string(), "web-4".to_string()]);
        let left: Vec<String> = s.list().into_iter().map(|m| m.id).collect();
        assert_eq!(left, vec!["web-1", "web-2", "web-5"]);
    }

    #[tokio::test]
    async fn prune_removes_the_oldest_verified_first_whatever_the_ids() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        for (id, at) in [("web-b", 3_000), ("web-a", 2_000), ("web-c", 1_000)] {
            let r = release_for(id.as_bytes(), id, id.len() as u64);
            stage(&s, &r, &VecOpener::new(id.as_bytes())).await.unwrap();
            let path = s.release_dir(id).join("release.json");
            let mut meta: ReleaseMeta = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            meta.verified_unix_ms = at;
            fs::write(&path, serde_json::to_vec(&meta).unwrap()).unwrap();
        }
        assert_eq!(s.prune(2, &["web-b"]), vec!["web-c".to_string()]);
        assert_eq!(s.prune(1, &["web-b"]), vec!["web-a".to_string()]);
        assert_eq!(s.prune(1, &["web-b"]), Vec::<String>::new());
    }

    #[test]
    fn clean_staging_removes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        fs::write(s.staging_dir().join("abc.part"), b"partial").unwrap();
        fs::create_dir(s.releases_dir().join(".install-web-3")).unwrap();
        fs::create_dir(s.releases_dir().join("web-4")).unwrap();
        s.clean_staging();
        assert!(staging_is_empty(&s));
        assert_eq!(fs::read_dir(s.releases_dir()).unwrap().count(), 0);
    }
}
