//! The release-manifest parser and verifier on arbitrary bytes.
//!
//! Properties: no panic; whatever parses is canonical (signing the parsed body with the key id
//! it names reproduces the signed bytes exactly), and never verifies against a key that did not
//! sign it.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use serin_security::manifest::{self, Candidate, SecretKey};

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = manifest::parse(data) else {
        return;
    };
    let canonical = parsed.body.canonical_bytes(parsed.key);
    assert!(
        data.starts_with(canonical.as_bytes()),
        "a parsed manifest must be in canonical form"
    );
    // A key the fuzzer cannot know: verification must fail (with UNKNOWN_KEY or BAD_SIGNATURE).
    let key = SecretKey::parse(
        "serin-ed25519-secret 0101010101010101010101010101010101010101010101010101010101010101",
    )
    .expect("fixed key");
    let b = &parsed.body;
    let candidate = Candidate {
        service: &b.service,
        release: &b.release,
        sha256: &b.sha256,
        size: b.size,
    };
    let result = manifest::verify(
        Some(data),
        candidate,
        &[key.public()],
        0,
        UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    );
    assert!(result.is_err(), "verified without the signing key");
});
