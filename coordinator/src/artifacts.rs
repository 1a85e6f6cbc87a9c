//! The coordinator's content-addressed artifact store: `<state_dir>/artifacts/<sha256>`.
//!
//! An upload is written to a temporary file in `<state_dir>/artifacts/tmp/` while it is hashed;
//! only when the last byte is in and the file is fsync'd is it renamed to its sha256 and the
//! directory fsync'd, so a blob under its final name is always complete and correct. The same
//! content uploaded twice is stored once. Agents read blobs by sha256 from any offset, in
//! [`CHUNK_SIZE`] pieces, so an interrupted download resumes where it stopped.
//!
//! Which release names which blob is not kept here but in the [`crate::store::Store`]: this module
//! only knows bytes and hashes.

use std::path::{Path, PathBuf};

use futures::Stream;
use serin_proto::{MAX_ARTIFACT_SIZE, Sha256};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

/// Size of the chunks [`ArtifactStore::read_from`] yields: 256 KiB.
pub const CHUNK_SIZE: usize = 256 * 1024;

/// An artifact store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A file system operation failed.
    #[error("artifact store: {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No blob with this sha256.
    #[error("no artifact with sha256 {0}")]
    NotFound(Sha256),
    /// A read asked for an offset beyond the blob's end.
    #[error("offset {offset} is past the end of artifact {sha256} ({size} bytes)")]
    OffsetPastEnd {
        sha256: Sha256,
        offset: u64,
        size: u64,
    },
    /// An upload grew beyond [`MAX_ARTIFACT_SIZE`].
    #[error("artifact exceeds the limit of {MAX_ARTIFACT_SIZE} bytes")]
    TooLarge,
    /// An upload had no content.
    #[error("artifact is empty")]
    Empty,
}

impl ArtifactError {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { what, path, source }
    }
}

impl From<ArtifactError> for tonic::Status {
    fn from(e: ArtifactError) -> Self {
        match e {
            ArtifactError::NotFound(_) => tonic::Status::not_found(e.to_string()),
            ArtifactError::OffsetPastEnd { .. } => tonic::Status::out_of_range(e.to_string()),
            ArtifactError::TooLarge | ArtifactError::Empty => {
                tonic::Status::invalid_argument(e.to_string())
            }
            ArtifactError::Io { .. } => tonic::Status::internal(e.to_string()),
        }
    }
}

/// A manifest offered with a release (`artifact push` / `release add`) that is not for it.
#[derive(Debug, thiserror::Error)]
pub enum ManifestMismatch {
    /// It does not parse as a serin release manifest.
    #[error("the manifest of release {release} is not a valid serin release manifest: {problem}")]
    Malformed { release: String, problem: String },
    /// It names another service, release, sha256 or size than the release.
    #[error("the manifest signs {field} {signed}, but release {release} has {field} {actual}")]
    Differs {
        release: String,
        field: &'static str,
        signed: String,
        actual: String,
    },
}

impl From<ManifestMismatch> for tonic::Status {
    fn from(e: ManifestMismatch) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Checks that `manifest` (non-empty) is a well-formed manifest naming this very release. The
/// coordinator holds no signing key and does not verify the signature: that is the agents' job,
/// with the keys they pin. This only turns an operator's mix-up into a clear error at push time.
pub fn check_manifest(
    manifest: &str,
    service: &serin_proto::ServiceName,
    release: &serin_proto::ReleaseId,
    sha256: &Sha256,
    size: u64,
) -> Result<(), ManifestMismatch> {
    let m = serin_security::manifest::parse(manifest.as_bytes()).map_err(|e| {
        ManifestMismatch::Malformed {
            release: release.to_string(),
            problem: e.to_string(),
        }
    })?;
    let b = &m.body;
    let differs = |field, signed: String, actual: String| ManifestMismatch::Differs {
        release: release.to_string(),
        field,
        signed,
        actual,
    };
    if &b.service != service {
        return Err(differs(
            "service",
            b.service.to_string(),
            service.to_string(),
        ));
    }
    if &b.release != release {
        return Err(differs(
            "release",
            b.release.to_string(),
            release.to_string(),
        ));
    }
    if &b.sha256 != sha256 {
        return Err(differs("sha256", b.sha256.to_hex(), sha256.to_hex()));
    }
    if b.size != size {
        return Err(differs("size", b.size.to_string(), size.to_string()));
    }
    Ok(())
}

/// Blobs on disk, named by their sha256.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
    tmp: PathBuf,
}

impl ArtifactStore {
    /// Opens (creating if needed) `<state_dir>/artifacts/`, removing uploads a crash left behind.
    pub fn open(state_dir: &Path) -> Result<Self, ArtifactError> {
        let dir = state_dir.join("artifacts");
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(ArtifactError::io("creating", &tmp))?;
        let entries = std::fs::read_dir(&tmp).map_err(ArtifactError::io("listing", &tmp))?;
        for entry in entries {
            let entry = entry.map_err(ArtifactError::io("listing", &tmp))?;
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed an interrupted upload"),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an interrupted upload")
                }
            }
        }
        Ok(Self { dir, tmp })
    }

    /// Where the blob with this sha256 lives (whether or not it exists).
    pub fn path_of(&self, sha256: &Sha256) -> PathBuf {
        self.dir.join(sha256.to_hex())
    }

    /// The size of the blob, or `None` when it is not in the store.
    pub async fn size(&self, sha256: &Sha256) -> Result<Option<u64>, ArtifactError> {
        let path = self.path_of(sha256);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ArtifactError::io("inspecting", &path)(e)),
        }
    }

    /// Starts an upload into a fresh temporary file.
    pub async fn upload(&self) -> Result<Upload, ArtifactError> {
        let name = format!("upload-{:016x}", rand::random::<u64>());
        let path = self.tmp.join(name);
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(ArtifactError::io("creating", &path))?;
        Ok(Upload {
            store: self.clone(),
            file: Some(file),
            path,
            hasher: sha2::Sha256::new(),
            size: 0,
        })
    }

    /// Convenience for tests and small blobs: stores `data` and returns its sha256 and whether it
    /// was already present.
    pub async fn put(&self, data: &[u8]) -> Result<(Sha256, bool), ArtifactError> {
        let mut up = self.upload().await?;
        up.write(data).await?;
        let staged = up.finish().await?;
        let sha = staged.sha256();
        let dedup = staged.commit().await?;
        Ok((sha, dedup))
    }

    /// Reads the blob from `offset` in chunks of at most [`CHUNK_SIZE`] bytes. Returns the total
    /// size and the chunks as `(offset, data)`. An offset equal to the size yields one empty
    /// chunk, so a client that already has everything learns the size.
    ///
    /// Each chunk is one positioned read (`pread`) on the blocking pool straight into the
    /// buffer that becomes the message's bytes: no intermediate buffer, no copy.
    pub async fn read_from(
        &self,
        sha256: &Sha256,
        offset: u64,
    ) -> Result<
        (
            u64,
            impl Stream<Item = Result<(u64, prost::bytes::Bytes), ArtifactError>> + Send + 'static,
        ),
        ArtifactError,
    > {
        let path = self.path_of(sha256);
        let opened = {
            let p = path.clone();
            tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&p)?;
                let size = file.metadata()?.len();
                Ok::<_, std::io::Error>((file, size))
            })
            .await
            .map_err(|e| ArtifactError::io("opening", &path)(std::io::Error::other(e)))?
        };
        let (file, size) = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ArtifactError::NotFound(*sha256));
            }
            Err(e) => return Err(ArtifactError::io("opening", &path)(e)),
        };
        if offset > size {
            return Err(ArtifactError::OffsetPastEnd {
                sha256: *sha256,
                offset,
                size,
            });
        }
        struct Cursor {
            file: std::sync::Arc<std::fs::File>,
            path: PathBuf,
            offset: u64,
            size: u64,
            sent_any: bool,
        }
        let cursor = Cursor {
            file: std::sync::Arc::new(file),
            path,
            offset,
            size,
            sent_any: false,
        };
        let stream = futures::stream::try_unfold(cursor, |mut c| async move {
            if c.offset >= c.size {
                if c.sent_any {
                    return Ok(None);
                }
                c.sent_any = true;
                return Ok(Some(((c.offset, prost::bytes::Bytes::new()), c)));
            }
            let want =
                usize::try_from((c.size - c.offset).min(CHUNK_SIZE as u64)).unwrap_or(CHUNK_SIZE);
            let (file, at) = (c.file.clone(), c.offset);
            let read = tokio::task::spawn_blocking(move || read_exact_at(&file, want, at))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            let buf = match read {
                Ok(buf) => buf,
                // The blob shrank under us: immutable blobs never do, so the disk is lying.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(ArtifactError::Io {
                        what: "reading (unexpected end of file)",
                        path: c.path.clone(),
                        source: e,
                    });
                }
                Err(e) => return Err(ArtifactError::io("reading", &c.path)(e)),
            };
            c.offset += want as u64;
            c.sent_any = true;
            Ok(Some(((at, prost::bytes::Bytes::from(buf)), c)))
        });
        Ok((size, stream))
    }
}

/// `len` bytes of `file` from `offset` by positioned reads into a buffer of exactly that size.
fn read_exact_at(file: &std::fs::File, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// An upload in progress: bytes go to a temporary file and into the hash.
///
/// Dropping it before [`StagedArtifact::commit`] removes the temporary file.
pub struct Upload {
    store: ArtifactStore,
    file: Option<tokio::fs::File>,
    path: PathBuf,
    hasher: sha2::Sha256,
    size: u64,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Upload {
    /// Appends bytes.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ArtifactError> {
        let new_size = self.size.saturating_add(data.len() as u64);
        if new_size > MAX_ARTIFACT_SIZE {
            return Err(ArtifactError::TooLarge);
        }
        let Some(file) = self.file.as_mut() else {
            return Err(ArtifactError::Io {
                what: "writing (upload already finished)",
                path: self.path.clone(),
                source: std::io::ErrorKind::Other.into(),
            });
        };
        file.write_all(data)
            .await
            .map_err(ArtifactError::io("writing", &self.path))?;
        self.hasher.update(data);
        self.size = new_size;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Flushes and fsyncs the temporary file and computes the hash. The blob is not yet visible
    /// under its sha256: call [`StagedArtifact::commit`] (or drop it to discard the upload).
    pub async fn finish(mut self) -> Result<StagedArtifact, ArtifactError> {
        if self.size == 0 {
            return Err(ArtifactError::Empty);
        }
        if let Some(mut file) = self.file.take() {
            file.flush()
                .await
                .map_err(ArtifactError::io("flushing", &self.path))?;
            file.sync_all()
                .await
                .map_err(ArtifactError::io("fsyncing", &self.path))?;
        }
        let digest: [u8; 32] = self.hasher.clone().finalize().into();
        Ok(StagedArtifact {
            sha256: Sha256::from_bytes(digest),
            size: self.size,
            temp: TempFile(Some(std::mem::take(&mut self.path))),
            store: self.store.clone(),
        })
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes its file when dropped, unless disarmed.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A complete, fsync'd upload with a known hash, not yet under its final name.
pub struct StagedArtifact {
    sha256: Sha256,
    size: u64,
    temp: TempFile,
    store: ArtifactStore,
}

impl std::fmt::Debug for StagedArtifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedArtifact")
            .field("sha256", &self.sha256)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl StagedArtifact {
    /// The content's sha256.
    pub fn sha256(&self) -> Sha256 {
        self.sha256
    }

    /// The content's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Makes the blob visible under its sha256 (rename, then fsync the directory). Returns `true`
    /// when identical content was already stored (the upload is then discarded).
    pub async fn commit(mut self) -> Result<bool, ArtifactError> {
        let dest = self.store.path_of(&self.sha256);
        if let Some(existing) = self.store.size(&self.sha256).await? {
            if existing == self.size {
                return Ok(true);
            }
            // Same name, different size: a damaged blob. Replace it with the verified upload.
            tracing::warn!(
                sha256 = %self.sha256,
                found = existing,
                expected = self.size,
                "replacing a damaged artifact"
            );
        }
        let Some(temp) = self.temp.0.take() else {
            return Ok(true);
        };
        crate::fault::point("artifact-before-rename");
        if let Err(e) = tokio::fs::rename(&temp, &dest).await {
            self.temp.0 = Some(temp);
            return Err(ArtifactError::io("renaming into", &dest)(e));
        }
        let dir = self.store.dir.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
            .await
            .map_err(|e| ArtifactError::Io {
                what: "fsyncing",
                path: self.store.dir.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(ArtifactError::io("fsyncing", &self.store.dir))?;
        crate::fault::point("artifact-committed");
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    fn sha_of(data: &[u8]) -> Sha256 {
        Sha256::from_bytes(sha2::Sha256::digest(data).into())
    }

    async fn read_all(
        store: &ArtifactStore,
        sha: &Sha256,
        offset: u64,
    ) -> (u64, Vec<(u64, prost::bytes::Bytes)>) {
        let (size, stream) = store.read_from(sha, offset).await.unwrap();
        (size, stream.try_collect().await.unwrap())
    }

    #[tokio::test]
    async fn stores_by_hash_and_deduplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let data = b"release bytes".repeat(1000);
        let (sha, dedup) = store.put(&data).await.unwrap();
        assert_eq!(sha, sha_of(&data));
        assert!(!dedup);
        assert_eq!(std::fs::read(store.path_of(&sha)).unwrap(), data);
        let (sha2, dedup) = store.put(&data).await.unwrap();
        assert_eq!(sha2, sha);
        assert!(dedup, "the same content again is deduplicated");
        // Nothing is left in the temporary directory.
        assert_eq!(
            std::fs::read_dir(dir.path().join("artifacts/tmp"))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn reads_in_chunks_from_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        let (sha, _) = store.put(&data).await.unwrap();

        let (size, chunks) = read_all(&store, &sha, 0).await;
        assert_eq!(size, data.len() as u64);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|(_, d)| d.len() <= CHUNK_SIZE));
        assert_eq!(chunks.concat_data(), data);

        let from = CHUNK_SIZE as u64 + 7;
        let (_, chunks) = read_all(&store, &sha, from).await;
        assert_eq!(chunks[0].0, from);
        assert_eq!(chunks.concat_data(), data[from as usize..]);

        let (_, chunks) = read_all(&store, &sha, data.len() as u64).await;
        assert_eq!(
            chunks,
            vec![(data.len() as u64, prost::bytes::Bytes::new())]
        );

        match store.read_from(&sha, data.len() as u64 + 1).await {
            Err(ArtifactError::OffsetPastEnd { offset, size, .. }) => {
                assert_eq!((offset, size), (data.len() as u64 + 1, data.len() as u64));
            }
            Err(e) => panic!("expected OffsetPastEnd, got {e}"),
            Ok(_) => panic!("expected OffsetPastEnd, got a stream"),
        }
        let unknown = sha_of(b"nothing");
        assert!(matches!(
            store.read_from(&unknown, 0).await,
            Err(ArtifactError::NotFound(s)) if s == unknown
        ));
    }

    #[tokio::test]
    async fn an_abandoned_upload_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let mut up = store.upload().await.unwrap();
        up.write(b"half").await.unwrap();
        drop(up);
        let mut up = store.upload().await.unwrap();
        up.write(b"staged").await.unwrap();
        let staged = up.finish().await.unwrap();
        let sha = staged.sha256();
        drop(staged);
        assert_eq!(store.size(&sha).await.unwrap(), None);
        assert_eq!(
            std::fs::read_dir(dir.path().join("artifacts/tmp"))
                .unwrap()
                .count(),
            0
        );
        assert!(matches!(
            store.upload().await.unwrap().finish().await,
            Err(ArtifactError::Empty)
        ));
    }

    #[tokio::test]
    async fn open_removes_leftover_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let leftover = dir.path().join("artifacts/tmp/upload-crashed");
        std::fs::write(&leftover, b"partial").unwrap();
        drop(store);
        ArtifactStore::open(dir.path()).unwrap();
        assert!(!leftover.exists());
    }

    trait ConcatData {
        fn concat_data(&self) -> Vec<u8>;
    }
    impl ConcatData for Vec<(u64, prost::bytes::Bytes)> {
        fn concat_data(&self) -> Vec<u8> {
            self.iter().flat_map(|(_, d)| d.iter().copied()).collect()
        }
    }
}
