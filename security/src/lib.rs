//! serin's security foundations, shared by the coordinator, the agent and the CLI.
//!
//! - [`identity`]: the three identities a serin certificate can carry (coordinator, agent with its
//!   host id, operator with a name and a role) and how they are encoded (a `serin://` URI SAN);
//! - [`pki`]: the CA (`serin ca init`) and issuing identities (`serin ca issue …`), keys 0600,
//!   never overwritten;
//! - [`tls`]: the rustls configurations (ring) of the coordinator, the agent and the CLI;
//! - [`transport`]: mTLS for tonic: verified connections with their peer identity, the access
//!   policy layer, and the client connector;
//! - [`limits`]: the wire limits in one table (per-peer streams and calls, the hello time,
//!   echoed values, message sizes) and the counters that enforce the per-peer ones;
//! - [`manifest`]: signed release manifests (ed25519): keys, the file format, signing and the
//!   verification the agent runs before it activates a release.

pub mod identity;
pub mod limits;
pub mod manifest;
pub mod pki;
pub mod tls;
pub mod transport;

pub use identity::{OperatorName, PeerIdentity, Role};
