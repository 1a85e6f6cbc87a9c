//! Signed release manifests: what a release owner vouches for, signed offline with ed25519, and
//! the check an agent runs before it activates a release (or rolls back to one).
//!
//! # Keys
//!
//! `serin keygen` makes a key pair. The public key is one line, easy to paste into an agent's
//! config: `serin-ed25519 <64 hex digits> [comment]`. The secret key file (mode 0600, meant to stay
//! offline) is `serin-ed25519-secret <64 hex digits of the seed> [comment]`. A key is named in
//! manifests by its [`KeyId`]: the first 8 bytes of the sha256 of the public key, in hex.
//!
//! # Manifest format (version 1)
//!
//! UTF-8 text, one `name: value` field per line, each line ending in `\n`, fields in exactly this
//! order, optional fields left out entirely, nothing else (no blank lines, comments, `\r` or
//! trailing spaces), at most [`MAX_MANIFEST_LEN`] bytes:
//!
//! ```text
//! serin-release-manifest-v1
//! service: web
//! release: 1.4.2
//! sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! size: 1048576
//! counter: 7
//! expires: 2026-12-31T00:00:00Z
//! floor: 5
//! key: 1a2b3c4d5e6f7081
//! signature: <128 hex digits>
//! ```
//!
//! The signature is ed25519 (strict verification) over the **canonical bytes**: every byte of the
//! file before the `signature:` line, header line and key id included. Because the format has a
//! single spelling for every manifest (numbers without leading zeros, lowercase hex, RFC 3339 UTC
//! to the second), the parser rebuilds those bytes from the parsed fields and requires them to be
//! identical to what it read: two different byte strings never verify as the same manifest.
//!
//! - `counter`: the release counter, increasing with every release of the service.
//! - `expires` (optional): after this instant the manifest no longer verifies.
//! - `floor` (optional, at most `counter`): once a host activates this release, releases with a
//!   lower counter are refused there, as new releases and as rollback targets.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use ring::rand::SecureRandom as _;
use serin_proto::{MAX_ARTIFACT_SIZE, ReleaseId, ServiceName, Sha256};
use sha2::Digest as _;

/// The first line of a version-1 manifest.
pub const MANIFEST_HEADER: &str = "serin-release-manifest-v1";
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_LEN: usize = 4096;
/// Largest release counter or floor (the same bound as order sequences: exact in every JSON
/// reader, far from the end of `u64`).
pub const MAX_COUNTER: u64 = 1 << 53;
/// Tag of a public key line.
pub const PUBLIC_KEY_TAG: &str = "serin-ed25519";
/// Tag of a secret key file.
pub const SECRET_KEY_TAG: &str = "serin-ed25519-secret";

/// The id of a signing key: the first 8 bytes of the sha256 of its public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 8]);

impl KeyId {
    fn of(key: &VerifyingKey) -> Self {
        let digest = sha2::Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Self(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A public release-signing key, trusted for the services an agent's config pins it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    /// Parses a public key line: `serin-ed25519 <64 hex digits> [comment]`.
    pub fn parse(line: &str) -> Result<Self, KeyError> {
        let line = line.trim();
        let mut parts = line.splitn(3, ' ');
        if parts.next() != Some(PUBLIC_KEY_TAG) {
            return Err(KeyError::Format(format!(
                "a public key line starts with {PUBLIC_KEY_TAG:?}"
            )));
        }
        let bytes = hex32(parts.next().unwrap_or_default())?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError::Format("not a valid ed25519 public key".to_string()))?;
        if key.is_weak() {
            return Err(KeyError::Format(
                "a weak (small-order) ed25519 key".to_string(),
            ));
        }
        Ok(Self {
            id: KeyId::of(&key),
            key,
        })
    }

    /// The key id named in manifests.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The public key line, with an optional comment.
    pub fn to_line(&self, comment: &str) -> String {
        let hex = hex::encode(self.key.as_bytes());
        if comment.is_empty() {
            format!("{PUBLIC_KEY_TAG} {hex}")
        } else {
            format!("{PUBLIC_KEY_TAG} {hex} {comment}")
        }
    }
}

/// Parses the public keys pinned for one service (one key line each, as in an agent's config),
/// naming the entry that is wrong (`trusted_keys[1]: malformed key: …`); a key listed twice is
/// refused too, as a sign of a copy-paste mistake.
pub fn parse_pinned_keys(field: &str, lines: &[String]) -> Result<Vec<PublicKey>, String> {
    let mut keys: Vec<PublicKey> = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let key = PublicKey::parse(line).map_err(|e| format!("{field}[{i}]: {e}"))?;
        if keys.iter().any(|k| k.id == key.id) {
            return Err(format!("{field}[{i}]: key {} is listed twice", key.id));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// A secret release-signing key. Zeroed when dropped; never printed.
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(id {})", self.public().id())
    }
}

impl SecretKey {
    /// A new key from the system's random number generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        ring::rand::SystemRandom::new()
            .fill(seed.as_mut())
            .map_err(|_| KeyError::Random)?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// Parses a secret key file: `serin-ed25519-secret <64 hex digits> [comment]`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut parts = text.trim().splitn(3, ' ');
        if parts.next() != Some(SECRET_KEY_TAG) {
            return Err(KeyError::Format(format!(
                "a secret key file starts with {SECRET_KEY_TAG:?}"
            )));
        }
        let seed = zeroize::Zeroizing::new(hex32(parts.next().unwrap_or_default())?);
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// The secret key file's text (keep it 0600 and offline).
    pub fn to_file_text(&self, comment: &str) -> zeroize::Zeroizing<String> {
        let seed = zeroize::Zeroizing::new(hex::encode(self.0.to_bytes()));
        zeroize::Zeroizing::new(if comment.is_empty() {
            format!("{SECRET_KEY_TAG} {}\n", seed.as_str())
        } else {
            format!("{SECRET_KEY_TAG} {} {comment}\n", seed.as_str())
        })
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        let key = self.0.verifying_key();
        PublicKey {
            id: KeyId::of(&key),
            key,
        }
    }
}

fn hex32(s: &str) -> Result<[u8; 32], KeyError> {
    let mut out = [0u8; 32];
    if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(KeyError::Format(
            "expected 64 lowercase hex digits".to_string(),
        ));
    }
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| KeyError::Format("expected 64 lowercase hex digits".to_string()))?;
    Ok(out)
}

/// Why a key cannot be read or made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not a key in serin's format.
    #[error("malformed key: {0}")]
    Format(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// What a manifest vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestBody {
    /// The service the release belongs to.
    pub service: ServiceName,
    /// The release id.
    pub release: ReleaseId,
    /// The artifact's sha256.
    pub sha256: Sha256,
    /// The artifact's exact size in bytes.
    pub size: u64,
    /// The release counter (increasing per service).
    pub counter: u64,
    /// After this instant (whole seconds) the manifest is expired.
    pub expires: Option<SystemTime>,
    /// The new floor this release sets once activated (at most `counter`).
    pub floor: Option<u64>,
}

impl ManifestBody {
    /// Checks the bounds a manifest must respect to be signed or accepted.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.counter > MAX_COUNTER {
            return Err(ManifestError::field(
                "counter",
                format!("{} exceeds {MAX_COUNTER}", self.counter),
            ));
        }
        if self.size > MAX_ARTIFACT_SIZE {
            return Err(ManifestError::field(
                "size",
                format!("{} exceeds {MAX_ARTIFACT_SIZE}", self.size),
            ));
        }
        if let Some(floor) = self.floor
            && floor > self.counter
        {
            return Err(ManifestError::field(
                "floor",
                format!(
                    "{floor} is above the release's own counter {}",
                    self.counter
                ),
            ));
        }
        if let Some(expires) = self.expires {
            let secs = expires
                .duration_since(UNIX_EPOCH)
                .map_err(|_| ManifestError::field("expires", "before 1970"))?;
            if secs.subsec_nanos() != 0 {
                return Err(ManifestError::field("expires", "must be whole seconds"));
            }
        }
        Ok(())
    }

    /// The canonical bytes signed for this body and key: every line before `signature:`.
    pub fn canonical_bytes(&self, key: KeyId) -> String {
        let mut out = String::with_capacity(512);
        out.push_str(MANIFEST_HEADER);
        out.push('\n');
        let mut field = |name: &str, value: &dyn fmt::Display| {
            out.push_str(&format!("{name}: {value}\n"));
        };
        field("service", &self.service);
        field("release", &self.release);
        field("sha256", &self.sha256.to_hex());
        field("size", &self.size);
        field("counter", &self.counter);
        if let Some(expires) = self.expires {
            field("expires", &humantime::format_rfc3339_seconds(expires));
        }
        if let Some(floor) = self.floor {
            field("floor", &floor);
        }
        field("key", &key);
        out
    }
}

/// Signs `body` with `key`: the complete manifest file.
pub fn sign(body: &ManifestBody, key: &SecretKey) -> Result<String, ManifestError> {
    body.validate()?;
    let mut text = body.canonical_bytes(key.public().id());
    let signature = key.0.sign(text.as_bytes());
    text.push_str(&format!(
        "signature: {}\n",
        hex::encode(signature.to_bytes())
    ));
    Ok(text)
}

/// A parsed manifest whose signature has not been checked yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    /// What it vouches for.
    pub body: ManifestBody,
    /// The key that claims to have signed it.
    pub key: KeyId,
    signature: [u8; 64],
    signed_len: usize,
}

/// Parses a manifest file strictly (see the module docs for the format).
pub fn parse(bytes: &[u8]) -> Result<SignedManifest, ManifestError> {
    if bytes.len() > MAX_MANIFEST_LEN {
        return Err(ManifestError::Malformed(format!(
            "{} bytes, at most {MAX_MANIFEST_LEN} allowed",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ManifestError::Malformed("not UTF-8".to_string()))?;
    if !text.ends_with('\n') {
        return Err(ManifestError::Malformed(
            "the last line does not end in a newline".to_string(),
        ));
    }
    let mut lines = text[..text.len() - 1].split('\n');
    if lines.next() != Some(MANIFEST_HEADER) {
        return Err(ManifestError::Malformed(format!(
            "the first line must be {MANIFEST_HEADER:?}"
        )));
    }
    let mut lines = lines.peekable();
    let mut take = |name: &'static str, optional: bool| -> Result<Option<&str>, ManifestError> {
        match lines
            .peek()
            .and_then(|l| l.strip_prefix(name))
            .and_then(|r| r.strip_prefix(": "))
        {
            Some(value) => {
                lines.next();
                Ok(Some(value))
            }
            None if optional => Ok(None),
            None => Err(ManifestError::field(
                name,
                match lines.peek() {
                    Some(line) => format!("expected here, found {:?}", cut(line)),
                    None => "missing".to_string(),
                },
            )),
        }
    };
    let service = take("service", false)?.unwrap_or_default();
    let release = take("release", false)?.unwrap_or_default();
    let sha256 = take("sha256", false)?.unwrap_or_default();
    let size = take("size", false)?.unwrap_or_default();
    let counter = take("counter", false)?.unwrap_or_default();
    let expires = take("expires", true)?;
    let floor = take("floor", true)?;
    let key = take("key", false)?.unwrap_or_default();
    let signature = take("signature", false)?.unwrap_or_default();
    if let Some(extra) = lines.next() {
        return Err(ManifestError::Malformed(format!(
            "unexpected line after the signature: {:?}",
            cut(extra)
        )));
    }

    let body = ManifestBody {
        service: ServiceName::new(service)
            .map_err(|e| ManifestError::field("service", e.problem))?,
        release: ReleaseId::new(release).map_err(|e| ManifestError::field("release", e.problem))?,
        sha256: Sha256::from_hex("sha256", sha256)
            .map_err(|e| ManifestError::field("sha256", e.problem))?,
        size: number("size", size)?,
        counter: number("counter", counter)?,
        expires: expires
            .map(|e| {
                humantime::parse_rfc3339(e).map_err(|err| {
                    ManifestError::field(
                        "expires",
                        format!("{:?} is not RFC 3339 UTC: {err}", cut(e)),
                    )
                })
            })
            .transpose()?,
        floor: floor.map(|f| number("floor", f)).transpose()?,
    };
    body.validate()?;
    let mut key_id = [0u8; 8];
    if key.len() != 16 || key.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ManifestError::field(
            "key",
            "expected 16 lowercase hex digits",
        ));
    }
    hex::decode_to_slice(key, &mut key_id)
        .map_err(|_| ManifestError::field("key", "expected 16 lowercase hex digits"))?;
    let mut sig = [0u8; 64];
    if signature.len() != 128 || signature.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ManifestError::field(
            "signature",
            "expected 128 lowercase hex digits",
        ));
    }
    hex::decode_to_slice(signature, &mut sig)
        .map_err(|_| ManifestError::field("signature", "expected 128 lowercase hex digits"))?;

    let key = KeyId(key_id);
    let canonical = body.canonical_bytes(key);
    let signed_len = text.len() - "signature: \n".len() - signature.len();
    if text.as_bytes()[..signed_len] != *canonical.as_bytes() {
        return Err(ManifestError::Malformed(
            "not in canonical form (numbers without leading zeros, RFC 3339 UTC to the second)"
                .to_string(),
        ));
    }
    Ok(SignedManifest {
        body,
        key,
        signature: sig,
        signed_len,
    })
}

fn number(field: &'static str, s: &str) -> Result<u64, ManifestError> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if !canonical {
        return Err(ManifestError::field(
            field,
            format!("{:?} is not a number", cut(s)),
        ));
    }
    s.parse()
        .map_err(|_| ManifestError::field(field, format!("{:?} is out of range", cut(s))))
}

fn cut(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Why a manifest cannot be parsed or signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// The file does not follow the format.
    #[error("malformed release manifest: {0}")]
    Malformed(String),
    /// A field is missing, out of place or invalid.
    #[error("release manifest field {field}: {problem}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl ManifestError {
    fn field(field: &'static str, problem: impl Into<String>) -> Self {
        Self::Field {
            field,
            problem: problem.into(),
        }
    }
}

/// What the agent is about to activate, as it knows it from the order and the staged bytes.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The service the order is for.
    pub service: &'a ServiceName,
    /// The release id the order names.
    pub release: &'a ReleaseId,
    /// The sha256 of the bytes actually staged.
    pub sha256: &'a Sha256,
    /// The size of the bytes actually staged.
    pub size: u64,
}

/// A manifest that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The release counter.
    pub counter: u64,
    /// The floor to persist once the release is activated: the higher of the current floor and
    /// the manifest's.
    pub new_floor: u64,
    /// The key that signed it.
    pub key: KeyId,
}

/// Why a release is refused; each case has its own machine-readable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Keys are pinned for the service but the release has no manifest.
    #[error(
        "release {release} of {service} is unsigned, and signing keys are pinned for {service}"
    )]
    Unsigned {
        /// The service.
        service: String,
        /// The release.
        release: String,
    },
    /// The manifest does not parse.
    #[error(transparent)]
    Malformed(#[from] ManifestError),
    /// Signed by a key not pinned for the service.
    #[error("the manifest is signed by key {key}, which is not trusted for {service}")]
    UnknownKey {
        /// The key id in the manifest.
        key: KeyId,
        /// The service.
        service: String,
    },
    /// The signature does not verify: the manifest was altered or forged.
    #[error("the manifest's signature by key {key} does not verify (altered or forged)")]
    BadSignature {
        /// The key id in the manifest.
        key: KeyId,
    },
    /// A valid manifest of another service.
    #[error("the manifest is for service {manifest}, not {expected}")]
    OtherService {
        /// What the manifest says.
        manifest: String,
        /// What the order says.
        expected: String,
    },
    /// A valid manifest of another release.
    #[error("the manifest is for release {manifest}, not {expected}")]
    OtherRelease {
        /// What the manifest says.
        manifest: String,
        /// What the order says.
        expected: String,
    },
    /// The artifact's hash differs from the signed one.
    #[error("the artifact's sha256 is {actual}, the manifest signs {signed}")]
    HashMismatch {
        /// Signed.
        signed: String,
        /// Staged.
        actual: String,
    },
    /// The artifact's size differs from the signed one.
    #[error("the artifact is {actual} bytes, the manifest signs {signed}")]
    SizeMismatch {
        /// Signed.
        signed: u64,
        /// Staged.
        actual: u64,
    },
    /// The manifest expired.
    #[error("the manifest expired at {expired}")]
    Expired {
        /// When (RFC 3339).
        expired: String,
    },
    /// The release counter is below the host's floor for the service (a downgrade or replay).
    #[error("release counter {counter} is below this host's floor {floor} for the service")]
    BelowFloor {
        /// The manifest's counter.
        counter: u64,
        /// The persisted floor.
        floor: u64,
    },
}

impl VerifyError {
    /// A stable, machine-readable code for results and evidence.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Unsigned { .. } => "UNSIGNED",
            VerifyError::Malformed(_) => "MALFORMED_MANIFEST",
            VerifyError::UnknownKey { .. } => "UNKNOWN_KEY",
            VerifyError::BadSignature { .. } => "BAD_SIGNATURE",
            VerifyError::OtherService { .. } => "OTHER_SERVICE",
            VerifyError::OtherRelease { .. } => "OTHER_RELEASE",
            VerifyError::HashMismatch { .. } => "HASH_MISMATCH",
            VerifyError::SizeMismatch { .. } => "SIZE_MISMATCH",
            VerifyError::Expired { .. } => "EXPIRED",
            VerifyError::BelowFloor { .. } => "BELOW_FLOOR",
        }
    }
}

/// Checks `manifest` (the file's bytes, `None` when the release has none) for `candidate`
/// against the keys pinned for its service, the host's persisted `floor` and the time `now`.
///
/// The order of the checks is part of the contract: nothing in the manifest is believed before
/// its signature verified with a trusted key.
pub fn verify(
    manifest: Option<&[u8]>,
    candidate: Candidate<'_>,
    trusted: &[PublicKey],
    floor: u64,
    now: SystemTime,
) -> Result<Verified, VerifyError> {
    let bytes = manifest.ok_or_else(|| VerifyError::Unsigned {
        service: candidate.service.to_string(),
        release: candidate.release.to_string(),
    })?;
    let m = parse(bytes)?;
    let key = trusted
        .iter()
        .find(|k| k.id == m.key)
        .ok_or_else(|| VerifyError::UnknownKey {
            key: m.key,
            service: candidate.service.to_string(),
        })?;
    let signature = ed25519_dalek::Signature::from_bytes(&m.signature);
    key.key
        .verify_strict(&bytes[..m.signed_len], &signature)
        .map_err(|_| VerifyError::BadSignature { key: m.key })?;
    let b = &m.body;
    if &b.service != candidate.service {
        return Err(VerifyError::OtherService {
            manifest: b.service.to_string(),
            expected: candidate.service.to_string(),
        });
    }
    if &b.release != candidate.release {
        return Err(VerifyError::OtherRelease {
            manifest: b.release.to_string(),
            expected: candidate.release.to_string(),
        });
    }
    if &b.sha256 != candidate.sha256 {
        return Err(VerifyError::HashMismatch {
            signed: b.sha256.to_hex(),
            actual: candidate.sha256.to_hex(),
        });
    }
    if b.size != candidate.size {
        return Err(VerifyError::SizeMismatch {
            signed: b.size,
            actual: candidate.size,
        });
    }
    if let Some(expires) = b.expires
        && now >= expires
    {
        return Err(VerifyError::Expired {
            expired: humantime::format_rfc3339_seconds(expires).to_string(),
        });
    }
    if b.counter < floor {
        return Err(VerifyError::BelowFloor {
            counter: b.counter,
            floor,
        });
    }
    Ok(Verified {
        counter: b.counter,
        new_floor: floor.max(b.floor.unwrap_or(0)),
        key: m.key,
    })
}

/// Whole seconds since the epoch of `t`, as a manifest's `expires` holds it.
pub fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}
