//! Validated domain types, converted from the wire types on receipt.
//!
//! Every identifier that ends up in a file path (service names, release ids) is restricted to a
//! strict character set with a bounded length, so a hostile message cannot escape the agent's
//! state directory.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::wire;

/// A message field that failed validation; the message names the field and says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {problem}")]
pub struct ValidationError {
    /// Dotted path of the offending field, e.g. `order.activate.release.sha256`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ValidationError {
    /// A validation error for `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The same error, with `prefix.` put before the field path.
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

impl From<ValidationError> for tonic::Status {
    fn from(e: ValidationError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Checks `value` against a first-character class, a rest class and a maximum length.
fn check_ident(
    field: &str,
    value: &str,
    max_len: usize,
    first_ok: impl Fn(char) -> bool,
    rest_ok: impl Fn(char) -> bool,
    charset: &str,
) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > max_len {
        return Err(ValidationError::new(
            field,
            format!(
                "{:?} is {} bytes long, at most {max_len} allowed",
                truncated(value),
                value.len()
            ),
        ));
    }
    let mut chars = value.chars();
    let first = chars.next().unwrap_or_default();
    if !first_ok(first) || !chars.all(&rest_ok) {
        return Err(ValidationError::new(
            field,
            format!("{:?} must match {charset}", truncated(value)),
        ));
    }
    Ok(())
}

macro_rules! ident_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr, $first:expr, $rest:expr, $charset:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, ValidationError> {
                let value = value.into();
                check_ident($field, &value, $max, $first, $rest, $charset)?;
                Ok(Self(value))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The identifier as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

ident_type!(
    /// Name of a managed service, e.g. `web`; safe as a directory name and a systemd unit stem.
    ServiceName,
    "service",
    63,
    |c: char| c.is_ascii_lowercase() || c.is_ascii_digit(),
    |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'),
    "[a-z0-9][a-z0-9_.-]{0,62}"
);

ident_type!(
    /// Id of a release, e.g. `web-1.4.2`; safe as a directory name (never `.` or `..`).
    ReleaseId,
    "release id",
    128,
    |c: char| c.is_ascii_alphanumeric(),
    |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-'),
    "[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}"
);

ident_type!(
    /// Stable id of a host, e.g. its machine-id.
    HostId,
    "host id",
    128,
    |c: char| c.is_ascii_alphanumeric(),
    |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'),
    "[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
);

/// A sha256 digest, held as 64 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses 64 hex digits (upper or lower case).
    pub fn from_hex(field: &str, s: &str) -> Result<Self, ValidationError> {
        if s.len() != 64 {
            return Err(ValidationError::new(
                field,
                format!("sha256 must be 64 hex digits, got {} characters", s.len()),
            ));
        }
        let mut out = [0u8; 32];
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            let hi = hex_val(pair[0]);
            let lo = hex_val(pair[1]);
            match (hi, lo) {
                (Some(hi), Some(lo)) => out[i] = hi << 4 | lo,
                _ => {
                    return Err(ValidationError::new(
                        field,
                        format!("sha256 {s:?} has a character that is not a hex digit"),
                    ));
                }
            }
        }
        Ok(Self(out))
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(DIGITS[usize::from(b >> 4)] as char);
            s.push(DIGITS[usize::from(b & 0xf)] as char);
        }
        s
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Sha256 {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex("sha256", s)
    }
}

/// Where an agent downloads a release from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactSource {
    /// The coordinator's content-addressed store, by sha256.
    Coordinator,
    /// An `http://` or `https://` URL; the content must still match sha256 and size.
    Url(String),
}

/// An immutable version of a service's binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub service: ServiceName,
    pub id: ReleaseId,
    pub sha256: Sha256,
    pub size: u64,
    pub source: ArtifactSource,
    /// The signed manifest, verbatim (`None`: unsigned). Not parsed here: the agent verifies it
    /// with the keys it pins, and nothing in it is believed before that.
    pub manifest: Option<String>,
}

/// Largest artifact a release may declare: 64 GiB.
pub const MAX_ARTIFACT_SIZE: u64 = 64 << 30;

/// Longest manifest a release may carry (the manifest format's own limit).
pub const MAX_MANIFEST_BYTES: usize = 4096;

impl TryFrom<wire::Release> for Release {
    type Error = ValidationError;

    fn try_from(r: wire::Release) -> Result<Self, Self::Error> {
        let service = ServiceName::new(r.service).map_err(|e| e.within("release"))?;
        let id = ReleaseId::new(r.id).map_err(|e| e.within("release"))?;
        let sha256 = Sha256::from_hex("release.sha256", &r.sha256)?;
        if r.size == 0 {
            return Err(ValidationError::new(
                "release.size",
                "must be at least 1 byte",
            ));
        }
        if r.size > MAX_ARTIFACT_SIZE {
            return Err(ValidationError::new(
                "release.size",
                format!(
                    "{} bytes exceeds the limit of {MAX_ARTIFACT_SIZE} bytes",
                    r.size
                ),
            ));
        }
        let source = if r.url.is_empty() {
            ArtifactSource::Coordinator
        } else if (r.url.starts_with("http://") || r.url.starts_with("https://"))
            && r.url.len() <= 2048
            && !r.url.chars().any(char::is_whitespace)
        {
            ArtifactSource::Url(r.url)
        } else {
            return Err(ValidationError::new(
                "release.url",
                format!("{:?} is not an http:// or https:// URL", truncated(&r.url)),
            ));
        };
        if r.manifest.len() > MAX_MANIFEST_BYTES {
            return Err(ValidationError::new(
                "release.manifest",
                format!(
                    "is {} bytes long, at most {MAX_MANIFEST_BYTES} allowed",
                    r.manifest.len()
                ),
            ));
        }
        Ok(Self {
            service,
            id,
            sha256,
            size: r.size,
            source,
            manifest: (!r.manifest.is_empty()).then_some(r.manifest),
        })
    }
}

impl From<Release> for wire::Release {
    fn from(r: Release) -> Self {
        wire::Release {
            service: r.service.into_string(),
            id: r.id.into_string(),
            sha256: r.sha256.to_hex(),
            size: r.size,
            url: match r.source {
                ArtifactSource::Coordinator => String::new(),
                ArtifactSource::Url(u) => u,
            },
            manifest: r.manifest.unwrap_or_default(),
        }
    }
}

/// Longest excerpt of a received value that an error message echoes back.
pub const MAX_ECHOED_BYTES: usize = 64;

/// `value` cut to at most [`MAX_ECHOED_BYTES`] (on a character boundary), with `…` when cut, so
/// an error about a hostile value never carries the value back in full.
pub fn truncated(value: &str) -> String {
    if value.len() <= MAX_ECHOED_BYTES {
        return value.to_owned();
    }
    let mut end = MAX_ECHOED_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end])
}

/// What an order asks the agent to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderAction {
    /// Download and verify a release without activating it.
    Stage { release: Release },
    /// Swap a release in (staging it first if needed) and arm the dead-man switch.
    Activate {
        release: Release,
        /// The release must pass its checks within this time.
        healthy_deadline: Duration,
        /// It must stay healthy this long before the agent reports it healthy.
        min_healthy: Duration,
        /// A confirm must arrive within this time; `None`: confirmed once healthy.
        confirm_deadline: Option<Duration>,
        /// The load-balancer weight for the release once healthy, in percent (0..=100) of the
        /// server's configured weight; `None`: unchanged.
        traffic_weight: Option<u8>,
    },
    /// Restore an earlier release still on disk; `None`: the previous one.
    Rollback { to: Option<ReleaseId> },
    /// Accept the activated release.
    Confirm {
        release: ReleaseId,
        /// The load-balancer weight from now on, in percent (0..=100) of the server's
        /// configured weight (a weighted canary going to full weight); `None`: unchanged.
        traffic_weight: Option<u8>,
    },
    /// Stop a stage in progress.
    Cancel,
}

impl OrderAction {
    /// Short lowercase name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            OrderAction::Stage { .. } => "stage",
            OrderAction::Activate { .. } => "activate",
            OrderAction::Rollback { .. } => "rollback",
            OrderAction::Confirm { .. } => "confirm",
            OrderAction::Cancel => "cancel",
        }
    }
}

/// A validated order for one service on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub order_id: String,
    pub rollout_id: String,
    /// Monotonic per host and service.
    pub seq: u64,
    /// The coordinator's epoch (0: a coordinator without epochs); with `seq`, ordered as a pair.
    pub epoch: u64,
    pub service: ServiceName,
    pub action: OrderAction,
}

/// Highest order sequence the wire may carry (2^53). Far beyond any real count of orders, and far
/// enough from `u64::MAX` that a counter moved past a reported value can never overflow.
pub const MAX_ORDER_SEQ: u64 = 1 << 53;

/// Longest healthy or confirm deadline an order may carry: one day.
pub const MAX_ORDER_DEADLINE: Duration = Duration::from_secs(24 * 3600);

fn deadline(field: &str, ms: u64) -> Result<Duration, ValidationError> {
    let d = Duration::from_millis(ms);
    if d > MAX_ORDER_DEADLINE {
        return Err(ValidationError::new(
            field,
            format!(
                "{ms} ms exceeds the limit of {} ms",
                MAX_ORDER_DEADLINE.as_millis()
            ),
        ));
    }
    Ok(d)
}

fn bounded_text(field: &str, s: String, max: usize) -> Result<String, ValidationError> {
    if s.len() > max || s.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max} bytes of printable text"),
        ));
    }
    Ok(s)
}

impl TryFrom<wire::Order> for Order {
    type Error = ValidationError;

    fn try_from(o: wire::Order) -> Result<Self, Self::Error> {
        use wire::order::Action;
        let order_id = bounded_text("order.order_id", o.order_id, 128)?;
        if order_id.is_empty() {
            return Err(ValidationError::new("order.order_id", "must not be empty"));
        }
        let rollout_id = bounded_text("order.rollout_id", o.rollout_id, 128)?;
        if o.seq == 0 {
            return Err(ValidationError::new("order.seq", "must be at least 1"));
        }
        if o.seq > MAX_ORDER_SEQ {
            return Err(ValidationError::new(
                "order.seq",
                format!("{} exceeds the limit of {MAX_ORDER_SEQ}", o.seq),
            ));
        }
        if o.epoch > MAX_ORDER_SEQ {
            return Err(ValidationError::new(
                "order.epoch",
                format!("{} exceeds the limit of {MAX_ORDER_SEQ}", o.epoch),
            ));
        }
        let service = ServiceName::new(o.service).map_err(|e| e.within("order"))?;
        let check_service = |release: &Release, field: &str| {
            if release.service == service {
                Ok(())
            } else {
                Err(ValidationError::new(
                    field,
                    format!(
                        "release {} belongs to service {}, not {}",
                        release.id, release.service, service
                    ),
                ))
            }
        };
        let action = match o.action {
            None => return Err(ValidationError::new("order.action", "missing")),
            Some(Action::Stage(s)) => {
                let release: Release = s
                    .release
                    .ok_or_else(|| ValidationError::new("order.stage.release", "missing"))?
                    .try_into()
                    .map_err(|e: ValidationError| e.within("order.stage"))?;
                check_service(&release, "order.stage.release.service")?;
                OrderAction::Stage { release }
            }
            Some(Action::Activate(a)) => {
                let release: Release = a
                    .release
                    .ok_or_else(|| ValidationError::new("order.activate.release", "missing"))?
                    .try_into()
                    .map_err(|e: ValidationError| e.within("order.activate"))?;
                check_service(&release, "order.activate.release.service")?;
                let healthy_deadline =
                    deadline("order.activate.healthy_deadline_ms", a.healthy_deadline_ms)?;
                if healthy_deadline.is_zero() {
                    return Err(ValidationError::new(
                        "order.activate.healthy_deadline_ms",
                        "must be greater than 0",
                    ));
                }
                let min_healthy = deadline("order.activate.min_healthy_ms", a.min_healthy_ms)?;
                let confirm =
                    deadline("order.activate.confirm_deadline_ms", a.confirm_deadline_ms)?;
                let traffic_weight = weight_percent(
                    "order.activate.traffic_weight_percent",
                    a.traffic_weight_percent,
                )?;
                OrderAction::Activate {
                    release,
                    healthy_deadline,
                    min_healthy,
                    confirm_deadline: (!confirm.is_zero()).then_some(confirm),
                    traffic_weight,
                }
            }
            Some(Action::Rollback(r)) => OrderAction::Rollback {
                to: if r.to_release.is_empty() {
                    None
                } else {
                    Some(
                        ReleaseId::new(r.to_release)
                            .map_err(|e| e.within("order.rollback.to_release"))?,
                    )
                },
            },
            Some(Action::Confirm(c)) => OrderAction::Confirm {
                release: ReleaseId::new(c.release)
                    .map_err(|e| e.within("order.confirm.release"))?,
                traffic_weight: weight_percent(
                    "order.confirm.traffic_weight_percent",
                    c.traffic_weight_percent,
                )?,
            },
            Some(Action::Cancel(_)) => OrderAction::Cancel,
        };
        Ok(Self {
            order_id,
            rollout_id,
            seq: o.seq,
            epoch: o.epoch,
            service,
            action,
        })
    }
}

/// A traffic weight percent from the wire: at most 100.
fn weight_percent(field: &str, w: Option<u32>) -> Result<Option<u8>, ValidationError> {
    match w {
        None => Ok(None),
        Some(w) if w <= 100 => Ok(Some(w as u8)),
        Some(w) => Err(ValidationError::new(field, format!("{w} is above 100"))),
    }
}

impl From<Order> for wire::Order {
    fn from(o: Order) -> Self {
        use wire::order::Action;
        let action = match o.action {
            OrderAction::Stage { release } => Action::Stage(wire::StageOrder {
                release: Some(release.into()),
            }),
            OrderAction::Activate {
                release,
                healthy_deadline,
                min_healthy,
                confirm_deadline,
                traffic_weight,
            } => Action::Activate(wire::ActivateOrder {
                release: Some(release.into()),
                healthy_deadline_ms: healthy_deadline.as_millis() as u64,
                min_healthy_ms: min_healthy.as_millis() as u64,
                confirm_deadline_ms: confirm_deadline.map_or(0, |d| d.as_millis() as u64),
                traffic_weight_percent: traffic_weight.map(u32::from),
            }),
            OrderAction::Rollback { to } => Action::Rollback(wire::RollbackOrder {
                to_release: to.map(ReleaseId::into_string).unwrap_or_default(),
            }),
            OrderAction::Confirm {
                release,
                traffic_weight,
            } => Action::Confirm(wire::ConfirmOrder {
                release: release.into_string(),
                traffic_weight_percent: traffic_weight.map(u32::from),
            }),
            OrderAction::Cancel => Action::Cancel(wire::CancelOrder {}),
        };
        wire::Order {
            order_id: o.order_id,
            rollout_id: o.rollout_id,
            seq: o.seq,
            epoch: o.epoch,
            service: o.service.into_string(),
            action: Some(action),
        }
    }
}

/// A validated [`wire::HoldConfirm`]: keep the named activation's dead-man switch from reverting for
/// lack of a confirm until at least `confirm_deadline` from when the agent receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldConfirm {
    pub service: ServiceName,
    pub release: ReleaseId,
    pub confirm_deadline: Duration,
}

impl TryFrom<wire::HoldConfirm> for HoldConfirm {
    type Error = ValidationError;

    fn try_from(h: wire::HoldConfirm) -> Result<Self, Self::Error> {
        let service = ServiceName::new(h.service).map_err(|e| e.within("hold"))?;
        let release = ReleaseId::new(h.release).map_err(|e| e.within("hold.release"))?;
        let confirm_deadline = deadline("hold.confirm_deadline_ms", h.confirm_deadline_ms)?;
        if confirm_deadline.is_zero() {
            return Err(ValidationError::new(
                "hold.confirm_deadline_ms",
                "must be greater than 0",
            ));
        }
        Ok(Self {
            service,
            release,
            confirm_deadline,
        })
    }
}

impl From<HoldConfirm> for wire::HoldConfirm {
    fn from(h: HoldConfirm) -> Self {
        wire::HoldConfirm {
            service: h.service.into_string(),
            release: h.release.into_string(),
            confirm_deadline_ms: h.confirm_deadline.as_millis() as u64,
        }
    }
}

/// Label key or value check: printable, no `=` or `,` (the selector syntax), bounded length.
pub fn validate_label(field: &str, key: &str, value: &str) -> Result<(), ValidationError> {
    let ok_key = !key.is_empty()
        && key.len() <= 63
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'));
    if !ok_key {
        return Err(ValidationError::new(
            field,
            format!("label key {key:?} must be 1-63 characters of [A-Za-z0-9_./-]"),
        ));
    }
    let ok_value = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok_value {
        return Err(ValidationError::new(
            field,
            format!("label {key}={value:?}: value must be 0-63 characters of [A-Za-z0-9_.-]"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(service: &str, id: &str) -> wire::Release {
        wire::Release {
            service: service.into(),
            id: id.into(),
            sha256: "ab".repeat(32),
            size: 10,
            url: String::new(),
            manifest: String::new(),
        }
    }

    #[test]
    fn identifiers_refuse_path_tricks() {
        for bad in [
            "", ".", "..", "../etc", "a/b", "a\\b", "-x", ".hidden", "a b", "x\0",
        ] {
            assert!(
                ReleaseId::new(bad).is_err(),
                "{bad:?} accepted as release id"
            );
            assert!(
                ServiceName::new(bad).is_err(),
                "{bad:?} accepted as service"
            );
        }
        assert!(ReleaseId::new("web-1.4.2+build.7").is_ok());
        assert!(ServiceName::new("web").is_ok());
        assert!(ServiceName::new("Web").is_err());
        assert!(ReleaseId::new("a".repeat(129)).is_err());
    }

    #[test]
    fn sha256_round_trips_and_rejects_garbage() {
        let s = Sha256::from_hex("f", &"0123456789abcdef".repeat(4)).unwrap();
        assert_eq!(s.to_hex(), "0123456789abcdef".repeat(4));
        assert!(Sha256::from_hex("f", &"g".repeat(64)).is_err());
        assert!(Sha256::from_hex("f", "abc").is_err());
    }

    #[test]
    fn release_validation_names_the_field() {
        let mut r = release("web", "web-1");
        r.sha256 = "xyz".into();
        let e = Release::try_from(r).unwrap_err();
        assert_eq!(e.field, "release.sha256");
        let mut r = release("web", "web-1");
        r.url = "file:///etc/passwd".into();
        assert_eq!(Release::try_from(r).unwrap_err().field, "release.url");
        let e = Release::try_from(release("web", "../x")).unwrap_err();
        assert_eq!(e.field, "release.release id");
    }

    #[test]
    fn order_round_trips_and_checks_service() {
        let o = Order {
            order_id: "o1".into(),
            rollout_id: "r1".into(),
            seq: 3,
            epoch: 2,
            service: ServiceName::new("web").unwrap(),
            action: OrderAction::Activate {
                release: release("web", "web-2").try_into().unwrap(),
                healthy_deadline: Duration::from_secs(5),
                min_healthy: Duration::from_secs(1),
                confirm_deadline: Some(Duration::from_secs(30)),
                traffic_weight: Some(10),
            },
        };
        let w: wire::Order = o.clone().into();
        assert_eq!(Order::try_from(w.clone()).unwrap(), o);
        let mut heavy = w.clone();
        if let Some(wire::order::Action::Activate(a)) = &mut heavy.action {
            a.traffic_weight_percent = Some(101);
        }
        let e = Order::try_from(heavy).unwrap_err();
        assert!(
            e.to_string().contains("traffic_weight_percent") && e.to_string().contains("101"),
            "{e}"
        );
        let mut wrong = w;
        wrong.service = "db".into();
        let e = Order::try_from(wrong).unwrap_err();
        assert!(e.to_string().contains("belongs to service web"), "{e}");

        // A confirm carries a weight too (a weighted canary going to full weight).
        let c = Order {
            action: OrderAction::Confirm {
                release: ReleaseId::new("web-2").unwrap(),
                traffic_weight: Some(100),
            },
            ..o
        };
        let w: wire::Order = c.clone().into();
        assert_eq!(Order::try_from(w.clone()).unwrap(), c);
        let mut heavy = w;
        if let Some(wire::order::Action::Confirm(c)) = &mut heavy.action {
            c.traffic_weight_percent = Some(250);
        }
        let e = Order::try_from(heavy).unwrap_err();
        assert_eq!(e.field, "order.confirm.traffic_weight_percent", "{e}");
    }

    #[test]
    fn order_seq_near_the_end_of_the_type_is_refused() {
        let o = Order {
            order_id: "o1".into(),
            rollout_id: "r1".into(),
            seq: MAX_ORDER_SEQ,
            epoch: 0,
            service: ServiceName::new("web").unwrap(),
            action: OrderAction::Cancel,
        };
        let mut w: wire::Order = o.clone().into();
        assert_eq!(Order::try_from(w.clone()).unwrap(), o);
        w.seq = u64::MAX;
        let e = Order::try_from(w).unwrap_err();
        assert!(e.to_string().contains("order.seq"), "{e}");
    }

    #[test]
    fn hold_round_trips_and_refuses_zero_or_huge_deadlines() {
        let h = HoldConfirm {
            service: ServiceName::new("web").unwrap(),
            release: ReleaseId::new("web-2").unwrap(),
            confirm_deadline: Duration::from_secs(60),
        };
        let w: wire::HoldConfirm = h.clone().into();
        assert_eq!(HoldConfirm::try_from(w.clone()).unwrap(), h);
        let mut zero = w.clone();
        zero.confirm_deadline_ms = 0;
        assert!(HoldConfirm::try_from(zero).is_err());
        let mut huge = w;
        huge.confirm_deadline_ms = u64::MAX;
        let e = HoldConfirm::try_from(huge).unwrap_err();
        assert!(e.to_string().contains("hold.confirm_deadline_ms"), "{e}");
    }
}
