//! Release bundles: an artifact that carries the service binary *and* its lifecycle hooks.
//!
//! A bundle is a plain (uncompressed) tar archive, made by `serin release pack`:
//!
//! ```text
//! serin-bundle          first entry, regular file, exactly "serin bundle v1\n"
//! binary                the service binary (installed as releases/<id>/<the service's binary>)
//! hooks/                optional
//! hooks/validate        optional, run before the swap
//! hooks/post-start      optional, run after the restart, before health gating
//! ```
//!
//! How the agent tells a bundle from a bare binary: the artifact's first 512 bytes are a tar
//! header naming `serin-bundle` (and carrying the `ustar` magic). The marker is part of the
//! signed bytes, so a compromised coordinator cannot make a bare binary be read as a bundle or the
//! other way round (a flag on the order could be flipped; the content cannot). No executable
//! starts with the bytes `serin-bundle\0` (ELF starts with `\x7fELF`, a script with `#!`), so a
//! binary — even one that is itself a tar archive — is never misread as a bundle.
//!
//! Plain tar, not gzip: the bundle's sha256 is what operators sign and pin, so `serin release
//! pack` must give the same bytes for the same inputs on every machine and every version of the
//! CLI, and a compressor's output is not promised stable across library versions; an uncompressed
//! bundle also never unpacks to more than its own (verified, size-checked) length, so there is no
//! decompression bomb to bound. Transfer cost is the same as for the bare binary it replaces.
//!
//! [`unpack`] runs only on bytes whose sha256 (and signature) were verified, into the hidden
//! install directory of the release store; anything it does not expect is refused with a
//! [`BundleError`] naming the entry, and the caller removes what was written. Every file it writes
//! is 0755 whatever the archive says (no setuid, no setgid, no sticky bit), owned by the agent.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::EntryType;

/// Name of the marker entry, the bundle's first.
pub const MARKER: &str = "serin-bundle";
/// Content of the marker entry (the format version).
pub const MARKER_CONTENT: &[u8] = b"serin bundle v1\n";
/// Where the service binary sits in a bundle.
pub const BINARY: &str = "binary";
/// The hooks a bundle may carry, as `hooks/<name>`.
pub const HOOKS: [&str; 2] = ["post-start", "validate"];

/// Bounds on what a bundle may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most entries (directories included).
    pub max_entries: usize,
    /// Largest hook, in bytes.
    pub max_hook_bytes: u64,
    /// Largest binary, in bytes.
    pub max_binary_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 16,
            max_hook_bytes: 16 << 20,
            max_binary_bytes: serin_proto::MAX_ARTIFACT_SIZE,
        }
    }
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The archive itself is unreadable (bad header checksum, truncated, …).
    #[error("cannot read the bundle: {0}")]
    Read(io::Error),
    /// The first entry is not the `serin-bundle` marker of a known version.
    #[error("the bundle's first entry must be {MARKER:?} containing \"serin bundle v1\": {0}")]
    Marker(String),
    /// An entry's path is absolute, leaves the bundle, or is not plain UTF-8.
    #[error("bundle entry {path:?} {why}")]
    UnsafePath {
        /// The path as written in the archive.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A symbolic or hard link, a device file, a fifo, or another kind than file or directory.
    #[error("bundle entry {path:?} is a {kind}; a bundle holds only regular files and directories")]
    EntryKind {
        /// The entry's path.
        path: String,
        /// What it is.
        kind: String,
    },
    /// The same path twice.
    #[error("bundle entry {path:?} appears twice")]
    Duplicate {
        /// The entry's path.
        path: String,
    },
    /// An entry larger than its bound.
    #[error("bundle entry {path:?} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The entry's path.
        path: String,
        /// Its declared size.
        size: u64,
        /// The bound.
        limit: u64,
    },
    /// More entries than the bound.
    #[error("the bundle has more than {limit} entries")]
    TooManyEntries {
        /// The bound.
        limit: usize,
    },
    /// An entry that is not the binary, the hooks directory or a known hook.
    #[error(
        "unexpected bundle entry {path:?}: a bundle holds {MARKER}, {BINARY} and optionally hooks/validate and hooks/post-start"
    )]
    Unexpected {
        /// The entry's path.
        path: String,
    },
    /// No `binary` entry.
    #[error("the bundle has no {BINARY:?} entry (the service binary)")]
    MissingBinary,
    /// Writing an unpacked file failed.
    #[error("{what}: {source}")]
    Write {
        /// What was being done.
        what: String,
        /// The cause.
        source: io::Error,
    },
}

/// What [`unpack`] installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// Size of the binary, in bytes.
    pub binary_size: u64,
    /// The hooks installed (`validate`, `post-start`), sorted.
    pub hooks: Vec<String>,
}

/// True when the file at `path` starts with the header of a bundle's marker entry.
pub fn is_bundle(path: &Path) -> io::Result<bool> {
    let mut head = [0u8; 512];
    let mut f = fs::File::open(path)?;
    let mut got = 0;
    while got < head.len() {
        let n = f.read(&mut head[got..])?;
        if n == 0 {
            return Ok(false);
        }
        got += n;
    }
    Ok(looks_like_bundle(&head))
}

/// The first 512 bytes of an artifact are a tar header naming the marker.
fn looks_like_bundle(head: &[u8; 512]) -> bool {
    let mut name = [0u8; 100];
    name[..MARKER.len()].copy_from_slice(MARKER.as_bytes());
    head[..100] == name && &head[257..262] == b"ustar"
}

fn write_err(what: String) -> impl FnOnce(io::Error) -> BundleError {
    move |source| BundleError::Write { what, source }
}

/// Checks an entry path and returns it in its normal form (no trailing `/`).
fn normal_path(raw: &[u8]) -> Result<String, BundleError> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    let unsafe_path = |why| BundleError::UnsafePath {
        path: shown.clone(),
        why,
    };
    let text = std::str::from_utf8(raw).map_err(|_| unsafe_path("is not UTF-8"))?;
    if text.starts_with('/') {
        return Err(unsafe_path("is an absolute path"));
    }
    let text = text.strip_suffix('/').unwrap_or(text);
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            ".." => return Err(unsafe_path("leaves the bundle (\"..\")")),
            "" | "." => return Err(unsafe_path("is not a plain relative path")),
            p if p.contains('\0') => return Err(unsafe_path("contains a NUL byte")),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

fn kind_name(t: EntryType) -> String {
    match t {
        EntryType::Symlink => "symbolic link".into(),
        EntryType::Link => "hard link".into(),
        EntryType::Char => "character device file".into(),
        EntryType::Block => "block device file".into(),
        EntryType::Fifo => "fifo".into(),
        EntryType::GNUSparse => "sparse file".into(),
        other => format!("entry of type {:?}", other.as_byte() as char),
    }
}

/// Unpacks the verified bundle at `archive` into `dest` (an existing, empty directory): the
/// binary as `dest/<binary_name>`, hooks as `dest/hooks/<name>`, each 0755 and fsynced, the
/// directories fsynced. On an error, what was written stays in `dest` for the caller to remove.
pub fn unpack(
    archive: &Path,
    dest: &Path,
    binary_name: &str,
    limits: Limits,
) -> Result<Unpacked, BundleError> {
    let file = fs::File::open(archive).map_err(BundleError::Read)?;
    let mut tar = tar::Archive::new(io::BufReader::new(file));
    let mut seen: HashSet<String> = HashSet::new();
    let mut binary_size = None;
    let mut hooks = Vec::new();
    for (index, entry) in tar.entries().map_err(BundleError::Read)?.enumerate() {
        let mut entry = entry.map_err(BundleError::Read)?;
        if index >= limits.max_entries {
            return Err(BundleError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let path = normal_path(&entry.path_bytes())?;
        let kind = entry.header().entry_type();
        let is_dir = match kind {
            EntryType::Regular | EntryType::Continuous => false,
            EntryType::Directory => true,
            other => {
                return Err(BundleError::EntryKind {
                    path,
                    kind: kind_name(other),
                });
            }
        };
        if !seen.insert(path.clone()) {
            return Err(BundleError::Duplicate { path });
        }
        let size = entry.size();
        if index == 0 {
            if path != MARKER || is_dir {
                return Err(BundleError::Marker(format!("found {path:?}")));
            }
            let mut content = Vec::new();
            entry
                .by_ref()
                .take(MARKER_CONTENT.len() as u64 + 1)
                .read_to_end(&mut content)
                .map_err(BundleError::Read)?;
            if content != MARKER_CONTENT {
                return Err(BundleError::Marker(format!(
                    "it holds {:?} (a newer bundle format?)",
                    String::from_utf8_lossy(&content)
                )));
            }
            continue;
        }
        let (target, limit) = match (path.as_str(), is_dir) {
            ("hooks", true) => {
                let dir = dest.join("hooks");
                fs::create_dir_all(&dir)
                    .map_err(write_err(format!("cannot create {}", dir.display())))?;
                continue;
            }
            (BINARY, false) => (dest.join(binary_name), limits.max_binary_bytes),
            (p, false)
                if p.strip_prefix("hooks/")
                    .is_some_and(|name| HOOKS.contains(&name)) =>
            {
                (dest.join(p), limits.max_hook_bytes)
            }
            _ => return Err(BundleError::Unexpected { path }),
        };
        if size > limit {
            return Err(BundleError::TooLarge { path, size, limit });
        }
        write_file(&mut entry, &target, size)?;
        if path == BINARY {
            binary_size = Some(size);
        } else if let Some(name) = path.strip_prefix("hooks/") {
            hooks.push(name.to_owned());
        }
    }
    if seen.is_empty() {
        return Err(BundleError::Marker("the archive is empty".into()));
    }
    let binary_size = binary_size.ok_or(BundleError::MissingBinary)?;
    if !hooks.is_empty() {
        let dir = dest.join("hooks");
        crate::durable::fsync_dir(&dir)
            .map_err(write_err(format!("cannot fsync {}", dir.display())))?;
    }
    hooks.sort();
    Ok(Unpacked { binary_size, hooks })
}

/// Writes `size` bytes of `entry` to a new file `target` (0755), fsynced.
fn write_file(entry: &mut impl Read, target: &PathBuf, size: u64) -> Result<(), BundleError> {
    let name = target.display().to_string();
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(write_err(format!("cannot create {name}")))?;
    }
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(target)
        .map_err(write_err(format!("cannot create {name}")))?;
    let copied = io::copy(&mut entry.take(size), &mut out).map_err(BundleError::Read)?;
    if copied != size {
        return Err(BundleError::Read(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("entry {name} ends after {copied} of {size} bytes"),
        )));
    }
    // The umask may have taken bits away; set exactly 0755 (never setuid/setgid).
    out.set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(write_err(format!("cannot chmod {name}")))?;
    out.sync_all()
        .map_err(write_err(format!("cannot fsync {name}")))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One entry of a test archive.
    pub(crate) struct E<'a> {
        pub path: &'a str,
        pub kind: EntryType,
        pub data: &'a [u8],
        pub mode: u32,
        pub link: Option<&'a str>,
    }

    pub(crate) fn file<'a>(path: &'a str, data: &'a [u8]) -> E<'a> {
        E {
            path,
            kind: EntryType::Regular,
            data,
            mode: 0o644,
            link: None,
        }
    }

    fn of_kind<'a>(path: &'a str, kind: EntryType, link: Option<&'a str>) -> E<'a> {
        E {
            path,
            kind,
            data: b"",
            mode: 0o644,
            link,
        }
    }

    /// A tar archive of `entries`, written raw (paths are not checked by the builder).
    pub(crate) fn archive(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            // Raw name bytes: `set_path` would refuse ".." and absolute paths.
            let name = &mut h.as_old_mut().name;
            name[..e.path.len()].copy_from_slice(e.path.as_bytes());
            h.set_entry_type(e.kind);
            h.set_size(e.data.len() as u64);
            h.set_mode(e.mode);
            if let Some(l) = e.link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            b.append(&h, e.data).unwrap();
        }
        b.into_inner().unwrap()
    }

    pub(crate) fn marker() -> E<'static> {
        file(MARKER, MARKER_CONTENT)
    }

    struct Unpack {
        _dir: tempfile::TempDir,
        dest: PathBuf,
        result: Result<Unpacked, BundleError>,
    }

    fn unpack_with(bytes: &[u8], limits: Limits) -> Unpack {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("bundle.tar");
        fs::write(&archive, bytes).unwrap();
        let dest = dir.path().join("out");
        fs::create_dir(&dest).unwrap();
        let result = unpack(&archive, &dest, "web", limits);
        Unpack {
            _dir: dir,
            dest,
            result,
        }
    }

    fn refused(entries: &[E]) -> String {
        let u = unpack_with(&archive(entries), Limits::default());
        match u.result {
            Ok(x) => panic!("accepted: {x:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_bundle_unpacks_its_binary_and_hooks_executable_and_never_setuid() {
        let mut bin = file(BINARY, b"\x7fELF...");
        bin.mode = 0o4777;
        let mut hook = file("hooks/validate", b"#!/bin/sh\nexit 0\n");
        hook.mode = 0o6755;
        let bytes = archive(&[
            marker(),
            bin,
            of_kind("hooks/", EntryType::Directory, None),
            hook,
        ]);
        let u = unpack_with(&bytes, Limits::default());
        let got = u.result.unwrap();
        assert_eq!(
            got,
            Unpacked {
                binary_size: 7,
                hooks: vec!["validate".into()]
            }
        );
        assert_eq!(fs::read(u.dest.join("web")).unwrap(), b"\x7fELF...");
        for p in ["web", "hooks/validate"] {
            let mode = fs::metadata(u.dest.join(p)).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o755, "{p}");
        }
        assert!(!u.dest.join(MARKER).exists());
    }

    #[test]
    fn a_bundle_is_told_from_a_binary_by_its_marker_only() {
        let check = |bytes: &[u8]| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("a");
            fs::write(&p, bytes).unwrap();
            is_bundle(&p).unwrap()
        };
        assert!(check(&archive(&[marker(), file(BINARY, b"x")])));
        // A tar archive without the marker (a flat file that happens to be tar) is a binary.
        assert!(!check(&archive(&[file(BINARY, b"x"), marker()])));
        assert!(!check(&archive(&[file("serin-bundle2", MARKER_CONTENT)])));
        assert!(!check(b"\x7fELF\x02\x01\x01"));
        assert!(!check(b""));
        let mut elf = vec![0x7f, b'E', b'L', b'F'];
        elf.resize(4096, 0);
        assert!(!check(&elf));
    }

    #[test]
    fn hostile_paths_are_refused_naming_the_entry() {
        let e = refused(&[marker(), file("../../etc/cron.d/x", b"x")]);
        assert!(
            e.contains("\"../../etc/cron.d/x\" leaves the bundle"),
            "{e}"
        );
        let e = refused(&[marker(), file("hooks/../../x", b"x")]);
        assert!(e.contains("leaves the bundle"), "{e}");
        let e = refused(&[marker(), file("/etc/passwd", b"x")]);
        assert!(e.contains("\"/etc/passwd\" is an absolute path"), "{e}");
        let e = refused(&[marker(), file("hooks//validate", b"x")]);
        assert!(e.contains("not a plain relative path"), "{e}");
    }

    #[test]
    fn links_and_device_files_are_refused() {
        let e = refused(&[
            marker(),
            of_kind(BINARY, EntryType::Symlink, Some("/bin/sh")),
        ]);
        assert!(e.contains("\"binary\" is a symbolic link"), "{e}");
        let e = refused(&[
            marker(),
            of_kind(
                "hooks/validate",
                EntryType::Link,
                Some("../../../etc/shadow"),
            ),
        ]);
        assert!(e.contains("\"hooks/validate\" is a hard link"), "{e}");
        let e = refused(&[marker(), of_kind(BINARY, EntryType::Char, None)]);
        assert!(e.contains("character device file"), "{e}");
        let e = refused(&[marker(), of_kind(BINARY, EntryType::Block, None)]);
        assert!(e.contains("block device file"), "{e}");
        let e = refused(&[marker(), of_kind(BINARY, EntryType::Fifo, None)]);
        assert!(e.contains("is a fifo"), "{e}");
    }

    #[test]
    fn duplicates_unknown_entries_and_a_missing_binary_are_refused() {
        let e = refused(&[marker(), file(BINARY, b"a"), file(BINARY, b"b")]);
        assert!(e.contains("\"binary\" appears twice"), "{e}");
        // Also through a trailing slash or a second marker.
        let e = refused(&[marker(), file(MARKER, MARKER_CONTENT)]);
        assert!(e.contains("appears twice"), "{e}");
        let e = refused(&[marker(), file(BINARY, b"a"), file("hooks/pre-stop", b"x")]);
        assert!(
            e.contains("unexpected bundle entry \"hooks/pre-stop\""),
            "{e}"
        );
        let e = refused(&[marker(), file("hooks/validate", b"x")]);
        assert!(e.contains("has no \"binary\" entry"), "{e}");
    }

    #[test]
    fn a_missing_or_unknown_marker_is_refused() {
        let e = refused(&[file(BINARY, b"a")]);
        assert!(e.contains("first entry must be \"serin-bundle\""), "{e}");
        let e = refused(&[file(MARKER, b"serin bundle v9\n"), file(BINARY, b"a")]);
        assert!(e.contains("a newer bundle format"), "{e}");
    }

    #[test]
    fn entries_over_the_size_bound_and_too_many_entries_are_refused() {
        let limits = Limits {
            max_entries: 3,
            max_hook_bytes: 8,
            max_binary_bytes: 16,
        };
        let big = unpack_with(&archive(&[marker(), file(BINARY, &[0u8; 17])]), limits);
        let e = big.result.unwrap_err().to_string();
        assert!(
            e.contains("\"binary\" is 17 bytes, over the limit of 16"),
            "{e}"
        );
        let hook = unpack_with(
            &archive(&[
                marker(),
                file(BINARY, b"a"),
                file("hooks/validate", &[b'#'; 9]),
            ]),
            limits,
        );
        let e = hook.result.unwrap_err().to_string();
        assert!(
            e.contains("\"hooks/validate\" is 9 bytes, over the limit of 8"),
            "{e}"
        );
        let many = unpack_with(
            &archive(&[
                marker(),
                file(BINARY, b"a"),
                of_kind("hooks", EntryType::Directory, None),
                file("hooks/validate", b"x"),
            ]),
            limits,
        );
        let e = many.result.unwrap_err().to_string();
        assert!(e.contains("more than 3 entries"), "{e}");
    }

    #[test]
    fn a_corrupt_or_truncated_archive_is_refused() {
        let mut bytes = archive(&[marker(), file(BINARY, &[7u8; 2000])]);
        bytes.truncate(1024 + 1000);
        let u = unpack_with(&bytes, Limits::default());
        let e = u.result.unwrap_err().to_string();
        assert!(e.starts_with("cannot read the bundle"), "{e}");
        let mut bytes = archive(&[marker(), file(BINARY, b"a")]);
        bytes[1024 + 5] ^= 0x20; // the second header's name: its checksum no longer matches
        let e = unpack_with(&bytes, Limits::default())
            .result
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read the bundle"), "{e}");
    }
}
