//! What the rollout engine persists: a versioned header, compact per-host records and events.
//!
//! Records are binary (version 2, [`RECORD_VERSION`]): two magic bytes ([`MAGIC`]), the version
//! as a postcard varint, then the record's fields in postcard's positional encoding (serde; no
//! field names, varint integers). Version 1 records were JSON with a `version` field; they are
//! still read (a JSON record starts with `{`, never with the magic), and the manager rewrites a
//! rollout's version-1 records in the current encoding when it opens the store. A record with a
//! version this coordinator does not know is refused with [`RecordError::TooNew`] rather than
//! misread. The store treats them as opaque bytes.
//!
//! Postcard is positional: adding, removing or reordering a field of a stored type changes the
//! encoding. Such a change bumps [`RECORD_VERSION`] and decodes the older version explicitly here;
//! the test `binary_records_are_pinned` fails on any change of the encoding so that it is not
//! missed. (Appending a variant to a stored enum is compatible.)
//!
//! The header holds the rollout-wide intent without the waves' host lists: a wave's hosts are the
//! host records whose `wave` is its index, in `ordinal` order (ordinals are handed out in
//! dispatch order, and a host that joins later takes the next one), so [`decode_rollout`]
//! rebuilds the lists from the host records. A save of a large wave then writes a small header
//! and the changed host records only, not every host id again.
//!
//! Only intent is stored (STYLE rule 3): the spec, each wave's state and timers, each host's
//! cohort, baseline, phase, failure and the last order it was given (id and sequence, so the very
//! same order can be re-sent after a restart), and every decision with its evidence. What hosts
//! actually run, whether they are connected and their health samples are observed again from the
//! fleet after a restart.

use serde::{Deserialize, Serialize};

use serin_proto::HostId;

use super::intent::{Decision, HostEntry, RolloutState, Wave, WaveState};
use crate::store::ReleaseRecord;

/// Version of the records written by this coordinator (binary, see the module docs).
pub const RECORD_VERSION: u32 = 2;

/// The version of JSON records (the first encoding), still read.
pub const JSON_VERSION: u32 = 1;

/// First bytes of a binary record. A JSON record starts with `{`.
pub const MAGIC: [u8; 2] = [0xB5, 0x52];

/// A stored record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("rollout record {what} is not valid JSON: {error}")]
    Json { what: String, error: String },
    #[error("rollout record {what} (binary, version {version}) cannot be decoded: {error}")]
    Binary {
        what: String,
        version: u32,
        error: String,
    },
    #[error(
        "rollout record {what} is neither a binary record (magic {magic:02x?}) nor a JSON one (first byte {first:#04x})"
    )]
    Unknown {
        what: String,
        magic: [u8; 2],
        first: u8,
    },
    #[error(
        "rollout record {what} has version {found}, newer than this coordinator supports ({supported})"
    )]
    TooNew {
        what: String,
        found: u32,
        supported: u32,
    },
    #[error("rollout record {what} is inconsistent: {problem}")]
    Invalid { what: String, problem: String },
}

/// The spec as stored: the raw fields, with every default spelled out.
pub use super::spec::RawSpec as SpecRecord;

/// The release of a stored record, validated.
pub fn release_of(
    rec: &ReleaseRecord,
) -> Result<serin_proto::Release, serin_proto::ValidationError> {
    use serin_proto::{ArtifactSource, Release, ReleaseId, ServiceName, Sha256};
    let url = rec.url.trim();
    Ok(Release {
        service: ServiceName::new(&rec.service).map_err(|e| e.within("release"))?,
        id: ReleaseId::new(&rec.id).map_err(|e| e.within("release"))?,
        sha256: Sha256::from_hex("release.sha256", &rec.sha256)?,
        size: rec.size,
        source: if url.is_empty() {
            ArtifactSource::Coordinator
        } else {
            ArtifactSource::Url(url.to_string())
        },
        manifest: (!rec.manifest.is_empty()).then(|| rec.manifest.clone()),
    })
}

/// The rollout-wide record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeaderRecord {
    pub version: u32,
    pub id: String,
    pub spec: SpecRecord,
    pub release: ReleaseRecord,
    pub state: RolloutState,
    pub reason: String,
    pub current_wave: u32,
    pub waves: Vec<Wave>,
    pub decisions: Vec<Decision>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The rollout paused because a gate failed (not because an operator asked).
    pub paused_by_failure: bool,
    /// Paused because the store refused a save (resumes by itself once a save succeeds).
    #[serde(default)]
    pub paused_by_store: bool,
    /// Paused by the request gate ("insufficient data"): an operator may promote the wave.
    #[serde(default)]
    pub paused_for_data: bool,
    /// The state a rollback in progress ends in (rolled_back or aborted).
    pub rollback_final: Option<RolloutState>,
}

/// One host's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub version: u32,
    #[serde(flatten)]
    pub host: HostEntry,
}

/// One line of the rollout's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub version: u32,
    pub at_ms: u64,
    pub text: String,
}

impl EventRecord {
    /// `"<rfc3339> <text>"`, as `serin rollout explain` prints it.
    pub fn display(&self) -> String {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.at_ms);
        format!("{} {}", humantime::format_rfc3339_millis(t), self.text)
    }
}

/// How a stored record is encoded, read from its first bytes.
enum Encoded<'a> {
    /// Version 1: JSON with a `version` field.
    Json(&'a [u8]),
    /// Version 2 and later: the body after the magic and the version.
    Binary { version: u32, body: &'a [u8] },
}

fn too_new(what: &str, found: u32) -> RecordError {
    RecordError::TooNew {
        what: what.to_string(),
        found,
        supported: RECORD_VERSION,
    }
}

fn encoding_of<'a>(what: &str, bytes: &'a [u8]) -> Result<Encoded<'a>, RecordError> {
    if let Some(rest) = bytes.strip_prefix(&MAGIC) {
        let (version, body) =
            postcard::take_from_bytes::<u32>(rest).map_err(|e| RecordError::Binary {
                what: what.to_string(),
                version: 0,
                error: format!("no version after the magic: {e}"),
            })?;
        if version > RECORD_VERSION {
            return Err(too_new(what, version));
        }
        if version <= JSON_VERSION {
            return Err(RecordError::Invalid {
                what: what.to_string(),
                problem: format!("binary record with version {version}, which was never binary"),
            });
        }
        return Ok(Encoded::Binary { version, body });
    }
    if bytes.first() == Some(&b'{') {
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned = serde_json::from_slice(bytes).map_err(|e| RecordError::Json {
            what: what.to_string(),
            error: e.to_string(),
        })?;
        if v.version > RECORD_VERSION {
            return Err(too_new(what, v.version));
        }
        if v.version != JSON_VERSION {
            return Err(RecordError::Invalid {
                what: what.to_string(),
                problem: format!(
                    "JSON record with version {}, which was never JSON",
                    v.version
                ),
            });
        }
        return Ok(Encoded::Json(bytes));
    }
    Err(RecordError::Unknown {
        what: what.to_string(),
        magic: MAGIC,
        first: bytes.first().copied().unwrap_or(0),
    })
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, RecordError> {
    serde_json::from_slice(bytes).map_err(|e| RecordError::Json {
        what: what.to_string(),
        error: e.to_string(),
    })
}

fn from_binary<T: serde::de::DeserializeOwned>(
    what: &str,
    version: u32,
    body: &[u8],
) -> Result<T, RecordError> {
    let binary = |error: String| RecordError::Binary {
        what: what.to_string(),
        version,
        error,
    };
    let (v, rest) = postcard::take_from_bytes(body).map_err(|e| binary(e.to_string()))?;
    if !rest.is_empty() {
        return Err(binary(format!("{} bytes left over", rest.len())));
    }
    Ok(v)
}

fn to_binary<T: Serialize>(body: &T) -> Vec<u8> {
    // Room for a typical host record with its order, so encoding one does not grow the buffer
    // three or four times over.
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    // Plain serde structs into a growing buffer: postcard's only errors are a full fixed
    // buffer and types serde cannot describe, neither of which can happen here.
    out = postcard::to_extend(&RECORD_VERSION, out).unwrap_or_default();
    postcard::to_extend(body, out).unwrap_or_default()
}

/// A record the engine stores.
pub trait Record {
    /// The record in the current encoding.
    fn encode(&self) -> Vec<u8>;
}

/// Encodes a record in the current (binary) encoding.
pub fn encode<R: Record>(record: &R) -> Vec<u8> {
    record.encode()
}

/// Encodes a host's record straight from the machine's entry: the bytes of
/// `encode(&HostRecord { version: RECORD_VERSION, host: h.clone() })` without the copy (the
/// driver encodes every changed host of a save; 19,900 of them for a broadcast).
pub fn encode_host(h: &HostEntry) -> Vec<u8> {
    to_binary(h)
}

/// The release as stored in a binary header: every field, none skipped (postcard is
/// positional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ReleaseV2 {
    service: String,
    id: String,
    sha256: String,
    size: u64,
    url: String,
    created_unix_ms: u64,
    manifest: String,
}

/// A wave as stored in a binary header: everything but its host list (rebuilt from the host
/// records, see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WaveV2 {
    index: u32,
    size_expr: String,
    state: WaveState,
    started_ms: Option<u64>,
    deadline_base_ms: Option<u64>,
    bake_ends_ms: Option<u64>,
    promote_by: Option<String>,
    accept_unreachable: bool,
}

/// The header's fields in a binary record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct HeaderV2 {
    id: String,
    spec: SpecRecord,
    release: ReleaseV2,
    state: RolloutState,
    reason: String,
    current_wave: u32,
    waves: Vec<WaveV2>,
    decisions: Vec<Decision>,
    created_ms: u64,
    updated_ms: u64,
    paused_by_failure: bool,
    paused_by_store: bool,
    paused_for_data: bool,
    rollback_final: Option<RolloutState>,
}

/// An event's fields in a binary record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct EventV2 {
    at_ms: u64,
    text: String,
}

impl Record for HeaderRecord {
    fn encode(&self) -> Vec<u8> {
        let r = &self.release;
        to_binary(&HeaderV2 {
            id: self.id.clone(),
            spec: self.spec.clone(),
            release: ReleaseV2 {
                service: r.service.clone(),
                id: r.id.clone(),
                sha256: r.sha256.clone(),
                size: r.size,
                url: r.url.clone(),
                created_unix_ms: r.created_unix_ms,
                manifest: r.manifest.clone(),
            },
            state: self.state,
            reason: self.reason.clone(),
            current_wave: self.current_wave,
            waves: self
                .waves
                .iter()
                .map(|w| WaveV2 {
                    index: w.index,
                    size_expr: w.size_expr.clone(),
                    state: w.state,
                    started_ms: w.started_ms,
                    deadline_base_ms: w.deadline_base_ms,
                    bake_ends_ms: w.bake_ends_ms,
                    promote_by: w.promote_by.clone(),
                    accept_unreachable: w.accept_unreachable,
                })
                .collect(),
            decisions: self.decisions.clone(),
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            paused_by_failure: self.paused_by_failure,
            paused_by_store: self.paused_by_store,
            paused_for_data: self.paused_for_data,
            rollback_final: self.rollback_final,
        })
    }
}

impl From<HeaderV2> for HeaderRecord {
    fn from(h: HeaderV2) -> Self {
        let r = h.release;
        HeaderRecord {
            version: RECORD_VERSION,
            id: h.id,
            spec: h.spec,
            release: ReleaseRecord {
                service: r.service,
                id: r.id,
                sha256: r.sha256,
                size: r.size,
                url: r.url,
                created_unix_ms: r.created_unix_ms,
                manifest: r.manifest,
            },
            state: h.state,
            reason: h.reason,
            current_wave: h.current_wave,
            waves: h
                .waves
                .into_iter()
                .map(|w| Wave {
                    index: w.index,
                    size_expr: w.size_expr,
                    hosts: Vec::new(),
                    state: w.state,
                    started_ms: w.started_ms,
                    deadline_base_ms: w.deadline_base_ms,
                    bake_ends_ms: w.bake_ends_ms,
                    promote_by: w.promote_by,
                    accept_unreachable: w.accept_unreachable,
                })
                .collect(),
            decisions: h.decisions,
            created_ms: h.created_ms,
            updated_ms: h.updated_ms,
            paused_by_failure: h.paused_by_failure,
            paused_by_store: h.paused_by_store,
            paused_for_data: h.paused_for_data,
            rollback_final: h.rollback_final,
        }
    }
}

impl Record for HostRecord {
    fn encode(&self) -> Vec<u8> {
        to_binary(&self.host)
    }
}

impl Record for EventRecord {
    fn encode(&self) -> Vec<u8> {
        to_binary(&EventV2 {
            at_ms: self.at_ms,
            text: self.text.clone(),
        })
    }
}

/// Decodes a header record. The waves' host lists of a binary header are empty: read a whole
/// rollout with [`decode_rollout`], which rebuilds them from the host records.
pub fn decode_header(rollout: &str, bytes: &[u8]) -> Result<HeaderRecord, RecordError> {
    let what = format!("{rollout}/header");
    match encoding_of(&what, bytes)? {
        Encoded::Json(b) => from_json(&what, b),
        Encoded::Binary { version, body } => {
            Ok(from_binary::<HeaderV2>(&what, version, body)?.into())
        }
    }
}

/// Decodes a host record.
pub fn decode_host(rollout: &str, host: &str, bytes: &[u8]) -> Result<HostRecord, RecordError> {
    let what = format!("{rollout}/host/{host}");
    match encoding_of(&what, bytes)? {
        Encoded::Json(b) => from_json(&what, b),
        Encoded::Binary { version, body } => Ok(HostRecord {
            version,
            host: from_binary(&what, version, body)?,
        }),
    }
}

/// Decodes an event record.
pub fn decode_event(rollout: &str, bytes: &[u8]) -> Result<EventRecord, RecordError> {
    let what = format!("{rollout}/event");
    match encoding_of(&what, bytes)? {
        Encoded::Json(b) => from_json(&what, b),
        Encoded::Binary { version, body } => {
            let e: EventV2 = from_binary(&what, version, body)?;
            Ok(EventRecord {
                version,
                at_ms: e.at_ms,
                text: e.text,
            })
        }
    }
}

/// A rollout's records, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedRollout {
    /// The header, its waves' host lists filled in.
    pub header: HeaderRecord,
    /// Every host record, in host id order.
    pub hosts: Vec<HostRecord>,
    /// Some record was in an older encoding: saving the header and every host record again
    /// migrates the rollout to the current one.
    pub outdated: bool,
}

/// Decodes a rollout's header and host records, and rebuilds the waves' host lists of a binary
/// header from the host records (by `wave`, in `ordinal` order). A version-1 header lists its
/// waves' hosts itself and is taken as it is.
pub fn decode_rollout(
    rollout: &str,
    header: &[u8],
    hosts: &[(HostId, Vec<u8>)],
) -> Result<DecodedRollout, RecordError> {
    let mut h = decode_header(rollout, header)?;
    let mut outdated = h.version < RECORD_VERSION;
    let mut records = Vec::with_capacity(hosts.len());
    for (id, b) in hosts {
        let r = decode_host(rollout, id.as_str(), b)?;
        if r.host.id != *id {
            return Err(RecordError::Invalid {
                what: format!("{rollout}/host/{id}"),
                problem: format!("the record is of host {}", r.host.id),
            });
        }
        outdated |= r.version < RECORD_VERSION;
        records.push(r);
    }
    if h.version >= RECORD_VERSION {
        let mut order: Vec<(u32, u32, &HostId)> = records
            .iter()
            .map(|r| (r.host.wave, r.host.ordinal, &r.host.id))
            .collect();
        order.sort_unstable();
        for (wave, _, id) in order {
            let w = h
                .waves
                .get_mut(wave as usize)
                .ok_or_else(|| RecordError::Invalid {
                    what: format!("{rollout}/host/{id}"),
                    problem: format!("wave {wave} does not exist"),
                })?;
            w.hosts.push(id.clone());
        }
    }
    h.version = RECORD_VERSION;
    for r in &mut records {
        r.version = RECORD_VERSION;
    }
    Ok(DecodedRollout {
        header: h,
        hosts: records,
        outdated,
    })
}

/// Serde adapters for the validated identifier types (stored as strings, validated on load).
pub(crate) mod ids {
    use serde::{Deserialize, Deserializer, Serializer};
    use serin_proto::{HostId, ReleaseId};

    /// One [`HostId`].
    pub mod host {
        use super::*;

        pub fn serialize<S: Serializer>(v: &HostId, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(v.as_str())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HostId, D::Error> {
            HostId::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
        }
    }

    /// A list of [`HostId`]s.
    pub mod hosts {
        use super::*;

        pub fn serialize<S: Serializer>(v: &[HostId], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(HostId::as_str))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<HostId>, D::Error> {
            Vec::<String>::deserialize(d)?
                .into_iter()
                .map(|h| HostId::new(h).map_err(serde::de::Error::custom))
                .collect()
        }
    }

    /// An optional [`ReleaseId`].
    pub mod release_opt {
        use super::*;

        pub fn serialize<S: Serializer>(v: &Option<ReleaseId>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(r) => s.serialize_some(r.as_str()),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ReleaseId>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|r| ReleaseId::new(r).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::rollout::intent::{DecisionKind, HostOrder, HostPhase, OrderKind};
    use crate::rollout::testing::{raw_spec, release_record};

    fn hid(s: &str) -> HostId {
        HostId::new(s).unwrap()
    }

    fn wave(index: u32, hosts: &[&str]) -> Wave {
        Wave {
            index,
            size_expr: "10%".into(),
            hosts: hosts.iter().map(|h| hid(h)).collect(),
            state: WaveState::Pending,
            started_ms: None,
            deadline_base_ms: None,
            bake_ends_ms: None,
            promote_by: None,
            accept_unreachable: false,
        }
    }

    fn header(version: u32, waves: Vec<Wave>) -> HeaderRecord {
        let mut release = release_record();
        release.manifest = "signed manifest".into();
        HeaderRecord {
            version,
            id: "r-1".into(),
            spec: raw_spec(&["1", "100%"]),
            release,
            state: RolloutState::Running,
            reason: String::new(),
            current_wave: 1,
            waves,
            decisions: vec![Decision {
                at_ms: 1_700_000_000_500,
                wave: 0,
                kind: DecisionKind::Promote,
                reason: "gate passed".into(),
                evidence: BTreeMap::from([("healthy".into(), "1/1".into())]),
                actor: "engine".into(),
            }],
            created_ms: 1_700_000_000_000,
            updated_ms: 1_700_000_000_900,
            paused_by_failure: false,
            paused_by_store: false,
            paused_for_data: false,
            rollback_final: None,
        }
    }

    fn host(version: u32, id: &str, ordinal: u32, wave: u32) -> HostRecord {
        HostRecord {
            version,
            host: HostEntry {
                id: hid(id),
                ordinal,
                hostname: format!("{id}.example"),
                labels: BTreeMap::from([("role".into(), "web".into())]),
                domain: Some("eu-1".into()),
                wave,
                baseline: Some("web-1".parse().unwrap()),
                phase: HostPhase::Dispatched,
                failure: None,
                waived: false,
                rollback_failed: None,
                left_without_baseline: false,
                detail: String::new(),
                order: Some(HostOrder {
                    order_id: format!("r-1-{ordinal}-1"),
                    kind: OrderKind::Activate,
                    seq: Some(7),
                    to: None,
                    done: false,
                    sent_ms: Some(1_700_000_000_100),
                }),
                activate_order: Some(format!("r-1-{ordinal}-1")),
                orders_issued: 1,
                attempts: 0,
                retry_at_ms: None,
                rollback_at_ms: None,
                last_seq: 6,
                dispatched_ms: Some(1_700_000_000_100),
                activated_ms: None,
                healthy_ms: None,
                joined: false,
                stage_warning: None,
            },
        }
    }

    fn stored(
        hosts: &[HostRecord],
        encode: impl Fn(&HostRecord) -> Vec<u8>,
    ) -> Vec<(HostId, Vec<u8>)> {
        hosts
            .iter()
            .map(|h| (h.host.id.clone(), encode(h)))
            .collect()
    }

    /// Postcard is positional: any change to a stored type's fields changes these bytes. If this
    /// fails, bump `RECORD_VERSION` and decode the older version explicitly (module docs); do
    /// not just update the bytes.
    #[test]
    fn binary_records_are_pinned() {
        let hex = |b: Vec<u8>| hex::encode(b);
        let h = hex(encode(&header(
            RECORD_VERSION,
            vec![wave(0, &["h1"]), wave(1, &["h2"])],
        )));
        let host = hex(encode(&host(RECORD_VERSION, "h1", 1, 0)));
        let event = hex(encode(&EventRecord {
            version: RECORD_VERSION,
            at_ms: 1_700_000_000_000,
            text: "rollout created".into(),
        }));
        assert_eq!(
            (h.as_str(), host.as_str(), event.as_str()),
            (
                concat!(
                    "b5520203722d3103776562057765622d3208726f6c653d7765620201310431303025904e00e807a0",
                    "9c01e0d403000000000000000000000003776562057765622d324061626162616261626162616261",
                    "62616261626162616261626162616261626162616261626162616261626162616261626162616261",
                    "62616261626162616261626400010f7369676e6564206d616e696665737400000102000331302500",
                    "0000000000010331302500000000000001f4d395ffbc3100000b6761746520706173736564010768",
                    "65616c74687903312f3106656e67696e6580d095ffbc3184d795ffbc3100000000",
                ),
                "b55202026831010a68312e6578616d706c650104726f6c6503776562010465752d310001057765622d310100000000000107722d312d312d31000107000001e4d095ffbc310107722d312d312d31010000000601e4d095ffbc3100000000",
                "b5520280d095ffbc310f726f6c6c6f75742063726561746564",
            )
        );
    }

    /// The driver encodes host records from the machine's entries: the same bytes, and a save
    /// header (waves without host lists) encodes as the whole header does.
    #[test]
    fn a_host_encoded_from_its_entry_and_a_save_header_are_the_stored_bytes() {
        let h = host(RECORD_VERSION, "h1", 1, 0);
        assert_eq!(encode_host(&h.host), encode(&h));
        let full = header(RECORD_VERSION, vec![wave(0, &["h1"]), wave(1, &["h2"])]);
        let mut save = full.clone();
        for w in &mut save.waves {
            w.hosts.clear();
        }
        assert_eq!(encode(&save), encode(&full));
    }

    #[test]
    fn records_round_trip_and_wave_lists_are_rebuilt_from_the_hosts() {
        // Wave 1's list is in dispatch (ordinal) order, which is not host id order, and h0
        // joined later (a higher ordinal) into the last wave.
        let mut joined = host(RECORD_VERSION, "h0", 9, 1);
        joined.host.joined = true;
        let hosts = vec![
            joined,
            host(RECORD_VERSION, "h1", 1, 0),
            host(RECORD_VERSION, "h2", 3, 1),
            host(RECORD_VERSION, "h3", 2, 1),
        ];
        let h = header(
            RECORD_VERSION,
            vec![wave(0, &["h1"]), wave(1, &["h3", "h2", "h0"])],
        );
        let d = decode_rollout("r-1", &encode(&h), &stored(&hosts, encode)).unwrap();
        assert_eq!(d.header, h);
        assert_eq!(d.hosts, hosts);
        assert!(!d.outdated);
        // The header does not carry the host ids.
        let with_many = header(
            RECORD_VERSION,
            vec![wave(0, &["h1"]), wave(1, &["h-with-a-long-name"; 100])],
        );
        assert_eq!(encode(&with_many).len(), encode(&h).len());
    }

    #[test]
    fn version_1_json_records_are_read_and_marked_outdated() {
        // As the JSON coordinator wrote them: the waves list their hosts in the header.
        let hosts = vec![host(1, "h1", 1, 0), host(1, "h2", 2, 1)];
        let h = header(1, vec![wave(0, &["h1"]), wave(1, &["h2"])]);
        let json_hosts = stored(&hosts, |r| serde_json::to_vec(r).unwrap());
        let d = decode_rollout("r-1", &serde_json::to_vec(&h).unwrap(), &json_hosts).unwrap();
        assert!(d.outdated, "JSON records are migrated");
        assert_eq!(d.header.waves, h.waves);
        assert_eq!(d.header.version, RECORD_VERSION);
        assert_eq!(d.hosts[1].host, hosts[1].host);
        // Re-encoded, they read back the same: nothing is lost by the migration.
        let again = decode_rollout("r-1", &encode(&d.header), &stored(&d.hosts, encode)).unwrap();
        assert!(!again.outdated);
        assert_eq!(again.header, d.header);
        assert_eq!(again.hosts, d.hosts);
        // A rollout half migrated (a binary host next to JSON ones) reads too.
        let mixed = vec![json_hosts[0].clone(), (hid("h2"), encode(&d.hosts[1]))];
        let m = decode_rollout("r-1", &serde_json::to_vec(&h).unwrap(), &mixed).unwrap();
        assert_eq!(m.hosts, d.hosts);
        // A JSON event.
        let e = EventRecord {
            version: 1,
            at_ms: 5,
            text: "x".into(),
        };
        assert_eq!(
            decode_event("r-1", &serde_json::to_vec(&e).unwrap())
                .unwrap()
                .text,
            "x"
        );
    }

    #[test]
    fn binary_records_are_smaller_than_json() {
        let h = host(RECORD_VERSION, "host-00042", 42, 3);
        let json = serde_json::to_vec(&h).unwrap().len();
        let binary = encode(&h).len();
        assert!(binary * 3 < json, "binary {binary} bytes, JSON {json}");
    }

    #[test]
    fn unreadable_records_are_refused_with_what_is_wrong() {
        let e = decode_host("r-1", "h1", b"\x00garbage").unwrap_err();
        assert!(
            e.to_string()
                .contains("r-1/host/h1 is neither a binary record"),
            "{e}"
        );
        let mut b = encode(&host(RECORD_VERSION, "h1", 1, 0));
        b.truncate(b.len() / 2);
        let e = decode_host("r-1", "h1", &b).unwrap_err();
        assert!(
            e.to_string()
                .contains("r-1/host/h1 (binary, version 2) cannot be decoded"),
            "{e}"
        );
        let mut future = encode(&host(RECORD_VERSION, "h1", 1, 0));
        future[2] = 3;
        let e = decode_host("r-1", "h1", &future).unwrap_err();
        assert!(
            e.to_string()
                .contains("has version 3, newer than this coordinator supports (2)"),
            "{e}"
        );
        // A host record filed under another host's key.
        let h = header(RECORD_VERSION, vec![wave(0, &["h1"])]);
        let wrong = vec![(hid("h9"), encode(&host(RECORD_VERSION, "h1", 1, 0)))];
        let e = decode_rollout("r-1", &encode(&h), &wrong).unwrap_err();
        assert!(e.to_string().contains("the record is of host h1"), "{e}");
        // A host in a wave the header does not have.
        let lost = vec![(hid("h1"), encode(&host(RECORD_VERSION, "h1", 1, 4)))];
        let e = decode_rollout("r-1", &encode(&h), &lost).unwrap_err();
        assert!(e.to_string().contains("wave 4 does not exist"), "{e}");
    }
}
