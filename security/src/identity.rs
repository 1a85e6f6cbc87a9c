//! Who is on the other end of a connection: the identities serin's certificates carry.
//!
//! Every certificate the serin CA issues carries exactly one URI subject alternative name in the
//! `serin:` scheme, and that URI is the identity (the common name is only for people reading
//! logs):
//!
//! | identity | URI SAN | extended key usage |
//! |---|---|---|
//! | the coordinator | `serin://coordinator` (plus DNS/IP SANs for its names) | serverAuth |
//! | an agent | `serin://host/<host-id>` | clientAuth |
//! | an operator | `serin://operator/<role>/<name>`, role `viewer`, `deployer` or `admin` | clientAuth |
//!
//! [`PeerIdentity::from_certificate`] turns a certificate that the TLS layer has already verified
//! into a typed [`PeerIdentity`]; a certificate with no `serin:` URI, with two, or with a malformed
//! one is refused rather than guessed at.

use std::fmt;
use std::str::FromStr;

use serin_proto::HostId;

/// The URI scheme and authority prefix of every serin identity.
pub const URI_PREFIX: &str = "serin://";

/// What an operator may do. Ordered: each role includes the rights of the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Read-only: hosts, releases, rollouts, plans, explanations.
    Viewer,
    /// Viewer, plus start and steer rollouts and push releases.
    Deployer,
    /// Deployer, plus certificates, tokens, host approval and revocation.
    Admin,
}

impl Role {
    /// Every role, least privileged first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Deployer, Role::Admin];

    /// The role's name as written in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }

    /// True when this role has at least the rights of `required`.
    pub fn allows(self, required: Role) -> bool {
        self >= required
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "deployer" => Ok(Role::Deployer),
            "admin" => Ok(Role::Admin),
            other => Err(IdentityError::BadRole(other.to_string())),
        }
    }
}

/// An operator's name, e.g. `alice` or `alice@example.com`: `[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}`,
/// so it can never contain a `/` or a `?` that would change the meaning of the identity URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OperatorName(String);

impl OperatorName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, IdentityError> {
        let name = name.into();
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok =
            chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-'));
        if !first_ok || !rest_ok || name.len() > 128 {
            return Err(IdentityError::BadOperatorName(name));
        }
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OperatorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The verified identity of a peer, taken from its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// The coordinator (a server certificate).
    Coordinator,
    /// The agent of one host; the host id it may claim is this one and no other.
    Agent {
        /// The host id written into the certificate.
        host_id: HostId,
    },
    /// A person or a CI job driving the operator API.
    Operator {
        /// Who (shown in the audit log).
        name: OperatorName,
        /// What they may do.
        role: Role,
    },
}

impl PeerIdentity {
    /// The identity URI written into the certificate's subject alternative names.
    pub fn uri(&self) -> String {
        match self {
            PeerIdentity::Coordinator => format!("{URI_PREFIX}coordinator"),
            PeerIdentity::Agent { host_id } => format!("{URI_PREFIX}host/{host_id}"),
            PeerIdentity::Operator { name, role } => {
                format!("{URI_PREFIX}operator/{role}/{name}")
            }
        }
    }

    /// Parses an identity URI (`serin://host/web-01`, `serin://operator/admin/alice`, ...).
    pub fn from_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = |why: &str| IdentityError::BadUri {
            uri: truncate(uri),
            problem: why.to_string(),
        };
        let rest = uri
            .strip_prefix(URI_PREFIX)
            .ok_or_else(|| bad("does not start with serin://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["coordinator"] => Ok(PeerIdentity::Coordinator),
            ["host", id] => {
                let host_id = HostId::new(*id).map_err(|e| bad(&e.to_string()))?;
                Ok(PeerIdentity::Agent { host_id })
            }
            ["operator", role, name] => Ok(PeerIdentity::Operator {
                role: role
                    .parse()
                    .map_err(|e: IdentityError| bad(&e.to_string()))?,
                name: OperatorName::new(*name).map_err(|e| bad(&e.to_string()))?,
            }),
            _ => Err(bad(
                "expected serin://coordinator, serin://host/<host-id> or serin://operator/<role>/<name>",
            )),
        }
    }

    /// The identity of a certificate (DER) that the TLS layer has already verified against the CA.
    ///
    /// Exactly one `serin:` URI subject alternative name must be present.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
        let mut uris = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .filter(|uri| uri.starts_with("serin:"));
        let first = uris.next().ok_or(IdentityError::NoIdentity)?;
        if uris.next().is_some() {
            return Err(IdentityError::Ambiguous);
        }
        Self::from_uri(first)
    }

    /// A short kind name for messages: `coordinator`, `agent`, `operator`.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerIdentity::Coordinator => "coordinator",
            PeerIdentity::Agent { .. } => "agent",
            PeerIdentity::Operator { .. } => "operator",
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// Why a certificate or a URI does not name a serin identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate is not valid DER X.509.
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// No `serin:` URI subject alternative name.
    #[error("the certificate carries no serin identity (no serin:// URI subject alternative name)")]
    NoIdentity,
    /// More than one `serin:` URI.
    #[error("the certificate carries more than one serin identity")]
    Ambiguous,
    /// A `serin:` URI that does not parse.
    #[error("bad serin identity {uri:?}: {problem}")]
    BadUri {
        /// The URI (cut to 200 characters).
        uri: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Not one of `viewer`, `deployer`, `admin`.
    #[error("unknown role {0:?}: expected viewer, deployer or admin")]
    BadRole(String),
    /// An operator name outside its character set.
    #[error("invalid operator name {0:?}: must match [A-Za-z0-9][A-Za-z0-9_.@-]{{0,127}}")]
    BadOperatorName(String),
}

/// Cuts hostile input before it is echoed in an error.
fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri() {
        let ids = [
            PeerIdentity::Coordinator,
            PeerIdentity::Agent {
                host_id: HostId::new("web-01").unwrap(),
            },
            PeerIdentity::Operator {
                name: OperatorName::new("alice@example.com").unwrap(),
                role: Role::Deployer,
            },
        ];
        for id in ids {
            assert_eq!(PeerIdentity::from_uri(&id.uri()).unwrap(), id);
        }
    }

    #[test]
    fn malformed_uris_are_refused_with_the_reason() {
        for (uri, needle) in [
            ("https://host/web-01", "does not start with serin://"),
            ("serin://host/", "host id"),
            ("serin://host/..", "host id"),
            ("serin://host/../etc", "expected serin://coordinator"),
            ("serin://host/a/b", "expected serin://coordinator"),
            ("serin://operator/root/alice", "unknown role"),
            (
                "serin://operator/admin/al/ice",
                "expected serin://coordinator",
            ),
            ("serin://operator/admin/al?ice", "invalid operator name"),
            ("serin://operator/admin", "expected serin://coordinator"),
        ] {
            let err = PeerIdentity::from_uri(uri).unwrap_err().to_string();
            assert!(err.contains(needle), "{uri}: {err}");
        }
    }

    #[test]
    fn roles_are_ordered_by_privilege() {
        assert!(Role::Admin.allows(Role::Deployer));
        assert!(Role::Deployer.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Deployer));
        assert!(!Role::Deployer.allows(Role::Admin));
    }
}
