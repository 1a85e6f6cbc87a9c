//! Load-balancer integration: what the agent tells HAProxy about each service it manages.
//!
//! - [`state`]: the pure traffic state of one service (admin state ready / drain / maint, a
//!   weight percentage, a slow-start ramp after a swap) and the wait for a drained server to go
//!   idle ([`state::DrainWait`]: idle, or a timeout after which the swap proceeds); time is passed in.
//! - [`responder`]: HAProxy's agent-check protocol on a TCP port of the service's own; each
//!   connection gets one line computed from the current [`state::TrafficState`].
//! - [`sessions`]: a server's open sessions from HAProxy's stats socket (`show stat`), for the
//!   wait until idle, when configured.
//!
//! The service task drives the state on every activation and rollback of a service that has an
//! agent-check port (`service/traffic.rs`): drain → wait until idle → swap → healthy → undrain.
//!
//! HAProxy polls the responder (`agent-check agent-port P agent-inter 500ms`), so the
//! coordinator needs no load-balancer credentials and no reload. The agent cannot see the
//! backend: whether a drain would leave a backend without a serving server is checked on the
//! coordinator side, through HAProxy's runtime API (`serin_coordinator::haproxy`).

pub mod responder;
pub mod sessions;
pub mod state;

pub use responder::{AgentCheckResponder, TrafficHandle};
pub use state::{AdminState, DrainVerdict, DrainWait, SlowStart, TrafficState};
