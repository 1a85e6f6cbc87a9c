//! serin's coordinator: the control-plane daemon. The operator CLI and the `serin` binary live in
//! the `serin-cli` crate (`coordinator/cli/`), which calls [`server::run`] for `serin serve`.

pub mod agent_service;
pub mod artifacts;
pub mod audit;
pub mod config;
pub mod control_service;
pub mod enrolment;
pub mod fault;
pub mod fleet;
pub mod haproxy;
pub mod limits;
pub mod listener;
pub mod registry;
pub mod rollout;
pub mod selector;
pub mod server;
pub mod store;

#[cfg(test)]
mod engine_tests;
