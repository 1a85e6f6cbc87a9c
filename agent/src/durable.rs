//! Durable file-system operations: a durable replace of a file's contents, the fsyncs that make
//! it survive a power cut, and an atomic symlink replace.
//!
//! A durable write ([`write_atomic`]) writes the new contents into the target's *spare*, a file
//! beside it (`state.json.spare` for `state.json`), fsyncs it, exchanges it with the target in
//! one `renameat2(RENAME_EXCHANGE)`, and fsyncs the directory. The target is always a complete
//! version, the old one or the new one, and the spare keeps the version before. The next write
//! overwrites the spare in place: after the first two writes no write allocates or frees an
//! inode. On ext4 without a journal (this project's test machines) allocating an inode scans past
//! every inode freed in the last minute (five while its inode table block is not yet written
//! back: `recently_deleted` in the kernel), so the classic write-a-temporary-file-then-rename
//! cost 0.2–0.8 ms of kernel CPU per write on a busy agent against 14 µs for the exchange (issue
//! 10). Where the target does not exist yet, or the file system cannot exchange, the spare is
//! renamed over the target instead. An fsync error means the attempt failed; it is never
//! retried.
//!
//! A reader opens, reads and closes: one that held the target open across two writes could see
//! the second one being written into what had become the spare.

use std::fs::{self, File, OpenOptions};
use std::io;
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

/// `target`'s name with `suffix` appended, in the same directory.
fn beside(target: &Path, suffix: &str) -> io::Result<std::path::PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", target.display())))?;
    let mut other = name.to_os_string();
    other.push(suffix);
    Ok(target.with_file_name(other))
}

fn tmp_name(target: &Path) -> io::Result<std::path::PathBuf> {
    beside(target, &format!(".tmp.{}", std::process::id()))
}

/// The file [`write_atomic`] writes `target`'s next contents into before exchanging the two.
pub fn spare_of(target: &Path) -> io::Result<std::path::PathBuf> {
    beside(target, ".spare")
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replaces `target`'s contents with `contents` durably: written into the spare, fsynced, the
/// spare exchanged with `target`, the directory fsynced (see the module docs).
pub fn write_atomic(target: &Path, contents: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let spare = spare_of(target)?;
    let written = (|| {
        // Not truncated first: overwritten in place and cut to length, so a spare that keeps its
        // size keeps its blocks too.
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&spare)?;
        WRITES.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(path = %target.display(), bytes = contents.len(), "durable write");
        f.write_all_at(contents, 0)?;
        f.set_len(contents.len() as u64)?;
        sync_file(&f)
    })();
    if let Err(e) = written {
        // A spare half written (a full disk) holds space and nothing of value.
        let _ = fs::remove_file(&spare);
        return Err(e);
    }
    swap_in(&spare, target)?;
    fsync_dir(parent(target))
}

/// Puts `spare` at `target`: exchanged with it, or renamed over it where `target` does not exist
/// yet or the exchange is not to be had (a file system without it, a kernel or a seccomp filter
/// without `renameat2`: a plain rename then says what is really wrong, if anything is).
fn swap_in(spare: &Path, target: &Path) -> io::Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(
        AT_FDCWD,
        spare,
        AT_FDCWD,
        target,
        RenameFlags::RENAME_EXCHANGE,
    ) {
        Ok(()) => Ok(()),
        Err(Errno::ENOENT | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP | Errno::EPERM) => {
            fs::rename(spare, target)
        }
        Err(e) => Err(io::Error::from(e)),
    }
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

    use std::os::unix::fs::MetadataExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_atomic_replaces_contents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(
            names(dir.path()),
            ["state.json"],
            "a first write leaves no spare"
        );
        write_atomic(&p, b"two, longer").unwrap();
        write_atomic(&p, b"3").unwrap();
        assert_eq!(
            fs::read(&p).unwrap(),
            b"3",
            "a shorter write is cut to its length"
        );
        assert_eq!(names(dir.path()), ["state.json", "state.json.spare"]);
        assert_eq!(
            fs::read(spare_of(&p).unwrap()).unwrap(),
            b"two, longer",
            "the spare keeps the version before"
        );
    }

    /// After the first two writes, writes exchange the same two inodes: none is allocated or
    /// freed (what costs a scan of the recently freed inodes on ext4 without a journal).
    #[test]
    fn writes_after_the_second_allocate_no_inode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"v0").unwrap();
        write_atomic(&p, b"v1").unwrap();
        let ino = |path: &Path| fs::metadata(path).unwrap().ino();
        let pair = [ino(&p), ino(&spare_of(&p).unwrap())];
        for i in 2..20 {
            let contents = format!("v{i}");
            write_atomic(&p, contents.as_bytes()).unwrap();
            assert_eq!(fs::read_to_string(&p).unwrap(), contents);
            let now = [ino(&p), ino(&spare_of(&p).unwrap())];
            assert!(
                now == pair || now == [pair[1], pair[0]],
                "write {i} moved to new inodes: {now:?}, was {pair:?}"
            );
            assert_ne!(
                now[0],
                pair[i % 2],
                "write {i} did not exchange the two files"
            );
        }
    }

    /// A spare that cannot be written (here a directory in its place) fails the write and leaves
    /// the target as it was.
    #[test]
    fn a_failed_write_leaves_the_target_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"kept").unwrap();
        fs::create_dir(spare_of(&p).unwrap()).unwrap();
        let e = write_atomic(&p, b"lost").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::IsADirectory, "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"kept");
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
