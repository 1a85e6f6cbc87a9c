//! `serin release pack`: a release bundle, i.e. the service binary and its lifecycle hooks in one
//! artifact (format in the agent's `bundle` module: a plain tar whose first entry is the
//! `serin-bundle` marker, then `binary`, then `hooks/validate` and `hooks/post-start`).
//!
//! The output is deterministic — entries in a fixed order, mtime 0, uid/gid 0, no user or group
//! names, modes 0644 (marker) and 0755 (binary, hooks) — so the same inputs always give the same
//! sha256, whoever packs them and wherever. The bundle is then an artifact like any other:
//! `serin release sign` and `serin artifact push` take it unchanged.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use sha2::Digest as _;

use super::args::OutputFormat;
use super::exit::{CliError, Exit};

/// The marker entry, the bundle's first (the agent tells a bundle from a binary by it).
pub const MARKER: &str = "serin-bundle";
/// The marker's content: the format version.
pub const MARKER_CONTENT: &[u8] = b"serin bundle v1\n";
/// The hooks a bundle may carry, in the order they are written.
pub const HOOKS: [&str; 2] = ["post-start", "validate"];

/// `serin release pack`.
#[derive(Debug, Args)]
pub struct PackArgs {
    /// The service binary.
    #[arg(long, value_name = "FILE")]
    pub binary: PathBuf,
    /// A lifecycle hook: validate=FILE (run before the swap) or post-start=FILE (after the
    /// restart, before health gating). Repeatable, once per hook.
    #[arg(long = "hook", value_name = "NAME=FILE")]
    pub hooks: Vec<String>,
    /// Where to write the bundle. Never overwritten.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
}

/// Parses `--hook NAME=FILE` values into (name, file), sorted by name, each name at most once.
fn parse_hooks(values: &[String]) -> Result<Vec<(&'static str, PathBuf)>, CliError> {
    let mut hooks: Vec<(&'static str, PathBuf)> = Vec::new();
    for v in values {
        let (name, file) = v.split_once('=').ok_or_else(|| {
            CliError::Usage(format!(
                "--hook {v:?}: expected NAME=FILE, e.g. validate=./check.sh"
            ))
        })?;
        let name = HOOKS.iter().find(|h| **h == name).ok_or_else(|| {
            CliError::Usage(format!(
                "--hook {v:?}: unknown hook {name:?} (known: validate, post-start)"
            ))
        })?;
        if file.is_empty() {
            return Err(CliError::Usage(format!("--hook {v:?}: no file given")));
        }
        if hooks.iter().any(|(n, _)| n == name) {
            return Err(CliError::Usage(format!("--hook {name} given twice")));
        }
        hooks.push((name, PathBuf::from(file)));
    }
    hooks.sort_by_key(|(n, _)| *n);
    Ok(hooks)
}

fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> Result<tar::Header, CliError> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)
        .map_err(|e| CliError::Other(format!("bundle entry {path}: {e}")))?;
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    Ok(h)
}

/// Writes the bundle of `binary` and `hooks` (sorted by name) as bytes.
pub fn pack(binary: &Path, hooks: &[(&str, PathBuf)]) -> Result<Vec<u8>, CliError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| CliError::Other(format!("cannot read {}: {e}", p.display())))
    };
    let other = |e: std::io::Error| CliError::Other(format!("cannot write the bundle: {e}"));
    let mut b = tar::Builder::new(Vec::new());
    b.append(
        &header(
            MARKER,
            tar::EntryType::Regular,
            MARKER_CONTENT.len() as u64,
            0o644,
        )?,
        MARKER_CONTENT,
    )
    .map_err(other)?;
    let bin = read(binary)?;
    if bin.is_empty() {
        return Err(CliError::Usage(format!(
            "--binary {}: the file is empty",
            binary.display()
        )));
    }
    b.append(
        &header("binary", tar::EntryType::Regular, bin.len() as u64, 0o755)?,
        &bin[..],
    )
    .map_err(other)?;
    if !hooks.is_empty() {
        b.append(
            &header("hooks/", tar::EntryType::Directory, 0, 0o755)?,
            std::io::empty(),
        )
        .map_err(other)?;
    }
    for (name, file) in hooks {
        let data = read(file)?;
        b.append(
            &header(
                &format!("hooks/{name}"),
                tar::EntryType::Regular,
                data.len() as u64,
                0o755,
            )?,
            &data[..],
        )
        .map_err(other)?;
    }
    b.into_inner().map_err(other)
}

/// `serin release pack`: writes the bundle to `--out` (never overwriting) and prints its sha256
/// and size.
pub fn run(output: OutputFormat, args: PackArgs) -> Result<Exit, CliError> {
    let hooks = parse_hooks(&args.hooks)?;
    let bytes = pack(&args.binary, &hooks)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&args.out)
        .map_err(|e| CliError::Other(format!("cannot create {}: {e}", args.out.display())))?;
    f.write_all(&bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| CliError::Other(format!("cannot write {}: {e}", args.out.display())))?;
    let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    let names: Vec<&str> = hooks.iter().map(|(n, _)| *n).collect();
    match output {
        OutputFormat::Json => println!(
            "{:#}",
            serde_json::json!({
                "bundle": args.out.display().to_string(),
                "sha256": sha256,
                "size": bytes.len(),
                "hooks": names,
            })
        ),
        OutputFormat::Text => println!(
            "packed {} with hooks [{}]: {} (sha256 {sha256}, {} bytes)",
            args.binary.display(),
            names.join(", "),
            args.out.display(),
            bytes.len()
        ),
    }
    Ok(Exit::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_inputs_give_the_same_bytes_in_a_fixed_layout() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("app");
        let check = dir.path().join("check.sh");
        let warm = dir.path().join("warm.sh");
        std::fs::write(&bin, b"\x7fELF app").unwrap();
        std::fs::write(&check, b"#!/bin/sh\nexit 0\n").unwrap();
        std::fs::write(&warm, b"#!/bin/sh\necho warm\n").unwrap();
        let hooks = parse_hooks(&[
            format!("validate={}", check.display()),
            format!("post-start={}", warm.display()),
        ])
        .unwrap();
        let a = pack(&bin, &hooks).unwrap();
        // Other mtimes on the inputs change nothing.
        std::fs::File::options()
            .write(true)
            .open(&bin)
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(9))
            .unwrap();
        assert_eq!(pack(&bin, &hooks).unwrap(), a);
        let mut ar = tar::Archive::new(&a[..]);
        let entries: Vec<(String, u32, u64, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.mode().unwrap(),
                    h.mtime().unwrap(),
                    h.uid().unwrap() + h.gid().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                ("serin-bundle".into(), 0o644, 0, 0),
                ("binary".into(), 0o755, 0, 0),
                ("hooks/".into(), 0o755, 0, 0),
                ("hooks/post-start".into(), 0o755, 0, 0),
                ("hooks/validate".into(), 0o755, 0, 0),
            ]
        );
    }

    #[test]
    fn bad_hook_arguments_are_usage_errors_naming_the_problem() {
        let err = |v: &[&str]| {
            let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            parse_hooks(&v).unwrap_err().to_string()
        };
        assert!(err(&["pre-stop=./x"]).contains("unknown hook \"pre-stop\""));
        assert!(err(&["validate"]).contains("expected NAME=FILE"));
        assert!(err(&["validate=./a", "validate=./b"]).contains("--hook validate given twice"));
        assert!(err(&["validate="]).contains("no file given"));
    }
}
