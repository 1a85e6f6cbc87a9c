//! Signed releases on the host: with signing keys pinned for the service, no release is staged,
//! swapped in or rolled back to unless its manifest verifies (`serin_security::manifest::verify`)
//! with a pinned key, names this service, this release, its sha256 and size, has not expired, and
//! carries a counter at or above the service's persisted floor.
//!
//! Where the checks run:
//! - before a stage or activate order downloads anything ([`ServiceTask::admit_release`]): the
//!   URL source must be allowed, and the order's manifest must verify against what the order
//!   declares (so a refused release is never fetched, and staged bytes, verified against the
//!   declared sha256 and size, are the signed ones);
//! - right before the swap ([`ServiceTask::check_installed`]): the manifest (the order's, else the
//!   one kept with the release) against `release.json` of the installed release, i.e. the hash
//!   and size measured on the staged bytes; the floor and the expiry at that moment;
//! - before an ordered rollback swaps: the manifest kept with the target release.
//!
//! The dead-man switch's own rollback is not checked: it restores the release that ran before.
//! The floor is raised (durably) when an activation of a manifest carrying a higher `floor` ends
//! kept ([`ServiceTask::raise_floor`]).

use std::time::SystemTime;

use serin_proto::wire::ResultCode;
use serin_proto::{Release, ReleaseId, Sha256};
use serin_security::manifest::{self, Candidate, Verified, VerifyError};

use crate::durable;

use super::ServiceTask;

use crate::release_store::RELEASE_MANIFEST as MANIFEST_FILE;

/// Why a release is refused: the result code and the message for the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) code: ResultCode,
    pub(super) message: String,
}

/// The result code of each verification failure.
pub fn result_code(e: &VerifyError) -> ResultCode {
    match e {
        VerifyError::Unsigned { .. } => ResultCode::Unsigned,
        VerifyError::Malformed(_) => ResultCode::MalformedManifest,
        VerifyError::UnknownKey { .. } => ResultCode::UnknownKey,
        VerifyError::BadSignature { .. } => ResultCode::BadSignature,
        VerifyError::OtherService { .. } => ResultCode::OtherService,
        VerifyError::OtherRelease { .. } => ResultCode::OtherRelease,
        VerifyError::HashMismatch { .. } => ResultCode::SignedHashMismatch,
        VerifyError::SizeMismatch { .. } => ResultCode::SignedSizeMismatch,
        VerifyError::Expired { .. } => ResultCode::Expired,
        VerifyError::BelowFloor { .. } => ResultCode::BelowFloor,
    }
}

impl ServiceTask {
    fn verify(
        &self,
        manifest: Option<&str>,
        release: &ReleaseId,
        sha256: &Sha256,
        size: u64,
    ) -> Result<Option<Verified>, Refusal> {
        if self.cfg.signing_keys.is_empty() {
            return Ok(None);
        }
        manifest::verify(
            manifest.map(str::as_bytes),
            Candidate {
                service: &self.cfg.name,
                release,
                sha256,
                size,
            },
            &self.cfg.signing_keys,
            self.state.floor,
            SystemTime::now(),
        )
        .map(Some)
        .map_err(|e| {
            tracing::warn!(service = self.name(), release = %release, code = e.code(), error = %e, "release refused");
            Refusal {
                code: result_code(&e),
                message: format!("release {release} refused ({}): {e}", e.code()),
            }
        })
    }

    /// Before anything is fetched for a stage or activate order: the URL source is allowed, and
    /// (keys pinned) the order's manifest verifies against what the order declares.
    pub(super) fn admit_release(&self, release: &Release) -> Result<(), Refusal> {
        self.ctx
            .fetcher
            .check_source(release)
            .map_err(|message| Refusal {
                code: ResultCode::UrlNotAllowed,
                message,
            })?;
        self.verify(
            release.manifest.as_deref(),
            &release.id,
            &release.sha256,
            release.size,
        )
        .map(|_| ())
    }

    /// The manifest kept with installed release `id`, if any.
    fn stored_manifest(&self, id: &str) -> Option<String> {
        std::fs::read_to_string(self.store.release_dir(id).join(MANIFEST_FILE)).ok()
    }

    /// Right before a swap to installed release `id`: its manifest (`offered`, else the one kept
    /// with it) verifies against the hash and size measured when it was staged, the floor and
    /// the time now. A verified manifest that was offered is kept with the release (for later
    /// rollbacks and the floor).
    pub(super) fn check_installed(&self, id: &str, offered: Option<&str>) -> Result<(), Refusal> {
        if self.cfg.signing_keys.is_empty() {
            return Ok(());
        }
        let unknown = |what: String| Refusal {
            code: ResultCode::UnknownRelease,
            message: what,
        };
        let meta = self
            .store
            .installed(id)
            .ok_or_else(|| unknown(format!("release {id} is not installed")))?;
        let rid = ReleaseId::new(id).map_err(|e| unknown(e.to_string()))?;
        let sha = Sha256::from_hex("release.json sha256", &meta.sha256)
            .map_err(|e| unknown(format!("release {id}: {e}")))?;
        let stored = self.stored_manifest(id);
        let manifest = offered.map(str::to_owned).or(stored.clone());
        self.verify(manifest.as_deref(), &rid, &sha, meta.artifact_size())?;
        if let Some(m) = manifest
            && stored.as_deref() != Some(m.as_str())
        {
            let path = self.store.release_dir(id).join(MANIFEST_FILE);
            if let Err(e) = durable::write_atomic(&path, m.as_bytes()) {
                tracing::warn!(service = self.name(), release = id, error = %e, "cannot keep the manifest with the release; a rollback to it will be refused as unsigned");
            }
        }
        Ok(())
    }

    /// After an activation of `id` ended kept: raises the persisted floor to the manifest's
    /// `floor` if that is higher (re-verified: nothing in a manifest is believed unverified).
    pub(super) fn raise_floor(&mut self, id: &str) {
        if self.cfg.signing_keys.is_empty() {
            return;
        }
        let Some(meta) = self.store.installed(id) else {
            return;
        };
        let (Ok(rid), Ok(sha)) = (
            ReleaseId::new(id),
            Sha256::from_hex("release.json sha256", &meta.sha256),
        ) else {
            return;
        };
        let manifest = self.stored_manifest(id);
        // The release is current now: check it against the floor it was admitted under, i.e.
        // no floor, so that a floor raised meanwhile does not make it look refused here.
        let verified = manifest::verify(
            manifest.as_deref().map(str::as_bytes),
            Candidate {
                service: &self.cfg.name,
                release: &rid,
                sha256: &sha,
                size: meta.artifact_size(),
            },
            &self.cfg.signing_keys,
            0,
            // It was within its validity when it was swapped in; an expiry since then does not
            // undo the floor its signer asked for.
            SystemTime::UNIX_EPOCH,
        );
        match verified {
            Ok(v) if v.new_floor > self.state.floor => {
                tracing::info!(
                    service = self.name(),
                    release = id,
                    floor = v.new_floor,
                    previous = self.state.floor,
                    "raising the release floor"
                );
                self.state.floor = v.new_floor;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(service = self.name(), release = id, error = %e, "cannot read the floor of the activated release");
            }
        }
    }
}
