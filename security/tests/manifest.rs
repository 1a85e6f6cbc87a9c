//! Signed release manifests: the signature matrix (one code per refusal), mutated bytes of a valid
//! manifest and of its artifact, the strict canonical format, and the key files.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serin_proto::{ReleaseId, ServiceName, Sha256};
use serin_security::manifest::{
    Candidate, ManifestBody, PublicKey, SecretKey, VerifyError, parse, parse_pinned_keys, sign,
    verify,
};
use sha2::Digest as _;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

const NOW: u64 = 1_800_000_000;

fn artifact() -> Vec<u8> {
    (0..4096u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn sha(bytes: &[u8]) -> Sha256 {
    Sha256::from_bytes(sha2::Sha256::digest(bytes).into())
}

fn body(service: &str, release: &str, art: &[u8]) -> ManifestBody {
    ManifestBody {
        service: ServiceName::new(service).unwrap(),
        release: ReleaseId::new(release).unwrap(),
        sha256: sha(art),
        size: art.len() as u64,
        counter: 7,
        expires: Some(at(NOW + 3600)),
        floor: Some(5),
    }
}

/// What the agent knows: the order's service and release, the staged bytes.
struct Staged {
    service: ServiceName,
    release: ReleaseId,
    sha256: Sha256,
    size: u64,
}

impl Staged {
    fn of(service: &str, release: &str, art: &[u8]) -> Self {
        Self {
            service: ServiceName::new(service).unwrap(),
            release: ReleaseId::new(release).unwrap(),
            sha256: sha(art),
            size: art.len() as u64,
        }
    }
    fn candidate(&self) -> Candidate<'_> {
        Candidate {
            service: &self.service,
            release: &self.release,
            sha256: &self.sha256,
            size: self.size,
        }
    }
}

#[test]
fn the_signature_matrix_refuses_each_case_with_its_own_code() {
    let owner = SecretKey::generate().unwrap();
    let stranger = SecretKey::generate().unwrap();
    let trusted = vec![owner.public()];
    let art = artifact();
    let good = sign(&body("web", "1.4.2", &art), &owner).unwrap();

    // An attacker's manifest that claims the owner's key id, signed with the stranger's key.
    let forged = {
        let b = body("web", "1.4.2", &art);
        let text = sign(&b, &stranger).unwrap();
        text.replace(
            &format!("key: {}", stranger.public().id()),
            &format!("key: {}", owner.public().id()),
        )
    };
    // The owner's manifest with a field changed after signing.
    let tampered = good.replace("counter: 7\n", "counter: 9\n");
    let mut tampered_art = art.clone();
    tampered_art[100] ^= 0xff;
    let mut truncated = art.clone();
    truncated.truncate(4000);
    let below = {
        let mut b = body("web", "1.4.2", &art);
        b.counter = 4;
        b.floor = None;
        sign(&b, &owner).unwrap()
    };

    type Case<'a> = (
        &'a str,
        Option<String>,
        Staged,
        &'a [PublicKey],
        u64,
        u64,
        Result<u64, &'a str>,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "valid",
            Some(good.clone()),
            Staged::of("web", "1.4.2", &art),
            &trusted,
            0,
            NOW,
            Ok(5),
        ),
        (
            "valid at the floor",
            Some(good.clone()),
            Staged::of("web", "1.4.2", &art),
            &trusted,
            7,
            NOW,
            Ok(7),
        ),
        (
            "unsigned",
            None,
            Staged::of("web", "1.4.2", &art),
            &trusted,
            0,
            NOW,
            Err("UNSIGNED"),
        ),
        (
            "garbage",
            Some("hello\n".into()),
            Staged::of("web", "1.4.2", &art),
            &trusted,
            0,
            NOW,
            Err("MALFORMED_MANIFEST"),
        ),
        (
            "another key",
            Some(sign(&body("web", "1.4.2", &art), &stranger).unwrap()),
            Staged::of("web", "1.4.2", &art),
            &trusted,
            0,
            NOW,
            Err("UNKNOWN_KEY"),
        ),
        (
            "no key pinned",
            Some(good.clone()),
            Staged::of("web", "1.4.2", &art),
            &[],
            0,
            NOW,
            Err("UNKNOWN_KEY"),
        ),
        (
            "forged with a borrowed key id",
            Some(forged),
            Staged::of("web", "1.4.2", &art),
            &trusted,
            0,
            NOW,
            Err("BAD_SIGNATURE"),
        ),
        (
            "tampered after signing",
            Some(tampered),
            Staged::of("web", "1.4.2", &art),
            &trusted,
            0,
            NOW,
            Err("BAD_SIGNATURE"),
        ),
        (
            "other service",
            Some(sign(&body("api", "1.4.2", &art), &owner).unwrap()),
            Staged::of("web", "1.4.2", &art),
            &trusted,
            0,
            NOW,
            Err("OTHER_SERVICE"),
        ),
        (
            "other release",
            Some(sign(&body("web", "1.4.1", &art), &owner).unwrap()),
            Staged::of("web", "1.4.2", &art),
            &trusted,
            0,
            NOW,
            Err("OTHER_RELEASE"),
        ),
        (
            "artifact altered",
            Some(good.clone()),
            Staged::of("web", "1.4.2", &tampered_art),
            &trusted,
            0,
            NOW,
            Err("HASH_MISMATCH"),
        ),
        (
            "artifact truncated",
            Some(good.clone()),
            Staged::of("web", "1.4.2", &truncated),
            &trusted,
            0,
            NOW,
            Err("HASH_MISMATCH"),
        ),
        (
            "size differs",
            Some(good.clone()),
            Staged {
                size: 4095,
                ..Staged::of("web", "1.4.2", &art)
            },
            &trusted,
            0,
            NOW,
            Err("SIZE_MISMATCH"),
        ),
        (
            "expired",
            Some(good.clone()),
            Staged::of("web", "1.4.2", &art),
            &trusted,
            0,
            NOW + 3601,
            Err("EXPIRED"),
        ),
        (
            "expired at the instant",
            Some(good.clone()),
            Staged::of("web", "1.4.2", &art),
            &trusted,
            0,
            NOW + 3600,
            Err("EXPIRED"),
        ),
        (
            "below the floor",
            Some(below),
            Staged::of("web", "1.4.2", &art),
            &trusted,
            5,
            NOW,
            Err("BELOW_FLOOR"),
        ),
    ];
    for (name, manifest, staged, keys, floor, now, expected) in cases {
        let got = verify(
            manifest.as_deref().map(str::as_bytes),
            staged.candidate(),
            keys,
            floor,
            at(now),
        );
        match (expected, got) {
            (Ok(new_floor), Ok(v)) => {
                assert_eq!(v.new_floor, new_floor, "{name}: new floor");
                assert_eq!(v.counter, 7, "{name}");
                assert_eq!(v.key, owner.public().id(), "{name}");
            }
            (Err(code), Err(e)) => {
                assert_eq!(e.code(), code, "{name}: refused for the wrong reason: {e}");
                assert!(!e.to_string().is_empty());
            }
            (expected, got) => panic!("{name}: expected {expected:?}, got {got:?}"),
        }
    }
}

#[test]
fn error_messages_say_what_differs() {
    let owner = SecretKey::generate().unwrap();
    let art = artifact();
    let good = sign(&body("web", "1.4.2", &art), &owner).unwrap();
    let api = Staged::of("api", "1.4.2", &art);
    let e = verify(
        Some(good.as_bytes()),
        api.candidate(),
        &[owner.public()],
        0,
        at(NOW),
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "the manifest is for service web, not api");
    let e = verify(None, api.candidate(), &[owner.public()], 0, at(NOW)).unwrap_err();
    assert!(matches!(e, VerifyError::Unsigned { .. }));
    assert!(
        e.to_string().contains("release 1.4.2 of api is unsigned"),
        "{e}"
    );
}

/// Every single-byte change, deletion and insertion anywhere in a valid manifest is refused.
#[test]
fn every_mutation_of_a_valid_manifest_is_refused() {
    let owner = SecretKey::generate().unwrap();
    let art = artifact();
    let good = sign(&body("web", "1.4.2", &art), &owner)
        .unwrap()
        .into_bytes();
    let staged = Staged::of("web", "1.4.2", &art);
    let trusted = [owner.public()];
    assert!(verify(Some(&good), staged.candidate(), &trusted, 0, at(NOW)).is_ok());
    let mut tried = 0;
    for i in 0..good.len() {
        let mut variants = Vec::new();
        for flip in [0x01u8, 0x02, 0x20, 0x80] {
            let mut m = good.clone();
            m[i] ^= flip;
            variants.push(m);
        }
        let mut deleted = good.clone();
        deleted.remove(i);
        variants.push(deleted);
        for extra in [b'0', b' ', b'\n'] {
            let mut inserted = good.clone();
            inserted.insert(i, extra);
            variants.push(inserted);
        }
        for m in variants {
            tried += 1;
            let result = verify(Some(&m), staged.candidate(), &trusted, 0, at(NOW));
            assert!(
                result.is_err(),
                "mutation at byte {i} accepted: {:?}",
                String::from_utf8_lossy(&m)
            );
        }
    }
    assert!(tried > 2000, "{tried} mutations tried");
}

#[test]
fn only_the_canonical_spelling_parses() {
    let owner = SecretKey::generate().unwrap();
    let art = artifact();
    let b = body("web", "1.4.2", &art);
    let good = sign(&b, &owner).unwrap();
    let parsed = parse(good.as_bytes()).unwrap();
    assert_eq!(parsed.body, b, "round trip");
    assert_eq!(parsed.key, owner.public().id());

    let no_optional = {
        let mut b = b.clone();
        b.expires = None;
        b.floor = None;
        sign(&b, &owner).unwrap()
    };
    assert!(!no_optional.contains("expires") && !no_optional.contains("floor"));
    assert_eq!(parse(no_optional.as_bytes()).unwrap().body.floor, None);

    let hex = b.sha256.to_hex();
    for (what, bad) in [
        ("leading zero", good.replace("size: 4096", "size: 04096")),
        ("uppercase hex", good.replace(&hex, &hex.to_uppercase())),
        ("crlf", good.replace('\n', "\r\n")),
        (
            "trailing space",
            good.replace("counter: 7\n", "counter: 7 \n"),
        ),
        (
            "fields reordered",
            good.replace(
                "service: web\nrelease: 1.4.2\n",
                "release: 1.4.2\nservice: web\n",
            ),
        ),
        ("extra line", format!("{good}comment: hi\n")),
        ("no final newline", good.trim_end().to_string()),
        (
            "fractional expiry",
            good.replace(
                "expires: 2027-01-15T09:00:00Z",
                "expires: 2027-01-15T09:00:00.5Z",
            ),
        ),
        (
            "wrong header",
            good.replace("serin-release-manifest-v1", "serin-release-manifest-v2"),
        ),
        ("floor above counter", good.replace("floor: 5", "floor: 8")),
        (
            "counter too large",
            good.replace("counter: 7", "counter: 18446744073709551615"),
        ),
        (
            "path in release",
            good.replace("release: 1.4.2", "release: ../../x"),
        ),
    ] {
        assert!(
            parse(bad.as_bytes()).is_err(),
            "{what} must not parse: {bad}"
        );
    }
    // The expiry used above is the one this body carries.
    assert!(good.contains("expires: 2027-01-15T09:00:00Z"), "{good}");
}

#[test]
fn signing_refuses_a_body_it_could_not_verify_later() {
    let owner = SecretKey::generate().unwrap();
    let mut b = body("web", "1", &artifact());
    b.floor = Some(8);
    let e = sign(&b, &owner).unwrap_err();
    assert!(e.to_string().contains("floor"), "{e}");
    b.floor = None;
    b.counter = u64::MAX;
    assert!(sign(&b, &owner).is_err());
    b.counter = 1;
    b.expires = Some(at(NOW) + Duration::from_millis(1));
    assert!(
        sign(&b, &owner)
            .unwrap_err()
            .to_string()
            .contains("whole seconds")
    );
}

#[test]
fn key_files_round_trip_and_bad_keys_are_refused() {
    let key = SecretKey::generate().unwrap();
    let text = key.to_file_text("ops 2026");
    let back = SecretKey::parse(&text).unwrap();
    assert_eq!(back.public(), key.public());
    let line = key.public().to_line("ops 2026");
    assert!(
        line.starts_with("serin-ed25519 ") && line.ends_with(" ops 2026"),
        "{line}"
    );
    let public = PublicKey::parse(&line).unwrap();
    assert_eq!(public, key.public());
    assert_eq!(public.id().to_string().len(), 16);
    assert!(
        !format!("{key:?}").contains(&text[21..40]),
        "Debug never shows the secret"
    );

    for bad in [
        "",
        "ssh-ed25519 AAAA",
        "serin-ed25519 abcd",
        &format!("serin-ed25519 {}", "g".repeat(64)),
        // The identity point: a small-order (weak) key.
        &format!("serin-ed25519 01{}", "0".repeat(62)),
    ] {
        assert!(PublicKey::parse(bad).is_err(), "{bad:?} must be refused");
    }
    assert!(
        SecretKey::parse(&line).is_err(),
        "a public key is not a secret key"
    );
}

#[test]
fn pinned_keys_name_the_bad_entry() {
    let a = SecretKey::generate().unwrap().public();
    let b = SecretKey::generate().unwrap().public();
    let keys = parse_pinned_keys(
        "services.web.trusted_keys",
        &[a.to_line("a"), b.to_line("")],
    )
    .unwrap();
    assert_eq!(keys, vec![a.clone(), b]);
    let e = parse_pinned_keys(
        "trusted_keys",
        &[a.to_line(""), "serin-ed25519 zz".to_string()],
    )
    .unwrap_err();
    assert!(e.starts_with("trusted_keys[1]: malformed key"), "{e}");
    let e = parse_pinned_keys("trusted_keys", &[a.to_line("x"), a.to_line("y")]).unwrap_err();
    assert!(e.contains("listed twice"), "{e}");
}
