//! Durable file-system operations: write-then-rename with the fsyncs that make them survive a
//! power cut, and an atomic symlink replace.
//!
//! Every durable write follows the same recipe: write a temporary file in the target's
//! directory, fsync it, rename it over the target, fsync the directory. An fsync error means the
//! attempt failed; it is never retried.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Durable writes ([`write_atomic`]) and fsyncs (of files and directories) made through this
/// module since the process started.
static WRITES: AtomicU64 = AtomicU64::new(0);
static FSYNCS: AtomicU64 = AtomicU64::new(0);

/// How many durable file writes ([`write_atomic`]) and fsyncs this process has made through this
/// module: `(writes, fsyncs)`. The activation path's cost is counted with it (issue 10).
pub fn counters() -> (u64, u64) {
    (
        WRITES.load(Ordering::Relaxed),
        FSYNCS.load(Ordering::Relaxed),
    )
}

/// Fsyncs an open file (its data and metadata), counted in [`counters`].
pub fn sync_file(f: &File) -> io::Result<()> {
    FSYNCS.fetch_add(1, Ordering::Relaxed);
    f.sync_all()
}

/// Fsyncs a directory so that renames and creations inside it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    sync_file(&File::open(dir)?)
}

fn tmp_name(target: &Path) -> io::Result<std::path::PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", target.display())))?;
    let mut tmp = name.to_os_string();
    tmp.push(format!(".tmp.{}", std::process::id()));
    Ok(target.with_file_name(tmp))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replaces `target` with `contents` durably (tmp file, fsync, rename, fsync dir).
pub fn write_atomic(target: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = tmp_name(target)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        WRITES.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(path = %target.display(), bytes = contents.len(), "durable write");
        f.write_all(contents)?;
        sync_file(&f)?;
        fs::rename(&tmp, target)?;
        fsync_dir(parent(target))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Points the symlink `link` at `target` atomically: a temporary symlink is created next to it
/// and renamed over `link`, then the directory is fsynced. Readers see either the old or the new
/// target, never a missing link.
pub fn replace_symlink(link: &Path, target: &Path) -> io::Result<()> {
    let tmp = tmp_name(link)?;
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    if let Err(e) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(parent(link))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_contents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary files left behind");
    }

    #[test]
    fn replace_symlink_swaps_target_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("current");
        replace_symlink(&link, Path::new("releases/a")).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("releases/a"));
        replace_symlink(&link, Path::new("releases/b")).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("releases/b"));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("current")]);
    }
}
