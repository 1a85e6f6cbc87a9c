//! The rollout engine: from an operator's spec to a fleet on the new release, wave by wave.
//!
//! | module | role |
//! |---|---|
//! | [`spec`] | the raw and the validated [`RolloutSpec`] (defaults, wave expressions, limits) |
//! | [`threshold`] | exact integer arithmetic of count / percent limits |
//! | [`plan`] | deterministic cohort planning from a fleet snapshot |
//! | [`intent`] | the persisted intent model: states, phases (with their transitions), waves, hosts, decisions |
//! | [`machine`] | the pure state machine: `step(now, Input) -> Vec<Command>`, split into input handlers, wave policy, the rollback sub-machine and output projections |
//! | [`observed`] | what hosts are seen doing (connection, release, health), never persisted |
//! | [`view`] | what operators see (domain types; the control service converts them) |
//! | [`analysis`] | canary vs baseline comparison and its small-sample judge |
//! | [`record`] | the versioned records the machine persists |
//! | [`task`] | one tokio task per rollout: turns events, timers and operator calls into inputs |
//! | [`manager`] | [`RolloutManager`]: start, plan, control, status, resume after a restart |
//! | [`settings`] | engine settings (from the coordinator config's `[engine]` section) |
//!
//! No wire type appears here: the control service converts at the edge (a tidy test in
//! `engine_tests` enforces it).
//!
//! Architecture invariant: the machine does no I/O and never reads the clock; only its task
//! talks to the store and the fleet, and it persists every decision before sending the orders
//! that decision causes.

pub mod analysis;
pub mod intent;
pub mod machine;
pub mod manager;
pub mod observed;
pub mod plan;
pub mod record;
pub mod settings;
pub mod spec;
pub mod task;
pub mod threshold;
pub mod view;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod scale_tests;
#[cfg(test)]
pub(crate) mod testing;

pub use machine::{Command, Input, OperatorAction, Rollout, RolloutState};
pub use manager::{RolloutError, RolloutManager};
pub use settings::EngineSettings;
pub use spec::RolloutSpec;
pub use threshold::Limit;
pub use view::{Explanation, HostView, RolloutView, ShownPhase, WaveView};
