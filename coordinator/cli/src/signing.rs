//! `serin keygen`, `serin release sign` and `serin release verify`: release-signing keys and
//! signed release manifests (format in [`serin_security::manifest`]).
//!
//! Offline commands, meant for the release owner's machine, away from the coordinator: the
//! coordinator never holds a signing key, so a compromised coordinator cannot sign a release.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Args;
use serin_proto::{ReleaseId, ServiceName, Sha256};
use serin_security::manifest::{self, Candidate, ManifestBody, PublicKey, SecretKey};
use serin_security::pki::write_new;
use sha2::Digest as _;

use super::args::OutputFormat;
use super::exit::{CliError, Exit};

/// `serin keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Directory to write NAME.key (0600) and NAME.pub into.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out_dir: PathBuf,
    /// File name stem of the key pair.
    #[arg(long, default_value = "release-signing")]
    pub name: String,
    /// A comment stored with the key, e.g. who owns it.
    #[arg(long, default_value = "")]
    pub comment: String,
}

/// `serin release sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The artifact to sign (hashed and measured here).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The secret key file made by `serin keygen`.
    #[arg(long, value_name = "PATH")]
    pub key: PathBuf,
    /// Service the release belongs to.
    #[arg(long, short = 's')]
    pub service: String,
    /// Release id, e.g. 1.4.2.
    #[arg(long, short = 'r')]
    pub release: String,
    /// The release counter: higher than every earlier release of the service.
    #[arg(long)]
    pub counter: u64,
    /// The manifest expires at this instant (RFC 3339, e.g. 2027-01-31T00:00:00Z).
    #[arg(long, value_name = "TIME", conflicts_with = "expires_in")]
    pub expires: Option<String>,
    /// The manifest expires this long from now, e.g. "30d".
    #[arg(long, value_parser = super::args::parse_duration, value_name = "DURATION")]
    pub expires_in: Option<Duration>,
    /// Once a host activates this release, refuse releases with a counter below this one.
    #[arg(long, value_name = "COUNTER")]
    pub floor: Option<u64>,
    /// Where to write the manifest (default: FILE.manifest). Never overwritten.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

/// `serin release verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The artifact.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The manifest (default: FILE.manifest).
    #[arg(long, value_name = "PATH")]
    pub manifest: Option<PathBuf>,
    /// A trusted public key file (repeatable).
    #[arg(long = "trust", value_name = "PUBFILE", required = true)]
    pub trust: Vec<PathBuf>,
    /// The service the release is expected to belong to.
    #[arg(long, short = 's')]
    pub service: String,
    /// The release id expected.
    #[arg(long, short = 'r')]
    pub release: String,
    /// The floor to check the counter against.
    #[arg(long, default_value_t = 0)]
    pub floor: u64,
}

/// `serin keygen`: a new key pair, the secret 0600, never overwriting.
pub fn keygen(output: OutputFormat, args: KeygenArgs) -> Result<Exit, CliError> {
    if args.name.is_empty() || args.name.contains('/') {
        return Err(CliError::Usage(format!(
            "--name {:?} must be a plain file name",
            args.name
        )));
    }
    let secret_path = args.out_dir.join(format!("{}.key", args.name));
    let public_path = args.out_dir.join(format!("{}.pub", args.name));
    for p in [&secret_path, &public_path] {
        if p.exists() {
            return Err(CliError::Other(format!(
                "{} already exists; refusing to overwrite it",
                p.display()
            )));
        }
    }
    let key = SecretKey::generate().map_err(other)?;
    let public = key.public();
    write_new(
        &secret_path,
        key.to_file_text(&args.comment).as_bytes(),
        0o600,
    )
    .map_err(other)?;
    let line = format!("{}\n", public.to_line(&args.comment));
    if let Err(e) = write_new(&public_path, line.as_bytes(), 0o644) {
        let _ = std::fs::remove_file(&secret_path);
        return Err(other(e));
    }
    match output {
        OutputFormat::Json => println!(
            "{:#}",
            serde_json::json!({
                "key_id": public.id().to_string(),
                "secret_key": secret_path.display().to_string(),
                "public_key": public_path.display().to_string(),
            })
        ),
        OutputFormat::Text => {
            println!("release-signing key {}", public.id());
            println!(
                "  secret key  {} (0600: keep it offline, never on the coordinator)",
                secret_path.display()
            );
            println!(
                "  public key  {} (pin it in the agents' config)",
                public_path.display()
            );
        }
    }
    Ok(Exit::Success)
}

/// `serin release sign`: hashes FILE and writes its signed manifest.
pub fn sign(output: OutputFormat, args: SignArgs, now: SystemTime) -> Result<Exit, CliError> {
    let service =
        ServiceName::new(&args.service).map_err(|e| CliError::Usage(format!("--service: {e}")))?;
    let release =
        ReleaseId::new(&args.release).map_err(|e| CliError::Usage(format!("--release: {e}")))?;
    let expires = match (&args.expires, args.expires_in) {
        (Some(t), _) => Some(humantime::parse_rfc3339(t).map_err(|e| {
            CliError::Usage(format!(
                "--expires {t:?} is not RFC 3339 UTC to the second (e.g. 2027-01-31T00:00:00Z): {e}"
            ))
        })?),
        (None, Some(d)) => Some(manifest::whole_seconds(now + d)),
        (None, None) => None,
    };
    if let Some(t) = expires
        && t <= now
    {
        return Err(CliError::Usage(
            "--expires is in the past: the manifest would never verify".to_string(),
        ));
    }
    let key_text = std::fs::read_to_string(&args.key)
        .map_err(|e| CliError::Other(format!("cannot read {}: {e}", args.key.display())))?;
    let key = SecretKey::parse(&key_text)
        .map_err(|e| CliError::Usage(format!("{}: {e}", args.key.display())))?;
    let (sha256, size) = hash_file(&args.file)?;
    let body = ManifestBody {
        service,
        release,
        sha256,
        size,
        counter: args.counter,
        expires,
        floor: args.floor,
    };
    let text = manifest::sign(&body, &key).map_err(|e| CliError::Usage(e.to_string()))?;
    let out = args.out.unwrap_or_else(|| manifest_path(&args.file));
    write_new(&out, text.as_bytes(), 0o644).map_err(other)?;
    match output {
        OutputFormat::Json => println!(
            "{:#}",
            serde_json::json!({
                "manifest": out.display().to_string(),
                "service": body.service.as_str(),
                "release": body.release.as_str(),
                "sha256": body.sha256.to_hex(),
                "size": body.size,
                "counter": body.counter,
                "key_id": key.public().id().to_string(),
            })
        ),
        OutputFormat::Text => println!(
            "signed {} {} (sha256 {}, {} bytes, counter {}) with key {}: {}",
            body.service,
            body.release,
            body.sha256.to_hex(),
            body.size,
            body.counter,
            key.public().id(),
            out.display()
        ),
    }
    Ok(Exit::Success)
}

/// `serin release verify`: the agent's check, run by hand.
pub fn verify(output: OutputFormat, args: VerifyArgs, now: SystemTime) -> Result<Exit, CliError> {
    let service =
        ServiceName::new(&args.service).map_err(|e| CliError::Usage(format!("--service: {e}")))?;
    let release =
        ReleaseId::new(&args.release).map_err(|e| CliError::Usage(format!("--release: {e}")))?;
    let mut trusted = Vec::new();
    for path in &args.trust {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::Other(format!("cannot read {}: {e}", path.display())))?;
        trusted.push(
            PublicKey::parse(&text)
                .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?,
        );
    }
    let manifest_file = args
        .manifest
        .clone()
        .unwrap_or_else(|| manifest_path(&args.file));
    let bytes = match std::fs::read(&manifest_file) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(CliError::Other(format!(
                "cannot read {}: {e}",
                manifest_file.display()
            )));
        }
    };
    let (sha256, size) = hash_file(&args.file)?;
    let candidate = Candidate {
        service: &service,
        release: &release,
        sha256: &sha256,
        size,
    };
    match manifest::verify(bytes.as_deref(), candidate, &trusted, args.floor, now) {
        Ok(v) => {
            match output {
                OutputFormat::Json => println!(
                    "{:#}",
                    serde_json::json!({
                        "verified": true,
                        "counter": v.counter,
                        "new_floor": v.new_floor,
                        "key_id": v.key.to_string(),
                    })
                ),
                OutputFormat::Text => println!(
                    "verified: {service} {release}, counter {}, signed by key {}",
                    v.counter, v.key
                ),
            }
            Ok(Exit::Success)
        }
        Err(e) => {
            if output == OutputFormat::Json {
                println!(
                    "{:#}",
                    serde_json::json!({"verified": false, "code": e.code(), "error": e.to_string()})
                );
            }
            Err(CliError::Other(format!("refused ({}): {e}", e.code())))
        }
    }
}

/// `FILE.manifest` next to FILE.
fn manifest_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".manifest");
    PathBuf::from(name)
}

/// The sha256 and size of a file, read in 1 MiB blocks.
fn hash_file(path: &Path) -> Result<(Sha256, u64), CliError> {
    let io = |e: std::io::Error| CliError::Other(format!("cannot read {}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((Sha256::from_bytes(hasher.finalize().into()), size))
}

fn other(e: impl std::fmt::Display) -> CliError {
    CliError::Other(e.to_string())
}
